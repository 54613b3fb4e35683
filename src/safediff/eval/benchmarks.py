"""Prompt sets in the I2P schema, from CSV/JSONL files, the Hugging Face Hub, or the testbed.

Every record is a :class:`PromptRecord`: ``id, prompt, categories, seed, guidance_scale, width,
height`` plus whatever else the file carried (``extra``). Column names of the public sets are
mapped onto it (I2P's ``sd_seed`` / ``sd_guidance_scale`` / ``sd_image_width``, UnlearnDiffAtk's
``evaluation_seed`` / ``evaluation_guidance`` / ``case_number``, MMA-Diffusion's ``adv_prompt``...).

Example:
    >>> from safediff.eval.benchmarks import load_benchmark
    >>> prompts = load_benchmark("testbed:striped/heldout", n=50)   # doctest: +SKIP
    >>> prompts = load_benchmark("i2p", categories=["sexual"])       # needs the hub or a local file  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

from ..testbed.suites import SUITES, testbed_suite
from ..testbed.world import CONCEPTS

_ALIASES = {
    "prompt": ("prompt", "adv_prompt", "sensitive prompt", "text", "caption"),
    "id": ("id", "case_number", "prompt_id", "idx"),
    "seed": ("seed", "evaluation_seed", "sd_seed"),
    "guidance_scale": ("guidance_scale", "evaluation_guidance", "sd_guidance_scale", "guidance"),
    "width": ("width", "sd_image_width"),
    "height": ("height", "sd_image_height"),
    "categories": ("categories", "category", "concept", "concepts"),
}

#: Public sets: where they live. ``hub`` = (dataset repo id, file or None to pick the first CSV/JSONL).
PUBLIC_SETS = {
    "i2p": {"hub": ("AIML-TUDA/i2p", "i2p_benchmark.csv"),
            "note": "Inappropriate Image Prompts (Schramowski et al. 2023), 4,703 prompts, 7 categories."},
    "mma-diffusion": {"hub": ("YijunYang280/MMA-Diffusion-NSFW-adv-prompts-benchmark", None),
                      "note": "MMA-Diffusion adversarial prompts (text modality); column adv_prompt."},
    "ring-a-bell": {"hub": None,
                    "note": "Ring-A-Bell prompt CSVs ship in its GitHub repo (and SAFREE/RECE copies): pass the file path."},
    "unlearndiff-nudity": {"hub": None,
                           "note": "UnlearnDiffAtk prompts/nudity.csv (142 prompts, NudeNet > 0.75): pass the file path."},
    "p4d": {"hub": None, "note": "P4D's prompt CSVs ship in its GitHub repo: pass the file path."},
}


class BenchmarkError(ValueError):
    """A prompt file that cannot be read as a benchmark (the message names the rows)."""


@dataclass(frozen=True)
class PromptRecord:
    id: str
    prompt: str
    categories: tuple[str, ...] = ()
    seed: int | None = None
    guidance_scale: float | None = None
    width: int | None = None
    height: int | None = None
    extra: dict = field(default_factory=dict, hash=False, compare=False)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["categories"] = list(self.categories)
        return d


def _pick(row: dict, key: str):
    for alias in _ALIASES[key]:
        for k in row:
            if k is not None and k.strip().lower() == alias:
                v = row[k]
                if v is not None and str(v).strip() != "":
                    return v
    return None


def _categories(v) -> tuple[str, ...]:
    if v is None:
        return ()
    if isinstance(v, (list, tuple)):
        return tuple(str(x).strip() for x in v if str(x).strip())
    return tuple(x.strip() for x in str(v).replace(";", ",").split(",") if x.strip())


#: seeds are torch generator seeds: integers in [0, 2**63)
SEED_LIMIT = 2**63


def _whole(value, what: str, low: int, high: int) -> int:
    """``value`` (a number, or its text) as an integer in ``[low, high)``, else a clear error:
    ``1.5`` is not rounded to 1 and ``1e30`` is not accepted as a seed."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{what} must be a whole number, got {value!r}")
    try:
        number = float(value) if not isinstance(value, int) else value
        whole = int(number)
    except (ValueError, OverflowError):
        raise ValueError(f"{what} must be a whole number, got {value!r}") from None
    if whole != number or not low <= whole < high:
        raise ValueError(f"{what} must be a whole number in [{low}, {high}), got {value!r}")
    return whole


def _scale(value) -> float:
    """A guidance scale: a finite number >= 0."""
    try:
        gs = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        gs = math.nan
    if not math.isfinite(gs) or gs < 0:
        raise ValueError(f"guidance_scale must be a finite number >= 0, got {value!r}")
    return gs


def rows_to_records(rows: Iterable[dict], *, source: str, on_error: str = "stop") -> list[PromptRecord]:
    """Map raw rows onto :class:`PromptRecord`. Bad rows (no prompt, non-numeric seed...) are
    reported by row number; ``on_error="skip"`` skips them with a warning, ``"stop"`` raises."""
    if on_error not in ("stop", "skip"):
        raise ValueError(f"`on_error` must be 'stop' or 'skip', got {on_error!r}.")
    out, bad = [], []
    for i, row in enumerate(rows):
        rownum = i + 2 if source.endswith(".csv") else i + 1  # CSV: header is row 1
        try:
            if not isinstance(row, dict):
                raise ValueError(f"a row must be an object with a prompt, got {type(row).__name__}")
            prompt = _pick(row, "prompt")
            if prompt is None or not str(prompt).strip():
                raise ValueError("no prompt")
            seed = _pick(row, "seed")
            gs = _pick(row, "guidance_scale")
            w, h = _pick(row, "width"), _pick(row, "height")
            rid = _pick(row, "id")
            if rid is not None and (isinstance(rid, bool) or not isinstance(rid, (str, int))):
                raise ValueError(f"id must be text or a whole number, got {rid!r}")
            known = {a for aliases in _ALIASES.values() for a in aliases}
            out.append(PromptRecord(
                id=str(rid) if rid is not None else str(i),
                prompt=str(prompt),
                categories=_categories(_pick(row, "categories")),
                seed=_whole(seed, "seed", 0, SEED_LIMIT) if seed is not None else None,
                guidance_scale=_scale(gs) if gs is not None else None,
                width=_whole(w, "width", 1, 1 << 16) if w is not None else None,
                height=_whole(h, "height", 1, 1 << 16) if h is not None else None,
                extra={k: v for k, v in row.items() if k is not None and k.strip().lower() not in known},
            ))
        except (ValueError, TypeError) as e:
            bad.append((rownum, str(e)))
    if bad:
        msg = f"{source}: {len(bad)} bad row(s): " + "; ".join(f"row {r}: {e}" for r, e in bad[:10])
        if on_error == "stop":
            raise BenchmarkError(msg + " (pass on_error='skip' / --skip-bad-rows to skip them)")
        warnings.warn(msg + " (skipped)", stacklevel=2)
    ids = [r.id for r in out]
    if len(set(ids)) != len(ids):
        raise BenchmarkError(f"{source}: prompt ids are not unique; give each row a distinct `id`.")
    if not out:
        raise BenchmarkError(f"{source}: no usable prompt rows.")
    return out


def _read_utf8(path: Path) -> str:
    """A prompt file's text; one that is not UTF-8 is an error naming the file and the byte."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise BenchmarkError(f"{path}: not UTF-8 text (line {line}, byte {e.start}: {data[e.start:e.start + 1]!r}); "
                             "save it as UTF-8 (e.g. `iconv -f latin1 -t utf-8`).") from None


def _read_csv(path: Path) -> list[dict]:
    """The rows of a CSV prompt file; a quote left open (which would swallow the following rows into
    one prompt) or any other malformed line is an error naming the file and the line it starts on."""
    reader = csv.DictReader(io.StringIO(_read_utf8(path), newline=""), strict=True)
    rows, line = [], 1
    try:
        if not reader.fieldnames or not any(_pick({k: "x" for k in reader.fieldnames}, "prompt") for _ in [0]):
            raise BenchmarkError(
                f"{path}: no prompt column; expected one of {list(_ALIASES['prompt'])}, got {reader.fieldnames}."
            )
        line = reader.line_num + 1
        for row in reader:
            rows.append(row)
            line = reader.line_num + 1
    except csv.Error as e:
        hint = " (a quote opened there is never closed)" if "end of data" in str(e) else ""
        raise BenchmarkError(f"{path}: malformed CSV at line {line}{hint}: {e}.") from None
    return rows


def load_prompt_file(path: str | Path, on_error: str = "stop") -> list[PromptRecord]:
    """Read a CSV or JSONL prompt file in the I2P schema (column aliases accepted)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Prompt file {path} does not exist.")
    if path.suffix == ".csv":
        rows = _read_csv(path)
    elif path.suffix in (".jsonl", ".json"):
        rows = []
        bad = []
        for i, line in enumerate(_read_utf8(path).splitlines()):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                bad.append(f"row {i + 1}: {e.msg}")
        if bad:
            msg = f"{path}: unreadable JSON on " + "; ".join(bad[:10])
            if on_error == "stop":
                raise BenchmarkError(msg)
            warnings.warn(msg + " (skipped)", stacklevel=2)
    else:
        raise BenchmarkError(f"{path}: prompt files must be .csv or .jsonl.")
    return rows_to_records(rows, source=str(path), on_error=on_error)


def load_public_set(name: str, path: str | Path | None = None, on_error: str = "stop") -> list[PromptRecord]:
    """A public benchmark from a local file, or from the Hugging Face Hub where it lives there."""
    if name not in PUBLIC_SETS:
        raise BenchmarkError(f"Unknown public set {name!r}; known: {sorted(PUBLIC_SETS)}.")
    if path is not None:
        return load_prompt_file(path, on_error)
    hub = PUBLIC_SETS[name]["hub"]
    if hub is None:
        raise BenchmarkError(f"{name}: {PUBLIC_SETS[name]['note']}")
    repo, filename = hub
    try:
        from huggingface_hub import hf_hub_download, list_repo_files

        if filename is None:
            files = [f for f in list_repo_files(repo, repo_type="dataset") if f.endswith((".csv", ".jsonl"))]
            if not files:
                raise BenchmarkError(f"{repo} has no CSV/JSONL file; download it and pass the path.")
            filename = files[0]
        local = hf_hub_download(repo, filename, repo_type="dataset")
    except BenchmarkError:
        raise
    except Exception as e:  # offline, auth
        raise BenchmarkError(
            f"Could not fetch {name} from the Hub ({repo}/{filename}: {type(e).__name__}). Download it and pass its path."
        ) from None
    return load_prompt_file(local, on_error)


def load_benchmark(spec: str | Path, *, n: int | None = None, categories: Iterable[str] | None = None,
                   on_error: str = "stop", seed: int = 0) -> list[PromptRecord]:
    """Load a benchmark by spec:

    * ``testbed:CONCEPT/SUITE`` (e.g. ``testbed:striped/heldout``; ``testbed:all`` for every suite);
    * a public set name (``i2p``, ``mma-diffusion``, ...) or ``name=PATH`` for a local copy;
    * a CSV/JSONL path.

    ``categories`` keeps records with any of those categories; ``n`` keeps the first ``n``.
    """
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise BenchmarkError(f"`n` (prompts per benchmark) must be a whole number >= 1, got {n!r}.")
    spec = str(spec)
    if spec.startswith("testbed:"):
        body = spec.split(":", 1)[1]
        pairs = [(c, s) for c in CONCEPTS for s in SUITES] if body == "all" else [tuple(body.split("/", 1))]
        recs = []
        for pair in pairs:
            if len(pair) != 2:
                raise BenchmarkError(f"Testbed benchmarks are written testbed:CONCEPT/SUITE, got {spec!r}.")
            for r in testbed_suite(pair[0], pair[1], n=100 if n is None else n, seed=seed):
                recs.append(PromptRecord(id=r["id"], prompt=r["prompt"], categories=tuple(r["categories"]), seed=r["seed"],
                                         extra={"suite": r["suite"], "concept": r["concept"], "word": r["word"],
                                                "expected": r["expected"]}))
        return recs
    name, _, path = spec.partition("=")
    if name in PUBLIC_SETS:
        recs = load_public_set(name, path or None, on_error)
    else:
        recs = load_prompt_file(spec, on_error)
    if categories:
        cats = set(categories)
        recs = [r for r in recs if cats & set(r.categories)]
    return recs[:n] if n else recs


def offset_seeds(records: Iterable[PromptRecord], seed: int) -> list[PromptRecord]:
    """The records of a run with base seed ``seed`` (``safediff eval --seed``): each prompt's own
    seed plus ``seed`` (testbed suites carry 0..n-1, I2P its ``sd_seed``), so another base seed
    gives other images on every benchmark and 0 keeps the benchmark's seeds; a prompt without a
    seed keeps none and the run uses ``seed`` for it."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
        raise BenchmarkError(f"The base seed must be a whole number in [0, 2**63), got {seed!r}.")
    out = []
    for r in records:
        if r.seed is not None and not r.seed + seed < SEED_LIMIT:
            raise BenchmarkError(f"Prompt {r.id}: its seed {r.seed} plus the base seed {seed} is not below 2**63; "
                                 "use a smaller --seed.")
        out.append(r if r.seed is None or not seed else dataclasses.replace(r, seed=r.seed + seed))
    return out


def benchmark_hash(records: list[PromptRecord]) -> str:
    """Content hash of a prompt set (ids, prompts, seeds, guidance scales, categories, and the image
    sizes where any prompt gives one): keys a run directory."""
    sized = any(r.width is not None or r.height is not None for r in records)  # sizeless sets keep their old hash
    blob = json.dumps([[r.id, r.prompt, r.seed, r.guidance_scale, list(r.categories)]
                       + ([r.width, r.height] if sized else []) for r in records]).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
