"""AdvUnlearn as a row of the composition study (issue 33, item 1): its artifact, its stack, its resume."""

from safetensors import safe_open

from safediff.eval.study import UNLEARNING, StudyConfig, train_configs, edit_stack, prepare_artifacts


def test_advunlearn_is_a_study_row_applied_as_a_text_encoder_delta():
    assert UNLEARNING.index("advunlearn") == UNLEARNING.index("esd") + 1  # its row sits beside ESD's
    assert edit_stack("advunlearn", {"advunlearn": "a/adv.safetensors"}, "striped") == 'delta(path="a/adv.safetensors")'


def test_advunlearn_training_config_is_the_testbed_preset_seeded_as_the_others():
    from safediff.unlearning.advunlearn import AdvUnlearnTrainConfig, testbed_prompts

    full = train_configs(StudyConfig(concept="caged", seed=7))
    assert full["advunlearn"] == AdvUnlearnTrainConfig.preset("testbed", testbed_prompts("caged"), seed=7)
    assert full["advunlearn"].seed == full["esd"].seed == full["duo"].seed == 7
    quick = train_configs(StudyConfig(seed=3, quick=True))["advunlearn"]
    assert quick == AdvUnlearnTrainConfig.preset("testbed-tiny", testbed_prompts("striped"), seed=3)


def test_prepare_artifacts_trains_advunlearn_once_then_reuses_it(testbed, tmp_path):
    cfg = StudyConfig(unlearning=("advunlearn",), quick=True)
    paths, seconds = prepare_artifacts(testbed, cfg, tmp_path, progress=False)
    adv = tmp_path / "artifacts" / "advunlearn_striped.safetensors"
    assert paths["advunlearn"] == str(adv) and "advunlearn" in seconds and "ine_advunlearn" in seconds
    with safe_open(str(adv), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("text_encoder.") for k in keys)  # what delta(path=...) applies to the encoder
    before = adv.stat().st_mtime_ns
    again, seconds2 = prepare_artifacts(testbed, cfg, tmp_path, progress=False)
    assert again == paths and seconds2 == {} and adv.stat().st_mtime_ns == before  # a finished file is reused


def test_shipped_study_trains_advunlearn_with_the_studys_config(testbed, tmp_path, monkeypatch):
    from safediff.experiments import load_experiment, shipped_experiment
    from safediff.unlearning import advunlearn, unlearn

    art = load_experiment(shipped_experiment("testbed_study")).artifacts["advunlearn_striped"]
    seen = []
    monkeypatch.setattr(advunlearn, "train_advunlearn", lambda model, out, cfg, **kw: seen.append(cfg) or out)
    # the experiment runner's call for a registered trainer (experiments/graph.py), training replaced by a spy
    unlearn(art.method, testbed, tmp_path / "a.safetensors", concept=art.concept, preset=art.preset, seed=art.seed,
            options=dict(art.options), progress=False)
    assert seen == [train_configs(StudyConfig())["advunlearn"]]
