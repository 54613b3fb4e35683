"""Experiments as job graphs: ``safediff run EXPERIMENT --out DIR [--engine local|ray|slurm]``.

:func:`run_experiment` validates the file (naming the line of anything wrong) and loads the model
before any job starts, takes the output folder's lock (a second launch of the same folder waits,
with ``wait=True``, or is refused), stores the experiment in ``OUT/experiment.json`` (a relaunch
with another experiment is refused, naming what differs; one that only adds stacks, artifacts,
attacks, attack targets or benchmarks grows it), runs the jobs with the engine and
writes ``OUT/status.json``: what is done, what failed (by name, with its errors) and what is
blocked. A launch killed at any moment is resumed by the same command.
"""

from __future__ import annotations

import json
from pathlib import Path

from .engines import RunOutcome, get_engine
from .graph import Job, build_graph, execute_job, marker_path
from .spec import Experiment, ExperimentError, check_model_loads, load_experiment, read_experiment_file

__all__ = ["Experiment", "ExperimentError", "Job", "RunOutcome", "build_graph", "execute_job", "load_experiment",
           "run_experiment", "shipped_experiment"]


def shipped_experiment(name: str) -> Path:
    """A experiment file shipped in the package (``testbed_study``)."""
    p = Path(__file__).parent / f"{name}.yaml"
    if not p.exists():
        raise FileNotFoundError(f"No shipped experiment {name!r}; shipped: "
                                f"{sorted(q.stem for q in Path(__file__).parent.glob('*.yaml'))}.")
    return p


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = sorted(set(old) | set(new), key=str)
    out = []
    for k in keys:
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {json.dumps(a, default=str)} -> {json.dumps(b, default=str)}")
    return out


#: the mappings a relaunch may add entries to (new names only: an entry that exists never changes)
GROWABLE_MAPS = (("stacks",), ("artifacts",), ("benchmarks",), ("attacks",), ("attack_grid", "attacks"))
#: the lists a relaunch may append to
GROWABLE_LISTS = (("attack_grid", "targets"),)


def _additions(old: dict, new: dict) -> tuple[list[str], list[str]]:
    """Split what differs between a stored experiment and a relaunch's into what only *adds* jobs
    (a new stack, artifact, benchmark or attack name, the first of their kind included; attack-grid
    targets appended after the stored ones; the first benchmarks' ``n``) and
    everything else (refused). Adding cannot change a job that exists: job ids name their stack,
    benchmark and attack, and every entry the stored experiment has is compared as before."""
    import copy

    trimmed, added = copy.deepcopy(new), []

    def parent(d: dict, path: tuple) -> dict | None:
        for k in path[:-1]:
            d = d.get(k) if isinstance(d, dict) else None
        return d if isinstance(d, dict) else None

    for path in GROWABLE_MAPS:
        o, t = parent(old, path), parent(trimmed, path)
        om = o.get(path[-1]) if o is not None else None
        tm = t.get(path[-1]) if t is not None else None
        if not isinstance(tm, dict):
            continue
        if isinstance(om, dict):
            for name in [k for k in tm if k not in om]:
                added.append(".".join(path + (name,)))
                del tm[name]
        elif om is None and len(path) == 1:  # the first entries (e.g. the first cells of an attack-only experiment)
            added += [f"{path[0]}.{name}" for name in tm]
            del t[path[0]]
            if path == ("benchmarks",) and "n" in trimmed and "n" not in old:
                added.append("n")
                del trimmed["n"]
    for path in GROWABLE_LISTS:
        o, t = parent(old, path), parent(trimmed, path)
        ol = o.get(path[-1]) if o is not None else None
        tl = t.get(path[-1]) if t is not None else None
        if isinstance(ol, list) and isinstance(tl, list) and len(tl) > len(ol) and tl[:len(ol)] == ol:
            added += [".".join(path) + f" +{x}" for x in tl[len(ol):]]
            t[path[-1]] = list(ol)
    return added, _differences(old, trimmed)


def run_experiment(experiment: str | Path, out_dir: str | Path, *, engine: str = "local", overrides=(),
                   wait: bool = False, model=None, progress: bool = True, engine_options: dict | None = None
                   ) -> RunOutcome:
    """Run (resuming) every job of ``experiment`` (a file, or ``shipped:NAME``) into ``out_dir``."""
    from ..eval.runner import RunError, run_lock
    from ..fileio import atomic_write_json

    path = shipped_experiment(str(experiment)[8:]) if str(experiment).startswith("shipped:") else Path(experiment)
    eng = get_engine(engine, **(engine_options or {}))  # a missing extra is named before anything else
    exp = load_experiment(path, list(overrides))
    if model is None:
        _, lines = read_experiment_file(path)
        model = check_model_loads(exp, str(path), lines)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    try:
        lock = run_lock(out, ".experiment.lock", wait=wait)
        lock.__enter__()
    except RunError:
        raise RunError(f"Another launch is running the experiment in {out}; wait for it to finish (or pass --wait "
                       "to wait for it), then run the same command again to finish anything left.") from None
    try:
        stored = out / "experiment.json"
        new = json.loads(json.dumps(exp.raw))
        if stored.exists():
            old = json.loads(stored.read_text())
            added, diff = _additions(old, new)
            if diff:
                raise ExperimentError(f"{out} holds another experiment ({'; '.join(diff[:5])}); use a new --out "
                                      "folder, or the same file and --set options to resume it (a relaunch may only "
                                      "add stacks, artifacts, attacks, attack targets or benchmarks).")
            if added:  # the experiment grows: the jobs already done stay done, the new ones run
                if exp.on_best is not None and any(k.startswith(("stacks", "benchmarks", "n")) for k in added):
                    raise ExperimentError(f"{out} holds a study whose best cell may already be chosen (on_best); adding "
                                          f"{', '.join(added)} could change that choice: use a new --out folder.")
                if progress:
                    print(f"{out}: the experiment grows by {', '.join(added)}")
                atomic_write_json(stored, new, overwrite=True)
                marker_path(out, "report").unlink(missing_ok=True)  # the report is redone with the new jobs
        else:
            atomic_write_json(stored, new)
        jobs = build_graph(exp)
        outcome = eng.run(jobs, out, exp, model=model if engine == "local" else None, progress=progress)
        atomic_write_json(out / "status.json", {"engine": engine, **outcome.to_dict()}, overwrite=True)
        return outcome
    finally:
        lock.__exit__(None, None, None)
