"""Concept substitution: every image scored by every concept detector, the other concepts' rates
and the "moved" share beside the target rate (issue 32, item 2)."""

import json

import numpy as np
import pytest
from PIL import Image

from safediff.eval.detectors import TestbedDetector
from safediff.eval.metrics import substitution_rates
from safediff.eval.runner import RunError, RunSettings, image_key, open_store, run_eval, summarize

# five images; striped is the target. Base: the undefended model's paired images.
DEFENDED = {"striped": [True, False, False, False, None], "caged": [False, True, False, True, False]}
BASE = {"striped": [True, True, True, False, True], "caged": [False, False, False, False, False]}


def test_rates_moved_share_and_difference_on_a_hand_made_table():
    r = substitution_rates(DEFENDED, "striped", base=BASE)
    assert r["target"] == "striped" and set(r["other"]) == {"caged"}
    assert r["other"]["caged"].rate == pytest.approx(0.4) and r["other"]["caged"].n == 5
    assert r["any_other"].n_positive == 2
    # pairs with base target-unsafe and defended target-safe: images 1 and 2 (image 4's verdict is an error)
    assert (r["moved"].n, r["moved"].n_positive, r["moved"].rate) == (2, 1, 0.5)
    d = r["other_minus_base"]["caged"]
    assert d["diff"] == pytest.approx(0.4) and d["n"] == 5 and d["ci_low"] <= 0.4 <= d["ci_high"]
    assert r["other_minus_base"]["any_other"]["diff"] == pytest.approx(0.4)


def test_an_error_in_another_detector_is_unknown_not_safe():
    scores = {"t": [False, False, False], "a": [None, None, True], "b": [False, True, None]}
    r = substitution_rates(scores, "t")
    # image 0: a errored and b safe -> unknown (left out); image 1: b unsafe; image 2: a unsafe
    assert (r["any_other"].n, r["any_other"].n_positive, r["any_other"].n_errors) == (2, 2, 1)
    assert r["other"]["a"].n_errors == 2 and r["other"]["b"].n_errors == 1


def test_without_base_no_moved_share_and_bad_tables_are_refused():
    r = substitution_rates(DEFENDED, "striped", groups=["p0", "p0", "p1", "p2", "p3"])
    assert "moved" not in r and r["other"]["caged"].rate == pytest.approx(0.4)
    with pytest.raises(ValueError, match="target concept 'nudity' has no scores"):
        substitution_rates(DEFENDED, "nudity")
    with pytest.raises(ValueError, match="aligned"):
        substitution_rates({"striped": [True], "caged": [True, False]}, "striped")
    with pytest.raises(ValueError, match="base run has no scores for the target"):
        substitution_rates(DEFENDED, "striped", base={"caged": BASE["caged"]})


def _fake_run(out, verdicts: dict, order: list[tuple[str, int]], stack: str = "x()", prompts: dict | None = None):
    """A run directory with hand-made scores: one grey 8x8 image per (prompt id, seed); ``prompts``:
    prompt id -> text (default "p")."""
    (out / "images").mkdir(parents=True)
    for pid, _ in order:
        Image.new("RGB", (8, 8), (128, 128, 128)).save(out / "images" / f"{pid}.png")
    con = open_store(out)
    hashes = {}
    for concept, vals in verdicts.items():
        proto = TestbedDetector(concept).protocol
        hashes[concept] = proto.hash()
        con.execute("INSERT INTO protocols VALUES (?, ?)", (proto.hash(), json.dumps(proto.to_dict())))
        for (pid, seed), v in zip(order, vals):
            key = image_key(pid, seed, 0, "s")
            con.execute("INSERT OR IGNORE INTO images (key, prompt_id, seed, image_index, stack_hash, prompt, categories, "
                        "path, refused, extra, seconds, created) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                        (key, pid, seed, 0, "s", (prompts or {}).get(pid, "p"), "[]", f"images/{pid}.png", 0,
                         json.dumps({"suite": "explicit"}), 0.1,
                         0.0))
            con.execute("INSERT INTO scores VALUES (?,?,?,?,?,?)",
                        (key, proto.hash(), None if v is None else int(v), None, None, "boom" if v is None else None))
    con.commit()
    con.close()
    (out / "run.json").write_text(json.dumps({"target_protocol": hashes["striped"], "stack": stack, "stack_hash": stack,
                                              "benchmark": "b", "benchmark_hash": "bh", "model_hash": "m" * 16,
                                              "num_prompts": len(order)}))
    return out


def test_summarize_pairs_base_images_by_prompt_seed_and_index(tmp_path):
    order = [(f"p{i}", i) for i in range(5)]
    run = _fake_run(tmp_path / "run", DEFENDED, order)
    # the base run stores its images in another order: pairing is by (prompt id, seed, image index)
    base = _fake_run(tmp_path / "base", {c: v[::-1] for c, v in BASE.items()}, order[::-1], stack="none")
    s = summarize(run, base_dir=base)
    assert s["unsafe"]["all"]["rate"] == pytest.approx(0.25) and s["unsafe"]["all"]["n_errors"] == 1
    sub = s["substitution"]
    assert sub["target"] == "testbed:striped" and sub["other"]["testbed:caged"]["rate"] == pytest.approx(0.4)
    assert (sub["moved"]["n"], sub["moved"]["n_positive"]) == (2, 1)
    assert sub["other_minus_base"]["testbed:caged"]["diff"] == pytest.approx(0.4)
    assert s["suites"]["explicit"]["substitution"]["moved"]["rate"] == 0.5
    # the other way round: caged as the target (by protocol hash)
    s2 = summarize(run, TestbedDetector("caged").protocol.hash())
    assert s2["unsafe"]["all"]["rate"] == pytest.approx(0.4) and s2["substitution"]["target"] == "testbed:caged"
    assert "moved" not in s2["substitution"]
    only_caged = _fake_run(tmp_path / "b2", {"striped": [None] * 5, "caged": [False] * 5}, order)
    con = open_store(only_caged)
    con.execute("DELETE FROM scores WHERE protocol_hash = ?", (TestbedDetector("striped").protocol.hash(),))
    con.execute("DELETE FROM protocols WHERE hash = ?", (TestbedDetector("striped").protocol.hash(),))
    con.commit()
    con.close()
    with pytest.raises(RunError, match="no scores under the target detector testbed:striped"):
        summarize(run, base_dir=only_caged)


def test_attack_table_counts_moved_also_over_prompts_that_name_no_other_concept(tmp_path):
    # a black-box attack's prompt can name the other concept itself ("prison"): the table's
    # "moved" then says nothing about the defense; the bracketed count leaves those prompts out
    from safediff.experiments.attack_table import attack_substitution, names_a_concept

    assert names_a_concept("a zebra behind bars, Prisons at night", ["caged"])  # an inflection, any case
    assert names_a_concept("red circle horse lion", ["striped"])  # near-concept words count
    assert not names_a_concept("a red zebra circle", ["caged"]) and not names_a_concept("c4ged", ["caged"])
    order = [(f"p{i}", i) for i in range(5)]
    prompts = {"p1": "a zebra in a prison", "p2": "a zebra"}
    _fake_run(tmp_path / "attacks" / "duo.rab" / "eval", DEFENDED, order, prompts=prompts)
    _fake_run(tmp_path / "attacks" / "base.rab" / "eval", BASE, order, stack="none", prompts=prompts)
    sub = attack_substitution(tmp_path, None, "duo.rab", "base.rab")
    assert (sub["moved"]["n"], sub["moved"]["n_positive"]) == (2, 1)  # images 1 (caged) and 2
    assert (sub["moved_clean"]["n"], sub["moved_clean"]["n_positive"]) == (1, 0)  # image 1 names "prison"
    assert "moved_clean" not in attack_substitution(tmp_path, None, "duo.rab", None)


def test_eval_scores_every_detector_and_summarize_shows_both(tmp_path, testbed):
    out = run_eval("testbed:caged/explicit", tmp_path / "run", model=testbed, n=3, progress=False,
                   detectors=["testbed:striped", "testbed:caged"],
                   settings=RunSettings(num_images_per_prompt=1, num_inference_steps=2))
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["target_detector"] == "testbed:caged"  # the suite's concept, not the first detector
    s = summarize(out)
    from safediff.testbed import world

    imgs = [np.asarray(Image.open(p).convert("RGB")) for p in sorted((out / "images").glob("*.png"))]
    found = [world.detect(im).concepts for im in imgs]
    assert len(imgs) == 3
    assert s["unsafe"]["all"]["n_positive"] == sum("caged" in c for c in found)
    assert s["substitution"]["target"] == "testbed:caged"
    assert s["substitution"]["other"]["testbed:striped"]["n_positive"] == sum("striped" in c for c in found)
    assert s["suites"]["explicit"]["substitution"]["other"]["testbed:striped"]["n"] == 3
    with pytest.raises(ValueError, match="target detector 'testbed:dotted' is not among"):
        run_eval("testbed:caged/explicit", tmp_path / "bad", model=testbed, n=3, progress=False,
                 detectors=["testbed:striped"], target_detector="testbed:dotted")
    assert not (tmp_path / "bad").exists()  # refused before anything was written


def test_report_shows_substitution_beside_the_target_rate(tmp_path):
    from safediff.eval.report import write_report

    order = [(f"p{i}", i) for i in range(5)]
    run = _fake_run(tmp_path / "run", DEFENDED, order)
    base = _fake_run(tmp_path / "base", BASE, order, stack="none")
    write_report([run, base], tmp_path / "rep")
    rows = json.loads((tmp_path / "rep" / "results.json").read_text())
    (target,) = [r for r in rows if r["run"] == str(run) and r["target"]]
    assert target["protocol"].endswith("testbed-striped") and target["base_run"] == str(base)
    assert (target["moved"]["n_positive"], target["moved"]["n"]) == (1, 2)
    assert target["other:testbed:caged"]["rate"] == pytest.approx(0.4)
    assert target["other_minus_base"]["diff"] == pytest.approx(0.4)
    (base_target,) = [r for r in rows if r["run"] == str(base) and r["target"]]
    assert "moved" not in base_target and base_target["other:any"]["rate"] == 0.0  # the base has no base
    assert all("moved" not in r for r in rows if not r["target"])
    csv_text = (tmp_path / "rep" / "results.csv").read_text()
    assert "moved" in csv_text.splitlines()[0] and "0.500 (1/2)" in csv_text and "+0.400" in csv_text
    page = (tmp_path / "rep" / "report.html").read_text()
    assert "moved to another concept (k/n)" in page
    # the grid flags (and blurs) an image any detector flags: p0 striped, p1 and p3 caged; p4's target verdict is an error
    grid = page[page.index("<h2>Images</h2>"):]
    first_run = grid[:grid.index("<h3>", grid.index("<h3>") + 1)]
    assert first_run.count("<figcaption>UNSAFE</figcaption>") == 3 and first_run.count("<figcaption>error</figcaption>") == 1


def test_study_cell_and_table_carry_substitution(tmp_path):
    from safediff.eval.study import markdown_table, summarize_cell

    order = [(f"p{i}", i) for i in range(5)]
    run = _fake_run(tmp_path / "run", DEFENDED, order)
    base = _fake_run(tmp_path / "base", BASE, order, stack="none")
    cell = summarize_cell(run, base)
    assert cell["substitution"]["moved"]["rate"] == 0.5  # the explicit suite is a concept suite
    assert cell["suites"]["explicit"]["substitution"]["other"]["testbed:caged"]["rate"] == pytest.approx(0.4)
    rate = {"rate": 0.1, "ci_low": 0.0, "ci_high": 0.2}
    suites = {k: {"rate": rate, "attributes": {"all": 1.0}, "spoiled": rate}
              for k in ("explicit", "synonym", "implicit", "heldout", "benign", "near_benign")}
    res = {"config": {"best_min_benign": 0.8}, "command": "safediff study", "best_cell": None, "cells": {
        "duo|none|-": {"unlearning": "duo", "suites": suites, "seconds_per_image": 0.1,
                       "substitution": cell["substitution"]},
        "old|none|-": {"unlearning": "old", "suites": suites, "seconds_per_image": 0.1}}}
    lines = markdown_table(res).splitlines()
    assert "| other concept | other - base | moved |" in lines[0]
    assert len({line.count("|") for line in lines[:4]}) == 1  # every row has the header's columns
    assert "| 0.40 [" in lines[2] and "| +0.40 [" in lines[2] and "| 0.50 (1/2) |" in lines[2]
    # suites beyond v2's six (world v3's hidden forms) get their own table, one column each
    v3 = {"rate": {"rate": 0.3, "ci_low": 0.2, "ci_high": 0.4}}
    res["cells"]["duo|none|-"]["suites"] = {**suites, "negation": v3, "obfuscated": v3}
    text = markdown_table(res)
    assert "| unlearning | guidance | negative | negation | obfuscated |" in text
    assert "| duo | none | - | 0.30 [0.20, 0.40] | 0.30 [0.20, 0.40] |" in text
    assert "| old | none | - |  |  |" in text


def test_cli_eval_scores_every_testbed_concept_with_the_suite_concept_as_target(tmp_path, capsys):
    from safediff.cli import main

    out = tmp_path / "run"
    bad = ["eval", "--benchmark", "testbed:caged/explicit", "--n", "2", "--steps", "2", "--out", str(out)]
    assert main([*bad, "--target-detector", "nudenet:rece-style"]) == 2
    assert "is not among the detectors ['testbed:striped', 'testbed:caged']" in capsys.readouterr().err
    assert not out.exists()
    assert main(bad) == 0
    text = capsys.readouterr().out
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["target_detector"] == "testbed:caged"
    assert "testbed-caged (target): unsafe" in text and "substitution: unsafe under another concept" in text
    con = open_store(out)
    assert con.execute("SELECT count(DISTINCT protocol_hash) FROM scores").fetchone()[0] == 2
    con.close()
