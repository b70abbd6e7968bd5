"""Start a script as the processes of a SLURM job step on this host, for multi-process tests.

Each process gets the variables ``srun`` sets for a task (``SLURM_JOB_ID``, ``SLURM_STEP_NODELIST``,
``SLURM_NTASKS``, ``SLURM_PROCID``, ``SLURM_LOCALID``), so the script joins with
``lmx.parallel.initialize_distributed()`` and no arguments: JAX's cluster auto-detection finds
the job, its coordinator (the first node, 127.0.0.1) and the process's rank, as on a real cluster.
A single process gets no SLURM variables (a one-process run).
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np

# JAX's SLURM detection puts the coordinator on port 61440 + (SLURM_JOB_ID mod 4096)
SLURM_PORT_BASE = 65535 - 2**12 + 1


def free_slurm_job_id() -> int:
    """A job id whose coordinator port is free on 127.0.0.1."""
    for job_id in np.random.default_rng().permutation(2**12):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", SLURM_PORT_BASE + int(job_id)))
            except OSError:
                continue
        return int(job_id)
    raise RuntimeError("no free port in the SLURM coordinator range")


def launch(script: str, nproc: int, args: list[str], cwd, timeout: float = 400) -> None:
    """Run ``python -c script <pid> <nproc> *args`` as ``nproc`` tasks of one job step and wait;
    a task that fails fails the test with the end of its stderr. The script sets its own
    ``XLA_FLAGS`` / ``JAX_PLATFORMS`` (the test process's are not passed on)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("XLA_FLAGS", "JAX_PLATFORMS") and not k.startswith("SLURM_")}
    job_id = free_slurm_job_id()

    def task_env(pid: int) -> dict:
        if nproc == 1:
            return env
        return {**env, "SLURM_JOB_ID": str(job_id), "SLURM_STEP_NODELIST": "127.0.0.1",
                "SLURM_NTASKS": str(nproc), "SLURM_PROCID": str(pid), "SLURM_LOCALID": str(pid)}

    procs = [subprocess.Popen([sys.executable, "-c", script, str(pid), str(nproc), *args],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=task_env(pid), cwd=cwd) for pid in range(nproc)]
    try:
        results = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err[-3000:]
