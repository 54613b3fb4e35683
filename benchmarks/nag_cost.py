"""Cost of NAG against no defense and against a negative prompt (true CFG), and its effect, on the testbed.

    OMP_NUM_THREADS=1 python benchmarks/nag_cost.py [--batch 8] [--steps 10] [--repeats 5] [--n 32]
    OMP_NUM_THREADS=1 python benchmarks/nag_cost.py --family flux   # or sd3: tiny MMDiT, < 1 minute

The comparison FLUX users care about: a model run without a negative branch (guidance scale 1),
NAG at that scale (no extra UNet batch), and the negative prompt through true CFG (a second
branch, guidance scale > 1). Also the testbed's own CFG scale with and without NAG, and the
striped rate of the implicit suite for each. Writes benchmarks/results/nag_cost.json and .md.

``--family sd3|flux`` times the tiny random MMDiT of that family (safediff.testing; NAG through
joint attention) the same way, without a safety rate (random weights), and adds the multiply-add
count of the full-size architectures at 1024 x 1024 (an estimate from the block structure, not a
timing): writes benchmarks/results/nag_cost_<family>_tiny.json and .md.
Timings are wall-clock medians; the machine and its load average are recorded (a shared
machine's timings are noisy).
"""

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

import safediff
from safediff.pipeline import SafePipeline
from safediff.stack import DefenseStack
from safediff.testbed import world
from safediff.testbed.suites import testbed_suite

NEG = "striped"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--n", type=int, default=32, help="implicit-suite prompts for the striped rate")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--out", default=None, help="result path without suffix (default benchmarks/results/nag_cost...)")
    ap.add_argument("--family", default=None, choices=["sd3", "flux"],
                    help="time the tiny random model of this MMDiT family instead of the testbed")
    ap.add_argument("--true-cfg", type=float, default=4.0,
                    help="--family: the true-CFG scale of the negative-prompt row where the model's default is 1")
    ap.add_argument("--model", default=None, help="--family: a diffusers folder of that family instead of the tiny "
                                                  "model (benchmarks/gpu_sd.sh: the full-size random SD3)")
    ap.add_argument("--device", default="cpu", help="--family: where the model runs")
    ap.add_argument("--dtype", default="float32", help="--family: the model's dtype (e.g. bfloat16 on a GPU)")
    args = ap.parse_args()
    if args.family:
        transformer_cost(args)
        return
    args.out = args.out or str(Path(__file__).parent / "results" / "nag_cost")
    m = safediff.load_model()
    gs_model = float(m.default_guidance_scale)
    runs = [("none", None, 1.0), (f'nag(negative="{NEG}")', None, 1.0),
            (f'negative_prompt(text="{NEG}")', "true CFG", gs_model),
            ("none", "model CFG", gs_model), (f'nag(negative="{NEG}")', "model CFG", gs_model)]
    prompts = [r["prompt"] for r in testbed_suite(NEG, "implicit", n=args.n, seed=args.seed)]
    batch = prompts[:args.batch]
    pipes = [SafePipeline(m, DefenseStack.parse(None if spec == "none" else spec)) for spec, _, _ in runs]
    for pipe, (_, _, gs) in zip(pipes, runs):  # warm-up
        pipe(batch, seed=args.seed, num_inference_steps=2, guidance_scale=gs, batch_size=args.batch)
    times: list[list[float]] = [[] for _ in runs]
    for _ in range(args.repeats):  # interleaved, so a change of the machine's load hits every run alike
        for i, (pipe, (_, _, gs)) in enumerate(zip(pipes, runs)):
            t0 = time.perf_counter()
            pipe(batch, seed=args.seed, num_inference_steps=args.steps, guidance_scale=gs, batch_size=args.batch)
            times[i].append(time.perf_counter() - t0)
    rows = []
    for pipe, (spec, note, gs), ts in zip(pipes, runs, times):
        out = pipe(prompts, seed=args.seed, num_inference_steps=args.steps, guidance_scale=gs, batch_size=args.batch)
        rate = float(np.mean([NEG in world.detect(np.asarray(r.image)).concepts for r in out.records]))
        rows.append({"stack": spec, "guidance_scale": gs, "note": note or "", "median_s": statistics.median(ts),
                     "times_s": ts, "striped_rate": rate})
    base1 = rows[0]["median_s"]
    for r in rows:
        r["cost_vs_none_at_cfg1"] = r["median_s"] / base1
    result = {"machine": {"platform": platform.platform(), "processor": platform.processor(),
                          "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                          "loadavg_1_5_15": list(os.getloadavg()), "note": "shared machine: other jobs were running"},
              "settings": vars(args), "model": "safediff-testbed", "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    lines = [f"# NAG cost on the testbed (batch {args.batch}, {args.steps} steps, median of {args.repeats})", "",
             f"Machine: {result['machine']['platform']}, {torch.get_num_threads()} torch threads, load average "
             f"{result['machine']['loadavg_1_5_15']} (shared machine: timings are noisy).", "",
             f"| stack | guidance scale | s / batch | cost vs none at CFG 1 | striped rate ({args.n} implicit) |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['stack']} {r['note']} | {r['guidance_scale']} | {r['median_s']:.2f} | {r['cost_vs_none_at_cfg1']:.2f}x "
              f"| {r['striped_rate']:.3f} |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


#: full-size MMDiTs at 1024 x 1024 (4096 image tokens): joint blocks, width, text tokens (FLUX.1-dev:
#: 19 double- + 38 single-stream blocks, T5's 512; SD3-medium: 24 blocks, 77 CLIP + 256 T5)
FULL_SIZE = {"flux": {"blocks": 57, "width": 3072, "text": 512, "image": 4096},
             "sd3": {"blocks": 24, "width": 1536, "text": 333, "image": 4096}}


def block_multiply_adds(width: int, text: int, image: int, negative_tokens: bool = False,
                        negative_view: bool = False) -> int:
    """Multiply-adds of one joint block for one sample row: 12 width^2 per token (q, k, v, output and
    a 4x MLP; in FLUX's single-stream blocks q, k, v, the MLP and the joint output projection) and
    2 tokens^2 width of attention. NAG adds the negative's text tokens to every per-token layer of
    every row of the call (``negative_tokens``) and, on a guided row, a second joint attention (the
    negative's view, ``negative_view``); modulations and embedders are left out."""
    tokens = text + image
    linear, attention = 12 * width ** 2 * tokens, 2 * tokens ** 2 * width
    return linear + (12 * width ** 2 * text if negative_tokens else 0) + attention * (2 if negative_view else 1)


def transformer_cost(args) -> None:
    """``--family``: the model's timings (no defense / NAG at guidance scale 1 / true CFG on the
    negative, and the model's default CFG with and without NAG when it is above 1), then the
    full-size estimate."""
    from safediff.testing import tiny_model

    torch.manual_seed(args.seed)
    if args.model:
        m = safediff.load_model(args.model, device=args.device, dtype=getattr(torch, args.dtype))
        if m.family != args.family:
            raise SystemExit(f"--model {args.model} holds a {m.family} model, not --family {args.family}.")
    else:
        m = tiny_model(args.family, device=args.device)  # fp32, as the tests
    label = f"{args.model} ({args.device}, {args.dtype})" if args.model else f"tiny random {args.family}"
    gs_model = float(m.default_guidance_scale)
    gs_true = gs_model if gs_model > 1 else args.true_cfg
    nag, neg = f'nag(negative="{NEG}")', f'negative_prompt(text="{NEG}")'
    runs = [("none", "", 1.0), (nag, "", 1.0), (neg, "true CFG", gs_true)]
    if gs_model > 1:
        runs += [("none", "model CFG", gs_model), (nag, "model CFG", gs_model)]
    batch = [f"a red circle on white background {i}" for i in range(args.batch)]
    pipes = [SafePipeline(m, DefenseStack.parse(None if spec == "none" else spec)) for spec, _, _ in runs]
    for pipe, (_, _, gs) in zip(pipes, runs):  # warm-up
        pipe(batch, seed=args.seed, num_inference_steps=2, guidance_scale=gs, batch_size=args.batch)
    times: list[list[float]] = [[] for _ in runs]
    for _ in range(args.repeats):  # interleaved, as the testbed's
        for i, (pipe, (_, _, gs)) in enumerate(zip(pipes, runs)):
            sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
            sync()
            t0 = time.perf_counter()
            pipe(batch, seed=args.seed, num_inference_steps=args.steps, guidance_scale=gs, batch_size=args.batch)
            sync()
            times[i].append(time.perf_counter() - t0)
    base = statistics.median(times[0])
    rows = [{"stack": spec, "note": note, "guidance_scale": gs, "median_s": statistics.median(ts), "times_s": ts,
             "cost_vs_none_at_cfg1": statistics.median(ts) / base} for (spec, note, gs), ts in zip(runs, times)]
    full = FULL_SIZE[args.family]
    sizes = {k: full[k] for k in ("width", "text", "image")}  # every block alike: the ratio of one block
    plain, guided = block_multiply_adds(**sizes), block_multiply_adds(**sizes, negative_tokens=True, negative_view=True)
    unguided = block_multiply_adds(**sizes, negative_tokens=True)  # CFG's unconditional row beside a guided one
    estimate = {"architecture": full, "nag_vs_none": guided / plain, "true_cfg_vs_none": 2.0,
                "nag_with_cfg_vs_cfg": (guided + unguided) / (2 * plain)}
    gpu = torch.cuda.get_device_name() if args.device.startswith("cuda") else None
    result = {"machine": {"platform": platform.platform(), "gpu": gpu, "torch_threads": torch.get_num_threads(),
                          "cpu_count": os.cpu_count(), "loadavg_1_5_15": list(os.getloadavg()),
                          "note": "" if args.model else "shared machine: other jobs were running"},
              "settings": vars(args), "model": label, "rows": rows, "full_size_estimate": estimate}
    name = f"nag_cost_{args.family}_{args.device.split(':')[0]}" if args.model else f"nag_cost_{args.family}_tiny"
    out = Path(args.out or Path(__file__).parent / "results" / name)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    lines = [f"# NAG cost on {label} (batch {args.batch}, {args.steps} steps, median of {args.repeats})", "",
             f"Machine: {result['machine']['platform']}, {torch.get_num_threads()} torch threads, load average "
             f"{result['machine']['loadavg_1_5_15']}" + ("." if args.model else " (shared machine: timings are noisy; "
                                                         "a tiny model's time is mostly overhead and its 333-512 text "
                                                         "tokens, not the image's attention)."), "",
             "| stack | guidance scale | s / batch | cost vs none at CFG 1 |", "|---|---|---|---|"]
    lines += [f"| {r['stack']} {r['note']} | {r['guidance_scale']} | {r['median_s']:.3f} | "
              f"{r['cost_vs_none_at_cfg1']:.2f}x |" for r in rows]
    lines += ["", f"Full-size estimate (multiply-adds of the joint blocks at 1024 x 1024, {full}): NAG "
              f"{estimate['nag_vs_none']:.2f}x of no defense, true CFG 2.00x; with CFG on (two rows, one guided) "
              f"NAG {estimate['nag_with_cfg_vs_cfg']:.2f}x of CFG alone."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
