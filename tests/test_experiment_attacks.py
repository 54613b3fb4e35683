"""The attack table as a shipped experiment (issue 29, item 2: "the attack table likewise"): the
shipped file's targets and budgets, and an attack job that gives what calling the attack directly
(as benchmarks/attacks_testbed.py does) gives."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from safediff.experiments import build_graph, load_experiment, run_experiment, shipped_experiment

ROOT = Path(__file__).resolve().parents[1]


def attack_script():
    """benchmarks/attacks_testbed.py as a module (its targets, detectors and counting)."""
    spec = importlib.util.spec_from_file_location("attacks_testbed", ROOT / "benchmarks" / "attacks_testbed.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_shipped_attack_table_has_the_scripts_targets_attacks_and_budgets(tmp_path):
    script = attack_script()
    exp = load_experiment(shipped_experiment("testbed_attacks"))
    arts = {m: str(tmp_path / f"{m}.safetensors") for m in ("esd", "duo", "dark_miner", "sanitizer", "ine_none", "ine_duo")}
    names = {"esd": "esd_striped", "duo": "duo_striped", "dark_miner": "dark_miner_striped",
             "sanitizer": "sanitizer_striped", "ine_none": "ine_none_striped", "ine_duo": "ine_duo_striped"}
    resolved = {k: exp.resolve(v, tmp_path).replace(str(tmp_path / "artifacts"), str(tmp_path)) if v else None
                for k, v in exp.stacks.items()}
    for key, name in names.items():
        resolved = {k: v.replace(f"{name}.safetensors", f"{key}.safetensors") if v else v for k, v in resolved.items()}
    study = tmp_path / "study"
    study.mkdir()
    (study / "results.json").write_text(json.dumps({"cells": {
        "duo|safree|explicit": {"stack": resolved["duo+safree-explicit"]},
        "duo|safree|ine": {"stack": resolved["duo+safree-ine"]}}}))
    assert resolved == script.targets(study, arts)  # the script's targets (its best cell aside: results-dependent)
    steps = {"concept_inversion": 200, "p4d": 30, "unlearndiffatk": 40, "ring_a_bell": 50, "mma": 30}
    assert len(exp.attacks) == 6 * len(exp.stacks)
    for t in exp.attacks.values():
        assert (t.concept, t.n, t.seed) == ("striped", 16, 0) and t.name == f"{t.stack}.{t.method}"
        if t.method == "unlearndiffatk":
            assert t.options == {"check_every": 20}
        # the random floor: as many candidates as UnlearnDiffAtk records (steps / check_every)
        assert t.steps == (40 // 20 if t.method == "random_prefix" else steps[t.method])
    assert list(exp.detectors) == script.detectors() and exp.target_detector == "testbed:striped"
    ids = [j.id for j in build_graph(exp)]
    assert ids.index("train:ine_duo_striped") < ids.index("attack:duo+safree-ine.p4d") and ids[-1] == "report"


def test_an_attack_job_gives_what_calling_the_attack_directly_gives(tmp_path, testbed):
    from safediff.attacks import AttackBudget, AttackTarget, get_attack, run_attack, seed_prompts_for
    from safediff.attacks.base import evaluate_attack

    script = attack_script()
    data = yaml.safe_load(shipped_experiment("testbed_attacks").read_text())
    keep = ("uce.unlearndiffatk", "uce.random_prefix")  # white-box (on the stack) and black-box (text encoder only)
    data["stacks"] = {"uce": data["stacks"]["uce"]}
    data["artifacts"] = {}
    data["attacks"] = {k: {**data["attacks"][k], "n": 1, "steps": 2} for k in keep}  # cut down: 1 prompt, 2 steps
    path = tmp_path / "attacks.yaml"
    path.write_text(yaml.safe_dump(data))
    out = tmp_path / "out"
    outcome = run_experiment(path, out, model=testbed, progress=False)
    assert outcome.complete, outcome.describe()
    stack, seeds = data["stacks"]["uce"], seed_prompts_for("striped", 1)
    for name in keep:
        t = data["attacks"][name]
        cls = get_attack(t["method"])
        attack = cls(cls.config_cls.from_options([f"{k}={v}" for k, v in (t.get("options") or {}).items()]))
        res = run_attack(attack, AttackTarget(testbed, stack if cls.white_box else None), "striped", seeds,
                         AttackBudget(steps=2), tmp_path / "direct" / "prompts", progress=False)
        direct = evaluate_attack(res, testbed, stack, tmp_path / "direct" / name, detectors=script.detectors(),
                                 progress=False)
        rules = script.paper_rules(res, testbed, stack, tmp_path / "direct" / f"{name}-rules")
        ev = json.loads((out / "attacks" / name / "evaluation.json").read_text())
        assert ev["result_key"] == res.key  # same attack, config, budget, target and seed prompts
        assert ev["asr"] == json.loads(json.dumps(direct["asr"])) and ev["asr"]["n"] == 1
        assert ev["rules"] == json.loads(json.dumps(rules, default=str))
    table = (out / "table.md").read_text()
    assert "| uce.unlearndiffatk | uce | unlearndiffatk | 2 |" in table
    assert set(json.loads((out / "results.json").read_text())["attacks"]) == set(keep)


def test_stacks_with_neither_benchmarks_nor_attacks_are_refused(tmp_path):
    from safediff.experiments import ExperimentError

    (tmp_path / "e.yaml").write_text("name: x\nstacks:\n  none: null\n")
    with pytest.raises(ExperimentError, match=r"e\.yaml:1: give both `stacks` and `benchmarks`.*or `stacks` and `attacks`"):
        load_experiment(tmp_path / "e.yaml")
