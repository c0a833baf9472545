"""`benchmarks/seed_sweep.py --quick` runs on the CPU, exits 0, prints its tables and writes JSON."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_seed_sweep_quick(tmp_path):
    out = tmp_path / "seed.json"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "seed_sweep.py"), "--quick",
                           "--json", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = proc.stdout
    assert "Top-10" in text and "Recovery" in text
    main = text[text.index("Sweep (speedups"):]  # the main table is printed last
    assert "| kind" in main and "kernel rel_l2" in main and "pruning rel_l2" in main
    for kind in ("channel", "block-4", "input"):
        assert kind in main
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert len(rows) == 6  # 3 kinds x 2 ratios
    for r in rows:
        assert r["kernel_rel_l2"] < 1e-3
        assert r["fx_us"] > 0
        assert (r["pruning_rel_l2"] == 0) == (r["keep"] == 1.0)
    assert len(data["meta"]["recovery"]) == 3
