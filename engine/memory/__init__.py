"""The memory estimator (`trellis estimate-memory`, `trellis plan`): pure arithmetic, no torch.

estimator: per-rank bytes of one layout; activations: saved-for-backward bytes per family; models: the
estimator's model dims and parameter counts (dims are read by parallel/models/dims.py); planner: layouts that
fit, ranked by a throughput model; plot: stacked bars (matplotlib)."""
