"""tools/pass_profile.py on the small ResNet (CPU): one dynamo graph, the pass timed per stage."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tools"))

import pass_profile  # noqa: E402


def test_pass_profile_times_every_stage(capsys):
    assert pass_profile.main(["--model", "small_resnet", "--device", "cpu", "--repeat", "2"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    cells = [c.strip() for c in last.strip("|").split("|")]
    assert cells[0] == "small_resnet", last
    seconds = [float(c) for c in cells[3:]]  # capture .. report, the pass, its CPU time
    assert len(seconds) == 7 and all(s >= 0 for s in seconds), last
    assert seconds[5] >= max(seconds[:5]) and seconds[5] > 0, last
