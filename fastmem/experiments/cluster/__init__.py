"""Sweeps on a cluster: each pending run of a plan as one job, through submitit (Slurm, or its local executor).

Owns the executor flags (options), the callable a job runs (job: the trainer as a subprocess, the
preemption checkpoint and requeue), the record of submitted jobs and the run states built from it
(ledger), submitting and waiting (submit), and the `status` command's lines (status). Planning,
validation and the trainer command stay in fastmem/experiments/sweep.py; the trainer's signal handling
(fastmem/train/interrupt.py) is what makes a preempted run resume exactly.
"""

from fastmem.experiments.cluster.options import EXECUTORS, ClusterOptions

__all__ = ["EXECUTORS", "ClusterOptions"]
