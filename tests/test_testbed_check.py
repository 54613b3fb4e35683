"""`safediff testbed check --guidance-scale`: pins the default scale without re-measuring the curve
(docs/testbed.md, "Decision on the misses")."""

import json
import shutil

import pytest

from safediff.models import TESTBED_PATH, load_model
from safediff.testbed.train import TrainConfig, calibrate


@pytest.fixture()
def model_copy(tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(TESTBED_PATH, dst)
    meta = json.loads((dst / "safediff.json").read_text())
    meta["default_guidance_scale"] = 2.0
    (dst / "safediff.json").write_text(json.dumps(meta))
    return dst, meta


def test_pinned_scale_is_recorded_and_used_and_the_curve_is_kept(model_copy):
    path, before = model_copy
    cfg = TrainConfig.from_dict({**before["train_config"], "acceptance_n": 0})
    meta = calibrate(path, cfg, progress=False, log=lambda *_: None, guidance_scale=4.0)
    on_disk = json.loads((path / "safediff.json").read_text())
    assert meta["default_guidance_scale"] == on_disk["default_guidance_scale"] == 4.0
    assert "pinned" in on_disk["default_guidance_scale_source"]
    assert on_disk["guidance_curve"] == before["guidance_curve"]  # not re-measured
    assert load_model(path, device="cpu", dtype="fp32").default_guidance_scale == 4.0


@pytest.mark.parametrize("bad", [0.5, 100.0])
def test_a_scale_outside_the_range_is_refused_before_writing(model_copy, bad):
    path, before = model_copy
    cfg = TrainConfig.from_dict({**before["train_config"], "acceptance_n": 0})
    with pytest.raises(ValueError, match="outside"):
        calibrate(path, cfg, progress=False, log=lambda *_: None, guidance_scale=bad)
    assert json.loads((path / "safediff.json").read_text())["default_guidance_scale"] == 2.0


def test_the_shipped_world_v3_model_loads_by_name_with_v2s_sampler_defaults():
    m = load_model("testbed-v3", device="cpu", dtype="fp32")
    assert m.meta["train_config"]["world_version"] == 3
    assert m.default_guidance_scale == 4.0 and m.default_steps == 25  # docs/testbed.md, "Decision on the misses"
    assert "pinned" in m.meta["default_guidance_scale_source"]
    assert m.content_hash != load_model("testbed", device="cpu", dtype="fp32").content_hash


def test_a_missing_shipped_testbed_names_its_rebuild_command(monkeypatch, tmp_path):
    from safediff import models

    monkeypatch.setitem(models.SHIPPED_TESTBEDS, "testbed-v3", (tmp_path / "absent", models.SHIPPED_TESTBEDS["testbed-v3"][1]))
    with pytest.raises(models.ModelError, match="'testbed-v3' is missing.*world_version=3.*--guidance-scale 4.0"):
        load_model("testbed-v3")
