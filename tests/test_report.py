"""The report: report.json's structure, graph dumps, FXSPARSE_DUMP_DIR, one log line per
graph, and fxsparse.explain."""
import json
import logging

import pytest
import torch
import torch.nn as nn

import fxsparse
import models as M
from fxsparse.report import Report, current_report
from models import assert_matches, compile_model, fresh_dynamo, report  # noqa: F401

pytestmark = pytest.mark.usefixtures("fresh_dynamo")

CONV_KEYS = {"name", "in_channels", "out_channels", "kept_in_channels", "kept_out_channels", "kernel_size",
             "stride", "lowering", "reason", "macs_before", "macs_after"}
GRAPH_KEYS = {"index", "mode", "lowering", "convs", "macs_before", "macs_after", "macs_ideal"}


class TwoGraphs(nn.Module):
    """A graph break between two pruned conv stacks: two graphs, two reports."""

    def __init__(self):
        super().__init__()
        self.a = M.ConvBNReLU(3, 8)
        self.b = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        x = self.a(x)
        torch._dynamo.graph_break()
        return self.b(x)


def two_graphs():
    torch.manual_seed(0)
    model = M.randomize_bn(TwoGraphs()).eval()
    return M.custom_out(model), (2, 3, 6, 6)


def test_report_json_structure(tmp_path):
    model, shape = M.build("resnet")
    M.custom_out(model)
    c = compile_model(model, tmp_path, lowering="triton")
    with torch.no_grad():
        c(torch.randn(shape))
        assert_matches(c, model, shape)
    r = report(tmp_path)
    (g,) = r["graphs"]
    assert GRAPH_KEYS <= set(g)
    assert g["mode"] == "inference" and g["lowering"] == "triton"
    assert g["macs_before"] == sum(c["macs_before"] for c in g["convs"])
    assert g["macs_after"] == sum(c["macs_after"] for c in g["convs"]) < g["macs_before"]
    assert [c["name"] for c in g["convs"]] == [
        "conv1", "layer1.0.conv1", "layer1.0.conv2", "layer2.0.conv1", "layer2.0.conv2",
        "layer2.0.downsample.0", "layer2.1.conv1", "layer2.1.conv2"]
    for row in g["convs"]:
        assert CONV_KEYS <= set(row)
        assert row["lowering"] == "triton" and row["reason"] is None
        assert row["kept_out_channels"] < row["out_channels"]
        # a 1x1 conv writing its residual add's wider layout computes zero rows (dense_out)
        widened = any("zero filter rows" in n for n in row["notes"])
        assert row["macs_after"] < row["macs_before"] or (widened and row["macs_after"] == row["macs_before"])
    conv1 = g["convs"][0]
    assert (conv1["in_channels"], conv1["out_channels"], conv1["kept_out_channels"]) == (3, 8, 5)
    assert conv1["kernel_size"] == [3, 3] and conv1["stride"] == [1, 1]
    assert conv1["macs_before"] == 8 * 8 * 8 * 3 * 9  # H * W * Cout * Cin * k^2
    # the in-process report is the same content
    assert json.loads(json.dumps(current_report(str(tmp_path)).to_dict(), default=str)) == r


def test_unchanged_conv_has_a_reason_in_the_report(tmp_path):
    model = nn.Sequential(nn.Conv3d(2, 4, 3), nn.ReLU()).eval()
    c = compile_model(model, tmp_path)
    with torch.no_grad():
        c(torch.randn(1, 2, 4, 4, 4))
    (row,) = report(tmp_path)["graphs"][0]["convs"]
    assert row["lowering"] == "unchanged" and "conv3d" in row["reason"]


def test_graph_dumps_written(tmp_path):
    model, shape = two_graphs()
    c = compile_model(model, tmp_path, lowering="triton", fullgraph=False)
    with torch.no_grad():
        c(torch.randn(shape))
        assert_matches(c, model, shape)
    graphs = report(tmp_path)["graphs"]
    assert len(graphs) == 2
    for g in graphs:
        before = (tmp_path / f"graph_{g['index']}.before.py").read_text()
        after = (tmp_path / f"graph_{g['index']}.after.py").read_text()
        assert "conv2d" in before and "fxsparse.conv2d" not in before
        assert "torch.ops.fxsparse.conv2d" in after


def test_dump_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("FXSPARSE_DUMP_DIR", str(tmp_path / "env"))
    model, shape = M.build("chain")
    M.custom_out(model)
    c = torch.compile(model, backend="fxsparse", options={"inductor": False})
    with torch.no_grad():
        c(torch.randn(shape))
    r = report(tmp_path / "env")
    assert len(r["graphs"]) == 1 and r["graphs"][0]["macs_after"] < r["graphs"][0]["macs_before"]
    assert list((tmp_path / "env").glob("graph_*.after.py"))


def test_one_log_line_per_graph(tmp_path, caplog):
    model, shape = two_graphs()
    c = compile_model(model, tmp_path, fullgraph=False)
    with caplog.at_level(logging.INFO, logger="fxsparse"), torch.no_grad():
        c(torch.randn(shape))
        c(torch.randn(shape))  # no new graph, no new line
    lines = [r.getMessage() for r in caplog.records if r.name == "fxsparse" and "fxsparse graph" in r.getMessage()]
    assert len(lines) == 2, lines
    assert all("convs rewritten" in l and "MACs kept" in l for l in lines)
    assert "1/1 convs rewritten" in lines[0]


def test_explain_returns_and_prints_a_report(capsys):
    model, shape = M.build("resnet")
    M.custom_out(model)
    x = torch.randn(shape)
    want = model(x).detach()
    r = fxsparse.explain(model, x)  # grad enabled here: explain runs under no_grad itself
    assert isinstance(r, Report) and len(r.graphs) == 1
    g = r.graphs[0]
    assert g.mode == "inference" and len(g.convs) == 8
    assert g.macs_after < g.macs_before
    out = capsys.readouterr().out
    assert "layer2.0.downsample.0" in out and "MACs kept" in out and out.strip() == str(r).strip()
    torch.testing.assert_close(model(x), want)  # explaining does not touch the model


def test_explain_graph_break_and_options():
    model, shape = two_graphs()
    r = fxsparse.explain(model, torch.randn(shape), options={"lowering": "triton"})
    assert [g.index for g in r.graphs] == [0, 1]
    assert [c.lowering for g in r.graphs for c in g.convs] == ["triton", "triton"]
    with pytest.raises(ValueError, match="unknown option"):
        fxsparse.explain(model, torch.randn(shape), options={"bogus": 1})


def test_explain_reports_unstructured_sparsity():
    model, shape = M.build("chain")
    M.global_unstructured(model)
    r = fxsparse.explain(model, torch.randn(shape))
    rows = r.graphs[0].convs
    assert all(c.kept_out_channels == c.out_channels for c in rows)
    assert any("element-wise" in n for c in rows for n in c.notes)


WRAPPER = '''
triton_poi_fused_relu_0 = async_compile.triton('triton_poi_fused_relu_0', """
def triton_poi_fused_relu_0(in_ptr0, xnumel):
    tmp0.run(x)  # kernel source: not a launch
""")
class Runner:
    def call(self, args):
        arg0_1, arg1_1 = args
        buf0 = empty_strided_cuda((2, 8), (8, 1), torch.float16)
        # Topologically Sorted Source Nodes: [conv2d]
        buf1 = extern_kernels.convolution(arg0_1, arg1_1, stride=(1, 1))
        buf2 = torch.ops.fxsparse.conv2d.default(buf1, _frozen_param0, None, [1, 1])
        stream0 = get_raw_stream(0)
        triton_poi_fused_relu_0.run(buf2, 16, stream=stream0)
        cpp_fused_add_1(buf2, buf0)
        buf3 = torch.ops.aten.index_select.default(buf2, 1, _frozen_param1)
        del buf1
        return (buf3, )

def partition_0(args):
    triton_poi_fused_relu_0.run(args[0], 16, stream=stream0)

def benchmark_compiled_module(times=10, repeat=10):
    triton_poi_fused_relu_0.run(buf2, 16, stream=stream0)
'''


def test_launch_sites_counts_the_per_call_functions_only():
    from fxsparse.report.launches import launch_sites

    counts = launch_sites(WRAPPER)
    assert counts == {"extern": 1, "fxsparse": 1, "inductor_triton": 2, "inductor_cpp": 1, "aten": 1}


def test_report_counts_the_launches_of_the_compiled_code(tmp_path):
    """Every fused chain is one op line in Inductor's code, and the report's launches are
    the code's launch lines plus the op's own gathers and fills."""
    from torch._inductor.utils import run_and_get_code

    from fxsparse.report.launches import launch_sites

    model, shape = M.build("bottleneck")
    M.custom_out(model)
    x = torch.randn(shape)
    c = compile_model(model, tmp_path, lowering="triton", inductor=True)
    with torch.no_grad():
        _, codes = run_and_get_code(c, x)
        assert_matches(c, model, shape)
    (g,) = report(tmp_path)["graphs"]
    sites = launch_sites(codes[-1])
    triton_convs = sum(row["lowering"] == "triton" for row in g["convs"])
    assert triton_convs == len(g["convs"]) >= 3 and sites["fxsparse"] == triton_convs
    assert sites["extern"] == 0  # no conv left to aten
    assert isinstance(g["launches"], int) and g["launches"] >= sum(sites.values())


def _many_parameters():
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Conv2d(4, 4, 1) for _ in range(20)]).eval()  # 40 parameters


def test_report_suggests_freezing_where_parameters_are_cuda_graph_inputs():
    """40 parameters arriving as inputs of a CUDA graph: the note names the setting. On the
    CPU (where frozen convs measured slower) and below the threshold: no note."""
    from fxsparse.backend import freezing_hint

    params = list(_many_parameters().parameters())
    (note,) = freezing_hint(params, on_cuda=True)
    assert note.startswith("40 parameters are graph inputs") and "torch._inductor.config.freezing" in note
    assert freezing_hint(params, on_cuda=False) == []
    assert freezing_hint(params[:10] + [torch.randn(3)] * 30, on_cuda=True) == []  # 10 parameters


def test_report_prints_graph_notes_and_gives_no_freezing_hint_on_the_cpu():
    x = torch.randn(1, 4, 5, 5)
    r = fxsparse.explain(_many_parameters(), x, options={"inductor": False})
    assert not any("freezing" in n for g in r.graphs for n in g.notes)
    r.graphs[0].notes.append("a note")
    assert "\n  note: a note" in str(r)


def test_chosen_launches_lists_what_the_selector_picked(monkeypatch):
    """fxsparse.report.chosen_launches: one row per conv shape the selector chose a launch for, with
    the launch as the tuner tables name it and the selector's note; a clear line when none."""
    from fxsparse.kernels import choices as C
    from fxsparse.kernels import select as S
    from fxsparse.kernels.problem import ConvProblem
    from fxsparse.report import chosen_launches, format_chosen_launches

    monkeypatch.setattr(S.selector, "table", {})
    assert "no conv launch chosen" in format_chosen_launches()
    problem = ConvProblem(32, 7, 7, 512, 512, (3, 3), (1, 1), (1, 1), (1, 1), "float16", 1, 1, 132)
    S.selector.table[problem] = S.Selection(C.WS_BOX, C.tile_config(64, 128, 64, 4, 6), 1,
                                            "warp-specialised output checked")
    rows = chosen_launches()
    assert rows == [(1568, 512, 512, "7x7", "3x3", "1x1", "float16", "64x128x64 w4 s6 ws_box",
                     "warp-specialised output checked")]
    table = format_chosen_launches()
    assert "64x128x64 w4 s6 ws_box" in table and "7x7" in table
