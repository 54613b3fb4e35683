"""Shared by the per-family tests (SDXL, SD3, FLUX): our pipeline's images as int16 arrays."""

import numpy as np

from safediff import core
from safediff.pipeline import SafePipeline
from safediff.stack import DefenseStack


def ours(model, prompts, stack="", seed=3, n=2, steps=None, gs=None, batch_size=16):
    """``n`` images per prompt (prompt ``i`` uses seed ``seed + i``) through ``stack``, ``(N, H, W, 3)``."""
    with SafePipeline(model, DefenseStack.parse(stack or None)) as pipe:
        out = pipe(prompts, seed=seed, num_images_per_prompt=n, num_inference_steps=steps, guidance_scale=gs,
                   batch_size=batch_size)
    return np.stack([np.asarray(r.image) for r in out.records]).astype(np.int16)


def diffusers_images(model, prompts, seed=3, n=2, steps=None, negative=None):
    """The same images from the family's own diffusers pipeline (``model.to_diffusers()``) at the
    model's defaults, each image seeded as ours are (prompt ``i``, image ``k``: ``core.image_generator(seed + i, k)``)."""
    pipe = model.to_diffusers()
    pipe.set_progress_bar_config(disable=True)
    gens = [core.image_generator(seed + i, k) for i in range(len(prompts)) for k in range(n)]
    flat = [p for p in prompts for _ in range(n)]
    kw = {"num_inference_steps": steps or model.default_steps}
    if model.family == "flux":  # our guidance scale is diffusers' true CFG (1: off); the distilled one is the default
        kw.update(true_cfg_scale=1.0, height=model.default_size, width=model.default_size)
    else:
        kw.update(guidance_scale=model.default_guidance_scale)
    img = pipe(flat, negative_prompt=[negative] * len(flat) if negative else None, generator=gens, output_type="np",
               **kw).images
    return (img * 255).round().astype(np.int16)
