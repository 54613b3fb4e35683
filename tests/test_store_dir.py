"""Node-local shard stores (issue 29, item 1: "on the run directory or node-local disk"): a shard
writes its store on a local folder and publishes it into the run directory atomically after every
batch and when done; the result is the same as a shard writing in the run directory."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from safediff.eval import runner
from safediff.eval.benchmarks import load_benchmark
from safediff.eval.runner import RunSettings, run_eval

SETTINGS = RunSettings(num_inference_steps=2, batch_size=1)


def records():
    return load_benchmark("testbed:striped/explicit", n=3)


def rows(path: Path) -> tuple[list, list]:
    con = sqlite3.connect(path)
    try:
        return (con.execute("SELECT key, png_sha256 FROM images ORDER BY key").fetchall(),
                con.execute("SELECT key, protocol_hash, unsafe, score FROM scores ORDER BY key, protocol_hash").fetchall())
    finally:
        con.close()


def test_a_shard_with_a_local_store_publishes_the_same_store_and_leaves_no_scratch(tmp_path, testbed):
    plain, local_run, scratch = tmp_path / "plain", tmp_path / "local", tmp_path / "node-local"
    for i in range(2):
        run_eval(records(), plain, model=testbed, settings=SETTINGS, shard=(i, 2), progress=False)
        run_eval(records(), local_run, model=testbed, settings=SETTINGS, shard=(i, 2), progress=False,
                 store_dir=scratch)
    for i in range(2):
        name = f"store.{i}-of-2.sqlite"
        assert rows(local_run / name) == rows(plain / name) and rows(local_run / name)[1]  # images and scores
    assert not [p for p in scratch.rglob("*") if p.is_file()]  # the local copies are removed once published
    assert not list(local_run.glob(".store*"))  # no temporary copy left beside the shard stores
    assert runner.summarize(local_run)["n_images"] == runner.summarize(plain)["n_images"] == 3


def test_every_batch_is_published_so_a_shard_that_dies_keeps_its_images(tmp_path, testbed, monkeypatch):
    run, scratch = tmp_path / "run", tmp_path / "node-local"
    published = []
    real_publish = runner.publish_store
    monkeypatch.setattr(runner, "publish_store", lambda con, dest: (real_publish(con, dest), published.append(
        len(rows(dest)[0]))))

    def die(*a, **k):
        raise RuntimeError("node lost")

    monkeypatch.setattr(runner, "score_run", die)  # dies after generating, before scoring
    with pytest.raises(RuntimeError, match="node lost"):
        run_eval(records(), run, model=testbed, settings=SETTINGS, shard=(0, 2), progress=False, store_dir=scratch)
    assert published == [1, 2]  # shard 0 of 2 owns 2 of the 3 images: published after each batch of 1
    assert len(rows(run / "store.0-of-2.sqlite")[0]) == 2
    # resumed (say on another node, with another scratch folder): it starts from the published copy,
    # so it draws nothing again and only scores
    monkeypatch.undo()
    pngs = {p: p.stat().st_mtime_ns for p in (run / "images").glob("*.png")}
    run_eval(records(), run, model=testbed, settings=SETTINGS, shard=(0, 2), progress=False,
             store_dir=tmp_path / "other-node")
    assert {p: p.stat().st_mtime_ns for p in (run / "images").glob("*.png")} == pngs and len(pngs) == 2
    images, scores = rows(run / "store.0-of-2.sqlite")
    assert len(images) == 2 and len(scores) == 2  # two images, each scored (by the default detector, testbed:striped)


def test_the_environment_variable_names_the_store_folder(tmp_path, testbed, monkeypatch):
    scratch = tmp_path / "from-env"
    monkeypatch.setenv(runner.STORE_DIR_ENV, str(scratch))
    seen = []
    real = runner.local_shard_store
    monkeypatch.setattr(runner, "local_shard_store", lambda *a: seen.append(a[-1]) or real(*a))
    run_eval(records(), tmp_path / "run", model=testbed, settings=SETTINGS, shard=(1, 2), progress=False)
    assert seen == [str(scratch)] and (tmp_path / "run" / "store.1-of-2.sqlite").exists()
    seen.clear()
    run_eval(records(), tmp_path / "single", model=testbed, settings=SETTINGS, shard=(0, 1), progress=False)
    assert seen == [] and (tmp_path / "single" / "store.sqlite").exists()  # a single process: store.sqlite as always


def test_a_store_folder_that_cannot_be_made_is_refused_before_any_work(tmp_path, testbed):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(ValueError, match=r"node-local store folder .*a-file/sub.* cannot be made"):
        run_eval(records(), tmp_path / "run", model=testbed, settings=SETTINGS, shard=(0, 2), progress=False,
                 store_dir=blocker / "sub")
    assert not (tmp_path / "run").exists()
