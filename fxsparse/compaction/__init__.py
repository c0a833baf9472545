"""Stage 3: compaction, which channels each tensor keeps (propagate.py) and the coupling groups
(groups.py), both from one table of per-op channel rules (rules.py)."""
