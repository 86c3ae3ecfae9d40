"""``mmfuse submit``: any stage on SLURM through submitit (multi-node, job arrays, preemption → requeue → resume),
or on this machine with submitit's local executor; ``local_cluster/cluster.py`` starts a real SLURM cluster here.
See docs/slurm.md. No stage imports this package."""
