"""The denoising core against diffusers, epsilon-space conversion, seeds and batching."""

import numpy as np
import pytest
import torch

import safediff
from safediff import core, encoding
from safediff.defenses.base import GuidanceDefense
from safediff.pipeline import SafePipeline
from safediff.stack import DefenseStack

PROMPTS = ["a red circle", "a zebra on white background"]


def _ours(model, stack="", seed=3, n=2, steps=4, gs=7.5, batch_size=16, prompts=PROMPTS):
    pipe = SafePipeline(model, DefenseStack.parse(stack or None))
    out = pipe(prompts, seed=seed, num_images_per_prompt=n, num_inference_steps=steps, guidance_scale=gs,
               batch_size=batch_size)
    return np.stack([np.asarray(r.image) for r in out.records]).astype(np.int16)


def _diffusers(model, seed=3, n=2, steps=4, gs=7.5, negative=None, prompts=PROMPTS):
    pipe = model.to_diffusers()
    pipe.set_progress_bar_config(disable=True)
    gens = [core.image_generator(seed + i, k) for i in range(len(prompts)) for k in range(n)]  # prompt i: seed + i
    flat = [p for p in prompts for _ in range(n)]
    img = pipe(flat, negative_prompt=[negative] * len(flat) if negative else None, generator=gens,
               num_inference_steps=steps, guidance_scale=gs, output_type="np").images
    return (img * 255).round().astype(np.int16)


@pytest.mark.parametrize("fixture", ["tiny_sd1", "tiny_sd2v"])
def test_no_defense_equals_diffusers_pipeline(fixture, request):
    # Same components, seeds, scheduler and steps: identical computation, so identical pixels
    # (tolerance 0 grey levels; batch layout [uncond, cond] is the same as diffusers').
    model = request.getfixturevalue(fixture)
    assert np.abs(_ours(model) - _diffusers(model)).max() == 0


@pytest.mark.parametrize("fixture", ["tiny_sd1", "tiny_sd2v"])
def test_negative_prompt_equals_diffusers_negative_prompt(fixture, request):
    model = request.getfixturevalue(fixture)
    ours = _ours(model, 'negative_prompt(text="zebra")')
    assert np.abs(ours - _diffusers(model, negative="zebra")).max() == 0
    assert np.abs(ours - _ours(model)).max() > 0  # and it does change the image


# zero strength = no defense, bit for bit: tests/test_conformance.py (every defense, every family)


def test_batch_equals_single(tiny_sd2v):
    # CPU kernels do not promise bit equality across batch shapes: tolerance 2 grey levels.
    batched = _ours(tiny_sd2v, batch_size=16)
    single = _ours(tiny_sd2v, batch_size=1)
    assert np.abs(batched - single).max() <= 2


def test_image_does_not_depend_on_batch_neighbours(tiny_sd1):
    alone = _ours(tiny_sd1, prompts=["a red circle"], n=1)
    with_others = _ours(tiny_sd1, prompts=["a red circle", "a zebra"], n=1)[:1]
    assert np.abs(alone - with_others).max() <= 2


def test_image_seeds():
    assert core.image_seed(5, 0) == 5
    assert core.image_seed(5, 1) != core.image_seed(5, 2) != 5
    assert core.image_seed(5, 1) == core.image_seed(5, 1)


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
def test_epsilon_conversion_matches_definition(pred):
    torch.manual_seed(0)
    x0, eps = torch.randn(2, 4, 8, 8, dtype=torch.float64), torch.randn(2, 4, 8, 8, dtype=torch.float64)
    ab = 0.37
    x_t = ab ** 0.5 * x0 + (1 - ab) ** 0.5 * eps
    out = {"epsilon": eps, "v_prediction": ab ** 0.5 * eps - (1 - ab) ** 0.5 * x0, "sample": x0}[pred]
    assert torch.allclose(core.to_epsilon(out, x_t, ab, pred), eps, atol=1e-10)
    assert torch.allclose(core.from_epsilon(eps, x_t, ab, pred), out, atol=1e-10)


class _AddConstant(GuidanceDefense):
    """A guidance rule written in epsilon space: add c to epsilon."""

    def guide(self, eps, guided, step, state):
        return guided + self.config


def _sample(m, pe, ne, lat, steps, guidance=()):
    from safediff.denoiser import DefendedDenoiser

    with DefendedDenoiser(m, pe, ne, guidance=guidance, guidance_scale=3.0, num_steps=steps) as den:
        return core.sample(m, den, lat, num_inference_steps=steps)


def test_guidance_in_epsilon_space_on_v_model(tiny_sd2v, monkeypatch):
    # A change of +c in epsilon must reach the scheduler as +c / sqrt(alpha_bar) in v (eps = sqrt(ab) v + ...).
    m = tiny_sd2v
    pe, _, _ = encoding.encode_prompts(m, ["a red circle"])
    ne, _, _ = encoding.encode_prompts(m, [""])
    lat0 = core.initial_latents(m, [core.image_generator(0, 0)], 16, 16)
    captured = []
    orig = m.scheduler.step

    def spy_step(model_output, t, latents, **kw):
        captured.append((model_output.clone(), t))
        return orig(model_output, t, latents, **kw)

    monkeypatch.setattr(m.scheduler, "step", spy_step)
    _sample(m, pe, ne, lat0.clone(), 2, guidance=[_AddConstant(0.1, m)])
    _sample(m, pe, ne, lat0.clone(), 2)
    (with_c, t), (without, _) = captured[0], captured[2]
    ab = float(m.scheduler.alphas_cumprod[int(t)])
    assert torch.allclose(with_c - without, torch.full_like(without, 0.1 / ab ** 0.5), atol=1e-4)


def test_epsilon_guidance_matches_epsilon_model_formula(tiny_sd1):
    # On an epsilon model, guide() output reaches the scheduler unchanged.
    m = tiny_sd1
    pe, _, _ = encoding.encode_prompts(m, ["a red circle"])
    ne, _, _ = encoding.encode_prompts(m, [""])
    lat = core.initial_latents(m, [core.image_generator(0, 0)], 16, 16)
    d = _AddConstant(0.0, m)
    a = _sample(m, pe, ne, lat.clone(), 3, guidance=[d])
    b = _sample(m, pe, ne, lat.clone(), 3)
    assert torch.equal(a, b)  # adding 0 in epsilon space changes nothing, bit for bit


def test_long_prompt_is_cut_with_warning(tiny_sd1):
    long = "a red circle " + " ".join(["zebra"] * 100)
    with pytest.warns(UserWarning, match="was cut"):
        encoding.encode_prompts(tiny_sd1, [long])


@pytest.mark.parametrize("bad", ["", "   ", []])
def test_empty_prompt_is_refused(tiny_sd1, bad):
    with pytest.raises(ValueError, match="empty|No prompt"):
        SafePipeline(tiny_sd1, DefenseStack())(bad)


def test_real_token_mask(tiny_sd1):
    _, ids, mask = encoding.encode_prompts(tiny_sd1, ["a red circle"])
    assert mask[0].sum().item() == 5  # <start> a red circle <end>
    assert ids[0, 4].item() == tiny_sd1.tokenizer.eos_token_id


def test_generate_writes_png_metadata_and_sidecar(tiny_sd1, tmp_path):
    from PIL import Image

    out = safediff.generate(["a red circle"], model=tiny_sd1, seed=7, num_images_per_prompt=2, num_inference_steps=2,
                            out_dir=tmp_path, progress=False)
    pngs = sorted(tmp_path.glob("*.png"))
    assert len(pngs) == 2 and len(list(tmp_path.glob("*.json"))) == 2
    info = Image.open(pngs[1]).text
    assert info["prompt"] == "a red circle" and info["seed"] == "7" and info["image_index"] == "1"
    assert info["stack_hash"] == out.stack_hash
    # writing again never overwrites what is there
    safediff.generate(["a red circle"], model=tiny_sd1, seed=7, num_images_per_prompt=2, num_inference_steps=2,
                      out_dir=tmp_path, progress=False)
    assert len(list(tmp_path.glob("*.png"))) == 4
