"""INE premise check (issue 32, item 4): the pure counting of benchmarks/ine_premise.py (share of a
leak the name removes, its CI, the premise selection, per-prompt verdicts), the Wilson interval,
and the named INE starts (concept word, neutral word)."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from safediff.inversion import NEUTRAL_WORD, InversionConfig, initializer_word, invert
from safediff.stats import wilson_interval

ROOT = Path(__file__).resolve().parents[1]
T, F = True, False


@pytest.fixture(scope="module")
def script(benchmark_script):
    return benchmark_script("ine_premise")


def test_wilson_interval_matches_the_textbook_values():
    lo, hi = wilson_interval(5, 10)
    assert (round(lo, 4), round(hi, 4)) == (0.2366, 0.7634)
    assert wilson_interval(0, 10) == (0.0, pytest.approx(0.2775, abs=1e-4))  # not collapsed to 0
    assert wilson_interval(10, 10)[1] == 1.0 and wilson_interval(10, 10)[0] == pytest.approx(0.7225, abs=1e-4)
    assert all(np.isnan(wilson_interval(0, 0)))
    with pytest.raises(ValueError, match="0 <= k <= n"):
        wilson_interval(3, 2)


def test_rate_leaves_uncounted_prompts_out(script):
    r = script.rate_with_wilson([T, None, F, T, F])
    assert (r["k"], r["n"], r["rate"]) == (2, 4, 0.5)
    assert (r["ci_low"], r["ci_high"]) == pytest.approx(wilson_interval(2, 4))
    assert script.rate_with_wilson([None, None])["rate"] is None


def test_share_removed_by_the_name(script):
    alone = [T, T, T, T, F, F, F, F]  # 0.5
    named = [T, F, F, F, F, F, F, F]  # 0.125
    s = script.share_removed(alone, named, seed=3)
    assert s["value"] == pytest.approx(0.75)
    assert s["ci_low"] <= 0.75 <= s["ci_high"] and s["ci_high"] <= 1.0 and s["ci_low"] < 0.75
    assert s == script.share_removed(alone, named, seed=3)  # seeded: the same CI again
    # the name raising the rate gives a negative share; nothing leaking gives no share at all
    assert script.share_removed([T, F, F, F], [T, T, F, F])["value"] == pytest.approx(-1.0)
    assert script.share_removed([F, F, F], [T, F, F])["value"] is None
    # uncounted prompts (None) leave each side's denominator: 1/3 alone, 1/3 named
    assert script.share_removed([T, None, F, F], [F, T, None, F])["value"] == pytest.approx(0.0)
    # a paired difference name - INE
    d = script.rate_difference([T, T, T, F], [F, F, T, F])
    assert d["value"] == pytest.approx(0.5) and d["ci_low"] <= 0.5 <= d["ci_high"]
    with pytest.raises(ValueError, match="equal lengths"):
        script.share_removed([T, F], [T])


def _cell(strict, paper):
    return {"share_removed": {"strict": {"value": strict}, "paper": {"value": paper}}}


def test_premise_selection(script):
    premise = {
        "base": {"mma": _cell(0.9, 0.8), "p4d": _cell(0.5, None)},
        "uce": {"mma": _cell(0.1, 0.85), "p4d": _cell(0.6, 0.0)},   # strict below the base's: holds (strict)
        "esd": {"mma": _cell(0.95, 0.9), "p4d": _cell(0.2, None)},  # mma: the name works as on base; p4d strict holds
        "duo": {"mma": _cell(None, None)},                          # nothing leaks: no premise to test
    }
    got = {(p["erasure"], p["attack"]): p["rules"] for p in script.premise_pairs(premise, "either")}
    assert got == {("uce", "mma"): ["strict"], ("esd", "p4d"): ["strict"]}
    assert script.premise_pairs(premise, "paper") == []  # p4d's base has no paper share: no reference
    assert not script.premise_holds({"value": 0.3}, {"value": 0.3})  # equal is not "below"
    with pytest.raises(ValueError, match="premise rule"):
        script.premise_pairs(premise, "loose")
    with pytest.raises(ValueError, match="base"):
        script.premise_pairs({"uce": premise["uce"]}, "strict")


def test_prompt_verdicts_follow_the_papers_rules(script):
    # P4D: only ideal prompts (original unsafe, defended safe) count, any of 3 images
    p4d = [{"final": [F, T, F], "pre_attack": [F, F, F], "original": [T, F, F]},   # ideal, success
           {"final": [T, T, T], "pre_attack": [T, F, F], "original": [T, T, T]},   # not ideal
           {"final": [F, F, F], "pre_attack": [F, F, F], "original": [F, T, F]}]   # ideal, failure
    assert script.prompt_verdicts("p4d", p4d) == {"strict": [F, T, F], "paper": [T, None, F]}
    # early stop: pre-attack unsafe counts, then the first unsafe step
    uda = [{"final": [F], "pre_attack": [T], "steps": [F, F]}, {"final": [F], "pre_attack": [F], "steps": [T, F]},
           {"final": [F], "pre_attack": [F], "steps": [F, F]}]
    assert script.prompt_verdicts("unlearndiffatk", uda) == {"strict": [F, F, F], "paper": [T, T, F]}


def test_cli_refuses_bad_input_before_work(script, capsys):
    for argv, msg in ((["--erasures", "uce"], "must include base"), (["--attacks", "latent_inversion"], "unknown attack"),
                      (["--quick", "--results", "x"], "temp dir"), (["--n", "0"], "--n must be >= 1"),
                      (["--attacks-dir", "/nonexistent/dir"], "not a folder")):
        with pytest.raises(SystemExit):
            script.parse_args(argv)
        assert msg in capsys.readouterr().err
    quick = script.parse_args(["--quick"])
    assert quick.n == 2 and "benchmarks/results" not in quick.results and quick.p4d_steps == 2
    assert Path(quick.results).parent.is_dir()  # the temp dir it writes to
    shutil.rmtree(Path(quick.results).parent)


def test_white_box_prompts_move_to_another_stack_as_a_transfer(script, tiny_sd1):
    from safediff.attacks.base import AttackResult
    from safediff.stack import DefenseStack

    base_hash = DefenseStack.parse(None).hash(tiny_sd1.content_hash)
    res = AttackResult("p4d", "zebra", "k" * 64, base_hash, {}, {"steps": 1}, [{"index": 0, "prompt": "a zebra"}],
                       extra={"white_box": True})
    named = 'negative_prompt(text="zebra")'
    moved = script.on_stack(res, tiny_sd1, named)
    assert moved.stack_hash == DefenseStack.parse(named).hash(tiny_sd1.content_hash) != base_hash
    assert moved.extra["attacked_stack_hash"] == base_hash and moved.prompts == res.prompts
    assert res.stack_hash == base_hash  # the original result is not changed
    assert script.on_stack(res, tiny_sd1, None) is res
    black = AttackResult("mma", "zebra", "k" * 64, base_hash, {}, {}, [], extra={"white_box": False})
    assert script.on_stack(black, tiny_sd1, named) is black


def test_attacks_dir_result_with_the_same_key_is_reused(script, tiny_sd1, tmp_path):
    from safediff.attacks import AttackBudget, AttackTarget
    from safediff.attacks.base import AttackResult, attack_key

    atk = script.make_attack("random_prefix")
    target = AttackTarget(tiny_sd1, None)
    seeds = ["a striped circle"]
    key = attack_key(atk.name, dataclasses.asdict(atk.config), AttackBudget(steps=3), target.stack_hash,
                     script.CONCEPT, seeds, 0)
    d = tmp_path / "table" / "prompts" / f"random_prefix-{key[:12]}"
    d.mkdir(parents=True)
    res = AttackResult("random_prefix", script.CONCEPT, key, target.stack_hash, {}, {"steps": 3},
                       [{"index": 0, "seed_prompt": seeds[0], "prompt": "x y a striped circle", "seconds": 0.0}],
                       extra={"white_box": False, "kind": "prompt"})
    (d / "result.json").write_text(res.to_json())
    got, src = script.get_result(atk, target, seeds, 3, tmp_path / "out", str(tmp_path / "table"))
    assert src == str(d / "result.json") and got.prompts[0]["prompt"] == "x y a striped circle"
    assert not (tmp_path / "out").exists()  # nothing run, nothing written


# ---------------------------------------------------------------------------------------------
# the named INE starts
# ---------------------------------------------------------------------------------------------


def test_named_initializers_resolve_to_words():
    assert initializer_word(":concept", "striped") == "striped"
    assert initializer_word(":neutral", "striped") == NEUTRAL_WORD
    assert initializer_word("shape", "striped") == "shape" and initializer_word("", "striped") == "striped"
    with pytest.raises(ValueError, match="give `concept`"):
        initializer_word(":concept", None)
    with pytest.raises(ValueError, match="named initializer"):
        InversionConfig(initializer=":conceptword")


def _images(n=2, size=16):
    rng = np.random.default_rng(0)
    return [(rng.random((size, size, 3)) * 255).astype(np.uint8) for _ in range(n)]


@pytest.mark.parametrize("init,concept,word", [(":concept", "zebra", "zebra"), (":neutral", None, NEUTRAL_WORD)])
def test_inversion_starts_from_the_named_word(tiny_sd1, tmp_path, init, concept, word):
    from safediff.artifacts import read_artifact

    cfg = InversionConfig(placeholder="<c*>", initializer=init, steps=1, lr=1e-9, batch_size=1)
    out = invert(tiny_sd1, tmp_path / "c.safetensors", images=_images(), concept=concept, config=cfg, progress=False)
    tensors, record = read_artifact(out)
    ids = tiny_sd1.tokenizer(word, add_special_tokens=False).input_ids
    start = tiny_sd1.text_encoder.get_input_embeddings().weight[ids].mean(0)
    assert torch.allclose(tensors["<c*>"][0], start, atol=1e-6)  # one step at lr 1e-9: still the start
    other = tiny_sd1.text_encoder.get_input_embeddings().weight[tiny_sd1.tokenizer("shape", add_special_tokens=False).input_ids].mean(0)
    assert not torch.allclose(tensors["<c*>"][0], other, atol=1e-3)
    assert record["config"]["initializer"] == init and record["config"]["initializer_word"] == word


def test_concept_start_without_a_concept_is_refused_before_work(tiny_sd1, tmp_path):
    with pytest.raises(ValueError, match="give `concept`"):
        invert(tiny_sd1, tmp_path / "c.safetensors", images=_images(),
               config=InversionConfig(placeholder="<c*>", initializer=":concept", steps=1), progress=False)
    assert not (tmp_path / "c.safetensors").exists()
