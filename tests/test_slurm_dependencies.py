"""The Slurm engine's ``afterok`` dependencies (no Slurm here): the dependency strings, and the
arrays the engine submits to a stand-in for submitit's Slurm executor that runs each task in this
process when its result is asked for (cancelling it, as ``--kill-on-invalid-dep=yes`` does, when a
task it depends on failed)."""

from __future__ import annotations

import json

import pytest

from safediff.experiments import graph as graph_module
from safediff.experiments import load_experiment
from safediff.experiments.engines.slurm import dependency_parameters, submission_groups

EXPERIMENT = """\
name: deps
n: 1
shards: 2
detectors: [testbed:striped]
artifacts:
  es: {method: sanitizer, concept: striped}
  ine: {method: invert, concept: striped, against: 'sanitizer(path="{artifact:es}")'}
stacks:
  none: null
  np: 'negative_prompt(embedding="{artifact:ine}")'
benchmarks:
  explicit: testbed:striped/explicit
"""


def test_dependency_strings():
    assert dependency_parameters([], {}) == {}
    # every task of array 10 is needed: the array once; one task of array 11: that task
    assert dependency_parameters(["10_0", "10_1", "11_2"], {"10": 2, "11": 4}) == {
        "dependency": "afterok:10:11_2", "kill_on_invalid_dep": "yes"}
    assert dependency_parameters(["10_1", "10_1"], {"10": 3}) == {"dependency": "afterok:10_1",
                                                                  "kill_on_invalid_dep": "yes"}
    assert dependency_parameters(["12345"], {})["dependency"] == "afterok:12345"  # a plain job


class FakeTask:
    def __init__(self, executor, job_id: str, fn, args, dependency: str):
        self.executor, self.job_id, self.fn, self.args, self.dependency = executor, job_id, fn, args, dependency

    def result(self):
        waits = self.dependency.removeprefix("afterok:").split(":") if self.dependency else []
        if any(w in self.executor.failed or w.split("_")[0] in self.executor.failed for w in waits):
            raise RuntimeError(f"Job {self.job_id} has not produced any output (state: CANCELLED)")
        try:
            return self.fn(*self.args)
        except Exception:
            self.executor.failed.update({self.job_id, self.job_id.split("_")[0]})
            raise


class FakeSlurmExecutor:
    """Records each array (its jobs and its --dependency) and runs its tasks on demand."""

    def __init__(self):
        self.params: dict = {}
        self.arrays: list[tuple[list[str], str]] = []
        self.failed: set[str] = set()

    def update_parameters(self, **kw):
        self.params.update(kw)

    def map_array(self, fn, outs, jobs):
        array = str(100 + len(self.arrays))
        dep = self.params.get("slurm_additional_parameters", {}).get("dependency", "")
        self.arrays.append(([j.id for j in jobs], dep))
        return [FakeTask(self, f"{array}_{i}", fn, (o, j), dep) for i, (o, j) in enumerate(zip(outs, jobs))]


@pytest.fixture
def slurm_engine(monkeypatch):
    pytest.importorskip("submitit")
    from safediff.experiments.engines import get_engine

    fake = FakeSlurmExecutor()
    eng = get_engine("slurm", executor="local")
    monkeypatch.setattr(eng, "_make_executor", lambda out: (fake, "slurm"))
    for kind in ("_train", "_shard", "_merge", "_report"):  # the jobs' work is not what is tested here
        monkeypatch.setattr(graph_module, kind, lambda *a: None)
    return eng, fake


def run(eng, tmp_path):
    (tmp_path / "e.yaml").write_text(EXPERIMENT)
    exp = load_experiment(tmp_path / "e.yaml")
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    (out / "experiment.json").write_text(json.dumps(exp.raw))  # what run_experiment stores
    return eng.run(graph_module.build_graph(exp), out, exp, progress=False)


def test_one_wave_with_afterok_on_the_arrays_each_array_waits_for(tmp_path, slurm_engine):
    eng, fake = slurm_engine
    outcome = run(eng, tmp_path)
    assert outcome.complete, outcome.describe()
    assert fake.arrays == [
        (["train:es", "shard:none/explicit:0-of-2", "shard:none/explicit:1-of-2"], ""),
        (["train:ine"], "afterok:100_0"),  # one task of the first array
        (["shard:np/explicit:0-of-2", "shard:np/explicit:1-of-2"], "afterok:101"),  # the whole second array
    ]


def test_a_failed_dependency_cancels_its_dependents_without_charging_them_a_try(tmp_path, slurm_engine, monkeypatch):
    eng, fake = slurm_engine
    fails = []

    def train(out, exp, job, model):
        if job.id == "train:ine" and not fails:
            fails.append(job.id)
            raise RuntimeError("node lost")

    monkeypatch.setattr(graph_module, "_train", train)
    from safediff.experiments.engines import slurm as slurm_module

    charged = []  # the tries the engine counts (it marks each counted failure)
    real_mark = slurm_module.mark
    monkeypatch.setattr(slurm_module, "mark", lambda out, job_id, status, **kw: charged.append(job_id)
                        or real_mark(out, job_id, status, **kw))
    outcome = run(eng, tmp_path)
    assert outcome.complete, outcome.describe()
    assert fake.arrays[3:] == [  # the second wave: the failed job again, and the shards Slurm cancelled
        (["train:ine"], ""),
        (["shard:np/explicit:0-of-2", "shard:np/explicit:1-of-2"], "afterok:103"),
    ]
    assert charged == ["train:ine"]  # the cancelled shards were not charged a try


def test_groups_follow_the_waves_dependencies():
    exp_jobs = [graph_module.Job("a", "train"), graph_module.Job("b", "train", ("a",)),
                graph_module.Job("c", "shard", ("b",)), graph_module.Job("d", "shard", ("b", "x"))]
    assert [([j.id for j in g], d) for g, d in submission_groups(exp_jobs)] == [
        (["a"], ()), (["b"], ("a",)), (["c", "d"], ("b",))]  # "x", done before the wave, is not waited for
