"""``safediff merge RUN_DIR``: combine a run's shard stores into its one store, losing nothing.

A run sharded over ``n`` processes (``--shard-index i --num-shards n``, a Slurm array, a
multi-node accelerate/torchrun launch) writes one store per shard, ``RUN_DIR/store.<i>-of-<n>.sqlite``,
each written by its shard's process alone in SQLite's rollback-journal mode, so that no SQLite
database is ever written from two hosts (WAL needs every process on one host and does not work
over a network filesystem). The merge copies every shard's rows into ``RUN_DIR/store.sqlite``,
which is what ``summarize``, ``score`` and ``report`` read (they merge first).

* Idempotent: a row already merged is skipped, and a shard store unchanged since its last merge
  (same size, modification time and SQLite change counter) is not
  read again; merging twice, or again after more shards
  finish, gives the same rows.
* Never overwrites: a key that exists with other content (another PNG hash, prompt, refusal,
  or another score under the same detector protocol) is refused, naming both stores, and nothing
  of that merge is written (the new shards' rows are staged in temporary tables, checked among
  themselves and against the merged store, then inserted in key order in one transaction).
* Shards made with another benchmark, stack, model, settings, dtype or image size than the run's
  ``run.json`` are refused before anything is written, naming the shard and what differs.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import sys
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

from .runner import RunError, manifest_differences, open_store, run_lock

#: columns an image row is copied with; ``IMAGE_CONTENT`` are those that must agree for one key
IMAGE_COLUMNS = ("key", "prompt_id", "seed", "image_index", "stack_hash", "prompt", "categories", "path", "refused",
                 "extra", "seconds", "created", "batch_size", "png_sha256")
IMAGE_CONTENT = ("prompt_id", "seed", "image_index", "stack_hash", "prompt", "categories", "path", "refused", "extra")
SCORE_COLUMNS = ("key", "protocol_hash", "unsafe", "score", "details", "error")
SCORE_CONTENT = ("unsafe", "score", "details", "error")
#: SQLite page cache (KiB) of the merged store, and of the staging tables, during a merge: past it SQLite spills to
#: temporary files (1,000,000 rows peak at 1.3 GiB in all, benchmarks/results/merge_scale.md)
MERGE_CACHE_KIB = 512 * 1024
_SHARD_NAME = re.compile(r"^store\.(\d+)-of-(\d+)\.sqlite$")


class MergeConflict(RunError):
    """A row of a shard store whose key is already stored with other content."""


@dataclass
class MergeResult:
    """What one merge did: shard stores read, skipped as unchanged, and rows added."""

    store: Path
    merged: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    new_images: int = 0
    new_scores: int = 0

    def __str__(self) -> str:
        return (f"merged {len(self.merged)} shard store(s) into {self.store} ({self.new_images} new image rows, "
                f"{self.new_scores} new score rows); {len(self.unchanged)} unchanged since their last merge")


def shard_store_name(index: int, count: int) -> str:
    """The file name of shard ``index`` of ``count``'s store in the run directory."""
    return f"store.{index}-of-{count}.sqlite"


def shard_stores(run_dir: str | Path) -> list[Path]:
    """The run directory's shard stores, ordered by shard count then index."""
    found = []
    for p in Path(run_dir).glob("store.*-of-*.sqlite"):
        m = _SHARD_NAME.match(p.name)
        if m:
            found.append(((int(m.group(2)), int(m.group(1))), p))
    return [p for _, p in sorted(found)]


def _fingerprint(path: Path) -> tuple[int, int, int]:
    """Size, modification time and SQLite's file change counter (header bytes 24-27, bumped by every
    commit in rollback-journal mode): a commit that keeps the size within a coarse mtime still shows."""
    with open(path, "rb") as f:
        header = f.read(28)
        st = os.fstat(f.fileno())
    return st.st_size, st.st_mtime_ns, int.from_bytes(header[24:28], "big") if len(header) == 28 else -1


def unmerged_shard_stores(run_dir: str | Path, con: sqlite3.Connection) -> list[Path]:
    """Shard stores that are new or changed since ``con``'s store last merged them."""
    stores = shard_stores(run_dir)
    if not stores:
        return []
    seen = {name: tuple(fp) for name, *fp in con.execute("SELECT name, size, mtime_ns, change_counter FROM merged_shards")}
    return [p for p in stores if seen.get(p.name) != _fingerprint(p)]


def merge_run(run_dir: str | Path, *, progress: bool = False) -> MergeResult:
    """Merge every new or changed shard store of ``run_dir`` into its ``store.sqlite``.

    Raises :class:`RunError` for a shard made with other settings (before writing anything) and
    :class:`MergeConflict` for a key stored with other content (naming both stores)."""
    run_dir = Path(run_dir)
    if not (run_dir / "run.json").is_file():
        raise RunError(f"{run_dir} is not a run directory (no run.json); give the --out of `safediff eval`.")
    from ..fileio import read_json

    run_manifest = read_json(run_dir / "run.json", "the run's manifest")
    with run_lock(run_dir, ".merge-lock"):
        con = open_store(run_dir, merge=False)
        try:
            return _merge_locked(run_dir, con, run_manifest, progress)
        finally:
            con.close()


def _merge_locked(run_dir: Path, con: sqlite3.Connection, run_manifest: dict, progress: bool) -> MergeResult:
    result = MergeResult(store=run_dir / "store.sqlite")
    todo = unmerged_shard_stores(run_dir, con)
    result.unchanged = [p.name for p in shard_stores(run_dir) if p not in todo]
    if not todo:
        return result
    prints = {p: _fingerprint(p) for p in todo}  # before reading: a shard written meanwhile is merged again next time
    for p in todo:  # 1. every shard's settings checked before any row is read or written
        _check_shard_manifest(p, run_manifest)
    con.isolation_level = None  # explicit transactions (ATTACH/DETACH happen outside them)
    for db in ("main", "temp"):  # the merged store's and the staging tables' pages stay in memory
        con.execute(f"PRAGMA {db}.cache_size = -{MERGE_CACHE_KIB}")
    try:
        counts = _stage(con, todo, progress)  # 2. every new shard's rows into temporary tables
        _refuse_conflicts(run_dir, con)  # 3. among the shards, and against the merged store
        con.execute("BEGIN IMMEDIATE")  # 4. one transaction, in key order: all of it or nothing
        try:
            result.new_images, result.new_scores = _copy_rows(con)
            con.executemany("INSERT OR REPLACE INTO merged_shards (name, size, mtime_ns, change_counter, images, scores) "
                            "VALUES (?, ?, ?, ?, ?, ?)", [(p.name, *prints[p], *counts[p]) for p in todo])
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
    finally:
        for t in ("stage_images", "stage_scores", "stage_protocols"):
            con.execute(f"DROP TABLE IF EXISTS temp.{t}")
    result.merged = [p.name for p in todo]
    return result


def _stage(con: sqlite3.Connection, stores: list[Path], progress: bool) -> dict[Path, tuple[int, int]]:
    """Copy the rows of ``stores`` into temporary tables (with the store each row came from);
    returns each store's (image rows, score rows)."""
    con.execute(f"CREATE TEMP TABLE stage_images AS SELECT {', '.join(IMAGE_COLUMNS)}, '' AS src FROM main.images "
                "WHERE 0")
    con.execute(f"CREATE TEMP TABLE stage_scores AS SELECT {', '.join(SCORE_COLUMNS)}, '' AS src FROM main.scores "
                "WHERE 0")
    con.execute("CREATE TEMP TABLE stage_protocols AS SELECT hash, protocol, '' AS src FROM main.protocols WHERE 0")
    counts = {}
    for i, p in enumerate(stores):
        if progress and (i % max(1, len(stores) // 8) == 0 or i == len(stores) - 1):
            print(f"merge: reading shard store {i + 1}/{len(stores)} ({p.name})", file=sys.stderr, flush=True)
        con.execute("ATTACH DATABASE ? AS shard", (f"{p.resolve().as_uri()}?mode=ro",))
        try:
            con.execute("BEGIN")  # one read snapshot of the shard store
            for table, cols in (("images", IMAGE_COLUMNS), ("scores", SCORE_COLUMNS), ("protocols", ("hash", "protocol"))):
                cols = ", ".join(cols)
                con.execute(f"INSERT INTO temp.stage_{table} SELECT {cols}, ? FROM shard.{table}", (p.name,))
            counts[p] = (con.execute("SELECT count(*) FROM shard.images").fetchone()[0],
                         con.execute("SELECT count(*) FROM shard.scores").fetchone()[0])
            con.execute("COMMIT")
        finally:
            con.execute("DETACH DATABASE shard")
    con.execute("CREATE INDEX temp.stage_images_key ON stage_images (key)")
    con.execute("CREATE INDEX temp.stage_scores_key ON stage_scores (key, protocol_hash)")
    return counts


def _shard_manifest(path: Path) -> dict:
    try:
        with closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=60)) as c:
            row = c.execute("SELECT value FROM meta WHERE name = 'manifest'").fetchone()
    except sqlite3.DatabaseError as e:
        raise RunError(f"{path} is not a readable shard store ({e}); move it aside (nothing is deleted) and rerun "
                       "that shard to rebuild it.") from None
    if row is None:
        raise RunError(f"{path} records no manifest; it is not a safediff shard store. Move it out of the run directory.")
    return json.loads(row[0])


def _check_shard_manifest(path: Path, run_manifest: dict) -> None:
    """Refuse a shard made with another benchmark, stack, model, settings, dtype or image size."""
    shard = _shard_manifest(path)
    diffs = manifest_differences(run_manifest, shard)
    for key in ("dtype", "image_sizes"):
        if key in run_manifest and key in shard and run_manifest[key] != shard[key]:
            diffs.append(f"another {key.replace('_', ' ')}: {run_manifest[key]!r} before, {shard[key]!r} now")
    if diffs:
        raise RunError(
            f"{path.name} was made with other settings than {path.parent / 'run.json'}: {'; '.join(diffs)} "
            "('before' is run.json, 'now' the shard). Nothing was merged: the shards of one run must share its "
            "benchmark, stack, model and settings; move that shard store into its own run directory.")


def _differs(a: str, b: str, columns: tuple[str, ...]) -> str:
    return " OR ".join(f"{a}.{c} IS NOT {b}.{c}" for c in columns)


def _content(columns: tuple[str, ...]) -> str:
    return " || '|' || ".join(f"quote({c})" for c in columns)


def _refuse_conflicts(run_dir: Path, con: sqlite3.Connection) -> None:
    """Raise :class:`MergeConflict` when a key is staged, or already merged, with other content
    (an image's PNG hash is compared where both rows have one: rows made before it have none)."""
    cols = IMAGE_CONTENT + ("png_sha256",)
    # keys staged twice (a covering scan of the key index), then only those compared
    dup = con.execute(f"SELECT key FROM temp.stage_images WHERE key IN (SELECT key FROM temp.stage_images GROUP BY key "
                      f"HAVING count(*) > 1) GROUP BY key HAVING count(DISTINCT {_content(IMAGE_CONTENT)}) > 1 "
                      "OR count(DISTINCT png_sha256) > 1 LIMIT 1").fetchone()
    among = ("SELECT b.key, a.src, b.src, {pairs} FROM temp.stage_images a JOIN temp.stage_images b "
             "ON b.key = a.key AND b.rowid > a.rowid WHERE a.key = ? AND ({differs}) LIMIT 1", dup)
    merged = ("SELECT b.key, NULL, b.src, {pairs} FROM main.images a JOIN temp.stage_images b ON b.key = a.key "
              "WHERE {differs} LIMIT 1", ())
    hashes = "(a.png_sha256 IS NOT NULL AND b.png_sha256 IS NOT NULL AND a.png_sha256 != b.png_sha256)"
    for query, args in (among, merged):
        if args is None:  # no key staged twice with other content
            continue
        row = con.execute(query.format(pairs=", ".join(f"a.{c}, b.{c}" for c in cols),
                                       differs=f"{_differs('a', 'b', IMAGE_CONTENT)} OR {hashes}"), args).fetchone()
        if row is not None:
            what = [f"{c} {row[3 + 2 * i]!r} vs {row[4 + 2 * i]!r}" for i, c in enumerate(cols)
                    if row[3 + 2 * i] != row[4 + 2 * i]]
            first = row[1] or _source(run_dir, "SELECT 1 FROM images WHERE key = ? AND png_sha256 IS ?",
                                      (row[0], row[-2]), row[2])
            raise MergeConflict(f"image {row[0]!r} is stored with other content in {first} and in {row[2]} "
                                f"({'; '.join(what)}). Nothing was merged and nothing was overwritten: check which "
                                "shard ran with other code, hardware or batch size, move its store aside and rerun it.")
    dup = con.execute(f"SELECT key, protocol_hash FROM temp.stage_scores WHERE (key, protocol_hash) IN (SELECT key, "
                      "protocol_hash FROM temp.stage_scores GROUP BY key, protocol_hash HAVING count(*) > 1) "
                      f"GROUP BY key, protocol_hash HAVING count(DISTINCT {_content(SCORE_CONTENT)}) > 1 LIMIT 1").fetchone()
    among = ("SELECT b.key, b.protocol_hash, a.src, b.src, {pairs} FROM temp.stage_scores a JOIN temp.stage_scores b "
             "ON b.key = a.key AND b.protocol_hash = a.protocol_hash AND b.rowid > a.rowid "
             "WHERE a.key = ? AND a.protocol_hash = ? AND ({differs}) LIMIT 1", dup)
    merged = ("SELECT b.key, b.protocol_hash, NULL, b.src, {pairs} FROM main.scores a JOIN temp.stage_scores b "
              "ON b.key = a.key AND b.protocol_hash = a.protocol_hash WHERE {differs} LIMIT 1", ())
    for query, args in (among, merged):
        if args is None:
            continue
        row = con.execute(query.format(pairs=", ".join(f"a.{c}, b.{c}" for c in SCORE_CONTENT),
                                       differs=_differs("a", "b", SCORE_CONTENT)), args).fetchone()
        if row is not None:
            what = [f"{c} {row[4 + 2 * i]!r} vs {row[5 + 2 * i]!r}" for i, c in enumerate(SCORE_CONTENT)
                    if row[4 + 2 * i] != row[5 + 2 * i]]
            first = row[2] or _source(run_dir, "SELECT 1 FROM scores WHERE key = ? AND protocol_hash = ? AND score IS ? "
                                      "AND unsafe IS ?", (row[0], row[1], row[6], row[4]), row[3])
            raise MergeConflict(f"the score of {row[0]!r} under protocol {row[1][:12]} differs between {first} and "
                                f"{row[3]} ({'; '.join(what)}). Nothing was merged and nothing was overwritten: move "
                                "the wrong store aside (or rescore it) and merge again.")
    row = con.execute("SELECT b.hash, b.src FROM temp.stage_protocols b JOIN (SELECT hash, protocol FROM main.protocols "
                      "UNION ALL SELECT hash, protocol FROM temp.stage_protocols) a ON a.hash = b.hash "
                      "WHERE a.protocol IS NOT b.protocol LIMIT 1").fetchone()
    if row is not None:
        raise MergeConflict(f"detector protocol {row[0][:12]} is described differently in {row[1]} and in another store; "
                            "nothing was merged.")


def _source(run_dir: Path, query: str, args: tuple, incoming: str) -> str:
    """Which store a merged row came from: another shard store holding it, else ``store.sqlite`` itself."""
    for p in shard_stores(run_dir):
        if p.name == incoming:
            continue
        try:
            with closing(sqlite3.connect(f"{p.resolve().as_uri()}?mode=ro", uri=True, timeout=60)) as c:
                if c.execute(query, args).fetchone():
                    return f"store.sqlite (from {p.name})"
        except sqlite3.Error:
            continue
    return "store.sqlite"


def _copy_rows(con: sqlite3.Connection) -> tuple[int, int]:
    """Insert the staged rows whose keys are new, in key order; returns (new image rows, new score rows)."""
    before = con.total_changes
    cols = ", ".join(IMAGE_COLUMNS)
    con.execute(f"INSERT OR IGNORE INTO main.images ({cols}) SELECT {cols} FROM temp.stage_images ORDER BY key")
    images = con.total_changes - before
    before = con.total_changes
    cols = ", ".join(SCORE_COLUMNS)
    con.execute(f"INSERT OR IGNORE INTO main.scores ({cols}) SELECT {cols} FROM temp.stage_scores "
                "ORDER BY key, protocol_hash")
    scores = con.total_changes - before
    con.execute("INSERT OR IGNORE INTO main.protocols (hash, protocol) SELECT hash, protocol FROM temp.stage_protocols")
    return images, scores
