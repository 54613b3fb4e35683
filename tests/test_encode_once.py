"""Text is encoded once per batch (issue 30, item 1): on SDXL, SD3 and FLUX each text encoder runs
once for the prompts (their token and pooled embeddings come from the same forward), once for the
empty prompt only when classifier-free guidance uses it, and once for a defense's concept text."""

from __future__ import annotations

import contextlib

import pytest
import torch

from safediff.pipeline import SafePipeline
from safediff.stack import DefenseStack

PROMPTS = ["a zebra", "a horse in a field"]


def _encoders(model) -> dict[str, tuple[torch.nn.Module, object, int]]:
    """``{field: (text encoder, its tokenizer, padded length)}`` of every loaded text encoder."""
    t5 = model.adapter.t5_parts(model)
    out = {}
    for field, tok_field in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"),
                             ("text_encoder_3", "tokenizer_3")):
        enc = getattr(model, field, None)
        if enc is not None:
            tok = getattr(model, tok_field)
            out[field] = (enc, tok, t5[2] if t5 is not None and enc is t5[0] else tok.model_max_length)
    return out


@contextlib.contextmanager
def forward_inputs(model):
    """``{field: [input ids of each forward call]}`` of every text encoder while the block runs."""
    calls: dict[str, list[torch.Tensor]] = {f: [] for f in _encoders(model)}
    handles = []
    for field, (enc, _, _) in _encoders(model).items():
        def hook(module, args, kwargs, field=field):
            calls[field].append((args[0] if args else kwargs["input_ids"]).detach().cpu())
        handles.append(enc.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


def _ids(tok, texts: list[str], length: int) -> torch.Tensor:
    return tok(texts, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids


def _count(calls: list[torch.Tensor], ids: torch.Tensor) -> int:
    return sum(c.shape == ids.shape and bool(torch.equal(c, ids)) for c in calls)


def _generate(model, stack: str, gs: float) -> dict[str, list[torch.Tensor]]:
    with SafePipeline(model, DefenseStack.parse(stack or None)) as pipe, forward_inputs(model) as calls:
        pipe(PROMPTS, seed=0, guidance_scale=gs, num_inference_steps=1, batch_size=len(PROMPTS))
    return calls


# (family, guidance scale, whether the empty prompt is encoded): SDXL base takes zeros for it, FLUX
# at scale 1 (its distilled guidance, no true CFG) and SD3 at scale 1 use no unconditional branch
CASES = [("sdxl", 5.0, False), ("sd3", 7.0, True), ("sd3", 1.0, False), ("flux", 1.0, False), ("flux", 4.0, True)]


@pytest.mark.parametrize("family,gs,empty", CASES)
def test_each_text_encoder_runs_once_per_text(tiny_family, family, gs, empty):
    model = tiny_family(family)
    calls = _generate(model, "", gs)
    assert len(calls) >= 2
    for field, (_, tok, length) in _encoders(model).items():
        n_prompt = _count(calls[field], _ids(tok, PROMPTS, length))
        n_empty = _count(calls[field], _ids(tok, [""] * len(PROMPTS), length))
        assert n_prompt == 1, f"{family} {field} ran {n_prompt} times on the prompts"
        assert n_empty == int(empty), f"{family} {field} ran {n_empty} times on the empty prompt at scale {gs}"
        assert len(calls[field]) == 1 + int(empty), f"{family} {field}: {len(calls[field])} forward calls"


def test_sdxl_encoding_the_empty_prompt_runs_each_encoder_once_for_it(tiny_family, monkeypatch):
    """An SDXL model without ``force_zeros_for_empty_prompt``: tokens and pooled of "" from one forward."""
    model = tiny_family("sdxl")
    monkeypatch.setattr(model, "force_zeros_for_empty_prompt", False)
    calls = _generate(model, "", 5.0)
    for field, (_, tok, length) in _encoders(model).items():
        assert _count(calls[field], _ids(tok, [""] * len(PROMPTS), length)) == 1, field
        assert len(calls[field]) == 2, field


def test_flux_without_true_cfg_never_encodes_the_empty_prompt_through_t5(tiny_family):
    model = tiny_family("flux")
    t5, tok, length = model.adapter.t5_parts(model)
    field = next(f for f, (enc, _, _) in _encoders(model).items() if enc is t5)
    calls = _generate(model, "", model.default_guidance_scale)
    assert model.default_guidance_scale <= 1
    assert [c.shape[0] for c in calls[field]] == [len(PROMPTS)]
    assert _count(calls[field], _ids(tok, [""] * len(PROMPTS), length)) == 0


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_a_guidance_defenses_concept_goes_through_each_encoder_once(tiny_family, family):
    """SLD asks for its concept's tokens and its pooled embedding: one forward of each encoder."""
    model = tiny_family(family)
    calls = _generate(model, 'sld(preset=max, concept="zebra")', model.default_guidance_scale)
    for field, (_, tok, length) in _encoders(model).items():
        assert _count(calls[field], _ids(tok, ["zebra"], length)) == 1, f"{family} {field}"
        assert _count(calls[field], _ids(tok, PROMPTS, length)) == 1, f"{family} {field}"
