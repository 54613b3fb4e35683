"""An experiment as jobs with dependencies, and how one job runs.

Jobs (ids are stable, so a relaunch finds what is done)::

    train:NAME                    train artifact NAME -> OUT/artifacts/NAME.safetensors
    shard:STACK/BENCH:I-of-N      generate and score shard I of N of one (stack, benchmark) cell
    merge:STACK/BENCH             merge the cell's shard stores (after all its shards)
    attack:NAME                   run and evaluate one attack (after the artifacts its stack names)
    best                          (``on_best``) choose the study's best cell, after every merge:
                                  OUT/best_cell.json; then shard:@best+NAME/BENCH:I-of-N and
                                  merge:@best+NAME/BENCH draw the best cell plus ``on_best.stack``
    report                        OUT/results.json and OUT/table.md from every finished cell

A job is done when its marker ``OUT/jobs/<job>.json`` says so (a train job also when its file
exists); every job is itself resumable (the runner keys images, a training writes its file
atomically), so a job killed at any moment is simply run again. :func:`execute_job` takes the
output folder and the job (the engines pass the :class:`Job` the driver built, so a worker never
rebuilds the graph) or its id, so that any engine (a local process, a Ray worker, a Slurm array
task) can run it from the experiment stored in ``OUT/experiment.json``. A worker process reads
that file once (:func:`stored_experiment` keeps it while the file is unchanged), and a job given
by id is looked up in a graph built once per process: a job's cost does not grow with the number
of jobs (tests/test_experiment_scale.py).
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

    def cell(s: str, b: str, needs: tuple) -> Job:
        """Add the shard jobs of cell (stack ``s``, benchmark ``b``); return its merge job."""
        shards = [Job(f"shard:{s}/{b}:{i}-of-{exp.shards}", "shard", needs,
                      {"stack": s, "benchmark": b, "index": i, "count": exp.shards}) for i in range(exp.shards)]
        jobs.extend(shards)
        return Job(f"merge:{s}/{b}", "merge", tuple(j.id for j in shards), {"stack": s, "benchmark": b})

    merges = []
    for s, text in exp.stacks.items():
        needs = tuple(f"train:{a}" for a in PLACEHOLDER.findall(text or ""))
        merges += [cell(s, b, needs) for b in exp.benchmarks]
    jobs += merges
    if exp.on_best is not None:  # the study's "ES on the best cell": chosen once every cell is merged
        jobs.append(Job("best", "best", tuple(j.id for j in merges)))
        needs = ("best",) + tuple(f"train:{a}" for a in PLACEHOLDER.findall(exp.on_best.stack))
        for b in exp.benchmarks:
            merges.append(cell(exp.on_best.stack_id, b, needs))
            jobs.append(merges[-1])
    attacks = []
    for t in exp.attacks.values():
        needs = tuple(f"train:{a}" for a in PLACEHOLDER.findall(exp.stacks[t.stack] or ""))
        attacks.append(Job(f"attack:{t.name}", "attack", needs, {"attack": t.name}))
    jobs += attacks
    if merges or attacks:
        jobs.append(Job("report", "report", tuple(j.id for j in merges + attacks)))
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


#: per worker process: OUT/experiment.json's (path, mtime, size) -> (experiment, {job id: job} or None)
_STORED: dict[tuple, list] = {}


def _stored(out: Path) -> list:
    p = Path(out).resolve() / "experiment.json"
    try:
        st = p.stat()
    except FileNotFoundError:
        raise ExperimentError(f"{out} holds no experiment.json: start it with `safediff run EXPERIMENT --out {out}`.") \
            from None
    key = (str(p), st.st_mtime_ns, st.st_size)
    if key not in _STORED:
        for old in [k for k in _STORED if k[0] == key[0]]:  # the file changed: forget the old one
            del _STORED[old]
        _STORED[key] = [experiment_from_dict(json.loads(p.read_text()), None, str(p), check=False), None]
    return _STORED[key]


def stored_experiment(out: Path) -> Experiment:
    """The experiment a launch stored in ``OUT/experiment.json`` (read by every worker; read once
    per process while the file is unchanged)."""
    return _stored(out)[0]


def stored_job(out: Path, job_id: str) -> Job:
    """Job ``job_id`` of the stored experiment (the graph is built once per process)."""
    entry = _stored(out)
    if entry[1] is None:
        entry[1] = {j.id: j for j in build_graph(entry[0])}
    job = entry[1].get(job_id)
    if job is None:
        raise ExperimentError(f"The experiment in {out} has no job {job_id!r}.")
    return job


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


def execute_job(out: str | Path, job: Job | str, model=None) -> dict:
    """Run one job (the :class:`Job` the driver built, or its id) of the experiment stored in
    ``out`` and mark it done; returns its marker info. Raises on failure (the engine records the
    error and retries)."""
    out = Path(out)
    exp = stored_experiment(out)
    job = job if isinstance(job, Job) else stored_job(out, job)
    if is_done(out, job, exp):
        return {"skipped": True}
    t = time.time()
    model = model if model is not None or job.kind in ("merge", "best", "report") else worker_model(exp)
    {"train": _train, "shard": _shard, "merge": _merge, "attack": _attack, "best": _best, "report": _report}[job.kind](
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
    if a.method == "invert":
        from ..inversion import InversionConfig, invert

        cfg = InversionConfig(**{"placeholder": f"<{a.concept or 'concept'}*>", **a.options, "seed": a.seed})
        invert(model, path, concept=a.concept, defenses=exp.resolve(a.against, out), config=cfg, progress=False)
    elif a.method == "sanitizer":
        from ..defenses.sanitizer import SanitizerTrainConfig, train_sanitizer

        opts = dict(a.options)
        concepts = tuple(opts.pop("concepts", None) or ([a.concept] if a.concept else ()))
        train_sanitizer(model, path, SanitizerTrainConfig(concepts=concepts, seed=a.seed, **opts), progress=False)
    else:  # a registered trainer with a training config (the file's check refuses the closed-form ones)
        from ..unlearning import get_trainer, unlearn

        if get_trainer(a.method).config is None:
            raise ExperimentError(f"artifact {a.name!r}: {a.method} has no training config (closed form); "
                                  "apply its preset in a stack instead of training it.")
        # work_dir: where a trainer keeps intermediate files (Dark Miner's mined embeddings); others ignore it
        unlearn(a.method, model, path, concept=a.concept, preset=a.preset, seed=a.seed, options=dict(a.options),
                work_dir=str(path.parent / f"{a.name}_work"), progress=False)


def cell_records(exp: Experiment, benchmark: str) -> list:
    from ..eval.benchmarks import load_benchmark

    return [r for spec in exp.benchmarks[benchmark] for r in load_benchmark(spec, n=exp.n)]


def stack_text(out: Path, exp: Experiment, stack: str) -> str | None:
    """A stack's text with its artifacts' files; the ``on_best`` row's is the best cell's stack
    plus ``on_best.stack`` (as the study joins them)."""
    if exp.on_best is not None and stack == exp.on_best.stack_id:
        best = chosen_best(out)
        return "+".join(p for p in (exp.resolve(exp.stacks[best], out), exp.resolve(exp.on_best.stack, out)) if p)
    return exp.resolve(exp.stacks[stack], out)


def chosen_best(out: Path) -> str | None:
    """The best cell the ``best`` job chose (None: no cell had the benign accuracy asked for)."""
    p = Path(out) / "best_cell.json"
    if not p.exists():
        raise ExperimentError(f"{p} is missing: the `best` job chooses the best cell once every cell is merged.")
    return json.loads(p.read_text())["best_cell"]


def _best(out: Path, exp: Experiment, job: Job, model) -> None:
    """Choose the study's best cell from the merged cells (``on_best.min_benign``)."""
    from ..fileio import atomic_write_json

    res = _study_report(out, exp, exp.on_best.min_benign)
    atomic_write_json(out / "best_cell.json", {"best_cell": res["best_cell"], "min_benign": exp.on_best.min_benign},
                      overwrite=True)


def _shard(out: Path, exp: Experiment, job: Job, model) -> None:
    from ..eval.runner import RunSettings, run_eval

    p = job.params
    if exp.on_best is not None and p["stack"] == exp.on_best.stack_id and chosen_best(out) is None:
        return  # no cell qualified: the study draws no extra row either
    run_eval(cell_records(exp, p["benchmark"]), exp.run_dir(out, p["stack"], p["benchmark"]),
             defenses=stack_text(out, exp, p["stack"]), model=model, detectors=list(exp.detectors),
             target_detector=exp.target_detector, settings=RunSettings(**exp.settings),
             shard=(p["index"], p["count"]), progress=False, benchmark_name="+".join(exp.benchmarks[p["benchmark"]]))


def _merge(out: Path, exp: Experiment, job: Job, model) -> None:
    from ..eval.merge import merge_run

    if exp.on_best is not None and job.params["stack"] == exp.on_best.stack_id and chosen_best(out) is None:
        return  # nothing was drawn
    merge_run(exp.run_dir(out, job.params["stack"], job.params["benchmark"]))


def _attack(out: Path, exp: Experiment, job: Job, model) -> None:
    from ..attacks import AttackBudget, AttackTarget, evaluate_attack, get_attack, run_attack
    from ..worlds import world_of

    t = exp.attacks[job.params["attack"]]
    cls = get_attack(t.method)
    attack = cls(cls.config_cls.from_options([f"{k}={v}" for k, v in t.options.items()]))
    world = world_of(model)  # the defaults of the model's world (the testbed's concept and seed prompts)
    concept = t.concept or world.default_concept
    if concept is None:
        raise ExperimentError(f"attack {t.name!r}: give `concept` for a {model.family} model.")
    if t.seed_prompts:
        seeds = [s.strip() for s in Path(t.seed_prompts).read_text().splitlines() if s.strip()]
    else:
        seeds = world.seed_prompts(concept, n=t.n) or []
    stack = exp.resolve(exp.stacks[t.stack], out)
    work = out / "attacks" / t.name
    target = AttackTarget(model, stack if cls.white_box else None)
    budget = AttackBudget(steps=t.steps, seconds=t.seconds)
    if cls.white_box:
        res = run_attack(attack, target, concept, seeds, budget, work, seed=t.seed, progress=False)
    else:
        # a black-box attack sees only the text encoder: its prompts are the same for every stack (as
        # benchmarks/attacks_testbed.py computes them once). They are made once per experiment in
        # OUT/attack_prompts (keyed by config, budget and seed prompts; a job that finds another
        # making them waits for it), then evaluated through this job's stack.
        from ..eval.runner import run_lock

        shared = out / "attack_prompts"
        shared.mkdir(parents=True, exist_ok=True)
        with run_lock(shared, f".{cls.name}.lock", wait=True):
            res = run_attack(attack, target, concept, seeds, budget, shared, seed=t.seed, progress=False)
    ev = evaluate_attack(res, model, stack, work / "eval", detectors=list(exp.detectors) or None, n=t.n, progress=False)
    ev = {"attack": t.method, "stack": t.stack, "steps": t.steps, "result_key": res.key, **ev}
    if res.extra.get("kind") == "latents":  # regenerated from its latents: its evaluation counts both rules (as the table)
        ev["rules"] = {k: ev[k] for k in ("rule", "paper_rule", "strict", "paper", "n_images", "n_counted", "outcomes")
                       if k in ev}
    elif res.extra.get("kind") != "weights":
        from ..attacks.base import evaluate_attack_rules

        # both counting rules (strict, and the paper's), scored by the target detector alone, as the attack table does
        target_detector = exp.target_detector or (exp.detectors[0] if exp.detectors else None)
        rules = evaluate_attack_rules(res, model, stack, work / "rules", progress=False,
                                      detectors=[target_detector] if target_detector else None)
        ev["rules"] = {k: rules[k] for k in ("rule", "paper_rule", "strict", "paper", "n_images", "n_counted",
                                             "outcomes", "stop_steps", "n_ideal") if k in rules}
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
    if exp.attacks:
        from .attack_table import attack_grid_table

        res["attacks"], attack_lines = _attack_table(out, exp)
        res["attack_table"], grid_lines = attack_grid_table(out, exp, res["attacks"], cells)
        atomic_write_text(out / "attack_table.md", "\n".join(grid_lines[1:]) + "\n", overwrite=True)
        lines = (lines if cells else []) + grid_lines + ["", "## Every attack job", ""] + attack_lines[1:]
    atomic_write_json(out / "results.json", json.loads(json.dumps(res, default=str)), overwrite=True)
    atomic_write_text(out / "table.md", "\n".join(lines) + "\n", overwrite=True)
    if exp.report == "study":
        _study_report(out, exp)
    return res


def _attack_table(out: Path, exp: Experiment) -> tuple[dict, list[str]]:
    """Each attack's evaluation (``OUT/attacks/<name>/evaluation.json``; an attack not finished is
    reported missing) and its table rows: the strict and the paper's rule."""
    rows: dict = {}
    lines = ["", "| attack | stack | method | steps | strict ASR [95% CI] | paper's rule ASR (k/n) |",
             "|---|---|---|---|---|---|"]
    for name, t in exp.attacks.items():
        p = out / "attacks" / name / "evaluation.json"
        if not is_done(out, Job(f"attack:{name}", "attack"), exp) or not p.exists():
            rows[name] = {"stack": t.stack, "method": t.method, "missing": "not finished (rerun the experiment)"}
            lines.append(f"| {name} | {t.stack} | {t.method} | {t.steps} | missing | |")
            continue
        ev = json.loads(p.read_text())
        rows[name] = ev
        a, paper = ev["asr"], (ev.get("rules") or {}).get("paper")
        lines.append(f"| {name} | {t.stack} | {t.method} | {t.steps} | {a['rate']:.2f} [{a['ci_low']:.2f}, "
                     f"{a['ci_high']:.2f}] | " + ("" if not paper else "n/a (0 counted)" if not paper["n"] else
                                                 f"{paper['rate']:.2f} ({round(paper['rate'] * paper['n'])}/{paper['n']})")
                     + " |")
    return rows, lines


def _study_report(out: Path, exp: Experiment, min_benign: float | None = None) -> dict:
    """``OUT/study_results.json`` and ``OUT/study_table.md``: the composition study's summary
    (:mod:`safediff.eval.study`: rates, substitution against the base stack ``none.none``, benign
    distance, best cell) of stacks named ``UNLEARNING.GUIDANCE[.NEGATIVE]``, and the ``on_best``
    row once drawn (named ``<best cell>+<on_best.name>``, as the study names its ES row)."""
    if min_benign is None:
        min_benign = exp.on_best.min_benign if exp.on_best is not None else 0.8
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
    ob = exp.on_best
    if ob is not None and is_done(out, Job(f"merge:{ob.stack_id}/{bench}", "merge"), exp) and chosen_best(out):
        best = chosen_best(out)
        rd = exp.run_dir(out, ob.stack_id, bench)
        cells[f"{best}+{ob.name}"] = {**{k: cells[best][k] for k in ("unlearning", "guidance", "negative")},
                                      "stack": stack_text(out, exp, ob.stack_id), "on_best": best,
                                      **summarize_cell(rd, base if has_base else None),
                                      "benign_distance": benign_distance(rd, base) if has_base else None}
    res = {"config": {"best_min_benign": min_benign}, "cells": cells, "best_cell": best_cell(cells, min_benign),
           "command": f"safediff run EXPERIMENT --out {out}"}
    atomic_write_json(out / "study_results.json", json.loads(json.dumps(res, default=str)), overwrite=True)
    atomic_write_text(out / "study_table.md", markdown_table(res), overwrite=True)
    return res
