"""FLUX.1 (issue 20): the model layer and the one core against diffusers' ``FluxPipeline`` on a
tiny random FLUX.1-dev-shaped pipeline (offline CLIP and T5 tokenizers): packed latents, the
distilled guidance embedding, and true classifier-free guidance for the guidance defenses."""

import numpy as np
import pytest
import torch
from _families import ours

from safediff import core
from safediff.models import detect_family
from safediff.pipeline import SafePipeline
from safediff.stack import DefenseStack

PROMPTS = ["a red circle", "a zebra on white background"]


@pytest.fixture(scope="module")
def tiny_flux(tiny_dir):
    from safediff.testing import tiny_model

    return tiny_model("flux", cache_dir=tiny_dir)


def _ours(model, stack="", **kw):
    return ours(model, PROMPTS, stack, **kw)


def _diffusers(model, seed=3, n=2, steps=28, true_cfg=1.0, negative=None):
    pipe = model.to_diffusers()
    pipe.set_progress_bar_config(disable=True)
    gens = [core.image_generator(seed + i, k) for i in range(len(PROMPTS)) for k in range(n)]
    flat = [p for p in PROMPTS for _ in range(n)]
    size = model.default_size
    img = pipe(flat, negative_prompt=[negative] * len(flat) if negative else None, generator=gens, height=size,
               width=size, num_inference_steps=steps, true_cfg_scale=true_cfg, output_type="np").images
    return (img * 255).round().astype(np.int16)


def test_family_and_defaults(tiny_flux, tiny_dir):
    assert tiny_flux.family == "flux" and tiny_flux.prediction_type == "flow" and tiny_flux.is_transformer
    # diffusers' FLUX defaults: 28 steps, distilled guidance 3.5, true CFG off (scale 1)
    assert (tiny_flux.default_guidance_scale, tiny_flux.default_steps, tiny_flux.distilled_guidance) == (1.0, 28, 3.5)
    assert detect_family(tiny_dir / "flux-0")[0] == "flux"


def test_packing_round_trips():
    x = torch.randn(2, 4, 6, 8)
    packed = core.pack_latents(x)
    assert packed.shape == (2, 12, 16) and torch.equal(core.unpack_latents(packed, 6, 8), x)
    ids = core.latent_image_ids(6, 8, "cpu", torch.float32)
    assert ids.shape == (12, 3) and ids[5].tolist() == [0.0, 1.0, 1.0]


# no defense against diffusers' FLUX pipeline at its defaults: tests/test_conformance.py


def test_negative_prompt_equals_diffusers_true_cfg(tiny_flux):
    # a negative prompt runs through true CFG (our guidance_scale = diffusers' true_cfg_scale);
    # diffusers runs the two branches as two calls, we batch them: tolerance 2 (measured 0)
    ours = _ours(tiny_flux, 'negative_prompt(text="zebra")', gs=4.0)
    assert np.abs(ours - _diffusers(tiny_flux, true_cfg=4.0, negative="zebra")).max() <= 2
    assert np.abs(ours - _ours(tiny_flux)).max() > 0


def test_guidance_defense_without_true_cfg_is_refused_with_the_fix(tiny_flux):
    with pytest.raises(ValueError, match="true_cfg_scale"):
        _ours(tiny_flux, 'negative_prompt(text="zebra")', steps=2)


def test_batch_equals_single_on_flux(tiny_flux):
    assert np.abs(_ours(tiny_flux, steps=8, batch_size=16) - _ours(tiny_flux, steps=8, batch_size=1)).max() <= 2


def test_sld_on_flux(tiny_flux):
    plain = _ours(tiny_flux, steps=10, gs=4.0)
    assert np.array_equal(_ours(tiny_flux, 'sld(concept="zebra", guidance_scale=0)', steps=10, gs=4.0), plain)
    assert np.abs(_ours(tiny_flux, 'sld(preset=max, concept="zebra")', steps=10, gs=4.0) - plain).max() > 0


def test_prompt_guard_and_refusals_on_flux(tiny_flux):
    with SafePipeline(tiny_flux, DefenseStack.parse('prompt_guard(concepts=["zebra"], threshold=0.999)')) as pipe:
        out = pipe(["a zebra on grass", "a red circle"], num_inference_steps=2)
    assert [r.refused for r in out.records] == [True, False]
    for stack in ("safree_svf", 'esd(path="x.safetensors")'):
        with pytest.raises(ValueError, match="not supported on flux"):
            SafePipeline(tiny_flux, DefenseStack.parse(stack))


def test_eval_runs_end_to_end_on_a_saved_tiny_flux(tiny_flux, tiny_dir, tmp_path):
    pytest.importorskip("nudenet")
    from safediff.cli import main
    from safediff.eval.runner import summarize

    (tmp_path / "p.csv").write_text("prompt\na photo of a cat\na painting of a dog\n")
    out = tmp_path / "run"
    assert main(["eval", "--benchmark", str(tmp_path / "p.csv"), "--model", str(tiny_dir / "flux-0"), "--steps", "4",
                 "--defense", 'output_filter(detector="nudenet:rece-style")', "--detector", "nudenet", "--out", str(out)]) == 0
    s = summarize(out)
    assert s["n_images"] == 2 and s["n_errors"] == 0 and s["n_unscored"] == 0
