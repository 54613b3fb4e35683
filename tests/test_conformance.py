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

import dataclasses

import numpy as np
import pytest
import torch
from _families import diffusers_images, ours

import safediff  # noqa: F401 - registers every defense
from safediff.defenses.base import get_defense, known_defenses
from safediff.stack import DefenseStack

FAMILIES = ("testbed", "sd1", "sd2", "sd2-v", "sdxl", "sd3", "flux")

#: each registered defense at zero strength (artifact paths need not exist: a skipped defense
#: reads no file), or why it has no zero-strength setting: its config class's ``zero_strength``
ZERO_STRENGTH: dict[str, tuple[str, ...] | str] = {n: get_defense(n).config_cls.zero_strength for n in known_defenses()}

ZERO_CASES = [(name, text) for name, texts in ZERO_STRENGTH.items() if isinstance(texts, tuple) for text in texts]

#: an acting config of each defense that needs no artifact file (for the round trip): its ``acting_example``
ACTING = {n: get_defense(n).config_cls.acting_example for n in known_defenses()}

PROMPTS = ["a red circle on white background", "a striped zebra square"]


def _weights(model) -> dict[str, torch.Tensor]:
    """Every weight of the model's networks, copied."""
    nets = {"unet": model.unet, "text_encoder": model.text_encoder, "text_encoder_2": model.text_encoder_2,
            "text_encoder_3": model.text_encoder_3}
    return {f"{n}.{k}": v.detach().clone() for n, net in nets.items() if net is not None
            for k, v in net.state_dict().items()}


def test_every_registered_defense_has_a_zero_strength_entry_and_an_acting_one():
    for name in known_defenses():  # read now: a defense registered after this module was imported counts too
        cls = get_defense(name).config_cls
        zero, acting = cls.zero_strength, cls.acting_example
        assert zero and (isinstance(zero, str) or all(isinstance(t, str) and t for t in zero)), \
            f"{cls.__name__} declares no `zero_strength` (stack texts at zero strength, or why it has none)"
        assert acting, f"{cls.__name__} declares no `acting_example` (an acting stack text)"
        for text in zero if isinstance(zero, tuple) else ():
            (cfg,) = DefenseStack.parse(text).defenses
            assert cfg.name == name and not cfg.is_active(), text
        (cfg,) = DefenseStack.parse(acting).defenses
        assert cfg.name == name and cfg.is_active(), acting


def test_a_registered_defense_without_its_examples_fails_the_check(monkeypatch):
    from safediff.defenses import base

    spec = get_defense("negative_prompt")
    bare = type("BareConfig", (spec.config_cls,), {"zero_strength": (), "acting_example": ""})
    monkeypatch.setitem(base._REGISTRY, "bare", dataclasses.replace(spec, name="bare", config_cls=bare))
    with pytest.raises(AssertionError, match="BareConfig declares no `zero_strength`"):
        test_every_registered_defense_has_a_zero_strength_entry_and_an_acting_one()


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
    cls = get_defense(name).config_cls  # read now: a defense registered later (the toy of test_extending) counts
    zero = cls.zero_strength if isinstance(cls.zero_strength, tuple) else ()
    texts = [cls.acting_example, *zero]
    for stack in map(DefenseStack.parse, texts):
        printed = stack.to_string()
        again = DefenseStack.parse(printed)
        assert again == stack and again.to_string() == printed
        assert again.hash("base") == stack.hash("base")
    assert DefenseStack.parse(cls.acting_example).hash("base") != DefenseStack.parse(None).hash("base")


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
