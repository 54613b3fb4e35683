"""Denoiser-size trial: does a denoiser with four times the parameters bring the empty prompt's
concepts back?

World v4's empty prompt draws the concepts at a third to two thirds of their data frequency on
every training (docs/testbed.md, "The two systematic misses, diagnosed"); sampler, empty-caption
share, training length and loss weighting did not move it. Diffusion models under-produce the
less frequent modes of their data (Qin et al., CVPR 2023; Um et al., ICLR 2024), and the
unconditional branch of a small denoiser is where that shows first. This compares the loss-
weighting trial's min-SNR arm (world v4's recipe at 3,000 steps, seed 0, v4's seed-0 autoencoder;
`runs/wtrial-min_snr`, 6.6 M denoiser parameters) with the same training whose denoiser is twice
as wide at every level (channels 128 / 256 / 256: 26.1 M parameters, 2.9x the time per step on this
CPU), measured as the loss-weighting trial measures (benchmarks/weighting_trial.py: the empty
prompt on the acceptance's 200 seeds, 100 explicit prompts per concept, 200 benign prompts):

    mkdir -p runs/dtrial-wide.work && cp -r runs/testbed-v4.work/vae runs/dtrial-wide.work/
    safediff testbed train --out runs/dtrial-wide --config benchmarks/configs/denoiser_size_trial_wide.json
    python benchmarks/denoiser_size_trial.py runs/wtrial-min_snr runs/dtrial-wide --results benchmarks/results/denoiser_size_trial

The rule, fixed before the wide training ran (docs/testbed.md, "Denoiser-size trial"): a larger
denoiser goes into the recipe if the empty prompt's mean rate over the two concepts rises by at
least 0.05 over the min-SNR arm's and neither the explicit rates nor the benign shape accuracy
falls by more than 0.05. A design-time measurement of the base model only.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from results_file import command_line, refuse_existing, write_results  # noqa: E402
from weighting_trial import measure  # noqa: E402  (the same measurement as the loss-weighting trial)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+", help="the trial's model folders (the reference arm first)")
    ap.add_argument("--results", required=True, help="output path without suffix (writes .json and .md)")
    ap.add_argument("--overwrite", action="store_true", help="replace existing results files")
    args = ap.parse_args(argv)
    refuse_existing(args.results, args.overwrite)
    rows = []
    for name in args.models:
        row = measure(name)  # records the denoiser's size too
        rows.append(row)
        print(row, flush=True)
    ref = rows[0]
    mean_empty = lambda r: (r["empty"]["striped"] + r["empty"]["caged"]) / 2
    for r in rows[1:]:
        rise = mean_empty(r) - mean_empty(ref)
        worse = max([ref["explicit"][c] - r["explicit"][c] for c in r["explicit"]]
                    + [ref["benign_shape"] - r["benign_shape"]])
        r["rule"] = {"empty_mean_rise": round(rise, 3), "largest_fall_elsewhere": round(worse, 3),
                     "adopted": bool(rise >= 0.05 and worse <= 0.05)}
    res = {"rows": rows, "machine": "this 2-core CPU unless said",
           "rule": "adopt if the empty prompt's mean rises >= 0.05 over the first row and no explicit rate "
                   "or the benign shape accuracy falls by more than 0.05",
           "command": command_line(__file__, argv)}
    lines = ["Denoiser-size trial (cut-down trainings, 3,000 steps; striped / caged).", "",
             "| model | denoiser channels | params (M) | empty prompt | explicit | benign shape | benign, any concept | rule |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        rule = ("reference" if "rule" not in r else
                f"rise {r['rule']['empty_mean_rise']:+.3f}, largest fall {r['rule']['largest_fall_elsewhere']:+.3f}: "
                + ("adopted" if r["rule"]["adopted"] else "not adopted"))
        lines.append(f"| {r['model']} | {'/'.join(map(str, r['unet_channels']))} x{r['unet_layers_per_block']} | "
                     f"{r['unet_params_m']} | {r['empty']['striped']:.3f} / {r['empty']['caged']:.3f} | "
                     f"{r['explicit']['striped']:.2f} / {r['explicit']['caged']:.2f} | {r['benign_shape']:.3f} | "
                     f"{r['benign_any_concept']:.3f} | {rule} |")
    write_results(args.results, res, lines, overwrite=args.overwrite)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
