"""Experiments as job graphs: ``safediff run EXPERIMENT --out DIR [--engine local|ray|slurm]``.

:func:`run_experiment` validates the file (naming the line of anything wrong) and loads the model
before any job starts, takes the output folder's lock (a second launch of the same folder waits,
with ``wait=True``, or is refused), stores the experiment in ``OUT/experiment.json`` (a relaunch
with another experiment is refused, naming what differs), runs the jobs with the engine and
writes ``OUT/status.json``: what is done, what failed (by name, with its errors) and what is
blocked. A launch killed at any moment is resumed by the same command.
"""

from __future__ import annotations

import json
from pathlib import Path

from .engines import RunOutcome, get_engine
from .graph import Job, build_graph, execute_job
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
            diff = _differences(old, new)
            if diff:
                raise ExperimentError(f"{out} holds another experiment ({'; '.join(diff[:5])}); use a new --out "
                                      "folder, or the same file and --set options to resume it.")
        else:
            atomic_write_json(stored, new)
        jobs = build_graph(exp)
        outcome = eng.run(jobs, out, exp, model=model if engine == "local" else None, progress=progress)
        atomic_write_json(out / "status.json", {"engine": engine, **outcome.to_dict()}, overwrite=True)
        return outcome
    finally:
        lock.__exit__(None, None, None)
