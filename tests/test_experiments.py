"""Experiments as job graphs (issue 29, items 2-4): the file's validation naming the line, the
graph, the local engine's resumption, retries and failure reports, the folder lock, the shipped
testbed study's keys, a shard killed with SIGKILL, and the Ray and submitit engines."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from safediff.experiments import ExperimentError, build_graph, load_experiment, run_experiment, shipped_experiment
from safediff.experiments import graph as graph_module

TINY = """\
name: tiny
n: {n}
shards: {shards}
settings: {{num_inference_steps: 2, batch_size: {batch}}}
detectors: [testbed:striped]
stacks:
  none: null
  np: 'negative_prompt(text="striped")'
benchmarks:
  explicit: testbed:striped/explicit
"""


def write(tmp_path: Path, text: str, name: str = "e.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def tiny(tmp_path: Path, n: int = 2, shards: int = 2, batch: int = 2, name: str = "e.yaml") -> Path:
    return write(tmp_path, TINY.format(n=n, shards=shards, batch=batch), name)


def images(run_dir: Path) -> dict[str, str]:
    """key -> PNG sha256 from the run's store, checked against the PNG file's bytes."""
    import hashlib

    con = sqlite3.connect(run_dir / "store.sqlite")
    rows = con.execute("SELECT key, path, png_sha256 FROM images").fetchall()
    scores = con.execute("SELECT key, protocol_hash, unsafe, score FROM scores ORDER BY key, protocol_hash").fetchall()
    con.close()
    for key, path, digest in rows:
        assert hashlib.sha256((run_dir / path).read_bytes()).hexdigest() == digest, key
    return {"images": {k: d for k, _, d in rows}, "scores": scores, "n_rows": len(rows)}


def close_runs(a_dir: Path, b_dir: Path, tolerance: int = 2) -> None:
    """Two runs made in processes that may use different thread counts (a Ray or submitit worker
    against the test's own process): the same keys and detector outcomes, images within
    ``tolerance`` grey levels (float reductions depend on the thread count; runs made with one
    thread count are compared byte for byte with :func:`images`)."""
    import numpy as np
    from PIL import Image

    a, b = images(a_dir), images(b_dir)
    assert a["n_rows"] == b["n_rows"] and set(a["images"]) == set(b["images"])
    assert [(k, p, u) for k, p, u, _ in a["scores"]] == [(k, p, u) for k, p, u, _ in b["scores"]]
    paths = {}
    for d in (a_dir, b_dir):
        con = sqlite3.connect(d / "store.sqlite")
        paths[d] = dict(con.execute("SELECT key, path FROM images").fetchall())
        con.close()
    for key, path in paths[a_dir].items():
        x = np.asarray(Image.open(a_dir / path)).astype(int)
        y = np.asarray(Image.open(b_dir / paths[b_dir][key])).astype(int)
        assert np.abs(x - y).max() <= tolerance, key


# ---------------------------------------------------------------------------------------------
# validation: refused before any job, naming the line
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad, line, message", [
    ("  np: 'negative_prompt(text=\"striped\")+frobnicate'\n", 8, "Unknown defense 'frobnicate'"),
    ("  np: 'sld(bogus=1)'\n", 8, "Unknown option"),
    ("  np: '{artifact:nothing}'\n", 8, "does not declare"),
    ("  np: 'negative_prompt(embedding=\"no/such/ine.safetensors\")'\n", 8, "no/such/ine.safetensors, which does not"),
])
def test_a_bad_stack_is_refused_naming_its_line(tmp_path, bad, line, message):
    text = TINY.format(n=2, shards=1, batch=2).replace("  np: 'negative_prompt(text=\"striped\")'\n", bad)
    with pytest.raises(ExperimentError, match=message) as e:
        load_experiment(write(tmp_path, text))
    assert f"e.yaml:{line}:" in str(e.value)


def test_bad_benchmark_detector_attack_key_and_cycle_are_refused_naming_the_line(tmp_path):
    base = TINY.format(n=2, shards=1, batch=2)
    cases = [
        (base.replace("testbed:striped/explicit", "testbed:striped/nosuch"), 10, "nosuch"),
        (base.replace("detectors: [testbed:striped]", "detectors: [testbed:striped, fancy:x]"), 5, "Unknown detector"),
        (base + "attacks:\n  a: {method: no_such_attack, stack: np}\n", 12, "Unknown attack"),
        (base + "attacks:\n  a: {method: ring_a_bell, stack: missing}\n", 12, "not one of `stacks`"),
        (base.replace("name: tiny", "name: tiny\nmodle: testbed"), 2, "unknown key 'modle'"),
        (base + "artifacts:\n  a: {method: invert, concept: striped, against: 'negative_prompt(embedding=\"{artifact:b}\")'}\n"
                "  b: {method: invert, concept: striped, against: 'negative_prompt(embedding=\"{artifact:a}\")'}\n",
         12, "cycle: a -> b -> a"),
        (base + "artifacts:\n  a: {method: esd, concept: striped, options: {iteratons: 3}}\n", 12, "unknown esd option"),
        (base + "artifacts:\n  a: {method: ablate, concept: striped}\n", 12, "unknown method 'ablate'"),
    ]
    for text, line, message in cases:
        with pytest.raises(ExperimentError, match=message) as e:
            load_experiment(write(tmp_path, text))
        assert f"e.yaml:{line}:" in str(e.value), str(e.value)


def test_a_model_that_cannot_load_is_refused_before_any_job(tmp_path):
    path = write(tmp_path, TINY.format(n=2, shards=1, batch=2).replace("detectors:", "model: " + str(tmp_path / "nomodel")
                                                                       + "\ndetectors:").replace(
        "[testbed:striped]", "[nudenet:rece-style]"))
    out = tmp_path / "out"
    with pytest.raises(ExperimentError, match=r"e\.yaml:5: the model .* cannot load"):
        run_experiment(path, out, progress=False)
    assert not out.exists()  # nothing written


def test_set_overrides_are_validated_like_the_file(tmp_path):
    with pytest.raises(ExperimentError, match=r"--set n\).*whole number"):
        load_experiment(tiny(tmp_path), ["n=0"])
    assert load_experiment(tiny(tmp_path), ["n=3", "settings.num_inference_steps=1"]).settings["num_inference_steps"] == 1


# ---------------------------------------------------------------------------------------------
# the graph and the local engine
# ---------------------------------------------------------------------------------------------


def test_graph_orders_train_shards_merge_report(tmp_path):
    text = TINY.format(n=2, shards=2, batch=2) + (
        "artifacts:\n  es: {method: sanitizer, concept: striped}\n"
        "  ine: {method: invert, concept: striped, against: 'sanitizer(path=\"{artifact:es}\")'}\n")
    text = text.replace("  np: 'negative_prompt(text=\"striped\")'", "  np: 'negative_prompt(embedding=\"{artifact:ine}\")'")
    jobs = build_graph(load_experiment(write(tmp_path, text)))
    ids = [j.id for j in jobs]
    assert ids[:2] == ["train:es", "train:ine"] and ids[-1] == "report"
    by = {j.id: j for j in jobs}
    assert by["train:ine"].deps == ("train:es",)
    assert by["shard:np/explicit:1-of-2"].deps == ("train:ine",) and by["shard:none/explicit:0-of-2"].deps == ()
    assert by["merge:np/explicit"].deps == ("shard:np/explicit:0-of-2", "shard:np/explicit:1-of-2")
    assert all(ids.index(d) < ids.index(j.id) for j in jobs for d in j.deps)


def test_local_run_shards_merges_reports_and_resumes_without_redoing(tmp_path, testbed):
    out = tmp_path / "out"
    outcome = run_experiment(tiny(tmp_path), out, model=testbed, progress=False)
    assert outcome.complete and len(outcome.done) == 7
    first = images(out / "runs" / "np" / "explicit")
    assert first["n_rows"] == 2 and len(first["scores"]) == 2
    assert (out / "runs" / "np" / "explicit" / "store.1-of-2.sqlite").exists()  # really sharded, then merged
    res = json.loads((out / "results.json").read_text())
    assert res["cells"]["np/explicit"]["n_images"] == 2 and res["cells"]["none/explicit"]["stack"] == "none"
    # a relaunch finds every job done and generates nothing
    calls = []
    real = graph_module._shard
    graph_module._shard = lambda *a: calls.append(a[2].id) or real(*a)
    try:
        outcome2 = run_experiment(tiny(tmp_path), out, model=testbed, progress=False)
    finally:
        graph_module._shard = real
    assert outcome2.complete and calls == []
    assert images(out / "runs" / "np" / "explicit") == first
    # another experiment in the same folder is refused, naming what differs
    with pytest.raises(ExperimentError, match="n: 2 -> 3"):
        run_experiment(tiny(tmp_path), out, model=testbed, progress=False, overrides=["n=3"])


def test_a_relaunch_that_only_adds_grows_the_experiment_and_redoes_nothing_done(tmp_path, testbed):
    out = tmp_path / "out"
    assert run_experiment(tiny(tmp_path, shards=1), out, model=testbed, progress=False).complete
    first = images(out / "runs" / "np" / "explicit")
    calls = []
    real = graph_module._shard
    graph_module._shard = lambda *a: calls.append(a[2].id) or real(*a)
    try:  # a new stack and a new benchmark: only their cells run, the report is redone
        outcome = run_experiment(tiny(tmp_path, shards=1), out, model=testbed, progress=False,
                                 overrides=['stacks.np2=negative_prompt(text="caged")',
                                            "benchmarks.benign=testbed:striped/benign"])
    finally:
        graph_module._shard = real
    assert outcome.complete
    assert sorted(calls) == ["shard:none/benign:0-of-1", "shard:np/benign:0-of-1", "shard:np2/benign:0-of-1",
                             "shard:np2/explicit:0-of-1"]
    assert images(out / "runs" / "np" / "explicit") == first
    stored = json.loads((out / "experiment.json").read_text())
    assert "np2" in stored["stacks"] and "benign" in stored["benchmarks"]
    assert set(json.loads((out / "results.json").read_text())["cells"]) == {
        f"{s}/{b}" for s in ("none", "np", "np2") for b in ("explicit", "benign")}
    # changing an entry that exists is still refused, naming it
    with pytest.raises(ExperimentError, match="stacks.np2"):
        run_experiment(tiny(tmp_path, shards=1), out, model=testbed, progress=False,
                       overrides=['stacks.np2=negative_prompt(text="striped")', "benchmarks.benign=testbed:striped/benign"])


def test_a_job_failing_three_times_is_reported_by_name_and_the_run_is_incomplete(tmp_path, testbed, monkeypatch):
    calls = []
    real = graph_module._shard

    def flaky(out, exp, job, model):
        if job.params["stack"] == "np":
            calls.append(job.id)
            raise RuntimeError("GPU fell off the bus")
        return real(out, exp, job, model)

    monkeypatch.setattr(graph_module, "_shard", flaky)
    out = tmp_path / "out"
    outcome = run_experiment(tiny(tmp_path, shards=1), out, model=testbed, progress=False)
    assert not outcome.complete
    assert calls == ["shard:np/explicit:0-of-1"] * 3
    assert list(outcome.failed) == ["shard:np/explicit:0-of-1"] and len(outcome.failed["shard:np/explicit:0-of-1"]) == 3
    assert "GPU fell off the bus" in outcome.failed["shard:np/explicit:0-of-1"][-1]
    assert outcome.blocked == {"merge:np/explicit": "shard:np/explicit:0-of-1", "report": "merge:np/explicit"}
    assert "merge:none/explicit" in outcome.done  # the other cell is finished, not dropped
    text = outcome.describe()
    assert "INCOMPLETE" in text and "FAILED shard:np/explicit:0-of-1 after 3 attempt(s)" in text
    status = json.loads((out / "status.json").read_text())
    assert status["complete"] is False and "shard:np/explicit:0-of-1" in status["failed"]
    # the fault gone, a relaunch finishes only what is left
    monkeypatch.setattr(graph_module, "_shard", real)
    outcome = run_experiment(tiny(tmp_path, shards=1), out, model=testbed, progress=False)
    assert outcome.complete and json.loads((out / "results.json").read_text())["cells"]["np/explicit"]["n_images"] == 2


def test_a_second_launch_on_the_same_folder_is_refused_or_waits(tmp_path, testbed):
    from safediff.eval.runner import RunError, run_lock

    out = tmp_path / "out"
    out.mkdir()
    with run_lock(out, ".experiment.lock"):
        with pytest.raises(RunError, match="Another launch is running"):
            run_experiment(tiny(tmp_path, shards=1), out, model=testbed, progress=False)
    assert not (out / "experiment.json").exists()  # refused before anything was written
    release = threading.Event()

    def hold():
        with run_lock(out, ".experiment.lock"):
            release.wait(10)

    t = threading.Thread(target=hold)
    t.start()
    time.sleep(0.2)
    threading.Timer(1.0, release.set).start()
    started = time.time()
    outcome = run_experiment(tiny(tmp_path, shards=1), out, model=testbed, progress=False, wait=True)
    t.join()
    assert outcome.complete and time.time() - started >= 0.8  # it waited for the first launch


# ---------------------------------------------------------------------------------------------
# the shipped testbed study: the same stacks, hashes and image keys as `safediff study`
# ---------------------------------------------------------------------------------------------


def test_shipped_study_has_run_studys_stacks_hashes_and_image_keys(tmp_path, testbed):
    from safediff.eval.runner import image_key
    from safediff.eval.study import StudyConfig, grid_cells
    from safediff.stack import DefenseStack
    from safediff.testbed.suites import SUITES
    from safediff.eval.benchmarks import load_benchmark

    exp = load_experiment(shipped_experiment("testbed_study"))
    cfg = StudyConfig()
    adir = tmp_path / "artifacts"  # run_study's artifact files are out/artifacts/<method>_<concept>.safetensors
    adir.mkdir()
    arts = {m: str(adir / f"{m}_{cfg.concept}.safetensors") for m in ("esd", "advunlearn", "duo", "dark_miner", "sanitizer")}
    arts.update({f"ine_{u}": str(adir / f"ine_{u}_{cfg.concept}.safetensors") for u in cfg.unlearning})
    for i, p in enumerate(arts.values()):  # stand-ins with distinct contents: the hashes read the files
        Path(p).write_bytes(b"artifact %d" % i)
    cells = grid_cells(cfg, arts)
    assert len(exp.stacks) == len(cells) == 50  # 7 unlearning rows, ES alone, 3 guidance x 7 x 2 negatives
    study_records = [r for s in SUITES for r in load_benchmark(f"testbed:{cfg.concept}/{s}", n=cfg.n)]
    records = graph_module.cell_records(exp, "testbed")
    assert [(r.id, r.seed) for r in records] == [(r.id, r.seed) for r in study_records]
    for cell, (name, text) in zip(cells, exp.stacks.items()):
        assert name == ".".join(p for p in cell.name.split("|") if p != "-")
        mine = exp.resolve(text, tmp_path)
        assert mine == cell.stack
        h1 = DefenseStack.parse(mine).hash(testbed.content_hash)
        h2 = DefenseStack.parse(cell.stack).hash(testbed.content_hash)
        assert h1 == h2
        assert {image_key(r.id, r.seed, 0, h1) for r in records} == {image_key(r.id, r.seed, 0, h2) for r in study_records}
    # every inversion runs against the unlearned model the study inverts on
    ine = {a.name: exp.resolve(a.against, tmp_path) for a in exp.artifacts.values() if a.method == "invert"}
    assert ine["ine_esd_striped"] == f'esd(path="{arts["esd"]}")' and ine["ine_none_striped"] is None
    assert ine["ine_uce_striped"] == "uce(preset=testbed-striped)"
    assert ine["ine_advunlearn_striped"] == f'delta(path="{arts["advunlearn"]}")'  # a text-encoder delta
    ids = [j.id for j in build_graph(exp)]
    assert ids.index("train:esd_striped") < ids.index("train:ine_esd_striped") < ids.index("shard:esd.sld.ine/testbed:0-of-1")
    assert exp.settings["batch_size"] == cfg.batch_size and exp.n == cfg.n
    assert exp.detectors == ("testbed:striped", "testbed:caged") and exp.target_detector == "testbed:striped"


# ---------------------------------------------------------------------------------------------
# fault tolerance: SIGKILL a real process mid-shard, relaunch, compare with an uninterrupted run
# ---------------------------------------------------------------------------------------------


def test_sigkill_at_random_moments_then_relaunch_matches_an_uninterrupted_run(tmp_path, testbed):
    import random

    exp = tiny(tmp_path, n=6, shards=2, batch=1)  # 12 images, written one by one
    # every run here is a subprocess with the same thread count: float reductions (so PNG bytes)
    # depend on it, and this test is about the kill, not about threads
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    clean = tmp_path / "clean"
    subprocess.run([sys.executable, "-m", "safediff.cli", "run", str(exp), "--out", str(clean)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    killed = tmp_path / "killed"
    rng = random.Random(29)  # the kill moments: after a random number of new PNGs, plus a random delay
    for _ in range(2):
        before = len(list(killed.glob("runs/*/explicit/images/*.png")))
        at, delay = before + rng.randint(1, 3), rng.uniform(0, 0.3)
        proc = subprocess.Popen([sys.executable, "-m", "safediff.cli", "run", str(exp), "--out", str(killed)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if len(list(killed.glob("runs/*/explicit/images/*.png"))) >= at:
                time.sleep(delay)
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it could be killed; give it more images"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert len(list(killed.glob("runs/*/explicit/images/*.png"))) < 12  # killed mid-run, twice
    subprocess.run([sys.executable, "-m", "safediff.cli", "run", str(exp), "--out", str(killed)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    assert json.loads((killed / "status.json").read_text())["complete"]
    for stack in ("none", "np"):
        a, b = images(clean / "runs" / stack / "explicit"), images(killed / "runs" / stack / "explicit")
        assert a["n_rows"] == b["n_rows"] == 6  # nothing lost, nothing duplicated
        assert a["images"] == b["images"] and a["scores"] == b["scores"]
    assert sorted(p.name for p in (killed / "runs" / "np" / "explicit" / "images").glob("*.png")) == sorted(
        p.name for p in (clean / "runs" / "np" / "explicit" / "images").glob("*.png"))


# ---------------------------------------------------------------------------------------------
# engines with optional extras
# ---------------------------------------------------------------------------------------------


def test_a_missing_extra_is_named(monkeypatch):
    from safediff.experiments.engines import get_engine

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError, as when it is not installed
    monkeypatch.setitem(sys.modules, "submitit", None)
    with pytest.raises(ImportError, match=r"pip install 'safediff\[ray\]'"):
        get_engine("ray")
    with pytest.raises(ImportError, match=r"pip install 'safediff\[slurm\]'"):
        get_engine("slurm")
    with pytest.raises(ValueError, match="Unknown engine"):
        get_engine("dask")


def test_submitit_local_executor_gives_the_local_engines_images(tmp_path, testbed):
    pytest.importorskip("submitit")
    exp = write(tmp_path, TINY.format(n=2, shards=2, batch=2).replace("  none: null\n", ""))  # one array of 2 tasks
    local, slurm = tmp_path / "local", tmp_path / "slurm"
    assert run_experiment(exp, local, model=testbed, progress=False).complete
    outcome = run_experiment(exp, slurm, engine="slurm", model=testbed, progress=False,
                             engine_options={"executor": "local", "timeout_min": 5})
    assert outcome.complete, outcome.describe()
    close_runs(local / "runs" / "np" / "explicit", slurm / "runs" / "np" / "explicit")
    assert (slurm / "runs" / "np" / "explicit" / "store.1-of-2.sqlite").exists()  # the array's tasks wrote the shards


def test_ray_local_cluster_gives_the_local_engines_images(tmp_path, testbed):
    pytest.importorskip("ray")
    exp = write(tmp_path, TINY.format(n=2, shards=2, batch=2).replace("  none: null\n", ""))  # 2 tasks
    local, on_ray = tmp_path / "local", tmp_path / "ray"
    assert run_experiment(exp, local, model=testbed, progress=False).complete
    outcome = run_experiment(exp, on_ray, engine="ray", model=testbed, progress=False, engine_options={"num_cpus": 2})
    assert outcome.complete, outcome.describe()
    close_runs(local / "runs" / "np" / "explicit", on_ray / "runs" / "np" / "explicit")
    assert (on_ray / "runs" / "np" / "explicit" / "store.1-of-2.sqlite").exists()


def test_artifacts_are_trained_before_the_stacks_that_name_them_and_reused(tmp_path, testbed):
    text = TINY.format(n=1, shards=1, batch=2) + (
        "artifacts:\n  es: {method: sanitizer, concept: striped, options: {steps: 2}}\n"
        "  ine: {method: invert, concept: striped, options: {steps: 2, num_images: 2, batch_size: 2}, "
        "against: 'sanitizer(path=\"{artifact:es}\")'}\n")
    text = text.replace("  np: 'negative_prompt(text=\"striped\")'", "  np: 'negative_prompt(embedding=\"{artifact:ine}\")'")
    path, out = write(tmp_path, text), tmp_path / "out"
    assert run_experiment(path, out, model=testbed, progress=False).complete
    ine = out / "artifacts" / "ine.safetensors"
    assert (out / "artifacts" / "es.safetensors").exists() and ine.exists()
    manifest = json.loads((out / "runs" / "np" / "explicit" / "run.json").read_text())
    assert str(ine) in manifest["stack"]
    before = ine.stat().st_mtime_ns
    assert run_experiment(path, out, model=testbed, progress=False).complete
    assert ine.stat().st_mtime_ns == before  # a trained artifact is reused, not trained again


def test_an_attack_job_runs_and_evaluates_through_the_stack(tmp_path, testbed):
    text = TINY.format(n=1, shards=1, batch=2).replace("  none: null\n", "") + (
        "attacks:\n  floor: {method: random_prefix, stack: np, concept: striped, steps: 1, n: 1}\n")
    path, out = write(tmp_path, text), tmp_path / "out"
    outcome = run_experiment(path, out, model=testbed, progress=False)
    assert outcome.complete, outcome.describe()
    assert "attack:floor" in outcome.done
    ev = json.loads((out / "attacks" / "floor" / "evaluation.json").read_text())
    assert ev["asr"]["n"] == 1


def _kill_once_when(needles: list[str], out: Path, stop: threading.Event, killed: list) -> None:
    """SIGKILL the first process whose command line holds every one of ``needles``, once a PNG
    exists under ``out`` (so the kill lands mid-shard)."""
    while not stop.is_set() and not killed:
        if list(out.glob("runs/*/*/images/*.png")):
            for pid in os.listdir("/proc"):
                if not pid.isdigit() or int(pid) == os.getpid():
                    continue
                try:
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                except OSError:
                    continue
                if all(n in cmd for n in needles):
                    os.kill(int(pid), signal.SIGKILL)
                    killed.append(cmd)
                    return
        time.sleep(0.02)


@pytest.mark.parametrize("engine", ["ray", "slurm"])
def test_a_worker_killed_mid_shard_is_retried_and_the_images_match(tmp_path, testbed, engine):
    pytest.importorskip("ray" if engine == "ray" else "submitit")
    exp = write(tmp_path, TINY.format(n=6, shards=2, batch=1).replace("  none: null\n", ""))
    clean, out = tmp_path / "clean", tmp_path / "out"
    assert run_experiment(exp, clean, model=testbed, progress=False).complete
    stop, killed = threading.Event(), []
    # a Ray worker names itself after its task; submitit's local tasks are `python -m submitit... OUT/slurm/...`
    needles = ["ray::_run_job"] if engine == "ray" else ["submitit", str(out)]
    watcher = threading.Thread(target=_kill_once_when, args=(needles, out, stop, killed))
    watcher.start()
    options = {"num_cpus": 2} if engine == "ray" else {"executor": "local", "timeout_min": 5}
    try:
        outcome = run_experiment(exp, out, engine=engine, model=testbed, progress=False, engine_options=options)
    finally:
        stop.set()
        watcher.join()
    assert killed, "no worker was killed (the shards finished before the watcher saw them)"
    assert outcome.complete, outcome.describe()
    assert images(out / "runs" / "np" / "explicit")["n_rows"] == 6  # nothing lost, nothing duplicated
    close_runs(clean / "runs" / "np" / "explicit", out / "runs" / "np" / "explicit")


def test_study_report_gives_run_studys_numbers_for_the_same_cells(tmp_path, testbed):
    from safediff.eval.study import StudyConfig, run_study
    from safediff.testbed.suites import SUITES

    # every cell of a one-method grid and the ES on the best cell (best_min_benign 0: one prompt per suite
    # would rarely reach 0.8 benign accuracy, and the row must exist to be compared)
    cfg = StudyConfig(n=1, unlearning=("none",), guidance=("negative_prompt",), quick=True, batch_size=16,
                      best_min_benign=0.0)
    study = run_study(tmp_path / "study", cfg, model=testbed, progress=False)
    assert study["cells"][f"{study['best_cell'].split('+')[0]}+sanitizer"]["on_best"]  # the study drew its ES row

    def numbers(x):  # the figures, without the run folders' paths (NaN compared as text)
        if isinstance(x, dict):
            return {k: numbers(v) for k, v in x.items() if k != "base_run"}
        return x

    ine = "{method: invert, concept: striped, seed: 0, options: {placeholder: '<striped*>', initializer: shape, " \
          "steps: 2, num_images: 4, batch_size: 2}}"  # the study's quick training configs
    text = (f"name: mini-study\nn: 1\nreport: study\nsettings: {{batch_size: 16}}\n"
            "detectors: [testbed:striped, testbed:caged]\ntarget_detector: testbed:striped\n"
            f"artifacts:\n  ine_none_striped: {ine}\n"
            "  sanitizer_striped: {method: sanitizer, concept: striped, seed: 0, options: {steps: 2}}\n"
            "stacks:\n  none.none: null\n  none.sanitizer: 'sanitizer(path=\"{artifact:sanitizer_striped}\")'\n"
            "  none.negative_prompt.explicit: 'negative_prompt(text=\"striped\")'\n"
            "  none.negative_prompt.ine: 'negative_prompt(embedding=\"{artifact:ine_none_striped}\")'\n"
            "on_best: {name: sanitizer, stack: 'sanitizer(path=\"{artifact:sanitizer_striped}\")', min_benign: 0.0}\n"
            "benchmarks:\n  testbed: [" + ", ".join(f"testbed:striped/{s}" for s in SUITES) + "]\n")
    out = tmp_path / "exp"
    assert run_experiment(write(tmp_path, text), out, model=testbed, progress=False).complete
    res = json.loads((out / "study_results.json").read_text())
    mine = res["cells"]
    best = study["best_cell"].split("+")[0]  # the grid cell the study added its ES to
    assert json.loads((out / "best_cell.json").read_text())["best_cell"] == best.replace("|-", "").replace("|", ".")
    pairs = [(".".join(p for p in c.split("|") if p != "-"), c) for c, r in study["cells"].items()
             if "+" not in c and "suites" in r]  # (methods left out of the study are listed missing)
    pairs.append((f"{best.replace('|', '.')}+sanitizer", f"{best}+sanitizer"))
    assert len(pairs) == 5 and len(mine) == 5
    for name, study_name in pairs:
        a, b = mine[name], study["cells"][study_name]
        for key in ("suites", "substitution"):
            assert json.dumps(numbers(a[key]), sort_keys=True) == json.dumps(numbers(b[key]), sort_keys=True)
        assert a["n_images"] == b["n_images"] == 6 and a["benign_distance"] == b["benign_distance"]
        assert (a["unlearning"], a["guidance"], a["negative"]) == (b["unlearning"], b["guidance"], b["negative"])
    on_best = mine[f"{best.replace('|', '.')}+sanitizer"]
    assert on_best["on_best"] == best.replace("|", ".") and on_best["stack"].endswith(
        f'+sanitizer(path="{out / "artifacts" / "sanitizer_striped.safetensors"}")')
    assert res["best_cell"] == study["best_cell"].replace("|-", "").replace("|", ".")
    table = (out / "study_table.md").read_text()
    assert "| none | negative_prompt | explicit |" in table and "+ ES (on best)" in table


def test_two_real_launches_at_once_do_each_job_once(tmp_path):
    from safediff.eval.runner import run_lock

    exp, out = tiny(tmp_path, n=2, shards=2), tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "safediff.cli", "run", str(exp), "--out", str(out), "--wait"]
    with run_lock(out, ".experiment.lock"):  # both launches start while the folder is taken: both must wait
        procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
                 for _ in range(2)]
        for p in procs:
            assert "waiting" in p.stdout.readline()
    logs = [p.communicate(timeout=150) for p in procs]  # released: one runs, the other waits for it
    assert [p.returncode for p in procs] == [0, 0], [e[-1500:] for _, e in logs]
    started = [ln for _, err in logs for ln in err.splitlines() if "] shard:" in ln]
    assert len(started) == 4, started  # 2 stacks x 2 shards, each run by one launch only
    for stack in ("none", "np"):
        assert images(out / "runs" / stack / "explicit")["n_rows"] == 2


def test_what_counts_as_growing():
    from safediff.experiments import _additions

    old = {"name": "x", "stacks": {"base": None, "esd.none": "esd()"},
           "attack_grid": {"attacks": {"p4d": {"steps": 30}}, "targets": ["base"], "n": 32}}
    new = {"name": "x", "stacks": {"base": None, "esd.none": "esd()", "uce": "uce()"},
           "attack_grid": {"attacks": {"p4d": {"steps": 30}, "mma": {"steps": 3}}, "targets": ["base", "uce"], "n": 32},
           "attacks": {"uce.extra": {"method": "p4d_adaptive", "stack": "uce"}},
           "benchmarks": {"benign": "testbed:striped/benign"}, "n": 100}
    added, other = _additions(old, new)
    assert other == [] and sorted(added) == sorted(["stacks.uce", "attack_grid.attacks.mma", "attack_grid.targets +uce",
                                                    "attacks.uce.extra", "benchmarks.benign", "n"])
    # changing, removing or reordering what exists is not growing
    assert _additions(old, {**old, "stacks": {"base": None, "esd.none": "esd(x)"}})[1] == [
        'stacks.esd.none: "esd()" -> "esd(x)"']
    assert _additions(old, {**old, "stacks": {"base": None}})[1] == ['stacks.esd.none: "esd()" -> null']
    assert _additions(old, {**old, "attack_grid": {**old["attack_grid"], "targets": ["uce", "base"]}})[1]
    assert _additions(old, {**old, "attack_grid": {**old["attack_grid"], "n": 16}})[1] == ["attack_grid.n: 32 -> 16"]
    assert _additions(old, {**old, "n": 3})[1] == ["n: null -> 3"]  # an n without benchmarks changes nothing it grows
