"""The conv kernel's global memory accesses stay vectorized on Hopper: checked on the sm90 PTX
that Triton builds offline (no GPU needed; tools/kernel_ptx.py, run in a subprocess
because this test process runs Triton in its interpreter)."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def ptx_counts():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    run = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "kernel_ptx.py"), "--json"],
                         capture_output=True, text=True, env=env, timeout=600)
    if run.returncode != 0:
        if "OfflineCompileUnavailable" in run.stderr:
            pytest.skip("this Triton cannot compile for sm90 offline: " + run.stderr.strip().splitlines()[-1])
        raise AssertionError(run.stderr[-3000:])
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_dense_tile_moves_16_bytes_per_access(ptx_counts):
    """A channels_last output and residual, channels contiguous: every store and residual load
    is a 16-byte vector access, and the K loop runs on wgmma with asynchronous copies, for 1x1
    and 3x3 convs. An output-channel index turns them into 2-byte scalar accesses, which is why
    a 1x1 conv writes a wider layout from zero filter rows rather than through the index."""
    for case in ("1x1", "3x3"):
        dense = ptx_counts[case]
        assert dense["st.global.v4"] > 0 and dense["st.global.b16"] == 0, (case, dense)
        assert dense["ld.global.v4"] > 0 and dense["ld.global.b16"] == 0, (case, dense)
        assert dense["wgmma"] > 0 and dense["cp.async"] > 0, (case, dense)
        scattered = ptx_counts[case + " out_index"]
        assert scattered["st.global.b16"] > 0 and scattered["st.global.v4"] == 0, (case, scattered)


@pytest.mark.parametrize("kind", ["gemm", "box", "box/2"])
def test_tma_launches_feed_wgmma_from_tma_copies(ptx_counts, kind):
    """kernels/tma.py: tiles arrive by TMA bulk tensor copies and feed wgmma from shared memory;
    the box load reshaped to a GEMM tile makes no round trip through registers, strided or not."""
    c = ptx_counts[f"tma {kind}"]
    assert c["cp.async.bulk.tensor"] > 0 and c["wgmma"] > 0, c
    assert c["ld.shared"] == 0 and c["st.shared"] == 0, c


@pytest.mark.parametrize("case", ["3x3 split", "tma box/split"])
def test_split_k_slices_meet_through_one_acquire_release_atomic(ptx_counts, case):
    """tile.last_slice_to_arrive: the slices' partial-sum stores are fenced by a CTA barrier
    and one acq_rel atomic at GPU scope, and the last slice reads the others through L2
    (ld.global.cg), never from a stale L1. Launches that do not split carry no atomic."""
    c = ptx_counts[case]
    assert c["atom.global.gpu.acq_rel.add"] == 1 and c["bar.sync"] > 0 and c["ld.global.cg"] > 0, c
    unsplit = ptx_counts["3x3" if case == "3x3 split" else "tma box"]
    assert unsplit["atom.global.gpu.acq_rel.add"] == 0 and unsplit["ld.global.cg"] == 0, unsplit


@pytest.mark.parametrize("kind", ["gemm", "box/row"])
def test_tma_k_loop_keeps_a_step_of_wgmma_in_flight(ptx_counts, kind):
    """The TMA GEMM's K loop, and a box's whose leading dimensions are 1, wait once per step
    for the TMA arrival and keep one step's wgmma group in flight (wait_group 1), the loop
    that the multi-dimensional box's (two arrival waits) is compared against."""
    loop = ptx_counts[f"loop {kind}"]
    assert loop["wgmma"] >= 4 and loop["wait_group"] == "1" and loop["mbarrier waits"] == 1, loop


def test_warp_specialised_box_launch_splits_loader_and_mma_warps(ptx_counts):
    """kernels/box_ws.py (Gluon) builds for sm90 with real warp specialisation: the partitions
    trade registers (setmaxnreg), and the MMA warps' K loop waits on one TMA arrival per step,
    keeps one step of wgmma in flight, and issues no TMA copy itself (the loader warp does)."""
    c, loop = ptx_counts["tma box/ws"], ptx_counts["loop box/ws"]
    assert c["setmaxnreg"] > 0 and c["cp.async.bulk.tensor"] > 0 and c["wgmma"] > 0, c
    assert loop["wgmma"] >= 4 and loop["wait_group"] == "1" and loop["mbarrier waits"] == 1, loop
