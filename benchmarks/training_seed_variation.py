"""How much do the testbed world's acceptance checks move from one training to the next?

docs/testbed.md, "Training-seed variation of the v4 recipe": the same recipe trained at several
seeds (``safediff testbed train ... --set seed=S``); this script reads each model's recorded
acceptance (v2's table and, for world >= 3, v3's), and for every check reports the per-seed values,
their mean, range and between-training standard deviation (beside the binomial sampling standard
deviation of one measurement, where the check is a single proportion), and judges the recipe by the
rule written before those trainings: **every check's mean over the seeds meets its target**
(targets unchanged; ratio and two-number checks on the mean of the per-seed numbers). A check whose
between-training SD exceeds the mean's distance to its target is flagged as one the design cannot
control at this model size (reported only).

    python benchmarks/training_seed_variation.py runs/testbed-v4 runs/testbed-v4-s1 runs/testbed-v4-s2 \\
        --out benchmarks/results/testbed_v4_seed_variation

Writes ``OUT.json`` (every seed's checks, training minutes, weights hash; the per-check summary)
and ``OUT.md`` (the table). Reads only ``safediff.json`` and the weights' hash: nothing is sampled.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from pathlib import Path

_NUM = re.compile(r"-?\d+(?:\.\d+)?")


def numbers(measured) -> list[float]:
    """The numbers of a recorded ``measured`` value: a float, or the figures in strings such as
    ``"0.085 vs 0.236"``, ``"0.315 -> 0.000 (100%)"``, ``"0.674 to 0.947"``, ``"max 0.488 vs min 0.674"``.
    For the negative-prompt check the relative drop ``(before - after) / before`` is returned
    (the quantity its target reads) instead of the three printed figures."""
    if isinstance(measured, (int, float)):
        return [float(measured)]
    s = str(measured)
    if "->" in s:
        before, after = (float(x) for x in _NUM.findall(s)[:2])
        return [(before - after) / before if before > 0 else 0.0]
    return [float(x) for x in _NUM.findall(s)]


def passes(target: str, vals: list[float]) -> bool:
    """The recorded target string applied to the check's numbers (as :func:`numbers` reads them).
    Raises ``ValueError`` for a target this script does not know, rather than guess."""
    t = target.strip()
    if m := re.fullmatch(r">= (\S+)", t):
        return vals[0] >= float(m.group(1))
    if m := re.fullmatch(r"<= (\S+)", t):
        return vals[0] <= float(m.group(1))
    if m := re.fullmatch(r"(\d+(?:\.\d+)?)(?: to |-)(\d+(?:\.\d+)?)", t):
        lo, hi = float(m.group(1)), float(m.group(2))
        return all(lo <= v <= hi for v in vals)
    if m := re.fullmatch(r"within (\S+)", t):
        return abs(vals[0] - vals[1]) <= float(m.group(1))
    if t == ">= 30% relative":
        return vals[0] >= 0.3
    if t in ("below every synonym and trigger",):
        return vals[0] < vals[1]
    if t == "4 >= 2":
        return vals[0] >= vals[1]
    raise ValueError(f"unknown target {target!r}: add its rule to `passes`")


def distance(target: str, vals: list[float]) -> float:
    """How far the numbers lie from the target's edge (positive inside, negative outside), in the
    units of the check's first number; used only for the 'cannot control' flag."""
    t = target.strip()
    if m := re.fullmatch(r">= (\S+)", t):
        return vals[0] - float(m.group(1))
    if m := re.fullmatch(r"<= (\S+)", t):
        return float(m.group(1)) - vals[0]
    if m := re.fullmatch(r"(\d+(?:\.\d+)?)(?: to |-)(\d+(?:\.\d+)?)", t):
        lo, hi = float(m.group(1)), float(m.group(2))
        return min(min(v - lo, hi - v) for v in vals)
    if m := re.fullmatch(r"within (\S+)", t):
        return float(m.group(1)) - abs(vals[0] - vals[1])
    if t == ">= 30% relative":
        return vals[0] - 0.3
    return vals[1] - vals[0] if t == "below every synonym and trigger" else vals[0] - vals[1]


def sampling_sd(table: str, name: str, value: float, n: int) -> float | None:
    """Binomial SD of one measurement, for the checks that are one proportion of a known number of
    images (``world_acceptance``: n prompts per suite, the empty prompt 2 n; v3's suites n each);
    None for ratios, means over words and cosines."""
    if table == "v2":
        if name.startswith("benign ") or name.endswith(": benign rate") or name.endswith(": explicit rate"):
            size = n
        elif name.endswith("empty prompt vs data frequency"):
            size = 2 * n
        else:
            return None
    else:
        if not any(name.endswith(s) for s in ("other concept", "obfuscated rate", "near-concept piles",
                                               "one near-concept word")):
            return None
        size = n
    return math.sqrt(max(value * (1 - value), 0.0) / size)


def read_model(path: Path) -> dict:
    meta = json.loads((path / "safediff.json").read_text())
    tc = meta.get("train_config", {})
    rec = {"model": str(path), "seed": tc.get("seed"), "world_version": tc.get("world_version"),
           "train_minutes": meta.get("train_minutes"), "default_guidance_scale": meta.get("default_guidance_scale"),
           "default_guidance_scale_source": meta.get("default_guidance_scale_source"),
           "recipe": tc, "tables": {}}
    if "acceptance" in meta:
        rec["tables"]["v2"] = {"n": meta["acceptance"]["n"], "checks": meta["acceptance"]["checks"]}
    if "acceptance_v3" in meta:
        rec["tables"]["v3"] = {"n": meta["acceptance_v3"]["n"], "checks": meta["acceptance_v3"]["checks"]}
    try:
        from safediff.models import model_content_hash
        rec["weights_content_hash"] = model_content_hash(path)
    except Exception as e:  # the hash is a record, not a requirement
        rec["weights_content_hash"] = f"unavailable ({type(e).__name__})"
    return rec


def summarize(models: list[dict]) -> dict:
    """Per check: the per-seed numbers and passes, the mean-rule verdict, SDs and the flag."""
    recipes = {json.dumps({k: v for k, v in m.get("recipe", {}).items() if k not in ("seed", "max_minutes")},
                          sort_keys=True) for m in models}
    if len(recipes) > 1:
        raise ValueError("the models were trained with different recipes (beyond seed and max_minutes): "
                         "a seed-variation table needs one recipe")
    rows = []
    for table in ("v2", "v3"):
        have = [m for m in models if table in m["tables"]]
        if not have:
            continue
        if len(have) != len(models):
            raise ValueError(f"acceptance table {table} is recorded for {len(have)} of {len(models)} models")
        for name, first in have[0]["tables"][table]["checks"].items():
            target = first["target"]
            per_seed, seed_pass = [], []
            for m in have:
                chk = m["tables"][table]["checks"][name]
                vals = numbers(chk["measured"])
                if passes(target, vals) != bool(chk["passed"]):
                    raise ValueError(f"{m['model']}: {name!r}: the recorded verdict {chk['passed']} is not what "
                                     f"the target {target!r} gives for {chk['measured']!r}; fix `numbers`/`passes`")
                per_seed.append(vals)
                seed_pass.append(bool(chk["passed"]))
            width = len(per_seed[0])
            means = [statistics.fmean(v[i] for v in per_seed) for i in range(width)]
            sds = [statistics.stdev(v[i] for v in per_seed) if len(per_seed) > 1 else float("nan") for i in range(width)]
            ok = passes(target, means)
            dist = distance(target, means)
            n = have[0]["tables"][table]["n"]
            samp = sampling_sd(table, name, means[0], n)
            rows.append({"table": table, "check": name, "target": target,
                         "per_seed": [m["tables"][table]["checks"][name]["measured"] for m in have],
                         "per_seed_passed": seed_pass, "mean": [round(x, 4) for x in means],
                         "between_training_sd": [round(x, 4) for x in sds],
                         "sampling_sd": None if samp is None else round(samp, 4),
                         "mean_passes": ok, "mean_distance_to_target": round(dist, 4),
                         "cannot_control": bool(len(per_seed) > 1 and max(sds) > abs(dist))})
    return {"seeds": [m["seed"] for m in models], "checks": rows,
            "misses_per_seed": {str(m["seed"]): sum(not r["per_seed_passed"][i] for r in rows)
                                for i, m in enumerate(models)},
            "mean_rule_misses": [r["check"] for r in rows if not r["mean_passes"]],
            "recipe_meets_acceptance": all(r["mean_passes"] for r in rows)}


def render(summary: dict, models: list[dict]) -> str:
    seeds = summary["seeds"]
    out = [f"Training seeds {seeds}; the recipe is judged on each check's mean over the seeds "
           "(docs/testbed.md, \"Training-seed variation of the v4 recipe\").", "",
           "| table | check | target | " + " | ".join(f"seed {s}" for s in seeds)
           + " | mean | SD between trainings | sampling SD | mean meets | flag |",
           "|---|---|---|" + "---|" * len(seeds) + "---|---|---|---|---|"]
    for r in summary["checks"]:
        cells = [f"{v}" + ("" if p else " **(miss)**") for v, p in zip(r["per_seed"], r["per_seed_passed"])]
        mean = " / ".join(f"{x:.3f}" for x in r["mean"])
        sd = " / ".join(f"{x:.3f}" for x in r["between_training_sd"])
        samp = "" if r["sampling_sd"] is None else f"{r['sampling_sd']:.3f}"
        out.append(f"| {r['table']} | {r['check']} | {r['target']} | " + " | ".join(cells)
                   + f" | {mean} | {sd} | {samp} | {'yes' if r['mean_passes'] else '**no**'} | "
                   + ("cannot control" if r["cannot_control"] else "") + " |")
    out += ["", "Misses per seed: " + ", ".join(f"seed {k}: {v}" for k, v in summary["misses_per_seed"].items()) + ".",
            "Checks the mean misses: " + (", ".join(summary["mean_rule_misses"]) or "none") + ".",
            f"Recipe meets its acceptance by the mean rule: {'yes' if summary['recipe_meets_acceptance'] else 'no'}.", "",
            "| seed | training minutes | default scale | weights hash |", "|---|---|---|---|"]
    out += [f"| {m['seed']} | {m['train_minutes']} | {m['default_guidance_scale']} | {str(m['weights_content_hash'])[:12]} |"
            for m in models]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+", help="model folders of one recipe at different seeds")
    ap.add_argument("--out", required=True, help="output path without suffix (writes OUT.json and OUT.md)")
    args = ap.parse_args(argv)
    paths = [Path(p) for p in args.models]
    missing = [str(p) for p in paths if not (p / "safediff.json").exists()]
    if missing:
        ap.error(f"no safediff.json in {missing}: give trained testbed model folders")
    models = [read_model(p) for p in paths]
    summary = summarize(models)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from safediff.fileio import atomic_write_json, atomic_write_text
    atomic_write_json(out.with_suffix(".json"), {"models": models, **summary,
                                                 "command": "python benchmarks/training_seed_variation.py "
                                                            + " ".join(sys.argv[1:] if argv is None else argv)},
                      overwrite=True)
    atomic_write_text(out.with_suffix(".md"), render(summary, models), overwrite=True)
    print(render(summary, models))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
