"""Cost of each defense stack per image against no defense, same model and settings.

    python benchmarks/stack_cost.py [--model DIR] [--device cuda] [--dtype float16] [--batch 4] [--steps 25]

Writes benchmarks/results/stack_cost_<family>_<device>.json.
"""

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import safediff
from safediff.pipeline import SafePipeline
from safediff.stack import DefenseStack

STACKS = ["none", 'negative_prompt(text="nudity")', "sld(preset=medium)", "sld(preset=max)",
          "safree+safree_svf"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    ap.add_argument("--full-size", default=None, choices=["sd1", "sd2-v", "sdxl", "sd3", "flux"],
                    help="time a random-weight model with the full architecture of this family (written once to "
                         "--full-size-dir, then loaded through the real model layer)")
    ap.add_argument("--full-size-dir", default="runs/full-size")
    ap.add_argument("--flux-true-cfg", type=float, default=4.0, help="FLUX: the true-CFG scale of the guidance stacks")
    args = ap.parse_args()
    if args.full_size:
        from safediff.testing import save_full_size_pipeline

        path = Path(args.full_size_dir) / args.full_size
        if not (path / "model_index.json").exists():
            save_full_size_pipeline(path, args.full_size, dtype=getattr(torch, args.dtype))
        args.model = str(path)
    m = safediff.load_model(args.model, device=args.device, dtype=getattr(torch, args.dtype))
    prompts = ["a photo of a red circle on a white background"] * args.batch
    rows = []
    # FLUX runs guidance defenses only through true CFG (guidance_scale > 1): every guidance stack
    # at --flux-true-cfg, beside "none" without it and with it (true CFG against the empty prompt)
    flux = m.family == "flux"
    stacks = [("none", None)] + ([("none", args.flux_true_cfg)] if flux else []) + [
        (s, args.flux_true_cfg if flux else None) for s in STACKS[1:]]
    for spec, gs in stacks:
        try:
            pipe = SafePipeline(m, DefenseStack.parse(None if spec == "none" else spec))
        except Exception as e:  # noqa: BLE001 - a stack this model cannot take is reported, not hidden
            rows.append({"stack": spec, "guidance_scale": gs, "error": f"{type(e).__name__}: {e}"})
            continue
        run = lambda: pipe(prompts, num_inference_steps=args.steps, batch_size=args.batch, guidance_scale=gs)  # noqa: E731
        run()
        ts = []
        for _ in range(args.repeats):
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            t = time.perf_counter()
            run()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            ts.append(time.perf_counter() - t)
        pipe.close()
        rows.append({"stack": spec, "guidance_scale": gs if gs is not None else m.default_guidance_scale,
                     "median_s": statistics.median(ts), "s_per_image": statistics.median(ts) / args.batch})
        print(rows[-1])
    base = rows[0]["median_s"]
    for r in rows:
        if "median_s" in r:
            r["relative_to_none"] = r["median_s"] / base
    res = {"model": m.source, "family": m.family, "device": args.device, "dtype": args.dtype, "batch": args.batch,
           "steps": args.steps,
           "machine": torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
           "rows": rows, "command": f"python benchmarks/stack_cost.py --device {args.device} --dtype {args.dtype} --batch {args.batch} --steps {args.steps}"
                      + (f" --full-size {args.full_size}" if args.full_size else f" --model {args.model}" if args.model else "")}
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / f"stack_cost_{m.family}_{args.device.split(':')[0]}.json"
    out.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
