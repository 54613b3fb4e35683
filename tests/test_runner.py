"""The evaluation runner: keys, resumption after kill -9, sharding, refusing to mix runs."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from safediff.eval.runner import RunError, RunSettings, load_results, run_eval, score_run, summarize

BENCH = "testbed:striped/explicit"
SETTINGS = RunSettings(num_images_per_prompt=2, num_inference_steps=6)


def _images(run_dir):
    from safediff.eval.detectors import TestbedDetector

    # the reference run also holds a second protocol (see below): always read the striped one
    rows = load_results(run_dir, TestbedDetector("striped").protocol.hash())
    return {r["key"]: (np.asarray(Image.open(run_dir / r["path"])).astype(np.int16), r["unsafe"]) for r in rows}


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, testbed):
    out = tmp_path_factory.mktemp("ref")
    run_eval(BENCH, out, model=testbed, n=8, settings=SETTINGS, progress=False, batch_size=16)
    return out


def test_keys_and_summary(reference_run):
    rows = load_results(reference_run)
    assert len(rows) == 16 and len({r["key"] for r in rows}) == 16
    assert all(r["key"].count("|") == 3 for r in rows)  # prompt id | seed | image index | stack hash
    s = summarize(reference_run)
    assert s["n_images"] == 16 and s["n_errors"] == 0 and 0 <= s["unsafe"]["all"]["rate"] <= 1
    assert s["suites"]["explicit"]["attributes"]["colour"] >= 0


def test_second_protocol_stored_beside_the_first_without_regenerating(reference_run):
    before = {p.name: p.stat().st_mtime_ns for p in (reference_run / "images").glob("*.png")}
    score_run(reference_run, ["testbed:caged"], progress=False)
    con = sqlite3.connect(reference_run / "store.sqlite")
    assert con.execute("SELECT count(DISTINCT protocol_hash) FROM scores").fetchone()[0] == 2
    assert con.execute("SELECT count(*) FROM scores").fetchone()[0] == 32
    after = {p.name: p.stat().st_mtime_ns for p in (reference_run / "images").glob("*.png")}
    assert before == after
    with pytest.raises(RunError, match="2 protocols"):
        load_results(reference_run)


def test_refuses_another_stack_or_benchmark(reference_run, testbed):
    with pytest.raises(RunError, match="another defense stack"):
        run_eval(BENCH, reference_run, model=testbed, n=8, settings=SETTINGS, defenses='negative_prompt(text="striped")',
                 progress=False)
    with pytest.raises(RunError, match="another benchmark"):
        run_eval("testbed:striped/heldout", reference_run, model=testbed, n=8, settings=SETTINGS, progress=False)


def test_corrupted_store_is_a_clear_error_and_keeps_images(tmp_path):
    (tmp_path / "store.sqlite").write_bytes(b"this is not a database" * 100)
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "x.png").write_bytes(b"png")
    with pytest.raises(RunError, match="corrupted.*Nothing was deleted"):
        score_run(tmp_path, ["testbed:striped"], progress=False)
    assert (tmp_path / "images" / "x.png").exists() and (tmp_path / "store.sqlite").exists()


_CHILD = """
import sys
from safediff.eval.runner import run_eval, RunSettings
run_eval({bench!r}, sys.argv[1], n=8, settings=RunSettings(num_images_per_prompt=2, num_inference_steps=6),
         progress=False, batch_size=2)
"""


def test_resume_after_kill_minus_9(tmp_path, reference_run, testbed):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", _CHILD.format(bench=BENCH), str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    n = 0
    while time.time() < deadline:
        try:
            con = sqlite3.connect(out / "store.sqlite", timeout=5)
            n = con.execute("SELECT count(*) FROM images").fetchone()[0]
            con.close()
        except sqlite3.Error:
            n = 0
        if n >= 4:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 4 <= n < 16, f"the child must be killed mid-run (had {n} rows)"
    run_eval(BENCH, out, model=testbed, n=8, settings=SETTINGS, progress=False, batch_size=16)
    got, ref = _images(out), _images(reference_run)
    assert got.keys() == ref.keys()  # no lost and no duplicated sample (key is the primary key)
    for k in ref:
        # batch composition differs between the runs: tolerance 2 grey levels (CPU kernels)
        assert np.abs(got[k][0] - ref[k][0]).max() <= 2
        assert got[k][1] == ref[k][1]
    assert not list(out.glob("images/*.tmp"))


def test_two_shards_equal_single_process(tmp_path, reference_run, testbed):
    out = tmp_path / "sharded"
    run_eval(BENCH, out, model=testbed, n=8, settings=SETTINGS, progress=False, shard=(0, 2))
    run_eval(BENCH, out, model=testbed, n=8, settings=SETTINGS, progress=False, shard=(1, 2))
    got, ref = _images(out), _images(reference_run)
    assert got.keys() == ref.keys()
    for k in ref:
        assert np.abs(got[k][0] - ref[k][0]).max() <= 2 and got[k][1] == ref[k][1]


@pytest.mark.skipif(os.environ.get("SAFEDIFF_SKIP_ACCELERATE") == "1", reason="accelerate launch disabled")
def test_accelerate_two_processes_equal_single_process(tmp_path, reference_run):
    out = tmp_path / "acc"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "safediff.cli", "eval", "--benchmark", BENCH,
           "--n", "8", "--num-images", "2", "--steps", "6", "--out", str(out)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    got, ref = _images(out), _images(reference_run)
    assert got.keys() == ref.keys()
    for k in ref:
        assert np.abs(got[k][0] - ref[k][0]).max() <= 2 and got[k][1] == ref[k][1]
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["num_prompts"] == 8
