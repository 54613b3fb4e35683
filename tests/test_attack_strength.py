"""What an optimised prompt attack needs before it can beat random tokens (issue 32): the prompt it
writes is the prompt it optimised (a vocabulary of tokens that tokenize back to themselves), and its
target images show the concept. Whether it then beats the random-prefix floor is measured, not
asserted: benchmarks/attack_vs_random.py (results in benchmarks/results/attack_vs_random.md)."""

import numpy as np
import pytest

from safediff import core
from safediff.attacks import AttackBudget, AttackError, AttackTarget, run_attack, seed_prompts_for
from safediff.attacks.common import Draws, allowed_token_ids, decode_tokens, round_trip_token_ids
from safediff.attacks.random_prefix import RandomPrefix
from safediff.attacks.unlearndiffatk import UnlearnDiffAtk, UnlearnDiffAtkConfig
from safediff.eval.detectors import make_detector


def test_round_trip_vocabulary_leaves_out_byte_pieces_and_rewrites_to_the_same_ids(testbed):
    tok = testbed.tokenizer
    vocab = round_trip_token_ids(tok).tolist()
    left_out = sorted(set(allowed_token_ids(tok).tolist()) - set(vocab))
    assert any("\ufffd" in decode_tokens(tok, [i]) for i in left_out)  # the testbed has byte pieces to leave out
    for i in vocab:
        text = decode_tokens(tok, [i])
        assert "\ufffd" not in text and tok(text, add_special_tokens=False).input_ids == [i]
    prefix = vocab[:: max(1, len(vocab) // 5)][:5]
    seed = seed_prompts_for("striped", 1)[0]
    written = " ".join(decode_tokens(tok, [i]) for i in prefix) + " " + seed
    seed_ids = tok(seed, add_special_tokens=False).input_ids
    assert tok(written, add_special_tokens=False).input_ids == prefix + seed_ids


def _prefix_ids(tok, prompt: str, seed: str, k: int) -> list[int]:
    ids = tok(prompt, add_special_tokens=False).input_ids
    assert ids[k:] == tok(seed, add_special_tokens=False).input_ids, prompt  # the seed prompt, untouched, after k
    return ids[:k]


def test_attack_prompts_are_the_tokens_they_searched(testbed, tmp_path):
    tok = testbed.tokenizer
    vocab = set(round_trip_token_ids(tok).tolist())
    seeds = seed_prompts_for("striped", 1)
    target = AttackTarget(testbed, "uce(preset=testbed-striped)")
    rnd = run_attack(RandomPrefix(), target, "striped", seeds, AttackBudget(steps=30), tmp_path / "r", progress=False)
    cfg = UnlearnDiffAtkConfig(num_draws=4, batch_size=2, num_images=1)
    uda = run_attack(UnlearnDiffAtk(cfg), target, "striped", seeds, AttackBudget(steps=3), tmp_path / "u",
                     progress=False)
    for res in (rnd, uda):
        for c in res.prompts[0]["candidates"]:
            assert set(_prefix_ids(tok, c["prompt"], seeds[0], 5)) <= vocab


def test_targets_are_images_that_show_the_concept(testbed, tiny_sd1):
    det = make_detector("testbed:striped")
    prompt = seed_prompts_for("striped", 1)[0]
    d = Draws(testbed, prompt, 2, 4, seed=0, concept="striped")
    assert len(d.image_indices) == 2 and d.x0.shape[0] == 4
    shown = det.detect(core.to_uint8(core.decode(testbed, d.x0)))
    assert all(r.unsafe is True for r in shown)  # every draw is noised from an image with the concept
    plain = Draws(testbed, prompt, 2, 4, seed=0)  # no concept given: the first images, unchecked
    assert plain.image_indices == [0, 1]
    with pytest.raises(AttackError, match="no image showing"):
        Draws(testbed, "a red circle on white background", 1, 4, seed=0, concept="striped", max_tries=2)
    assert Draws(tiny_sd1, "a zebra", 1, 2, seed=0, concept="zebra").image_indices == [0]  # no detector there


def test_unlearndiffatk_runs_the_papers_timestep_blocks(tiny_sd1, tmp_path, monkeypatch):
    from safediff.attacks import unlearndiffatk as uda_module

    seen = []
    real = uda_module.defended_epsilon

    def spy(pipe, ids, slots, vectors, text, batch, idx):
        seen.append((batch.t[idx].tolist(), batch.noise[idx].clone()))
        return real(pipe, ids, slots, vectors, text, batch, idx)

    monkeypatch.setattr(uda_module, "defended_epsilon", spy)
    cfg = UnlearnDiffAtkConfig(num_tokens=2, num_draws=4, batch_size=2, num_images=1, check_every=2)
    res = run_attack(UnlearnDiffAtk(cfg), AttackTarget(tiny_sd1, None), "zebra", ["a zebra"], AttackBudget(steps=4),
                     tmp_path, progress=False)
    T = len(tiny_sd1.scheduler.alphas_cumprod)
    assert [t for t, _ in seen] == [[T // 4] * 2, [T // 4] * 2, [3 * T // 4] * 2, [3 * T // 4] * 2]  # one t per block
    assert not any(seen[k][1].equal(seen[k + 1][1]) for k in range(3))  # fresh noise every step
    assert [c["step"] for c in res.prompts[0]["candidates"]] == [2, 4]  # the argmax prompt after each block
    with pytest.raises(AttackError, match="schedule"):
        UnlearnDiffAtkConfig(schedule="random")
