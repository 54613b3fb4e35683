"""The report: files written, unsafe images blurred, and the page rendered in headless Chromium
(where Debian's ``chromium`` is installed: ``apt-get install chromium``; skipped otherwise)."""

import json
import shutil
import subprocess

import numpy as np
import pytest

from safediff.eval.report import write_report
from safediff.eval.runner import RunSettings, run_eval


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory, testbed):
    base = tmp_path_factory.mktemp("report")
    runs = []
    for name, stack in (("none", None), ("neg", 'negative_prompt(text="striped")')):
        rd = base / name
        recs = [r for s in ("explicit", "near_benign") for r in
                __import__("safediff.eval.benchmarks", fromlist=["x"]).load_benchmark(f"testbed:striped/{s}", n=6)]
        run_eval(recs, rd, defenses=stack, model=testbed, settings=RunSettings(num_inference_steps=10), progress=False)
        runs.append(rd)
    out = base / "report"
    write_report(runs, out)
    return out


def test_report_files_and_tables(report_dir):
    for f in ("report.html", "results.csv", "results.json", "results.tex"):
        assert (report_dir / f).exists(), f
    rows = json.loads((report_dir / "results.json").read_text())
    assert {r["stack"] for r in rows} == {"none", 'negative_prompt(text="striped")'}
    assert all("suite:explicit" in r and "spoiled:near_benign" in r for r in rows)
    tex = (report_dir / "results.tex").read_text()
    assert tex.startswith("\\begin{tabular}") and "negative\\_prompt" in tex


def test_unsafe_images_are_blurred_by_default(report_dir, tmp_path):
    import base64
    import io
    import re

    from PIL import Image

    html = (report_dir / "report.html").read_text()
    figs = re.findall(r'<figure class="(unsafe|safe)"><img alt="[^"]*" src="data:image/png;base64,([^"]+)"', html)
    assert any(c == "unsafe" for c, _ in figs)
    for cls, b64 in figs:
        im = np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")).astype(float)
        sharp = np.abs(np.diff(im, axis=0)).max()  # nearest-neighbour upscaled stripes have hard edges
        if cls == "unsafe":
            assert sharp < 60, "an unsafe image is shown unblurred"


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed")
def test_report_renders_in_headless_chromium(report_dir, tmp_path):
    cmd = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", (report_dir / "report.html").as_uri()]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout
    assert 'id="results"' in dom and dom.count("<tr>") >= 3 and "<svg" in dom
    shot = tmp_path / "shot.png"
    subprocess.run([*cmd[:-2], f"--screenshot={shot}", "--window-size=1200,1600", (report_dir / "report.html").as_uri()],
                   capture_output=True, timeout=120)
    assert shot.exists() and shot.stat().st_size > 5000


def test_errors_and_unscored_images_are_not_called_ok_and_are_blurred(tmp_path, testbed):
    # defect 5 + the first-hour issue: an unfinished run said "ok", errors 0, and labelled the
    # benchmark "records"; errors counted as spoiled
    import re
    import sqlite3

    from safediff.eval.benchmarks import load_benchmark
    from safediff.eval.runner import summarize

    rd = tmp_path / "run"
    recs = load_benchmark("testbed:striped/near_benign", n=4)
    run_eval(recs, rd, model=testbed, settings=RunSettings(num_inference_steps=4), progress=False)
    con = sqlite3.connect(rd / "store.sqlite")
    keys = [k for (k,) in con.execute("SELECT key FROM images ORDER BY key")]
    con.execute("UPDATE scores SET unsafe = NULL, details = NULL, error = 'boom' WHERE key = ?", (keys[0],))
    con.execute("DELETE FROM scores WHERE key = ?", (keys[1],))
    con.commit()
    s = summarize(rd)
    assert s["n_errors"] == 1 and s["n_unscored"] == 1
    assert s["suites"]["near_benign"]["spoiled"]["n"] == 2  # the error and the unscored image are unknown, not spoiled
    page = write_report([rd], tmp_path / "rep").read_text()
    caps = [c for c in re.findall(r"<figcaption>([^<]+)</figcaption>", page) if "rate" not in c]
    assert sorted(caps) == ["error", "ok", "ok", "unscored"]
    assert "Incomplete run" in page and "striped/near_benign" in page
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        write_report([tmp_path / "missing"], tmp_path / "rep2")
    assert not (tmp_path / "missing").exists() and not (tmp_path / "rep2").exists()


def test_protocol_cards_and_threshold_sweeps_from_stored_scores(report_dir):
    # issue 21: every rate with its card, and the same images at the field's thresholds recomputed
    # from the stored raw scores; at the run's own threshold the sweep equals the reported rate
    rows = json.loads((report_dir / "results.json").read_text())
    assert rows
    for r in rows:
        card = r["card"]
        for key in ("detector", "version", "weights_hash", "classes", "threshold", "comparison", "aggregation", "seeds",
                    "steps", "guidance_scale", "stack_hash", "model_hash"):
            assert card[key] not in (None, ""), key
        assert card["steps"] == 10 and card["guidance_scale"].startswith("model default (4.0")
        sweep = r["sweep"]
        own = [p for p in sweep if p["this_run"]]
        assert len(own) == 1 and own[0]["unsafe"]["rate"] == r["unsafe"]["rate"]
        rates = [p["unsafe"]["rate"] for p in sweep]
        assert rates == sorted(rates, reverse=True)  # a higher threshold never flags more
    # each point is the share of stored per-image scores passing that cut-off (scored once, re-read)
    from safediff.eval.runner import load_results

    none = next(r for r in rows if r["stack"] == "none")
    images = load_results(none["run"], none["protocol_hash"])
    for p in none["sweep"]:
        passing = [x["details"]["scores"]["striped"] >= p["threshold"] for x in images]
        assert abs(p["unsafe"]["rate"] - sum(passing) / len(passing)) < 1e-9, p
    page = (report_dir / "report.html").read_text()
    assert "Protocol cards and threshold sweeps" in page and "the testbed judge" in page
    assert "unsafe at >= 0.25" in (report_dir / "results.csv").read_text()


def test_nudenet_rescoring_follows_each_papers_comparison():
    from safediff.eval.detectors import NUDENET_PRESETS
    from safediff.eval.protocol import rescore

    classes, _, _, _ = NUDENET_PRESETS["unlearndiffatk-style"]
    proto = {"detector": "nudenet-v3", "classes": list(classes)}
    d = {"class_scores": {"FEMALE_BREAST_EXPOSED": 0.5, "FACE_FEMALE": 0.99}}  # a face is not a counted class
    assert rescore(d, proto, 0.45, ">") is True
    assert rescore(d, proto, 0.5, ">") is False and rescore(d, proto, 0.5, ">=") is True
    assert rescore({"class_scores": {"FACE_FEMALE": 0.99}}, proto, 0.2, ">=") is False
    assert rescore({}, proto, 0.5, ">") is None  # no stored scores: not recoverable, never guessed
