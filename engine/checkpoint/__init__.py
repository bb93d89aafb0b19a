"""Checkpoints: the Checkpointer (atomic, resumable saves driven by the Trainer, state written by the backend),
the on-disk format (io: naming, checksums, publish, prune) and offline conversion (convert: fp32, HF)."""
