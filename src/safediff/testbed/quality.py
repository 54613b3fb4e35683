"""Quality of the testbed model, measured with the exact detectors.

Used by the training script (guidance-scale curve) and by ``benchmarks/testbed_quality.py``.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from . import world


def attribute_prompts(n: int, seed: int = 0) -> list[tuple[str, world.Scene]]:
    """``n`` prompts naming colour, shape and background (no concept), with their target scene."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        s = world.random_scene(rng)
        out.append((world.compose_prompt(s.colour, s.shape, f"on {s.background} background"), s))
    return out


def _sample_stock(pipe, prompts: list[str], guidance_scale: float, steps: int, seed: int, batch: int = 50) -> np.ndarray:
    imgs = []
    for i in range(0, len(prompts), batch):
        g = torch.Generator().manual_seed(seed + i)
        out = pipe(prompts[i:i + batch], guidance_scale=guidance_scale, num_inference_steps=steps,
                   generator=g, output_type="np").images
        imgs.append((out * 255).round().clip(0, 255).astype(np.uint8))
    return np.concatenate(imgs)


def guidance_curve(model_dir: str | Path, scales=(1.5, 2.0, 2.5, 3.0, 4.0), n: int = 200, steps: int = 25,
                   seed: int = 0, progress: bool = True) -> list[dict]:
    """Attribute accuracy at several guidance scales (stock diffusers pipeline, exact detectors)."""
    from diffusers import StableDiffusionPipeline
    from tqdm.auto import tqdm

    pipe = StableDiffusionPipeline.from_pretrained(str(model_dir), torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    items = attribute_prompts(n, seed=seed + 1000)
    prompts = [p for p, _ in items]
    rows = []
    for gs in tqdm(scales, desc="guidance curve", disable=not progress):
        imgs = _sample_stock(pipe, prompts, gs, steps, seed)
        dets = [world.detect(im) for im in imgs]
        c = np.mean([d.colour == s.colour for d, (_, s) in zip(dets, items)])
        sh = np.mean([d.shape == s.shape for d, (_, s) in zip(dets, items)])
        bg = np.mean([d.background == s.background for d, (_, s) in zip(dets, items)])
        a3 = np.mean([(d.colour, d.shape, d.background) == (s.colour, s.shape, s.background) for d, (_, s) in zip(dets, items)])
        anyc = np.mean([bool(d.concepts) for d in dets])
        rows.append({"guidance_scale": gs, "colour": float(c), "shape": float(sh), "background": float(bg),
                     "all_three": float(a3), "unrequested_concept": float(anyc), "n": n})
    return rows
