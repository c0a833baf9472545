"""tools/profile_kernels.py without a GPU: ncu's raw CSV parsed into the table's rows, the
metric choice, and the script's CPU entry points (--help, --from-csv)."""
import csv
import io
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tools"))

import profile_kernels as PK  # noqa: E402

NVTX = "thread Domain:Push/Pop_Range:PL_Type:PL_Value:CLR_Type:Color:Msg_Type:Msg"
METRICS = [
    ("gpu__time_duration.sum", "nsecond"),
    ("sm__throughput.avg.pct_of_peak_sustained_elapsed", "%"),
    ("sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_active", "%"),
    ("gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed", "%"),
    ("lts__t_sector_hit_rate.pct", "%"),
    ("l1tex__t_sector_hit_rate.pct", "%"),
    ("sm__warps_active.avg.pct_of_peak_sustained_active", "%"),
    ("launch__registers_per_thread", "register/thread"),
    ("launch__shared_mem_per_block_dynamic", "byte/block"),
    ("launch__shared_mem_per_block_static", "byte/block"),
    ("launch__grid_size", ""),
    ("launch__waves_per_multiprocessor", ""),
    ("smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio", "inst"),
    ("smsp__average_warps_issue_stalled_wait_per_issue_active.ratio", "inst"),
    ("smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio", "inst"),
    ("smsp__average_warps_issue_stalled_math_pipe_throttle_per_issue_active.ratio", "inst"),
    ("smsp__average_warps_issue_stalled_selected_per_issue_active.ratio", "inst"),
]
CONV = "_conv2d_tma_kernel"
REDUCE = "_splitk_reduce_kernel"
CUDNN = ("void cutlass::device_kernel<cutlass3x_sm90_tensorop_s64x128x16gemm_f16_f16_f32_f16_f16_128x128x64_1x1x1"
         "_0_nhwc_align8_warpspecialized_cooperative_epi_tma>(T1::Params)")


def _launch(i, rng, kernel, dur_ns, sm, tc, regs, dyn, static, grid, waves, stalls):
    nvtx = f'4242  "<default domain>:{rng}:none:none:none:none:none:none"' if rng else ""
    return [str(i), "4242", "python3", "h100", nvtx, kernel, "1", "7", "(256, 1, 1)", f"({grid}, 1, 1)", "0",
            "9.0", dur_ns, sm, tc, "41.5", "72.25", "n/a", "23.5", str(regs), str(dyn), str(static), str(grid),
            waves, *stalls]


def make_csv():
    header = ["ID", "Process ID", "Process Name", "Host Name", NVTX, "Kernel Name", "Context", "Stream",
              "Block Size", "Grid Size", "Device", "CC", *(m for m, _ in METRICS)]
    units = [""] * 12 + [u for _, u in METRICS]
    conv = dict(kernel=CONV, regs=168, dyn=98304, static=1024, grid=13, waves="0.05")
    red = dict(kernel=REDUCE, regs=32, dyn=0, static=0, grid=392, waves="0.37")
    rows = [
        # a launch outside our ranges (the warm-up): ignored
        _launch(0, "", CONV, "99,000", "1", "1", **{k: conv[k] for k in conv if k != "kernel"},
                stalls=["9", "9", "9", "9", "9"]),
        # fxp1-fxsparse: conv + reduce, two calls
        _launch(1, "fxp1-fxsparse", CONV, "20,000", "40", "30", **{k: conv[k] for k in conv if k != "kernel"},
                stalls=["1.5", "2.5", "0.5", "4.0", "9.0"]),
        _launch(2, "fxp1-fxsparse", REDUCE, "3,000", "10", "0", **{k: red[k] for k in red if k != "kernel"},
                stalls=["6.0", "1.0", "0.0", "0.0", "0.5"]),
        _launch(3, "fxp1-fxsparse", CONV, "22,000", "50", "34", **{k: conv[k] for k in conv if k != "kernel"},
                stalls=["2.5", "3.5", "0.5", "2.0", "9.0"]),
        _launch(4, "fxp1-fxsparse", REDUCE, "5,000", "12", "0", **{k: red[k] for k in red if k != "kernel"},
                stalls=["8.0", "1.0", "0.0", "0.0", "0.5"]),
        # fxp1-cudnn: one kernel, two calls
        _launch(5, "fxp1-cudnn", CUDNN, "15,000", "70", "60", 90, 200000, 0, 132, "1.00",
                stalls=["0.5", "1.0", "0.2", "3.0", "1.0"]),
        _launch(6, "fxp1-cudnn", CUDNN, "16,000", "72", "62", 90, 200000, 0, 132, "1.00",
                stalls=["0.5", "1.0", "0.2", "3.0", "1.0"]),
    ]
    buf = io.StringIO()
    csv.writer(buf, quoting=csv.QUOTE_ALL, lineterminator="\n").writerows([header, units, *rows])
    return "==PROF== Connected to process 4242 (python3)\n" + buf.getvalue()


def test_kernel_rows_average_each_kernel_of_a_range():
    rows = PK.kernel_rows(make_csv())
    assert [(r["row"], r["impl"], r["kernel"]) for r in rows] == [
        (1, "fxsparse", CONV), (1, "fxsparse", REDUCE), (1, "cudnn", "c3x_sm90_s64x128x16gemm_12..coop_epi_tma")]
    conv, red, cudnn = rows
    assert conv["layer"] == PK.ROWS[0][0] and conv["launches"] == 2 and conv["per_call"] == 1
    assert conv["us"] == pytest.approx(21.0)  # (20,000 + 22,000 ns) / 2, the warm-up's 99 us left out
    assert red["us"] == pytest.approx(4.0)
    assert conv["sm_pct"] == pytest.approx(45.0) and conv["tensor_pct"] == pytest.approx(32.0)
    assert conv["dram_pct"] == pytest.approx(41.5) and conv["l2_hit"] == pytest.approx(72.25)
    assert conv["l1_hit"] is None  # "n/a"
    assert conv["occ"] == "23.5"
    assert conv["regs"] == 168 and conv["grid"] == 13 and conv["waves"] == pytest.approx(0.05)
    assert conv["smem_kib"] == pytest.approx((98304 + 1024) / 1024)
    # stalls averaged over the two launches, largest first, "selected" (issuing) never a stall
    assert [s["reason"] for s in conv["top_stalls"]] == ["wait", "math_pipe_throttle", "long_scoreboard"]
    assert [s["cycles_per_issue"] for s in conv["top_stalls"]] == pytest.approx([3.0, 3.0, 2.0])
    assert conv["stalls"] == "wait 3, math 3, long_sb 2"
    assert red["top_stalls"][0] == dict(reason="long_scoreboard", cycles_per_issue=7.0)
    assert cudnn["us"] == pytest.approx(15.5) and cudnn["smem_kib"] == pytest.approx(200000 / 1024)
    assert cudnn["kernel_full"] == CUDNN


def test_summary_sums_the_kernels_of_a_call():
    rows = PK.kernel_rows(make_csv())
    phase1 = {"graph_us": {"fxp1-fxsparse": 24.0, "fxp1-cudnn": 15.0},
              "launch": {"fxp1-fxsparse": "64x128x64 w4 s3 TMA k/2 (output checked)"}}
    child = {"launch": {"fxp1-fxsparse": "64x128x64 w4 s3 TMA k/2 (from the tuning cache)"}}
    summary = PK.summarize(rows, phase1, child)
    assert [(s["impl"], s["kernels"]) for s in summary] == [("fxsparse", 2), ("cudnn", 1)]
    assert summary[0]["ncu_us"] == pytest.approx(25.0) and summary[0]["graph_us"] == 24.0
    assert summary[0]["launch"].endswith("(from the tuning cache)")
    assert summary[1]["ncu_us"] == pytest.approx(15.5)


def test_units_row_is_optional_and_launches_group_by_name_when_calls_differ():
    text = make_csv()
    lines = text.splitlines()
    without_units = "\n".join(lines[:2] + lines[3:])  # ==PROF== line, header, then launches
    rows = PK.kernel_rows(without_units)
    assert rows[0]["us"] == pytest.approx(21.0)  # no units row: ncu's base unit (ns) assumed
    launches = [dict(kernel=k, values={}) for k in ("a", "b", "a")]  # 3 launches: not 2 equal calls
    assert [[l["kernel"] for l in g] for g in PK._group(launches, 2)] == [["a", "a"], ["b"]]


def test_units_in_the_header_cells():
    text = '"ID","Kernel Name","thread Domain:Push/Pop_Range","gpu__time_duration.sum (usecond)"\n' \
           '"3","k","1  ""<default domain>:fxp2-cudnn:none""","1.5"\n' \
           '"4","k","1  ""<default domain>:fxp2-cudnn:none""","2.5"\n'
    (row,) = PK.kernel_rows(text)
    assert (row["layer"], row["impl"], row["us"], row["launches"]) == (PK.ROWS[1][0], "cudnn", 2.0, 2)


def test_read_raw_csv_rejects_output_without_a_table():
    with pytest.raises(ValueError):
        PK.read_raw_csv("==PROF== Disconnected\n==WARNING== No kernels were profiled.\n")


def test_short_kernel_names():
    assert PK.short_kernel_name("_conv2d_kernel") == "_conv2d_kernel"
    assert PK.short_kernel_name("void at::native::(anonymous namespace)::indexSelectLargeIndex<c10::Half, long, "
                                "unsigned int, 2, 2, -2, true>(at::cuda::detail::TensorInfo<c10::Half, unsigned int>)"
                                ) == "indexSelectLargeIndex"
    assert PK.short_kernel_name("sm90_xmma_fprop_implicit_gemm_f16f16_f16f32_f32_nhwckrsc_nhwc_tilesize128x128x64"
                                "_warpgroupsize1x1x1_execute_segment_k_off_kernel__5x_cudnn"
                                ) == "xmma_fprop_igemm_t128x128x64_wg1x1x1"
    assert len(PK.short_kernel_name(CUDNN)) == 40


def test_metric_choice_and_refusals():
    listed = {"gpu__time_duration", "sm__throughput", "sm__pipe_tensor_cycles_active",
              "sm__pipe_tensor_op_hmma_cycles_active", "dram__throughput",
              "smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active",
              "smsp__average_warps_issue_stalled_gmma_per_issue_active"}
    metrics, dropped = PK.choose_metrics(listed)
    assert "sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active" in dropped
    assert "gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed" in dropped
    assert "dram__throughput.avg.pct_of_peak_sustained_elapsed" in metrics
    assert "lts__t_sector_hit_rate.pct" in metrics  # not a chip-dependent name: kept though unlisted
    assert "smsp__average_warps_issue_stalled_gmma_per_issue_active.ratio" in metrics  # a reason found listed
    assert len(metrics) == len(set(metrics))
    everything, none = PK.choose_metrics(None)
    assert not none and len(everything) == len(metrics) + len(dropped) - 1
    out = ("==PROF== Connected\n==ERROR== Failed to access the following 2 metrics: "
           "sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active, sm__foo.sum\n")
    assert PK.refused_metrics(out) == ["sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active",
                                       "sm__foo.sum"]
    query = ("Device NVIDIA H100 80GB HBM3 (GH100)\n---- ----\nMetric Name   Metric Description\n"
             "dram__bytes          # of bytes accessed in DRAM\n"
             "lts__t_sector_hit_rate.pct   proportion of L2 sector lookups that hit\n")
    assert PK.parse_query_metrics(query) == {"dram__bytes", "lts__t_sector_hit_rate", "lts__t_sector_hit_rate.pct"}


def _run(*args):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", "profile_kernels.py"), *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=180)


@pytest.mark.slow
def test_help_and_table_from_csv_on_the_cpu(tmp_path):
    proc = _run("--help")
    assert proc.returncode == 0 and "--rows" in proc.stdout, proc.stderr[-2000:]
    raw = tmp_path / "raw.csv"
    raw.write_text(make_csv())
    out = tmp_path / "ncu.json"
    proc = _run("--from-csv", str(raw), "--json", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    body = [line for line in lines if line.startswith("| 512@7")]
    assert len(body) == 2 + 3  # summary lines (fxsparse, cuDNN), then one line per kernel
    conv = next(line for line in body if CONV in line)
    assert "| 21 " in conv and "wait 3, math 3, long_sb 2" in conv
    assert lines[-1].startswith("| 512@7") and "c3x_sm90" in lines[-1]
    assert f"c3x_sm90_s64x128x16gemm_12..coop_epi_tma (512@7 B32 cudnn): {CUDNN}" in proc.stdout  # the legend
    assert '"rows"' in out.read_text()


FAKE_NCU = '''#!{python}
import json, os, sys
argv = sys.argv[1:]
with open(os.environ["FAKE_NCU_LOG"], "a") as f:
    f.write(json.dumps(argv) + "\\n")
if "--import" in argv:
    sys.stdout.write(open(os.environ["FAKE_NCU_CSV"]).read())
    sys.exit(0)
gmma = [m for m in argv[argv.index("--metrics") + 1].split(",") if "gmma" in m]
if gmma:
    print("==ERROR== Failed to access the following %d metrics: %s" % (len(gmma), ", ".join(gmma)))
    sys.exit(1)
if "--nvtx-include" in argv:
    print("==WARNING== No kernels were profiled.")
    sys.exit(0)
open(argv[argv.index("--export") + 1] + ".ncu-rep", "w").write("report")
'''


def test_ncu_run_drops_refused_metrics_and_falls_back_to_profiler_ranges(tmp_path, monkeypatch):
    from types import SimpleNamespace

    fake = tmp_path / "ncu"
    fake.write_text(FAKE_NCU.replace("{python}", sys.executable))
    fake.chmod(0o755)
    calls, csv_path = tmp_path / "calls.jsonl", tmp_path / "in.csv"
    csv_path.write_text(make_csv())
    monkeypatch.setenv("FAKE_NCU_LOG", str(calls))
    monkeypatch.setenv("FAKE_NCU_CSV", str(csv_path))
    metrics, _ = PK.choose_metrics(None)
    args = SimpleNamespace(no_nvtx_include=False, ncu_timeout_s=60.0, cache_control="all")
    lines = []
    rep, _, _, used, notes = PK.run_ncu(str(fake), metrics, [1, 4], str(tmp_path), args, lines.append)
    import json

    runs = [json.loads(line) for line in calls.read_text().splitlines()]
    assert len(runs) == 3 and len(notes) == 2
    first, last = runs[0], runs[2]
    assert first[:10] == ["--clock-control", "none", "--cache-control", "all", "--target-processes", "all",
                          "--profile-from-start", "off", "--nvtx", "--nvtx-include"]
    includes = [first[i + 1] for i, a in enumerate(first) if a == "--nvtx-include"]
    assert includes == ["fxp1-fxsparse/", "fxp1-cudnn/", "fxp4-fxsparse/", "fxp4-cudnn/"]
    assert first[-5:-1] == ["--child", "--rows", "1,4", "--child-out"]
    assert "--nvtx-include" not in last and "--nvtx" in last  # fallback: cudaProfilerStart/Stop only
    assert not any("gmma" in m for m in used) and len(used) == len(metrics) - 1
    assert rep == str(tmp_path / "profile_kernels.ncu-rep") and os.path.isfile(rep)
    text = PK.export_csv(str(fake), rep, str(tmp_path / "out.csv"))
    assert PK.kernel_rows(text)[0]["us"] == pytest.approx(21.0)
    assert json.loads(calls.read_text().splitlines()[-1])[:7] == ["--import", rep, "--csv", "--page", "raw",
                                                                  "--print-units", "base"]


FAKE_NCU_FULL = '''#!{python}
import json, sys
argv = sys.argv[1:]
if argv == ["--version"]:
    print("NVIDIA (R) Nsight Compute Command Line Profiler\\nVersion 2099.1.0.0 (build 1) (public-release)")
elif argv[:1] == ["--query-metrics"]:
    print("Metric Name   Metric Description")
    for name in ("gpu__time_duration", "sm__throughput", "sm__pipe_tensor_cycles_active", "dram__throughput"):
        print(name + "    description")
elif "--import" in argv:
    sys.stdout.write(open("{csv}").read())
else:
    open(argv[argv.index("--export") + 1] + ".ncu-rep", "w").write("report")
    with open(argv[argv.index("--child-out") + 1], "w") as f:
        json.dump({"launch": {"fxp1-fxsparse": "64x128x64 w4 s3 TMA k/2 (from the tuning cache)"}, "errors": {}}, f)
'''


def test_main_glue_with_a_stand_in_ncu(tmp_path, monkeypatch, capsys):
    import json

    import torch

    raw = tmp_path / "in.csv"
    raw.write_text(make_csv())
    fake = tmp_path / "ncu"
    fake.write_text(FAKE_NCU_FULL.replace("{python}", sys.executable).replace("{csv}", str(raw)))
    fake.chmod(0o755)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(PK.common, "environment", lambda: dict(device="H100 (stand-in)", torch="t", triton="tr"))
    monkeypatch.setattr(PK, "run_phase1", lambda rows, log: {
        "graph_us": {"fxp1-fxsparse": 24.0, "fxp1-cudnn": 15.0}, "launch": {}, "errors": {}})
    out = tmp_path / "res" / "ncu.json"
    assert PK.main(["--rows", "1", "--json", str(out), "--ncu", str(fake)]) == 0
    text = capsys.readouterr().out
    assert "dropped: sm__pipe_tensor_op_gmma_cycles_active" in text and "gpu__dram_throughput" in text
    doc = json.loads(out.read_text())
    assert [r["kernel"] for r in doc["rows"]][:2] == [CONV, REDUCE]
    fx = doc["meta"]["summary"][0]
    assert (fx["graph_us"], fx["ncu_us"], fx["kernels"]) == (24.0, 25.0, 2)
    assert fx["launch"] == "64x128x64 w4 s3 TMA k/2 (from the tuning cache)"
    assert "dram__throughput.avg.pct_of_peak_sustained_elapsed" in doc["meta"]["metrics"]
    assert os.path.isfile(tmp_path / "res" / "profile_kernels.raw.csv")
    assert text.strip().splitlines()[-1].startswith("| 512@7 B32 | cudnn")
