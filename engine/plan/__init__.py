"""`trellis plan --calibrate` (calibrate: measure a cluster profile on this job's ranks) and `--validate`
(validate: run planned layouts here, predicted vs measured step time). The planner's arithmetic itself is
engine/memory (planner, throughput, cluster): pure, no torch; these two run torch and processes."""
