"""SLURM batch scripts rendered from the Hydra config (see slurm/README.md)."""
