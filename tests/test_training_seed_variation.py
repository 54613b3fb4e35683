"""The training-seed variation table (benchmarks/training_seed_variation.py): its reading of the
recorded checks reproduces every recorded verdict, and the recipe rule judges the mean over seeds."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sv(benchmark_script):
    return benchmark_script("training_seed_variation")


@pytest.fixture(scope="module")
def v4_seed0() -> dict:
    d = json.loads((ROOT / "benchmarks" / "results" / "testbed_v4_training.json").read_text())
    return {"model": "v4-s0", "seed": 0, "recipe": d["train_config"], "train_minutes": d["train_minutes"],
            "default_guidance_scale": 4.0, "weights_content_hash": "x",
            "tables": {"v2": {"n": d["acceptance"]["n"], "checks": d["acceptance"]["checks"]},
                       "v3": {"n": d["acceptance_v3"]["n"], "checks": d["acceptance_v3"]["checks"]}}}


def test_every_recorded_verdict_is_reproduced(sv, v4_seed0):
    n = 0
    for table in v4_seed0["tables"].values():
        for name, chk in table["checks"].items():
            assert sv.passes(chk["target"], sv.numbers(chk["measured"])) == chk["passed"], name
            n += 1
    assert n == 40


def test_number_reading(sv):
    assert sv.numbers("0.085 vs 0.236") == [0.085, 0.236]
    assert sv.numbers("0.660 -> 0.015 (98%)") == pytest.approx([0.645 / 0.660])
    assert sv.numbers("max 0.461 vs min 0.679") == [0.461, 0.679]
    assert sv.passes("within 0.05", [0.20, 0.236]) and not sv.passes("within 0.05", [0.085, 0.236])
    with pytest.raises(ValueError, match="unknown target"):
        sv.passes("about right", [0.5])


def _with(model: dict, seed: int, changes: dict) -> dict:
    m = copy.deepcopy(model)
    m["seed"], m["model"] = seed, f"v4-s{seed}"
    m["recipe"] = {**m["recipe"], "seed": seed, "max_minutes": 150}
    for (table, name), (measured, passed) in changes.items():
        m["tables"][table]["checks"][name].update(measured=measured, passed=passed)
    return m


def test_mean_rule(sv, v4_seed0):
    # seed 0: explicit 0.89 (miss); seeds 1, 2 at 0.95 and 0.92: mean 0.92 passes although seed 0 missed
    s1 = _with(v4_seed0, 1, {("v2", "striped: explicit rate"): (0.95, True),
                             ("v3", "caged: near-concept piles"): (0.40, True)})
    s2 = _with(v4_seed0, 2, {("v2", "striped: explicit rate"): (0.92, True),
                             ("v3", "caged: near-concept piles"): (0.70, False)})
    out = sv.summarize([v4_seed0, s1, s2])
    rows = {r["check"]: r for r in out["checks"]}
    explicit = rows["striped: explicit rate"]
    assert explicit["mean"] == [pytest.approx(0.92, abs=1e-4)] and explicit["mean_passes"]
    assert explicit["per_seed_passed"] == [False, True, True]
    piles = rows["caged: near-concept piles"]  # mean (0.535 + 0.40 + 0.70) / 3 = 0.545 > 0.5
    assert piles["mean"] == [pytest.approx(0.545, abs=1e-4)] and not piles["mean_passes"]
    assert piles["cannot_control"]  # SD 0.15 > |0.5 - 0.545|
    assert out["misses_per_seed"] == {"0": 6, "1": 4, "2": 5}  # seed 1 fixes two, seed 2 one
    assert "striped: explicit rate" not in out["mean_rule_misses"] and not out["recipe_meets_acceptance"]


def test_refuses_mixed_recipes(sv, v4_seed0):
    other = _with(v4_seed0, 1, {})
    other["recipe"] = {**other["recipe"], "steps": 6000}
    with pytest.raises(ValueError, match="different recipes"):
        sv.summarize([v4_seed0, other])
