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

#: family name -> (use_linear_projection, prediction_type, scheduler class)
TINY_FAMILIES = {
    "sd1": (False, "epsilon", "PNDMScheduler"),
    "sd2": (True, "epsilon", "DDIMScheduler"),
    "sd2-v": (True, "v_prediction", "DDIMScheduler"),
}

EXTRA_WORDS = ("nudity", "naked", "nude", "violence", "blood", "person", "photo", "of", "the", "painting",
               "cat", "dog", "landscape", "portrait", "woman", "man", "with", "and", "in")


def tiny_tokenizer(out_dir: str | Path | None = None):
    """An offline CLIP tokenizer over the testbed world's words plus a few SD-style words."""
    from .testbed.world import vocabulary
    from .tokenizer import build_clip_tokenizer

    out_dir = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="safediff-tok-"))
    return build_clip_tokenizer([*vocabulary(), *EXTRA_WORDS], out_dir)


def tiny_components(family: str = "sd1", seed: int = 0, tokenizer=None) -> dict:
    """Random components shaped like ``family`` (``sd1``, ``sd2`` or ``sd2-v``)."""
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


def save_tiny_pipeline(out_dir: str | Path, family: str = "sd1", seed: int = 0) -> Path:
    """Write a tiny random pipeline of ``family`` as a diffusers folder (loadable by ``load_model``)."""
    from diffusers import StableDiffusionPipeline

    out_dir = Path(out_dir)
    comps = tiny_components(family, seed)
    pipe = StableDiffusionPipeline(**comps, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def tiny_model(family: str = "sd1", seed: int = 0, cache_dir: str | Path | None = None):
    """Load a tiny random model of ``family`` through the real model layer."""
    from .models import load_model

    root = Path(cache_dir) if cache_dir else Path(tempfile.gettempdir()) / "safediff-tiny"
    path = root / f"{family}-{seed}"
    if not (path / "model_index.json").exists():
        tmp = root / f"{family}-{seed}.partial"
        save_tiny_pipeline(tmp, family, seed)
        if not path.exists():
            tmp.rename(path)
    return load_model(path)
