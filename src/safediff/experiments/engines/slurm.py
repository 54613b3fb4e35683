"""The Slurm engine: job arrays through ``submitit`` (extra ``slurm``).

The jobs are run in waves. With submitit's ``local`` executor (no Slurm needed; how the engine is
tested) a wave is every job whose dependencies are done, in one array (``executor.map_array``);
the driver waits for it, then submits the next. On Slurm a wave also holds every job that waits
only on jobs of the wave (artifacts to train, then the shards that use them): one array per set of
dependencies, each submitted with ``--dependency=afterok:...`` on the arrays it waits for
(:func:`dependency_parameters`), so Slurm starts a shard as soon as its artifact is trained, with
no round trip through the driver. A failed task is resubmitted in the next wave, up to
``max_attempts`` tries; a task Slurm cancelled because a dependency failed
(``--kill-on-invalid-dep=yes``) is resubmitted without counting a try. A task killed by Slurm
(preemption, time limit, a lost node) fails and is retried the same way; every job is resumable.
Merges, the best-cell choice and the report run in the driver (``safediff run --engine slurm``,
on the login node) between waves.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from . import DRIVER_JOBS, RunOutcome, ready_jobs, require_extra, run_in_driver
from ..graph import Job, execute_job, mark


def dependency_parameters(task_ids: list[str], array_sizes: dict[str, int]) -> dict:
    """submitit's ``slurm_additional_parameters`` that start a job once every task in ``task_ids``
    (submitit's ids: ``ARRAY_TASK``, or a plain job id) has succeeded: ``afterok`` on each, an array
    whose ``array_sizes[ARRAY]`` tasks are all needed named once by its array id. A dependent whose
    dependency fails is cancelled (``kill_on_invalid_dep``), not left pending forever; the driver
    resubmits it. No tasks: no parameters."""
    if not task_ids:
        return {}
    by_array: dict[str, list[str]] = {}
    for t in dict.fromkeys(task_ids):  # each once, in order
        by_array.setdefault(t.split("_", 1)[0], []).append(t)
    parts: list[str] = []
    for array, tasks in by_array.items():
        whole = "_" in tasks[0] and array_sizes.get(array) == len(tasks)
        parts += [array] if whole else tasks
    return {"dependency": "afterok:" + ":".join(parts), "kill_on_invalid_dep": "yes"}


def submission_groups(wave: list[Job]) -> list[tuple[list[Job], tuple[str, ...]]]:
    """The arrays to submit for ``wave`` (in dependency order): its jobs grouped by the jobs of the
    wave they wait for."""
    ids = {j.id for j in wave}
    groups: dict[tuple[str, ...], list[Job]] = {}
    for job in wave:
        groups.setdefault(tuple(d for d in job.deps if d in ids), []).append(job)
    return [(jobs, deps) for deps, jobs in groups.items()]


def task_error(e: BaseException) -> str:
    """One line for a failed task: the exception its job raised (the last line of the trace that
    submitit's FailedJobError quotes), else the first lines of submitit's message (a task killed
    or lost: "... has not produced any output (state: ...)")."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    if lines and "failed during processing with trace" in lines[0]:
        rule = [i for i, ln in enumerate(lines) if set(ln) == {"-"}]
        if len(rule) >= 2 and rule[1] - rule[0] > 1:
            return f"{type(e).__name__}: {lines[rule[1] - 1]}"
    return f"{type(e).__name__}: {' '.join(lines[:2])}"


def _run_job(out: str, job: Job) -> dict:
    return execute_job(out, job)  # the driver's Job: the worker does not rebuild the graph


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

    def _make_executor(self, out: Path) -> tuple:
        """The submitit executor and its kind (``local`` or ``slurm``)."""
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
        return ex, kind

    def run(self, jobs: list[Job], out: Path, exp, *, model=None, progress: bool = True) -> RunOutcome:
        attempts = self.max_attempts or exp.max_attempts
        ex, kind = self._make_executor(Path(out))
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
            if kind == "slurm":  # also the jobs that wait only on this wave's: Slurm holds them (afterok)
                ids, done = {j.id for j in wave}, set(outcome.done)
                for job in pending:
                    if job.id not in ids and job.kind not in DRIVER_JOBS and all(d in done or d in ids for d in job.deps):
                        wave.append(job)
                        ids.add(job.id)
            tasks: dict = {}
            sizes: dict[str, int] = {}
            for group, deps in submission_groups(wave):
                if kind == "slurm":  # (the local executor has no dependencies: its waves hold ready jobs only)
                    ex.update_parameters(slurm_additional_parameters=dependency_parameters(
                        [tasks[d].job_id for d in deps], sizes))
                if progress:
                    print(f"slurm: array of {len(group)} job(s)" + (f" after {', '.join(deps)}" if deps else "")
                          + f": {', '.join(j.id for j in group)}", file=sys.stderr, flush=True)
                for job, task in zip(group, ex.map_array(_run_job, [str(out)] * len(group), group)):
                    tasks[job.id] = task
                    sizes[str(task.job_id).split("_", 1)[0]] = len(group)
            lost: set[str] = set()  # failed or cancelled in this wave
            for job in wave:
                task = tasks[job.id]
                try:
                    task.result()
                    outcome.done.append(job.id)
                    pending.remove(job)
                except Exception as e:  # noqa: BLE001 - a failed or killed task: retried, then reported
                    lost.add(job.id)
                    if any(d in lost for d in job.deps):
                        continue  # cancelled by Slurm with its failed dependency: resubmitted, no try counted
                    errors.setdefault(job.id, []).append(task_error(e))
                    mark(out, job.id, "failed", errors=errors[job.id])
                    if len(errors[job.id]) >= attempts:
                        outcome.failed[job.id] = errors[job.id]
                        pending.remove(job)
        return outcome
