"""Cost of NAG against no defense and against a negative prompt (true CFG), and its effect, on the testbed.

    OMP_NUM_THREADS=1 python benchmarks/nag_cost.py [--batch 8] [--steps 10] [--repeats 5] [--n 32]

The comparison FLUX users care about: a model run without a negative branch (guidance scale 1),
NAG at that scale (no extra UNet batch), and the negative prompt through true CFG (a second
branch, guidance scale > 1). Also the testbed's own CFG scale with and without NAG, and the
striped rate of the implicit suite for each. Writes benchmarks/results/nag_cost.json and .md.
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
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "nag_cost"))
    args = ap.parse_args()
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


if __name__ == "__main__":
    main()
