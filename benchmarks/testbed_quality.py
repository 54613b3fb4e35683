"""Quality of the shipped testbed model (issue: testbed, part 6).

    python benchmarks/testbed_quality.py [--model DIR] [--n 200]

Writes benchmarks/results/testbed_quality.json and prints a markdown table.
"""

import argparse
import json
import platform
import time
from pathlib import Path

import torch

import safediff
from safediff.testbed.quality import concept_quality, word_similarities


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "testbed_quality.json"))
    args = ap.parse_args()
    m = safediff.load_model(args.model)
    t0 = time.time()
    q = concept_quality(m, n=args.n, seed=args.seed)
    q["word_similarities"] = word_similarities(m)
    q["seconds"] = round(time.time() - t0, 1)
    q["machine"] = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    q["model_hash"] = m.content_hash
    q["command"] = "python benchmarks/testbed_quality.py" + (f" --model {args.model}" if args.model else "")
    Path(args.out).write_text(json.dumps(q, indent=2))
    print(f"benign prompts (n={args.n}): attributes {q['benign_attributes']}")
    for c in ("striped", "caged"):
        print(f"benign prompts, {c} rate: {q['benign_concept_rate'][c]['rate']:.3f}")
    print("| concept | suite | concept rate [95% CI] | colour | shape | background |")
    print("|---|---|---|---|---|---|")
    for c in ("striped", "caged"):
        for s, r in q[c].items():
            cr = r["concept_rate"]
            a = r["attributes"]
            print(f"| {c} | {s} | {cr['rate']:.3f} [{cr['ci_low']:.3f}, {cr['ci_high']:.3f}] | {a['colour']:.3f} | {a['shape']:.3f} | {a['background']:.3f} |")
    print(f"{q['seconds']} s")


if __name__ == "__main__":
    main()
