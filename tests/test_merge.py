"""One store per shard and `safediff merge` (issue 29.1): real shard processes, an idempotent merge,
a late shard, conflicts refused naming both stores, shards of other settings refused, and run
directories in the layout made before shard stores still loading."""

import hashlib
import os
import shutil
import sqlite3
import subprocess
import sys

import pytest

from safediff.cli import main
from safediff.eval.merge import MergeConflict, merge_run, shard_stores
from safediff.eval.runner import RunError, RunSettings, load_results, run_eval, summarize

BENCH = "testbed:striped/explicit"
STEPS = 2


def _shard_cmd(out, index, count, steps=STEPS):
    return [sys.executable, "-m", "safediff.cli", "eval", "--benchmark", BENCH, "--n", "2", "--num-images", "2",
            "--steps", str(steps), "--batch-size", "2", "--shard-index", str(index), "--num-shards", str(count),
            "--out", str(out)]


def _run_shards(out, indices, count):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(_shard_cmd(out, i, count), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in indices]
    for i, p in zip(indices, procs):
        stdout, stderr = p.communicate(timeout=300)
        assert p.returncode == 0, stderr[-3000:]
        assert f"shard {i} of {count} done" in stdout and f"safediff merge {out}" in stdout


def _tables(run_dir):
    """Everything a merge decides (the rows), without the bookkeeping of when it ran."""
    con = sqlite3.connect(run_dir / "store.sqlite")
    out = {t: sorted(con.execute(f"SELECT * FROM {t}").fetchall()) for t in ("images", "scores", "protocols")}
    con.close()
    return out


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """Shards 0 and 1 of 3 run at once as separate processes and are merged; shard 2 comes late."""
    out = tmp_path_factory.mktemp("sharded") / "run"
    _run_shards(out, [0, 1], 3)
    return out


def test_shard_processes_write_their_own_stores_and_merge_idempotently(sharded, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(sharded, out)
    assert [p.name for p in shard_stores(out)] == ["store.0-of-3.sqlite", "store.1-of-3.sqlite"]
    assert not (out / "store.sqlite").exists()  # no shard touched a shared database
    for p in shard_stores(out):
        con = sqlite3.connect(p)
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "delete"  # never WAL on a possibly shared disk
        assert con.execute("SELECT value FROM meta WHERE name = 'shard'").fetchone()[0] == f"{p.name[6]}/3"
        con.close()

    assert main(["merge", str(out)]) == 0
    assert "merged 2 shard store(s)" in capsys.readouterr().out
    first = _tables(out)
    assert len(first["images"]) == 3  # jobs 0 and 3 (shard 0) and 1 (shard 1) of 4
    assert len(first["scores"]) == 3 * len(first["protocols"])
    for key, path, digest in sqlite3.connect(out / "store.sqlite").execute("SELECT key, path, png_sha256 FROM images"):
        assert digest == hashlib.sha256((out / path).read_bytes()).hexdigest(), key  # the row records its PNG

    assert main(["merge", str(out)]) == 0  # again: nothing new, the same rows
    assert "merged 0 shard store(s)" in capsys.readouterr().out and _tables(out) == first

    _run_shards(out, [2], 3)  # a late shard; a reader merges it first
    rows = load_results(out, first["protocols"][0][0])
    assert "merging" in capsys.readouterr().err
    third = _tables(out)
    assert len(third["images"]) == 4 and set(first["images"]) < set(third["images"]) and len(rows) == 4
    assert main(["merge", str(out)]) == 0 and _tables(out) == third
    assert summarize(out, third["protocols"][0][0])["n_images"] == 4


def test_a_key_with_other_content_is_refused_naming_both_stores(sharded, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(sharded, out)
    one = sqlite3.connect(out / "store.1-of-3.sqlite")
    row = one.execute("SELECT * FROM images").fetchone()
    one.close()
    zero = sqlite3.connect(out / "store.0-of-3.sqlite")  # shard 0 claims shard 1's image with another PNG
    cols = [r[1] for r in zero.execute("PRAGMA table_info(images)")]
    forged = dict(zip(cols, row), png_sha256="0" * 64)
    zero.execute(f"INSERT INTO images ({', '.join(forged)}) VALUES ({', '.join('?' * len(forged))})", list(forged.values()))
    zero.commit()
    zero.close()

    with pytest.raises(MergeConflict, match="other content in store.0-of-3.sqlite and in store.1-of-3.sqlite.*png_sha256"):
        merge_run(out)
    assert not any(_tables(out).values())  # nothing of the refused merge was written
    assert main(["merge", str(out)]) == 2  # the CLI: one line, both stores named, and again refused
    err = capsys.readouterr().err
    assert "store.0-of-3.sqlite" in err and "store.1-of-3.sqlite" in err and "png_sha256" in err

    # the same row against one merged before: the merged store names the shard it came from
    shutil.rmtree(out)
    shutil.copytree(sharded, out)
    assert main(["merge", str(out)]) == 0
    before = _tables(out)
    zero = sqlite3.connect(out / "store.0-of-3.sqlite")
    zero.execute(f"INSERT INTO images ({', '.join(forged)}) VALUES ({', '.join('?' * len(forged))})", list(forged.values()))
    zero.commit()
    zero.close()
    with pytest.raises(MergeConflict, match="in store.sqlite \\(from store.1-of-3.sqlite\\) and in store.0-of-3.sqlite"):
        merge_run(out)
    assert _tables(out) == before  # never overwritten

    # a score that differs under the same protocol is refused too, naming both
    shutil.rmtree(out)
    shutil.copytree(sharded, out)
    assert main(["merge", str(out)]) == 0
    one = sqlite3.connect(out / "store.1-of-3.sqlite")
    one.execute("UPDATE scores SET score = 0.123456")
    one.commit()
    one.close()
    with pytest.raises(MergeConflict, match="differs between store.sqlite.* and store.1-of-3.sqlite.*score"):
        merge_run(out)
    with pytest.raises(MergeConflict):  # a reader refuses too, rather than read a half-merged run
        load_results(out, before["protocols"][0][0])
    assert _tables(out) == before


def test_a_shard_made_with_other_settings_is_refused_before_merging(sharded, tmp_path, testbed):
    out = tmp_path / "run"
    shutil.copytree(sharded, out)
    other = tmp_path / "other"  # the same shard, launched with another --steps into node-local disk
    run_eval(BENCH, other, model=testbed, n=2, progress=False, shard=(2, 3),
             settings=RunSettings(num_images_per_prompt=2, num_inference_steps=STEPS + 1, batch_size=2))
    shutil.copy(other / "store.2-of-3.sqlite", out / "store.2-of-3.sqlite")
    with pytest.raises(RunError, match="store.2-of-3.sqlite was made with other settings.*num_inference_steps 2 "
                                       "before, 3 now.*Nothing was merged"):
        merge_run(out)
    assert not (out / "store.sqlite").exists() or not _tables(out)["images"]  # refused before writing anything
    with pytest.raises(RunError, match="not a run directory"):
        merge_run(tmp_path / "missing")


def _to_legacy_layout(run_dir):
    """Make a store look like one written before shard stores: WAL, no PNG hash, no merge tables."""
    con = sqlite3.connect(run_dir / "store.sqlite")
    con.execute("ALTER TABLE images DROP COLUMN png_sha256")
    con.execute("DROP TABLE merged_shards")
    con.execute("DROP TABLE meta")
    con.commit()
    assert con.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal"
    con.close()


def test_single_process_and_existing_run_directories(tmp_path, testbed):
    kw = dict(model=testbed, n=2, progress=False,
              settings=RunSettings(num_images_per_prompt=2, num_inference_steps=STEPS, batch_size=2))
    out = run_eval(BENCH, tmp_path / "single", **kw)
    assert (out / "store.sqlite").exists() and not shard_stores(out)  # one process writes where it always did
    protos = [h for (h,) in sqlite3.connect(out / "store.sqlite").execute("SELECT hash FROM protocols")]
    ref = {h: load_results(out, h) for h in protos}
    _to_legacy_layout(out)
    assert {h: load_results(out, h) for h in protos} == ref  # today's layout loads as before
    mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "images").glob("*.png")}
    run_eval(BENCH, out, **kw)  # resumed single-process: nothing regenerated
    run_eval(BENCH, out, shard=(1, 2), **kw)  # resumed sharded: the shard takes the stored rows, regenerates nothing
    assert {p.name: p.stat().st_mtime_ns for p in (out / "images").glob("*.png")} == mtimes
    assert merge_run(out).new_images == 0 and {h: load_results(out, h) for h in protos} == ref


def test_a_shard_whose_sibling_writes_the_manifest_between_its_checks_goes_on(tmp_path, testbed, monkeypatch):
    """CI once saw shard 1 find no run.json, shard 0 write it, then shard 1 fail with UnboundLocalError: the
    manifest's existence must be decided once. Here the 'sibling' writes run.json right after the first look."""
    kw = dict(model=testbed, n=2, progress=False,
              settings=RunSettings(num_images_per_prompt=2, num_inference_steps=STEPS, batch_size=2))
    first = run_eval(BENCH, tmp_path / "first", shard=(0, 2), **kw)
    target = tmp_path / "raced" / "run.json"
    real_exists = type(target).exists
    looks = []

    def exists(self, *a, **k):
        found = real_exists(self, *a, **k)
        if self == target and not looks:
            looks.append(found)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(first / "run.json", target)  # the sibling shard's manifest lands now
        return found

    monkeypatch.setattr(type(target), "exists", exists)
    out = run_eval(BENCH, tmp_path / "raced", shard=(1, 2), **kw)
    assert looks == [False] and [p.name for p in shard_stores(out)] == ["store.1-of-2.sqlite"]
