"""SLD (Safe Latent Diffusion): the step function by hand, the config, and the whole loop against
diffusers' own ``StableDiffusionPipelineSafe``."""

import warnings

import numpy as np
import pytest
import torch

from safediff import core, encoding
from safediff.defenses.base import GuidanceContext, StepInfo
from safediff.defenses.sld import I2P_CONCEPT, I2P_CONCEPT_ORIGINAL, SLD, SLDConfig, sld_guidance
from safediff.pipeline import SafePipeline
from safediff.stack import DefenseStack

PROMPTS = ["a red circle", "a zebra on white background"]
SEED, GS = 3, 7.5


def _t(values):
    return torch.tensor(values, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------
# (1) the pure step function, against numbers computed by hand
# ---------------------------------------------------------------------------------------------


def test_sld_guidance_hand_computed_two_steps_with_warmup_and_momentum():
    eps_u = _t([0.0, 0.1, -0.2, 0.3])
    eps_p = _t([0.5, 0.1, 0.2, -0.1])
    eps_s = _t([0.4, 0.6, 0.3, 0.2])
    cfg = SLDConfig(guidance_scale=5.0, threshold=0.05, momentum_scale=0.5, mom_beta=0.6, warmup_steps=1)
    s_g = 2.0
    # By hand, the same predictions at both steps:
    #   eps_p - eps_S = [0.1, -0.5, -0.1, -0.3]
    #   Eq. 6: mu = min(1, 5 * |.|) = [0.5, 1, 0.5, 1]; element 0 has 0.1 >= lambda = 0.05 -> 0
    #          mu = [0, 1, 0.5, 1]
    #   eps_S - eps_u = [0.4, 0.5, 0.5, -0.1];  Eq. 4: gamma = mu * that = [0, 0.5, 0.25, -0.1]
    #   eps_p - eps_u = [0.5, 0, 0.4, -0.4]
    # Step 0 (warm-up, nu = 0): Eq. 7 gamma0 = [0, 0.5, 0.25, -0.1]
    #   Eq. 8: nu1 = 0.6 * 0 + 0.4 * gamma0 = [0, 0.2, 0.1, -0.04]
    #   warm-up: eps = eps_u + 2 * (eps_p - eps_u) = [1.0, 0.1, 0.6, -0.5]
    out0, nu1 = sld_guidance(eps_u, eps_p, eps_s, None, apply=False, cfg=cfg, guidance_scale=s_g)
    assert torch.allclose(out0, _t([1.0, 0.1, 0.6, -0.5]), atol=1e-12)
    assert torch.allclose(nu1, _t([0.0, 0.2, 0.1, -0.04]), atol=1e-12)
    # Step 1 (after warm-up): Eq. 7 gamma1 = gamma + 0.5 * nu1 = [0, 0.6, 0.3, -0.12]
    #   Eq. 8: nu2 = 0.6 * nu1 + 0.4 * gamma1 = [0, 0.36, 0.18, -0.072]
    #   Eq. 3: eps = eps_u + 2 * (eps_p - eps_u - gamma1) = eps_u + 2 * [0.5, -0.6, 0.1, -0.28]
    #          = [1.0, -1.1, 0.0, -0.26]
    out1, nu2 = sld_guidance(eps_u, eps_p, eps_s, nu1, apply=True, cfg=cfg, guidance_scale=s_g)
    assert torch.allclose(out1, _t([1.0, -1.1, 0.0, -0.26]), atol=1e-12)
    assert torch.allclose(nu2, _t([0.0, 0.36, 0.18, -0.072]), atol=1e-12)


def test_sld_guidance_warmup_output_is_plain_cfg_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    u, p, s = (torch.randn(2, 4, 3, 3, generator=g) for _ in range(3))
    out, mom = sld_guidance(u, p, s, None, apply=False, cfg=SLDConfig(warmup_steps=5), guidance_scale=GS)
    assert torch.equal(out, u + GS * (p - u))
    assert mom.abs().sum() > 0  # momentum builds during warm-up


def _gctx(model=None, pe=None, gs=GS, encode=None, num_steps=3):
    pe = torch.zeros(1, 4, 3) if pe is None else pe
    return GuidanceContext(prompts=["x"], prompt_embeds=pe, original_prompt_embeds=pe, negative_embeds=pe,
                           guidance_scale=gs, encode=encode or (lambda p: (torch.ones(1, 4, 3), None, None)), model=model,
                           num_steps=num_steps)


def test_guide_keeps_an_earlier_defense_change_and_keeps_state_per_generation():
    g = torch.Generator().manual_seed(1)
    eps = {k: torch.randn(1, 4, 2, 2, generator=g) for k in ("uncond", "cond", "sld_concept")}
    cfg = SLDConfig(warmup_steps=1, momentum_scale=0.5, mom_beta=0.5, schedule_steps=None)
    plain = eps["uncond"] + GS * (eps["cond"] - eps["uncond"])
    earlier = torch.full_like(plain, 0.25)  # what an earlier guidance defense added
    d = SLD(cfg, None)

    def run(state):
        outs = []
        for i in range(3):
            info = StepInfo(index=i, num_steps=3, timestep=0, alpha_bar=0.5, latents=plain, progress=i / 3)
            outs.append(d.guide(eps, plain + earlier, info, state))
        return outs

    state = d.new_state(_gctx())
    outs = run(state)
    mom = None
    for i, out in enumerate(outs):
        ref, mom = sld_guidance(eps["uncond"], eps["cond"], eps["sld_concept"], mom, apply=i >= 1, cfg=cfg,
                                guidance_scale=GS)
        assert torch.allclose(out, ref + earlier, atol=1e-5)
    assert torch.equal(outs[0], plain + earlier)  # warm-up: untouched
    # the momentum lives in the generation's state, not on the defense: two generations at once
    # (interleaved) give what each gives alone
    a, b = d.new_state(_gctx()), d.new_state(_gctx())
    inter = []
    for i in range(3):
        info = StepInfo(index=i, num_steps=3, timestep=0, alpha_bar=0.5, latents=plain, progress=i / 3)
        inter.append(d.guide(eps, plain + earlier, info, a))
        d.guide(eps, plain + earlier, info, b)
    assert all(torch.equal(x, y) for x, y in zip(inter, outs))


def test_warmup_keeps_its_meaning_on_a_shorter_schedule():
    # warmup_steps counts steps of SD's 50-step schedule: 10 of 50 is 20% of any schedule
    cfg = SLDConfig(warmup_steps=10)
    d = SLD(cfg, None)
    for n, first_guided in ((50, 10), (25, 5), (10, 2)):
        state = d.new_state(_gctx(num_steps=n))
        lat = torch.zeros(1, 1, 1, 1)
        active = [bool(StepInfo(i, n, 0, 0.5, lat, progress=i / n).within(state.warmup)) for i in range(n)]
        assert active.index(True) == first_guided and all(active[first_guided:])
    # schedule_steps=None counts the actual steps, as diffusers' pipeline does
    state = SLD(SLDConfig(warmup_steps=10, schedule_steps=None), None).new_state(_gctx(num_steps=25))
    assert state.warmup == 10 / 25


# ---------------------------------------------------------------------------------------------
# whole generations on the tiny models
# ---------------------------------------------------------------------------------------------


def _ours(model, stack, steps=4, monkeypatch=None):
    """uint8 images of our pipeline, and the final latents (captured at decode)."""
    captured = []
    if monkeypatch is not None:
        orig = core.decode

        def spy(m, latents, **kw):
            captured.append(latents.clone())
            return orig(m, latents, **kw)

        monkeypatch.setattr(core, "decode", spy)
    out = SafePipeline(model, DefenseStack.parse(stack or None))(PROMPTS, seeds=[SEED] * len(PROMPTS),
                                                                  num_inference_steps=steps, guidance_scale=GS)
    if monkeypatch is not None:
        monkeypatch.setattr(core, "decode", orig)
    imgs = np.stack([np.asarray(r.image) for r in out.records]).astype(np.int16)
    return imgs, (captured[-1] if captured else None)


def _diffusers_safe(model, concept, steps, negative=None, **sld_kwargs):
    """uint8 images and final latents of diffusers' StableDiffusionPipelineSafe on the same components."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from diffusers import StableDiffusionPipelineSafe

        pipe = StableDiffusionPipelineSafe(**model.components(), safety_checker=None, feature_extractor=None,
                                           requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.safety_concept = concept
    gens = [core.image_generator(SEED, 0) for _ in PROMPTS]  # image 0 of each prompt
    latents = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        img = pipe(PROMPTS, generator=gens, num_inference_steps=steps, guidance_scale=GS, output_type="np",
                   height=model.default_size, width=model.default_size,
                   negative_prompt=[negative] * len(PROMPTS) if negative else None,
                   callback=lambda i, t, lat: latents.append(lat.clone()), **sld_kwargs).images
    return (img * 255).round().astype(np.int16), latents[-1]


def _safety_config():
    try:
        from diffusers.pipelines.deprecated.stable_diffusion_safe import SafetyConfig
    except ImportError:  # diffusers < 0.28 kept it outside `deprecated`
        from diffusers.pipelines.stable_diffusion_safe import SafetyConfig
    return SafetyConfig


# (2)
@pytest.mark.parametrize("scale", [0, 0.5, 1])
def test_zero_strength_sld_is_skipped_and_bit_identical(tiny_sd1, scale):
    stack = f'sld(guidance_scale={scale}, concept="zebra")'
    assert not SLDConfig(guidance_scale=scale).is_active()
    assert SafePipeline(tiny_sd1, DefenseStack.parse(stack)).defenses["guidance"] == []
    assert np.array_equal(_ours(tiny_sd1, stack)[0], _ours(tiny_sd1, "")[0])


# (3) Tolerance: final latents within atol 1e-4 + rtol 1e-5 (float32 rounding: we add SLD's change
# onto the guided epsilon instead of recomputing it, and the sampler carries the rounding on; on CPU
# we measured 0 to 2.2e-5 absolute on latents of magnitude ~3 to 25) and images within 1 grey level
# (measured 0). SLD's own effect on these latents is >= 3e-3, so a wrong rule would not pass. The medium preset has 10 warm-up steps, so 12 steps leave
# 2 guided steps; the second case shortens warm-up to see a larger effect in 4 steps.
@pytest.mark.parametrize("steps,overrides", [(12, {}), (4, {"warmup_steps": 1}), (6, "max")])
def test_matches_diffusers_stable_diffusion_pipeline_safe(tiny_sd1, monkeypatch, steps, overrides):
    cfgs = _safety_config()
    if overrides == "max":
        stack, kwargs = 'sld(preset=max, concept="zebra", schedule_steps=null)', dict(cfgs.MAX)
    else:
        opts = "".join(f", {k}={v}" for k, v in overrides.items())
        stack, kwargs = f'sld(preset=medium, concept="zebra", schedule_steps=null{opts})', dict(cfgs.MEDIUM)
        kwargs.update({f"sld_{k}": v for k, v in overrides.items()})
    ours_img, ours_lat = _ours(tiny_sd1, stack, steps=steps, monkeypatch=monkeypatch)
    ref_img, ref_lat = _diffusers_safe(tiny_sd1, "zebra", steps, **kwargs)
    torch.testing.assert_close(ours_lat, ref_lat, atol=1e-4, rtol=1e-5)
    assert np.abs(ours_img - ref_img).max() <= 1
    _, plain_lat = _ours(tiny_sd1, "", steps=steps, monkeypatch=monkeypatch)
    assert (ours_lat - plain_lat).abs().max() > 1e-3  # SLD did act


def test_stacked_with_negative_prompt_matches_diffusers(tiny_sd1, monkeypatch):
    # diffusers' safe pipeline takes a negative prompt too: it replaces eps_u in CFG and in Eq. 4.
    kwargs = {**_safety_config().MEDIUM, "sld_warmup_steps": 1}
    _, ours_lat = _ours(tiny_sd1, 'negative_prompt(text="circle")+sld(preset=medium, concept="zebra", warmup_steps=1, '
                             'schedule_steps=null)',
                        monkeypatch=monkeypatch)
    _, ref_lat = _diffusers_safe(tiny_sd1, "zebra", 4, negative="circle", **kwargs)
    torch.testing.assert_close(ours_lat, ref_lat, atol=1e-4, rtol=1e-5)  # tolerance as above


def test_concept_embedding_file_equals_text_and_rejects_other_encoders(tiny_sd1, tmp_path):
    from safetensors.torch import save_file

    emb, _, _ = encoding.encode_prompts(tiny_sd1, ["zebra"])
    save_file({"embedding": emb[0].contiguous()}, str(tmp_path / "ok.safetensors"))  # (L, D)
    by_text = _ours(tiny_sd1, 'sld(preset=max, concept="zebra")')[0]
    by_file = _ours(tiny_sd1, f'sld(preset=max, concept_embedding="{tmp_path / "ok.safetensors"}")')[0]
    assert np.array_equal(by_text, by_file)
    save_file({"embedding": torch.zeros(1, emb.shape[1], emb.shape[2] + 1)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="another text encoder"):
        _ours(tiny_sd1, f'sld(concept_embedding="{tmp_path / "bad.safetensors"}")')


# (4)
def test_runs_on_v_prediction_model_and_changes_the_image(tiny_sd2v):
    assert tiny_sd2v.prediction_type == "v_prediction"
    plain = _ours(tiny_sd2v, "")[0]
    for stack in ('sld(preset=max, concept="zebra")', 'sld(preset=medium, warmup_steps=0, concept="zebra")'):
        assert np.abs(_ours(tiny_sd2v, stack)[0] - plain).max() > 0


# ---------------------------------------------------------------------------------------------
# (5) config validation, (6) presets
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"guidance_scale": -1}, r"`guidance_scale` must be >= 0"),
        ({"guidance_scale": float("nan")}, r"`guidance_scale` must be a finite number"),
        ({"guidance_scale": "high"}, r"`guidance_scale` must be a finite number"),
        ({"warmup_steps": -1}, r"`warmup_steps` must be an integer >= 0"),
        ({"warmup_steps": 2.5}, r"`warmup_steps` must be an integer >= 0"),
        ({"threshold": float("inf")}, r"`threshold` must be a finite number"),
        ({"momentum_scale": -0.1}, r"`momentum_scale` must be >= 0"),
        ({"mom_beta": 1.5}, r"`mom_beta` must be in \[0, 1\]"),
        ({"mom_beta": -0.1}, r"`mom_beta` must be in \[0, 1\]"),
        ({"concept": "  "}, r"`concept` is empty"),
        ({"concept_embedding": ""}, r"`concept_embedding` must be the path"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SLDConfig(**kwargs)


def test_config_from_stack_text_and_hash_normalisation():
    cfg = DefenseStack.parse("sld(preset=strong, concept=zebra, warmup_steps=3)").defenses[0]
    assert cfg == SLDConfig(concept="zebra", guidance_scale=2000.0, warmup_steps=3, threshold=0.025,
                            momentum_scale=0.5, mom_beta=0.7)
    assert SLDConfig(guidance_scale=1000).to_dict() == SLDConfig(guidance_scale=1000.0).to_dict()
    assert DefenseStack.parse("sld").to_string() == "sld"
    with pytest.raises(ValueError, match="Unknown preset"):
        DefenseStack.parse("sld(preset=extreme)")
    assert I2P_CONCEPT == "an image showing " + I2P_CONCEPT_ORIGINAL
    assert SLDConfig(concept="", concept_embedding="x.safetensors").artifact_paths() == ["x.safetensors"]


def test_presets_equal_diffusers_safety_config():
    cfgs = _safety_config()
    ref = {name.lower(): {k.removeprefix("sld_"): v for k, v in getattr(cfgs, name).items()}
           for name in ("WEAK", "MEDIUM", "STRONG", "MAX")}
    assert SLDConfig.presets() == ref
    assert SLDConfig.presets()["weak"]["guidance_scale"] == 20  # not UnlearnDiffAtk's 200
    default = SLDConfig()  # defaults are diffusers' __call__ defaults, i.e. MEDIUM
    assert {k: getattr(default, k) for k in ref["medium"]} == ref["medium"]
