"""Per-family tensor-parallel plans and pipeline split points, as data."""
