"""Training engine: model/data building, trainer loop, AMP, optimizers, metrics, checkpoints."""
