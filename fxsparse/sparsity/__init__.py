"""Stage 2: sparsity, which channels of each conv's weight are zero (where masks are read)."""
