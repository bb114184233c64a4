"""Analysis for understanding, not defending: Table-1 sanity checks on weight deltas and nnsight probes."""
