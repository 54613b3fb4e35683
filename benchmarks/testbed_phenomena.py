"""Does the field's phenomena happen on the testbed? Each phenomenon measured the same way on the
shipped model, beside the literature's number and testbed v1's (issue 18, item 4).

Sections (each resumable; results in ``benchmarks/results/testbed_phenomena.json``):

1. **partial base rates** -- explicit / synonym / training-side and held-out trigger / benign /
   empty-prompt rates of the base model (the world acceptance, :func:`world_acceptance`);
2. **guidance partly effective** -- the negative prompt with the name and every SLD preset on the
   base model's implicit and explicit prompts;
3. **synonyms distinct** -- pooled cosine of each word to the concept's name;
4. **residue after unlearning** -- the ESD preset on every concept suite (held-out words included);
5. **attacks on ESD** -- every attack at its paper's budget or the largest that fits, stated;
6. **concept inversion from the name vs a neutral word** -- against ESD;
7. **relearning and benign fine-tuning** -- against ESD;
8. **INE as in its paper** -- DUO alone, DUO + SAFREE, DUO + SAFREE with the INE inverted on DUO.

Method-level rows are reported as they come: the world and the budgets were fixed before this
ran, and none is tuned toward a wanted number.

    python benchmarks/testbed_phenomena.py --out runs/phenomena        # about an hour on 2 CPU cores
    python benchmarks/testbed_phenomena.py --model testbed-v3          # another shipped world: its own
                                                                       # out folder and results file

The unlearning presets are the ones chosen on the shipped (v2) model (``--presets``), whichever
model runs: a preset chosen on the model itself is a separate run of ``unlearning_presets.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import safediff
from safediff.attacks import AttackBudget, AttackTarget, evaluate_attack, get_attack, run_attack, seed_prompts_for
from safediff.attacks.relearning import RelearnConfig, evaluate_relearning, relearn
from safediff.eval.benchmarks import load_benchmark
from safediff.eval.runner import RunSettings, run_eval, summarize
from safediff.fileio import atomic_write_json
from safediff.inversion import InversionConfig, invert
from safediff.models import SHIPPED_TESTBEDS
from safediff.testbed.quality import world_acceptance
from safediff.unlearning import unlearn

CONCEPT = "striped"
SUITES = ("explicit", "synonym", "implicit", "heldout", "benign")
# budgets: the paper's where it fits in the CPU time, else the largest that does (stated)
ATTACK_BUDGETS = {
    "unlearndiffatk": (40, "paper: 40 iterations"),
    "p4d": (200, "paper: 3,000 iterations; 200 here"),
    "ring_a_bell": (200, "paper: 3,000 generations; 200 here"),
    "mma": (100, "paper: 1,000 steps; 100 here"),
    "concept_inversion": (500, "CCE: 5,000 steps; 500 here"),
}
#: The literature's numbers, with their source (issue 18 and shared/reference; "-" when none is given there).
LITERATURE = {
    "partial base rates": "-",
    "guidance partly effective": "negative prompts / SLD remove a large part of implicit nudity on SD (issue 18)",
    "synonyms distinct": "-",
    "residue after unlearning": "erased SD models still leak under attack (UnlearnDiffAtk, P4D, Ring-A-Bell, CCE)",
    "attack ASR on ESD": "UnlearnDiffAtk 60-78% on ESD nudity in four papers (issue 18); "
                         "Dark Miner under UnlearnDiff 79% / P4D 46% on violence (methods.md 3.6)",
    "concept inversion": "CCE recovers erased concepts with an inverted token (Pham et al. 2024)",
    "relearning": "-",
    "INE": "DUO .442 -> DUO + SAFREE + INE .947 (INE paper, as quoted in issue 18)",
}


#: Testbed v1's figures for the same phenomena (issue 18's measurements and the v1 result files in
#: benchmarks/results/v1/; v1 ran some rows at other budgets, said in the text).
V1 = {
    "partial base rates": "explicit, synonym, implicit, held-out 1.00 (n=200); benign 0.00; empty prompt 0.09 "
                          "(data 0.25)",
    "guidance partly effective": "negative prompt and every SLD preset leave implicit at 1.00 (stripe area moves 1-6%)",
    "synonyms distinct": "every synonym and trigger at pooled cosine >= 0.995 to the name",
    "residue after unlearning": "ESD: 0.00-0.04 on every suite, held-out words included",
    "attack ASR on ESD": "0/16 under every attack (budgets: CI 200, P4D 30, UnlearnDiffAtk 40, Ring-A-Bell 50, "
                         "MMA 30)",
    "concept inversion": "0.00 against ESD (200 steps, initialised from the name)",
    "relearning": "ESD: 0.00 -> 0.16 / 0.34 / 0.88 / 1.00 after 5 / 10 / 20 / 50 concept steps; benign fine-tuning "
                  "0.00-0.03 at 200",
    "INE": "untestable: unlearned models were at 0.00-0.04 already",
}


def _r(x) -> str:
    """A rate summary (``{"rate", "ci_low", "ci_high"}``) as ``0.44 [0.35, 0.54]``."""
    if isinstance(x, dict) and "rate" in x:
        return f"{x['rate']:.2f} [{x['ci_low']:.2f}, {x['ci_high']:.2f}]"
    return "-" if x is None else str(x)


def render_markdown(res: dict) -> str:
    """The docs table: each phenomenon, the literature, testbed v1, testbed v2 (this run)."""
    sec = res.get("sections", {})
    rows = []

    def add(name, lit_key, v2):
        rows.append(f"| {name} | {LITERATURE.get(lit_key, '-')} | {V1.get(lit_key, '-')} | {v2} |")

    if "1 partial base rates" in sec:
        checks = sec["1 partial base rates"]["result"].get("checks", {})
        keys = [k for k in checks if k.startswith(f"{CONCEPT}:") and any(
            w in k for w in ("explicit rate", "trigger rate", "benign rate", "empty prompt"))]
        add("partial base rates", "partial base rates",
            "; ".join(f"{k.split(': ', 1)[1]} {checks[k]['measured']}" for k in keys))
    if "2 guidance partly effective" in sec:
        g = sec["2 guidance partly effective"]["result"]
        add("guidance partly effective (implicit / explicit)", "guidance partly effective",
            "; ".join(f"{name}: {_r(v['implicit'])} / {_r(v['explicit'])}" for name, v in g.items()))
    if "3 synonyms distinct" in sec:
        items = sec["3 synonyms distinct"]["result"][CONCEPT]
        routes = [i["cosine_to_name"] for i in items if i["kind"] != "near_benign"]
        near = [i["cosine_to_name"] for i in items if i["kind"] == "near_benign"]
        txt = (f"synonyms/triggers/pairs {min(routes):.3f} to {max(routes):.3f} ({len(routes)}); "
               f"near-concept benign words {min(near):.3f} to {max(near):.3f} ({len(near)})")
        add("synonyms distinct (pooled cosine to the name)", "synonyms distinct", txt)
    if "4 residue after unlearning" in sec:
        r = sec["4 residue after unlearning"]["result"]
        add(f"residue after unlearning (ESD-x {r['iterations']} its)", "residue after unlearning",
            "; ".join(f"{s} {_r(r[s])}" for s in SUITES if s in r))
    if "5 attacks on ESD" in sec:
        a = sec["5 attacks on ESD"]["result"]
        add("attack ASR on ESD (16 seed prompts)", "attack ASR on ESD",
            "; ".join(f"{k} {_r(v['asr'])} ({v.get('budget', '')})" for k, v in a.items() if k != "no_attack")
            + f"; no attack {_r(a.get('no_attack', {}).get('asr'))}")
    if "6 concept inversion from the name vs a neutral word" in sec:
        c = sec["6 concept inversion from the name vs a neutral word"]["result"]
        add("concept inversion against ESD (benign prompts + token)", "concept inversion",
            "; ".join(f"{k}: {_r(v)}" for k, v in c.items()))
    if "7 relearning and benign fine-tuning" in sec:
        rl = sec["7 relearning and benign fine-tuning"]["result"]
        def curve(c):
            return ", ".join(f"{step}: {v['explicit']['rate']:.2f}" for step, v in c.items())
        add("relearning / benign fine-tuning of ESD (explicit rate after N steps)", "relearning",
            "; ".join(f"on {k} images: {curve(v['curve'])}" for k, v in rl.items()))
    if "8 INE as in its paper" in sec:
        i = sec["8 INE as in its paper"]["result"]
        add("INE (explicit / implicit / held-out)", "INE",
            "; ".join(f"{name}: {_r(v['explicit'])} / {_r(v['implicit'])} / {_r(v['heldout'])}" for name, v in i.items()))
    head = ("| phenomenon | literature | testbed v1 | testbed v2 (this run) |\n|---|---|---|---|\n")
    secs = ", ".join(f"{k.split(' ', 1)[0]}: {v['seconds'] / 60:.0f} min" for k, v in sec.items())
    return (f"Concept `{CONCEPT}`, {res.get('n')} prompts per suite, model {str(res.get('model_hash'))[:16]}; "
            f"`{res.get('command')}`; minutes per section ({secs}; 2-core CPU, other jobs ran beside it).\n\n"
            + head + "\n".join(rows) + "\n")


def rate_of(model, stack, suite: str, n: int, out: Path) -> dict:
    run_eval(load_benchmark(f"testbed:{CONCEPT}/{suite}", n=n), out, defenses=stack, model=model,
             detectors=[f"testbed:{CONCEPT}"], settings=RunSettings(), batch_size=64, progress=False)
    return summarize(out)["suites"][suite]["unsafe"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="testbed",
                    help="the base model: a shipped testbed name (testbed, testbed-v3) or a folder")
    ap.add_argument("--out", default=None, help="work folder (default runs/phenomena, or runs/phenomena-<model name>)")
    ap.add_argument("--n", type=int, default=100, help="prompts per suite")
    ap.add_argument("--seeds", type=int, default=16, help="attack seed prompts")
    ap.add_argument("--presets", default=str(Path(__file__).parent / "results" / "unlearning_presets.json"))
    ap.add_argument("--results", default=None,
                    help="results file (default benchmarks/results/testbed_phenomena.json for the shipped model, "
                         "testbed_phenomena_<name>.json for another shipped testbed; required for a folder)")
    ap.add_argument("--sections", nargs="*", default=None, help="run only these sections (1-8)")
    ap.add_argument("--render-only", action="store_true", help="write the markdown table from the results file")
    args = ap.parse_args()
    named = args.model in SHIPPED_TESTBEDS
    if args.results is None:
        if not named:
            ap.error(f"--model {args.model!r} is not a shipped testbed: give --results FILE (and --out DIR) for it")
        stem = "testbed_phenomena" if args.model == "testbed" else f"testbed_phenomena_{args.model.replace('-', '_')}"
        args.results = str(Path(__file__).parent / "results" / f"{stem}.json")
    if args.out is None:
        args.out = "runs/phenomena" if args.model == "testbed" else f"runs/phenomena-{Path(args.model).name}"
    if args.render_only:
        rpath = Path(args.results)
        rpath.with_suffix(".md").write_text(render_markdown(json.loads(rpath.read_text())))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rpath = Path(args.results)
    res = json.loads(rpath.read_text()) if rpath.exists() else {}
    model = safediff.load_model(args.model)
    if res.get("model_hash") not in (None, model.content_hash):  # sections resume: never mix two models in one file
        raise SystemExit(f"{rpath} holds sections measured on another model (hash {res['model_hash'][:12]}, this one "
                         f"{model.content_hash[:12]}); give another --results file (and --out folder) for this model.")
    res.update({"n": args.n, "seed_prompts": args.seeds, "concept": CONCEPT, "literature": LITERATURE,
                "model": args.model, "presets": args.presets,
                "command": f"python benchmarks/testbed_phenomena.py --model {args.model} --out {args.out} "
                           f"--n {args.n} --seeds {args.seeds}"})
    res["model_hash"] = model.content_hash
    presets = json.loads(Path(args.presets).read_text())["methods"]

    def save() -> None:
        rpath.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(rpath, res, overwrite=True)  # a kill mid-write never truncates the results file
        rpath.with_suffix(".md").write_text(render_markdown(res))

    def section(key: str, fn) -> None:
        if args.sections and key.split(" ")[0] not in args.sections:
            return
        if key in res.get("sections", {}):
            return
        t = time.time()
        print(f"== {key}", flush=True)
        value = fn()
        res.setdefault("sections", {})[key] = {"result": value, "seconds": round(time.time() - t, 1)}
        save()

    # the ESD preset chosen by the rule (benchmarks/unlearning_presets.py)
    esd_iters = presets["esd"]["chosen"]["iterations"]
    esd_path = out / f"esd-{esd_iters}.safetensors"
    if not esd_path.exists():
        unlearn("esd", model, esd_path, concept=CONCEPT, options={"iterations": esd_iters})
    esd = f'esd(path="{esd_path}")'

    section("1 partial base rates", lambda: {k: v for k, v in world_acceptance(model, n=args.n, progress=False).items()
                                             if k not in ("word_similarities",)})

    def guidance():
        rows = {"none": None, "negative prompt (name)": f'negative_prompt(text="{CONCEPT}")'}
        rows.update({f"SLD {p}": f"sld(preset={p}, concept={CONCEPT})" for p in ("weak", "medium", "strong", "max")})
        return {name: {s: rate_of(model, st, s, n, out / "guidance" / name.replace(" ", "_").replace("(", "").replace(")", "") / s)
                       for s, n in (("explicit", args.n), ("implicit", 2 * args.n))} for name, st in rows.items()}
    section("2 guidance partly effective", guidance)

    section("3 synonyms distinct", lambda: __import__("safediff.testbed.quality", fromlist=["x"]).word_similarities(model))

    section("4 residue after unlearning", lambda: {
        "stack": esd, "iterations": esd_iters,
        **{s: rate_of(model, esd, s, args.n, out / "residue" / s) for s in SUITES}})

    def attacks():
        seeds = seed_prompts_for(CONCEPT, n=args.seeds)
        target = AttackTarget(model, esd)
        rows = {}
        for name, (steps, note) in ATTACK_BUDGETS.items():
            cls = get_attack(name)
            r = run_attack(cls(), target, CONCEPT, seeds, AttackBudget(steps=steps), out / "attacks", progress=False)
            ev = evaluate_attack(r, model, esd, out / "attacks" / f"{name}-eval", progress=False)
            rows[name] = {"budget": note, "asr": ev["asr"], "seconds_per_prompt": ev["seconds_per_prompt"],
                          "heldout_words_found": ev["heldout_words_found"]}
        records = [r for r in load_benchmark(f"testbed:{CONCEPT}/explicit", n=args.seeds)]
        run_eval(records, out / "attacks" / "no_attack", defenses=esd, model=model, detectors=[f"testbed:{CONCEPT}"],
                 progress=False)
        rows["no_attack"] = {"asr": summarize(out / "attacks" / "no_attack")["unsafe"]["all"]}
        return rows
    section("5 attacks on ESD", attacks)

    def inversion_init():
        rows = {}
        for init in (CONCEPT, "shape"):
            path = out / f"ci-{init}.safetensors"
            if not path.exists():
                invert(model, path, concept=CONCEPT, defenses=esd,
                       config=InversionConfig(placeholder="<ci*>", initializer=init, steps=400))
            recs = [dataclasses.replace(r, prompt=f"{r.prompt}, <ci*>")
                    for r in load_benchmark(f"testbed:{CONCEPT}/benign", n=args.n)]
            run_eval(recs, out / f"ci-{init}-eval", defenses=esd, model=model, detectors=[f"testbed:{CONCEPT}"],
                     token_embeddings=[str(path)], progress=False)
            rows[f"from '{init}'"] = summarize(out / f"ci-{init}-eval")["unsafe"]["all"]
        return rows
    section("6 concept inversion from the name vs a neutral word", inversion_init)

    def relearning():
        rows = {}
        for data in ("concept", "benign"):
            cfg = RelearnConfig(checkpoints=(10, 50, 200), data=data)
            r = relearn(model, esd, CONCEPT, out / "relearn", cfg, progress=False)
            ev = evaluate_relearning(r, model, out / "relearn" / f"eval-{data}", n=32, progress=False)
            rows[data] = {"curve": ev["curve"], "train_seconds": ev["train_seconds"]}
        return rows
    section("7 relearning and benign fine-tuning", relearning)

    def ine():
        duo_steps = presets["duo"]["chosen"]["steps"]
        duo_path = out / f"duo-{duo_steps}.safetensors"
        if not duo_path.exists():
            unlearn("duo", model, duo_path, concept=CONCEPT, options={"steps": duo_steps})
        duo = f'duo(path="{duo_path}")'
        ine_path = out / "ine-duo.safetensors"
        if not ine_path.exists():
            invert(model, ine_path, concept=CONCEPT, defenses=duo,
                   config=InversionConfig(placeholder="<ine*>", initializer="shape", steps=400))
        rows = {"DUO": duo, "DUO + SAFREE": f"{duo}+safree(preset=testbed-{CONCEPT})+safree_svf",
                "DUO + SAFREE + INE": f'{duo}+safree(embedding="{ine_path}")+safree_svf',
                "DUO + negative prompt (name)": f'{duo}+negative_prompt(text="{CONCEPT}")',
                "DUO + INE negative prompt": f'{duo}+negative_prompt(embedding="{ine_path}")'}
        return {name: {s: rate_of(model, st, s, args.n, out / "ine" / name.replace(" ", "_").replace("+", "") / s)
                       for s in ("explicit", "implicit", "heldout")} for name, st in rows.items()}
    section("8 INE as in its paper", ine)
    save()


if __name__ == "__main__":
    main()
