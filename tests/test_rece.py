"""RECE: the adversarial embedding's closed form against an independent numpy solve, a round on
the keys/values and on the tiny UNet (the embedding brings the concept back, the re-edit removes
it), reuse of UCE, exact revert, zero-strength skipping, config and presets."""

import numpy as np
import pytest
import torch

from safediff.encoding import encode_prompts
from safediff.defenses.base import get_defense
from safediff.defenses.rece import RECE, RECEConfig, adversarial_embedding, kv_distance
from safediff.defenses.uce import UCE, UCEConfig, cross_attention_projections, uce_closed_form
from safediff.models import TESTBED_PATH
from safediff.pipeline import SafePipeline
from safediff.stack import DefenseStack
from safediff.testbed.world import CONCEPTS


def _numpy_adversarial(Ws, Wos, C, reg):
    """Eq. 6 written with explicit sums and an explicit inverse, row by row."""
    d = C.shape[1]
    gram, cross = reg * np.eye(d), np.zeros((d, d))
    for W, Wo in zip(Ws, Wos):
        gram += W.T @ W
        cross += W.T @ Wo
    inv = np.linalg.inv(gram)
    return np.stack([inv @ cross @ c for c in C])


def _snapshot(unet):
    return {k: v.detach().clone() for k, v in unet.state_dict().items()}


# ---------------------------------------------------------------------------------------------
# the closed form
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reg", [0.1, 1e-3, 2.0])
def test_adversarial_embedding_matches_numpy_reference(reg):
    rng = np.random.default_rng(0)
    Ws = [rng.normal(size=(o, 6)) for o in (5, 7, 6)]
    Wos = [W + 0.3 * rng.normal(size=W.shape) for W in Ws]
    C = rng.normal(size=(4, 6))
    ref = _numpy_adversarial(Ws, Wos, C, reg)
    t = torch.from_numpy
    got = adversarial_embedding(t(C), [t(W) for W in Ws], [t(W) for W in Wos], reg)
    assert got.dtype == torch.float64 and got.shape == (4, 6)
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-9, atol=1e-10)
    # (n, L, d) in float32: same rows, same shape and dtype back
    got3 = adversarial_embedding(t(C).float().reshape(2, 2, 6), [t(W).float() for W in Ws], [t(W).float() for W in Wos], reg)
    assert got3.shape == (2, 2, 6) and got3.dtype == torch.float32
    np.testing.assert_allclose(got3.reshape(4, 6).numpy(), ref, rtol=1e-4, atol=1e-4)


def test_adversarial_embedding_is_the_minimiser():
    torch.manual_seed(0)
    Ws = [torch.randn(5, 4, dtype=torch.float64) for _ in range(3)]
    Wos = [W + 0.5 * torch.randn_like(W) for W in Ws]
    c = torch.randn(1, 4, dtype=torch.float64)
    reg = 0.1
    e = adversarial_embedding(c, Ws, Wos, reg)

    def objective(v):
        return kv_distance(v, Ws, c, Wos) + reg * float((v ** 2).sum())

    best = objective(e)
    for _ in range(20):  # any perturbation does worse
        assert objective(e + 1e-3 * torch.randn_like(e)) > best
    # nothing edited and no regularisation: the concept itself
    assert torch.allclose(adversarial_embedding(c, Wos, Wos, 1e-12), c, atol=1e-8)


def test_adversarial_embedding_rejects_bad_input():
    W, c = torch.randn(3, 4), torch.randn(2, 4)
    with pytest.raises(ValueError, match="reg"):
        adversarial_embedding(c, [W], [W], 0.0)
    with pytest.raises(ValueError, match="same non-zero number"):
        adversarial_embedding(c, [W], [], 0.1)
    with pytest.raises(ValueError, match="match in pairs"):
        adversarial_embedding(c, [W], [torch.randn(3, 5)], 0.1)


def test_a_round_on_keys_and_values():
    # UCE-edit random projections, find the adversarial embedding, erase it with the UCE closed form
    torch.manual_seed(1)
    d = 6
    Wo = [torch.randn(8, d, dtype=torch.float64) for _ in range(4)]
    c, g, p = (torch.randn(1, d, dtype=torch.float64) for _ in range(3))
    W1 = [uce_closed_form(W, c, g, p, lamb=0.5) for W in Wo]
    e = adversarial_embedding(c, W1, Wo, 0.1)
    # the edited weights forgot c, but e brings the original keys/values of c back
    assert kv_distance(c, W1, c, Wo) > 0.1 * kv_distance(g, Wo, c, Wo)
    assert kv_distance(e, W1, c, Wo) < 0.5 * kv_distance(c, W1, c, Wo)
    # the round maps e to the guide: e no longer reproduces the concept
    W2 = [uce_closed_form(W, e, g, p, lamb=0.1, preserve_scale=0.1) for W in W1]
    assert kv_distance(e, W2, c, Wo) > 2 * kv_distance(e, W1, c, Wo)
    assert kv_distance(e, W2, g, W1) < 0.1 * kv_distance(e, W1, g, W1)  # e's keys/values now are the guide's


# ---------------------------------------------------------------------------------------------
# on the tiny UNet
# ---------------------------------------------------------------------------------------------


def test_zero_epochs_is_exactly_the_uce_edit(tiny_sd1):
    cfg = RECEConfig(erase=("striped", "zebra"), epochs=0, uce_preserve=("red",), uce_token_mode="to_end")
    rece = RECE(cfg, tiny_sd1).compute()
    uce = UCE(UCEConfig(erase=("striped", "zebra"), preserve=("red",), token_mode="to_end"), tiny_sd1).compute()
    assert sorted(rece) == sorted(uce) and all(torch.equal(rece[k], uce[k]) for k in uce)


def test_rounds_match_an_independent_recomputation(tiny_sd1):
    # two rounds, rebuilt here from the pieces: numpy adversarial embedding + the UCE closed form
    cfg = RECEConfig(erase=("striped", "zebra"), guide=("red",), preserve=("", "circle"), epochs=2, reg=0.05)
    rece = RECE(cfg, tiny_sd1)
    got = rece.compute()
    layers = cross_attention_projections(tiny_sd1.unet, "kv")
    names = list(layers)
    Wo = {n: layers[n].weight.detach().double() for n in names}
    start = UCE(cfg.start_config(), tiny_sd1).compute()
    W = {n: start[f"{n}.weight"].double() for n in names}
    enc = lambda ps: encode_prompts(tiny_sd1, list(ps), warn_truncation=False)[0].double()  # noqa: E731
    C, G, P = enc(cfg.erase), enc(("red", "red")).reshape(-1, 8), enc(cfg.preserve).reshape(-1, 8)
    for r in range(2):
        E = _numpy_adversarial([W[n].numpy() for n in names], [Wo[n].numpy() for n in names], C.reshape(-1, 8).numpy(), 0.05)
        np.testing.assert_allclose(rece.adversarial_embeddings[r].reshape(-1, 8).double().numpy(), E, rtol=1e-4, atol=1e-5)
        E = torch.from_numpy(E)
        W = {n: uce_closed_form(W[n], E, G, P, erase_scale=1.0, preserve_scale=0.1, lamb=0.1) for n in names}
    for n in names:
        torch.testing.assert_close(got[f"{n}.weight"].double(), W[n], rtol=1e-4, atol=1e-5)


def test_adversarial_embedding_brings_the_concept_back_and_the_round_erases_it(tiny_sd1):
    # UNet output at one timestep on fixed latents: distance to what the ORIGINAL model made of
    # the concept prompt (small = the concept is there)
    cfg = RECEConfig(erase=("striped",), epochs=1)
    c = encode_prompts(tiny_sd1, ["striped"], warn_truncation=False)[0]
    x = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))

    def eps(e):
        with torch.no_grad():
            return tiny_sd1.unet(x, 500, encoder_hidden_states=e.expand(4, -1, -1)).sample

    concept_out = eps(c)
    rece = RECE(cfg, tiny_sd1)
    rece.compute()
    adv = rece.adversarial_embeddings[0]  # against the UCE-edited weights
    h = UCE(cfg.start_config(), tiny_sd1).apply()
    try:
        uce_c, uce_adv = (eps(c) - concept_out).norm(), (eps(adv) - concept_out).norm()
    finally:
        h.revert()
    h = rece.apply()
    try:
        rece_adv = (eps(adv) - concept_out).norm()
    finally:
        h.revert()
    assert uce_adv < 0.5 * uce_c      # under UCE, e* regenerates the concept's output
    assert rece_adv > 3 * uce_adv     # after the round it no longer does
    assert torch.equal(eps(c), concept_out)  # reverted


def test_apply_then_revert_restores_every_tensor_exactly(tiny_sd1):
    before = _snapshot(tiny_sd1.unet)
    rece = RECE(RECEConfig(erase=("striped", "zebra"), epochs=2), tiny_sd1)
    expected = sorted(n for n in before if ".attn2." in n and n.split(".")[-2] in ("to_k", "to_v") and n.endswith(".weight"))
    assert expected and rece.edited_parameter_names == expected
    handle = rece.apply()
    try:
        assert handle.edited_parameter_names == expected
        after = tiny_sd1.unet.state_dict()
        for k, v in before.items():
            assert torch.equal(after[k], v) != (k in expected), k
    finally:
        handle.revert()
    assert all(torch.equal(tiny_sd1.unet.state_dict()[k], v) for k, v in before.items())


def _images(model, stack, steps=2):
    pipe = SafePipeline(model, DefenseStack.parse(stack))
    try:
        out = pipe(["a red circle", "a striped square"], seed=1, num_inference_steps=steps)
    finally:
        pipe.close()
    return pipe, np.stack([np.asarray(r.image) for r in out.records])


# zero strength = no defense, bit for bit: tests/test_conformance.py (every defense, every family)


def test_pipeline_applies_the_edit_and_close_reverts_it(tiny_sd1):
    before = _snapshot(tiny_sd1.unet)
    _, plain = _images(tiny_sd1, None)
    # the testbed preset's options given by name (the preset itself is refused on a non-testbed model)
    pipe, edited = _images(tiny_sd1, [RECEConfig.from_options(RECEConfig.presets()["testbed-striped"])])
    assert [type(d) for d in pipe.defenses["weight_edit"]] == [RECE]
    assert not np.array_equal(plain, edited)
    assert tiny_sd1.edited_hash is None
    assert all(torch.equal(tiny_sd1.unet.state_dict()[k], v) for k, v in before.items())
    # a start-less RECE (UCE at zero strength) still edits
    assert RECEConfig(erase=("striped",), uce_erase_scale=0.0).is_active()
    assert RECE(RECEConfig(erase=("striped",), uce_erase_scale=0.0, epochs=1), tiny_sd1).compute()


# ---------------------------------------------------------------------------------------------
# config, presets
# ---------------------------------------------------------------------------------------------


def test_registered_and_config_validation():
    assert get_defense("rece").config_cls is RECEConfig and get_defense("rece").stage == "weight_edit"
    assert RECEConfig(erase="striped").erase == ("striped",)
    assert RECEConfig(erase=("a", "b")).guides() == ("", "")
    cfg = RECEConfig.from_options({"preset": "sd-style", "erase": ["Van Gogh"]})
    assert cfg.erase == ("Van Gogh",) and cfg.guides() == ("art",) and cfg.reg == 1e-3 and cfg.epochs == 1
    bad = [
        ({"erase": ("a",), "epochs": -1}, "epochs"),
        ({"erase": ("a",), "reg": 0.0}, "reg"),
        ({"erase": ("a",), "lamb": 0.0}, "lamb"),
        ({"erase": ("a",), "erase_scale": -1.0}, "erase_scale"),
        ({"erase": ("a",), "targets": "q"}, "targets"),
        ({"erase": ("a",), "uce_token_mode": "all"}, "uce_token_mode"),
        ({"erase": ("a",), "preserve": ("a",)}, "both erase and preserve"),
        ({"erase": ("a", "b"), "guide": ("x", "y", "z")}, "guide"),
        ({"erase": ("a", "")}, "non-empty"),
    ]
    for kw, msg in bad:
        with pytest.raises(ValueError, match=msg):
            RECEConfig(**kw)


def test_presets():
    presets = RECEConfig.presets()
    nud = RECEConfig(**presets["sd-nudity"])
    assert (nud.erase, nud.guides(), nud.epochs, nud.reg, nud.preserve_scale, nud.lamb) == (("nudity",), ("",), 3, 0.1, 0.1, 0.1)
    # the start is UCE's own sd-nudity preset (old UCE code's settings)
    start, uce = nud.start_config(), UCEConfig.from_options({"preset": "sd-nudity"})
    assert start == uce
    uns = RECEConfig(**presets["sd-unsafe"])
    assert (uns.epochs, uns.reg) == (2, 0.1) and "nudity" in uns.erase and len(uns.erase) == 11
    assert (RECEConfig(**presets["sd-object-hard"]).reg, RECEConfig(**presets["sd-object-easy"]).reg) == (1e-3, 0.1)
    for name, concept in CONCEPTS.items():
        cfg = RECEConfig.from_options({"preset": f"testbed-{name}"})
        assert cfg.erase == concept.training_words and cfg.is_active()
        words = set(cfg.erase + cfg.guide + cfg.preserve + cfg.uce_preserve)
        assert not words & set(concept.held_out)
        # the start is UCE's testbed preset at erase_scale 1 (the UCE preset itself uses 0.25, the
        # budget its rule picked; RECE's rounds start from the full closed-form edit)
        uce = UCEConfig.from_options({"preset": f"testbed-{name}", "erase_scale": 1.0})
        assert cfg.start_config() == uce


# ---------------------------------------------------------------------------------------------
# measurement on the testbed model
# ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(not (TESTBED_PATH / "model_index.json").exists(), reason="the shipped testbed model is not built")
def test_rece_lowers_the_concept_rate_on_the_testbed(testbed):
    from safediff.testbed import world
    from safediff.testbed.suites import testbed_suite

    recs = testbed_suite("striped", "explicit", n=32, seed=7)

    def rate(stack):
        with SafePipeline(testbed, DefenseStack.parse(stack)) as pipe:
            out = pipe([r["prompt"] for r in recs], image_ids=[(r["seed"], 0) for r in recs], batch_size=32)
        return np.mean(["striped" in world.detect(np.asarray(r.image)).concepts for r in out.records])

    base, erased = rate(None), rate("rece(preset=testbed-striped)")
    print(f"striped rate on explicit prompts: no defense {base:.3f}, RECE {erased:.3f}")
    assert base >= 0.5 and erased <= 0.5 * base
