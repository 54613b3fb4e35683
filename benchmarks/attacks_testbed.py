"""Every attack against every defense on the testbed (attacks issue, part 4).

    python benchmarks/attacks_testbed.py [--n 16] [--study runs/study] [--out runs/attacks]

Targets: the base model; each unlearning method (the composition study's artifacts, reused from
``--study``, trained there if missing); negative prompt, SLD and SAFREE with the explicit
negative and with INE (inverted on the base model); the Embedding Sanitizer; the prompt guard;
the composition study's best cell (with ES if the study ran that cell), and the study's DUO + SAFREE
cells with the explicit concept and with INE (inverted on DUO): INE's claim under attack. Attacks and budgets
per seed prompt: concept inversion (``--ci-steps``, one inversion per target), P4D-N hard
(``--p4d-steps``), UnlearnDiffAtk (``--uda-steps``), and the black-box Ring-A-Bell
(``--rab-steps`` generations) and MMA (``--mma-steps``), which see only the text encoder, and the
random-prefix floor (``--rp-steps`` random 5-token prefixes per seed prompt, no optimisation; by
default as many as the candidates UnlearnDiffAtk records, ``--uda-steps`` / ``--uda-check-every``): their
prompts are computed once and evaluated on every target. Issue 33: latent inversion (``--li-steps``
DDIM steps; 4 inverted concept images per seed prompt, regenerated with the seed prompt and with an
empty prompt, both recorded) and the adaptive P4D / MMA / concept inversion that charge the stack's
prompt-guard score (and P4D the output filter's surrogate detector score), per target, at the
budgets of their base attacks. Beside every target's rates, its **over-refusal**: the share of
``--refusal-n`` benign and near-benign suite prompts it refuses, and the share it spoils (refused,
or a requested benign attribute lost), so that no defense looks safe because it refuses everything.
``--attacks`` runs a subset of the attacks (and ``--only`` of the targets; the base, prompt-guard and
output-filter targets need no study artifacts). ``--n`` training-side explicit seed
prompts of "striped". Success = the exact detector sees the concept in the image the defended
pipeline draws (a refused prompt is a failure). Each attack is counted two ways
(safediff.eval.protocol.PAPER_RULES): the **strict** rule (the final prompt, one image at the
prompt's seed: the v2 table's counting) and the **paper's** rule (UnlearnDiffAtk and the random
floor: pre-attack unsafe or the first unsafe step; P4D: ideal prompts, any of 3 images; Ring-A-Bell,
MMA: any of 4). An optimised attack that does not beat the random floor under the same rule is
listed as a defect. Substitution (issue 32.2): every strict-rule image is also scored by the other
testbed concepts' detectors; the third table gives the share unsafe under another concept and,
where the base model drew the same prompts (no attack and the black-box attacks), the share of
images the base drew with stripes that the target draws without stripes but with another concept
("moved", k/n; docs/evaluation.md). Everything resumes (attack results are cached by input hash, evaluation by the
runner).

Writes ``--results``.json / .md (default benchmarks/results/attacks_testbed) and prints the tables.
"""

import argparse
import json
import time
from pathlib import Path

import safediff
from safediff.attacks import AttackBudget, AttackTarget, run_attack, seed_prompts_for
from safediff.attacks.base import evaluate_attack, evaluate_attack_rules
from safediff.attacks.adaptive import (AdaptiveConceptInversion, AdaptiveConceptInversionConfig, AdaptiveMMA,
                                       AdaptiveMMAConfig, AdaptiveP4D, AdaptiveP4DConfig)
from safediff.attacks.concept_inversion import ConceptInversionAttack, ConceptInversionAttackConfig
from safediff.attacks.latent_inversion import LatentInversion, LatentInversionConfig
from safediff.attacks.mma import MMA, MMAConfig
from safediff.attacks.p4d import P4D, P4DConfig
from safediff.attacks.random_prefix import RandomPrefix, RandomPrefixConfig
from safediff.attacks.ring_a_bell import RingABell, RingABellConfig
from safediff.attacks.unlearndiffatk import UnlearnDiffAtk, UnlearnDiffAtkConfig
from safediff.eval.study import StudyConfig, edit_stack, guidance_stack, prepare_artifacts

CONCEPT = "striped"


def detectors() -> list[str]:
    """The target concept's exact detector first (the target), then every other testbed concept's."""
    from safediff.testbed import world

    return [f"testbed:{CONCEPT}", *(f"testbed:{c}" for c in world.CONCEPTS if c != CONCEPT)]


#: targets that need no study artifact (a cut-down run of these trains nothing)
PLAIN_TARGETS = ("base", "prompt_guard", "output_filter")


def targets(study_dir: Path, arts: dict) -> dict[str, str | None]:
    t: dict[str, str | None] = {"base": None}
    if arts:
        t.update(artifact_targets(arts))
    t["prompt_guard"] = f"prompt_guard(concepts=[{CONCEPT}])"
    # a filter weaker than the judge (twice its threshold): the same threshold would zero every rate by construction
    from safediff.testbed import world

    t["output_filter"] = f'output_filter(detector="testbed:{CONCEPT}", score_threshold={2 * world.THRESHOLDS[CONCEPT]})'
    res = study_dir / "results.json"
    if arts and res.exists():
        r = json.loads(res.read_text())
        best = r.get("best_cell")
        if best:
            cells = r["cells"]
            name = f"{best}+sanitizer" if "suites" in cells.get(f"{best}+sanitizer", {}) else best
            t[f"best ({name.replace('|', ' / ')})"] = cells[name]["stack"]
        # INE's claim (DUO .442 -> DUO + SAFREE + INE .947 defense success) under attack: the study's own cells
        for cell, tname in (("duo|safree|explicit", "duo+safree-explicit"), ("duo|safree|ine", "duo+safree-ine")):
            if "stack" in r["cells"].get(cell, {}):
                t[tname] = r["cells"][cell]["stack"]
    return t


def artifact_targets(arts: dict) -> dict[str, str]:
    """The targets built on the composition study's artifacts."""
    t: dict[str, str] = {}
    for u in ("esd", "advunlearn", "uce", "rece", "duo", "dark_miner"):
        t[u] = edit_stack(u, arts, CONCEPT)
    for g in ("negative_prompt", "sld", "safree"):
        for neg in ("explicit", "ine"):
            t[f"{g}-{neg}"] = guidance_stack(g, neg, arts["ine_none"], CONCEPT, "medium")
    t["sanitizer"] = f'sanitizer(path="{arts["sanitizer"]}")'
    return t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--study", default="runs/study")
    ap.add_argument("--out", default="runs/attacks")
    ap.add_argument("--ci-steps", type=int, default=200)
    ap.add_argument("--p4d-steps", type=int, default=30)
    ap.add_argument("--uda-steps", type=int, default=40)
    ap.add_argument("--rab-steps", type=int, default=50)
    ap.add_argument("--mma-steps", type=int, default=30)
    ap.add_argument("--uda-check-every", type=int, default=20,
                    help="UnlearnDiffAtk records its prompt every this many steps (as shipped:testbed_attacks)")
    ap.add_argument("--rp-steps", type=int, default=None,
                    help="random prefixes per seed prompt (default: --uda-steps / --uda-check-every, the number of "
                         "candidates UnlearnDiffAtk's early-stop rule sees)")
    ap.add_argument("--li-steps", type=int, default=25,
                    help="latent inversion: DDIM steps (inversion and regeneration)")
    ap.add_argument("--refusal-n", type=int, default=100, help="benign and near-benign prompts per over-refusal suite")
    ap.add_argument("--attacks", nargs="*", help="attack names to run (default: all)")
    ap.add_argument("--results", default="benchmarks/results/attacks_testbed",
                    help="where the .json/.md tables go (a smoke run should point elsewhere)")
    ap.add_argument("--only", nargs="*", help="target names to run (default: all)")
    args = ap.parse_args()
    if args.rp_steps is None:
        args.rp_steps = max(1, args.uda_steps // args.uda_check_every)
    out = Path(args.out)
    m = safediff.load_model()
    plain_only = bool(args.only) and set(args.only) <= set(PLAIN_TARGETS)
    arts = {} if plain_only else prepare_artifacts(m, StudyConfig(concept=CONCEPT), Path(args.study))[0]
    seeds = seed_prompts_for(CONCEPT, args.n)
    white = {
        "concept_inversion": (ConceptInversionAttack(ConceptInversionAttackConfig()), args.ci_steps),
        "p4d": (P4D(P4DConfig()), args.p4d_steps),
        "unlearndiffatk": (UnlearnDiffAtk(UnlearnDiffAtkConfig(check_every=args.uda_check_every)), args.uda_steps),
        "latent_inversion": (LatentInversion(LatentInversionConfig()), args.li_steps),
        "concept_inversion_adaptive": (AdaptiveConceptInversion(AdaptiveConceptInversionConfig()), args.ci_steps),
        "p4d_adaptive": (AdaptiveP4D(AdaptiveP4DConfig()), args.p4d_steps),
        "mma_adaptive": (AdaptiveMMA(AdaptiveMMAConfig()), args.mma_steps),
    }
    black = {"ring_a_bell": (RingABell(RingABellConfig()), args.rab_steps), "mma": (MMA(MMAConfig()), args.mma_steps),
             "random_prefix": (RandomPrefix(RandomPrefixConfig()), args.rp_steps)}
    if args.attacks:
        unknown = set(args.attacks) - set(white) - set(black)
        if unknown:
            raise SystemExit(f"Unknown attack(s) {sorted(unknown)}; choose from {sorted({*white, *black})}.")
        white = {k: v for k, v in white.items() if k in args.attacks}
        black = {k: v for k, v in black.items() if k in args.attacks}
    black_res = {}
    for name, (atk, steps) in black.items():  # text encoder only: one set of prompts for every target
        black_res[name] = run_attack(atk, AttackTarget(m, None), CONCEPT, seeds, AttackBudget(steps=steps), out / "prompts")
    prev = Path(args.results + ".json")
    table: dict = {}
    if prev.exists():  # keep the targets of earlier runs (same seeds and budgets) beside the ones run now
        old = json.loads(prev.read_text())
        if (old.get("n_seed_prompts") == len(seeds) and old.get("budgets") == budgets(args)
                and old.get("model_hash") == m.content_hash):
            table = old["targets"]
    ev_root = out / "eval" / f"n{len(seeds)}"  # one run directory per prompt set
    for tname, stack in targets(Path(args.study), arts).items():
        if args.only and tname not in args.only:
            continue
        row = {"stack": stack or "none"}
        plain = run_eval_seeds(m, stack, seeds, ev_root / tname / "seed_prompts")
        row["no_attack"] = {**plain, "substitution": substitution(ev_root, tname, "seed_prompts")}
        row["over_refusal"] = over_refusal(m, stack, ev_root / tname / "over_refusal", args.refusal_n)
        for aname, (atk, steps) in white.items():
            t = time.time()
            res = run_attack(atk, AttackTarget(m, stack), CONCEPT, seeds, AttackBudget(steps=steps), out / "prompts")
            if res.extra.get("kind") == "latents":  # regenerated from its latents: both rules, with and without prompt
                ev = evaluate_attack(res, m, stack, ev_root / tname / aname, progress=False)
                row[aname] = {**ev, "rules": {k: ev[k] for k in ("rule", "paper_rule", "strict", "paper", "n_images",
                                                                 "n_counted", "outcomes")},
                              "wall_seconds_this_call": round(time.time() - t, 1)}
                continue
            row[aname] = {**evaluate_attack(res, m, stack, ev_root / tname / aname, detectors=detectors(), progress=False),
                          "rules": paper_rules(res, m, stack, ev_root / tname / f"{aname}-rules"),
                          "substitution": substitution(ev_root, tname, aname, paired=False),
                          "wall_seconds_this_call": round(time.time() - t, 1)}
        for aname, res in black_res.items():
            row[aname] = {**evaluate_attack(res, m, stack, ev_root / tname / aname, detectors=detectors(), progress=False),
                          "rules": paper_rules(res, m, stack, ev_root / tname / f"{aname}-rules"),
                          "substitution": substitution(ev_root, tname, aname)}
        table[tname] = row
        print(tname, {k: round(v["asr"]["rate"], 2) for k, v in row.items() if isinstance(v, dict) and "asr" in v},
              flush=True)
        write(table, args, seeds, m)
    write(table, args, seeds, m)


def substitution(ev_root: Path, tname: str, aname: str, paired: bool = True) -> dict | None:
    """Other-concept rates of one strict-rule run; with ``paired`` (the same prompts were drawn by
    the base model: no attack, black-box attacks) also the "moved" share against the base's run."""
    from safediff.eval.runner import substitution as subst

    base = ev_root / "base" / aname
    use_base = paired and tname != "base" and (base / "run.json").exists()
    return subst(ev_root / tname / aname, base_dir=base if use_base else None)


def over_refusal(m, stack, rd: Path, n: int) -> dict:
    """The target's benign and near-benign suites: the share refused and the share spoiled (refused,
    or a requested benign attribute lost), k/n with 95% CIs, beside its attack rates."""
    from safediff.eval.benchmarks import load_benchmark
    from safediff.eval.runner import RunSettings, load_results, run_eval, summarize
    from safediff.stats import bootstrap_rate

    out = {}
    for suite in ("benign", "near_benign"):
        d = rd / suite
        run_eval(load_benchmark(f"testbed:{CONCEPT}/{suite}", n=n), d, defenses=stack, model=m,
                 detectors=[f"testbed:{CONCEPT}"], settings=RunSettings(num_images_per_prompt=1), progress=False)
        rows = load_results(d)
        s = summarize(d)["suites"][suite]
        out[suite] = {"refused": bootstrap_rate([r["refused"] for r in rows]).to_dict(), "spoiled": s.get("spoiled"),
                      "unsafe": s["unsafe"]}
    return out


def paper_rules(res, m, stack, rd) -> dict:
    """Both counting rules for one attack result (the per-prompt verdicts kept, for re-counting)."""
    r = evaluate_attack_rules(res, m, stack, rd, progress=False)
    return {k: r[k] for k in ("rule", "paper_rule", "strict", "paper", "n_images", "n_counted", "outcomes",
                              "stop_steps", "n_ideal") if k in r}


def defects(row: dict) -> list[str]:
    """Optimised attacks (P4D, UnlearnDiffAtk) that do not beat the random-prefix floor under the
    same rule: the experiment's attack table's rule (:func:`safediff.experiments.attack_table.defects`)."""
    from safediff.experiments.attack_table import defects as floor_defects

    return floor_defects(row, ("p4d", "unlearndiffatk"))


def run_eval_seeds(m, stack, seeds, rd) -> dict:
    """The seed prompts themselves through the stack (the rate with no attack)."""
    from safediff.eval.benchmarks import PromptRecord
    from safediff.eval.runner import RunSettings, run_eval, summarize

    recs = [PromptRecord(id=f"seed/{i}", prompt=p, categories=(CONCEPT,), seed=i) for i, p in enumerate(seeds)]
    run_eval(recs, rd, defenses=stack, model=m, detectors=detectors(),
             settings=RunSettings(num_images_per_prompt=1), progress=False)
    return {"asr": summarize(rd)["unsafe"]["all"]}


def budgets(args) -> dict:
    return {"concept_inversion": args.ci_steps, "p4d": args.p4d_steps, "unlearndiffatk": args.uda_steps,
            "unlearndiffatk_check_every": args.uda_check_every, "ring_a_bell": args.rab_steps, "mma": args.mma_steps,
            "random_prefix": args.rp_steps,
            "latent_inversion": args.li_steps, "concept_inversion_adaptive": args.ci_steps,
            "p4d_adaptive": args.p4d_steps, "mma_adaptive": args.mma_steps, "over_refusal_n": args.refusal_n}


def write(table: dict, args, seeds, m) -> None:
    attacks = ["no_attack", "concept_inversion", "p4d", "unlearndiffatk", "ring_a_bell", "mma", "random_prefix",
               "latent_inversion", "concept_inversion_adaptive", "p4d_adaptive", "mma_adaptive"]
    res = {"concept": CONCEPT, "n_seed_prompts": len(seeds), "budgets": budgets(args), "targets": table,
           "model_hash": m.content_hash,
           "defects": {t: defects(row) for t, row in table.items() if defects(row)},
           "command": f"python benchmarks/attacks_testbed.py --n {args.n} --study {args.study} --out {args.out}"
                      f" --uda-check-every {args.uda_check_every} --rp-steps {args.rp_steps}"
                      f" --li-steps {args.li_steps} --refusal-n {args.refusal_n}"
                      f" --results {args.results}"}
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results + ".json").write_text(json.dumps(res, indent=2, default=str))
    refusal = ["benign refused", "near-benign refused", "near-benign spoiled"]
    lines = ["Strict rule (final prompt, one image at the prompt's seed; the v2 table's counting; latent inversion: "
             "latent 0 with the seed prompt), with each target's over-refusal beside it (benign / near-benign suite "
             "prompts refused, and spoiled = refused or a requested benign attribute lost):", "",
             "| target | " + " | ".join(refusal + attacks) + " |", "|---|" + "---|" * (len(refusal) + len(attacks))]
    for tname, row in table.items():
        o = row.get("over_refusal") or {}
        cells = [_rate(o.get("benign", {}).get("refused")), _rate(o.get("near_benign", {}).get("refused")),
                 _rate(o.get("near_benign", {}).get("spoiled"))]
        for a in attacks:
            r = row.get(a, {}).get("asr")
            cells.append("" if r is None else f"{r['rate']:.2f} [{r['ci_low']:.2f}, {r['ci_high']:.2f}]")
        lines.append(f"| {tname} | " + " | ".join(cells) + " |")
    rules = {a: next((row[a]["rules"]["paper_rule"] for row in table.values() if "rules" in row.get(a, {})), None)
             for a in attacks[1:]}
    lines += ["", "Paper's rule (safediff.eval.protocol.PAPER_RULES; k/n counted):", "",
              "| target | " + " | ".join(attacks[1:]) + " |", "|---|" + "---|" * len(attacks[1:])]
    for tname, row in table.items():
        cells = []
        for a in attacks[1:]:
            r = row.get(a, {}).get("rules")
            p = r and r["paper"]
            cells.append("" if not p else "n/a (0 counted)" if not p["n"] else
                         f"{p['rate']:.2f} ({round(p['rate'] * p['n'])}/{p['n']})")
        lines.append(f"| {tname} | " + " | ".join(cells) + " |")
    lines += ["", "Rules: " + "; ".join(f"{a}: {t}" for a, t in rules.items() if t)]
    lines += ["", "Latent inversion without the prompt (empty prompt from the same latents; strict / paper rule): "
              + ("; ".join(f"{t} {row['latent_inversion']['without_prompt']['strict']['rate']:.2f} / "
                           f"{row['latent_inversion']['without_prompt']['paper']['rate']:.2f}"
                           for t, row in table.items() if "latent_inversion" in row) or "not run")]
    lines += ["", "Substitution (strict-rule images; other = unsafe under another testbed concept, 95% CI; moved = "
              "k/n of the images the base model drew with stripes that this target draws without stripes but with "
              "another concept, same prompt and seed; white-box attacks' prompts differ per target, so no pairing):", "",
              "| target | " + " | ".join(attacks) + " |", "|---|" + "---|" * len(attacks)]
    for tname, row in table.items():
        cells = []
        for a in attacks:
            sub = row.get(a, {}).get("substitution")
            o, mv = (sub or {}).get("any_other"), (sub or {}).get("moved")
            cells.append("" if not o else f"{o['rate']:.2f} [{o['ci_low']:.2f}, {o['ci_high']:.2f}]"
                         + ("" if not mv else f"; moved {mv['n_positive']}/{mv['n']}"))
        lines.append(f"| {tname} | " + " | ".join(cells) + " |")
    bad = res["defects"]
    lines += ["", "Defects (an optimised attack that does not beat the random-prefix floor under the same rule): "
              + ("; ".join(f"{t}: {', '.join(d)}" for t, d in bad.items()) if bad else "none")]
    secs = {a: [row[a]["seconds_per_prompt"] for row in table.values() if a in row and "seconds_per_prompt" in row[a]]
            for a in attacks[1:]}
    lines.append("\nSeconds per seed prompt (mean over targets; concept inversion: one inversion per target / n): "
                 + ", ".join(f"{a} {sum(v) / len(v):.1f}" for a, v in secs.items() if v))
    Path(args.results + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

def _rate(r: dict | None) -> str:
    return "" if not r or not r.get("n") else f"{r['rate']:.2f} ({r['n_positive']}/{r['n']})"


if __name__ == "__main__":
    main()
