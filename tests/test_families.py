"""Family adapters (issue 30): the registry, the capabilities, and support computed from them.

The support table is pinned here as it was hand-written before the adapters (pipeline's
FAMILY_DEFENSES, support's METHOD_FAMILIES, export's SINGLE_FILE_FAMILIES): the computed one must
equal it exactly.
"""

from pathlib import Path

import pytest

from safediff.families import CAPABILITIES, FamilyAdapter, families, get_family, register_family
from safediff.support import (UnsupportedMethodError, check_defenses, check_supported, methods, render_markdown,
                              supported_defenses, supported_families)

TB = "safediff-testbed"
ALL = ("sd1", "sd2", "sdxl", "sd3", "flux", TB)
UNET = ("sd1", "sd2", "sdxl", TB)
ONE_ENCODER = ("sd1", "sd2", TB)
DEFENSES = ("dark_miner", "delta", "duo", "esd", "negative_prompt", "output_filter", "prompt_guard", "rece", "safree",
            "safree_svf", "sanitizer", "sld", "uce")

#: the hand tables as they stood before the adapters
PINNED_METHODS = {"esd": UNET, "duo": ONE_ENCODER, "dark_miner": ONE_ENCODER, "uce": ALL, "rece": ALL, "sanitizer": ALL,
                  "inversion": UNET, "ring_a_bell": ALL, "mma": ALL, "random_prefix": ALL, "p4d": ONE_ENCODER,
                  "unlearndiffatk": ONE_ENCODER, "concept_inversion": UNET, "relearn": ONE_ENCODER}
PINNED_DEFENSES = {
    "sd1": DEFENSES, "sd2": DEFENSES, TB: DEFENSES,
    "sdxl": ("prompt_guard", "negative_prompt", "sld", "output_filter", "uce", "delta", "esd", "safree", "safree_svf",
             "sanitizer", "rece"),
    "sd3": ("prompt_guard", "negative_prompt", "sld", "output_filter", "uce", "rece", "safree", "safree_svf",
            "sanitizer"),
    "flux": ("prompt_guard", "negative_prompt", "sld", "output_filter", "uce", "rece", "sanitizer")}
PINNED_SINGLE_FILE = ("sd1", "sd2", "sdxl", TB)
#: defenses registered after the tables were pinned, with the families they run on
ADDED_SINCE = {"nag": ALL}
#: trainers and attacks registered after the tables were pinned, with the families they run on
METHODS_ADDED_SINCE = {"latent_inversion": UNET, "p4d_adaptive": ONE_ENCODER, "mma_adaptive": ALL,
                       "concept_inversion_adaptive": UNET, "advunlearn": UNET}


def test_registry_holds_every_family_with_known_capabilities():
    assert tuple(families()) == ALL
    for name, adapter in families().items():
        assert adapter.name == name and get_family(name) is adapter
        assert adapter.capabilities <= set(CAPABILITIES), name
    with pytest.raises(ValueError, match="Unknown model family 'nope'.*sd1"):
        get_family("nope")


def test_a_family_with_an_undocumented_capability_is_refused():
    class Odd(FamilyAdapter):
        name = "odd"
        capabilities = frozenset({"unet", "telepathy"})

    with pytest.raises(ValueError, match="unknown capabilities \\['telepathy'\\]"):
        register_family(Odd())
    assert "odd" not in families()


def test_computed_support_equals_the_pinned_hand_tables():
    assert set(methods()) == set(PINNED_METHODS) | set(METHODS_ADDED_SINCE)
    for method, fams in {**PINNED_METHODS, **METHODS_ADDED_SINCE}.items():
        assert set(supported_families(method)) == set(fams), method
    for family, names in PINNED_DEFENSES.items():
        added = {d for d, fams in ADDED_SINCE.items() if family in fams}
        assert set(supported_defenses(family)) == set(names) | added, family
    assert {f for f, a in families().items() if "single_file" in a.capabilities} == set(PINNED_SINGLE_FILE)


def test_refusals_name_the_missing_capability():
    with pytest.raises(UnsupportedMethodError, match="duo does not run on sdxl models: it needs one_clip_encoder "):
        check_supported("duo", "sdxl")
    with pytest.raises(UnsupportedMethodError, match="inversion does not run on flux models: it needs textual_inversion"):
        check_supported("inversion", "flux")
    check_supported("duo", "sd1")
    check_supported("duo", None)
    with pytest.raises(ValueError, match="safree not supported on flux models: safree needs clip_tokens"):
        check_defenses(["sld", "safree"], "flux")
    check_defenses(["safree", "esd"], "sdxl")


def test_model_properties_come_from_the_adapter(tiny_dir):
    from safediff.testing import tiny_model

    for family in ("sd1", "sdxl", "sd3", "flux"):
        model = tiny_model(family, cache_dir=tiny_dir)
        assert model.adapter is get_family(family)
        assert model.has_pooled == (family != "sd1")
        assert model.is_transformer == (family in ("sd3", "flux"))
        assert type(model.to_diffusers()).__name__ == {"sd1": "StableDiffusionPipeline",
                                                        "sdxl": "StableDiffusionXLPipeline",
                                                        "sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}[family]


def test_docs_support_table_is_the_rendered_one():
    doc = (Path(__file__).parents[1] / "docs" / "models.md").read_text()
    start, end = "<!-- support table: python -m safediff.families --markdown -->\n", "<!-- end support table -->"
    assert start in doc and end in doc, "docs/models.md lost its generated support table markers"
    assert doc.split(start, 1)[1].split(end, 1)[0] == render_markdown(), \
        "docs/models.md's support table is stale: regenerate it with `python -m safediff.families --markdown`"


def test_a_new_family_is_one_adapter_and_support_follows_its_capabilities(monkeypatch):
    from safediff.families import registry
    from safediff.families.sd1 import SD1

    class MadeUp(SD1):  # a made-up family: a one-encoder UNet without trainable sets or textual inversion
        name = "made-up"
        capabilities = frozenset({"unet", "cross_attention", "text_projections", "clip_tokens", "one_clip_encoder"})

    monkeypatch.setitem(registry._FAMILIES, "made-up", MadeUp())
    assert "made-up" in supported_families("p4d") and "made-up" not in supported_families("inversion")
    assert "delta" in supported_defenses("made-up") and "esd" not in supported_defenses("made-up")
    with pytest.raises(UnsupportedMethodError, match="esd does not run on made-up models: it needs trainable_unet"):
        check_supported("esd", "made-up")
    assert "`made-up`" in render_markdown().splitlines()[0]
