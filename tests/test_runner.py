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
    from safediff.eval.detectors import TestbedDetector

    before = {p.name: p.stat().st_mtime_ns for p in (reference_run / "images").glob("*.png")}
    score_run(reference_run, ["testbed:caged"], progress=False)
    con = sqlite3.connect(reference_run / "store.sqlite")
    assert con.execute("SELECT count(DISTINCT protocol_hash) FROM scores").fetchone()[0] == 2
    assert con.execute("SELECT count(*) FROM scores").fetchone()[0] == 32
    after = {p.name: p.stat().st_mtime_ns for p in (reference_run / "images").glob("*.png")}
    assert before == after
    # with several protocols, the run's target detector (run.json) is the default; without one, an error
    assert [r["unsafe"] for r in load_results(reference_run)] == [
        r["unsafe"] for r in load_results(reference_run, TestbedDetector("striped").protocol.hash())]
    manifest = json.loads((reference_run / "run.json").read_text())
    (reference_run / "run.json").write_text(json.dumps({k: v for k, v in manifest.items() if k != "target_protocol"}))
    try:
        with pytest.raises(RunError, match="2 protocols"):
            load_results(reference_run)
    finally:
        (reference_run / "run.json").write_text(json.dumps(manifest))


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
    # issue 34: another batch size on resume is allowed (test_single_file_and_output.py checks the images)
    run_eval(BENCH, out, model=testbed, n=8, settings=SETTINGS, progress=False, batch_size=2)
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


# ---------------------------------------------------------------------------------------------
# regressions of the review's defects
# ---------------------------------------------------------------------------------------------


def test_every_detector_scores_every_image(tmp_path, testbed):
    # defect 1: with two detectors the second scored only the first's last batch (keys shadowed)
    recs = __import__("safediff.eval.benchmarks", fromlist=["x"]).load_benchmark(BENCH, n=70)
    out = run_eval(recs, tmp_path / "two", model=testbed, detectors=["testbed:striped", "testbed:caged"],
                   settings=RunSettings(num_inference_steps=2), progress=False, batch_size=70)
    con = sqlite3.connect(out / "store.sqlite")
    per = dict(con.execute("SELECT protocol_hash, count(*) FROM scores GROUP BY protocol_hash").fetchall())
    assert len(per) == 2 and set(per.values()) == {70}


def test_prompt_ids_that_differ_in_punctuation_never_share_an_image(tmp_path, testbed):
    # defect 6: ids "p 1" and "p/1" were mapped to one PNG, and one prompt scored on the other's image
    from safediff.eval.benchmarks import PromptRecord

    recs = [PromptRecord(id="p 1", prompt="a striped red circle on white background", categories=("striped",), seed=0),
            PromptRecord(id="p/1", prompt="a blue square on black background", categories=(), seed=1)]
    out = run_eval(recs, tmp_path / "ids", model=testbed, settings=RunSettings(num_inference_steps=4), progress=False)
    from safediff.pipeline import SafePipeline
    from safediff.stack import DefenseStack

    rows = load_results(out)
    assert len({r["path"] for r in rows}) == 2
    own = {r["prompt_id"]: np.asarray(SafePipeline(testbed, DefenseStack())([r["prompt"]], image_ids=[(r["seed"], 0)],
                                                                          num_inference_steps=4).images[0]).astype(int)
           for r in rows}
    for r in rows:  # each stored image is its own prompt's (within float rounding), not the other's
        stored = np.asarray(Image.open(out / r["path"])).astype(int)
        other = [v for k, v in own.items() if k != r["prompt_id"]][0]
        assert np.abs(stored - own[r["prompt_id"]]).max() <= 2 and np.abs(stored - other).max() > 50


@pytest.mark.parametrize("kwargs,match", [
    ({"n": 0}, "`n`"), ({"n": -1}, "`n`"), ({"batch_size": 0}, "batch_size"), ({"shard": (2, 2)}, "out of range"),
    ({"settings": RunSettings(num_images_per_prompt=0)}, "num_images_per_prompt"),
    ({"settings": RunSettings(guidance_scale=float("nan"))}, "guidance_scale"),
    ({"settings": RunSettings(seed=2**64)}, "seed"),
])
def test_nonsense_is_refused_before_anything_is_written(tmp_path, testbed, kwargs, match):
    # defects 9 and 11: bad settings were accepted, or refused after the manifest was written
    out = tmp_path / "bad"
    with pytest.raises(ValueError, match=match):
        run_eval(BENCH, out, model=testbed, progress=False, **{"n": 2, **kwargs})
    assert not out.exists()
    run_eval(BENCH, out, model=testbed, n=2, settings=RunSettings(num_inference_steps=2), progress=False)  # then fine


def test_a_second_process_on_the_same_run_waits_and_duplicates_nothing(tmp_path):
    # defect 13: two processes on one run directory both generated every image
    out = tmp_path / "twice"
    child = ("import sys; from safediff.eval.runner import run_eval, RunSettings; "
             f"run_eval({BENCH!r}, sys.argv[1], n=6, settings=RunSettings(num_inference_steps=4), progress=False, "
             "batch_size=2)")
    procs = [subprocess.Popen([sys.executable, "-c", child, str(out)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert sum("waiting" in o for o in outs) == 1  # the second one said it waited
    con = sqlite3.connect(out / "store.sqlite")
    assert con.execute("SELECT count(*) FROM images").fetchone()[0] == 6
    assert not list(out.glob("images/*.tmp*"))


def test_a_detector_that_decides_nothing_is_an_error(tmp_path, reference_run):
    # defect 5: a detector returning unsafe=None without an error counted as 0 errors
    from safediff.eval.detectors import Detector, DetectorProtocol, DetectorResult

    class Silent(Detector):
        protocol = DetectorProtocol("silent", "1", "none", ("x",), 0.5, preset="silent")

        def _detect_one(self, image):
            return DetectorResult(unsafe=None)

    score_run(reference_run, [Silent()], progress=False)
    s = summarize(reference_run, Silent.protocol.hash())
    assert s["n_errors"] == 16 and s["unsafe"]["all"]["n"] == 0


# issue 19 review, defect 12 ------------------------------------------------------------
def test_ctrl_c_says_how_to_resume_and_the_same_command_finishes_the_run(tmp_path, testbed, monkeypatch, capsys):
    # first-hour issue: an interrupted command printed a traceback; now one line says how to go on,
    # the images finished before Ctrl-C are kept, and the same command resumes after them
    from safediff import cli
    from safediff.eval.runner import summarize
    from safediff.pipeline import SafePipeline

    argv = ["eval", "--benchmark", "testbed:striped/near_benign", "--n", "4", "--steps", "4", "--batch-size", "2",
            "--out", str(tmp_path / "run")]
    real_call, calls = SafePipeline.__call__, []

    def interrupted(self, *a, **kw):
        calls.append(1)
        if len(calls) == 2:  # Ctrl-C during the second batch
            raise KeyboardInterrupt
        return real_call(self, *a, **kw)

    monkeypatch.setattr(SafePipeline, "__call__", interrupted)
    assert cli.main(argv) == 130
    err = capsys.readouterr().err
    assert "interrupted; run the same command to resume" in err and "Traceback" not in err
    monkeypatch.setattr(SafePipeline, "__call__", real_call)
    assert cli.main(argv) == 0
    assert "resuming: 2 of 4 images already done, 2 to go" in capsys.readouterr().out
    s = summarize(tmp_path / "run")
    assert s["n_images"] == 4 and s["n_unscored"] == 0
