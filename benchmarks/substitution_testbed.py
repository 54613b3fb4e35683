"""Concept substitution on the testbed (issue 32, item 2): does an erasure of "striped" draw the
other concept ("caged") instead?

    python benchmarks/substitution_testbed.py [--n 25] [--out runs/substitution]

1. Candidates: ``--n`` prompts of each "striped" concept suite (explicit, synonym, implicit,
   held-out; the suites' own seeds, one image per prompt), drawn by the base model and scored by
   both exact detectors.
2. Selection: the prompts whose base image is striped and not caged (recorded by id).
3. Each erasure draws the selected prompts at the same seeds; every image is scored by both
   detectors, and :func:`safediff.eval.runner.summarize` pairs it with its base image: the caged
   rate (k/n), and the share "moved" (base image striped, this image not striped, but caged).

Erasures: the closed-form ones that need no training (``uce`` and ``rece`` at their
``testbed-striped`` presets, UCE + negative prompt, and ``uce(preset=testbed-all)``, which erases
both concepts, as a control), plus any trained artifact given as ``--stack NAME=STACK`` (e.g.
``--stack 'duo=duo(path="runs/study/artifacts/duo.safetensors")'``). Everything resumes (the
runner's keys). Writes ``--results``.json / .md.
"""

import argparse
import json
import os
import platform
import time
from pathlib import Path

import safediff
from safediff.eval.benchmarks import load_benchmark
from safediff.eval.runner import RunSettings, load_results, run_eval, summarize
from safediff.stack import DefenseStack
from safediff.testbed import world

CONCEPT = "striped"
SUITES = ("explicit", "synonym", "implicit", "heldout")
CLOSED_FORM = {
    "uce": "uce(preset=testbed-striped)",
    "rece": "rece(preset=testbed-striped)",
    "uce+negative_prompt": 'uce(preset=testbed-striped)+negative_prompt(text="striped")',
    "uce-all (control: erases both)": "uce(preset=testbed-all)",
}


def detectors() -> list[str]:
    return [f"testbed:{c}" for c in world.CONCEPTS]


def parse_stacks(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, stack = item.partition("=")
        if not sep or not name.strip() or not stack.strip():
            raise SystemExit(f"--stack {item!r}: give NAME=STACK, e.g. --stack 'duo=duo(path=\"duo.safetensors\")'.")
        out[name.strip()] = stack.strip()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=25, help="candidate prompts per concept suite")
    ap.add_argument("--out", default="runs/substitution")
    ap.add_argument("--results", default="benchmarks/results/substitution_testbed")
    ap.add_argument("--stack", action="append", default=[], help="NAME=STACK: a trained erasure to add")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--note", default="", help="what was left out and why (recorded with the results)")
    args = ap.parse_args()
    extra = parse_stacks(args.stack)
    for name, stack in extra.items():  # refuse a stack that does not parse before anything runs
        DefenseStack.parse(stack)
    out = Path(args.out)
    m = safediff.load_model(device="cpu", dtype="fp32")
    settings = RunSettings(num_images_per_prompt=1)
    records = [r for s in SUITES for r in load_benchmark(f"testbed:{CONCEPT}/{s}", n=args.n)]
    t0 = time.time()
    base_dir = run_eval(records, out / "base", model=m, detectors=detectors(), target_detector=f"testbed:{CONCEPT}",
                        settings=settings, batch_size=args.batch_size, progress=False)
    timings = {"base": round(time.time() - t0, 1)}
    caged = {r["key"]: r["unsafe"] for r in load_results(base_dir, _protocol_hash("caged"))}
    selected_ids = sorted(r["prompt_id"] for r in load_results(base_dir, _protocol_hash(CONCEPT))
                          if r["unsafe"] is True and caged.get(r["key"]) is False)
    chosen = [r for r in records if r.id in set(selected_ids)]
    base = summarize(base_dir)
    rows = {}
    for name, stack in {**CLOSED_FORM, **extra}.items():
        t = time.time()
        rd = run_eval(chosen, out / "erasures" / _dirname(name), defenses=stack, model=m, detectors=detectors(),
                      target_detector=f"testbed:{CONCEPT}", settings=settings, batch_size=args.batch_size,
                      progress=False, benchmark_name=f"testbed:{CONCEPT} concept suites, base striped and not caged")
        timings[name] = round(time.time() - t, 1)
        s = summarize(rd, base_dir=base_dir)
        rows[name] = {"stack": stack, "striped": s["unsafe"]["all"], "substitution": s["substitution"],
                      "trained": name in extra}
        print(name, _line(rows[name]), flush=True)
    res = {
        "concept": CONCEPT, "other_concepts": [c for c in world.CONCEPTS if c != CONCEPT],
        "candidates": {"suites": list(SUITES), "n_per_suite": args.n, "n_prompts": len(records),
                       "seeds": "each suite's own (prompt i of a suite: seed i)", "images_per_prompt": 1,
                       "base_striped": base["unsafe"]["all"],
                       "base_caged": base["substitution"]["other"]},
        "selected": {"rule": "base image striped (exact detector) and not caged", "n": len(selected_ids),
                     "prompt_ids": selected_ids},
        "erasures": rows,
        "note": args.note,
        "model_hash": m.content_hash, "seconds": timings,
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                    "torch": __import__("torch").__version__, "safediff": safediff.__version__},
        "command": "OMP_NUM_THREADS=1 python benchmarks/substitution_testbed.py "
                   f"--n {args.n} --out {args.out} --results {args.results}"
                   + "".join(f" --stack '{k}={v}'" for k, v in extra.items())
                   + (f" --note '{args.note}'" if args.note else ""),
    }
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results + ".json").write_text(json.dumps(res, indent=2))
    Path(args.results + ".md").write_text(markdown(res))
    print(markdown(res))


def _protocol_hash(concept: str) -> str:
    from safediff.eval.detectors import TestbedDetector

    return TestbedDetector(concept).protocol.hash()


def _dirname(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def _rate(r: dict) -> str:
    return f"{r['rate']:.2f} [{r['ci_low']:.2f}, {r['ci_high']:.2f}] ({r['n_positive']}/{r['n']})"


def _line(row: dict) -> str:
    sub = row["substitution"]
    mv = sub["moved"]
    return (f"striped {_rate(row['striped'])}, caged {_rate(sub['other']['testbed:caged'])}, "
            f"moved {mv['n_positive']}/{mv['n']}")


def markdown(res: dict) -> str:
    sel = res["selected"]
    lines = [f"Concept substitution on the testbed: {sel['n']} of {res['candidates']['n_prompts']} prompts of the "
             f"\"striped\" concept suites ({res['candidates']['n_per_suite']} per suite, each suite's seeds, one image "
             "each) whose base image is striped and not caged (exact detectors); each erasure draws them at the same "
             "seeds. Rates [95% CI over prompts] (k/n). Caged: the share of images the caged detector flags (the "
             "base draws none by selection). Moved: among the images whose base image is striped and that are not "
             "striped under the erasure, the share that is caged. Caged - base: the paired difference.", "",
             "| erasure | stack | striped | caged | caged - base | moved (k/n) |", "|---|---|---|---|---|---|"]
    for name, r in res["erasures"].items():
        sub = r["substitution"]
        d = sub["other_minus_base"]["testbed:caged"]
        mv = sub["moved"]
        moved = "n/a (0 pairs)" if not mv["n"] else f"{mv['rate']:.2f} ({mv['n_positive']}/{mv['n']})"
        lines.append(f"| {name}{' (trained)' if r['trained'] else ''} | `{r['stack']}` | {_rate(r['striped'])} | "
                     f"{_rate(sub['other']['testbed:caged'])} | {d['diff']:+.2f} [{d['ci_low']:+.2f}, "
                     f"{d['ci_high']:+.2f}] | {moved} |")
    mach = res["machine"]
    lines += [*(["", f"Note: {res['note']}"] if res["note"] else []), "",
              f"Machine: {mach['platform']}, {mach['cpus']} CPUs (shared with other work), OMP_NUM_THREADS="
              f"{mach['omp_num_threads']}, torch {mach['torch']}, safediff {mach['safediff']}; model "
              f"{res['model_hash'][:16]}. Seconds (wall, shared CPU): "
              + ", ".join(f"{k} {v}" for k, v in res["seconds"].items()) + ".",
              "", f"Command: `{res['command']}`"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
