"""The local engine: every job in this process, one after another, in dependency order (the
model is loaded once). A job that raises is tried again, up to ``max_attempts`` times."""

from __future__ import annotations

import sys
from pathlib import Path

from . import RunOutcome, blocked_by
from ..graph import Job, error_text, execute_job, is_done, mark


class LocalEngine:
    name = "local"

    def __init__(self, max_attempts: int | None = None):
        self.max_attempts = max_attempts

    def run(self, jobs: list[Job], out: Path, exp, *, model=None, progress: bool = True) -> RunOutcome:
        attempts = self.max_attempts or exp.max_attempts
        outcome = RunOutcome()
        for i, job in enumerate(jobs):
            if is_done(out, job, exp):
                outcome.done.append(job.id)
                continue
            dep = blocked_by(job, outcome)
            if dep:
                outcome.blocked[job.id] = dep
                continue
            errors: list[str] = []
            for attempt in range(1, attempts + 1):
                if progress:
                    print(f"[{i + 1}/{len(jobs)}] {job.id}" + (f" (attempt {attempt}/{attempts})" if attempt > 1 else ""),
                          file=sys.stderr, flush=True)
                try:
                    execute_job(out, job, model=model)
                except Exception as e:  # noqa: BLE001 - recorded, retried, then reported by name
                    errors.append(error_text(e))
                    mark(out, job.id, "failed", errors=errors)
                    continue
                outcome.done.append(job.id)
                break
            else:
                outcome.failed[job.id] = errors
        return outcome
