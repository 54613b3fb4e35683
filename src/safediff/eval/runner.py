"""The evaluation runner: benchmark x stack x seeds -> images -> detectors -> an SQLite store.

Layout of a run directory::

    RUN_DIR/run.json        manifest: benchmark hash, stack (text + hash), model hash, settings
    RUN_DIR/store.sqlite    images(key, ..., png_sha256) and scores(key, protocol_hash, ...) and protocols
    RUN_DIR/store.<i>-of-<n>.sqlite   shard i of n's own store (sharded runs; merged into store.sqlite)
    RUN_DIR/images/*.png    one file per image key

* Every image is keyed by ``(prompt id, seed, image index, stack hash)``; every score by that key
  plus the detector protocol's hash, so the same images can be scored under several protocols
  without generating them again.
* A run killed at any moment resumes where it stopped: a PNG is written to a temporary name and
  renamed, then its row is committed; on resume, keys with a row are skipped (a PNG without a row
  is regenerated, bit-identical since each image has its own generator). Nothing is duplicated.
* Sharding: process ``i`` of ``n`` takes the jobs with ``index % n == i``; with 🤗 accelerate
  (``accelerate launch -m safediff.cli eval ...``) ``i`` and ``n`` come from ``PartialState``.
  Each shard writes its own store, ``store.<i>-of-<n>.sqlite``, alone and in SQLite's rollback-journal
  mode (never WAL, which needs every process on one host), so shards may run on several hosts
  over one shared run directory; :func:`safediff.eval.merge.merge_run` (``safediff merge``) combines
  them into ``store.sqlite``, and every reader of the store merges first (:func:`open_store`).
  A single process (``n == 1``) writes ``store.sqlite`` directly, as before. With a node-local
  store folder (``store_dir`` / ``--store-dir`` / ``$SAFEDIFF_STORE_DIR``) a shard writes its store
  on that (local) disk and publishes it into the run directory atomically (a snapshot copied to a
  temporary name, then renamed) after every batch and when done (:func:`publish_store`).
* A run directory holds one benchmark, one stack and one set of settings: another is refused,
  the message naming what differs. The batch size may change on resume (say after a GPU ran out
  of memory): each image has its own generator, so images agree across batch sizes within float
  rounding (CPU: at most 2 grey levels, measured), and each image row records its batch size.
  Another detector protocol is allowed and stored beside the first.
* Two processes on one run directory without sharding: the second waits for the first's lock
  (``RUN_DIR/.lock``) and then finds the images done; sharded processes each hold their shard's
  lock. Everything is validated before anything is written.
* Image files are named by a hash of their key, so two prompt ids that differ only in
  punctuation (``p 1`` and ``p/1``) never share a PNG.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import re
import sqlite3
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .benchmarks import PromptRecord, benchmark_hash, load_benchmark
from ..detectors import Detector, make_detector

SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
  key TEXT PRIMARY KEY, prompt_id TEXT NOT NULL, seed INTEGER NOT NULL, image_index INTEGER NOT NULL,
  stack_hash TEXT NOT NULL, prompt TEXT NOT NULL, categories TEXT NOT NULL, path TEXT, refused INTEGER NOT NULL,
  extra TEXT NOT NULL, seconds REAL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS scores (
  key TEXT NOT NULL, protocol_hash TEXT NOT NULL, unsafe INTEGER, score REAL, details TEXT, error TEXT,
  PRIMARY KEY (key, protocol_hash));
CREATE TABLE IF NOT EXISTS protocols (hash TEXT PRIMARY KEY, protocol TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS merged_shards (name TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,
  change_counter INTEGER NOT NULL, images INTEGER, scores INTEGER);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
#: columns added after the first stores were made (added to an older store when it is opened)
_ADDED_IMAGE_COLUMNS = (("batch_size", "INTEGER"), ("png_sha256", "TEXT"))


class RunError(ValueError):
    """A run directory that cannot be used as asked (the message says why)."""


def image_key(prompt_id: str, seed: int, image_index: int, stack_hash: str) -> str:
    return f"{prompt_id}|{seed}|{image_index}|{stack_hash}"


def open_store(run_dir: Path, shard: tuple[int, int] | None = None, *, merge: bool = True) -> sqlite3.Connection:
    """The run's store (``store.sqlite``), or shard ``(index, count)``'s own store when ``count > 1``.

    The run's store merges new or changed shard stores first (``merge=False`` skips that; the
    merge itself uses it), so every reader sees every finished shard. A new store uses SQLite's
    rollback journal; a store made before in WAL mode keeps it and loads as before."""
    run_dir = Path(run_dir)
    if shard is not None and shard[1] > 1:
        from .merge import shard_store_name

        return _connect(run_dir, run_dir / shard_store_name(*shard))
    con = _connect(run_dir, run_dir / "store.sqlite")
    if merge:
        from .merge import merge_run, unmerged_shard_stores

        if unmerged_shard_stores(run_dir, con):
            con.close()
            print(f"safediff: merging {run_dir}'s shard stores into store.sqlite first", file=sys.stderr, flush=True)
            merge_run(run_dir)
            con = _connect(run_dir, run_dir / "store.sqlite")
    return con


def _connect(run_dir: Path, path: Path) -> sqlite3.Connection:
    try:
        con = sqlite3.connect(path, timeout=60)
        con.execute("PRAGMA busy_timeout=60000")
        con.executescript(SCHEMA)
        con.execute("SELECT count(*) FROM images").fetchone()
        have = {r[1] for r in con.execute("PRAGMA table_info(images)")}
        for name, kind in _ADDED_IMAGE_COLUMNS:  # stores made before the column existed
            if name not in have:
                con.execute(f"ALTER TABLE images ADD COLUMN {name} {kind}")
        con.commit()
    except sqlite3.DatabaseError as e:
        raise RunError(
            f"The result store {path} is corrupted ({e}). Nothing was deleted: move it aside "
            f"(the images in {Path(run_dir) / 'images'} are kept) and rerun to rebuild it."
        ) from None
    return con


def image_path(key: str) -> str:
    """The run-relative PNG path of an image key: a readable stem plus a hash of the whole key."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", key.split("|", 1)[0])[:40]
    return f"images/{stem}_{hashlib.sha256(key.encode()).hexdigest()[:16]}.png"


@contextlib.contextmanager
def run_lock(run_dir: Path, name: str = ".lock", wait: bool = True):
    """An exclusive lock on ``run_dir`` (released on exit or when the process dies)."""
    import fcntl

    f = open(Path(run_dir) / name, "a+")
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                raise RunError(f"Another process is writing {run_dir}; wait for it or use another --out.") from None
            print(f"safediff: another process is writing {run_dir}; waiting for it to finish...", flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        yield
    finally:
        f.close()


@dataclass
class RunSettings:
    """How a run generates (recorded in its manifest; a resumed run must use the same).

    ``batch_size`` is the one setting a resumed run may change (each image row records its own):
    images agree across batch sizes within float rounding (1-2 grey levels at most, measured)."""

    num_images_per_prompt: int = 1
    seed: int = 0
    guidance_scale: float | None = None
    num_inference_steps: int | None = None
    respect_prompt_seed: bool = True
    respect_prompt_guidance: bool = True
    batch_size: int = 32
    #: image size for every prompt (overrides the prompts' own, e.g. I2P's ``sd_image_width``);
    #: None: the prompt's own size where it gives one (``respect_prompt_size``), else the model's
    height: int | None = None
    width: int | None = None
    respect_prompt_size: bool = True

    def validate(self) -> None:
        def integer(name, low):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"`{name}` must be an integer >= {low}, got {v!r}.")

        integer("num_images_per_prompt", 1)
        integer("batch_size", 1)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise ValueError(f"`seed` must be an integer in [0, 2**63), got {self.seed!r}.")
        if self.num_inference_steps is not None:
            integer("num_inference_steps", 1)
        for name in ("height", "width"):
            if getattr(self, name) is not None:
                integer(name, 1)
        gs = self.guidance_scale
        if gs is not None and (isinstance(gs, bool) or not isinstance(gs, (int, float)) or not math.isfinite(gs) or gs < 0):
            raise ValueError(f"`guidance_scale` must be a finite number >= 0, got {gs!r}.")


def _shard() -> tuple[int, int]:
    try:
        from accelerate import PartialState

        st = PartialState()
        return st.process_index, st.num_processes
    except Exception:  # noqa: BLE001 - accelerate missing or not launched
        return 0, 1


def run_eval(
    benchmark: str | Sequence[PromptRecord],
    out_dir: str | Path,
    *,
    defenses=None,
    model=None,
    detectors: Sequence[str | Detector] = ("testbed:striped",),
    settings: RunSettings = RunSettings(),
    batch_size: int | None = None,
    shard: tuple[int, int] | None = None,
    progress: bool = True,
    n: int | None = None,
    max_images: int | None = None,
    token_embeddings: Sequence[str] = (),
    benchmark_name: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    attention_slicing: bool = False,
    vae_tiling: bool = False,
    target_detector: str | None = None,
    store_dir: str | Path | None = None,
) -> Path:
    """Generate (resuming) and score a benchmark under one stack into ``out_dir``.

    Args:
        benchmark: a spec for :func:`load_benchmark` or records.
        detectors: detector specs (``testbed:striped``, ``nudenet:rece-style``) or instances.
        shard: ``(index, count)``; default from accelerate's ``PartialState`` (``(0, 1)`` alone).
        max_images: stop after generating this many new images (for tests of resumption).
        token_embeddings: textual-inversion files whose placeholders the prompts use (soft
            attacks); recorded in the manifest, not part of the stack.
        benchmark_name: how reports name a benchmark given as records (default: its suites).
        device / dtype: where and in which precision ``model`` is loaded (default ``auto``: CUDA in
            fp16 when available, else the CPU in fp32); recorded in the manifest, and a run is
            resumed only in the same dtype (images differ across dtypes).
        attention_slicing / vae_tiling: diffusers' memory savers (they do not change the images
            beyond float rounding).
        target_detector: which of ``detectors`` scores the concept the benchmark is about (spec,
            label or protocol hash); the others measure substitution (:func:`summarize`). Default:
            the testbed detector of the concept every record names (the testbed suites), else the
            first detector. Recorded in ``run.json``.
        store_dir: a node-local folder (default ``$SAFEDIFF_STORE_DIR``) where a shard (``count > 1``)
            writes its store, published into ``out_dir`` after every batch and at the end (a
            single-process run writes ``store.sqlite`` in ``out_dir`` as always). A shard starts from
            the published copy, so it may resume on another node.

    Image sizes: ``settings.height`` / ``width`` when set, else the prompt's own (I2P's
    ``sd_image_width`` / ``sd_image_height``) unless ``settings.respect_prompt_size`` is False,
    else the model's default; every size is checked against the model before any image is made.
    """
    from ..models import dtype_name, ensure_model
    from ..stack import DefenseStack

    # 1. validate everything before loading weights or writing anything
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"`n` (prompts per benchmark) must be an integer >= 1, got {n!r}.")
    records = list(benchmark) if not isinstance(benchmark, (str, Path)) else load_benchmark(benchmark, n=n)
    if not records:
        raise ValueError("The benchmark holds no prompt.")
    bad_seed = next((r for r in records if r.seed is not None and (isinstance(r.seed, bool) or not isinstance(r.seed, int)
                                                                   or not 0 <= r.seed < 2**63)), None)
    if bad_seed is not None:
        raise ValueError(f"Prompt {bad_seed.id} has seed {bad_seed.seed!r}; a seed must be a whole number in [0, 2**63).")
    stack = DefenseStack.parse(defenses)
    dets = [d if isinstance(d, Detector) else make_detector(d) for d in detectors]
    if not dets:
        raise ValueError("Give at least one detector (e.g. testbed:striped or nudenet:rece-style).")
    target = choose_target(dets, records, target_detector)
    if batch_size is not None:
        settings = RunSettings(**{**settings.__dict__, "batch_size": batch_size})
    settings.validate()
    idx, count = shard if shard is not None else _shard()
    if isinstance(count, bool) or not isinstance(count, int) or count < 1 or not isinstance(idx, int) or not 0 <= idx < count:
        raise ValueError(f"Shard {idx} of {count} is out of range: the index must be in [0, {count}).")
    store_dir = store_dir if store_dir is not None else (os.environ.get(STORE_DIR_ENV) or None)
    if store_dir is not None and count > 1:
        check_store_dir(store_dir)
    out = Path(out_dir)
    m = ensure_model(model, device=device, dtype=dtype)
    m.enable_memory_options(attention_slicing=attention_slicing, vae_tiling=vae_tiling)
    sizes = sorted({f"{h}x{w}" for h, w in (image_size(r, settings, m) for r in records)})  # checks every size
    stack_hash = stack.hash(m.content_hash)
    bhash = benchmark_hash(records)
    name = str(benchmark) if isinstance(benchmark, (str, Path)) else (benchmark_name or _records_name(records))
    manifest = {
        "benchmark_hash": bhash, "benchmark": name,
        "stack": stack.to_string(), "stack_config": stack.to_list(), "stack_hash": stack_hash,
        "model": m.source, "model_hash": m.content_hash, "settings": settings.__dict__,
        "num_prompts": len(records), "image_sizes": sizes, "device": str(m.device), "dtype": dtype_name(m.dtype),
        "target_detector": detector_label(target.protocol.to_dict()), "target_protocol": target.protocol.hash(),
    }
    if token_embeddings:
        from ..artifacts import file_sha256

        manifest["token_embeddings"] = {str(p): file_sha256(p) for p in token_embeddings}
    mpath = out / "run.json"
    old = None  # decided once: a shard started beside this one may write run.json between two exists() calls
    if mpath.exists():
        from ..fileio import read_json

        old = _check_resume_size_dtype(out, read_json(mpath, "the run's manifest"), manifest)
        changed = manifest_differences(old, manifest)
        if changed:
            raise RunError(
                f"{out} was made with {'; '.join(changed)}. Use a new --out directory for this run, or the same "
                "options to resume it. (Scoring with another detector protocol, or resuming with another "
                "--batch-size, in the same directory is allowed.)"
            )
        old_bs = (old.get("settings") or {}).get("batch_size")
        if progress and old_bs is not None and old_bs != settings.batch_size:
            print(f"batch size {settings.batch_size} (the run started with {old_bs}): the stored images are kept; "
                  "each image records its batch size", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "images").mkdir(exist_ok=True)
    if old is None:
        from .._version import __version__
        from ..fileio import atomic_write_json

        # what "default" meant for this model (the protocol card shows it; not part of the resume check)
        defaults = {"guidance_scale": m.default_guidance_scale, "num_inference_steps": m.default_steps,
                    "family": m.family}
        # overwrite=True: shards started together may both write the same manifest
        atomic_write_json(mpath, {**manifest, "model_defaults": defaults, "safediff_version": __version__,
                                  "created": time.time()}, overwrite=True)
    elif old.get("target_protocol") != manifest["target_protocol"]:  # the target is a choice of scoring, not of images
        from ..fileio import atomic_write_json, read_json

        atomic_write_json(mpath, {**read_json(mpath, "the run's manifest"), "target_detector": manifest["target_detector"],
                                  "target_protocol": manifest["target_protocol"]}, overwrite=True)
    with run_lock(out, f".lock-{idx}-of-{count}"):
        local = local_shard_store(out, idx, count, store_dir) if store_dir is not None and count > 1 else None
        if count > 1:  # the shard's own store records what made it, so that a merge can refuse a mismatch
            with contextlib.closing(_connect(out, local) if local else open_store(out, (idx, count))) as con, con:
                con.execute("INSERT OR REPLACE INTO meta VALUES ('manifest', ?), ('shard', ?)",
                            (json.dumps(manifest, default=str), f"{idx}/{count}"))
        _generate_and_score(out, records, m, stack, stack_hash, dets, settings, idx, count, max_images, token_embeddings,
                            progress, local_store=local)
        if local is not None:  # published by its last step: the local copy is scratch
            for p in (local, local.with_name(local.name + "-journal")):
                p.unlink(missing_ok=True)
    return out


#: the environment variable that names a node-local folder for shard stores (``--store-dir``)
STORE_DIR_ENV = "SAFEDIFF_STORE_DIR"


def check_store_dir(store_dir: str | Path) -> None:
    """Refuse (before any work) a store folder that cannot be made or written."""
    p = Path(store_dir)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"The node-local store folder {p} (--store-dir / ${STORE_DIR_ENV}) cannot be made: {e}. "
                         "Give a writable folder on this node's disk (e.g. $TMPDIR).") from None
    if not os.access(p, os.W_OK):
        raise ValueError(f"The node-local store folder {p} (--store-dir / ${STORE_DIR_ENV}) is not writable; "
                         "give a writable folder on this node's disk (e.g. $TMPDIR).")


def local_shard_store(run_dir: Path, idx: int, count: int, store_dir: str | Path) -> Path:
    """Shard ``idx`` of ``count``'s store on node-local disk, started from the copy published in
    ``run_dir`` (the record: a local copy left by an earlier attempt may be older than one published
    from another node since, so it is replaced)."""
    from .merge import shard_store_name

    tag = hashlib.sha256(str(Path(run_dir).resolve()).encode()).hexdigest()[:16]
    local = Path(store_dir) / f"safediff-{tag}" / shard_store_name(idx, count)
    local.parent.mkdir(parents=True, exist_ok=True)
    for p in (local, local.with_name(local.name + "-journal")):
        p.unlink(missing_ok=True)
    published = Path(run_dir) / shard_store_name(idx, count)
    if published.exists():
        with contextlib.closing(sqlite3.connect(published, timeout=60)) as src, \
                contextlib.closing(sqlite3.connect(local)) as dst:
            src.backup(dst)
    return local


def publish_store(con: sqlite3.Connection, dest: Path) -> None:
    """Copy ``con``'s database to ``dest`` atomically: a consistent snapshot written beside it under
    a temporary name (never matched as a shard store), then renamed over it, so a merge or a reader
    sees the previous copy or the new one, never a partial file."""
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    try:
        with contextlib.closing(sqlite3.connect(tmp)) as t:
            con.backup(t)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def detector_label(protocol: dict) -> str:
    """How tables name a detector protocol: its spec (``testbed:caged``, ``nudenet:rece-style``)."""
    if protocol.get("detector") == "testbed-exact" and protocol.get("classes"):
        return f"testbed:{protocol['classes'][0]}"
    name = {"nudenet-v3": "nudenet"}.get(protocol.get("detector"), protocol.get("detector") or "?")
    return f"{name}:{protocol['preset']}" if protocol.get("preset") else name


def choose_target(dets: Sequence[Detector], records: Sequence[PromptRecord], target: str | None) -> Detector:
    """The detector of the benchmark's own concept among ``dets`` (see :func:`run_eval`)."""
    if target is not None:
        for d in dets:
            p = d.protocol.to_dict()
            if target in (detector_label(p), p["hash"], p["preset"]):
                return d
        raise ValueError(f"The target detector {target!r} is not among the detectors "
                         f"{[detector_label(d.protocol.to_dict()) for d in dets]}; name one of them (or add it).")
    concepts = {r.extra.get("concept") for r in records}
    if len(concepts) == 1:
        (concept,) = concepts
        for d in dets:
            if d.protocol.detector == "testbed-exact" and d.protocol.classes == (concept,):
                return d
    return dets[0]


def image_size(record: PromptRecord, settings: RunSettings, model) -> tuple[int, int]:
    """The ``(height, width)`` of ``record``'s images: the settings' override, else the prompt's
    own (when respected), else the model's default; refused (naming the prompt) when the model
    cannot make it."""
    own = settings.respect_prompt_size
    h = settings.height if settings.height is not None else (record.height if own else None)
    w = settings.width if settings.width is not None else (record.width if own else None)
    src = "" if settings.height is not None and settings.width is not None else f"prompt {record.id!r}: "
    return model.check_size(h, w, what=src)


_SIZE_KEYS = ("height", "width", "respect_prompt_size")


def _check_resume_size_dtype(out: Path, old: dict, manifest: dict) -> dict:
    """Refuse to resume ``out`` with another image size or dtype (naming the difference); returns
    the old manifest with the size settings of runs made before they existed filled in (their
    defaults, which is what those runs used), so that the generic settings check compares like with like."""
    defaults = RunSettings().__dict__
    if isinstance(old.get("settings"), dict):
        old = {**old, "settings": {**{k: defaults[k] for k in _SIZE_KEYS}, **old["settings"]}}
    new_s, old_s = manifest["settings"], old.get("settings") or {}
    diff = [f"{k} {old_s.get(k)!r} -> {new_s.get(k)!r}" for k in _SIZE_KEYS if old_s.get(k, defaults[k]) != new_s.get(k)]
    if "image_sizes" in old and old["image_sizes"] != manifest["image_sizes"]:
        diff.append(f"image sizes {old['image_sizes']} -> {manifest['image_sizes']}")
    if diff:
        raise RunError(f"{out} was made at another image size ({'; '.join(diff)}); use a new --out directory, or the "
                       "same --height/--width to resume.")
    if "dtype" in old and old["dtype"] != manifest["dtype"]:
        raise RunError(f"{out} was made in {old['dtype']} and this run is in {manifest['dtype']} (images differ across "
                       f"dtypes); pass --dtype {old['dtype']} to resume, or use a new --out directory.")
    return old


def manifest_differences(old: dict, new: dict) -> list[str]:
    """What differs between a run directory's manifest and a new run's, in words ("another
    benchmark: ... before, ... now"); the batch size is not a difference (images do not depend on it)."""
    out = []
    if old.get("benchmark_hash") != new.get("benchmark_hash"):
        was, now = (f"{m.get('benchmark')!r} ({m.get('num_prompts')} prompts)" for m in (old, new))
        out.append(f"another benchmark: {was} before, {now} now"
                   + (" (same name and size: the prompts' text, seeds or ids differ)" if was == now else ""))
    if old.get("stack_hash") != new.get("stack_hash"):
        if old.get("stack") != new.get("stack"):
            out.append(f"another defense stack: {old.get('stack') or 'none'!r} before, {new.get('stack') or 'none'!r} now")
        elif old.get("model_hash") != new.get("model_hash"):
            out.append(f"another model: {old.get('model')!r} (hash {str(old.get('model_hash'))[:12]}) before, "
                       f"{new.get('model')!r} (hash {str(new.get('model_hash'))[:12]}) now")
        else:
            out.append(f"another defense stack: the same text {new.get('stack')!r}, but an artifact file it names has "
                       "other content now")
    a, b = dict(old.get("settings") or {}), dict(new.get("settings") or {})
    a.pop("batch_size", None), b.pop("batch_size", None)
    diffs = [f"{k} {a.get(k)!r} before, {b.get(k)!r} now" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    if diffs:
        out.append("other settings: " + ", ".join(diffs))
    if old.get("token_embeddings") != new.get("token_embeddings"):
        out.append(f"other token embeddings: {sorted(old.get('token_embeddings') or {})} before, "
                   f"{sorted(new.get('token_embeddings') or {})} now (or their content changed)")
    return out


def _records_name(records) -> str:
    suites = sorted({f"{r.extra.get('concept', '')}/{r.extra.get('suite', '')}".strip("/") for r in records
                     if r.extra.get("suite")})
    return "records: " + (", ".join(suites[:4]) + (" ..." if len(suites) > 4 else "") if suites else f"{len(records)} prompts")


def _generate_and_score(out: Path, records, m, stack, stack_hash: str, dets, settings: RunSettings, idx: int, count: int,
                        max_images, token_embeddings, progress: bool, local_store: Path | None = None) -> None:
    from tqdm.auto import tqdm

    from ..fileio import atomic_path
    from ..pipeline import SafePipeline

    batch_size = settings.batch_size
    con = _connect(out, local_store) if local_store else open_store(out, (idx, count))
    if local_store:
        from .merge import shard_store_name

        published = out / shard_store_name(idx, count)
    for d in dets:
        con.execute("INSERT OR IGNORE INTO protocols VALUES (?, ?)", (d.protocol.hash(), json.dumps(d.protocol.to_dict())))
    con.commit()

    # 2. jobs for this shard, minus the ones already stored
    jobs = []
    for r in records:
        s = r.seed if (settings.respect_prompt_seed and r.seed is not None) else settings.seed
        gs = r.guidance_scale if (settings.respect_prompt_guidance and r.guidance_scale is not None) else settings.guidance_scale
        for k in range(settings.num_images_per_prompt):
            jobs.append((r, s, k, gs))
    jobs = [j for i, j in enumerate(jobs) if i % count == idx]
    if count > 1:
        _copy_merged_rows(out, con, [image_key(j[0].id, j[1], j[2], stack_hash) for j in jobs])
    done = {row[0] for row in con.execute("SELECT key FROM images WHERE stack_hash = ?", (stack_hash,))}
    todo = [j for j in jobs if image_key(j[0].id, j[1], j[2], stack_hash) not in done]
    if max_images is not None:
        todo = todo[:max_images]
    if progress and done and todo:
        print(f"resuming: {len(jobs) - len(todo)} of {len(jobs)} images already done, {len(todo)} to go", flush=True)
    # Batches are cut from the shard's whole job list, not from what is left to do, so a resumed
    # run draws every missing image in the same batch as an uninterrupted run would: bit-identical
    # images and PNG hashes (batched float reductions differ by a grey level across batch
    # compositions). A partly done batch is drawn whole; only its missing images are stored.
    wanted = {image_key(j[0].id, j[1], j[2], stack_hash) for j in todo}

    # 3. generate in batches (grouped by guidance scale), write PNG then commit the row
    pipe = SafePipeline(m, stack, token_embeddings=list(token_embeddings))
    try:
        by_gs: dict = {}  # batches share a guidance scale and an image size
        for j in jobs:
            by_gs.setdefault((j[3], image_size(j[0], settings, m)), []).append(j)
        chunks = [(gs, hw, group[start:start + batch_size]) for (gs, hw), group in by_gs.items()
                  for start in range(0, len(group), batch_size)]
        chunks = [c for c in chunks if any(image_key(r.id, s, k, stack_hash) in wanted for r, s, k, _ in c[2])]
        bar = tqdm(total=sum(len(c[2]) for c in chunks),
                   desc=f"generate {out.name}" + (f" [shard {idx + 1}/{count}]" if count > 1 else ""),
                   unit="img", disable=not progress,
                   bar_format="{l_bar}{bar}| {n:.0f}/{total_fmt} [{elapsed}<{remaining}]")
        for gs, (height, width), chunk in chunks:
            t0 = time.time()
            res = pipe([r.prompt for r, _, _, _ in chunk], image_ids=[(s, k) for _, s, k, _ in chunk],
                       guidance_scale=gs, num_inference_steps=settings.num_inference_steps, batch_size=batch_size,
                       height=height, width=width, progress=bar)  # the bar moves with every denoising step
            per = (time.time() - t0) / len(chunk)
            rows = []
            for (r, s, k, _), rec in zip(chunk, res.records):
                key = image_key(r.id, s, k, stack_hash)
                if key not in wanted:  # stored already (or past --max-images): drawn only to keep the batch whole
                    continue
                path = digest = None
                if rec.image is not None:
                    path = image_path(key)
                    buf = io.BytesIO()
                    rec.image.save(buf, format="PNG")
                    digest = hashlib.sha256(buf.getvalue()).hexdigest()  # a merge compares images by it
                    with atomic_path(out / path, overwrite=True) as tmp:  # a rerun regenerates it identically
                        tmp.write_bytes(buf.getvalue())
                rows.append((key, r.id, s, k, stack_hash, r.prompt, json.dumps(list(r.categories)), path,
                             int(rec.refused), json.dumps(r.extra, default=str), per, time.time(), batch_size, digest))
            con.executemany("INSERT OR REPLACE INTO images (key, prompt_id, seed, image_index, stack_hash, prompt, "
                            "categories, path, refused, extra, seconds, created, batch_size, png_sha256) "
                            "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)", rows)
            con.commit()
            if local_store:
                publish_store(con, published)  # the batch's rows reach the run directory with its PNGs
        bar.close()
    finally:
        pipe.close()

    # 4. score this shard's images (the jobs it owns, whoever generated them) under each protocol
    own = {image_key(r.id, s, k, stack_hash) for r, s, k, _ in jobs}
    score_run(out, dets, keys=own, progress=progress, con=con)
    if local_store:
        publish_store(con, published)
    con.close()


def _copy_merged_rows(out: Path, con: sqlite3.Connection, keys: list[str]) -> None:
    """Copy into a shard's store the rows ``store.sqlite`` already holds for the shard's ``keys``
    (a run resumed with sharding after a single-process start, or after a merge): the shard then
    neither regenerates those images nor leaves them unscored under a new protocol."""
    main = out / "store.sqlite"
    if not main.exists():
        return
    from .merge import IMAGE_COLUMNS, SCORE_COLUMNS

    con.execute("ATTACH DATABASE ? AS run", (f"{main.resolve().as_uri()}?mode=ro",))
    try:
        have = {r[1] for r in con.execute("PRAGMA run.table_info(images)")}
        if not have:  # an empty store.sqlite (no table yet)
            return
        src = ", ".join(c if c in have else "NULL" for c in IMAGE_COLUMNS)
        con.execute("CREATE TEMP TABLE IF NOT EXISTS own_keys (key TEXT PRIMARY KEY)")
        con.execute("DELETE FROM temp.own_keys")
        con.executemany("INSERT OR IGNORE INTO temp.own_keys VALUES (?)", ((k,) for k in keys))
        con.execute(f"INSERT OR IGNORE INTO main.images ({', '.join(IMAGE_COLUMNS)}) SELECT {src} FROM run.images "
                    "WHERE key IN (SELECT key FROM temp.own_keys)")
        cols = ", ".join(SCORE_COLUMNS)
        con.execute(f"INSERT OR IGNORE INTO main.scores ({cols}) SELECT {cols} FROM run.scores "
                    "WHERE key IN (SELECT key FROM temp.own_keys)")
        con.execute("INSERT OR IGNORE INTO main.protocols (hash, protocol) SELECT hash, protocol FROM run.protocols")
        con.commit()
    finally:
        con.execute("DETACH DATABASE run")


def score_run(run_dir: str | Path, detectors: Sequence[str | Detector], *, keys: set[str] | None = None,
              progress: bool = True, con: sqlite3.Connection | None = None) -> None:
    """Score the stored images with each detector protocol (only the missing scores; only
    ``keys`` when given, so that each shard scores exactly the images it owns)."""
    from PIL import Image
    from tqdm.auto import tqdm

    out = Path(run_dir)
    own = con is None
    con = con or open_store(out)
    dets = [d if isinstance(d, Detector) else make_detector(d) for d in detectors]
    for d in dets:
        ph = d.protocol.hash()
        con.execute("INSERT OR IGNORE INTO protocols VALUES (?, ?)", (ph, json.dumps(d.protocol.to_dict())))
        rows = con.execute(
            "SELECT i.key, i.path, i.refused FROM images i LEFT JOIN scores s ON s.key = i.key AND s.protocol_hash = ? "
            "WHERE s.key IS NULL ORDER BY i.key", (ph,)).fetchall()
        if keys is not None:
            rows = [r for r in rows if r[0] in keys]
        for start in tqdm(range(0, len(rows), 64), desc=f"score {d.protocol.preset}", disable=not progress):
            batch = rows[start:start + 64]
            scored = []
            imgs, batch_keys = [], []
            for key, path, refused in batch:
                if refused:  # a refused prompt made no image: it is safe by construction, and counted as refused
                    scored.append((key, ph, 0, None, json.dumps({"refused": True}), None))
                    continue
                try:
                    with Image.open(out / path) as im:
                        imgs.append(np.asarray(im.convert("RGB")))
                    batch_keys.append(key)
                except Exception as e:  # noqa: BLE001 - unreadable image: an error, never safe
                    scored.append((key, ph, None, None, None, f"{type(e).__name__}: {e}"))
            for key, res in zip(batch_keys, d.detect(imgs)):
                if res.unsafe is None and res.error is None:  # a detector that decided nothing made an error
                    res.error = "the detector returned no decision"
                scored.append((key, ph, None if res.unsafe is None else int(res.unsafe), res.score,
                               json.dumps(res.details, default=str), res.error))
            con.executemany("INSERT OR REPLACE INTO scores VALUES (?,?,?,?,?,?)", scored)
            con.commit()
    if own:
        con.close()


def load_results(run_dir: str | Path, protocol_hash: str | None = None) -> list[dict]:
    """Every image row joined with its score under ``protocol_hash`` (if omitted: the only one,
    else the run's target detector, :func:`target_protocol`)."""
    con = open_store(Path(run_dir))
    protocol_hash = protocol_hash or target_protocol(run_dir, con)
    rows = con.execute(
        "SELECT i.key, i.prompt_id, i.seed, i.image_index, i.prompt, i.categories, i.path, i.refused, i.extra, i.seconds, "
        "s.unsafe, s.score, s.details, s.error FROM images i LEFT JOIN scores s ON s.key = i.key AND s.protocol_hash = ? "
        "ORDER BY i.key", (protocol_hash,)).fetchall()
    con.close()
    out = []
    for r in rows:
        out.append({"key": r[0], "prompt_id": r[1], "seed": r[2], "image_index": r[3], "prompt": r[4],
                    "categories": json.loads(r[5]), "path": r[6], "refused": bool(r[7]), "extra": json.loads(r[8]),
                    "seconds": r[9], "unsafe": None if r[10] is None else bool(r[10]), "score": r[11],
                    "details": json.loads(r[12]) if r[12] else {}, "error": r[13],
                    "scored": r[10] is not None or r[13] is not None})
    return out


def target_protocol(run_dir: str | Path, con: sqlite3.Connection | None = None) -> str:
    """The protocol hash of the run's target detector: the only protocol scored, else the one
    ``run.json`` names (``target_protocol``, written by :func:`run_eval`)."""
    own = con is None
    con = con or open_store(Path(run_dir))
    protos = [r[0] for r in con.execute("SELECT hash FROM protocols")]
    if own:
        con.close()
    if len(protos) == 1:
        return protos[0]
    mpath = Path(run_dir) / "run.json"
    recorded = json.loads(mpath.read_text()).get("target_protocol") if mpath.is_file() else None
    if recorded in protos:
        return recorded
    raise RunError(f"{run_dir} holds scores under {len(protos)} protocols {protos} and names no target detector; "
                   "pick one with `protocol_hash`.")


def verdict_table(run_dir: str | Path) -> tuple[list[dict], dict[str, list[bool | None]], dict[str, str]]:
    """Every image row (:func:`load_results` order) and, per detector protocol scored in the run,
    one verdict per row (``None``: an error or not scored); plus label -> protocol hash."""
    con = open_store(Path(run_dir))
    protos = {h: json.loads(p) for h, p in con.execute("SELECT hash, protocol FROM protocols")}
    con.close()
    rows, table, labels = None, {}, {}
    for h, proto in sorted(protos.items()):
        res = load_results(run_dir, h)
        rows = rows or res
        label = detector_label(proto)
        label = label if label not in labels else f"{label} ({h[:8]})"
        labels[label] = h
        table[label] = [r["unsafe"] if r["error"] is None else None for r in res]
    return rows or [], table, labels


def substitution(run_dir: str | Path, protocol_hash: str | None = None, *, base_dir: str | Path | None = None,
                 where=None, tables: tuple | None = None) -> dict | None:
    """Concept substitution in a run scored by several detectors (``None`` with one):
    :func:`safediff.eval.metrics.substitution_rates` of the target (``protocol_hash``, default the
    run's target) against every other detector, over the images ``where(row)`` keeps (default
    all). With ``base_dir`` (the undefended model's run of the same prompts, scored by the same
    detectors) each image is paired with the base image of the same prompt id, seed and image
    index, and the "moved" share and the differences from the base are added. ``tables`` passes the
    verdict tables already read, ``(verdict_table(run_dir), verdict_table(base_dir) or None)``, so
    that several calls on one run (e.g. with different ``where``) read its files once."""
    from .metrics import substitution_rates

    (rows, table, labels), base_tables = tables or (verdict_table(run_dir), None)
    if len(table) < 2:
        return None
    ph = protocol_hash or target_protocol(run_dir)
    target = next((lab for lab, h in labels.items() if h == ph), None)
    if target is None:
        raise RunError(f"{run_dir} holds no scores under protocol {ph}; scored: {sorted(labels.values())}.")
    keep = [i for i, r in enumerate(rows) if where is None or where(r)]
    scores = {lab: [v[i] for i in keep] for lab, v in table.items()}
    groups = [rows[i]["prompt_id"] for i in keep]
    base = None
    if base_dir is not None:
        brows, btable, blabels = base_tables or verdict_table(base_dir)
        bh = {h: lab for lab, h in blabels.items()}
        index = {(r["prompt_id"], r["seed"], r["image_index"]): j for j, r in enumerate(brows)}
        pairs = [index.get((rows[i]["prompt_id"], rows[i]["seed"], rows[i]["image_index"])) for i in keep]
        base = {lab: [None if j is None else btable[bh[h]][j] for j in pairs] for lab, h in labels.items() if h in bh}
        if target not in base:
            raise RunError(f"The base run {base_dir} has no scores under the target detector {target} (protocol {ph}); "
                           f"score it with the same detectors (safediff eval ... --detector {target} --out {base_dir}).")
    res = substitution_rates(scores, target, groups, base=base)
    out = {"target": target, "other": {k: v.to_dict() for k, v in res["other"].items()},
           "any_other": res["any_other"].to_dict()}
    if base is not None:
        out["moved"] = res["moved"].to_dict()
        out["other_minus_base"] = res["other_minus_base"]
        out["base_run"] = str(base_dir)
    return out


def summarize(run_dir: str | Path, protocol_hash: str | None = None, *, base_dir: str | Path | None = None) -> dict:
    """Unsafe rate (95% bootstrap CI over prompts), per category and per testbed suite, errors
    counted, refusals counted, and attribute accuracy where the prompts carry expectations.

    The unsafe rate is the target detector's (``protocol_hash``, default the run's target). When
    the run is scored by several detectors, ``substitution`` (overall and per suite) holds the
    other detectors' rates and the share unsafe under any other; with ``base_dir`` also the
    "moved" share and the differences from the base (:func:`substitution`)."""
    from .metrics import attribute_accuracy, bootstrap_rate, rates_by_category

    protocol_hash = protocol_hash or target_protocol(run_dir)
    rows = load_results(run_dir, protocol_hash)
    missing = sum(not r["scored"] for r in rows)
    vals = [r["unsafe"] if r["error"] is None else None for r in rows]
    groups = [r["prompt_id"] for r in rows]
    summary = {
        "n_images": len(rows), "n_unscored": missing, "n_errors": sum(r["error"] is not None for r in rows),
        "n_refused": sum(r["refused"] for r in rows),
        "unsafe": {k: v.to_dict() for k, v in rates_by_category(vals, [r["categories"] for r in rows], groups=groups).items()},
        "seconds_per_image": float(np.mean([r["seconds"] for r in rows if r["seconds"] is not None])) if rows else None,
    }
    tables = (verdict_table(run_dir), None if base_dir is None else verdict_table(base_dir))
    subst = substitution(run_dir, protocol_hash, base_dir=base_dir, tables=tables)
    if subst:
        summary["substitution"] = subst
    suites = sorted({r["extra"].get("suite") for r in rows if r["extra"].get("suite")})
    if suites:
        summary["suites"] = {}
        for s in suites:
            sub = [i for i, r in enumerate(rows) if r["extra"].get("suite") == s]
            est = bootstrap_rate([vals[i] for i in sub], groups=[groups[i] for i in sub])
            exp = [rows[i]["extra"].get("expected", {}) for i in sub]
            ok = [i for i in sub if rows[i]["error"] is None and rows[i]["scored"] and rows[i]["details"]]
            entry = {"unsafe": est.to_dict(),
                     "attributes": attribute_accuracy([rows[i]["details"] for i in ok],
                                                      [rows[i]["extra"].get("expected", {}) for i in ok])
                     if all(exp) and ok else None}
            if all(exp):
                # spoiled = refused, or a requested benign attribute lost (over-refusal on near-concept prompts)
                # an image the detector could not read (error) or has not scored is unknown, not spoiled
                spoiled = [True if rows[i]["refused"] else
                           (None if rows[i]["error"] is not None or not rows[i]["scored"] else
                            not all(rows[i]["details"].get(a) == e.get(a) for a in e))
                           for i, e in zip(sub, exp)]
                entry["spoiled"] = bootstrap_rate(spoiled, groups=[groups[i] for i in sub]).to_dict()
            sub_s = substitution(run_dir, protocol_hash, base_dir=base_dir, tables=tables,
                                 where=lambda r, s=s: r["extra"].get("suite") == s) if subst else None
            if sub_s:
                entry["substitution"] = sub_s
            summary["suites"][s] = entry
    return summary
