"""slurm stage: lands with its issue (see docs/ and the issue tracker)."""
