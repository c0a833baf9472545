"""`rewrite.pack_vectors`: a graph's 1-D constants read as views of one buffer per dtype, each
view equal to the constant it replaces and 16-byte aligned; others stay whole."""
import torch
import torch.fx as fx
from hypothesis import given, settings
from hypothesis import strategies as st

from fxsparse.lowering.rewrite import pack_vectors

DTYPES = (torch.int64, torch.bool, torch.float32, torch.float16)


def reads_every_constant(consts: dict) -> fx.Graph:
    """x -> (x, const_0, const_1, ...): a graph whose outputs are its constants."""
    g = fx.Graph()
    x = g.placeholder("x")
    g.output((x, *(g.get_attr(name) for name in consts)))
    return g


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(DTYPES), st.lists(st.integers(0, 9), min_size=0, max_size=2),
                          st.integers(0, 2**31)), min_size=1, max_size=8))
def test_packed_views_equal_their_constants(specs):
    consts = {}
    for i, (dtype, shape, seed) in enumerate(specs):
        shape = shape or [0]  # 1-D, possibly empty
        g = torch.Generator().manual_seed(seed)
        consts[f"c{i}"] = (torch.randint(0, 100, shape, generator=g) % (2 if dtype == torch.bool else 100)).to(dtype)
    graph = reads_every_constant(consts)
    stored = pack_vectors(graph, consts)
    root = torch.nn.Module()
    for name, t in stored.items():
        root.register_buffer(name, t)
    out = fx.GraphModule(root, graph)(torch.zeros(1))[1:]
    for (name, want), got in zip(consts.items(), out):
        assert got.dtype == want.dtype and torch.equal(got, want), name
        if want.dim() == 1:
            assert got.data_ptr() % 16 == 0 or want.numel() == 0
    vectors = [t for t in consts.values() if t.dim() == 1]
    packed = [t for name, t in stored.items() if name.startswith("_fxsparse_vectors_")]
    assert len(packed) == len({t.dtype for t in vectors})
    assert all(name in stored for name, t in consts.items() if t.dim() != 1)


def test_what_the_fused_op_reads_stays_whole():
    """The op checks an index once per tensor: an index it reads is not turned into a view."""
    consts = {"idx": torch.tensor([0, 2]), "other": torch.tensor([1, 3])}
    g = fx.Graph()
    x, w = g.placeholder("x"), g.placeholder("w")
    y = g.call_function(torch.ops.fxsparse.conv2d.default, (
        x, w, None, [1, 1], [0, 0], [1, 1], g.get_attr("idx"), None, 2, None, None, None, "none", False))
    g.output((y, g.get_attr("other")))
    stored = pack_vectors(g, consts)
    assert stored["idx"] is consts["idx"] and "other" not in stored
