"""Launching training: topology detection, NCCL environment, torchrun / SLURM plans."""
