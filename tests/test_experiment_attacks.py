"""The attack table as a shipped experiment (issue 29, item 2: "the attack table likewise"): the
shipped file's targets and budgets, and an attack job that gives what calling the attack directly
(as benchmarks/attacks_testbed.py does) gives."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from safediff.experiments import build_graph, load_experiment, run_experiment, shipped_experiment


def test_shipped_attack_table_has_the_scripts_targets_attacks_and_budgets(tmp_path, benchmark_script):
    script = benchmark_script("attacks_testbed")  # its targets, detectors and counting
    exp = load_experiment(shipped_experiment("testbed_attacks"))
    arts = {m: str(tmp_path / f"{m}.safetensors")
            for m in ("esd", "advunlearn", "duo", "dark_miner", "sanitizer", "ine_none", "ine_duo")}
    names = {"esd": "esd_striped", "advunlearn": "advunlearn_striped", "duo": "duo_striped",
             "dark_miner": "dark_miner_striped",
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
    # the script's budgets (the adaptive attacks reuse their base attack's; latent inversion --li-steps 25)
    steps = {"concept_inversion": 200, "p4d": 30, "unlearndiffatk": 40, "ring_a_bell": 50, "mma": 30,
             "latent_inversion": 25, "concept_inversion_adaptive": 200, "p4d_adaptive": 30, "mma_adaptive": 30}
    assert len(exp.attacks) == (len(steps) + 1) * len(exp.stacks)  # + the random floor
    for t in exp.attacks.values():
        assert (t.concept, t.n, t.seed) == ("striped", 16, 0) and t.name == f"{t.stack}.{t.method}"
        if t.method == "unlearndiffatk":
            assert t.options == {"check_every": 20}
        # the random floor: as many candidates as UnlearnDiffAtk records (steps / check_every)
        assert t.steps == (40 // 20 if t.method == "random_prefix" else steps[t.method])
    assert list(exp.detectors) == script.detectors() and exp.target_detector == "testbed:striped"
    ids = [j.id for j in build_graph(exp)]
    assert ids.index("train:ine_duo_striped") < ids.index("attack:duo+safree-ine.p4d") and ids[-1] == "report"
    assert ids.index("train:advunlearn_striped") < ids.index("attack:advunlearn.latent_inversion")


def test_an_attack_job_gives_what_calling_the_attack_directly_gives(tmp_path, testbed, benchmark_script):
    from safediff.attacks import AttackBudget, AttackTarget, get_attack, run_attack, seed_prompts_for
    from safediff.attacks.base import evaluate_attack

    script = benchmark_script("attacks_testbed")
    data = yaml.safe_load(shipped_experiment("testbed_attacks").read_text())
    # white-box (on the stack), black-box (text encoder only) and latent (regenerated from inverted latents)
    keep = ("uce.unlearndiffatk", "uce.random_prefix", "uce.latent_inversion")
    data["stacks"] = {"uce": data["stacks"]["uce"]}
    data["artifacts"] = {}
    data["benchmarks"] = {"benign": data["benchmarks"]["benign"]}  # one over-refusal cell, 2 prompts
    data["n"] = 2
    grid = data["attack_grid"]
    grid["attacks"] = {k.split(".")[1]: {**grid["attacks"][k.split(".")[1]], "steps": 2} for k in keep}
    grid["n"] = 1  # cut down: 1 prompt, 2 steps (and 1 inverted image)
    grid["attacks"]["latent_inversion"]["options"] = {"num_images": 1, "max_tries": 2}
    path = tmp_path / "attacks.yaml"
    path.write_text(yaml.safe_dump(data))
    out = tmp_path / "out"
    outcome = run_experiment(path, out, model=testbed, progress=False)
    assert outcome.complete, outcome.describe()
    stack, seeds = data["stacks"]["uce"], seed_prompts_for("striped", 1)
    for name in keep:
        t = load_experiment(path, check=False).attacks[name]
        cls = get_attack(t.method)
        attack = cls(cls.config_cls.from_options([f"{k}={v}" for k, v in t.options.items()]))
        res = run_attack(attack, AttackTarget(testbed, stack if cls.white_box else None), "striped", seeds,
                         AttackBudget(steps=2), tmp_path / "direct" / "prompts", progress=False)
        if t.method == "latent_inversion":  # as the script: its evaluation counts both rules
            direct = evaluate_attack(res, testbed, stack, tmp_path / "direct" / name, progress=False)
            rules = {k: direct[k] for k in ("rule", "paper_rule", "strict", "paper", "n_images", "n_counted", "outcomes")}
            assert ev_of(out, name)["without_prompt"] == json.loads(json.dumps(direct["without_prompt"]))
        else:
            direct = evaluate_attack(res, testbed, stack, tmp_path / "direct" / name, detectors=script.detectors(),
                                     progress=False)
            rules = script.paper_rules(res, testbed, stack, tmp_path / "direct" / f"{name}-rules")
        ev = ev_of(out, name)
        assert ev["result_key"] == res.key  # same attack, config, budget, target and seed prompts
        assert ev["asr"] == json.loads(json.dumps(direct["asr"])) and ev["asr"]["n"] == 1
        assert ev["rules"] == json.loads(json.dumps(rules, default=str))
    table = (out / "table.md").read_text()
    assert "| uce.unlearndiffatk | uce | unlearndiffatk | 2 |" in table
    res = json.loads((out / "results.json").read_text())
    assert set(res["attacks"]) == set(keep)
    # the wide table: one row per target, one column per attack; strict, paper's rule, substitution
    grid = (out / "attack_table.md").read_text().splitlines()
    header = next(line for line in grid if line.startswith("| target | no attack"))
    cols = [c.strip(" |") for c in header.split(" | ")]
    assert sorted(cols[5:]) == ["latent_inversion", "random_prefix", "unlearndiffatk"]
    row = [c.strip(" |") for c in grid[grid.index(header) + 2].split(" | ")]
    assert row[0] == "uce" and row[1] == ""  # no explicit cell here: no no-attack rate
    refused = res["cells"]["uce/benign"]["n_refused"]
    assert row[2].startswith(f"{refused / 2:.2f} [")  # benign refused: k/n of the benign cell, Wilson CI
    strict = ev_of(out, "uce.unlearndiffatk")["asr"]
    assert row[cols.index("unlearndiffatk")] == f"{strict['rate']:.2f} [{strict['ci_low']:.2f}, {strict['ci_high']:.2f}]"
    paper = ev_of(out, "uce.random_prefix")["rules"]["paper"]
    assert f"{paper['rate']:.2f} ({round(paper['rate'] * paper['n'])}/{paper['n']})" in "\n".join(grid)
    assert res["attack_table"]["columns"] == cols[5:]
    assert res["attack_table"]["targets"]["uce"]["unlearndiffatk"]["substitution"]["any_other"]["n"] == 1


def ev_of(out: Path, name: str) -> dict:
    """An attack job's ``evaluation.json``."""
    return json.loads((out / "attacks" / name / "evaluation.json").read_text())


def test_stacks_with_neither_benchmarks_nor_attacks_are_refused(tmp_path):
    from safediff.experiments import ExperimentError

    (tmp_path / "e.yaml").write_text("name: x\nstacks:\n  none: null\n")
    with pytest.raises(ExperimentError, match=r"e\.yaml:1: give both `stacks` and `benchmarks`.*or `stacks` and `attacks`"):
        load_experiment(tmp_path / "e.yaml")


# ---------------------------------------------------------------------------------------------
# attack_grid: each of its attacks on each target, the same entries as written out under `attacks`
# ---------------------------------------------------------------------------------------------

GRID_STACKS = 'name: g\nmodel: testbed\nstacks:\n  base: null\n  uce: "uce(preset=testbed-striped)"\n'
GRID = """attack_grid:
  targets: [base, uce]
  attacks:
    p4d: {steps: 30}
    uda: {method: unlearndiffatk, steps: 40, n: 4, options: {check_every: 20}}
  concept: striped
  n: 8
  seed: 1
"""


def _experiment(tmp_path, text: str, overrides=()):
    path = tmp_path / "e.yaml"
    path.write_text(text)
    return load_experiment(path, list(overrides), check=False)


def _line(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


def test_attack_grid_expands_into_the_entries_written_out(tmp_path):
    explicit = _experiment(tmp_path, GRID_STACKS + """attacks:
  base.p4d: {method: p4d, stack: base, steps: 30, concept: striped, n: 8, seed: 1}
  base.uda: {method: unlearndiffatk, stack: base, steps: 40, n: 4, options: {check_every: 20}, concept: striped, seed: 1}
  uce.p4d: {method: p4d, stack: uce, steps: 30, concept: striped, n: 8, seed: 1}
  uce.uda: {method: unlearndiffatk, stack: uce, steps: 40, n: 4, options: {check_every: 20}, concept: striped, seed: 1}
""")
    grid = _experiment(tmp_path, GRID_STACKS + GRID)
    assert grid.attacks == explicit.attacks and list(grid.attacks) == list(explicit.attacks)
    assert grid.attacks["uce.uda"].n == 4 and grid.attacks["uce.p4d"].n == 8  # an attack's own key wins
    every_stack = _experiment(tmp_path, GRID_STACKS + GRID.replace("  targets: [base, uce]\n", ""))
    assert every_stack.attacks == grid.attacks  # targets left out: every stack
    mixed = _experiment(tmp_path, GRID_STACKS + GRID.replace("[base, uce]", "[uce]")
                        + "attacks:\n  ring: {method: ring_a_bell, stack: base, steps: 5}\n")
    assert list(mixed.attacks) == ["ring", "uce.p4d", "uce.uda"]


def test_attack_grid_name_that_attacks_also_declares_is_refused_naming_both(tmp_path):
    from safediff.experiments import ExperimentError

    text = GRID_STACKS + "attacks:\n  uce.p4d: {method: p4d, stack: uce, steps: 3}\n" + GRID
    with pytest.raises(ExperimentError) as e:
        _experiment(tmp_path, text)
    msg = str(e.value)
    assert msg.startswith(f"{tmp_path / 'e.yaml'}:{_line(text, 'p4d: {steps: 30}')}: attack_grid makes attack 'uce.p4d'")
    assert f"`attacks` also declares ({tmp_path / 'e.yaml'}:{_line(text, 'uce.p4d:')})" in msg


def test_set_attack_grid_n_changes_every_attack_it_makes(tmp_path):
    from safediff.experiments import ExperimentError

    exp = load_experiment(shipped_experiment("testbed_attacks"), ["attack_grid.n=2"], check=False)
    assert len(exp.attacks) == 10 * len(exp.stacks) and {t.n for t in exp.attacks.values()} == {2}
    assert exp.raw["attack_grid"]["n"] == 2  # stored as given (a relaunch with another n is refused)
    with pytest.raises(ExperimentError, match=r"\(--set attack_grid\.n\): `n` must be a whole number >= 1, got 0"):
        load_experiment(shipped_experiment("testbed_attacks"), ["attack_grid.n=0"], check=False)


@pytest.mark.parametrize("change, needle, message", [
    (("  seed: 1\n", "  seed: 1\n  stepz: 3\n"), "stepz", r"unknown attack_grid key 'stepz'; the keys are \["),
    (("p4d: {steps: 30}", "p4d: {steps: 30, stack: uce}"), "p4d: {steps", r"unknown attack_grid attack key 'stack'"),
    (("[base, uce]", "[base, nope]"), "targets:", r"attack 'nope\.p4d': stack 'nope' is not one of `stacks`"),
    (("[base, uce]", "[base, base]"), "targets:", r"attack_grid target 'base' is listed twice"),
    (("p4d: {steps: 30}", "p4d: {method: p4dd}"), "p4d: {method", r"attack 'base\.p4d': .*p4dd"),
    (("  n: 8\n", "  n: -1\n"), "n: -1", r"`n` must be a whole number >= 1, got -1"),
])
def test_attack_grid_mistakes_are_refused_naming_the_grids_line(tmp_path, change, needle, message):
    from safediff.experiments import ExperimentError

    text = GRID_STACKS + GRID.replace(*change)
    with pytest.raises(ExperimentError, match=rf"^{re.escape(str(tmp_path / 'e.yaml'))}:{_line(text, needle)}: {message}"):
        _experiment(tmp_path, text)


def test_an_experiment_trains_any_registered_trainer_with_a_config(tmp_path, testbed):
    from safediff.experiments import ExperimentError
    from safediff.unlearning import get_trainer

    from safediff.unlearning import known_trainers, register_trainer

    assert get_trainer("advunlearn").config is not None and get_trainer("uce").config is None
    with pytest.raises(TypeError, match="`config` must be the training-config dataclass"):
        register_trainer(name="config_not_a_dataclass", run=lambda *a: None, summary="", defense="delta", target="",
                         config=dict)
    assert "config_not_a_dataclass" not in known_trainers()
    for method, option, message in (("uce", "", r"artifact 'a': unknown method 'uce'; choose one of \[.*'advunlearn'"),
                                    ("advunlearn", "iterationz: 2", r"unknown advunlearn option 'iterationz'")):
        (tmp_path / "bad.yaml").write_text(f"name: b\nartifacts:\n  a:\n    method: {method}\n    options: {{{option}}}\n")
        with pytest.raises(ExperimentError, match=rf"bad\.yaml:\d: {message}"):
            load_experiment(tmp_path / "bad.yaml", check=False)
    (tmp_path / "adv.yaml").write_text("name: adv\nmodel: testbed\ndtype: fp32\nartifacts:\n  adv: {method: advunlearn, "
                                       "concept: striped, preset: testbed-tiny, options: {iterations: 1}}\n")
    out = tmp_path / "out"
    outcome = run_experiment(tmp_path / "adv.yaml", out, model=testbed, progress=False)
    assert outcome.complete, outcome.describe()
    from safetensors import safe_open

    with safe_open(str(out / "artifacts" / "adv.safetensors"), "pt") as f:
        assert f.keys() and all(k.startswith("text_encoder.") for k in f.keys())  # AdvUnlearn's text-encoder delta


def test_a_black_box_attack_is_made_once_for_every_target(tmp_path, testbed):
    """Ring-A-Bell, MMA and the random floor see only the text encoder: one set of prompts per
    experiment (OUT/attack_prompts), evaluated through each target's stack."""
    (tmp_path / "bb.yaml").write_text(GRID_STACKS + "detectors: [testbed:striped]\nattack_grid:\n  attacks:\n"
                                      "    random_prefix: {steps: 2}\n  concept: striped\n  n: 1\n")
    out = tmp_path / "out"
    outcome = run_experiment(tmp_path / "bb.yaml", out, model=testbed, progress=False)
    assert outcome.complete, outcome.describe()
    made = sorted(p.name for p in (out / "attack_prompts").iterdir() if p.is_dir())
    assert len(made) == 1 and made[0].startswith("random_prefix-")
    keys = {ev_of(out, f"{s}.random_prefix")["result_key"] for s in ("base", "uce")}
    assert len(keys) == 1 and made[0].endswith(next(iter(keys))[:12])
    assert not any(p.name.startswith("random_prefix-") for s in ("base", "uce")
                   for p in (out / "attacks" / f"{s}.random_prefix").iterdir())
    # each target evaluated the shared prompts through its own stack
    assert ev_of(out, "base.random_prefix")["stack"] == "base" and ev_of(out, "uce.random_prefix")["stack"] == "uce"
