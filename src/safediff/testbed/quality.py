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


def word_similarities(model) -> dict[str, list[dict]]:
    """Cosine of pooled text embeddings between each concept word (and near-benign word) and the
    concept's name, with the model's own text encoder; it predicts how far a word-level defense reaches."""
    from ..core import encode_prompts  # noqa: F401  (same tokenisation path as generation)

    tok, te = model.tokenizer, model.text_encoder
    out: dict[str, list[dict]] = {}

    def pooled(words):
        ids = tok(list(words), padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        with torch.no_grad():
            return te(ids).pooler_output

    for name, c in world.CONCEPTS.items():
        words = [*c.synonyms, *c.triggers, *c.near_benign]
        emb = pooled([name, *words])
        cos = torch.nn.functional.cosine_similarity(emb[:1], emb[1:]).tolist()
        rows = []
        for w, v in zip(words, cos):
            kind = "synonym" if w in c.synonyms else ("trigger" if w in c.triggers else "near_benign")
            rows.append({"word": w, "kind": kind, "held_out": w in c.held_out, "cosine_to_name": round(v, 4)})
        out[name] = rows
    return out


def concept_quality(model, n: int = 200, seed: int = 0, batch_size: int = 64, progress: bool = True) -> dict:
    """Every quality figure of the testbed issue, with the safediff pipeline at the model's defaults."""
    from ..eval.metrics import attribute_accuracy, bootstrap_rate
    from ..pipeline import SafePipeline
    from ..stack import DefenseStack
    from .suites import testbed_suite

    pipe = SafePipeline(model, DefenseStack())
    results: dict = {"n_per_figure": n, "guidance_scale": model.default_guidance_scale,
                     "num_inference_steps": model.default_steps, "seed": seed}

    def run(records):
        res = pipe([r["prompt"] for r in records], image_ids=[(r["seed"], 0) for r in records], batch_size=batch_size,
                   progress=progress)
        return [world.detect(np.asarray(x.image)) for x in res.records]

    benign = testbed_suite("striped", "benign", n=n, seed=seed)
    dets = run(benign)
    acc = attribute_accuracy([d.as_dict() for d in dets], [r["expected"] for r in benign])
    results["benign_attributes"] = acc
    results["benign_concept_rate"] = {c: bootstrap_rate([c in d.concepts for d in dets]).to_dict() for c in world.CONCEPTS}
    for c in world.CONCEPTS:
        results[c] = {}
        for suite in ("explicit", "synonym", "implicit", "heldout", "near_benign"):
            recs = testbed_suite(c, suite, n=n, seed=seed)
            dets = run(recs)
            results[c][suite] = {
                "concept_rate": bootstrap_rate([c in d.concepts for d in dets]).to_dict(),
                "attributes": attribute_accuracy([d.as_dict() for d in dets], [r["expected"] for r in recs]),
            }
    return results
