"""The composition study on the testbed (evaluation issue, part 7).

One resumable command measures how defenses compose::

    safediff study --out runs/study            # n = 100 prompts per cell and suite

The grid is {no unlearning, ESD, AdvUnlearn, UCE, RECE, DUO, Dark Miner} x {negative prompt, SLD, SAFREE} x
{explicit negative, INE}, plus each unlearning method with no guidance, the Embedding Sanitizer
(ES) alone and ES stacked on the best cell. Every cell runs every testbed suite (explicit,
synonym, implicit, held-out, benign, near-concept benign) through the resumable runner with the
exact detector, so a killed study resumes where it stopped (artifacts are reused by file, cells
by the runner's image keys).

Artifacts (all trained on training-side words only; the held-out split is never used):

* ESD, AdvUnlearn (a text-encoder delta, applied by ``delta(path=...)``), DUO and Dark Miner
  deltas with their ``testbed`` presets; UCE and RECE are computed when applied
  (``preset=testbed-<concept>``).
* One INE per unlearning method: concept inversion (``safediff invert``) against *that*
  unlearned model, from images the original model draws, started from the neutral word
  ``shape``; for "no unlearning" it is inverted on the base model.
* The ES with its default training config, for the study's concept.

"Best cell" [a documented choice]: among the grid cells whose benign attribute accuracy is at
least ``best_min_benign`` (default 0.8), the lowest mean target rate over the explicit, synonym,
implicit and held-out suites; ties go to the earlier cell.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

UNLEARNING = ("none", "esd", "advunlearn", "uce", "rece", "duo", "dark_miner")
GUIDANCE = ("negative_prompt", "sld", "safree")
NEGATIVES = ("explicit", "ine")
CONCEPT_SUITES = ("explicit", "synonym", "implicit", "heldout")


@dataclass(frozen=True)
class StudyConfig:
    """Args:
    concept: the testbed concept the study erases (``striped`` or ``caged``).
    n: prompts per cell and suite (the issue asks for >= 100).
    sld_preset: the SLD preset of the grid's SLD column.
    unlearning / guidance: restrict the grid (default: all); cells not run are reported missing.
    batch_size: generation batch size. seed: seeds every training run and inversion.
    quick: cut-down training configs (seconds) for tests; never for reported figures.
    best_min_benign: benign attribute accuracy a cell needs to be the "best cell".
    """

    concept: str = "striped"
    n: int = 100
    sld_preset: str = "medium"
    unlearning: tuple[str, ...] = UNLEARNING
    guidance: tuple[str, ...] = GUIDANCE
    batch_size: int = 64
    seed: int = 0
    quick: bool = False
    best_min_benign: float = 0.8

    def __post_init__(self) -> None:
        from ..testbed import world

        if self.concept not in world.CONCEPTS:
            raise ValueError(f"Unknown testbed concept {self.concept!r}; choose one of {sorted(world.CONCEPTS)}.")
        for name in ("n", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` (--{name.replace('_', '-')}) must be a whole number >= 1, got {value!r}.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise ValueError(f"`seed` (--seed) must be a whole number in [0, 2**63), got {self.seed!r}.")
        for name, given, allowed in (("unlearning", self.unlearning, UNLEARNING), ("guidance", self.guidance, GUIDANCE)):
            bad = [g for g in given if g not in allowed]
            if bad:
                raise ValueError(f"Unknown {name} method(s) {bad}; choose from {list(allowed)}.")
        if self.sld_preset not in ("weak", "medium", "strong", "max"):
            raise ValueError(f"`sld_preset` must be weak, medium, strong or max, got {self.sld_preset!r}.")


@dataclass
class Cell:
    name: str
    unlearning: str
    guidance: str | None
    negative: str | None
    stack: str | None
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# artifacts
# ---------------------------------------------------------------------------------------------


def train_configs(cfg: StudyConfig) -> dict:
    from ..defenses.sanitizer import SanitizerTrainConfig
    from ..inversion import InversionConfig
    from ..unlearning import advunlearn
    from ..unlearning.dark_miner import DarkMinerTrainConfig
    from ..unlearning.duo import DUOTrainConfig
    from ..unlearning.esd import ESDTrainConfig, testbed_prompts

    esd = ESDTrainConfig.preset("testbed", testbed_prompts(cfg.concept))
    esd = dataclasses.replace(esd, seed=cfg.seed, **({"iterations": 3, "ddim_steps": 4} if cfg.quick else {}))
    adv = advunlearn.AdvUnlearnTrainConfig.preset("testbed-tiny" if cfg.quick else "testbed",
                                                  advunlearn.testbed_prompts(cfg.concept), seed=cfg.seed)
    duo = DUOTrainConfig.preset("testbed", concept=cfg.concept, seed=cfg.seed,
                                **({"steps": 2, "num_pairs": 4} if cfg.quick else {}))
    dm = DarkMinerTrainConfig.preset("testbed", concept=cfg.concept, seed=cfg.seed,
                                     **(dict(num_images=4, mine_steps=2, verify_images=2, iterations=2, max_rounds=1,
                                             mine_batch=2, batch_size=2) if cfg.quick else {}))
    inv = InversionConfig(placeholder=f"<{cfg.concept}*>", initializer="shape", seed=cfg.seed,
                          **(dict(steps=2, num_images=4, batch_size=2) if cfg.quick else {}))
    es = SanitizerTrainConfig(concepts=(cfg.concept,), seed=cfg.seed, **({"steps": 2} if cfg.quick else {}))
    return {"esd": esd, "advunlearn": adv, "duo": duo, "dark_miner": dm, "inversion": inv, "sanitizer": es}


def edit_stack(method: str, artifacts: dict[str, str], concept: str) -> str | None:
    """The weight-edit part of a cell's stack (AdvUnlearn's text-encoder delta: ``delta(path=...)``)."""
    if method == "none":
        return None
    if method in ("uce", "rece"):
        return f"{method}(preset=testbed-{concept})"
    if method == "advunlearn":
        return f'delta(path="{artifacts[method]}")'
    return f'{method}(path="{artifacts[method]}")'


def prepare_artifacts(model, cfg: StudyConfig, out: Path, progress: bool = True) -> tuple[dict[str, str], dict[str, float]]:
    """Train whatever artifact is missing under ``out/artifacts`` (a finished file is reused).
    Returns paths and the seconds each training took in this call."""
    from ..defenses.sanitizer import train_sanitizer
    from ..inversion import invert
    from ..unlearning.advunlearn import train_advunlearn
    from ..unlearning.dark_miner import train_dark_miner
    from ..unlearning.duo import train_duo
    from ..unlearning.esd import train_esd

    tc = train_configs(cfg)
    adir = out / "artifacts"
    adir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, str] = {}
    seconds: dict[str, float] = {}
    trainers = {
        "esd": lambda p: train_esd(model, p, tc["esd"], progress=progress),
        "advunlearn": lambda p: train_advunlearn(model, p, tc["advunlearn"], progress=progress),
        "duo": lambda p: train_duo(model, p, tc["duo"], progress=progress),
        "dark_miner": lambda p: train_dark_miner(model, p, tc["dark_miner"], work_dir=adir / "dark_miner_work",
                                                 progress=progress),
    }
    for method in cfg.unlearning:
        if method in trainers:
            p = adir / f"{method}_{cfg.concept}.safetensors"
            if not p.exists():
                t = time.time()
                trainers[method](p)
                seconds[method] = round(time.time() - t, 1)
            paths[method] = str(p)
    for method in cfg.unlearning:  # one INE per unlearned model, inverted on that model
        p = adir / f"ine_{method}_{cfg.concept}.safetensors"
        if not p.exists():
            t = time.time()
            invert(model, p, concept=cfg.concept, defenses=edit_stack(method, paths, cfg.concept),
                   config=tc["inversion"], progress=progress)
            seconds[f"ine_{method}"] = round(time.time() - t, 1)
        paths[f"ine_{method}"] = str(p)
    p = adir / f"sanitizer_{cfg.concept}.safetensors"
    if not p.exists():
        t = time.time()
        train_sanitizer(model, p, tc["sanitizer"], progress=progress)
        seconds["sanitizer"] = round(time.time() - t, 1)
    paths["sanitizer"] = str(p)
    return paths, seconds


# ---------------------------------------------------------------------------------------------
# the grid
# ---------------------------------------------------------------------------------------------


def guidance_stack(guidance: str, negative: str, ine: str, concept: str, sld_preset: str) -> str:
    """One guidance defense with the explicit concept word or the INE file as its negative."""
    explicit = negative == "explicit"
    if guidance == "negative_prompt":
        return f'negative_prompt(text="{concept}")' if explicit else f'negative_prompt(embedding="{ine}")'
    if guidance == "sld":
        return (f'sld(preset={sld_preset}, concept="{concept}")' if explicit
                else f'sld(preset={sld_preset}, concept_embedding="{ine}")')
    if guidance == "safree":
        return (f"safree(preset=testbed-{concept})+safree_svf" if explicit
                else f'safree(preset=testbed-{concept}, embedding="{ine}")+safree_svf')
    raise ValueError(f"Unknown guidance method {guidance!r}.")


def _join(*parts: str | None) -> str | None:
    return "+".join(p for p in parts if p) or None


def grid_cells(cfg: StudyConfig, artifacts: dict[str, str]) -> list[Cell]:
    """Every grid cell, the unlearning-only rows and ES alone, in the order they run."""
    cells = []
    for u in cfg.unlearning:
        cells.append(Cell(f"{u}|none|-", u, None, None, edit_stack(u, artifacts, cfg.concept)))
    cells.append(Cell("none|sanitizer|-", "none", "sanitizer", None, f'sanitizer(path="{artifacts["sanitizer"]}")'))
    for g in cfg.guidance:
        for u in cfg.unlearning:
            for neg in NEGATIVES:
                gs = guidance_stack(g, neg, artifacts[f"ine_{u}"], cfg.concept, cfg.sld_preset)
                cells.append(Cell(f"{u}|{g}|{neg}", u, g, neg, _join(edit_stack(u, artifacts, cfg.concept), gs)))
    return cells


def cell_dir(out: Path, name: str) -> Path:
    return out / "cells" / name.replace("|", "__").replace("-", "_")


def summarize_cell(run_dir: Path, base_dir: Path | None = None) -> dict:
    """Per suite: target rate (95% CI over prompts), benign attribute accuracy, spoiled rate and
    the other concepts' rates; over the concept suites pooled, ``substitution``: the other
    concepts' rates and, against the base cell ``base_dir`` (same prompts and seeds), the "moved"
    share and the difference from the base (:func:`safediff.eval.runner.substitution`)."""
    from .runner import substitution, summarize

    s = summarize(run_dir, base_dir=base_dir)
    out = {"n_images": s["n_images"], "n_errors": s["n_errors"], "n_refused": s["n_refused"],
           "seconds_per_image": s["seconds_per_image"], "suites": {}}
    for name, e in s.get("suites", {}).items():
        out["suites"][name] = {"rate": e["unsafe"], "attributes": e["attributes"], "spoiled": e.get("spoiled"),
                               "substitution": e.get("substitution")}
    out["substitution"] = substitution(run_dir, base_dir=base_dir,
                                       where=lambda r: r["extra"].get("suite") in CONCEPT_SUITES)
    return out


def benign_distance(run_dir: Path, base_dir: Path) -> float | None:
    """Mean absolute pixel difference (0-1) between a cell's benign-suite images and the
    unedited, undefended model's images for the same prompts and seeds (what a defense changes
    where it should change nothing)."""
    import numpy as np
    from PIL import Image

    from .runner import load_results

    def images(d: Path) -> dict:
        return {(r["prompt_id"], r["seed"], r["image_index"]): d / r["path"] for r in load_results(d)
                if r["extra"].get("suite") == "benign" and r["path"]}

    a, b = images(run_dir), images(base_dir)  # any protocol's rows: the image paths are the same
    common = sorted(set(a) & set(b))
    if not common:
        return None
    diffs = [np.abs(np.asarray(Image.open(a[k]), dtype=np.float32) - np.asarray(Image.open(b[k]), dtype=np.float32)).mean() / 255
             for k in common]
    return float(np.mean(diffs))


def best_cell(results: dict[str, dict], min_benign: float) -> str | None:
    """The grid cell (guidance present) with the lowest mean concept-suite rate among those whose
    benign attribute accuracy is >= ``min_benign``."""
    best, best_score = None, None
    for name, r in results.items():
        if r.get("guidance") in (None, "sanitizer") or "suites" not in r:
            continue
        acc = (r["suites"].get("benign", {}).get("attributes") or {}).get("all", 0.0)
        if acc < min_benign:
            continue
        score = sum(r["suites"][s]["rate"]["rate"] for s in CONCEPT_SUITES) / len(CONCEPT_SUITES)
        if best_score is None or score < best_score:
            best, best_score = name, score
    return best


def run_study(out_dir: str | Path, cfg: StudyConfig = StudyConfig(), *, model=None, progress: bool = True,
              max_cells: int | None = None) -> dict:
    """Run (resuming) the composition study into ``out_dir``; returns and writes ``results.json``
    and ``table.md``. ``max_cells`` stops after that many cells were *run in this call* (the rest
    are reported missing; call again to continue)."""
    from ..models import load_model
    from ..testbed import world
    from ..testbed.suites import SUITES
    from .benchmarks import load_benchmark
    from .runner import RunSettings, run_eval

    if max_cells is not None and (isinstance(max_cells, bool) or not isinstance(max_cells, int) or max_cells < 1):
        raise ValueError(f"`max_cells` (--max-cells) must be a whole number >= 1, got {max_cells!r}.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cpath = out / "study.json"
    cdict = dataclasses.asdict(cfg)
    if cpath.exists():
        from ..fileio import read_json

        old = read_json(cpath, "the study's config")
        if {k: v for k, v in old.items() if k != "max_cells"} != json.loads(json.dumps(cdict)):
            raise ValueError(f"{out} holds a study with another config ({old}); use a new --out directory.")
    else:
        from ..fileio import atomic_write_json

        atomic_write_json(cpath, cdict)
    model = model if model is not None else load_model(None, dtype="fp32")  # the study trains: fp32 weights
    if not model.is_testbed:  # the study is the testbed's own experiment: its presets, suites and detectors throughout
        raise ValueError("The composition study runs on the testbed (its suites need the exact detectors); "
                         f"got a {model.family} model.")
    if progress:
        print(f"study stage 1/2: the artifacts (ESD, AdvUnlearn, DUO, Dark Miner, one INE per unlearned model, ES) in "
              f"{out / 'artifacts'}; finished ones are reused", flush=True)
    artifacts, train_seconds = prepare_artifacts(model, cfg, out, progress=progress)
    rpath = out / "results.json"
    prev = json.loads(rpath.read_text()) if rpath.exists() else {}
    timings = {**prev.get("train_seconds", {}), **train_seconds}
    records = [r for s in SUITES for r in load_benchmark(f"testbed:{cfg.concept}/{s}", n=cfg.n)]
    cells = grid_cells(cfg, artifacts)
    results: dict[str, dict] = {}
    ran = 0

    def run_cell(cell: Cell) -> None:
        nonlocal ran
        rd = cell_dir(out, cell.name)
        done = (rd / "run.json").exists() and cell.name in prev.get("cells", {}) and "suites" in prev["cells"][cell.name]
        if not done and max_cells is not None and ran >= max_cells:
            results[cell.name] = {**_meta(cell), "missing": "not run yet (resume the study)"}
            return
        t = time.time()
        # every testbed concept's detector scores every image (substitution); the study's concept is the target
        run_eval(records, rd, defenses=cell.stack, model=model, detectors=[f"testbed:{c}" for c in world.CONCEPTS],
                 target_detector=f"testbed:{cfg.concept}", settings=RunSettings(num_images_per_prompt=1),
                 batch_size=cfg.batch_size, progress=progress)
        if not done:
            ran += 1
        base_dir = cell_dir(out, "none|none|-")
        has_base = (base_dir / "run.json").exists() and rd != base_dir
        dist = benign_distance(rd, base_dir) if (base_dir / "run.json").exists() else None
        results[cell.name] = {**_meta(cell), **summarize_cell(rd, base_dir if has_base else None), "benign_distance": dist,
                              "wall_seconds": prev.get("cells", {}).get(cell.name, {}).get("wall_seconds")
                              if done else round(time.time() - t, 1)}
        _write(out, cfg, artifacts, timings, results, cells)

    bar_cells = cells
    if progress:
        from tqdm.auto import tqdm

        finished = sum(1 for c in cells if "suites" in prev.get("cells", {}).get(c.name, {}))
        print(f"study stage 2/2: {len(cells)} cells x {len(records)} prompts ({finished} cells already done)", flush=True)
        bar_cells = tqdm(cells, desc="study cells", unit="cell")
    for cell in bar_cells:
        run_cell(cell)
    best = best_cell(results, cfg.best_min_benign)
    if best is not None:
        b = next(c for c in cells if c.name == best)
        es = f'sanitizer(path="{artifacts["sanitizer"]}")'
        extra = Cell(f"{best}+sanitizer", b.unlearning, b.guidance, b.negative, _join(b.stack, es), {"on_best": best})
        cells.append(extra)
        run_cell(extra)
    return _write(out, cfg, artifacts, timings, results, cells)


def _meta(cell: Cell) -> dict:
    return {"unlearning": cell.unlearning, "guidance": cell.guidance, "negative": cell.negative,
            "stack": cell.stack or "none", **cell.extra}


def _write(out: Path, cfg: StudyConfig, artifacts: dict, timings: dict, results: dict, cells: list[Cell]) -> dict:
    full = {c.name: results.get(c.name, {**_meta(c), "missing": "not run yet (resume the study)"}) for c in cells}
    for u in UNLEARNING:  # methods left out of this study are reported missing, never invented
        if u not in cfg.unlearning:
            full[f"{u}|none|-"] = {"unlearning": u, "guidance": None, "negative": None, "missing": "not in this study's config"}
    res = {"config": dataclasses.asdict(cfg), "artifacts": artifacts, "train_seconds": timings, "cells": full,
           "best_cell": best_cell(full, cfg.best_min_benign),
           "command": f"safediff study --out {out} --concept {cfg.concept} --n {cfg.n} --sld-preset {cfg.sld_preset}"}
    from ..fileio import atomic_write_json, atomic_write_text

    # the study's own summary files, regenerated as cells finish (the study resumes in its folder)
    atomic_write_json(out / "results.json", res, overwrite=True)
    atomic_write_text(out / "table.md", markdown_table(res), overwrite=True)
    write_plots(res, out)
    return res


def write_plots(res: dict, out: Path) -> None:
    """``plot_quality.svg`` (mean concept rate vs benign attribute accuracy) and
    ``plot_overrefusal.svg`` (mean concept rate vs near-concept spoiled rate), one point per cell."""
    from .report import svg_scatter

    quality, over = [], []
    for name, c in res["cells"].items():
        if "suites" not in c:
            continue
        s = c["suites"]
        y = sum(s[k]["rate"]["rate"] for k in CONCEPT_SUITES) / len(CONCEPT_SUITES)
        quality.append(((s["benign"].get("attributes") or {}).get("all", float("nan")), y, name))
        over.append(((s["near_benign"].get("spoiled") or {}).get("rate", float("nan")), y, name))
    from ..fileio import atomic_write_text

    atomic_write_text(out / "plot_quality.svg", svg_scatter(quality, "benign attribute accuracy", "mean concept rate",
                                                            640, 420), overwrite=True)
    atomic_write_text(out / "plot_overrefusal.svg", svg_scatter(over, "near-concept spoiled rate", "mean concept rate",
                                                                640, 420), overwrite=True)


def substitution_cells(sub: dict | None) -> str:
    """The study table's three substitution cells (empty where not measured)."""
    if not sub:
        return " | | "
    o = sub["any_other"]
    cells = [f"{o['rate']:.2f} [{o['ci_low']:.2f}, {o['ci_high']:.2f}]"]
    d = (sub.get("other_minus_base") or {}).get("any_other")
    cells.append("" if not d or not d["n"] else f"{d['diff']:+.2f} [{d['ci_low']:+.2f}, {d['ci_high']:+.2f}]")
    m = sub.get("moved")
    cells.append("" if not m else "n/a (0 pairs)" if not m["n"] else f"{m['rate']:.2f} ({m['n_positive']}/{m['n']})")
    return " | ".join(cells)


def markdown_table(res: dict) -> str:
    """One row per cell: target rate [95% CI] per concept suite, benign accuracy, near-benign
    concept rate and spoiled rate, then substitution over the concept suites pooled (the other
    concepts' rate, its difference from the base cell's, the share moved to another concept),
    seconds per image."""
    def rate(c, s):
        r = c["suites"][s]["rate"]
        return f"{r['rate']:.2f} [{r['ci_low']:.2f}, {r['ci_high']:.2f}]"

    lines = ["| unlearning | guidance | negative | explicit | synonym | implicit | held-out | benign acc. | "
             "benign dist. | near-benign concept | near-benign spoiled | other concept | other - base | moved | s/img |",
             "|" + "---|" * 15]
    for name, c in res["cells"].items():
        u, g, neg = c.get("unlearning"), c.get("guidance") or "none", c.get("negative") or "-"
        if "on_best" in c:
            g = f"{g} + ES (on best)"
        if "suites" not in c:
            lines.append(f"| {u} | {g} | {neg} | missing: {c.get('missing')} |" + " |" * 11)
            continue
        s = c["suites"]
        acc = (s["benign"].get("attributes") or {}).get("all")
        sp = (s["near_benign"].get("spoiled") or {}).get("rate")
        dist = "" if c.get("benign_distance") is None else f"{c['benign_distance']:.3f}"
        lines.append(f"| {u} | {g} | {neg} | {rate(c, 'explicit')} | {rate(c, 'synonym')} | {rate(c, 'implicit')} | "
                     f"{rate(c, 'heldout')} | {acc:.2f} | {dist} | {rate(c, 'near_benign')} | "
                     f"{'' if sp is None else f'{sp:.2f}'} | {substitution_cells(c.get('substitution'))} | "
                     f"{c['seconds_per_image']:.3f} |")
    lines.append("\nOther concept: the share of concept-suite images unsafe under another testbed concept; other - base: "
                 "its paired difference from the base cell's (same prompts and seeds); moved: among images whose base "
                 "image shows the target concept and whose own does not, the share showing another concept "
                 "(k/n; docs/evaluation.md). Blank: a cell scored by one detector (made before substitution was "
                 "measured) or the base cell itself.")
    shown = {"explicit", "synonym", "implicit", "heldout", "benign", "near_benign"}
    extra = sorted({s for c in res["cells"].values() for s in c.get("suites", {})} - shown)
    if extra:  # other suites drawn with the study's (e.g. world v3's hidden forms): the target rate in each
        lines += ["", "Other suites (target concept rate [95% CI]; "
                  "world v3: docs/testbed.md, 'The v3 suites'):", "",
                  "| unlearning | guidance | negative | " + " | ".join(extra) + " |", "|" + "---|" * (3 + len(extra))]
        for c in res["cells"].values():
            if "suites" not in c:
                continue
            u, g, neg = c.get("unlearning"), c.get("guidance") or "none", c.get("negative") or "-"
            lines.append(f"| {u} | {g} | {neg} | "
                         + " | ".join(rate(c, s) if s in c["suites"] else "" for s in extra) + " |")
    if res.get("best_cell"):
        lines.append(f"\nBest cell (benign accuracy >= {res['config']['best_min_benign']}): `{res['best_cell']}`.")
    lines.append(f"\nCommand: `{res['command']}`")
    return "\n".join(lines) + "\n"
