"""The experiment file: what to train, which stacks, benchmarks, detectors and attacks to run.

An experiment file is YAML (JSON is YAML too)::

    name: my-study
    model: testbed                # `testbed`, a local diffusers folder or a Hub id
    dtype: fp32                   # auto, fp32, fp16, bf16 (training artifacts needs fp32)
    n: 100                        # prompts per benchmark spec
    shards: 4                     # shard jobs per (stack, benchmark) cell
    settings: {num_inference_steps: 20, batch_size: 32}   # the runner's RunSettings
    detectors: [testbed:striped, testbed:caged]
    target_detector: testbed:striped
    artifacts:                    # trained before any stack that names them
      esd_striped: {method: esd, concept: striped, seed: 0, options: {iterations: 300}}
      ine_esd_striped: {method: invert, concept: striped, against: 'esd(path="{artifact:esd_striped}")'}
    stacks:                       # a stack per name; `{artifact:NAME}` is that artifact's file
      none: null
      esd.sld: 'esd(path="{artifact:esd_striped}")+sld(preset=medium, concept="striped")'
    benchmarks:                   # one spec or a list of specs run together
      testbed: [testbed:striped/explicit, testbed:striped/benign]
    attacks:
      ring: {method: ring_a_bell, stack: esd.sld, concept: striped, steps: 20, n: 8}
    attack_grid:                  # more attacks: each of its `attacks` on each target, named <target>.<attack>
      targets: [none, esd.sld]    # stack names (default: every stack)
      attacks:                    # NAME: the attack's keys but `stack` (method: NAME when left out)
        p4d: {steps: 30}
        uda: {method: unlearndiffatk, steps: 40, options: {check_every: 20}}
      concept: striped            # defaults of every attack it makes (concept, steps, seconds, n, seed,
      n: 8                        # options, seed_prompts); an attack's own keys replace them
    report: cells                 # or `study`: also the composition study's table (study_table.md)
    on_best: {name: sanitizer, stack: 'sanitizer(path="{artifact:es}")', min_benign: 0.8}
                                  # report: study only: the study's "ES on the best cell" row

``attack_grid`` makes the same entries as writing each out under ``attacks`` (checked alike; an
error names the grid's line), so ``--set attack_grid.n=2`` changes every attack it makes (whose own
keys do not set ``n``); a name it makes that ``attacks`` also declares is refused, naming both lines.

Stacks with attacks and no benchmarks is an attack table (``shipped:testbed_attacks``): the report
lists each attack's strict and paper's-rule success rates.

Every (stack, benchmark) pair is one run directory, ``OUT/runs/<stack>/<benchmark>``.
:func:`load_experiment` refuses, before any job starts and naming the file's line, an unknown
key, stack, defense option, benchmark, detector, attack or artifact method, an artifact named
but not declared, a cycle between artifacts, and (``check_model=True``) a model that cannot load.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

TOP_KEYS = {"name", "model", "dtype", "device", "n", "shards", "settings", "detectors", "target_detector",
            "artifacts", "stacks", "benchmarks", "attacks", "attack_grid", "max_attempts", "report", "on_best"}
REPORTS = ("cells", "study")
#: artifact methods besides the registered trainers (:func:`artifact_methods`)
OTHER_ARTIFACT_METHODS = ("invert", "sanitizer")
ARTIFACT_KEYS = {"method", "concept", "seed", "options", "against", "preset"}
ATTACK_KEYS = {"method", "stack", "concept", "steps", "seconds", "n", "seed", "options", "seed_prompts"}
#: attack_grid's keys: its targets and attacks, and the defaults of every attack it makes
GRID_KEYS = {"targets", "attacks"} | (ATTACK_KEYS - {"method", "stack"})
ON_BEST_KEYS = {"name", "stack", "min_benign"}
SETTINGS_KEYS = {"num_images_per_prompt", "seed", "guidance_scale", "num_inference_steps", "respect_prompt_seed",
                 "respect_prompt_guidance", "batch_size", "height", "width", "respect_prompt_size"}
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
PLACEHOLDER = re.compile(r"\{artifact:([^}]*)\}")


class ExperimentError(ValueError):
    """An experiment file that cannot run (the message names the file, the line and the fix)."""


@dataclass(frozen=True)
class Artifact:
    name: str
    method: str
    concept: str | None = None
    seed: int = 0
    options: dict = field(default_factory=dict)
    against: str | None = None  # invert: the stack (with placeholders) the inversion runs against
    preset: str | None = None

    def needs(self) -> list[str]:
        """The artifacts this one is trained against."""
        return PLACEHOLDER.findall(self.against or "")


@dataclass(frozen=True)
class Attack:
    name: str
    method: str
    stack: str
    concept: str | None = None
    steps: int | None = None
    seconds: float | None = None
    n: int = 16
    seed: int = 0
    options: dict = field(default_factory=dict)
    seed_prompts: str | None = None


@dataclass(frozen=True)
class OnBest:
    """``report: study``'s extra row: ``stack`` added to the best cell (the study's "ES on the best
    cell"), chosen once every cell is merged (:func:`safediff.eval.study.best_cell`)."""

    name: str
    stack: str
    min_benign: float = 0.8

    @property
    def stack_id(self) -> str:
        """The row's name in job ids and ``OUT/runs`` (``@`` never starts a stack's name)."""
        return f"@best+{self.name}"


@dataclass
class Experiment:
    """A validated experiment (see the module's docstring for the file's keys)."""

    name: str
    model: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    n: int | None = None
    shards: int = 1
    settings: dict = field(default_factory=dict)
    detectors: tuple[str, ...] = ()
    target_detector: str | None = None
    artifacts: dict[str, Artifact] = field(default_factory=dict)
    stacks: dict[str, str | None] = field(default_factory=dict)
    benchmarks: dict[str, tuple[str, ...]] = field(default_factory=dict)
    attacks: dict[str, Attack] = field(default_factory=dict)
    max_attempts: int = 3
    report: str = "cells"  # "study": also the composition study's table (stacks named UNLEARNING.GUIDANCE[.NEGATIVE])
    on_best: OnBest | None = None  # report: study's extra row (stack added to the best cell)
    raw: dict = field(default_factory=dict)  # the file's data (after --set), stored in the output folder

    def artifact_path(self, out: Path, name: str) -> Path:
        return Path(out) / "artifacts" / f"{name}.safetensors"

    def resolve(self, text: str | None, out: Path) -> str | None:
        """A stack text with every ``{artifact:NAME}`` replaced by that artifact's file."""
        if text is None:
            return None
        return PLACEHOLDER.sub(lambda m: str(self.artifact_path(out, m.group(1))), text)

    def run_dir(self, out: Path, stack: str, benchmark: str) -> Path:
        return Path(out) / "runs" / stack / benchmark


# ---------------------------------------------------------------------------------------------
# loading with line numbers
# ---------------------------------------------------------------------------------------------


def _lines(node: yaml.Node, path: tuple = (), out: dict | None = None) -> dict[tuple, int]:
    """1-based line of every key path in a composed YAML document."""
    out = {} if out is None else out
    out.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            key = k.value
            out[path + (key,)] = k.start_mark.line + 1
            _lines(v, path + (key,), out)
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            _lines(v, path + (i,), out)
    return out


def read_experiment_file(path: str | Path) -> tuple[dict, dict[tuple, int]]:
    """The file's data and the line of each key path."""
    p = Path(path)
    if not p.is_file():
        raise ExperimentError(f"Experiment file {p} does not exist (give a YAML file; `safediff run --help`).")
    text = p.read_text()
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ExperimentError(f"{p}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ExperimentError(f"{p}:1: an experiment file is a mapping of keys (name, model, stacks, ...), "
                              f"got {type(data).__name__}.")
    return data, _lines(node)


def apply_overrides(data: dict, overrides: list[str], lines: dict[tuple, int]) -> dict:
    """``KEY=VALUE`` settings (dotted keys, YAML values) that replace the file's, e.g. ``n=2`` or
    ``settings.num_inference_steps=2``; their "line" is the command line."""
    data = json.loads(json.dumps(data))
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ExperimentError(f"--set {item!r}: write KEY=VALUE (e.g. --set n=2 or --set settings.batch_size=8).")
        parts = key.split(".")
        target = data
        for p in parts[:-1]:
            target = target.setdefault(p, {})
            if not isinstance(target, dict):
                raise ExperimentError(f"--set {item!r}: {p} is not a mapping in the experiment file.")
        target[parts[-1]] = yaml.safe_load(value)
        lines[tuple(parts)] = 0  # 0: given on the command line
    return data


def load_experiment(path: str | Path, overrides: list[str] = (), *, check: bool = True) -> Experiment:
    """Read and validate an experiment file (``overrides``: ``KEY=VALUE`` from ``--set``)."""
    data, lines = read_experiment_file(path)
    data = apply_overrides(data, list(overrides), lines)
    return experiment_from_dict(data, lines, str(path), check=check)


def _where(source: str, lines: dict[tuple, int], path: tuple) -> str:
    for i in range(len(path), -1, -1):
        line = lines.get(path[:i])
        if line is not None:
            return f"{source}:{line}" if line else f"{source} (--set {'.'.join(map(str, path))})"
    return source


def experiment_from_dict(data: dict, lines: dict[tuple, int] | None = None, source: str = "experiment",
                         *, check: bool = True) -> Experiment:
    """Validate ``data`` (an experiment file's mapping). ``check`` also loads every benchmark and
    detector (cheap checks that catch a typo before hours of work)."""
    lines = lines or {}
    grid_origin: dict[str, Any] = {}  # attack name -> where attack_grid wrote each of its keys

    def fail(path: tuple, msg: str):
        if path[:1] == ("attacks",) and len(path) > 1 and path[1] in grid_origin:
            path = grid_origin[path[1]](tuple(path[2:]))  # an attack the grid made: the grid's line
        raise ExperimentError(f"{_where(source, lines, path)}: {msg}")

    def mapping(key: str) -> dict:
        v = data.get(key) or {}
        if not isinstance(v, dict):
            fail((key,), f"`{key}` is a mapping of NAME: ..., got {type(v).__name__}.")
        for name in v:
            if not isinstance(name, str) or not NAME.match(name):
                fail((key, name), f"{key} name {name!r} must be letters, digits, _ . + - (it names a folder).")
        return v

    def entry(where: tuple, kind: str, name: str, value, keys: set, shape: str) -> dict:
        """One named artifact / attack: a mapping whose keys are all in ``keys``."""
        if not isinstance(value, dict):
            fail(where, f"{kind} {name!r} is a mapping with {shape}.")
        bad = sorted(set(value) - keys)
        if bad:
            fail(where + (bad[0],), f"unknown {kind} key {bad[0]!r}; the keys are {sorted(keys)}.")
        return value

    def integer(path: tuple, v, low: int) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            fail(path, f"`{path[-1]}` must be a whole number >= {low}, got {v!r}.")
        return v

    unknown = sorted(set(data) - TOP_KEYS)
    if unknown:
        fail((unknown[0],), f"unknown key {unknown[0]!r}; the keys are {sorted(TOP_KEYS)}.")
    name = data.get("name") or Path(source).stem
    model = data.get("model")
    model = None if model in (None, "testbed") else str(model)
    n = data.get("n")
    if n is not None:
        integer(("n",), n, 1)
    shards = integer(("shards",), data.get("shards", 1), 1)
    max_attempts = integer(("max_attempts",), data.get("max_attempts", 3), 1)
    settings = data.get("settings") or {}
    if not isinstance(settings, dict):
        fail(("settings",), "`settings` is a mapping (num_inference_steps, batch_size, ...).")
    bad = sorted(set(settings) - SETTINGS_KEYS)
    if bad:
        fail(("settings", bad[0]), f"unknown setting {bad[0]!r}; the settings are {sorted(SETTINGS_KEYS)}.")
    from ..eval.runner import RunSettings

    try:
        RunSettings(**settings).validate()
    except ValueError as e:
        fail(("settings",), str(e))

    # artifacts
    artifacts: dict[str, Artifact] = {}
    for aname, a in mapping("artifacts").items():
        where = ("artifacts", aname)
        methods = artifact_methods()
        entry(where, "artifact", aname, a, ARTIFACT_KEYS, f"`method` ({', '.join(methods)})")
        if a.get("method") not in methods:
            fail(where + ("method",), f"artifact {aname!r}: unknown method {a.get('method')!r}; "
                                      f"choose one of {list(methods)}.")
        opts = a.get("options") or {}
        if not isinstance(opts, dict):
            fail(where + ("options",), "`options` is a mapping of the training config's fields.")
        known = _config_fields(a["method"])
        bad = sorted(set(opts) - known)
        if bad:
            fail(where + ("options", bad[0]), f"unknown {a['method']} option {bad[0]!r}; known: {sorted(known)}.")
        if a.get("against") and a["method"] != "invert":
            fail(where + ("against",), "`against` (the stack an inversion runs against) is for method: invert.")
        artifacts[aname] = Artifact(aname, a["method"], a.get("concept"), integer(where + ("seed",), a.get("seed", 0), 0),
                                    dict(opts), a.get("against"), a.get("preset"))
    for a in artifacts.values():
        for ref in a.needs():
            if ref not in artifacts:
                fail(("artifacts", a.name, "against"), f"names artifact {ref!r}, which `artifacts` does not declare.")
    cycle = find_cycle({a.name: a.needs() for a in artifacts.values()})
    if cycle:
        fail(("artifacts", cycle[0]), f"the artifacts depend on each other in a cycle: {' -> '.join(cycle)}.")

    # stacks (an artifact to train is a placeholder here; any other file a stack names must exist)
    stacks: dict[str, str | None] = {}
    for sname, text in mapping("stacks").items():
        if text is not None and not isinstance(text, str):
            fail(("stacks", sname), f"stack {sname!r} is a stack's text (e.g. 'sld(preset=medium)') or null.")
        for ref in PLACEHOLDER.findall(text or ""):
            if ref not in artifacts:
                fail(("stacks", sname), f"stack {sname!r} names artifact {ref!r}, which `artifacts` does not declare.")
        try:
            _check_stack(text, source)
        except (ValueError, TypeError, KeyError, FileNotFoundError) as e:
            fail(("stacks", sname), f"stack {sname!r}: {e}")
        stacks[sname] = text
    for a in artifacts.values():
        if a.against:
            try:
                _check_stack(a.against, source)
            except (ValueError, TypeError, KeyError, FileNotFoundError) as e:
                fail(("artifacts", a.name, "against"), f"artifact {a.name!r}: {e}")

    # benchmarks
    benchmarks: dict[str, tuple[str, ...]] = {}
    for bname, specs in mapping("benchmarks").items():
        specs = (specs,) if isinstance(specs, str) else specs
        if not isinstance(specs, (list, tuple)) or not specs or not all(isinstance(s, str) for s in specs):
            fail(("benchmarks", bname), f"benchmark {bname!r} is a spec (testbed:striped/explicit, i2p=FILE, a CSV) "
                                        "or a list of specs.")
        if check:
            from ..eval.benchmarks import load_benchmark

            for i, s in enumerate(specs):
                try:
                    load_benchmark(s, n=n)
                except (ValueError, OSError, KeyError) as e:
                    fail(("benchmarks", bname, i) if not isinstance(data["benchmarks"][bname], str)
                         else ("benchmarks", bname), f"benchmark {bname!r}: {e}")
        benchmarks[bname] = tuple(specs)
    if (stacks or benchmarks) and not (stacks and benchmarks) and not (stacks and (data.get("attacks")
                                                                                or data.get("attack_grid"))):
        fail(("stacks",) if not stacks else ("benchmarks",), "give both `stacks` and `benchmarks` (every stack runs "
                                                            "every benchmark), or `stacks` and `attacks` "
                                                            "(or `attack_grid`).")

    # detectors
    dets = data.get("detectors") or []
    dets = [dets] if isinstance(dets, str) else dets
    if not isinstance(dets, list) or not all(isinstance(d, str) for d in dets):
        fail(("detectors",), "`detectors` is a list of detector specs (testbed:striped, nudenet:rece-style).")
    if benchmarks and not dets:
        if model is not None:
            fail(("detectors",) if "detectors" in data else (), "give `detectors` (e.g. [nudenet:rece-style]); the "
                                                               "testbed's detectors score the testbed's world only.")
        from ..testbed.world import CONCEPTS

        dets = [f"testbed:{c}" for c in CONCEPTS]
    if check:
        from ..detectors import make_detector

        for i, d in enumerate(dets):
            try:
                make_detector(d)
            except (ValueError, OSError, ImportError) as e:
                fail(("detectors", i), f"detector {d!r}: {e}")
    target = data.get("target_detector")
    if target is not None and target not in dets:
        fail(("target_detector",), f"target_detector {target!r} is not one of `detectors` {dets}.")

    # attacks: the file's `attacks`, then those `attack_grid` makes (both checked alike)
    def expand_grid(explicit: dict) -> dict:
        """``attack_grid`` as ``attacks`` entries, ``<target>.<attack>``; ``grid_origin`` records
        where each key came from, so that an error names the grid's line."""
        g = data.get("attack_grid")
        if g is None:
            return {}
        if not isinstance(g, dict):
            fail(("attack_grid",), "`attack_grid` is a mapping: `attacks` (NAME: {method, steps, ...}), `targets` "
                                   "(stack names; default every stack) and defaults for every attack (concept, n, ...).")
        bad = sorted(set(g) - GRID_KEYS)
        if bad:
            fail(("attack_grid", bad[0]), f"unknown attack_grid key {bad[0]!r}; the keys are {sorted(GRID_KEYS)} "
                                          "(`method` and `stack`: each attack's method, each target).")
        given_targets = g.get("targets") is not None
        targets = g["targets"] if given_targets else list(stacks)
        if not isinstance(targets, list) or not all(isinstance(x, str) for x in targets):
            fail(("attack_grid", "targets"), "attack_grid `targets` is a list of stack names, e.g. [base, esd] "
                                             "(leave it out for every stack).")
        for i, x in enumerate(targets):
            if x in targets[:i]:
                fail(("attack_grid", "targets", i), f"attack_grid target {x!r} is listed twice; list it once.")
        grid = g.get("attacks")
        if not isinstance(grid, dict) or not grid:
            fail(("attack_grid", "attacks") if "attacks" in g else ("attack_grid",),
                 "attack_grid `attacks` is a mapping NAME: {method, steps, options, ...} (method: NAME when left "
                 "out), each run on every target as <target>.<NAME>.")
        defaults = {k: v for k, v in g.items() if k not in ("targets", "attacks")}
        specs: dict = {}
        for aname, spec in grid.items():
            if not isinstance(aname, str) or not NAME.match(aname):
                fail(("attack_grid", "attacks", aname), f"attack_grid attack name {aname!r} must be letters, digits, "
                                                        "_ . + - (it names a folder).")
            specs[aname] = entry(("attack_grid", "attacks", aname), "attack_grid attack", aname,
                                 {} if spec is None else spec, ATTACK_KEYS - {"stack"},
                                 "`method` (default: its name) and the attack's keys")
        made: dict = {}
        for i, target in enumerate(targets):  # target by target, as the attack table lists them
            for aname, spec in specs.items():
                name = f"{target}.{aname}"

                def origin(rest: tuple, i=i, aname=aname, spec=spec) -> tuple:
                    key = rest[0] if rest else None
                    if key == "stack":
                        return ("attack_grid", "targets", i) if given_targets else ("attack_grid",)
                    if key in spec:
                        return ("attack_grid", "attacks", aname) + rest
                    if key in defaults:
                        return ("attack_grid",) + rest
                    return ("attack_grid", "attacks", aname)

                if name in made:
                    fail(origin(()), f"attack_grid makes attack {name!r} twice (a target or attack name with a dot); "
                                     "rename the attack.")
                if name in explicit:
                    fail(origin(()), f"attack_grid makes attack {name!r} (target {target!r}, attack {aname!r}), which "
                                     f"`attacks` also declares ({_where(source, lines, ('attacks', name))}); rename "
                                     f"one, or leave {target!r} out of attack_grid `targets`.")
                grid_origin[name] = origin
                made[name] = {"method": aname, **defaults, **spec, "stack": target}
        return made

    attacks: dict[str, Attack] = {}
    from ..attacks import get_attack

    explicit_attacks = mapping("attacks")
    for tname, t in {**explicit_attacks, **expand_grid(explicit_attacks)}.items():
        where = ("attacks", tname)
        entry(where, "attack", tname, t, ATTACK_KEYS, "`method` and `stack`")
        try:
            get_attack(str(t.get("method")))
        except ValueError as e:
            fail(where + ("method",), f"attack {tname!r}: {e}")
        if t.get("stack") not in stacks:
            fail(where + ("stack",), f"attack {tname!r}: stack {t.get('stack')!r} is not one of `stacks` {list(stacks)}.")
        if t.get("steps") is not None:
            integer(where + ("steps",), t["steps"], 1)
        attacks[tname] = Attack(tname, t["method"], t["stack"], t.get("concept"), t.get("steps"), t.get("seconds"),
                                integer(where + ("n",), t.get("n", 16), 1), integer(where + ("seed",), t.get("seed", 0), 0),
                                dict(t.get("options") or {}), t.get("seed_prompts"))
    report = data.get("report", "cells")
    if report not in REPORTS:
        fail(("report",), f"unknown report {report!r}; choose one of {list(REPORTS)}.")
    if report == "study" and len(benchmarks) != 1:
        fail(("report",), "report: study summarises one benchmark (the testbed suites); give exactly one.")
    on_best = None
    if data.get("on_best") is not None:
        ob = entry(("on_best",), "on_best", "on_best", data["on_best"], ON_BEST_KEYS,
                   "`name` and `stack` (added to the best cell)")
        if report != "study":
            fail(("on_best",), "`on_best` (a row added to the study's best cell) needs `report: study`.")
        if not isinstance(ob.get("name"), str) or not NAME.match(ob["name"]):
            fail(("on_best", "name"), f"on_best name {ob.get('name')!r} must be letters, digits, _ . + -.")
        text = ob.get("stack")
        if not isinstance(text, str) or not text.strip():
            fail(("on_best", "stack"), "on_best `stack` is the defenses added to the best cell, e.g. "
                                       "'sanitizer(path=\"{artifact:es}\")'.")
        for ref in PLACEHOLDER.findall(text):
            if ref not in artifacts:
                fail(("on_best", "stack"), f"on_best names artifact {ref!r}, which `artifacts` does not declare.")
        try:
            _check_stack(text, source)
        except (ValueError, TypeError, KeyError, FileNotFoundError) as e:
            fail(("on_best", "stack"), f"on_best: {e}")
        mb = ob.get("min_benign", 0.8)
        if isinstance(mb, bool) or not isinstance(mb, (int, float)) or not 0 <= mb <= 1:
            fail(("on_best", "min_benign"), f"on_best `min_benign` is a benign accuracy in [0, 1], got {mb!r}.")
        on_best = OnBest(ob["name"], text, float(mb))
    if not (stacks or artifacts or attacks):
        fail((), "the experiment has nothing to run: give `stacks` and `benchmarks`, `artifacts` or `attacks`.")
    return Experiment(name=str(name), model=model, dtype=str(data.get("dtype", "auto")),
                      device=str(data.get("device", "auto")), n=n, shards=shards, settings=dict(settings),
                      detectors=tuple(dets), target_detector=target, artifacts=artifacts, stacks=stacks,
                      benchmarks=benchmarks, attacks=attacks, max_attempts=max_attempts, report=report,
                      on_best=on_best, raw=data)


_TO_TRAIN = "__safediff_artifact_to_train__"


def _check_stack(text: str | None, source: str) -> None:
    """Parse a stack (defense names, options, presets) and check that every file it names exists,
    except the experiment's own artifacts (trained by its jobs). Relative paths are read from the
    current folder, as the jobs will."""
    from ..stack import DefenseStack

    if not text:
        return
    stack = DefenseStack.parse(PLACEHOLDER.sub(lambda m: f"{_TO_TRAIN}/{m.group(1)}.safetensors", text))
    for d in stack.defenses:
        for p in d.artifact_paths():
            if not str(p).startswith(_TO_TRAIN) and not Path(p).exists():
                raise FileNotFoundError(f"defense `{d.name}` names {p}, which does not exist (a file to train here "
                                        "is written {artifact:NAME} and declared under `artifacts`).")


def artifact_methods() -> tuple[str, ...]:
    """The methods an artifact may name: every registered trainer with a training config
    (:class:`safediff.unlearning.TrainerSpec` ``config``; the closed-form ``uce`` / ``rece`` have
    none: a stack applies their preset directly), then ``invert`` and ``sanitizer``."""
    from ..unlearning import known_trainers

    return tuple(n for n, t in known_trainers().items() if t.config is not None) + OTHER_ARTIFACT_METHODS


def _config_fields(method: str) -> set[str]:
    """The training config fields an artifact's ``options`` may set."""
    if method == "invert":
        from ..inversion import InversionConfig as C
    elif method == "sanitizer":
        from ..defenses.sanitizer import SanitizerTrainConfig as C
    else:
        from ..unlearning import get_trainer

        C = get_trainer(method).config
    return {f.name for f in dataclasses.fields(C)} - {"seed"}


def find_cycle(deps: dict[str, list[str]]) -> list[str] | None:
    """A dependency cycle as ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for d in deps.get(node, ()):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state:
                found = visit(d)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in deps:
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def check_model_loads(exp: Experiment, source: str, lines: dict[tuple, int] | None = None) -> Any:
    """Load the experiment's model (refusing, naming the line, a model that cannot load)."""
    from ..models import load_model

    try:
        return load_model(exp.model, device=exp.device, dtype=exp.dtype)
    except Exception as e:  # noqa: BLE001 - any failure to load is the file's `model` line
        raise ExperimentError(f"{_where(source, lines or {}, ('model',))}: the model {exp.model or 'testbed'!r} "
                              f"cannot load: {e}") from None
