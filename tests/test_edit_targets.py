"""UCE / RECE edit the layers the family adapter names (issue 30, item 6): a UNet's cross-attention
key/value projections, an MMDiT's ``context_embedder``; and ``Model.denoiser_net`` is the network
``Model.unet`` also names."""

from __future__ import annotations

import pytest

from safediff.defenses.rece import RECE, RECEConfig
from safediff.defenses.uce import UCE, UCEConfig, cross_attention_projections


@pytest.mark.parametrize("family,expected", [("sd1", None), ("sdxl", None), ("sd3", ["context_embedder"]),
                                             ("flux", ["context_embedder"])])
def test_uce_and_rece_edit_what_the_adapter_names(tiny_family, family, expected):
    model = tiny_family(family)
    named = model.adapter.text_projections(model.denoiser_net, "kv")
    if expected is None:  # a UNet: every cross-attention key and value projection
        assert named and all(n.split(".")[-2:] in (["attn2", "to_k"], ["attn2", "to_v"]) for n in named)
    else:
        assert list(named) == expected
    weights = sorted(f"{n}.weight" for n in named)
    assert UCE(UCEConfig(erase=("zebra",)), model).edited_parameter_names == weights
    assert RECE(RECEConfig(erase=("zebra",)), model).edited_parameter_names == weights
    assert list(cross_attention_projections(model.denoiser_net)) == list(named)  # found from the network's class


def test_an_adapter_naming_other_projections_moves_the_edit(tiny_family, monkeypatch):
    model = tiny_family("sd1")
    keys = sorted(f"{n}.weight" for n in model.adapter.text_projections(model.denoiser_net, "k"))
    monkeypatch.setattr(type(model.adapter), "key_value_projections", {"k": "to_v", "v": "to_k"})
    assert UCE(UCEConfig(erase=("zebra",), targets="v"), model).edited_parameter_names == keys
    monkeypatch.setattr(type(model.adapter), "cross_attention_module", "no_such_attention")
    with pytest.raises(ValueError, match="no cross-attention projections"):
        _ = UCE(UCEConfig(erase=("zebra",)), model).edited_parameter_names


def test_context_embedder_takes_keys_and_values_alike(tiny_family):
    model = tiny_family("sd3")
    with pytest.raises(ValueError, match="must be 'kv'"):
        model.adapter.text_projections(model.denoiser_net, "k")


def test_denoiser_net_is_the_unet_alias(tiny_family):
    model = tiny_family("flux")
    assert model.denoiser_net is model.unet and type(model.denoiser_net).__name__ == "FluxTransformer2DModel"
    net = model.unet
    try:
        model.denoiser_net = "replaced"
        assert model.unet == "replaced"
    finally:
        model.unet = net
