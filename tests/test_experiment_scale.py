"""A job's cost does not grow with the experiment (issue 29, item 2 at 10,000 jobs): the engines
pass each job the graph the driver built once, and a worker reads ``experiment.json`` once."""

from __future__ import annotations

import pytest

from safediff.experiments import graph as graph_module
from safediff.experiments import run_experiment

WIDE = """\
name: wide
n: 1
shards: {shards}
settings: {{num_inference_steps: 1}}
detectors: [testbed:striped]
stacks:
  none: null
benchmarks:
  explicit: testbed:striped/explicit
"""


@pytest.fixture
def counted(monkeypatch):
    """No-op job bodies, and counts of graph builds and experiment parses made by the jobs."""
    calls = {"build_graph": 0, "parse": 0, "jobs": 0}
    real_build, real_parse = graph_module.build_graph, graph_module.experiment_from_dict

    def build(exp):
        calls["build_graph"] += 1
        return real_build(exp)

    def parse(*a, **k):
        calls["parse"] += 1
        return real_parse(*a, **k)

    def noop(out, exp, job, model):
        calls["jobs"] += 1

    monkeypatch.setattr(graph_module, "build_graph", build)
    monkeypatch.setattr(graph_module, "experiment_from_dict", parse)
    for kind in ("_shard", "_merge", "_report"):
        monkeypatch.setattr(graph_module, kind, noop)
    monkeypatch.setattr(graph_module, "_STORED", {})
    return calls


@pytest.mark.parametrize("shards", [20, 400])
def test_jobs_neither_rebuild_the_graph_nor_reparse_the_experiment(tmp_path, testbed, counted, shards):
    (tmp_path / "e.yaml").write_text(WIDE.format(shards=shards))
    outcome = run_experiment(tmp_path / "e.yaml", tmp_path / "out", model=testbed, progress=False)
    assert outcome.complete and counted["jobs"] == shards + 2  # every shard, the merge, the report
    # before: one graph build per job (quadratic in the job count); now none in the jobs, and the
    # stored experiment parsed once, whatever the number of jobs
    assert counted["build_graph"] == 0 and counted["parse"] == 1


def test_a_job_given_by_id_is_found_in_a_graph_built_once_per_process(tmp_path, testbed, counted):
    (tmp_path / "e.yaml").write_text(WIDE.format(shards=50))
    out = tmp_path / "out"
    run_experiment(tmp_path / "e.yaml", out, model=testbed, progress=False)
    for p in (out / "jobs").glob("*.json"):
        p.unlink()  # every job to do again, this time by id (a Slurm array task started by hand)
    for i in range(50):
        graph_module.execute_job(out, f"shard:none/explicit:{i}-of-50", model=testbed)
    assert counted["build_graph"] == 1 and counted["parse"] == 1
    with pytest.raises(graph_module.ExperimentError, match="no job 'shard:none/explicit:50-of-50'"):
        graph_module.execute_job(out, "shard:none/explicit:50-of-50", model=testbed)
