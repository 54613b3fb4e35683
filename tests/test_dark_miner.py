"""Dark Miner: the mine -> verify -> circumvent loop, its stop rules, the delta artifact and its
defense, the circumvent objective, the verifier interface (testbed detector, CLIP directional
score on tiny random CLIP components), the CLI, and one measurement on the testbed."""

import dataclasses

import numpy as np
import pytest
import torch

from safediff.artifacts import ArtifactMismatchError, read_artifact
from safediff.defenses.base import get_defense
from safediff.defenses.weight_delta import DarkMinerConfig, WeightDelta, WeightDeltaConfig
from safediff.inversion import load_inverted
from safediff.pipeline import SafePipeline
from safediff.stack import DefenseStack
from safediff.unlearning.dark_miner import (
    CLIPDirectionalVerifier,
    ConceptPool,
    DarkMinerTrainConfig,
    Verifier,
    alignment_loss,
    anchor_caption,
    circumvent,
    mine,
    train_dark_miner,
    verify,
)
from safediff.unlearning.param_sets import esd_parameter_names


class Scripted(Verifier):
    """Returns the given scores in order and records what it was shown."""

    def __init__(self, scores, needs_reference=False):
        self.scores = list(scores)
        self.needs_reference = needs_reference
        self.calls = []

    def score(self, images, *, references=None, pool=()):
        self.calls.append((len(images), None if references is None else len(references), len(pool), images[0].shape))
        return self.scores.pop(0)


def _cfg(**kw):
    base = dict(prompts=("a zebra",), num_images=4, mine_steps=2, mine_batch=2, verify_images=2, verify_steps=2,
                max_rounds=3, iterations=3, lr=1e-2, batch_size=2, stop_below=0.5)
    return DarkMinerTrainConfig(**{**base, **kw})


def _state(model):
    return {k: v.clone() for k, v in model.unet.state_dict().items()}


def _same(model, state):
    return all(torch.equal(state[k], v) for k, v in model.unet.state_dict().items())


@pytest.fixture(scope="module")
def run(tiny_sd1, tmp_path_factory):
    """One cut-down loop on tiny_sd1: rounds 1 and 2 verify, round 3 does not."""
    tmp = tmp_path_factory.mktemp("dm")
    before = _state(tiny_sd1)
    ver = Scripted([0.9, 0.8, 0.1])
    path = train_dark_miner(tiny_sd1, tmp / "dm.safetensors", _cfg(), verifier=ver, work_dir=tmp / "work", progress=False)
    return path, before, ver, tmp


# ---------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------


def test_loop_runs_end_to_end_and_restores_the_model(tiny_sd1, run):
    path, before, ver, tmp = run
    assert _same(tiny_sd1, before) and tiny_sd1.edited_hash is None  # training restored it exactly
    assert all(p.grad is None for p in tiny_sd1.unet.parameters())  # and left no gradients behind
    delta, record = read_artifact(path)
    assert set(delta) == set(esd_parameter_names(tiny_sd1.unet, "esd-x-strict"))  # default: cross-attention K/V
    assert all(".attn2.to_k." in k or ".attn2.to_v." in k for k in delta)
    assert any(d.abs().sum() > 0 for d in delta.values())
    assert record["kind"] == "dark-miner-delta" and record["base_model_hash"] == tiny_sd1.content_hash
    assert record["config"]["method"] == "esd-x-strict" and record["seed"] == 0
    # each round verified on verify_images images generated with the mined token, shown the pool
    assert [c[:3] for c in ver.calls] == [(2, None, 4)] * 3 and ver.calls[0][3] == (16, 16, 3)
    # round 1 mined on the original model, round 2 on the model edited by round 1's delta
    r1, r2 = (load_inverted(tmp / "work" / f"round{r}-mined.safetensors") for r in (1, 2))
    assert r1.record["edited_model_hash"] is None and r2.record["edited_model_hash"] is not None
    assert r1.vectors.shape == (1, 8) and not torch.equal(r1.vectors, r2.vectors)


def test_stop_rule_below_threshold(run):
    path, _, ver, _ = run
    rounds = read_artifact(path)[1]["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3] and len(ver.calls) == 3
    assert [r["circumvented"] for r in rounds] == [True, True, False]
    assert rounds[2]["verification"] == pytest.approx(0.1) and "loss_after" not in rounds[2]
    assert "stop_below 0.5 in round 3" in read_artifact(path)[1]["stop_reason"]


def test_stop_rule_max_rounds_and_nothing_verified(tiny_sd1, tmp_path):
    ver = Scripted([1.0, 1.0, 1.0])
    p = train_dark_miner(tiny_sd1, tmp_path / "a.safetensors", _cfg(max_rounds=2), verifier=ver, progress=False)
    rec = read_artifact(p)[1]
    assert len(ver.calls) == 2 and [r["circumvented"] for r in rec["rounds"]] == [True, True]
    assert rec["stop_reason"].startswith("max_rounds")
    # the very first mined embedding does not verify: no training at all, a zero delta
    p = train_dark_miner(tiny_sd1, tmp_path / "b.safetensors", _cfg(), verifier=Scripted([0.0]), progress=False)
    delta, rec = read_artifact(p)
    assert len(rec["rounds"]) == 1 and all(d.abs().sum() == 0 for d in delta.values())


def test_loop_is_seeded(tiny_sd1, run, tmp_path):
    path, *_ = run
    again = train_dark_miner(tiny_sd1, tmp_path / "again.safetensors", _cfg(), verifier=Scripted([0.9, 0.8, 0.1]),
                             progress=False)
    a, b = read_artifact(path)[0], read_artifact(again)[0]
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------
# the defense
# ---------------------------------------------------------------------------------------------


def test_registered_as_a_weight_delta_defense():
    spec = get_defense("dark_miner")
    assert spec.stage == "weight_edit" and spec.impl_cls is WeightDelta
    assert spec.config_cls is DarkMinerConfig and issubclass(DarkMinerConfig, WeightDeltaConfig)


def test_apply_revert_exact_and_zero_scale_skipped(tiny_sd1, tiny_sd2v, run):
    path, before, *_ = run
    with SafePipeline(tiny_sd1, DefenseStack.parse(f'dark_miner(path="{path}")')) as pipe:
        assert tiny_sd1.edited_hash is not None and not _same(tiny_sd1, before)
        edited = pipe("a zebra circle", num_inference_steps=2).images[0]
    assert _same(tiny_sd1, before) and tiny_sd1.edited_hash is None  # reverted exactly
    off = SafePipeline(tiny_sd1, DefenseStack.parse(f'dark_miner(path="{path}", scale=0)'))
    assert off.defenses["weight_edit"] == [] and tiny_sd1.edited_hash is None
    plain = off("a zebra circle", num_inference_steps=2).images[0]
    ref = SafePipeline(tiny_sd1, DefenseStack())("a zebra circle", num_inference_steps=2).images[0]
    assert np.array_equal(np.asarray(plain), np.asarray(ref))  # zero scale: bit-identical to no defense
    assert not np.array_equal(np.asarray(plain), np.asarray(edited))
    with pytest.raises(ArtifactMismatchError, match="made on a sd1 model .* this is a sd2 model"):
        SafePipeline(tiny_sd2v, DefenseStack.parse(f'dark_miner(path="{path}")'))


# ---------------------------------------------------------------------------------------------
# the stages
# ---------------------------------------------------------------------------------------------


def _pool(n=4, size=16, seed=0):
    rng = np.random.default_rng(seed)
    return ConceptPool([(rng.random((size, size, 3)) * 255).astype(np.uint8) for _ in range(n)], ["a {} circle"] * n)


def test_circumvent_lowers_the_concept_alignment_loss(tiny_sd1):
    m = tiny_sd1
    before_state = _state(m)
    word = m.tokenizer("zebra", add_special_tokens=False).input_ids[0]
    vec = m.text_encoder.get_input_embeddings().weight[word][None].detach().clone()
    cfg = _cfg(iterations=30, lr=1e-3, batch_size=4, reg_weight=1.0)
    delta = {n: torch.zeros_like(p) for n, p in m.unet.named_parameters() if n in esd_parameter_names(m.unet, cfg.method)}
    pool = _pool()
    l0 = alignment_loss(m, pool, vec, delta, cfg, seed=3)
    new, stats = circumvent(m, pool, [vec], delta, cfg, seed=0, progress=False)
    l1 = alignment_loss(m, pool, vec, new, cfg, seed=3)
    assert l0 > 0 and l1 < 0.7 * l0, (l0, l1)
    assert stats["loss_before"] > stats["loss_after"]
    assert _same(m, before_state)


def test_circumvent_in_epsilon_space_on_v_prediction(tiny_sd2v):
    # the objective is in epsilon space: it trains the same way on a v-prediction model
    m = tiny_sd2v
    word = m.tokenizer("zebra", add_special_tokens=False).input_ids[0]
    vec = m.text_encoder.get_input_embeddings().weight[word][None].detach().clone()
    cfg = _cfg(iterations=30, lr=1e-3, batch_size=4, method="esd-x")
    delta = {n: torch.zeros_like(p) for n, p in m.unet.named_parameters() if n in esd_parameter_names(m.unet, "esd-x")}
    new, stats = circumvent(m, _pool(), [vec], delta, cfg, progress=False)
    assert stats["loss_after"] < stats["loss_before"]


def test_mining_starts_from_the_concept_or_at_random(tiny_sd1, tmp_path):
    pool = _pool()
    word = tiny_sd1.tokenizer("zebra", add_special_tokens=False).input_ids[0]
    zebra = tiny_sd1.text_encoder.get_input_embeddings().weight[word].detach()
    c = mine(tiny_sd1, pool, _cfg(initializer="zebra", mine_steps=1, mine_lr=1e-4), tmp_path / "c.safetensors", progress=False)
    assert torch.allclose(c[0], zebra, atol=1e-3)  # one tiny step away from the concept word
    r1 = mine(tiny_sd1, pool, _cfg(mine_init="random", mine_steps=1), tmp_path / "r1.safetensors", seed=5, progress=False)
    r2 = mine(tiny_sd1, pool, _cfg(mine_init="random", mine_steps=1), tmp_path / "r2.safetensors", seed=5, progress=False)
    r3 = mine(tiny_sd1, pool, _cfg(mine_init="random", mine_steps=1), tmp_path / "r3.safetensors", seed=6, progress=False)
    # a random start lies far from the concept word (the concept start is within 1e-3 of it, above)
    assert torch.equal(r1, r2) and not torch.equal(r1, r3) and (r1 - zebra).norm() > 0.02
    assert not (tmp_path / "r1.safetensors.ckpt.safetensors").exists()


def test_verify_generates_on_the_edited_model(tiny_sd1, run):
    path, before, *_ = run
    pool = _pool()
    vec = torch.zeros(1, 8)
    seen = []

    class Keep(Verifier):
        needs_reference = True

        def score(self, images, *, references=None, pool=()):
            seen.append((images, references))
            return 0.5

    cfg = _cfg(verify_images=3)
    assert verify(tiny_sd1, pool, vec, Keep(), cfg) == 0.5
    assert verify(tiny_sd1, pool, vec, Keep(), cfg, delta_path=path) == 0.5
    (plain, ref_plain), (edited, _) = seen
    assert len(plain) == len(ref_plain) == 3
    assert any(not np.array_equal(a, b) for a, b in zip(plain, edited))  # the delta was applied
    assert _same(tiny_sd1, before) and tiny_sd1.edited_hash is None


def test_anchor_caption():
    assert anchor_caption("{}", "") == ""
    assert anchor_caption("a {} red circle on white background", "") == "a red circle on white background"
    assert anchor_caption("a red circle on white background, {}", "") == "a red circle on white background"
    assert anchor_caption("a {} red circle", "plain") == "a plain red circle"


def test_config_validation_and_presets():
    with pytest.raises(ValueError, match="mine_init"):
        DarkMinerTrainConfig(mine_init="zero")
    with pytest.raises(ValueError, match="max_rounds"):
        DarkMinerTrainConfig(max_rounds=0)
    with pytest.raises(ValueError, match="Unknown Dark Miner preset"):
        DarkMinerTrainConfig.preset("fast")
    t = DarkMinerTrainConfig.preset("testbed", concept="striped", max_rounds=2)
    assert t.concept == "striped" and t.max_rounds == 2 and t.method == "esd-x-strict" and t.anchor == ""
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.lr = 1.0  # type: ignore[misc]


def test_real_model_needs_a_verifier(tiny_sd1, tmp_path):
    with pytest.raises(ValueError, match="Give a verifier"):
        train_dark_miner(tiny_sd1, tmp_path / "x.safetensors", _cfg(), progress=False)


# ---------------------------------------------------------------------------------------------
# verifiers
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A tiny random full CLIPModel checkpoint (the layout of openai/clip-vit-large-patch14)."""
    from safediff.testing import save_tiny_clip

    return save_tiny_clip(tmp_path_factory.mktemp("clip"))


def test_clip_directional_verifier_loads_and_scores(tiny_clip):
    v = CLIPDirectionalVerifier.from_pretrained(tiny_clip)
    assert v.needs_reference and v.describe()["source"] == str(tiny_clip)
    rng = np.random.default_rng(0)
    pool = [np.full((32, 32, 3), (230, 40, 230), np.uint8) ^ (rng.random((32, 32, 3)) * 30).astype(np.uint8) for _ in range(3)]
    refs = [(rng.random((32, 32, 3)) * 255).astype(np.uint8) for _ in range(2)]
    gen = [(0.7 * pool[i] + 0.3 * refs[i]).astype(np.uint8) for i in range(2)]
    s = v.score(gen, references=refs, pool=pool)
    # Eq. V by hand from the same embeddings
    ec, er, ep = v.embed(gen).numpy(), v.embed(refs).numpy(), v.embed(pool).numpy()
    cos = lambda a, b: float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))  # noqa: E731
    ref = np.mean([np.mean([cos(ec[i] - er[i], ep[e] - er[i]) for e in range(3)]) for i in range(2)])
    assert s == pytest.approx(ref, abs=1e-5) and -1 <= s <= 1
    # images that are the pool score higher than images that are the references (zero direction: 0)
    assert v.score(pool[:2], references=refs, pool=pool) > v.score(refs, references=refs, pool=pool) == 0
    with pytest.raises(ValueError, match="one reference image per"):
        v.score(gen, references=None, pool=pool)
    with pytest.raises(ValueError, match="Could not load a CLIP image encoder"):
        CLIPDirectionalVerifier.from_pretrained(tiny_clip / "missing")


def test_clip_verifier_in_the_loop(tiny_sd1, tiny_clip, tmp_path):
    v = CLIPDirectionalVerifier.from_pretrained(tiny_clip)
    p = train_dark_miner(tiny_sd1, tmp_path / "c.safetensors", _cfg(max_rounds=1, stop_below=-2.0), verifier=v, progress=False)
    rec = read_artifact(p)[1]
    assert rec["config"]["verifier"] == "clip-directional" and -1 <= rec["rounds"][0]["verification"] <= 1


def test_testbed_verifier_counts_the_concept():
    from safediff.testbed import world
    from safediff.testbed.plugin import TestbedVerifier

    import random

    rng = random.Random(0)
    imgs = [world.render(world.random_scene(rng, ["striped"] if i < 3 else [])) for i in range(4)]
    assert TestbedVerifier("striped").score(imgs) == 0.75
    with pytest.raises(ValueError, match="Unknown testbed concept"):
        TestbedVerifier("spotted")


def test_cli_unlearn_dark_miner(tiny_sd1, tiny_clip, tmp_path):
    from safediff.cli import main as cli

    out = tmp_path / "cli.safetensors"
    args = ["unlearn", "dark-miner", "--model", str(tiny_sd1.source), "--prompt", "a zebra", "--clip-model", str(tiny_clip),
            "--rounds", "1", "--stop-below", "-2", "--iterations", "1", "--mine-steps", "1", "--out", str(out)]
    assert cli(args) == 0
    rec = read_artifact(out)[1]
    assert rec["kind"] == "dark-miner-delta" and rec["config"]["max_rounds"] == 1
    assert cli(["unlearn", "dark-miner", "--model", str(tiny_sd1.source), "--prompt", "a zebra", "--out", str(out)]) == 2


# ---------------------------------------------------------------------------------------------
# the testbed (one measurement)
# ---------------------------------------------------------------------------------------------


def test_testbed_explicit_concept_rate_drops(testbed, tmp_path):
    """One cut-down round on the testbed (training-side words only); measured, not tuned."""
    from safediff.testbed import world
    from safediff.testbed.suites import testbed_suite

    def rate(stack):
        recs = testbed_suite("striped", "explicit", n=32, seed=7)
        with SafePipeline(testbed, DefenseStack.parse(stack)) as pipe:
            out = pipe([r["prompt"] for r in recs], image_ids=[(r["seed"], 0) for r in recs], batch_size=32)
        return float(np.mean(["striped" in world.detect(np.asarray(r.image)).concepts for r in out.records]))

    cfg = DarkMinerTrainConfig.preset("testbed", concept="striped", max_rounds=1, mine_steps=40, iterations=60,
                                      batch_size=4, verify_images=8)
    path = train_dark_miner(testbed, tmp_path / "dm.safetensors", cfg, progress=False)
    rec = read_artifact(path)[1]
    base, erased = rate(None), rate(f'dark_miner(path="{path}")')
    print(f"\nDark Miner testbed: explicit striped rate {base:.2f} -> {erased:.2f}; rounds {rec['rounds']}")
    assert rec["rounds"][0]["circumvented"]
    assert erased <= base - 0.3, (base, erased, rec["rounds"])
