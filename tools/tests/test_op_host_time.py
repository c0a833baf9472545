"""tools/op_host_time.py on the CPU: every part timed, the kernel's launch mocked (so the Triton
interpreter never runs), the dispatch the op's time less its own parts (run in a subprocess:
the tool sets TRITON_INTERPRET before triton is imported)."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_op_host_time_splits_a_call_on_the_cpu():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    run = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "op_host_time.py"), "--calls", "200"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = {}
    for line in run.stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 2 and cells[1].replace(".", "", 1).lstrip("-").isdigit():
            rows[cells[0]] = float(cells[1])
    op, dispatch = rows["the op, as a compiled graph calls it"], rows["torch.library's dispatch (the rest)"]
    checks, launcher = rows["the op's argument checks"], rows["the launcher, launch mocked"]
    assert min(op, checks, launcher, rows["aten conv + add + relu, same tensors"]) > 0, run.stdout
    assert abs(op - (dispatch + checks + launcher)) < 0.2, run.stdout  # (rounding of the printed figures)
    # a mocked launch: one interpreted 3x3 conv launch alone takes far longer than this
    assert op < 5000, run.stdout
