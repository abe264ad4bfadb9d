"""Launching runners: the environment a runner finds itself in (devices, CPUs, host id, from
SLURM where it runs under SLURM), the local supervisor (one process per device) and SLURM
submission. The claim loop (vtab/runner.py) knows nothing of how it was started."""
