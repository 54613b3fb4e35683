"""Tiny random components for every supported family, fully offline (importable by users' tests).

Sizes follow diffusers' own pipeline tests. The tokenizer is a real ``CLIPTokenizer`` built offline
(:mod:`safediff.tokenizer`), so textual-inversion loading and everything else runs on the same
classes as with real Stable Diffusion.

Example:
    >>> from safediff.testing import tiny_model
    >>> model = tiny_model("sd1")          # doctest: +SKIP
    >>> model.family, model.prediction_type  # doctest: +SKIP
    ('sd1', 'epsilon')
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from .models import load_model
from .testbed.world import vocabulary
from .tokenizer import build_clip_tokenizer, build_t5_tokenizer

#: family name -> (use_linear_projection, prediction_type, scheduler class)
TINY_FAMILIES = {
    "sd1": (False, "epsilon", "PNDMScheduler"),
    "sd2": (True, "epsilon", "DDIMScheduler"),
    "sd2-v": (True, "v_prediction", "DDIMScheduler"),
    "sdxl": (True, "epsilon", "EulerDiscreteScheduler"),
    "sd3": (None, "flow", "FlowMatchEulerDiscreteScheduler"),
    "flux": (None, "flow", "FlowMatchEulerDiscreteScheduler"),
}

EXTRA_WORDS = ("nudity", "naked", "nude", "violence", "blood", "person", "photo", "of", "the", "painting",
               "cat", "dog", "landscape", "portrait", "woman", "man", "with", "and", "in")


def tiny_tokenizer(out_dir: str | Path | None = None):
    """An offline CLIP tokenizer over the testbed world's words plus a few SD-style words."""
    out_dir = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="safediff-tok-"))
    return build_clip_tokenizer([*vocabulary(), *EXTRA_WORDS], out_dir)


def tiny_t5_tokenizer(out_dir: str | Path | None = None):
    """An offline T5 tokenizer (SD3's and FLUX's T5) over the same words as :func:`tiny_tokenizer`."""
    out_dir = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="safediff-t5tok-"))
    return build_t5_tokenizer([*vocabulary(), *EXTRA_WORDS], out_dir)


def tiny_components(family: str = "sd1", seed: int = 0, tokenizer=None) -> dict:
    """Random components shaped like ``family`` (``sd1``, ``sd2``, ``sd2-v``, ``sdxl``, ``sd3`` or ``flux``)."""
    if family == "sdxl":
        return _tiny_sdxl_components(seed, tokenizer)
    if family == "sd3":
        return _tiny_sd3_components(seed, tokenizer)
    if family == "flux":
        return _tiny_flux_components(seed, tokenizer)
    from diffusers import AutoencoderKL, DDIMScheduler, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if family not in TINY_FAMILIES:
        raise ValueError(f"Unknown tiny family {family!r}; choose one of {list(TINY_FAMILIES)}.")
    linear, pred, sched_name = TINY_FAMILIES[family]
    tok = tokenizer or tiny_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=8, norm_num_groups=2, attention_head_dim=(2, 4), use_linear_projection=linear,
    )
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        block_out_channels=[4, 8], in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4, norm_num_groups=2, sample_size=16,
    )
    torch.manual_seed(seed)
    te = CLIPTextModel(CLIPTextConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        hidden_size=8, intermediate_size=16, layer_norm_eps=1e-5, num_attention_heads=2, num_hidden_layers=2,
        vocab_size=len(tok), max_position_embeddings=tok.model_max_length, projection_dim=8,
    ))
    common = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                  prediction_type=pred, steps_offset=1)
    if sched_name == "PNDMScheduler":
        sched = PNDMScheduler(skip_prk_steps=True, **common)
    else:
        sched = DDIMScheduler(clip_sample=False, set_alpha_to_one=False, **common)
    return {"unet": unet.eval(), "vae": vae.eval(), "text_encoder": te.eval(), "tokenizer": tok, "scheduler": sched}


def _tiny_vae(seed: int, **overrides):
    """The tiny VAE every family shares (two blocks: 8x smaller images than SD's 3-block factor of 8
    would give, a latent side of half the image), with the family's scaling / shift factors."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=[4, 8], in_channels=3, out_channels=3,
                         down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                         latent_channels=4, norm_num_groups=2, sample_size=16, **overrides).eval()


def _tiny_clip(cls, tok, seed: int, hidden: int, intermediate: int, projection: int, act: str = "gelu"):
    """A tiny CLIP text encoder of ``cls`` (with or without projection) over ``tok``'s vocabulary."""
    from transformers import CLIPTextConfig

    torch.manual_seed(seed)
    return cls(CLIPTextConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, layer_norm_eps=1e-5,
                              num_attention_heads=2, num_hidden_layers=2, vocab_size=len(tok),
                              max_position_embeddings=tok.model_max_length, hidden_act=act, hidden_size=hidden,
                              intermediate_size=intermediate, projection_dim=projection,
                              pad_token_id=tok.pad_token_id)).eval()


def _tiny_t5(tok, seed: int, width: int):
    """A tiny T5 encoder (SD3's and FLUX's) over ``tok``'s vocabulary."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    return T5EncoderModel(T5Config(vocab_size=len(tok), d_model=width, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                   relative_attention_num_buckets=8, pad_token_id=tok.pad_token_id,
                                   eos_token_id=tok.eos_token_id, decoder_start_token_id=0)).eval()


def _sdxl_tokenizer_2(tok):
    """SDXL's second tokenizer: the same vocabulary, padding with ``!`` (as SDXL's does)."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as d:
        tok.save_pretrained(d)
        return CLIPTokenizer.from_pretrained(d, pad_token="!")


def _tiny_sdxl_components(seed: int, tokenizer=None) -> dict:
    """SDXL base's layout at diffusers' test sizes: two CLIP text encoders (the second with the
    projection that gives the pooled embedding), the UNet's ``text_time`` added conditioning
    (6 size/crop numbers + the pooled embedding), Euler scheduler, ``tokenizer_2`` padding with
    ``!`` as SDXL's does."""
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tok = tokenizer or tiny_tokenizer()
    tok_2 = _sdxl_tokenizer_2(tok)
    hidden, hidden_2, proj = 8, 12, 12
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=hidden + hidden_2, norm_num_groups=2, attention_head_dim=(2, 4), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=4, projection_class_embeddings_input_dim=6 * 4 + proj,
        transformer_layers_per_block=(1, 2),
    )
    vae = _tiny_vae(seed, scaling_factor=0.13025)
    te = _tiny_clip(CLIPTextModel, tok, seed, hidden, 16, hidden)
    te_2 = _tiny_clip(CLIPTextModelWithProjection, tok_2, seed + 1, hidden_2, 24, proj)
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   num_train_timesteps=1000, prediction_type="epsilon", steps_offset=1,
                                   timestep_spacing="leading", interpolation_type="linear", use_karras_sigmas=False)
    return {"unet": unet.eval(), "vae": vae.eval(), "text_encoder": te.eval(), "text_encoder_2": te_2.eval(),
            "tokenizer": tok, "tokenizer_2": tok_2, "scheduler": sched}


def _tiny_sd3_components(seed: int, tokenizer=None) -> dict:
    """SD3's layout at tiny sizes: two CLIP text encoders with projections (their penultimate
    hidden states concatenated, zero-padded to T5's width; their projected pooled outputs
    concatenated), a T5 encoder (its tokenizer built offline, :func:`tiny_t5_tokenizer`), the
    MMDiT ``SD3Transformer2DModel``, a VAE with a shift factor, and the flow-matching Euler
    scheduler with SD3's shift 3.0."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection

    tok = tokenizer or tiny_tokenizer()
    tok_2 = _sdxl_tokenizer_2(tok)
    tok_3 = tiny_t5_tokenizer()
    hidden, hidden_2, t5_width = 8, 12, 32
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=t5_width,
                                        caption_projection_dim=16, pooled_projection_dim=hidden + hidden_2,
                                        pos_embed_max_size=16)
    vae = _tiny_vae(seed, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)
    te = _tiny_clip(CLIPTextModelWithProjection, tok, seed, hidden, 16, hidden)
    te_2 = _tiny_clip(CLIPTextModelWithProjection, tok_2, seed + 1, hidden_2, 24, hidden_2)
    te_3 = _tiny_t5(tok_3, seed + 2, t5_width)
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    return {"transformer": transformer.eval(), "vae": vae.eval(), "text_encoder": te.eval(), "text_encoder_2": te_2.eval(),
            "text_encoder_3": te_3, "tokenizer": tok, "tokenizer_2": tok_2, "tokenizer_3": tok_3,
            "scheduler": sched}


def _tiny_flux_components(seed: int, tokenizer=None) -> dict:
    """FLUX.1-dev's layout at tiny sizes: CLIP ViT-L-like encoder (its pooled output), a T5
    encoder (tokens; tokenizer built offline), ``FluxTransformer2DModel`` with the distilled-guidance
    embedding on packed 2x2 latent patches (``in_channels`` = 4 x latent channels), a VAE with a
    shift factor, flow-matching Euler with dynamic shifting as FLUX's scheduler config."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextModel

    tok = tokenizer or tiny_tokenizer()
    tok_2 = tiny_t5_tokenizer()
    hidden, t5_width, latent = 8, 32, 4
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=4 * latent, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=t5_width,
                                         pooled_projection_dim=hidden, guidance_embeds=True, axes_dims_rope=(4, 4, 8))
    vae = _tiny_vae(seed, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.1159, scaling_factor=0.3611)
    te = _tiny_clip(CLIPTextModel, tok, seed, hidden, 16, hidden, act="quick_gelu")
    te_2 = _tiny_t5(tok_2, seed + 2, t5_width)
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                            base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                            max_image_seq_len=4096)
    return {"transformer": transformer.eval(), "vae": vae.eval(), "text_encoder": te.eval(), "text_encoder_2": te_2.eval(),
            "tokenizer": tok, "tokenizer_2": tok_2, "scheduler": sched}


#: the image side of the tiny FLUX folder (``safediff.json``): diffusers' FLUX default (128 latent
#: pixels) would make the tiny model draw 256 x 256 images
TINY_FLUX_SIZE = 16


def save_tiny_pipeline(out_dir: str | Path, family: str = "sd1", seed: int = 0) -> Path:
    """Write a tiny random pipeline of ``family`` as a diffusers folder (loadable by ``load_model``)."""
    from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    out_dir = Path(out_dir)
    comps = tiny_components(family, seed)
    if family == "sd3":
        pipe = StableDiffusion3Pipeline(**comps)
    elif family == "flux":
        from diffusers import FluxPipeline

        pipe = FluxPipeline(**comps)
    elif family == "sdxl":
        pipe = StableDiffusionXLPipeline(**comps, force_zeros_for_empty_prompt=True)
    else:
        pipe = StableDiffusionPipeline(**comps, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    if family == "flux":
        import json

        (out_dir / "safediff.json").write_text(json.dumps({"default_size": TINY_FLUX_SIZE}))
    return out_dir


def tiny_model(family: str = "sd1", seed: int = 0, cache_dir: str | Path | None = None, *, device: str = "cpu",
               dtype: str = "fp32"):
    """Load a tiny random model of ``family`` through the real model layer (on ``device`` in
    ``dtype``: the CPU in fp32 unless asked, so tests compare exactly on every machine)."""
    root = Path(cache_dir) if cache_dir else Path(tempfile.gettempdir()) / "safediff-tiny"
    path = root / f"{family}-{seed}"
    if not (path / "model_index.json").exists():
        tmp = root / f"{family}-{seed}.partial"
        save_tiny_pipeline(tmp, family, seed)
        if not path.exists():
            tmp.rename(path)
    return load_model(path, device=device, dtype=dtype)


def save_tiny_clip(out_dir: str | Path, seed: int = 0) -> Path:
    """A tiny random full ``CLIPModel`` folder in the layout of ``openai/clip-vit-large-patch14``
    (model, offline tokenizer over :func:`tiny_tokenizer`'s words, 32-pixel image processor), for
    offline tests of CLIP-based code (Dark Miner's verifier, the CLIP score)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    out = Path(out_dir)
    tok = tiny_tokenizer(out)
    torch.manual_seed(seed)
    small = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    cfg = CLIPConfig(text_config={**small, "vocab_size": len(tok), "max_position_embeddings": 77,
                                  "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id},
                     vision_config={**small, "image_size": 32, "patch_size": 8}, projection_dim=8)
    CLIPModel(cfg).save_pretrained(out)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(out)
    return out


#: CLIP ViT-L/14's and OpenCLIP bigG's text encoders (SD1, SDXL, SD3, FLUX), as their published configs
_CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
               max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu")
_CLIP_G = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
               max_position_embeddings=77, projection_dim=1280, hidden_act="gelu")


def full_size_sdxl_configs() -> dict:
    """SDXL base's architecture as configs (UNet 2.57 B parameters, CLIP ViT-L + OpenCLIP bigG
    text encoders, the SD VAE at scaling factor 0.13025), as in its published config files."""
    return {
        "unet": dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                     block_out_channels=(320, 640, 1280), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D",
                                                                            "CrossAttnDownBlock2D"),
                     up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                     transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
                     cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
                     projection_class_embeddings_input_dim=2816, norm_num_groups=32),
        "vae": dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                    up_block_types=("UpDecoderBlock2D",) * 4, sample_size=1024, norm_num_groups=32, scaling_factor=0.13025),
        "text_encoder": _CLIP_L,
        "text_encoder_2": _CLIP_G,
    }


#: T5 v1.1 XXL's encoder (SD3's and FLUX's), as its published config
_T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
               relative_attention_num_buckets=32, feed_forward_proj="gated-gelu", is_gated_act=True,
               dense_act_fn="gelu_new", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)


def full_size_transformer_configs(family: str) -> dict:
    """SD3-medium's and FLUX.1-dev's architectures as configs, as in their published config files
    (SD3-medium: MMDiT with 24 blocks of width 1536, 2.03 B parameters; FLUX.1-dev: 19 double- and
    38 single-stream blocks of width 3072 with the guidance embedding, 11.9 B; both with T5-XXL)."""
    vae = dict(in_channels=3, out_channels=3, latent_channels=16, layers_per_block=2,
               block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
               up_block_types=("UpDecoderBlock2D",) * 4, sample_size=1024, norm_num_groups=32,
               use_quant_conv=False, use_post_quant_conv=False)
    if family == "sd3":
        return {"transformer": dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                                    attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                                    caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=192),
                "vae": dict(vae, scaling_factor=1.5305, shift_factor=0.0609),
                "text_encoder": _CLIP_L, "text_encoder_2": _CLIP_G, "text_encoder_3": _T5_XXL,
                "scheduler": dict(num_train_timesteps=1000, shift=3.0)}
    if family == "flux":
        return {"transformer": dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
                                    attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                                    pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56)),
                "vae": dict(vae, scaling_factor=0.3611, shift_factor=0.1159),
                "text_encoder": _CLIP_L, "text_encoder_2": _T5_XXL,
                "scheduler": dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                  max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)}
    raise ValueError(f"full-size transformer families: 'sd3', 'flux'; got {family!r}.")


def _full_size_transformer_components(family: str, seed: int, dtype: torch.dtype) -> dict:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    cfg, tok = full_size_transformer_configs(family), tiny_tokenizer()
    tok_t5 = tiny_t5_tokenizer()
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(seed)
    net = (SD3Transformer2DModel if family == "sd3" else FluxTransformer2DModel)(**cfg["transformer"]).to(dtype)
    out = {"transformer": net.eval(), "vae": AutoencoderKL(**cfg["vae"]).to(dtype).eval(), "tokenizer": tok,
           "scheduler": FlowMatchEulerDiscreteScheduler(**cfg["scheduler"])}
    t5 = T5EncoderModel(T5Config(**cfg["text_encoder_3" if family == "sd3" else "text_encoder_2"])).to(dtype).eval()
    if family == "sd3":
        tok_2 = _sdxl_tokenizer_2(tok)
        out.update(text_encoder=CLIPTextModelWithProjection(CLIPTextConfig(**cfg["text_encoder"], **ids,
                                                                           pad_token_id=tok.pad_token_id)).to(dtype).eval(),
                   text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**cfg["text_encoder_2"], **ids,
                                                                             pad_token_id=tok_2.pad_token_id)).to(dtype).eval(),
                   tokenizer_2=tok_2, text_encoder_3=t5, tokenizer_3=tok_t5)
    else:
        out.update(text_encoder=CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"], **ids,
                                                             pad_token_id=tok.pad_token_id)).to(dtype).eval(),
                   text_encoder_2=t5, tokenizer_2=tok_t5)
    return out


def full_size_components(family: str = "sd1", seed: int = 0, dtype: torch.dtype = torch.float32) -> dict:
    """Random components with the **full** architectures (SD v1.x / v2.x: 860 M UNet; SDXL base:
    2.57 B UNet and two text encoders), for timing and memory benchmarks where real weights cannot
    be downloaded. The tokenizer is the offline one (the text encoders keep CLIP's 49,408-row
    embedding table). SD3 and FLUX (with T5-XXL, 4.76 B) are built in ``dtype`` (their fp32 weights
    would not fit a 64 GiB disk for FLUX); the others in fp32.

    The random weights are for timing only: their images are noise."""
    from diffusers import AutoencoderKL, DDIMScheduler, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if family in ("sd3", "flux"):
        return _full_size_transformer_components(family, seed, dtype)
    if family == "sdxl":
        from diffusers import EulerDiscreteScheduler
        from transformers import CLIPTextModelWithProjection

        cfg, tok = full_size_sdxl_configs(), tiny_tokenizer()
        tok_2 = _sdxl_tokenizer_2(tok)
        ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        torch.manual_seed(seed)
        return {"unet": UNet2DConditionModel(**cfg["unet"]).eval(), "vae": AutoencoderKL(**cfg["vae"]).eval(),
                "text_encoder": CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"], **ids, pad_token_id=tok.pad_token_id)).eval(),
                "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**cfg["text_encoder_2"], **ids,
                                                                             pad_token_id=tok_2.pad_token_id)).eval(),
                "tokenizer": tok, "tokenizer_2": tok_2,
                "scheduler": EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                    num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading")}
    if family not in ("sd1", "sd2-v"):
        raise ValueError(f"full-size families: 'sd1', 'sd2-v', 'sdxl', 'sd3', 'flux'; got {family!r}.")
    tok = tiny_tokenizer()
    sd2 = family == "sd2-v"
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=96 if sd2 else 64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=1024 if sd2 else 768, attention_head_dim=(5, 10, 20, 20) if sd2 else 8,
        use_linear_projection=sd2, norm_num_groups=32,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        sample_size=768 if sd2 else 512, norm_num_groups=32,
    )
    te = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=1024 if sd2 else 768, intermediate_size=4096 if sd2 else 3072,
        num_hidden_layers=23 if sd2 else 12, num_attention_heads=16 if sd2 else 12, max_position_embeddings=77,
        projection_dim=512 if sd2 else 768, hidden_act="gelu" if sd2 else "quick_gelu",
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    ))
    common = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                  steps_offset=1)
    sched = (DDIMScheduler(prediction_type="v_prediction", clip_sample=False, set_alpha_to_one=False, **common) if sd2
             else PNDMScheduler(skip_prk_steps=True, prediction_type="epsilon", **common))
    return {"unet": unet.eval(), "vae": vae.eval(), "text_encoder": te.eval(), "tokenizer": tok, "scheduler": sched}


def save_full_size_pipeline(out_dir: str | Path, family: str = "sd1", seed: int = 0,
                            dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write :func:`full_size_components` as a diffusers folder (SD3 / FLUX in ``dtype``)."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    if family in ("sd3", "flux"):
        pipe = (StableDiffusion3Pipeline if family == "sd3" else FluxPipeline)(**full_size_components(family, seed, dtype))
    elif family == "sdxl":
        pipe = StableDiffusionXLPipeline(**full_size_components(family, seed), force_zeros_for_empty_prompt=True)
    else:
        pipe = StableDiffusionPipeline(**full_size_components(family, seed), safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return Path(out_dir)
