"""UCE (Unified Concept Editing): the closed form against an independent numpy solve and its
invariants, the token positions it edits, exact revert, zero-strength skipping, and its effect on
the tiny UNet."""

import numpy as np
import pytest
import torch

from safediff.encoding import encode_prompts
from safediff.defenses.base import get_defense
from safediff.defenses.uce import (
    UCE,
    UCEConfig,
    cross_attention_projections,
    edit_vectors,
    erase_positions,
    preserve_positions,
    uce_closed_form,
)
from safediff.pipeline import SafePipeline
from safediff.stack import DefenseStack
from safediff.testbed.world import CONCEPTS


def _numpy_uce(W, C, G, P, s_e, s_p, lamb):
    """The paper's Eq. 7 written term by term with outer products and an explicit inverse."""
    d = W.shape[1]
    left = lamb * W.copy()
    right = lamb * np.eye(d)
    for c, g in zip(C, G):
        left += s_e * np.outer(W @ g, c)
        right += s_e * np.outer(c, c)
    for p in P:
        left += s_p * np.outer(W @ p, p)
        right += s_p * np.outer(p, p)
    return left @ np.linalg.inv(right)


# ---------------------------------------------------------------------------------------------
# the closed form
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("s_e,s_p,lamb", [(1.0, 1.0, 0.5), (2.5, 0.1, 0.1), (1.0, 0.0, 3.0)])
def test_closed_form_matches_numpy_reference(s_e, s_p, lamb):
    rng = np.random.default_rng(0)
    W, C, G, P = rng.normal(size=(7, 5)), rng.normal(size=(3, 5)), rng.normal(size=(3, 5)), rng.normal(size=(2, 5))
    ref = _numpy_uce(W, C, G, P, s_e, s_p, lamb)
    t = lambda a: torch.from_numpy(a)  # noqa: E731
    got = uce_closed_form(t(W), t(C), t(G), t(P), erase_scale=s_e, preserve_scale=s_p, lamb=lamb)
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-10, atol=1e-10)
    # float32 in, float32 out (solved in float64, cast back)
    got32 = uce_closed_form(t(W).float(), t(C).float(), t(G).float(), t(P).float(), erase_scale=s_e,
                            preserve_scale=s_p, lamb=lamb)
    assert got32.dtype == torch.float32
    np.testing.assert_allclose(got32.numpy(), ref, rtol=1e-4, atol=1e-4)


def test_closed_form_invariants():
    torch.manual_seed(0)
    d, out = 16, 12
    W = torch.randn(out, d, dtype=torch.float64)
    C, G, P = torch.randn(3, d, dtype=torch.float64), torch.randn(3, d, dtype=torch.float64), torch.randn(4, d, dtype=torch.float64)
    # lamb -> 0 with fewer edit vectors than dimensions: the constraints hold exactly
    Wn = uce_closed_form(W, C, G, P, lamb=1e-9)
    assert torch.allclose(Wn @ C.T, W @ G.T, atol=1e-5)  # the erased concepts map where the guides did
    assert torch.allclose(Wn @ P.T, W @ P.T, atol=1e-5)  # the preserved ones keep their outputs
    # with the default regularisation the erased outputs move most of the way to the guides
    Wn = uce_closed_form(W, C, G, P)
    before = (W @ C.T - W @ G.T).norm()
    assert (Wn @ C.T - W @ G.T).norm() < 0.2 * before
    assert (Wn @ P.T - W @ P.T).norm() < 0.2 * before
    # directions orthogonal to every edit vector are untouched
    basis = torch.linalg.svd(torch.cat([C, P]), full_matrices=True).Vh[7:]  # orthogonal complement
    assert torch.allclose(Wn @ basis.T, W @ basis.T, atol=1e-10)
    # erase only, no preserve: same as an empty preserve block
    assert torch.allclose(uce_closed_form(W, C, G), uce_closed_form(W, C, G, P[:0]))


def test_closed_form_rejects_bad_input():
    W, C = torch.randn(4, 3), torch.randn(2, 3)
    with pytest.raises(ValueError, match="lamb"):
        uce_closed_form(W, C, C, lamb=0.0)
    with pytest.raises(ValueError, match="same n"):
        uce_closed_form(W, C, C[:1])
    with pytest.raises(ValueError, match="preserve"):
        uce_closed_form(W, C, C, torch.randn(2, 4))


# ---------------------------------------------------------------------------------------------
# token positions
# ---------------------------------------------------------------------------------------------


def test_token_positions_rules():
    # "a red circle" has 5 real tokens (start, 3 words, end): last word at 3; "" has 2: position 0
    assert erase_positions(5, 2, 77, "last_word") == ([3], [0])
    c, g = erase_positions(5, 2, 77, "to_end")
    assert c == list(range(3, 77)) and g == list(range(0, 74))
    c, g = erase_positions(3, 5, 77, "to_end")  # a guide longer than the concept: both cut to 74
    assert c == list(range(1, 75)) and g == list(range(3, 77))
    assert preserve_positions(5, 77, "last_word") == [3]
    assert preserve_positions(5, 77, "to_end") == list(range(77))
    with pytest.raises(ValueError, match="token_mode"):
        erase_positions(5, 2, 77, "first_word")


def test_token_modes_pick_different_positions_on_a_known_prompt(tiny_sd1):
    tok = tiny_sd1.tokenizer
    embeds, ids, mask = encode_prompts(tiny_sd1, ["a red circle", ""], warn_truncation=False)
    assert int(mask[0].sum()) == 5 and int(ids[0, 3]) == tok.convert_tokens_to_ids("circle</w>")
    L = embeds.shape[1]

    ce, cg, cp = edit_vectors(tiny_sd1, ["a red circle"], [""], ["a red circle"], "last_word")
    assert ce.shape == cg.shape == cp.shape == (1, embeds.shape[2])
    assert torch.equal(ce[0], embeds[0, 3]) and torch.equal(cg[0], embeds[1, 0]) and torch.equal(cp[0], embeds[0, 3])

    ce, cg, cp = edit_vectors(tiny_sd1, ["a red circle"], [""], ["a red circle"], "to_end")
    assert ce.shape[0] == cg.shape[0] == L - 3 and cp.shape[0] == L
    assert torch.equal(ce, embeds[0, 3:]) and torch.equal(cg, embeds[1, : L - 3]) and torch.equal(cp, embeds[0])


# ---------------------------------------------------------------------------------------------
# the defense on a model
# ---------------------------------------------------------------------------------------------


def _snapshot(unet):
    return {k: v.detach().clone() for k, v in unet.state_dict().items()}


@pytest.mark.parametrize("kw", [{}, {"token_mode": "to_end", "preserve": ("",)}, {"targets": "v"}])
def test_apply_then_revert_restores_every_tensor_exactly(tiny_sd1, kw):
    before = _snapshot(tiny_sd1.unet)
    uce = UCE(UCEConfig(**{"erase": ("striped", "zebra"), "preserve": ("red", "circle"), **kw}), tiny_sd1)
    leaves = ("to_v",) if kw.get("targets") == "v" else ("to_k", "to_v")
    expected = sorted(n for n in before if ".attn2." in n and n.split(".")[-2] in leaves and n.endswith(".weight"))
    assert expected and uce.edited_parameter_names == expected
    handle = uce.apply()
    try:
        assert handle.edited_parameter_names == expected
        after = tiny_sd1.unet.state_dict()
        for k, v in before.items():
            if k in expected:
                assert not torch.equal(after[k], v), k
            else:
                assert torch.equal(after[k], v), k
    finally:
        handle.revert()
    assert all(torch.equal(tiny_sd1.unet.state_dict()[k], v) for k, v in before.items())


def test_erased_token_keys_and_values_move_to_the_guide(tiny_sd1):
    # last_word: at every edited layer the erased word's key/value approaches the guide's (the
    # start token of "") under the original weights
    ce, cg, _ = edit_vectors(tiny_sd1, ["striped"], [""], [], "last_word")
    layers = cross_attention_projections(tiny_sd1.unet)
    old = {n: m.weight.detach().clone() for n, m in layers.items()}
    handle = UCE(UCEConfig(erase=("striped",)), tiny_sd1).apply()
    try:
        for n, m in layers.items():
            target = cg @ old[n].T
            assert (ce @ m.weight.T - target).norm() < 0.25 * (ce @ old[n].T - target).norm(), n
    finally:
        handle.revert()


def test_unet_output_for_the_erased_word_moves_to_the_guide(tiny_sd1):
    # One timestep, fixed latents. The tiny text encoder is 8-dimensional and its padding tokens
    # share most of their direction with any word, so editing the last word token alone also
    # moves the padding; "to_end" remaps the whole tail of the sequence, the regime where the
    # full UNet output is a fair measure on this model.
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    emb = {p: encode_prompts(tiny_sd1, [p], warn_truncation=False)[0] for p in ("striped", "")}

    def eps(p):
        with torch.no_grad():
            return tiny_sd1.unet(x, 500, encoder_hidden_states=emb[p]).sample

    e_word, e_guide = eps("striped"), eps("")
    handle = UCE(UCEConfig(erase=("striped",), token_mode="to_end"), tiny_sd1).apply()
    try:
        edited_word, edited_guide = eps("striped"), eps("")
    finally:
        handle.revert()
    before = (e_word - e_guide).norm()
    assert (edited_word - e_guide).norm() < 0.5 * before  # towards what the guide produced
    assert (edited_word - edited_guide).norm() < before  # and towards the edited model's guide
    assert torch.equal(eps("striped"), e_word)  # reverted


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
    # the testbed preset's options given by name (the preset itself is refused on a non-testbed model)
    striped = [UCEConfig.from_options(UCEConfig.presets()["testbed-striped"])]
    pipe = SafePipeline(tiny_sd1, DefenseStack.parse(striped))
    try:
        assert [type(d) for d in pipe.defenses["weight_edit"]] == [UCE]
        k = pipe.defenses["weight_edit"][0].edited_parameter_names[0]
        assert not torch.equal(tiny_sd1.unet.state_dict()[k], before[k])
    finally:
        pipe.close()
    assert all(torch.equal(tiny_sd1.unet.state_dict()[k], v) for k, v in before.items())
    _, plain = _images(tiny_sd1, None)
    _, edited = _images(tiny_sd1, striped)
    assert not np.array_equal(plain, edited)


# ---------------------------------------------------------------------------------------------
# config, presets, delta
# ---------------------------------------------------------------------------------------------


def test_registered_and_config_validation():
    assert get_defense("uce").config_cls is UCEConfig
    assert UCEConfig(erase="striped").erase == ("striped",)  # a bare string is one concept
    assert UCEConfig(erase=("a", "b")).guides() == ("", "")
    assert UCEConfig(erase=("a", "b"), guide=("art",)).guides() == ("art", "art")
    assert UCEConfig.from_options({"erase": ["a", "b"], "guide": ["x", "y"]}).guides() == ("x", "y")
    bad = [
        ({"erase": ("a", "b"), "guide": ("x", "y", "z")}, "guide"),
        ({"erase": ("a", "")}, "non-empty"),
        ({"erase": ("a",), "erase_scale": -1.0}, "erase_scale"),
        ({"erase": ("a",), "preserve_scale": -0.1}, "preserve_scale"),
        ({"erase": ("a",), "lamb": 0.0}, "lamb"),
        ({"erase": ("a",), "token_mode": "all"}, "token_mode"),
        ({"erase": ("a",), "targets": "q"}, "targets"),
        ({"erase": ("a",), "preserve": ("a",)}, "both erase and preserve"),
    ]
    for kw, msg in bad:
        with pytest.raises(ValueError, match=msg):
            UCEConfig(**kw)
    with pytest.raises(ValueError, match="Unknown option"):
        UCEConfig.from_options({"erase_concepts": ["a"]})


def test_presets_use_training_words_only():
    presets = UCEConfig.presets()
    for name, concept in CONCEPTS.items():
        cfg = UCEConfig.from_options({"preset": f"testbed-{name}"})
        assert cfg.erase == concept.training_words and cfg.is_active()
        assert not set(cfg.erase + cfg.guide + cfg.preserve) & set(concept.held_out)
        assert {"red", "circle", "white"} <= set(cfg.preserve) and cfg.guides() == ("",) * len(cfg.erase)
    nud = UCEConfig(**presets["sd-nudity"])
    assert (nud.erase, nud.guides(), nud.token_mode, nud.preserve_scale, nud.lamb) == (("nudity",), ("",), "to_end", 0.1, 0.5)


def test_delta_of_the_applied_edit(tiny_sd1):
    uce = UCE(UCEConfig.from_options({"preset": "sd-nudity"}), tiny_sd1)
    params = dict(tiny_sd1.unet.named_parameters())
    originals = {k: params[k].detach().clone() for k in uce.edited_parameter_names}
    planned = {k: (w - originals[k]).float() for k, w in uce.new_weights().items()}
    assert sorted(planned) == uce.edited_parameter_names
    handle = uce.apply()
    try:
        applied = handle.delta()
        for k in planned:
            assert torch.allclose(applied[k], planned[k], atol=1e-6)
            assert torch.allclose(originals[k] + applied[k], params[k].detach(), atol=1e-6)
    finally:
        handle.revert()
    assert all(torch.equal(params[k], v) for k, v in originals.items())


def test_cli_erase_freezes_uce_as_a_delta_usable_in_any_stack(testbed, tmp_path, capsys):
    from safediff.cli import main
    from safediff.pipeline import SafePipeline
    from safediff.stack import DefenseStack

    out = tmp_path / "uce.safetensors"
    assert main(["erase", "--method", "uce", "--concept", "striped", "--out", str(out)]) == 0
    assert "delta(path=" in capsys.readouterr().out
    # the frozen delta gives the same weights as the closed-form defense
    with SafePipeline(testbed, DefenseStack.parse("uce(preset=testbed-striped)")):
        live = {n: p.detach().clone() for n, p in testbed.unet.named_parameters()}
    with SafePipeline(testbed, DefenseStack.parse(f'delta(path="{out}")')):
        frozen = {n: p.detach().clone() for n, p in testbed.unet.named_parameters()}
    assert all(torch.allclose(live[n], frozen[n], atol=1e-6) for n in live)
    # bad input: a clear error, nothing written
    assert main(["erase", "--method", "uce", "--concept", "  ", "--out", str(tmp_path / "x")]) == 2
    assert main(["erase", "--method", "uce", "--concept", "zebra", "--anchor", "zebra", "--out", str(tmp_path / "y")]) == 2
    assert main(["erase", "--method", "uce", "--concept", "striped", "--out", str(out)]) == 2  # exists
    err = capsys.readouterr().err
    assert "--concept TEXT" in err and "anchor" in err and "exists" in err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    # any text: a phrase on the testbed goes through UCE's general form
    assert main(["erase", "--method", "uce", "--concept", "a zebra", "--anchor", "a horse", "--out",
                 str(tmp_path / "z.safetensors")]) == 0
