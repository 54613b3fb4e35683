"""safediff's stacks on a stock diffusers StableDiffusionPipeline (safediff.integrations.diffusers)."""

import numpy as np
import pytest
import torch

from safediff import core
from safediff.integrations import diffusers as sd_diffusers
from safediff.pipeline import SafePipeline
from safediff.stack import DefenseStack

PROMPTS = ["a red circle", "a zebra on white background"]
SEED, N, STEPS, GS = 3, 2, 4, 7.5
#: tolerance between the adapter's images and SafePipeline's, in grey levels: 0. The computation is
#: the same (same UNet batches, and diffusers' CFG of [g, g] is g exactly); a step index off by one
#: in SLD's warm-up moves the tiny model's images by only 2 levels, so a looser bound would miss it
TOLERANCE = 0


def _ours(model, stack):
    with SafePipeline(model, DefenseStack.parse(stack)) as pipe:
        out = pipe(PROMPTS, seed=SEED, num_images_per_prompt=N, num_inference_steps=STEPS, guidance_scale=GS)
    return np.stack([np.asarray(r.image) for r in out.records]).astype(np.int16)


def _stock(pipe):
    # safediff seeds image k of prompt i from (seed + i, k): the same generators, in the same order
    gens = [core.image_generator(SEED + i, k) for i in range(len(PROMPTS)) for k in range(N)]
    img = pipe(PROMPTS, num_images_per_prompt=N, generator=gens, num_inference_steps=STEPS, guidance_scale=GS,
               output_type="np").images
    return (img * 255).round().astype(np.int16)


@pytest.fixture()
def stock(tiny_sd1):
    pipe = tiny_sd1.to_diffusers()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("stack", ['negative_prompt(text="zebra")', 'sld(concept="zebra", preset=max)',
                                   'negative_prompt(text="circle")+sld(concept="zebra", preset=max)',
                                   'sld(concept="zebra", preset=strong, warmup_steps=2)',  # step-indexed window
                                   'uce(erase=["zebra"], guide=["horse"], erase_scale=0.5)',  # weight edit
                                   'safree(alpha=0.02)'])  # embedding stage + guidance (FreeU patch)
def test_stock_pipeline_with_adapter_gives_safediffs_images(tiny_sd1, stock, stack):
    before = _stock(stock)
    unet, state = stock.unet, {k: v.clone() for k, v in tiny_sd1.unet.state_dict().items()}
    with sd_diffusers.apply(stock, stack, model=tiny_sd1):
        adapted = _stock(stock)
    ours = _ours(tiny_sd1, stack)
    assert np.abs(adapted - ours).max() <= TOLERANCE
    assert np.abs(adapted - before).max() > 0  # the stack does change the stock images
    # removed: the pipeline's own UNet, encode_prompt and weights, and the stock images bit for bit
    assert stock.unet is unet and "encode_prompt" not in stock.__dict__
    assert all(torch.equal(v, state[k]) for k, v in tiny_sd1.unet.state_dict().items())
    assert np.array_equal(_stock(stock), before)


@pytest.mark.parametrize("fixture", ["tiny_sd1", "tiny_sd2v"])  # epsilon and v-prediction
def test_model_built_from_the_pipeline_matches(fixture, request):
    model = request.getfixturevalue(fixture)
    pipe = model.to_diffusers()
    pipe.set_progress_bar_config(disable=True)
    stack = 'sld(concept="zebra", preset=max)'
    with sd_diffusers.apply(pipe, stack) as handle:  # no `model`: one built on the pipeline's components
        assert handle.safe.model.family == model.family
        assert handle.safe.model.prediction_type == model.prediction_type
        adapted = _stock(pipe)
    assert np.abs(adapted - _ours(model, stack)).max() <= TOLERANCE


def test_refuses_what_it_cannot_apply(tiny_sd1, stock):
    with pytest.raises(ValueError, match="SafePipeline"):
        sd_diffusers.apply(stock, 'output_filter(detector="testbed:zebra")', model=tiny_sd1)
    assert "encode_prompt" not in stock.__dict__  # refused before touching the pipeline
    with sd_diffusers.apply(stock, 'sld(concept="zebra")', model=tiny_sd1):
        with pytest.raises(ValueError, match="already carries"):
            sd_diffusers.apply(stock, 'sld(concept="zebra")', model=tiny_sd1)
        with pytest.raises(ValueError, match="negative_prompt"):
            stock("a red circle", negative_prompt="zebra", num_inference_steps=2)
        with pytest.raises(ValueError, match="prompt_embeds"):
            stock(prompt_embeds=torch.zeros(1, 77, tiny_sd1.text_encoder.config.hidden_size), num_inference_steps=2)
        with pytest.raises(ValueError, match="classifier-free guidance"):
            stock("a red circle", num_inference_steps=2, guidance_scale=1.0)
    with pytest.raises(ValueError, match="supports"):
        sd_diffusers.apply(object(), 'sld(concept="zebra")')
    with pytest.raises(ValueError, match="does not share"):
        sd_diffusers.apply(tiny_sd1.to_diffusers(), "", model=_other_model(tiny_sd1))


def _other_model(model):
    from dataclasses import replace

    return replace(model, unet=torch.nn.Identity())


@pytest.mark.parametrize("stack", ['negative_prompt(text="zebra")+sld(concept="zebra", preset=max)',
                                   'uce(erase=["zebra"], guide=["horse"], erase_scale=0.5)'])
def test_stock_sdxl_pipeline_with_adapter_gives_safediffs_images(tiny_family, stack):
    model = tiny_family("sdxl")
    pipe = model.to_diffusers()
    pipe.set_progress_bar_config(disable=True)
    before = _stock(pipe)
    with sd_diffusers.apply(pipe, stack):  # the Model built from the pipeline: two text encoders, pooled
        adapted = _stock(pipe)
        with pytest.raises(ValueError, match="size conditioning") if "sld" in stack else _no_error():
            pipe("a red circle", num_inference_steps=2, original_size=(64, 64), crops_coords_top_left=(4, 4))
    assert np.abs(adapted - _ours(model, stack)).max() <= TOLERANCE
    assert np.abs(adapted - before).max() > 0
    assert np.array_equal(_stock(pipe), before)


def _no_error():
    import contextlib

    return contextlib.nullcontext()


def test_warns_outside_the_tested_diffusers_versions(tiny_sd1, stock, monkeypatch):
    import diffusers

    monkeypatch.setattr(diffusers, "__version__", "0.30.0")
    with pytest.warns(UserWarning, match="tested with diffusers"):
        sd_diffusers.apply(stock, 'sld(concept="zebra")', model=tiny_sd1).remove()
