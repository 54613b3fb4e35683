"""Engines run an experiment's jobs: ``local`` (this process, the default), ``ray`` and ``slurm``
(submitit). Each gets the jobs in dependency order and returns a :class:`RunOutcome`; a job is
tried ``max_attempts`` times, then reported by name with its error, and the jobs after it are
reported blocked (never dropped)."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field


@dataclass
class RunOutcome:
    """What a launch did: jobs finished (now or before), failed (with each attempt's error) and
    blocked (waiting on a failed job)."""

    done: list[str] = field(default_factory=list)
    failed: dict[str, list[str]] = field(default_factory=dict)
    blocked: dict[str, str] = field(default_factory=dict)
    #: tries of each failed job where they are more than its recorded errors (Ray keeps only the last)
    attempts: dict[str, int] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return not self.failed and not self.blocked

    def describe(self) -> str:
        if self.complete:
            return f"experiment complete: {len(self.done)} jobs done"
        lines = [f"experiment INCOMPLETE: {len(self.done)} jobs done, {len(self.failed)} failed, "
                 f"{len(self.blocked)} blocked; rerun the same command to retry (finished work is kept)"]
        for job, errors in self.failed.items():
            lines.append(f"  FAILED {job} after {self.attempts.get(job, len(errors))} attempt(s): {errors[-1]}")
        for job, why in self.blocked.items():
            lines.append(f"  blocked {job}: waits on {why}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"complete": self.complete, "done": self.done, "failed": self.failed, "blocked": self.blocked,
                "attempts": {j: self.attempts.get(j, len(e)) for j, e in self.failed.items()}}


ENGINES = ("local", "ray", "slurm")


def require_extra(module: str, extra: str):
    """Import an optional dependency, or say which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"The {extra} engine needs `{module}`, which is not installed: "
                          f"pip install 'safediff[{extra}]'") from None


def get_engine(name: str, **options):
    """An engine by name (``local``, ``ray``, ``slurm``); ``options`` go to its constructor."""
    attempts = options.get("max_attempts")
    if attempts is not None and (isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1):
        raise ValueError(f"--max-attempts must be a whole number >= 1, got {attempts!r}.")
    if name == "local":
        from .local import LocalEngine as E
    elif name == "ray":
        from .ray import RayEngine as E
    elif name == "slurm":
        from .slurm import SlurmEngine as E
    else:
        raise ValueError(f"Unknown engine {name!r}; choose one of {list(ENGINES)}.")
    return E(**options)


#: jobs that load no model and take seconds: engines run them in the driver, not as tasks
DRIVER_JOBS = ("merge", "best", "report")


def run_in_driver(job, out, outcome: RunOutcome) -> None:
    """Run a light job (a merge, the report) here, recording its outcome."""
    from ..graph import error_text, execute_job, mark

    try:
        execute_job(out, job)
        outcome.done.append(job.id)
    except Exception as e:  # noqa: BLE001 - reported by name
        outcome.failed[job.id] = [error_text(e)]
        mark(out, job.id, "failed", errors=outcome.failed[job.id])


def blocked_by(job, outcome: RunOutcome) -> str | None:
    """The failed or blocked dependency that keeps ``job`` from running, if any."""
    return next((d for d in job.deps if d in outcome.failed or d in outcome.blocked), None)


def ready_jobs(pending: list, out, exp, outcome: RunOutcome) -> list:
    """Sort ``pending`` for an engine that dispatches in rounds: jobs already done (now or by an
    earlier launch) and jobs behind a failed one leave ``pending`` for ``outcome``; the jobs whose
    dependencies are all done are returned (left in ``pending``: the engine decides when they leave)."""
    from ..graph import is_done

    ready = []
    for job in list(pending):
        if is_done(out, job, exp):
            outcome.done.append(job.id)
            pending.remove(job)
        elif blocked_by(job, outcome):
            outcome.blocked[job.id] = blocked_by(job, outcome)
            pending.remove(job)
        elif all(d in outcome.done for d in job.deps):
            ready.append(job)
    return ready
