"""The composition study (evaluation issue, part 7) on a cut-down grid with quick training configs."""

import json

import pytest

from safediff.eval.study import StudyConfig, best_cell, grid_cells, run_study


def test_bad_config_is_refused_before_any_work():
    with pytest.raises(ValueError, match="Unknown testbed concept"):
        StudyConfig(concept="nudity")
    with pytest.raises(ValueError, match="unlearning"):
        StudyConfig(unlearning=("esd", "fancy"))
    with pytest.raises(ValueError, match="sld_preset"):
        StudyConfig(sld_preset="extreme")


def test_grid_has_every_cell_of_the_issue():
    cfg = StudyConfig()
    arts = {k: f"{k}.safetensors" for k in ("esd", "advunlearn", "duo", "dark_miner", "sanitizer")}
    arts.update({f"ine_{u}": f"ine_{u}.safetensors" for u in cfg.unlearning})
    names = [c.name for c in grid_cells(cfg, arts)]
    assert len(names) == 7 + 1 + 7 * 3 * 2 and len(set(names)) == len(names)
    cell = {c.name: c for c in grid_cells(cfg, arts)}
    assert cell["esd|sld|ine"].stack == 'esd(path="esd.safetensors")+sld(preset=medium, concept_embedding="ine_esd.safetensors")'
    assert cell["advunlearn|safree|ine"].stack == ('delta(path="advunlearn.safetensors")+safree(preset=testbed-striped, '
                                                   'embedding="ine_advunlearn.safetensors")+safree_svf')
    assert cell["uce|negative_prompt|explicit"].stack == 'uce(preset=testbed-striped)+negative_prompt(text="striped")'
    assert cell["none|none|-"].stack is None


def test_best_cell_rule():
    def c(rate, acc, guidance="sld"):
        suites = {s: {"rate": {"rate": rate}} for s in ("explicit", "synonym", "implicit", "heldout")}
        suites["benign"] = {"attributes": {"all": acc}}
        return {"guidance": guidance, "suites": suites}
    res = {"a": c(0.5, 0.9), "b": c(0.1, 0.5), "c": c(0.2, 0.85), "d": c(0.0, 1.0, guidance=None)}
    assert best_cell(res, 0.8) == "c"  # b spoils benign images; d has no guidance


def test_study_runs_resumes_and_reports_missing_cells(testbed, tmp_path):
    # best_min_benign 0: every cell with guidance qualifies, so the ES-on-best cell must be made
    cfg = StudyConfig(n=2, unlearning=("none", "uce"), guidance=("negative_prompt",), quick=True, batch_size=16,
                      best_min_benign=0.0)
    res = run_study(tmp_path, cfg, model=testbed, progress=False, max_cells=3)
    cells = res["cells"]
    ran = [k for k, v in cells.items() if "suites" in v]
    assert len(ran) == 3 and sum("missing" in v for v in cells.values()) >= 3
    assert cells["esd|none|-"]["missing"] == "not in this study's config"
    assert "missing" in (tmp_path / "table.md").read_text()
    assert (tmp_path / "plot_quality.svg").read_text().count("<circle") == 3
    # resume: the finished cells are not generated again, the rest are
    n_images = {k: cells[k]["n_images"] for k in ran}
    res2 = run_study(tmp_path, cfg, model=testbed, progress=False)
    grid = [k for k, v in res2["cells"].items() if v.get("unlearning") in ("none", "uce")]
    assert all("suites" in res2["cells"][k] for k in grid)
    assert all(res2["cells"][k]["n_images"] == n_images[k] == 2 * 6 for k in ran)
    assert res2["cells"]["uce|none|-"]["suites"]["explicit"]["rate"]["n"] == 2
    assert res2["cells"]["none|none|-"]["benign_distance"] == 0.0 and res2["cells"]["uce|none|-"]["benign_distance"] > 0
    # regression (review defect 15): this was asserted only under `if best_cell`, so it could pass vacuously
    assert res2["best_cell"] in ("none|negative_prompt|explicit", "uce|negative_prompt|explicit")
    extra = res2["cells"][f"{res2['best_cell']}+sanitizer"]
    assert "suites" in extra
    assert extra["stack"].startswith(res2["cells"][res2["best_cell"]]["stack"]) and "sanitizer(" in extra["stack"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["cells"].keys() == res2["cells"].keys()
    with pytest.raises(ValueError, match="another config"):
        run_study(tmp_path, StudyConfig(n=3, unlearning=("none",), guidance=("negative_prompt",), quick=True,
                                        best_min_benign=0.0),
                  model=testbed, progress=False)
