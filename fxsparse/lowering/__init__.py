"""Stage 4: lowering, the compacted graph emitted from the compaction plan (rewrite.py) and the choice
of each conv chain's implementation (choose.py)."""
