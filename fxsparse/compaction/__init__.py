"""Stage 3: compaction, which channels each tensor keeps (propagate.py), the conv chains that fuse
(chains.py) and the coupling groups (groups.py), from one table of per-op channel rules (rules.py).
Its output, the plan (records in plan.py), is frozen and checked (check.py) before lowering reads it."""
