"""The Ray engine: each job is a Ray task, submitted when its dependencies are done.

* A task asks for one GPU where the cluster has GPUs (``num_gpus=1``), else one CPU.
* Ray reuses a worker process for the next task, and a worker loads the model once
  (:func:`safediff.experiments.graph.worker_model` keeps it), so a worker pays the load once.
* A task whose worker dies (SIGKILL, a lost node) or that raises is retried by Ray, up to
  ``max_attempts`` tries in all; every job is resumable, so a retry redoes only what was not stored.
* The same code runs on a laptop (a local Ray started here), a Slurm allocation or Kubernetes
  (``ray start`` / KubeRay; pass ``--ray-address`` or set ``RAY_ADDRESS``); docs/scale-out.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

from . import DRIVER_JOBS, RunOutcome, ready_jobs, require_extra, run_in_driver
from ..graph import Job, execute_job, mark


def _run_job(out: str, job: Job) -> dict:
    return execute_job(out, job)  # the driver's Job: the worker does not rebuild the graph


class RayEngine:
    name = "ray"

    def __init__(self, max_attempts: int | None = None, address: str | None = None, num_cpus: int | None = None):
        self.ray = require_extra("ray", "ray")
        self.max_attempts = max_attempts
        self.address = address
        self.num_cpus = num_cpus

    def run(self, jobs: list[Job], out: Path, exp, *, model=None, progress: bool = True) -> RunOutcome:
        ray = self.ray
        attempts = self.max_attempts or exp.max_attempts
        started_here = not ray.is_initialized()
        if started_here:
            kw = {"address": self.address} if self.address else {"num_cpus": self.num_cpus} if self.num_cpus else {}
            ray.init(ignore_reinit_error=True, log_to_driver=False, include_dashboard=False, **kw)
        try:
            gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
            task = ray.remote(num_gpus=gpus, num_cpus=0 if gpus else 1, max_retries=attempts - 1,
                              retry_exceptions=True)(_run_job)
            outcome = RunOutcome()
            pending = list(jobs)
            running: dict = {}  # object ref -> job
            while pending or running:
                for job in ready_jobs(pending, out, exp, outcome):
                    pending.remove(job)
                    if job.kind in DRIVER_JOBS:
                        run_in_driver(job, out, outcome)
                        continue
                    running[task.remote(str(out), job)] = job
                    if progress:
                        print(f"ray: submitted {job.id}", file=sys.stderr, flush=True)
                if not running:
                    continue  # the driver's jobs may have unblocked others
                ready, _ = ray.wait(list(running), num_returns=1)
                for ref in ready:
                    job = running.pop(ref)
                    try:
                        ray.get(ref)
                        outcome.done.append(job.id)
                    except Exception as e:  # noqa: BLE001 - Ray gave up after its retries
                        err = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
                        outcome.failed[job.id] = [err]
                        outcome.attempts[job.id] = attempts
                        mark(out, job.id, "failed", errors=[err])
            return outcome
        finally:
            if started_here:
                ray.shutdown()
