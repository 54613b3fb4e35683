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
import hashlib
import json
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

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
            known = {a for aliases in _ALIASES.values() for a in aliases}
            out.append(PromptRecord(
                id=str(rid) if rid is not None else str(i),
                prompt=str(prompt),
                categories=_categories(_pick(row, "categories")),
                seed=int(float(seed)) if seed is not None else None,
                guidance_scale=float(gs) if gs is not None else None,
                width=int(float(w)) if w is not None else None,
                height=int(float(h)) if h is not None else None,
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


def load_prompt_file(path: str | Path, on_error: str = "stop") -> list[PromptRecord]:
    """Read a CSV or JSONL prompt file in the I2P schema (column aliases accepted)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Prompt file {path} does not exist.")
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or not any(_pick({k: "x" for k in reader.fieldnames}, "prompt") for _ in [0]):
                raise BenchmarkError(
                    f"{path}: no prompt column; expected one of {list(_ALIASES['prompt'])}, got {reader.fieldnames}."
                )
            rows = list(reader)
    elif path.suffix in (".jsonl", ".json"):
        rows = []
        bad = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
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
    spec = str(spec)
    if spec.startswith("testbed:"):
        from ..testbed.suites import SUITES, testbed_suite
        from ..testbed.world import CONCEPTS

        body = spec.split(":", 1)[1]
        pairs = [(c, s) for c in CONCEPTS for s in SUITES] if body == "all" else [tuple(body.split("/", 1))]
        recs = []
        for pair in pairs:
            if len(pair) != 2:
                raise BenchmarkError(f"Testbed benchmarks are written testbed:CONCEPT/SUITE, got {spec!r}.")
            for r in testbed_suite(pair[0], pair[1], n=n or 100, seed=seed):
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


def benchmark_hash(records: list[PromptRecord]) -> str:
    """Content hash of a prompt set (ids, prompts, seeds, categories): keys a run directory."""
    blob = json.dumps([[r.id, r.prompt, r.seed, r.guidance_scale, list(r.categories)] for r in records]).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
