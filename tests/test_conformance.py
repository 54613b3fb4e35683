"""Conformance (issue 30): what every registered defense must do on every family.

* zero strength is no defense, bit for bit: the defense is skipped (no work at its stage), the
  images are the undefended ones and the model's weights are untouched;
* printing a stack and parsing it back keeps its hash (for every registered defense; the
  property test over random options is ``tests/test_stack_roundtrip.py``);
* no defense is the family's own diffusers pipeline.

Refusal before any work on an unsupported family, for every defense, trainer and attack, is
``tests/test_concepts_refusals.py`` (``test_every_defense_builds_or_is_refused_by_family``,
``test_every_trainer_and_attack_is_refused_by_family_before_any_work``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _families import diffusers_images, ours

import safediff  # noqa: F401 - registers every defense
from safediff.defenses.base import known_defenses
from safediff.stack import DefenseStack

FAMILIES = ("testbed", "sd1", "sd2", "sd2-v", "sdxl", "sd3", "flux")

#: each registered defense at zero strength (artifact paths need not exist: a skipped defense
#: reads no file), or why it has no zero-strength setting. A new defense must be added here.
ZERO_STRENGTH: dict[str, tuple[str, ...] | str] = {
    "nag": ('nag(negative="zebra", scale=0)',),
    "negative_prompt": ('negative_prompt(text="")',),
    "output_filter": ('output_filter(detector="")',),
    "prompt_guard": ('prompt_guard(concepts=["zebra"], enabled=false)',),
    "uce": ('uce(erase=["zebra"], erase_scale=0)',),
    "rece": ('rece(erase=["zebra"], uce_erase_scale=0, erase_scale=0)',
             'rece(erase=["zebra"], uce_erase_scale=0, epochs=0)'),
    "safree": ("safree(enabled=false)",),
    "safree_svf": "no strength option: SAFREE's self-validating filter always acts once listed",
    "sanitizer": ('sanitizer(path="missing.safetensors", strength=0)',),
    "sld": ('sld(concept="zebra", guidance_scale=0)',),
    "delta": ('delta(path="missing.safetensors", scale=0)',),
    "esd": ('esd(path="missing.safetensors", scale=0)',),
    "duo": ('duo(path="missing.safetensors", scale=0)',),
    "dark_miner": ('dark_miner(path="missing.safetensors", scale=0)',),
}

ZERO_CASES = [(name, text) for name, texts in ZERO_STRENGTH.items() if isinstance(texts, tuple) for text in texts]

#: an acting config of each defense that needs no artifact file (for the round trip)
ACTING = {
    "nag": 'nag(negative="zebra", scale=2, tau=3, alpha=0.5)',
    "negative_prompt": 'negative_prompt(text="zebra, \\"striped\\"")',
    "output_filter": 'output_filter(detector="testbed:striped", action=flag, score_threshold=0.5)',
    "prompt_guard": 'prompt_guard(concepts=["zebra", "nudity"], threshold=0.9)',
    "uce": 'uce(erase=["zebra"], guide=["horse"], erase_scale=0.5)',
    "rece": 'rece(erase=["zebra"], epochs=2)',
    "safree": "safree(alpha=0.02)",
    "safree_svf": "safree_svf(k=3.5, t0=5.5)",
    "sanitizer": 'sanitizer(path="es.safetensors", strength=0.5)',
    "sld": 'sld(concept="zebra", guidance_scale=1000, warmup_steps=3)',
    "delta": 'delta(path="d.safetensors", scale=0.5)',
    "esd": 'esd(path="esd.safetensors")',
    "duo": 'duo(path="duo.safetensors", scale=2)',
    "dark_miner": 'dark_miner(path="dm.safetensors")',
}

PROMPTS = ["a red circle on white background", "a striped zebra square"]


def _weights(model) -> dict[str, torch.Tensor]:
    """Every weight of the model's networks, copied."""
    nets = {"unet": model.unet, "text_encoder": model.text_encoder, "text_encoder_2": model.text_encoder_2,
            "text_encoder_3": model.text_encoder_3}
    return {f"{n}.{k}": v.detach().clone() for n, net in nets.items() if net is not None
            for k, v in net.state_dict().items()}


def test_every_registered_defense_has_a_zero_strength_entry_and_an_acting_one():
    assert set(ZERO_STRENGTH) == set(known_defenses()), "add the new defense to ZERO_STRENGTH (and ACTING)"
    assert set(ACTING) == set(known_defenses())
    for name, text in ZERO_CASES:
        (cfg,) = DefenseStack.parse(text).defenses
        assert cfg.name == name and not cfg.is_active(), text
    for name, text in ACTING.items():
        (cfg,) = DefenseStack.parse(text).defenses
        assert cfg.name == name and cfg.is_active(), text


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name,text", ZERO_CASES)
def test_zero_strength_is_no_defense_bit_for_bit(tiny_family, family, name, text):
    """Replaces the per-defense copies that were in test_core (negative_prompt), test_uce and test_rece."""
    model = tiny_family(family)
    before = _weights(model)
    with safediff.SafePipeline(model, DefenseStack.parse(text)) as pipe:
        assert all(not stage for stage in pipe.defenses.values()), pipe.defenses  # skipped: no work at all
    defended = ours(model, PROMPTS, text, n=1, steps=2)
    assert np.array_equal(defended, ours(model, PROMPTS, "", n=1, steps=2))
    after = _weights(model)
    assert all(torch.equal(after[k], v) for k, v in before.items()) and model.edited_hash is None


@pytest.mark.parametrize("name", sorted(ACTING))
def test_print_then_parse_keeps_the_stack_and_its_hash(name, monkeypatch):
    # artifact files named here do not exist: hash each by its path so the stack hash covers the configs
    monkeypatch.setattr(DefenseStack, "artifact_hashes",
                        lambda self: {p: p for d in self.defenses for p in d.artifact_paths()})
    texts = [ACTING[name], *(t for n, t in ZERO_CASES if n == name)]
    for stack in map(DefenseStack.parse, texts):
        printed = stack.to_string()
        again = DefenseStack.parse(printed)
        assert again == stack and again.to_string() == printed
        assert again.hash("base") == stack.hash("base")
    assert DefenseStack.parse(ACTING[name]).hash("base") != DefenseStack.parse(None).hash("base")


#: the per-family files' prompts, as diffusers is asked for them
DIFFUSERS_PROMPTS = ["a red circle", "a zebra on white background"]


@pytest.mark.parametrize("family", FAMILIES)
def test_no_defense_is_the_familys_diffusers_pipeline(tiny_family, family):
    """Same components, scheduler and seeds, at diffusers' defaults for the family (guidance and
    steps; FLUX: distilled guidance, no true CFG; SDXL: zeros for the empty prompt). Tolerance 2
    grey levels for CPU kernels' batch-shape rounding (measured 0). The testbed runs 4 steps (its
    network is the largest here: 25 steps take 9 s). Replaces the copies that were in test_sdxl,
    test_sd3 and test_flux."""
    model = tiny_family(family)
    steps = 4 if family == "testbed" else None
    assert np.abs(ours(model, DIFFUSERS_PROMPTS, steps=steps)
                  - diffusers_images(model, DIFFUSERS_PROMPTS, steps=steps)).max() <= 2


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_negative_prompt_is_the_familys_diffusers_negative_prompt(tiny_family, family):
    """At diffusers' defaults, tolerance 2 grey levels (measured 0); on SD3 the rule runs in epsilon
    space and only its change goes back to the velocity, including at sigma = 1. (SD 1/2 at 4 steps,
    exact: test_core; FLUX through true CFG: test_flux.) Replaces the copies that were in test_sdxl
    and test_sd3."""
    model = tiny_family(family)
    defended = ours(model, DIFFUSERS_PROMPTS, 'negative_prompt(text="zebra")')
    assert np.abs(defended - diffusers_images(model, DIFFUSERS_PROMPTS, negative="zebra")).max() <= 2
    assert np.abs(defended - ours(model, DIFFUSERS_PROMPTS)).max() > 0  # and it does change the image
