"""Embedding Sanitizer and the prompt guard on the testbed (sanitizer issue, part 5).

    python benchmarks/sanitizer_testbed.py [--n 40] [--out runs/es]

1. Train ES on both testbed concepts (training-side words only) and time it.
2. Concept rate (95% CI) on explicit / synonym / implicit / held-out prompts with ES at several
   strengths, alone and stacked on an ESD-unlearned model (the composition study's ESD delta if
   present, else trained here with the same testbed preset); benign attribute accuracy and the
   near-concept benign rate; per-token cosine of benign prompt embeddings (real tokens only).
3. ES overhead per generation (testbed, batch 64, 25 steps).
4. The guard's true-positive rate on held-out prompts and false-positive rate on near-concept
   benign and benign prompts (threshold calibrated on training-side words only).

Writes benchmarks/results/sanitizer_testbed.json and prints markdown tables.
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

import safediff
from safediff.defenses.sanitizer import SanitizerTrainConfig, train_sanitizer
from safediff.eval.benchmarks import load_benchmark
from safediff.eval.metrics import attribute_accuracy, bootstrap_rate
from safediff.eval.runner import RunSettings, load_results, run_eval
from safediff.pipeline import SafePipeline
from safediff.stack import DefenseStack
from safediff.testbed.suites import SUITES, testbed_suite
from safediff.unlearning.esd import ESDTrainConfig, testbed_prompts, train_esd


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--out", default="runs/es")
    ap.add_argument("--study", default="runs/study", help="reuse the composition study's ESD delta if present")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    m = safediff.load_model()
    res: dict = {"n_per_suite": args.n}

    es = out / "es.safetensors"
    if not es.exists():
        t = time.time()
        train_sanitizer(m, es, SanitizerTrainConfig())
        res["train_seconds"] = round(time.time() - t, 1)
    esd = Path(args.study) / "artifacts" / "esd_striped.safetensors"  # the composition study's ESD (testbed preset)
    if not esd.exists():
        esd = out / "esd_striped.safetensors"
        if not esd.exists():
            train_esd(m, esd, ESDTrainConfig.preset("testbed", testbed_prompts("striped")))

    cells = {}
    for concept in ("striped", "caged"):
        records = [r for s in SUITES for r in load_benchmark(f"testbed:{concept}/{s}", n=args.n)]
        variants = {"none": None, **{f"es-{a}": f'sanitizer(path="{es}", strength={a})' for a in (0.25, 0.5, 0.75, 1.0)}}
        if concept == "striped":
            variants["esd"] = f'esd(path="{esd}")'
            variants["esd+es-1.0"] = f'esd(path="{esd}")+sanitizer(path="{es}", strength=1.0)'
        for name, stack in variants.items():
            rd = out / f"{concept}__{name}"
            run_eval(records, rd, defenses=stack, model=m, detectors=[f"testbed:{concept}"],
                     settings=RunSettings(num_images_per_prompt=1), batch_size=64, progress=False)
            rows = load_results(rd)
            cell = {}
            for s in SUITES:
                sub = [r for r in rows if r["extra"].get("suite") == s]
                cell[s] = {"rate": bootstrap_rate([r["unsafe"] for r in sub], groups=[r["prompt_id"] for r in sub]).to_dict(),
                           "attributes": attribute_accuracy([r["details"] for r in sub], [r["extra"]["expected"] for r in sub])}
            cells[f"{concept}|{name}"] = cell
            print(concept, name, {s: round(cell[s]["rate"]["rate"], 3) for s in SUITES}, flush=True)
    res["cells"] = cells

    # benign embeddings: per-token cosine over real tokens (padding excluded)
    benign = [r["prompt"] for c in ("striped", "caged") for r in testbed_suite(c, "benign", n=100, seed=9)]
    near = [r["prompt"] for c in ("striped", "caged") for r in testbed_suite(c, "near_benign", n=100, seed=9)]
    cos = {}
    with SafePipeline(m, DefenseStack.parse(f'sanitizer(path="{es}")')) as pipe:
        for label, prompts in (("benign", benign), ("near_benign", near)):
            pe, _, ctx = pipe.encode(prompts)
            mask = ctx.attention_mask.bool()
            c = torch.nn.functional.cosine_similarity(pe[mask], ctx.original_prompt_embeds[mask], dim=-1)
            cos[label] = {"mean": float(c.mean()), "min": float(c.min())}
    res["token_cosine_strength_1"] = cos

    # overhead: one batch of 64 at 25 steps, interleaved repeats
    prompts = [r["prompt"] for r in testbed_suite("striped", "explicit", n=64)]
    times = {"none": [], "es": []}
    pipes = {"none": SafePipeline(m, DefenseStack()), "es": SafePipeline(m, DefenseStack.parse(f'sanitizer(path="{es}")'))}
    for p in pipes.values():
        p(prompts[:4], num_inference_steps=2)
    for _ in range(3):
        for k, p in pipes.items():
            t = time.perf_counter()
            p(prompts, batch_size=64)
            times[k].append(time.perf_counter() - t)
    res["overhead"] = {"none_s": float(np.median(times["none"])), "es_s": float(np.median(times["es"])),
                       "ratio": float(np.median(times["es"]) / np.median(times["none"]))}

    # the prompt guard
    guard = {}
    with SafePipeline(m, DefenseStack.parse("prompt_guard(action=flag)")) as pipe:
        g = pipe.defenses["prompt_filter"][0]
        guard["thresholds"] = g.thresholds
        for concept in ("striped", "caged"):
            for s in SUITES:
                recs = testbed_suite(concept, s, n=100, seed=13)
                flagged = [bool(d.reason) for d in g.check([r["prompt"] for r in recs])]
                guard[f"{concept}|{s}"] = bootstrap_rate(flagged).to_dict()
    res["guard"] = guard
    res["command"] = f"python benchmarks/sanitizer_testbed.py --n {args.n}"
    Path("benchmarks/results/sanitizer_testbed.json").write_text(json.dumps(res, indent=2))
    print(json.dumps({k: v for k, v in res.items() if k != "cells"}, indent=1))


if __name__ == "__main__":
    main()
