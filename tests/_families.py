"""Shared by the per-family tests (SDXL, SD3, FLUX): our pipeline's images as int16 arrays."""

import numpy as np

from safediff.pipeline import SafePipeline
from safediff.stack import DefenseStack


def ours(model, prompts, stack="", seed=3, n=2, steps=None, gs=None, batch_size=16):
    """``n`` images per prompt (prompt ``i`` uses seed ``seed + i``) through ``stack``, ``(N, H, W, 3)``."""
    with SafePipeline(model, DefenseStack.parse(stack or None)) as pipe:
        out = pipe(prompts, seed=seed, num_images_per_prompt=n, num_inference_steps=steps, guidance_scale=gs,
                   batch_size=batch_size)
    return np.stack([np.asarray(r.image) for r in out.records]).astype(np.int16)
