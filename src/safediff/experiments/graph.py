"""An experiment as jobs with dependencies, and how one job runs.

Jobs (ids are stable, so a relaunch finds what is done)::

    train:NAME                    train artifact NAME -> OUT/artifacts/NAME.safetensors
    shard:STACK/BENCH:I-of-N      generate and score shard I of N of one (stack, benchmark) cell
    merge:STACK/BENCH             merge the cell's shard stores (after all its shards)
    attack:NAME                   run and evaluate one attack (after the artifacts its stack names)
    report                        OUT/results.json and OUT/table.md from every finished cell

A job is done when its marker ``OUT/jobs/<job>.json`` says so (a train job also when its file
exists); every job is itself resumable (the runner keys images, a training writes its file
atomically), so a job killed at any moment is simply run again. :func:`execute_job` takes only
the output folder and a job id, so that any engine (a local process, a Ray worker, a Slurm array
task) can run it from the experiment stored in ``OUT/experiment.json``.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from .spec import Experiment, ExperimentError, experiment_from_dict


@dataclass(frozen=True)
class Job:
    id: str
    kind: str
    deps: tuple[str, ...] = ()
    params: dict = field(default_factory=dict, hash=False, compare=False)


def build_graph(exp: Experiment) -> list[Job]:
    """Every job of ``exp``, each after its dependencies."""
    jobs: list[Job] = []
    trained: list[str] = []

    def train(name: str) -> None:
        if f"train:{name}" in trained:
            return
        a = exp.artifacts[name]
        for dep in a.needs():
            train(dep)
        jobs.append(Job(f"train:{name}", "train", tuple(f"train:{d}" for d in a.needs()), {"artifact": name}))
        trained.append(f"train:{name}")

    for name in exp.artifacts:
        train(name)
    from .spec import PLACEHOLDER

    merges = []
    for s, text in exp.stacks.items():
        needs = tuple(f"train:{a}" for a in PLACEHOLDER.findall(text or ""))
        for b in exp.benchmarks:
            shards = [Job(f"shard:{s}/{b}:{i}-of-{exp.shards}", "shard", needs,
                          {"stack": s, "benchmark": b, "index": i, "count": exp.shards}) for i in range(exp.shards)]
            jobs += shards
            merges.append(Job(f"merge:{s}/{b}", "merge", tuple(j.id for j in shards), {"stack": s, "benchmark": b}))
    jobs += merges
    for t in exp.attacks.values():
        needs = tuple(f"train:{a}" for a in PLACEHOLDER.findall(exp.stacks[t.stack] or ""))
        jobs.append(Job(f"attack:{t.name}", "attack", needs, {"attack": t.name}))
    if merges:
        jobs.append(Job("report", "report", tuple(j.id for j in merges)))
    return jobs


# ---------------------------------------------------------------------------------------------
# state on disk
# ---------------------------------------------------------------------------------------------


def marker_path(out: Path, job_id: str) -> Path:
    """``OUT/jobs/<readable part>_<hash of the id>.json``."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", job_id)[:80]
    return Path(out) / "jobs" / f"{stem}_{hashlib.sha256(job_id.encode()).hexdigest()[:10]}.json"


def is_done(out: Path, job: Job, exp: Experiment) -> bool:
    if job.kind == "train" and exp.artifact_path(out, job.params["artifact"]).exists():
        return True
    p = marker_path(out, job.id)
    return p.exists() and json.loads(p.read_text()).get("status") == "done"


def mark(out: Path, job_id: str, status: str, **info) -> None:
    from ..fileio import atomic_write_json

    marker_path(out, job_id).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(marker_path(out, job_id), {"job": job_id, "status": status, "time": time.time(), **info},
                      overwrite=True)


def stored_experiment(out: Path) -> Experiment:
    """The experiment a launch stored in ``OUT/experiment.json`` (read by every worker)."""
    p = Path(out) / "experiment.json"
    if not p.exists():
        raise ExperimentError(f"{out} holds no experiment.json: start it with `safediff run EXPERIMENT --out {out}`.")
    return experiment_from_dict(json.loads(p.read_text()), None, str(p), check=False)


# ---------------------------------------------------------------------------------------------
# running one job
# ---------------------------------------------------------------------------------------------

_MODELS: dict = {}  # one model per worker process, loaded by its first job


def worker_model(exp: Experiment):
    key = (exp.model, exp.dtype, exp.device)
    if key not in _MODELS:
        from ..models import load_model

        _MODELS.clear()
        _MODELS[key] = load_model(exp.model, device=exp.device, dtype=exp.dtype)
    return _MODELS[key]


def execute_job(out: str | Path, job_id: str, model=None) -> dict:
    """Run one job of the experiment stored in ``out`` and mark it done; returns its marker info.
    Raises on failure (the engine records the error and retries)."""
    out = Path(out)
    exp = stored_experiment(out)
    job = next((j for j in build_graph(exp) if j.id == job_id), None)
    if job is None:
        raise ExperimentError(f"The experiment in {out} has no job {job_id!r}.")
    if is_done(out, job, exp):
        return {"skipped": True}
    t = time.time()
    model = model if model is not None or job.kind in ("merge", "report") else worker_model(exp)
    {"train": _train, "shard": _shard, "merge": _merge, "attack": _attack, "report": _report}[job.kind](
        out, exp, job, model)
    info = {"seconds": round(time.time() - t, 2)}
    mark(out, job.id, "done", **info)
    return info


def error_text(e: BaseException) -> str:
    """One line for reports, with the place it was raised."""
    tb = traceback.extract_tb(e.__traceback__)
    where = f" ({Path(tb[-1].filename).name}:{tb[-1].lineno})" if tb else ""
    return f"{type(e).__name__}: {e}{where}"


def _train(out: Path, exp: Experiment, job: Job, model) -> None:
    a = exp.artifacts[job.params["artifact"]]
    path = exp.artifact_path(out, a.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    if a.method in ("esd", "duo", "dark_miner"):
        from ..unlearning import unlearn

        unlearn(a.method, model, path, concept=a.concept, preset=a.preset, seed=a.seed, options=dict(a.options),
                work_dir=str(path.parent / f"{a.name}_work") if a.method == "dark_miner" else None, progress=False)
    elif a.method == "invert":
        from ..inversion import InversionConfig, invert

        cfg = InversionConfig(**{"placeholder": f"<{a.concept or 'concept'}*>", **a.options, "seed": a.seed})
        invert(model, path, concept=a.concept, defenses=exp.resolve(a.against, out), config=cfg, progress=False)
    else:
        from ..defenses.sanitizer import SanitizerTrainConfig, train_sanitizer

        opts = dict(a.options)
        concepts = tuple(opts.pop("concepts", None) or ([a.concept] if a.concept else ()))
        train_sanitizer(model, path, SanitizerTrainConfig(concepts=concepts, seed=a.seed, **opts), progress=False)


def cell_records(exp: Experiment, benchmark: str) -> list:
    from ..eval.benchmarks import load_benchmark

    return [r for spec in exp.benchmarks[benchmark] for r in load_benchmark(spec, n=exp.n)]


def _shard(out: Path, exp: Experiment, job: Job, model) -> None:
    from ..eval.runner import RunSettings, run_eval

    p = job.params
    run_eval(cell_records(exp, p["benchmark"]), exp.run_dir(out, p["stack"], p["benchmark"]),
             defenses=exp.resolve(exp.stacks[p["stack"]], out), model=model, detectors=list(exp.detectors),
             target_detector=exp.target_detector, settings=RunSettings(**exp.settings),
             shard=(p["index"], p["count"]), progress=False, benchmark_name="+".join(exp.benchmarks[p["benchmark"]]))


def _merge(out: Path, exp: Experiment, job: Job, model) -> None:
    from ..eval.merge import merge_run

    merge_run(exp.run_dir(out, job.params["stack"], job.params["benchmark"]))


def _attack(out: Path, exp: Experiment, job: Job, model) -> None:
    from ..attacks import AttackBudget, AttackTarget, evaluate_attack, get_attack, run_attack, seed_prompts_for

    t = exp.attacks[job.params["attack"]]
    cls = get_attack(t.method)
    attack = cls(cls.config_cls.from_options([f"{k}={v}" for k, v in t.options.items()]))
    concept = t.concept or ("striped" if model.is_testbed else None)
    if concept is None:
        raise ExperimentError(f"attack {t.name!r}: give `concept` for a {model.family} model.")
    if t.seed_prompts:
        seeds = [s.strip() for s in Path(t.seed_prompts).read_text().splitlines() if s.strip()]
    else:
        seeds = seed_prompts_for(concept, n=t.n) if model.is_testbed else []
    stack = exp.resolve(exp.stacks[t.stack], out)
    work = out / "attacks" / t.name
    res = run_attack(attack, AttackTarget(model, stack), concept, seeds, AttackBudget(steps=t.steps, seconds=t.seconds),
                     work, seed=t.seed, progress=False)
    ev = evaluate_attack(res, model, stack, work / "eval", detectors=list(exp.detectors) or None, n=t.n, progress=False)
    from ..fileio import atomic_write_json

    atomic_write_json(work / "evaluation.json", json.loads(json.dumps(ev, default=str)), overwrite=True)


def _report(out: Path, exp: Experiment, job: Job | None = None, model=None) -> dict:
    """``OUT/results.json`` (each cell's summary; cells not finished are reported missing) and
    ``OUT/table.md`` (the target rate per cell and suite)."""
    from ..eval.runner import summarize
    from ..fileio import atomic_write_json, atomic_write_text

    cells: dict = {}
    lines = ["| stack | benchmark | images | errors | target rate [95% CI] per suite |", "|---|---|---|---|---|"]
    for s in exp.stacks:
        for b in exp.benchmarks:
            rd = exp.run_dir(out, s, b)
            if not is_done(out, Job(f"merge:{s}/{b}", "merge"), exp):
                cells[f"{s}/{b}"] = {"missing": "not finished (rerun the experiment)"}
                lines.append(f"| {s} | {b} | missing | | |")
                continue
            r = summarize(rd)
            cells[f"{s}/{b}"] = {"stack": exp.stacks[s] or "none", "run_dir": str(rd), **r}
            rates = "; ".join(f"{name} {e['unsafe']['rate']:.2f} [{e['unsafe']['ci_low']:.2f}, {e['unsafe']['ci_high']:.2f}]"
                              for name, e in r.get("suites", {}).items())
            lines.append(f"| {s} | {b} | {r['n_images']} | {r['n_errors']} | {rates} |")
    res = {"experiment": exp.name, "cells": cells}
    atomic_write_json(out / "results.json", json.loads(json.dumps(res, default=str)), overwrite=True)
    atomic_write_text(out / "table.md", "\n".join(lines) + "\n", overwrite=True)
    if exp.report == "study":
        _study_report(out, exp)
    return res


def _study_report(out: Path, exp: Experiment, min_benign: float = 0.8) -> dict:
    """``OUT/study_results.json`` and ``OUT/study_table.md``: the composition study's summary
    (:mod:`safediff.eval.study`: rates, substitution against the base stack ``none.none``, benign
    distance, best cell) of stacks named ``UNLEARNING.GUIDANCE[.NEGATIVE]``."""
    from ..eval.study import benign_distance, best_cell, markdown_table, summarize_cell
    from ..fileio import atomic_write_json, atomic_write_text

    bench = next(iter(exp.benchmarks))
    base = exp.run_dir(out, "none.none", bench)
    has_base = "none.none" in exp.stacks and is_done(out, Job(f"merge:none.none/{bench}", "merge"), exp)
    cells: dict = {}
    for s in exp.stacks:
        parts = s.split(".")
        meta = {"unlearning": parts[0], "guidance": None if parts[1:2] in ([], ["none"]) else parts[1],
                "negative": parts[2] if len(parts) > 2 else None, "stack": exp.resolve(exp.stacks[s], out) or "none"}
        rd = exp.run_dir(out, s, bench)
        if not is_done(out, Job(f"merge:{s}/{bench}", "merge"), exp):
            cells[s] = {**meta, "missing": "not finished (rerun the experiment)"}
            continue
        cells[s] = {**meta, **summarize_cell(rd, base if has_base and rd != base else None),
                    "benign_distance": benign_distance(rd, base) if has_base else None}
    res = {"config": {"best_min_benign": min_benign}, "cells": cells, "best_cell": best_cell(cells, min_benign),
           "command": f"safediff run EXPERIMENT --out {out}"}
    atomic_write_json(out / "study_results.json", json.loads(json.dumps(res, default=str)), overwrite=True)
    atomic_write_text(out / "study_table.md", markdown_table(res), overwrite=True)
    return res
