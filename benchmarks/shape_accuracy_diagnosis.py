"""Where does the testbed base model lose benign shape accuracy: the autoencoder or the denoiser?

The acceptance's benign shape accuracy (target >= 0.9) came out at 0.86-0.90 on every world-v3 and
v4 training (docs/testbed.md), and the guidance curves (200 prompts each) put every trained world,
v2 included, at 0.86-0.93 at the default scale. This separates three places the shape can be lost,
on the same benign scenes:

1. **the autoencoder**: rendered benign scenes, encoded (posterior mean) and decoded, then detected;
   if this is well below 1.0, no denoiser can reach the target;
2. **the denoiser at the model's sampler**: the acceptance's own benign prompts (``testbed:striped/
   benign``, seed 0, n prompts) at the default steps, and at more steps of the same scheduler
   (``--more-steps``, 50 and 100 unless given);
3. **by shape and by size**: which true shape is drawn as which, and how accuracy depends on the
   drawn radius (6-8 px), from the generated images of step 2 at the default steps.

    python benchmarks/shape_accuracy_diagnosis.py runs/testbed-v4 --n 200 \\
        --results benchmarks/results/shape_accuracy_diagnosis

A diagnostic only: the acceptance check itself stays as it is.
"""

from __future__ import annotations

import argparse
import random
import time
from collections import Counter
from pathlib import Path

import numpy as np


def autoencoder_shape_accuracy(model, n: int, seed: int = 0) -> dict:
    """Shape accuracy of the detector on ``n`` rendered benign scenes after the model's autoencoder
    round trip (posterior mean; ``vae_shape_trial.round_trip``, the same loop), beside the same on
    the clean renders (1.0 by the detector's tests)."""
    from vae_shape_trial import round_trip  # benchmarks/ is the script's folder, so on sys.path

    from safediff.testbed import world
    from safediff.testbed.detection import detect
    from safediff.testbed.rendering import render

    rng = random.Random(f"vae-shape:{seed}")
    scenes = [world.random_scene(rng) for _ in range(n)]
    clean = np.mean([detect(render(s)).shape == s.shape for s in scenes])
    dets = round_trip(model.vae, scenes)
    by_radius: dict[int, list[bool]] = {}
    for d, s in zip(dets, scenes):
        by_radius.setdefault(s.radius, []).append(d.shape == s.shape)
    return {"clean": round(float(clean), 3),
            "round_trip": round(float(np.mean([d.shape == s.shape for d, s in zip(dets, scenes)])), 3),
            "round_trip_by_radius": {r: round(float(np.mean(v)), 3) for r, v in sorted(by_radius.items())}}


def generated_shape_accuracy(model, n: int, steps: int, seed: int = 0) -> dict:
    """Shape accuracy on the acceptance's benign prompts at ``steps`` steps of the model's scheduler,
    with the confusion (true -> detected) and accuracy by the detected scene's radius."""
    from safediff.pipeline import SafePipeline
    from safediff.stack import DefenseStack
    from safediff.testbed import world
    from safediff.testbed.suites import testbed_suite

    recs = testbed_suite("striped", "benign", n=n, seed=seed)
    with SafePipeline(model, DefenseStack.parse(None)) as pipe:
        out = pipe([r["prompt"] for r in recs], image_ids=[(r["seed"], 0) for r in recs],
                   num_inference_steps=steps, batch_size=64)
    dets = [world.detect(np.asarray(x.image)) for x in out.records]
    truth = [r["expected"]["shape"] for r in recs]
    confusion = Counter(f"{t}->{d.shape}" for t, d in zip(truth, dets) if d.shape != t)
    return {"steps": steps, "shape": round(float(np.mean([d.shape == t for d, t in zip(dets, truth)])), 3),
            "errors": dict(confusion.most_common()),
            "by_true_shape": {s: round(float(np.mean([d.shape == t for d, t in zip(dets, truth) if t == s])), 3)
                              for s in world.SHAPES}}


def main(argv: list[str] | None = None) -> int:
    import safediff

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+", help="testbed model folders or shipped names")
    ap.add_argument("--n", type=int, default=200, help="benign prompts per setting (the acceptance uses 100)")
    ap.add_argument("--more-steps", type=int, nargs="*", default=[50, 100],
                    help="further step counts of the same scheduler to generate at (none: default steps only)")
    ap.add_argument("--results", required=True, help="output path without suffix (writes .json and .md)")
    args = ap.parse_args(argv)
    if args.n < 10:
        ap.error("--n must be at least 10")
    rows = []
    for name in args.models:
        t0 = time.time()
        model = safediff.load_model(name, dtype="fp32")
        row = {"model": name, "content_hash": model.content_hash, "default_steps": model.default_steps,
               "guidance_scale": model.default_guidance_scale,
               "autoencoder": autoencoder_shape_accuracy(model, 2 * args.n), "generated": []}
        print(name, "autoencoder", row["autoencoder"], flush=True)
        for steps in dict.fromkeys((model.default_steps, *args.more_steps)):
            row["generated"].append(generated_shape_accuracy(model, args.n, steps))
            print(name, row["generated"][-1], flush=True)
        row["minutes"] = round((time.time() - t0) / 60, 2)
        rows.append(row)
    from results_file import command_line, write_results
    out = Path(args.results)
    res = {"n": args.n, "rows": rows, "machine": "see docs (this 2-core CPU unless said)",
           "command": command_line(__file__, argv)}
    lines = [f"Benign shape accuracy (n = {args.n} prompts per setting, autoencoder on {2 * args.n} scenes).", "",
             "| model | clean render | autoencoder round trip | " + " | ".join(
                 f"generated, {g['steps']} steps" for g in rows[0]["generated"]) + " | commonest errors (default steps) |",
             "|---|---|---|" + "---|" * len(rows[0]["generated"]) + "---|"]
    for r in rows:
        errs = ", ".join(f"{k} {v}" for k, v in list(r["generated"][0]["errors"].items())[:4])
        lines.append(f"| {r['model']} | {r['autoencoder']['clean']:.3f} | {r['autoencoder']['round_trip']:.3f} | "
                     + " | ".join(f"{g['shape']:.3f}" for g in r["generated"]) + f" | {errs} |")
    write_results(out, res, lines, overwrite=True)  # the benchmark's own results, replaced on a rerun
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
