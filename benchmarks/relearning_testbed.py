"""Fine-tune relearning against every erasing stack on the testbed (attacks issue, part 2/4).

    python benchmarks/relearning_testbed.py [--n 32] [--checkpoints 5,10,20,50,100,200]

For each target whose concept rate is low without attack (the unlearning methods, the Embedding
Sanitizer, the prompt guard, the output filter and the composition study's best stack, from ``attacks_testbed.py``'s
target list, artifacts reused from ``--study``), the UNet under the stack's edits is fine-tuned
on ``--images`` images with the plain denoising loss (``RelearnConfig`` defaults: lr 1e-4, batch 4,
every UNet parameter, text-encoder conditioning) and the concept rate of the whole stack plus the
fine-tuned change is measured after each checkpoint on ``--n`` explicit and ``--n`` benign
testbed prompts. ``data=concept``: images of the concept (relearning); ``data=benign``: images
without it (resurgence). The base model with benign data is the control (does fine-tuning alone
put the concept on benign prompts?). Resumes (results keyed by input hash, evaluation by the
runner).

Writes benchmarks/results/relearning_testbed.{json,md}.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import safediff  # noqa: E402
from attacks_testbed import CONCEPT, targets  # noqa: E402
from safediff.attacks.relearning import RelearnConfig, evaluate_relearning, relearn  # noqa: E402
from safediff.eval.study import StudyConfig, prepare_artifacts  # noqa: E402

ERASING = ("esd", "advunlearn", "uce", "rece", "duo", "dark_miner", "sanitizer", "prompt_guard", "output_filter")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--checkpoints", default="5,10,20,50,100,200")
    ap.add_argument("--study", default="runs/study")
    ap.add_argument("--out", default="runs/relearn")
    ap.add_argument("--data", nargs="*", default=["concept", "benign"])
    ap.add_argument("--only", nargs="*", help="target names to run (default: all)")
    ap.add_argument("--adaptive", nargs="*", default=["sanitizer", "prompt_guard", "best"],
                    help="targets also attacked with conditioning=stack (fine-tuning on the stack's own "
                         "embedding stage; names match by prefix)")
    args = ap.parse_args()
    m = safediff.load_model()
    arts, _ = prepare_artifacts(m, StudyConfig(concept=CONCEPT), Path(args.study))
    all_t = targets(Path(args.study), arts)
    chosen = {k: v for k, v in all_t.items() if k in ERASING or k.startswith("best")}
    ck = tuple(int(c) for c in args.checkpoints.split(","))
    out_json = Path("benchmarks/results/relearning_testbed.json")
    table = json.loads(out_json.read_text())["runs"] if out_json.exists() else {}
    jobs = [("base", None, "benign", "plain")] + [(k, v, d, "plain") for d in args.data for k, v in chosen.items()]
    jobs += [(k, v, "concept", "stack") for k, v in chosen.items() if any(k.startswith(a) for a in args.adaptive)]
    for tname, stack, data, cond in jobs:
        if data not in args.data or (args.only and tname not in args.only):
            continue
        cfg = RelearnConfig(checkpoints=ck, data=data, num_images=args.images, conditioning=cond)
        res = relearn(m, stack or "", CONCEPT, args.out, cfg, progress=False)
        ev = evaluate_relearning(res, m, Path(res.directory) / "eval", n=args.n, progress=False)
        key = f"{tname}|{data}" + ("|adaptive" if cond == "stack" else "")
        table[key] = {"target": tname, "data": data, "conditioning": cond, "stack": stack or "none", **ev}
        print(tname, data, cond, {s: round(r["explicit"]["rate"], 2) for s, r in ev["curve"].items()}, flush=True)
        write(table, args)


def write(table: dict, args) -> None:
    out = {"concept": CONCEPT, "n_prompts_per_suite": args.n, "num_images": args.images, "runs": table,
           "machine": "2-core CPU (this project's CI machine kind)",
           "command": f"python benchmarks/relearning_testbed.py --n {args.n} --images {args.images} "
                      f"--checkpoints {args.checkpoints} --out {args.out} --data {' '.join(args.data)}"
                      + (" --only " + " ".join(f"'{t}'" for t in args.only) if args.only else "")}
    Path("benchmarks/results/relearning_testbed.json").write_text(json.dumps(out, indent=2, default=str))
    steps = sorted({int(s) for r in table.values() for s in r["curve"]})
    lines = ["Concept rate on explicit prompts [95% CI] / on benign prompts, after fine-tuning steps:", "",
             "| target | data | " + " | ".join(f"step {s}" for s in steps) + " | train s |",
             "|---|---|" + "---|" * (len(steps) + 1)]
    for r in table.values():
        cells = []
        for s in steps:
            c = r["curve"].get(s) or r["curve"].get(str(s))
            cells.append("" if c is None else f"{c['explicit']['rate']:.2f} [{c['explicit']['ci_low']:.2f}, "
                         f"{c['explicit']['ci_high']:.2f}] / {c['benign']['rate']:.2f}")
        secs = r["train_seconds"]
        last = secs.get(max(secs, key=int)) if secs else None
        data = r["data"] + (" (adaptive: stack conditioning)" if r.get("conditioning") == "stack" else "")
        lines.append(f"| {r['target']} | {data} | " + " | ".join(cells) + f" | {last} |")
    Path("benchmarks/results/relearning_testbed.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
