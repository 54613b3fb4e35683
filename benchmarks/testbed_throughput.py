"""Testbed sampling throughput: images/s at 25 steps with CFG (testbed issue, part 8).

    python benchmarks/testbed_throughput.py [--batches 1 16 64] [--images 128]

Writes benchmarks/results/testbed_throughput.json.
"""

import argparse
import json
import platform
import time
from pathlib import Path

import torch

import safediff
from safediff.pipeline import SafePipeline
from safediff.stack import DefenseStack


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--steps", type=int, default=25)
    args = ap.parse_args()
    m = safediff.load_model()
    pipe = SafePipeline(m, DefenseStack())
    prompts = ["a red circle on white background"] * args.images
    rows = []
    pipe(prompts[:4], num_inference_steps=2)  # warm-up
    for b in args.batches:
        n = min(args.images, max(b * 2, 16))
        t = time.perf_counter()
        pipe(prompts[:n], num_inference_steps=args.steps, batch_size=b)
        dt = time.perf_counter() - t
        rows.append({"batch": b, "images": n, "seconds": round(dt, 2), "images_per_s": round(n / dt, 2)})
        print(rows[-1])
    res = {"steps": args.steps, "guidance_scale": m.default_guidance_scale, "rows": rows,
           "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}",
           "command": "python benchmarks/testbed_throughput.py"}
    (Path(__file__).parent / "results" / "testbed_throughput.json").write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
