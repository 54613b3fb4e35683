"""Loss-weighting trial: does the plain v loss bring the empty prompt's concepts back?

World v4's empty prompt draws the concepts at a third to two thirds of their data frequency on
every training, at every sampler tried (docs/testbed.md, "The two systematic misses, diagnosed").
The testbed recipe weights the v loss by min-SNR-5, which puts little weight on the high-noise
steps where an unconditional sample settles whether it holds a concept at all; Stable Diffusion
2.x's v-prediction models were trained on the plain v loss. This compares two cut-down trainings
that differ only in that weighting (world v4's recipe at 3,000 steps, seed 0, the v4 seed-0
autoencoder copied into both work folders so that the stage is shared, the curve at 4.0 only and
no acceptance), on the empty prompt (the acceptance's 200 seeds), the explicit prompts (100 per
concept) and the benign prompts (200: shape accuracy and unrequested concepts):

    for a in min_snr plain_v; do mkdir -p runs/wtrial-$a.work && cp -r runs/testbed-v4.work/vae runs/wtrial-$a.work/
      OMP_NUM_THREADS=1 safediff testbed train --out runs/wtrial-$a --config benchmarks/configs/weighting_trial_$a.json & done
    python benchmarks/weighting_trial.py runs/wtrial-min_snr runs/wtrial-plain_v --results benchmarks/results/weighting_trial

A design-time measurement of the base model only; no defense or attack is involved.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np


def measure(name: str) -> dict:
    import safediff
    from safediff.pipeline import SafePipeline
    from safediff.stack import DefenseStack
    from safediff.testbed import world
    from safediff.testbed.suites import testbed_suite

    model = safediff.load_model(name, dtype="fp32")
    row: dict = {"model": name, "content_hash": model.content_hash,
                 "min_snr_gamma": model.meta.get("train_config", {}).get("min_snr_gamma"),
                 "steps": model.meta.get("train_config", {}).get("steps"),
                 "unet_channels": list(model.unet.config.block_out_channels),
                 "unet_layers_per_block": model.unet.config.layers_per_block,
                 "unet_params_m": round(sum(p.numel() for p in model.unet.parameters()) / 1e6, 2)}

    def detect(pipe, prompts, ids):
        out = pipe(prompts, image_ids=ids, batch_size=64, allow_empty=True, progress=False)
        return [world.detect(np.asarray(r.image)) for r in out.records]

    t0 = time.time()
    with SafePipeline(model, DefenseStack.parse(None)) as pipe:
        dets = detect(pipe, [""] * 200, [(10_000 + i, 0) for i in range(200)])
        row["empty"] = {c: round(float(np.mean([c in d.concepts for d in dets])), 3) for c in world.CONCEPTS}
        row["explicit"] = {}
        for c in world.CONCEPTS:
            recs = testbed_suite(c, "explicit", n=100, seed=0)
            dets = detect(pipe, [r["prompt"] for r in recs], [(r["seed"], 0) for r in recs])
            row["explicit"][c] = round(float(np.mean([c in d.concepts for d in dets])), 3)
        recs = testbed_suite("striped", "benign", n=200, seed=0)
        dets = detect(pipe, [r["prompt"] for r in recs], [(r["seed"], 0) for r in recs])
        row["benign_shape"] = round(float(np.mean([d.shape == r["expected"]["shape"] for d, r in zip(dets, recs)])), 3)
        row["benign_any_concept"] = round(float(np.mean([bool(d.concepts) for d in dets])), 3)
    row["minutes"] = round((time.time() - t0) / 60, 2)
    return row


def main(argv: list[str] | None = None) -> int:
    from results_file import command_line, write_results

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+", help="the trial's model folders")
    ap.add_argument("--results", required=True, help="output path without suffix (writes .json and .md)")
    args = ap.parse_args(argv)
    rows = []
    for name in args.models:
        rows.append(measure(name))
        print(rows[-1], flush=True)
    out = Path(args.results)
    res = {"rows": rows, "machine": "this 2-core CPU unless said",
           "command": command_line(__file__, argv)}
    lines = ["Loss-weighting trial (cut-down trainings; striped / caged).", "",
             "| model | min_snr_gamma | steps | empty prompt | explicit | benign shape | benign, any concept |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['min_snr_gamma']} | {r['steps']} | {r['empty']['striped']:.3f} / "
                     f"{r['empty']['caged']:.3f} | {r['explicit']['striped']:.2f} / {r['explicit']['caged']:.2f} | "
                     f"{r['benign_shape']:.3f} | {r['benign_any_concept']:.3f} |")
    write_results(out, res, lines, overwrite=True)  # the benchmark's own results, replaced on a rerun
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
