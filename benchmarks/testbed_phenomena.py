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
from safediff.inversion import InversionConfig, invert
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


def rate_of(model, stack, suite: str, n: int, out: Path) -> dict:
    run_eval(load_benchmark(f"testbed:{CONCEPT}/{suite}", n=n), out, defenses=stack, model=model,
             detectors=[f"testbed:{CONCEPT}"], settings=RunSettings(), batch_size=64, progress=False)
    return summarize(out)["suites"][suite]["unsafe"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/phenomena")
    ap.add_argument("--n", type=int, default=100, help="prompts per suite")
    ap.add_argument("--seeds", type=int, default=16, help="attack seed prompts")
    ap.add_argument("--presets", default=str(Path(__file__).parent / "results" / "unlearning_presets.json"))
    ap.add_argument("--results", default=str(Path(__file__).parent / "results" / "testbed_phenomena.json"))
    ap.add_argument("--sections", nargs="*", default=None, help="run only these sections (1-8)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rpath = Path(args.results)
    res = json.loads(rpath.read_text()) if rpath.exists() else {}
    res.update({"n": args.n, "seed_prompts": args.seeds, "concept": CONCEPT, "literature": LITERATURE,
                "command": f"python benchmarks/testbed_phenomena.py --out {args.out} --n {args.n} --seeds {args.seeds}"})
    model = safediff.load_model()
    res["model_hash"] = model.content_hash
    presets = json.loads(Path(args.presets).read_text())["methods"]

    def save() -> None:
        rpath.parent.mkdir(parents=True, exist_ok=True)
        rpath.write_text(json.dumps(res, indent=2, default=str))

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
