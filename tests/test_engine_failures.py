"""A job that fails three times under the Ray and submitit engines (issue 29, item 4): reported by
name with its error, the jobs after it blocked, the other cells finished, the run incomplete
(the local engine's case: tests/test_experiments.py).

The fault has to happen in the engines' worker processes, which import safediff afresh: a
``sitecustomize`` module on their ``PYTHONPATH`` (set for this test only) makes the shard job of
stack ``np`` record the attempt in a file and raise."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from safediff.experiments import run_experiment

EXPERIMENT = """\
name: faulty
n: 1
shards: 1
settings: {num_inference_steps: 1, batch_size: 1}
detectors: [testbed:striped]
stacks:
  none: null
  np: 'negative_prompt(text="striped")'
benchmarks:
  explicit: testbed:striped/explicit
"""

SITECUSTOMIZE = '''
import os
if os.environ.get("SAFEDIFF_TEST_FAIL_LOG"):
    from safediff.experiments import graph as _g
    _real = _g._shard
    def _faulty(out, exp, job, model):
        if job.params["stack"] == "np":
            with open(os.environ["SAFEDIFF_TEST_FAIL_LOG"], "a") as f:
                f.write(job.id + "\\n")
            raise RuntimeError("GPU fell off the bus")
        return _real(out, exp, job, model)
    _g._shard = _faulty
'''


@pytest.fixture
def faulty_workers(tmp_path, monkeypatch):
    """Worker processes started from here fail every ``np`` shard; returns the attempts' log."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    log = tmp_path / "attempts.log"
    path = [str(site), *[p for p in sys.path if p], os.environ.get("PYTHONPATH", "")]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in path if p))
    monkeypatch.setenv("SAFEDIFF_TEST_FAIL_LOG", str(log))
    return log


def check_failure_reported(outcome, out: Path, log: Path) -> None:
    job = "shard:np/explicit:0-of-1"
    assert not outcome.complete
    assert list(outcome.failed) == [job] and "GPU fell off the bus" in outcome.failed[job][-1]
    assert log.read_text().splitlines() == [job] * 3  # tried three times, in the workers
    assert outcome.blocked == {"merge:np/explicit": job, "report": "merge:np/explicit"}
    assert "merge:none/explicit" in outcome.done  # the other cell is finished, not dropped
    text = outcome.describe()
    assert "INCOMPLETE" in text and f"FAILED {job} after 3 attempt(s)" in text and "GPU fell off the bus" in text
    status = json.loads((out / "status.json").read_text())
    assert status["complete"] is False and job in status["failed"] and status["attempts"][job] == 3


def test_ray_reports_a_job_failing_three_times(tmp_path, testbed, faulty_workers):
    pytest.importorskip("ray")
    (tmp_path / "e.yaml").write_text(EXPERIMENT)
    out = tmp_path / "out"
    outcome = run_experiment(tmp_path / "e.yaml", out, engine="ray", model=testbed, progress=False,
                             engine_options={"num_cpus": 2})
    check_failure_reported(outcome, out, faulty_workers)


def test_submitit_reports_a_job_failing_three_times(tmp_path, testbed, faulty_workers):
    pytest.importorskip("submitit")
    (tmp_path / "e.yaml").write_text(EXPERIMENT)
    out = tmp_path / "out"
    outcome = run_experiment(tmp_path / "e.yaml", out, engine="slurm", model=testbed, progress=False,
                             engine_options={"executor": "local", "timeout_min": 5})
    check_failure_reported(outcome, out, faulty_workers)
    assert len(outcome.failed["shard:np/explicit:0-of-1"]) == 3  # each wave's error recorded


def test_a_failed_submitit_task_is_reported_by_its_jobs_error_not_its_log_path():
    from safediff.experiments.engines.slurm import task_error

    class FailedJobError(RuntimeError):
        pass

    failed = FailedJobError("Job (task=0) failed during processing with trace:\n----------------------\n"
                            "Traceback (most recent call last):\n  File \"graph.py\", line 3, in _shard\n"
                            "RuntimeError: GPU fell off the bus\n----------------------\n"
                            "You can check full logs with 'job.stderr(0)' and 'job.stdout(0)'or at paths:\n"
                            "  - /runs/slurm/1/1_0_log.err\n  - /runs/slurm/1/1_0_log.out")
    assert task_error(failed) == "FailedJobError: RuntimeError: GPU fell off the bus"
    lost = RuntimeError("Job 7 (task: 0) with path /runs/slurm/7/7_0_result.pkl\nhas not produced any output "
                        "(state: NODE_FAIL)\nNo output/error stream produced ! Check: /runs/slurm/7/7_0_log.out")
    assert task_error(lost) == ("RuntimeError: Job 7 (task: 0) with path /runs/slurm/7/7_0_result.pkl has not "
                                "produced any output (state: NODE_FAIL)")
