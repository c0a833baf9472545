"""tools/pass_profile.py on the small ResNet (CPU): one dynamo graph, the pass timed per stage
(run in a subprocess: the tool imports benchmarks/models.py, a name tests/ also uses)."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_pass_profile_times_every_stage():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    run = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "pass_profile.py"), "--model", "small_resnet",
                          "--device", "cpu", "--repeat", "2"], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    last = run.stdout.strip().splitlines()[-1]
    cells = [c.strip() for c in last.strip("|").split("|")]
    assert cells[0] == "small_resnet", last
    seconds = [float(c) for c in cells[3:]]  # capture .. report, the pass, its CPU time
    assert len(seconds) == 7 and all(s >= 0 for s in seconds), last
    assert seconds[5] >= max(seconds[:5]) and seconds[5] > 0, last
