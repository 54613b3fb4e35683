"""Overhead of the safediff core over calling diffusers directly for the same work (core issue, part 6).

    python benchmarks/core_overhead.py [--model DIR] [--batch 16] [--steps 25] [--repeats 5]

Same components, prompts, generators, scheduler and step count; no defense active. Reports the
median wall time of each and their ratio (goal: <= 1.02x). Writes benchmarks/results/core_overhead.json.
"""

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import safediff
from safediff import core
from safediff.pipeline import SafePipeline
from safediff.stack import DefenseStack


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--size", type=int, default=None, help="image size (default: the model's)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--full-size", default=None, choices=["sd1", "sd2-v", "sdxl", "sd3", "flux"],
                    help="time a random-weight model with the full architecture of this family (written once to "
                         "--full-size-dir, then loaded through the real model layer)")
    ap.add_argument("--full-size-dir", default="runs/full-size")
    args = ap.parse_args()
    if args.full_size:
        from safediff.testing import save_full_size_pipeline

        path = Path(args.full_size_dir) / args.full_size
        if not (path / "model_index.json").exists():
            save_full_size_pipeline(path, args.full_size, dtype=getattr(torch, args.dtype))
        args.model = str(path)
    m = safediff.load_model(args.model, device=args.device, dtype=getattr(torch, args.dtype))
    prompts = ["a red circle on white background"] * args.batch
    gs = m.default_guidance_scale
    ours = SafePipeline(m, DefenseStack())
    ref = m.to_diffusers()
    ref.set_progress_bar_config(disable=True)

    def run_ours():
        ours(prompts, seeds=[0] * len(prompts), guidance_scale=gs, num_inference_steps=args.steps, batch_size=args.batch,
             height=args.size, width=args.size)

    size = args.size or m.default_size
    # FLUX: diffusers' `guidance_scale` is the distilled guidance; ours is its `true_cfg_scale` (1: off)
    ref_gs = {"guidance_scale": m.distilled_guidance, "true_cfg_scale": gs} if m.family == "flux" else {"guidance_scale": gs}

    def run_ref():
        gens = [core.image_generator(0, 0) for _ in prompts]
        ref(prompts, generator=gens, num_inference_steps=args.steps, output_type="pil", height=size, width=size, **ref_gs)

    def timed(fn):
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t

    run_ours(); run_ref()  # warm-up
    t_ours, t_ref = [], []
    for _ in range(args.repeats):  # interleaved, so drift hits both alike
        t_ref.append(timed(run_ref))
        t_ours.append(timed(run_ours))
    res = {
        "model": m.source, "family": m.family, "device": args.device,
        "machine": torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
        "batch": args.batch, "steps": args.steps, "repeats": args.repeats, "dtype": args.dtype, "size": args.size or m.default_size,
        "diffusers_median_s": statistics.median(t_ref), "safediff_median_s": statistics.median(t_ours),
        "ratio": statistics.median(t_ours) / statistics.median(t_ref),
        "command": f"python benchmarks/core_overhead.py --batch {args.batch} --steps {args.steps} --repeats {args.repeats} --dtype {args.dtype}"
                   + (f" --full-size {args.full_size}" if args.full_size else f" --model {args.model}" if args.model else ""),
    }
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / f"core_overhead_{m.family}_{args.device.split(':')[0]}.json"
    out.write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
