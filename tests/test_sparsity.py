"""Stage 2's reading of a weight's zeros as channels (`sparsity.read.zero_channels`), against a
direct reading: random weights with random zero rows, columns and stray zeros."""
import torch
from hypothesis import given, settings, strategies as st

from fxsparse.sparsity.read import zero_channels


def direct_reading(zero: torch.Tensor, grouped: bool) -> tuple:
    """(rows, cols, some, leftover) read element by element."""
    cout, cin = zero.shape[:2]
    rows = torch.tensor([bool(zero[o].all()) for o in range(cout)])
    cols = torch.tensor([not grouped and bool(zero[:, i].all()) for i in range(cin)])
    rest = zero[~rows][:, ~cols]
    return rows, cols, bool(zero.any()), bool(rest.any())


@settings(max_examples=60, deadline=None)
@given(cout=st.integers(1, 9), cin=st.integers(1, 7), k=st.sampled_from([1, 3]), grouped=st.booleans(),
       row_p=st.floats(0, 1), col_p=st.floats(0, 1), stray_p=st.floats(0, 0.5), masked=st.booleans(),
       seed=st.integers(0, 2**16))
def test_zero_channels_reads_what_the_elements_say(cout, cin, k, grouped, row_p, col_p, stray_p, masked, seed):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(cout, cin, k, k, generator=g)
    weight[torch.rand(cout, generator=g) < row_p] = 0
    weight[:, torch.rand(cin, generator=g) < col_p] = 0
    weight[torch.rand(weight.shape, generator=g) < stray_p] = 0
    zero = weight == 0
    structural = zero if masked else None

    read = zero_channels(zero, grouped, structural)

    rows, cols, some, leftover = direct_reading(zero, grouped)
    assert torch.equal(read.rows, rows) and torch.equal(read.cols, cols)
    assert (read.some, read.leftover) == (some, leftover)
    assert read.masked == (masked and some)
    assert read.rows.device.type == "cpu" and read.rows.dtype == torch.bool
