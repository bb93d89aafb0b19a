"""Parallelism: ParallelDims/mesh, tensor/pipeline/data parallel, per-family plans."""
