"""Benchmark scripts in their `--quick` CPU form: they run, exit 0 and print a table."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script, *args, timeout=180):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_conv_layers_quick(tmp_path):
    out = tmp_path / "rows.json"
    proc = _run("conv_layers.py", "--quick", "--json", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert any(line.startswith("| layer") for line in lines), proc.stdout[-3000:]
    assert lines[-1].startswith("| min fx speedup"), "the table must be printed last"
    assert out.exists() and '"rows"' in out.read_text()


@pytest.mark.slow
def test_models_quick(tmp_path):
    out = tmp_path / "models.json"
    proc = _run("models.py", "--quick", "--json", str(out), timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[-1].startswith("| small_resnet"), "the table must be printed last"
    import json

    rows = json.loads(out.read_text())["rows"]
    pruned = [r for r in rows if r["keep"] < 1.0]
    assert pruned and all(r["fx_err"] < 1e-4 for r in rows)
    assert all(r["macs_kept"] < 0.5 for r in pruned)


def test_conv_layers_compare_reads_two_runs(tmp_path):
    import json

    def run(path, fx):
        rows = [dict(layer="seed", batch=16, keep="1/1", fxsparse_us=fx, cudnn_cl_us=20.0, speedup=20.0 / fx)]
        path.write_text(json.dumps({"meta": {}, "rows": rows}))
        return str(path)

    proc = _run("conv_layers.py", "--compare", run(tmp_path / "a.json", 10.0), run(tmp_path / "b.json", 12.5))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("| geomean") and "1.25" in last


@pytest.mark.slow
def test_compile_time_runs_on_the_cpu():
    """benchmarks/compile_time.py end to end on a small ResNet (its GPU run is the same code)."""
    proc = _run("compile_time.py", "--models", "small_resnet", "--batch", "2", "--device", "cpu", timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("| small_resnet") and "error" not in proc.stdout, proc.stdout[-3000:]


def test_compile_time_stage_clock_splits_the_backend():
    """compile_time.py's stage clock: every stage of fxsparse's backend is timed inside the backend
    (none counted twice or outside it), the compiled graph's first run is timed apart, and the
    clock leaves the backend as it found it (the compiled model still computes the eager result)."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import compile_time
    import torch

    import fxsparse
    import fxsparse.backend as B
    from fxsparse.demo import SmallResNet, randomize_batchnorm

    torch.manual_seed(0)
    model, x = SmallResNet(16), torch.randn(2, 3, 16, 16)
    randomize_batchnorm(model)
    fxsparse.sparsify(model.eval(), 0.5, example_inputs=(x,))
    compiled = torch.compile(model, backend="fxsparse", options={"inductor": False})
    functions = {name: getattr(B, name) for name in ("capture", "read_all", "propagate", "lower", "compile_graph")}
    torch._dynamo.reset()
    with torch.no_grad(), compile_time.stage_clock() as seconds:
        out = compiled(x)
    assert {name: getattr(B, name) for name in functions} == functions
    for stage in ("capture", "sparsity", "compaction", "lowering", "guard", "first_run"):
        assert seconds[stage] > 0, (stage, seconds)
    assert seconds["inductor"] == 0  # inductor=False: the rewritten graph runs as it is
    assert seconds["report"] >= 0 and seconds["other"] >= 0, seconds
    assert sum(seconds[s] for s in compile_time.STAGES) == pytest.approx(seconds["backend"])
    assert seconds["backend_entered"] <= seconds["capture_entered"]  # when dynamo handed over the graph
    with torch.no_grad():
        torch.testing.assert_close(out, model(x), rtol=1e-4, atol=1e-4)


def test_compile_time_splits_dynamo_side_where_the_backend_is_called():
    """Dynamo's side of a first call = before the backend (its trace) + after it (guards, code)."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import compile_time

    result = dict(compile_s=4.0, stages=dict(backend=1.0, first_run=0.5, trace_before=2.0))
    parts = compile_time.stage_parts(result, "fx")
    assert parts["trace"] == pytest.approx(2.5) and parts["trace_after"] == pytest.approx(0.5)
    assert "trace_after" not in compile_time.stage_parts(dict(compile_s=4.0, stages=dict(backend=1.0, first_run=0.5)),
                                                         "fx")
