"""AdvUnlearn against its no-attack twin (and ESD) under attack on the testbed (issue 33, item 1).

    OMP_NUM_THREADS=1 python benchmarks/advunlearn_testbed.py [--n 8] [--esd] [--out runs/advunlearn_testbed]

Targets, all trained here with seed ``--seed`` on ``safediff.load_model()``, concept "striped":
(a) AdvUnlearn at the ``testbed`` preset; (b) the same config with ``warmup = iterations`` (the inner
attack never runs: plain ESD-objective text-encoder training with the same retain regulariser, the
same draws); (c) with ``--esd``, ESD trained with the composition study's config
(``safediff.eval.study.train_configs``). Per target: the concept rate on the explicit, synonym and
held-out suites (``--suite-n`` prompts each) and the benign attribute accuracy (``--benign-n``), by
the runner's pinned protocol (exact testbed detector); then UnlearnDiffAtk (``--uda-steps``,
``--uda-check-every``) and the random-prefix floor (``--rp-steps``) on ``--n`` seed prompts
(``seed_prompts_for``), counted by the strict and the paper's rule
(``safediff.attacks.base.evaluate_attack_rules``), with Wilson 95% intervals. Nothing is tuned: the
budgets are the presets'. Resumes (artifacts, attack prompts and evaluations are cached under --out).

Writes ``--results``.json / .md (default benchmarks/results/advunlearn_testbed).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import safediff
from safediff.attacks import AttackBudget, AttackTarget, run_attack, seed_prompts_for
from safediff.attacks.base import evaluate_attack_rules
from safediff.attacks.random_prefix import RandomPrefix, RandomPrefixConfig
from safediff.attacks.unlearndiffatk import UnlearnDiffAtk, UnlearnDiffAtkConfig
from safediff.eval.benchmarks import load_benchmark
from safediff.eval.runner import RunSettings, run_eval, summarize
from safediff.stats import wilson_interval

CONCEPT = "striped"
SUITES = ("explicit", "synonym", "heldout")


def wilson(k: int, n: int) -> dict:
    lo, hi = wilson_interval(k, n)
    return {"k": k, "n": n, "rate": k / n if n else None, "ci_low": lo, "ci_high": hi}


def train_targets(m, out: Path, seed: int, with_esd: bool) -> tuple[dict[str, str], dict[str, float]]:
    """Delta paths of (a), (b) and optionally (c), trained once (reused after); seconds per training."""
    from safediff.eval.study import StudyConfig, train_configs
    from safediff.unlearning import advunlearn
    from safediff.unlearning.esd import train_esd

    cfg = advunlearn.AdvUnlearnTrainConfig.preset("testbed", advunlearn.testbed_prompts(CONCEPT), seed=seed)
    configs = {"advunlearn": cfg, "advunlearn_no_attack": dataclasses.replace(cfg, warmup=cfg.iterations)}
    paths = {}
    (out / "artifacts").mkdir(parents=True, exist_ok=True)
    times = out / "artifacts" / "train_seconds.json"  # the seconds of the run that trained each artifact
    secs: dict[str, float] = json.loads(times.read_text()) if times.exists() else {}
    for name, c in configs.items():
        p = out / "artifacts" / f"{name}.safetensors"
        t = time.time()
        if not p.exists():
            advunlearn.train_advunlearn(m, p, c, progress=False)
            secs[name] = round(time.time() - t, 1)
            times.write_text(json.dumps(secs))
        paths[name] = f'delta(path="{p}")'
        print(f"{name}: trained in {secs.get(name, 'unrecorded')} s", flush=True)
    if with_esd:
        p = out / "artifacts" / "esd.safetensors"
        t = time.time()
        if not p.exists():
            train_esd(m, p, train_configs(StudyConfig(concept=CONCEPT, seed=seed))["esd"], progress=False)
            secs["esd"] = round(time.time() - t, 1)
            times.write_text(json.dumps(secs))
        paths["esd"] = f'esd(path="{p}")'
        print(f"esd: trained in {secs.get('esd', 'unrecorded')} s", flush=True)
    return paths, secs


def suites(m, stack: str, rd: Path, suite_n: int, benign_n: int) -> dict:
    """Concept rates on the explicit / synonym / held-out suites and benign attribute accuracy."""
    res = {}
    for suite in (*SUITES, "benign"):
        d = rd / suite
        run_eval(load_benchmark(f"testbed:{CONCEPT}/{suite}", n=benign_n if suite == "benign" else suite_n), d,
                 defenses=stack, model=m, detectors=[f"testbed:{CONCEPT}"], settings=RunSettings(), progress=False)
        s = summarize(d)["suites"][suite]
        u = s["unsafe"]
        res[suite] = {"unsafe": wilson(int(u["n_positive"]), int(u["n"]))}
        if suite == "benign":
            res[suite]["accuracy_all"] = s["attributes"]["all"]
    return res


def rules(res, m, stack, rd: Path) -> dict:
    r = evaluate_attack_rules(res, m, stack, rd, progress=False)
    out = {"paper_rule": r["paper_rule"]}
    for k in ("strict", "paper"):
        n = int(r[k]["n"])
        out[k] = wilson(round(r[k]["rate"] * n) if n else 0, n)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=8, help="seed prompts attacked")
    ap.add_argument("--seed", type=int, default=0, help="training seed of every target")
    ap.add_argument("--esd", action="store_true", help="also train and measure ESD (the study's config)")
    ap.add_argument("--uda-steps", type=int, default=40)
    ap.add_argument("--uda-check-every", type=int, default=20)
    ap.add_argument("--rp-steps", type=int, default=2)
    ap.add_argument("--suite-n", type=int, default=50, help="prompts per concept suite")
    ap.add_argument("--benign-n", type=int, default=100, help="benign suite prompts")
    ap.add_argument("--out", default="runs/advunlearn_testbed")
    ap.add_argument("--results", default="benchmarks/results/advunlearn_testbed")
    ap.add_argument("--machine", default="2-core shared CPU (a niced training job on the other core), OMP_NUM_THREADS=1")
    args = ap.parse_args()
    if args.n < 1 or args.uda_steps < 1 or args.rp_steps < 1 or args.suite_n < 1 or args.benign_n < 1:
        raise SystemExit("--n, --uda-steps, --rp-steps, --suite-n and --benign-n must be >= 1.")
    t0 = time.time()
    out = Path(args.out)
    m = safediff.load_model()
    seeds = seed_prompts_for(CONCEPT, args.n)
    stacks, train_secs = train_targets(m, out, args.seed, args.esd)
    uda = UnlearnDiffAtk(UnlearnDiffAtkConfig(check_every=args.uda_check_every))
    rp = run_attack(RandomPrefix(RandomPrefixConfig()), AttackTarget(m, None), CONCEPT, seeds,
                    AttackBudget(steps=args.rp_steps), out / "prompts")
    res = {"concept": CONCEPT, "model_hash": m.content_hash, "n_seed_prompts": len(seeds), "seed": args.seed,
           "machine": args.machine,
           "budgets": {"unlearndiffatk": {"steps": args.uda_steps, "check_every": args.uda_check_every},
                       "random_prefix": {"steps": args.rp_steps}, "suite_n": args.suite_n, "benign_n": args.benign_n},
           "command": f"OMP_NUM_THREADS=1 python benchmarks/advunlearn_testbed.py --n {args.n} --seed {args.seed}"
                      f"{' --esd' if args.esd else ''} --uda-steps {args.uda_steps} --uda-check-every "
                      f"{args.uda_check_every} --rp-steps {args.rp_steps} --suite-n {args.suite_n} --benign-n "
                      f"{args.benign_n} --out {args.out} --results {args.results}",
           "train_seconds": train_secs, "targets": {}}
    for tname, stack in {"base": None, **stacks}.items():
        t = time.time()
        row = {"stack": stack or "none", "suites": suites(m, stack, out / "eval" / tname, args.suite_n, args.benign_n)}
        ta = time.time()
        u = run_attack(uda, AttackTarget(m, stack), CONCEPT, seeds, AttackBudget(steps=args.uda_steps), out / "prompts")
        row["unlearndiffatk"] = rules(u, m, stack, out / "eval" / tname / f"uda-n{len(seeds)}")
        row["unlearndiffatk"]["wall_seconds"] = round(time.time() - ta, 1)
        row["random_prefix"] = rules(rp, m, stack, out / "eval" / tname / f"rp-n{len(seeds)}")
        row["wall_seconds"] = round(time.time() - t, 1)
        res["targets"][tname] = row
        print(tname, json.dumps({k: row[k]["strict"]["rate"] for k in ("unlearndiffatk", "random_prefix")}),
              f"{row['wall_seconds']} s", flush=True)
        res["total_seconds"] = round(time.time() - t0, 1)
        write(res, args.results)


def _c(w: dict) -> str:
    return "" if not w or not w["n"] else f"{w['rate']:.2f} ({w['k']}/{w['n']}) [{w['ci_low']:.2f}, {w['ci_high']:.2f}]"


def write(res: dict, results: str) -> None:
    Path(results).parent.mkdir(parents=True, exist_ok=True)
    Path(results + ".json").write_text(json.dumps(res, indent=2, default=str))
    b = res["budgets"]
    lines = [f"# AdvUnlearn vs its no-attack twin on the testbed (concept {res['concept']})", "",
             f"Command: `{res['command']}`", "",
             f"Machine: {res['machine']}. Model hash {res['model_hash']}. n = {res['n_seed_prompts']} seed prompts; "
             f"UnlearnDiffAtk {b['unlearndiffatk']['steps']} steps, check_every {b['unlearndiffatk']['check_every']}; "
             f"random prefix {b['random_prefix']['steps']} steps; suites {b['suite_n']} prompts, benign "
             f"{b['benign_n']}. Training seconds: {res['train_seconds']}; total {res.get('total_seconds')} s.", "",
             "Rates k/n with Wilson 95% intervals.", "",
             "| target | explicit | synonym | held-out | benign acc | UDA strict | UDA paper | random strict | random paper |",
             "|---|---|---|---|---|---|---|---|---|"]
    for t, r in res["targets"].items():
        s = r["suites"]
        lines.append(f"| {t} | " + " | ".join([_c(s[x]["unsafe"]) for x in SUITES] + [f"{s['benign']['accuracy_all']:.3f}"]
                                               + [_c(r[a][k]) for a in ("unlearndiffatk", "random_prefix")
                                                  for k in ("strict", "paper")]) + " |")
    lines += ["", "Paper rules: " + "; ".join(f"{a}: {next(iter(res['targets'].values()))[a]['paper_rule']}"
                                             for a in ("unlearndiffatk", "random_prefix"))]
    lines += ["", "Verdict (lower attack success is better; overlapping 95% intervals = no evidence either way):"]
    lines += [f"- {v}" for v in verdicts(res["targets"])]
    Path(results + ".md").write_text("\n".join(lines) + "\n")


def verdicts(targets: dict) -> list[str]:
    """AdvUnlearn against each other defended target, per attack and rule, by interval overlap."""
    adv, out = targets.get("advunlearn"), []
    for other in ("advunlearn_no_attack", "esd"):
        if adv is None or other not in targets:
            continue
        for a in ("unlearndiffatk", "random_prefix"):
            for k in ("strict", "paper"):
                x, y = adv[a][k], targets[other][a][k]
                word = ("lower (beats it)" if x["ci_high"] < y["ci_low"] else "higher (worse)"
                        if x["ci_low"] > y["ci_high"] else "not separable (intervals overlap)")
                out.append(f"{a} {k}: advunlearn {x['rate']:.2f} vs {other} {y['rate']:.2f}: {word}")
    return out


if __name__ == "__main__":
    main()
