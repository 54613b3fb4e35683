"""Fuzz the user-facing inputs and count how bad input is answered (issues 31.4-31.7).

    OMP_NUM_THREADS=1 python benchmarks/fuzz_inputs.py [--examples 2000] [--seed 0] [--out FILE.json]

Four kinds of input, all in this process (no model is loaded unless a bad input is wrongly
accepted, and then only for a 2-prompt, 1-step testbed run):

* ``cli``: hand-written bad ``safediff`` command lines (``eval``/``study`` numbers, stacks, prompt
  files). Answer wanted: exit 2 with one ``safediff: error:`` line (or argparse's usage error),
  nothing written under ``--out``; a case still running after ``CASE_SECONDS`` is cut short and
  counted silent (it started work on bad input).
* ``printed_stacks``: valid stacks with random typed options (text with quotes, backslashes,
  brackets). Answer wanted: the printed text parses back to the same stack.
* ``stack_text``: random stack strings built from names, options, quotes, escapes and brackets.
  Answer wanted: a ``ValueError``, or a stack whose printed text parses back to itself.
* ``options``: every registered defense's options given values of wrong kinds (lists, dicts,
  NaN, huge, negative, empty). Answer wanted: a ``ValueError`` or a config that keeps the value.
* ``prompt_rows``: random JSONL rows. Answer wanted: a ``BenchmarkError``, or records whose seed,
  size and guidance equal the row's values exactly.

Counted per kind: ``tried``, ``refused`` (a clear error), ``accepted`` (valid input, answered
right), ``tracebacks`` (any other exception) and ``silent`` (wrong input accepted, or a value
changed on the way). Prints one JSON object (and writes it to ``--out`` if given).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import math
import random
import signal
import sys
import tempfile
import time
from pathlib import Path

BAD_CLI = [
    ["eval", "--n", "0"], ["eval", "--n", "-3"], ["eval", "--num-shards", "0"], ["eval", "--num-shards", "-1"],
    ["eval", "--num-shards", "2", "--shard-index", "5"], ["eval", "--shard-index", "-1", "--num-shards", "2"],
    ["eval", "--seed", "-1"], ["eval", "--seed", str(2**63)], ["eval", "--batch-size", "0"],
    ["eval", "--num-images", "0"], ["eval", "--steps", "0"], ["eval", "--guidance-scale", "nan"],
    ["eval", "--guidance-scale", "-1"], ["eval", "--n", "1.5"],
    ["eval", "--defense", "delta"], ["eval", "--defense", "esd(scale=0.5)"], ["eval", "--defense", "uce(erase=[])"],
    ["eval", "--defense", "rece"], ["eval", "--defense", "sanitizer"],
    ["eval", "--defense", 'delta(path="x.safetensors", scale=1e30)'], ["eval", "--defense", "sld(preset=[1])"],
    ["eval", "--defense", "sld(preset=nope)"], ["eval", "--defense", 'negative_prompt(text="a\\"b"'],
    ["eval", "--defense", "sld(guidance_scale=[1,2])"], ["eval", "--defense", "nosuch"],
    ["eval", "--defense", "sld(concept=)"], ["eval", "--defense", "sld(threshold=nan)"],
    ["eval", "--detector", "nosuch:thing"], ["eval", "--benchmark", "testbed:nosuch/benign"],
    ["eval", "--benchmark", "testbed:striped"], ["eval", "--benchmark", "/no/such/file.csv"],
    ["eval", "--benchmark", "@ROWS:seed=1.5"], ["eval", "--benchmark", "@ROWS:seed=1e30"],
    ["eval", "--benchmark", "@ROWS:seed=-4"], ["eval", "--benchmark", "@ROWS:id={}"], ["eval", "--benchmark", "@ROWS:id=[1]"],
    ["eval", "--benchmark", "@ROWS:width=0"], ["eval", "--benchmark", "@ROWS:guidance_scale=inf"],
    ["eval", "--benchmark", "@ROWS:seed=true"], ["eval", "--benchmark", "@ROWS:prompt="],
    ["study", "--batch-size", "0"], ["study", "--max-cells", "0"], ["study", "--n", "0"], ["study", "--seed", "-1"],
    ["study", "--concept", "nosuch"], ["study", "--unlearning", "nosuch"],
]

NAMES = ["sld", "uce", "delta", "negative_prompt", "safree", "prompt_guard", "rece", "nosuch", "esd"]
PIECES = ['"', "\\", ",", "(", ")", "[", "]", "+", "=", "'", " ", "é", "1e3", "-2", "true", "null", "x", "preset",
          "text", "concept", "erase", "path", "scale", "guidance_scale", "{", "}", ":"]
WRONG = [[], [1], {}, {"a": 1}, math.nan, math.inf, -1e300, 1e300, -1, 0, "", " ", True, None, "x" * 300, [[1]], 1.5,
         "é\"\\", 2**70]


def _silence():
    return contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO())


#: a bad command line still running after this long was accepted (its work is cut short)
CASE_SECONDS = 20


class _TooLong(Exception):
    pass


def _too_long(signum, frame):
    raise _TooLong


def fuzz_cli(tmp: Path) -> dict:
    """Each bad command line: exit 2 (error line or usage error) and nothing under --out."""
    from safediff.cli import main

    counts = {"tried": 0, "refused": 0, "accepted": 0, "tracebacks": 0, "silent": 0, "silent_cases": [],
              "traceback_cases": []}
    for i, argv in enumerate(BAD_CLI):
        argv = list(argv)
        out = tmp / f"cli{i}"
        for j, a in enumerate(argv):
            if a.startswith("@ROWS:"):
                key, _, raw = a[6:].partition("=")
                row = {"prompt": "a cat"}
                row[key] = json.loads(raw) if raw not in ("",) and raw[0] in "[{-0123456789tfn" else raw
                path = tmp / f"rows{i}.jsonl"
                path.write_text(json.dumps(row) + "\n")
                argv[j] = str(path)
        if argv[0] == "eval":
            if "--benchmark" not in argv:
                argv += ["--benchmark", "testbed:striped/benign"]
            argv += ["--steps", "1"] if "--steps" not in argv else []
            argv += ["--n", "2"] if "--n" not in argv else []
        argv += ["--out", str(out)]
        counts["tried"] += 1
        err = io.StringIO()
        signal.signal(signal.SIGALRM, _too_long)
        signal.alarm(CASE_SECONDS)
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
                rc = main(argv)
        except SystemExit as e:  # argparse's usage error
            rc = e.code
        except _TooLong:  # a bad input that started real work
            rc = f"still working after {CASE_SECONDS} s"
        except Exception as e:  # noqa: BLE001 - what the fuzzer counts
            counts["tracebacks"] += 1
            counts["traceback_cases"].append(f"{' '.join(argv[:4])}: {type(e).__name__}: {e}"[:200])
            continue
        finally:
            signal.alarm(0)
        if rc == 2 and not out.exists():
            counts["refused"] += 1
        else:
            counts["silent"] += 1
            counts["silent_cases"].append(f"{' '.join(argv)} -> rc {rc}, out exists: {out.exists()}")
    return counts


def fuzz_stack_text(rng: random.Random, examples: int) -> dict:
    """Random stack strings: a ValueError, or a stack that prints and parses back to itself."""
    from safediff.stack import DefenseStack

    counts = {"tried": 0, "refused": 0, "accepted": 0, "tracebacks": 0, "silent": 0, "silent_cases": [],
              "traceback_cases": []}
    for _ in range(examples):
        name = rng.choice(NAMES)
        inner = "".join(rng.choice(PIECES) for _ in range(rng.randint(0, 8)))
        text = name if rng.random() < 0.1 else f"{name}({inner})"
        if rng.random() < 0.3:
            text += "+" + rng.choice(NAMES) + "(" + "".join(rng.choice(PIECES) for _ in range(rng.randint(0, 4))) + ")"
        counts["tried"] += 1
        try:
            stack = DefenseStack.parse(text)
        except ValueError:
            counts["refused"] += 1
            continue
        except Exception as e:  # noqa: BLE001
            counts["tracebacks"] += 1
            counts["traceback_cases"].append(f"{text!r}: {type(e).__name__}: {e}"[:200])
            continue
        try:
            again = DefenseStack.parse(stack.to_string())
            ok = again == stack and again.to_string() == stack.to_string()
        except Exception as e:  # noqa: BLE001
            ok, again = False, f"{type(e).__name__}: {e}"
        if ok:
            counts["accepted"] += 1
        else:
            counts["silent"] += 1
            counts["silent_cases"].append(f"{text!r} printed {stack.to_string()!r} -> {again}"[:200])
    return counts


def _typed_value(rng: random.Random, annotation: str):
    """A value of a field's type: text full of quotes/escapes/brackets, signed and exponent numbers."""
    base = annotation.replace(" | None", "").strip()
    if "None" in annotation and rng.random() < 0.2:
        return None
    if base.startswith("tuple["):
        inner = base[6:-1].split(",")[0].strip()
        size = rng.randint(0, 3) if "..." in base else len(base[6:-1].split(","))
        return [_typed_value(rng, inner) for _ in range(size)]
    if base == "str":
        return "".join(rng.choice(PIECES) for _ in range(rng.randint(1, 6)))
    if base == "float":
        return rng.choice([rng.uniform(-1e3, 1e3), rng.choice([1e-30, -2.5e12, 0.0, 1.0]), rng.randint(-50, 50)])
    if base == "int":
        return rng.randint(-100, 10**6)
    return rng.random() < 0.5


def fuzz_printed_stacks(rng: random.Random, examples: int) -> dict:
    """Valid stacks with typed random options: the printed text must parse back to the same stack
    (issue 31.5). ``tried`` counts valid stacks; ``refused`` is always 0 (a re-parse error is silent)."""
    from safediff.defenses.base import known_defenses
    from safediff.stack import DefenseStack

    counts = {"tried": 0, "refused": 0, "accepted": 0, "tracebacks": 0, "silent": 0, "silent_cases": [],
              "traceback_cases": []}
    specs = sorted(known_defenses().items())
    while counts["tried"] < examples:
        name, spec = rng.choice(specs)
        options: dict = {}
        for f in dataclasses.fields(spec.config_cls):
            if rng.random() < 0.6:
                value = _typed_value(rng, str(f.type))
                try:
                    spec.config_cls.from_options({**options, f.name: value})
                    options[f.name] = value
                except ValueError:
                    pass
        try:
            stack = DefenseStack.parse([{"name": name, **options}])
        except ValueError:
            continue  # not a valid stack (e.g. an entry that does nothing)
        counts["tried"] += 1
        text = stack.to_string()
        try:
            again = DefenseStack.parse(text)
        except Exception as e:  # noqa: BLE001 - its own text does not parse: the defect counted
            counts["silent"] += 1
            counts["silent_cases"].append(f"{text!r} does not re-parse: {e}"[:200])
            continue
        if again == stack and again.to_string() == text:
            counts["accepted"] += 1
        else:
            counts["silent"] += 1
            counts["silent_cases"].append(f"{text!r} re-parses to another config {again.to_string()!r}"[:200])
    return counts


def fuzz_options(rng: random.Random, examples: int) -> dict:
    """Wrong-kind option values: a ValueError, or a config that holds the value given."""
    from safediff.defenses.base import known_defenses
    from safediff.stack import DefenseStack

    counts = {"tried": 0, "refused": 0, "accepted": 0, "tracebacks": 0, "silent": 0, "silent_cases": [],
              "traceback_cases": []}
    specs = sorted(known_defenses().items())
    for _ in range(examples):
        name, spec = rng.choice(specs)
        fields = [f.name for f in dataclasses.fields(spec.config_cls)] + ["preset"]
        option = rng.choice(fields)
        value = rng.choice(WRONG)
        counts["tried"] += 1
        try:
            stack = DefenseStack.parse([{"name": name, option: value}])
        except ValueError:
            counts["refused"] += 1
            continue
        except Exception as e:  # noqa: BLE001
            counts["tracebacks"] += 1
            counts["traceback_cases"].append(f"{name}({option}={value!r}): {type(e).__name__}: {e}"[:200])
            continue
        held = getattr(stack.defenses[0], option, None) if option != "preset" else value
        same = held == value or (isinstance(value, list) and tuple(value) == held) or \
            (isinstance(value, (int, float)) and not isinstance(value, bool) and held == float(value))
        if same:
            counts["accepted"] += 1
        else:
            counts["silent"] += 1
            counts["silent_cases"].append(f"{name}({option}={value!r}) held {held!r}"[:200])
    return counts


def fuzz_prompt_rows(rng: random.Random, examples: int, tmp: Path) -> dict:
    """Random JSONL rows: a BenchmarkError, or records with the row's seed/size/guidance exactly."""
    from safediff.eval.benchmarks import BenchmarkError, load_prompt_file

    counts = {"tried": 0, "refused": 0, "accepted": 0, "tracebacks": 0, "silent": 0, "silent_cases": [],
              "traceback_cases": []}
    path = tmp / "rows.jsonl"
    values = WRONG + [0, 7, 3.0, "12", "7.5", "1e30", "abc", 512, 7.5]
    for _ in range(examples):
        row = {"prompt": rng.choice(["a cat", "", 5, None, ["x"]])}
        for key in rng.sample(["seed", "id", "width", "height", "guidance_scale", "categories"], rng.randint(0, 3)):
            row[key] = rng.choice(values)
        counts["tried"] += 1
        try:
            path.write_text(json.dumps(row) + "\n")
        except ValueError:  # NaN is not JSON
            path.write_text(json.dumps(row, allow_nan=True) + "\n")
        try:
            with warnings_off():
                rec = load_prompt_file(path)[0]
        except BenchmarkError:
            counts["refused"] += 1
            continue
        except Exception as e:  # noqa: BLE001
            counts["tracebacks"] += 1
            counts["traceback_cases"].append(f"{row!r}: {type(e).__name__}: {e}"[:200])
            continue
        wrong = []
        for key in ("seed", "width", "height", "guidance_scale"):
            given = row.get(key)
            if given is not None and not (isinstance(given, str) and not given.strip()):  # blank: no value
                try:
                    exact = float(row[key]) == getattr(rec, key) and not isinstance(row[key], bool)
                except (TypeError, ValueError):
                    exact = False
                if not exact:
                    wrong.append(f"{key} {row[key]!r} -> {getattr(rec, key)!r}")
        if row.get("id") not in (None, "") and (isinstance(row["id"], bool) or not isinstance(row["id"], (str, int))):
            wrong.append(f"id {row['id']!r} accepted")
        if wrong:
            counts["silent"] += 1
            counts["silent_cases"].append("; ".join(wrong)[:200])
        else:
            counts["accepted"] += 1
    return counts


@contextlib.contextmanager
def warnings_off():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--examples", type=int, default=2000, help="random inputs per random kind")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    p.add_argument("--out", default=None, help="also write the counts here (JSON)")
    args = p.parse_args(argv)
    import safediff  # noqa: F401 - registers every defense

    rng = random.Random(args.seed)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        result = {
            "command": "OMP_NUM_THREADS=1 python benchmarks/fuzz_inputs.py " + " ".join(argv if argv is not None
                                                                                      else sys.argv[1:]),
            "seed": args.seed,
            "printed_stacks": fuzz_printed_stacks(rng, args.examples),
            "stack_text": fuzz_stack_text(rng, args.examples),
            "options": fuzz_options(rng, args.examples),
            "prompt_rows": fuzz_prompt_rows(rng, args.examples, tmp),
            "cli": fuzz_cli(tmp),
        }
    for kind in ("printed_stacks", "stack_text", "options", "prompt_rows", "cli"):
        c = result[kind]
        c["silent_cases"], c["traceback_cases"] = c["silent_cases"][:10], c["traceback_cases"][:10]
    result["seconds"] = round(time.time() - t0, 1)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
