"""The Slurm engine: job arrays through ``submitit`` (extra ``slurm``).

The jobs are run in waves: every job whose dependencies are done goes into one array
(``executor.map_array``), the driver waits for it, then submits the next wave; a failed task is
resubmitted in the next wave, up to ``max_attempts`` tries. A task killed by Slurm (preemption,
time limit, a lost node) fails and is retried the same way; every job is resumable. submitit's
``local`` executor runs the same arrays as local processes (no Slurm needed), which is how the
engine is tested. The driver (``safediff run --engine slurm``) runs on the login node.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from . import DRIVER_JOBS, RunOutcome, ready_jobs, require_extra, run_in_driver
from ..graph import Job, execute_job, mark


def _run_job(out: str, job_id: str) -> dict:
    return execute_job(out, job_id)


class SlurmEngine:
    name = "slurm"

    def __init__(self, max_attempts: int | None = None, executor: str = "auto", partition: str | None = None,
                 timeout_min: int = 240, gpus_per_task: int | None = None):
        self.submitit = require_extra("submitit", "slurm")
        if executor not in ("auto", "local", "slurm"):
            raise ValueError(f"Unknown submitit executor {executor!r}; choose auto, local or slurm.")
        if executor == "slurm" and shutil.which("sbatch") is None:
            raise ValueError("--slurm-executor slurm needs Slurm's sbatch on this machine; use --slurm-executor local "
                             "to run the same arrays as local processes.")
        self.executor = executor
        self.max_attempts = max_attempts
        self.partition = partition
        self.timeout_min = timeout_min
        self.gpus_per_task = gpus_per_task

    def _make_executor(self, out: Path):
        folder = out / "slurm" / "%j"
        kind = self.executor
        if kind == "auto":
            kind = "slurm" if shutil.which("sbatch") else "local"
        ex = (self.submitit.LocalExecutor(folder=folder) if kind == "local"
              else self.submitit.AutoExecutor(folder=folder, cluster="slurm"))
        params = {"timeout_min": self.timeout_min}
        if kind == "slurm":
            import torch

            gpus = self.gpus_per_task if self.gpus_per_task is not None else int(torch.cuda.is_available())
            params.update(slurm_partition=self.partition, gpus_per_node=gpus, tasks_per_node=1)
            params = {k: v for k, v in params.items() if v is not None}
        ex.update_parameters(**params)
        return ex

    def run(self, jobs: list[Job], out: Path, exp, *, model=None, progress: bool = True) -> RunOutcome:
        attempts = self.max_attempts or exp.max_attempts
        ex = self._make_executor(Path(out))
        outcome = RunOutcome()
        errors: dict[str, list[str]] = {}
        pending = list(jobs)
        while pending:
            wave = []
            for job in ready_jobs(pending, out, exp, outcome):
                if job.kind in DRIVER_JOBS:  # a merge or the report: seconds, no model, no array
                    pending.remove(job)
                    run_in_driver(job, out, outcome)
                else:
                    wave.append(job)
            if not wave:
                continue
            if progress:
                print(f"slurm: array of {len(wave)} job(s): {', '.join(j.id for j in wave)}", file=sys.stderr, flush=True)
            tasks = ex.map_array(_run_job, [str(out)] * len(wave), [j.id for j in wave])
            for job, task in zip(wave, tasks):
                try:
                    task.result()
                    outcome.done.append(job.id)
                    pending.remove(job)
                except Exception as e:  # noqa: BLE001 - a failed or killed task: retried, then reported
                    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
                    errors.setdefault(job.id, []).append(f"{type(e).__name__}: {lines[-1] if lines else ''}")
                    mark(out, job.id, "failed", errors=errors[job.id])
                    if len(errors[job.id]) >= attempts:
                        outcome.failed[job.id] = errors[job.id]
                        pending.remove(job)
        return outcome
