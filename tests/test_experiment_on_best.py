"""The study's "ES on the best cell" row as an experiment's ``on_best`` (issue 29, item 2): its jobs'
order and its bad input (the numbers against `safediff study`: tests/test_experiments.py)."""

from __future__ import annotations

import pytest

from safediff.experiments import ExperimentError, build_graph, load_experiment, shipped_experiment

BASE = """\
name: mini
n: 1
shards: 2
report: study
detectors: [testbed:striped]
artifacts:
  es: {method: sanitizer, concept: striped}
stacks:
  none.none: null
  none.negative_prompt.explicit: 'negative_prompt(text="striped")'
benchmarks:
  testbed: [testbed:striped/explicit]
"""


def test_on_best_runs_after_every_cell_and_before_the_report(tmp_path):
    (tmp_path / "e.yaml").write_text(BASE + "on_best: {name: sanitizer, stack: 'sanitizer(path=\"{artifact:es}\")'}\n")
    exp = load_experiment(tmp_path / "e.yaml")
    jobs = {j.id: j for j in build_graph(exp)}
    assert jobs["best"].deps == ("merge:none.none/testbed", "merge:none.negative_prompt.explicit/testbed")
    assert jobs["shard:@best+sanitizer/testbed:1-of-2"].deps == ("best", "train:es")
    assert jobs["merge:@best+sanitizer/testbed"].deps == ("shard:@best+sanitizer/testbed:0-of-2",
                                                          "shard:@best+sanitizer/testbed:1-of-2")
    assert "merge:@best+sanitizer/testbed" in jobs["report"].deps
    assert exp.on_best.min_benign == 0.8  # the study's best_min_benign unless given
    study = load_experiment(shipped_experiment("testbed_study"))
    assert study.on_best.stack == 'sanitizer(path="{artifact:sanitizer_striped}")' and study.on_best.min_benign == 0.8


@pytest.mark.parametrize("line, message", [
    ("on_best: {name: es, stack: 'sanitizer(path=\"{artifact:nope}\")'}", "does not declare"),
    ("on_best: {name: es, stack: 'sanitizer(path=\"{artifact:es}\")', min_benign: 2}", r"in \[0, 1\]"),
    ("on_best: {name: es, stack: 'frobnicate'}", "Unknown defense"),
    ("on_best: {name: es, stak: 'sanitizer(path=\"{artifact:es}\")'}", "unknown on_best key 'stak'"),
])
def test_bad_on_best_is_refused_naming_its_line(tmp_path, line, message):
    (tmp_path / "e.yaml").write_text(BASE + line + "\n")
    with pytest.raises(ExperimentError, match=message) as e:
        load_experiment(tmp_path / "e.yaml")
    assert "e.yaml:13" in str(e.value)


def test_on_best_needs_the_study_report(tmp_path):
    (tmp_path / "e.yaml").write_text(BASE.replace("report: study", "report: cells")
                                     + "on_best: {name: es, stack: 'sanitizer(path=\"{artifact:es}\")'}\n")
    with pytest.raises(ExperimentError, match=r"e\.yaml:13: `on_best`.*needs `report: study`"):
        load_experiment(tmp_path / "e.yaml")
