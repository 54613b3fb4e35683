"""INE on the testbed (guidance/INE issue, part 5): does explicit negative guidance lose its effect
on an unlearned model, and does an implicit negative embedding (INE) restore it?

    python benchmarks/ine_testbed.py [--n 30] [--out runs/ine]

1. ESD-u erases "striped" from the testbed model (testbed preset); a second ESD-u run with
   another seed gives a second unlearned model (for transfer).
2. Concept inversion against the first unlearned model, started from a neutral token ("shape"),
   from images the ORIGINAL model draws for training-side prompts: the INE embedding.
3. Every guidance defense with the explicit negative ("striped") and with INE, on the base and on
   the unlearned model, over the testbed suites (explicit, synonym, implicit, held-out, benign,
   near-concept benign), through the resumable runner with the exact detector.
4. The inverted embedding used as a *prompt* on the unlearned model (the concept-inversion
   attack), and INE transfer to the second unlearned model.

Writes benchmarks/results/ine_testbed.json and prints a markdown table.
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np

import safediff
from safediff.eval.metrics import attribute_accuracy, bootstrap_rate
from safediff.eval.benchmarks import load_benchmark
from safediff.eval.runner import RunSettings, load_results, run_eval
from safediff.inversion import InversionConfig, invert, load_inverted
from safediff.pipeline import SafePipeline
from safediff.stack import DefenseStack
from safediff.testbed import world
from safediff.testbed.suites import SUITES, testbed_suite
from safediff.unlearning.esd import ESDTrainConfig, testbed_prompts, train_esd

CONCEPT = "striped"


def guidance_variants(ine: str, presets=("weak", "medium", "strong", "max")) -> dict[str, tuple[str | None, str | None]]:
    """name -> (explicit stack, INE stack)."""
    v = {"none": (None, None), "negative_prompt": (f'negative_prompt(text="{CONCEPT}")', f'negative_prompt(embedding="{ine}")')}
    for p in presets:
        v[f"sld-{p}"] = (f'sld(preset={p}, concept="{CONCEPT}")', f'sld(preset={p}, concept_embedding="{ine}")')
    v["safree"] = (f"safree(preset=testbed-{CONCEPT})+safree_svf", f'safree(preset=testbed-{CONCEPT}, embedding="{ine}")+safree_svf')
    return v


def summarize_cell(run_dir: Path) -> dict:
    rows = load_results(run_dir)
    out = {}
    for s in SUITES:
        sub = [r for r in rows if r["extra"].get("suite") == s]
        vals = [r["unsafe"] if r["error"] is None else None for r in sub]
        est = bootstrap_rate(vals, groups=[r["prompt_id"] for r in sub])
        acc = attribute_accuracy([r["details"] for r in sub], [r["extra"]["expected"] for r in sub])
        out[s] = {"rate": est.to_dict(), "attributes": acc}
    return out


def attack_rate(model, ine_path: str, stack: str, n: int) -> dict:
    """The inverted embedding as a prompt (concept-inversion attack)."""
    ine = load_inverted(ine_path, model)
    recs = testbed_suite(CONCEPT, "benign", n=n, seed=5)
    prompts = [r["prompt"] + f", {ine.placeholder}" for r in recs]
    with SafePipeline(model, DefenseStack.parse(stack), token_embeddings=[ine]) as pipe:
        out = pipe(prompts, image_ids=[(r["seed"], 0) for r in recs], batch_size=64)
    imgs = [np.asarray(r.image) for r in out.records]
    return bootstrap_rate([CONCEPT in world.detect(i).concepts for i in imgs]).to_dict()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=30, help="prompts per suite and cell")
    ap.add_argument("--out", default="runs/ine")
    ap.add_argument("--base-sld-presets", nargs="*", default=["medium", "max"],
                    help="SLD presets measured on the base model (all four are measured on the unlearned one)")
    ap.add_argument("--study", default="runs/study", help="reuse the composition study's ESD and INE if present")
    ap.add_argument("--models", nargs="*", default=["base", "esd"], help="which models' grid cells to run")
    ap.add_argument("--guidance", nargs="*", default=None,
                    help="guidance variants to run (default: all; the study already has none/negative_prompt/sld-medium/safree)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    m = safediff.load_model()
    res: dict = {"n_per_suite": args.n, "concept": CONCEPT, "timings_s": {}}

    study_art = Path(args.study) / "artifacts"
    esd = [out / "esd_striped_seed0.safetensors", out / "esd_striped_seed1.safetensors"]
    ine = out / "ine_striped.safetensors"
    if (study_art / "esd_striped.safetensors").exists() and (study_art / "ine_esd_striped.safetensors").exists():
        # reuse the composition study's ESD (seed 0, same testbed preset) and the INE inverted on it
        esd[0], ine = study_art / "esd_striped.safetensors", study_art / "ine_esd_striped.safetensors"
        res["reused_from_study"] = str(study_art)
    for seed, path in enumerate(esd):
        if not path.exists():
            t = time.time()
            cfg = ESDTrainConfig.preset("testbed", testbed_prompts(CONCEPT))
            cfg = ESDTrainConfig(**{**cfg.__dict__, "seed": seed})
            train_esd(m, path, cfg)
            res["timings_s"][f"esd_seed{seed}"] = round(time.time() - t, 1)
    if not ine.exists():
        t = time.time()
        invert(m, ine, concept=CONCEPT, defenses=f'esd(path="{esd[0]}")',
               config=InversionConfig(placeholder="<striped*>", initializer="shape"))
        res["timings_s"]["inversion"] = round(time.time() - t, 1)

    models = {k: v for k, v in {"base": "", "esd": f'esd(path="{esd[0]}")'}.items() if k in args.models}
    records = [r for s in SUITES for r in load_benchmark(f"testbed:{CONCEPT}/{s}", n=args.n)]
    cells = {}
    for mname, edit in models.items():
        presets = ("weak", "medium", "strong", "max") if mname == "esd" else tuple(args.base_sld_presets)
        for gname, (explicit, implicit) in guidance_variants(str(ine), presets).items():
            if args.guidance is not None and gname not in args.guidance:
                continue
            for kind, g in (("explicit", explicit), ("ine", implicit)):
                if gname == "none" and kind == "ine":
                    continue
                stack = "+".join(x for x in (edit, g) if x) or None
                name = f"{mname}|{gname}|{kind}"
                rd = out / name.replace("|", "__")
                t = time.time()
                run_eval(records, rd, defenses=stack, model=m, detectors=[f"testbed:{CONCEPT}"],
                         settings=RunSettings(num_images_per_prompt=1), batch_size=64, progress=False)
                cells[name] = {"stack": stack or "none", **summarize_cell(rd), "seconds": round(time.time() - t, 1)}
                print(name, {s: round(cells[name][s]["rate"]["rate"], 3) for s in SUITES}, flush=True)
    res["cells"] = cells
    esd0 = f'esd(path="{esd[0]}")'
    res["attack"] = {"ine_as_prompt_on_esd": attack_rate(m, str(ine), esd0, 4 * args.n),
                     "ine_as_prompt_on_base": attack_rate(m, str(ine), "", 4 * args.n)}
    # transfer: the INE made on ESD seed 0, used as the negative on ESD seed 1
    tr = {}
    for kind, g in (("explicit", f'negative_prompt(text="{CONCEPT}")'), ("ine", f'negative_prompt(embedding="{ine}")'),
                    ("none", None)):
        stack = "+".join(x for x in (f'esd(path="{esd[1]}")', g) if x)
        rd = out / f"transfer__{kind}"
        run_eval(records, rd, defenses=stack, model=m, detectors=[f"testbed:{CONCEPT}"],
                 settings=RunSettings(num_images_per_prompt=1), batch_size=64, progress=False)
        tr[kind] = summarize_cell(rd)
    res["transfer_to_esd_seed1"] = tr
    res["command"] = (f"python benchmarks/ine_testbed.py --n {args.n} --models {' '.join(args.models)}"
                      + (f" --guidance {' '.join(args.guidance)}" if args.guidance is not None else ""))
    Path("benchmarks/results/ine_testbed.json").write_text(json.dumps(res, indent=2))
    print("| model | guidance | negative | explicit | synonym | implicit | held-out | benign attr. | near-benign concept |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, c in cells.items():
        mn, gn, kind = name.split("|")
        f = lambda s: f"{c[s]['rate']['rate']:.2f}"  # noqa: E731
        print(f"| {mn} | {gn} | {kind} | {f('explicit')} | {f('synonym')} | {f('implicit')} | {f('heldout')} | "
              f"{c['benign']['attributes']['all']:.2f} | {f('near_benign')} |")
    print("attack:", json.dumps(res["attack"]))
    print("transfer:", {k: {s: round(v[s]["rate"]["rate"], 3) for s in SUITES} for k, v in tr.items()})


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
