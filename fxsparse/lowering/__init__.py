"""Stage 4: lowering, fused conv chains (fusion.py), the compacted graph (rewrite.py) and the choice of each
chain's implementation (choose.py)."""
