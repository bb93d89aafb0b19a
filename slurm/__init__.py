"""Slurm: sbatch templates, submitit path and a local dev cluster (dev-cluster/)."""
