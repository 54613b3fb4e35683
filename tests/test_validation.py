"""Bad input is a clear error before any work, never a silent wrong result or a traceback
(issues 31.4, 31.6, 31.7, 32.5)."""

from __future__ import annotations

import json
import shutil

import pytest

import safediff  # noqa: F401 - registers every defense
from safediff.cli import main
from safediff.eval.benchmarks import BenchmarkError, load_benchmark, load_prompt_file, offset_seeds
from safediff.stack import DefenseStack


def _eval(tmp_path, *extra: str) -> list[str]:
    return ["eval", "--benchmark", "testbed:striped/benign", "--n", "2", "--steps", "1", "--out", str(tmp_path / "run"),
            *extra]


# 31.4 silent wrong results ---------------------------------------------------------------------
@pytest.mark.parametrize("extra, message", [
    (["--n", "0"], "must be a whole number >= 1"),
    (["--num-shards", "0"], "number of shards must be >= 1"),
    (["--num-shards", "2", "--shard-index", "2"], "index in [0, num_shards)"),
    (["--defense", "delta"], "`delta` has no `path`"),
    (["--defense", "uce(erase=[])"], "`uce` erases nothing"),
    (["--defense", "delta(path=\"d.safetensors\", scale=1e30)"], "option `scale` must be in [0, 100]"),
    (["--seed", "-1"], "base seed must be a whole number"),
])
def test_eval_refuses_input_that_would_run_something_else(tmp_path, capsys, extra, message):
    assert main(_eval(tmp_path, *extra)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_a_stack_entry_that_does_nothing_is_refused_by_name():
    for text, name in (("esd", "esd"), ("negative_prompt(text=\"x\")+sanitizer", "sanitizer"),
                       ("rece(erase=[])", "rece"), ("duo(scale=0.5)", "duo")):
        with pytest.raises(ValueError, match=rf"does nothing as given: `{name}`"):
            DefenseStack.parse(text)
    # switched off on purpose (zero strength) stays allowed
    assert not DefenseStack.parse('uce(erase=["zebra"], erase_scale=0)').active()
    assert not DefenseStack.parse('delta(path="d.safetensors", scale=0)').active()


def test_eval_quality_with_no_metric_left_is_refused_before_generating(tmp_path, capsys, monkeypatch):
    from safediff.eval import quality

    every = {m: "not installed here" for m in ("fid", "kid", "lpips", "clip_score")}
    monkeypatch.setattr(quality.QualityModels, "load", classmethod(lambda cls, **kw: cls(skipped=dict(every))))
    assert main(_eval(tmp_path, "--quality")) == 2
    assert "--quality can measure no metric here" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("row, message", [
    ({"prompt": "a cat", "seed": 1.5}, "seed must be a whole number"),
    ({"prompt": "a cat", "seed": "1e30"}, "seed must be a whole number in [0,"),
    ({"prompt": "a cat", "seed": -3}, "seed must be a whole number in [0,"),
    ({"prompt": "a cat", "seed": True}, "seed must be a whole number"),
    ({"prompt": "a cat", "id": {"a": 1}}, "id must be text or a whole number"),
    ({"prompt": "a cat", "guidance_scale": "nan"}, "guidance_scale must be a finite number"),
    ({"prompt": "a cat", "width": 0}, "width must be a whole number in [1,"),
])
def test_prompt_rows_with_wrong_values_are_refused_not_coerced(tmp_path, row, message):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(BenchmarkError, match="row 1: " + message.replace("[", r"\[")):
        load_prompt_file(path)


def test_whole_seeds_in_any_spelling_are_kept(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("prompt,seed,id\na cat,7,x\na dog,8.0,y\n")
    assert [r.seed for r in load_prompt_file(path)] == [7, 8]


def test_csv_seed_out_of_range_leaves_no_run_directory(tmp_path, capsys):
    (tmp_path / "p.csv").write_text("prompt,seed\na cat,1e30\n")
    out = tmp_path / "run"
    assert main(["eval", "--benchmark", str(tmp_path / "p.csv"), "--out", str(out)]) == 2
    assert "seed must be a whole number in [0," in capsys.readouterr().err and not out.exists()


def test_load_benchmark_refuses_n_zero():
    with pytest.raises(BenchmarkError, match="must be a whole number >= 1"):
        load_benchmark("testbed:striped/benign", n=0)
    assert len(load_benchmark("testbed:striped/benign")) == 100  # n=None keeps the documented default


# 31.6 tracebacks ---------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", [[1], {"a": 1}, 3])
def test_a_preset_that_is_not_a_name_is_a_clear_error(preset):
    with pytest.raises(ValueError, match="Unknown preset .* for defense `sld`; choose one of"):
        DefenseStack.parse([{"name": "sld", "preset": preset}])
    with pytest.raises(ValueError, match="Unknown preset"):
        DefenseStack.parse("sld(preset=[1])")


@pytest.mark.parametrize("class_name", ["StableDiffusionPipeline", "__class__", "UNet2DConditionModel", ["x"]])
def test_only_a_scheduler_class_may_be_named_by_a_model_folder(tmp_path, class_name):
    from safediff.models import ModelError, load_model
    from safediff.testing import tiny_model

    src = tiny_model("sd1").source
    folder = tmp_path / "m"
    shutil.copytree(src, folder)
    cfg_path = folder / "scheduler" / "scheduler_config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "_class_name": class_name}))
    with pytest.raises(ModelError, match="not a diffusers scheduler class"):
        load_model(folder)


# 31.7 validate before work ---------------------------------------------------------------------
@pytest.mark.parametrize("extra, message", [
    (["--batch-size", "0"], "`batch_size` (--batch-size) must be a whole number >= 1"),
    (["--max-cells", "0"], "`max_cells` (--max-cells) must be a whole number >= 1"),
    (["--seed", "-2"], "`seed` (--seed) must be a whole number"),
])
def test_study_refuses_bad_numbers_before_training(tmp_path, capsys, extra, message):
    out = tmp_path / "study"
    assert main(["study", "--out", str(out), *extra]) == 2
    assert message in capsys.readouterr().err and not out.exists()


# 32.5 --seed -------------------------------------------------------------------------------------
def test_offset_seeds_adds_the_base_seed_to_every_prompt_seed():
    recs = load_benchmark("testbed:striped/benign", n=3)
    assert [r.seed for r in recs] == [0, 1, 2]
    assert [r.seed for r in offset_seeds(recs, 10)] == [10, 11, 12]
    assert offset_seeds(recs, 0) == recs
    with pytest.raises(BenchmarkError, match="not below 2"):
        offset_seeds(recs, 2**63 - 2)


def test_eval_seed_changes_a_testbed_benchmark_s_seeds(tmp_path):
    from safediff.eval.runner import load_results

    assert main(_eval(tmp_path, "--seed", "5")) == 0
    run = tmp_path / "run"
    assert sorted(r["seed"] for r in load_results(run)) == [5, 6]
    assert json.loads((run / "run.json").read_text())["settings"]["seed"] == 5


# issue 19 review, defect 7 ------------------------------------------------------------
def test_outputs_are_never_overwritten_without_asking(tmp_path, capsys):
    target = tmp_path / "out.safetensors"
    target.write_bytes(b"precious")
    for argv in (["unlearn", "esd", "--out", str(target)],
                 ["erase", "--method", "uce", "--concept", "striped", "--out", str(target)],
                 ["invert", "--concept", "striped", "--out", str(target)],
                 ["sanitizer", "train", "--out", str(target)]):
        assert main(argv) == 2, argv
        assert "exists" in capsys.readouterr().err
        assert target.read_bytes() == b"precious"


# issue 19 review, defect 11 -----------------------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    ({"guidance_scale": float("nan")}, "guidance_scale"), ({"guidance_scale": float("inf")}, "guidance_scale"),
    ({"batch_size": 0}, "batch_size"), ({"num_inference_steps": 0}, "num_inference_steps"),
    ({"seed": 2**64}, "seed"), ({"seed": -1}, "seed"), ({"num_images_per_prompt": 0}, "num_images_per_prompt"),
])
def test_nonsense_generation_settings_are_refused(tiny_sd1, kwargs, match):
    with pytest.raises(ValueError, match=match):
        safediff.generate("a red circle", model=tiny_sd1, progress=False, **kwargs)


def test_a_bad_seed_is_refused_before_the_model_loads(monkeypatch):
    import safediff.api as api

    monkeypatch.setattr(api, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(ValueError, match="seed"):
        safediff.generate("a red circle", seed=2**64)


@pytest.mark.parametrize("stack,match", [
    ('delta(path="x.safetensors", scale=nan)', "scale"),
    ('negative_prompt(text=[1, 2])', "text"),
    ("sld(guidance_scale=inf)", "guidance_scale"),
])
def test_nonsense_defense_options_are_refused(stack, match):
    with pytest.raises(ValueError, match=match):
        DefenseStack.parse(stack)


def test_esd_zero_iterations_is_refused(capsys):
    assert main(["unlearn", "esd", "--iterations", "0", "--out", "x.safetensors"]) == 2
    assert "iterations" in capsys.readouterr().err


# issue 19 review, defect 12 -----------------------------------------------------------
def _files(tmp_path):
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00" * 64)
    folder = tmp_path / "folder.safetensors"
    folder.mkdir()
    yaml_bad = tmp_path / "stack.yaml"
    yaml_bad.write_text("defenses: [name: : :\n")
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "a red circle"}\n[1, 2]\n')
    images = tmp_path / "imgs"
    images.mkdir()
    (images / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return empty, corrupt, folder, yaml_bad, rows, images


def test_bad_input_is_one_line_not_a_traceback(tmp_path, capsys):
    empty, corrupt, folder, yaml_bad, rows, images = _files(tmp_path)
    cases = [
        ["generate", "a red circle", "--defense", f'delta(path="{empty}")', "--steps", "1"],
        ["generate", "a red circle", "--defense", f'delta(path="{corrupt}")', "--steps", "1"],
        ["generate", "a red circle", "--defense", f'delta(path="{folder}")', "--steps", "1"],
        ["generate", "a red circle", "--defense", f'negative_prompt(embedding="{corrupt}")', "--steps", "1"],
        ["generate", "a red circle", "--defense", f'sanitizer(path="{corrupt}")', "--steps", "1"],
        ["generate", "a red circle", "--stack-file", str(yaml_bad), "--steps", "1"],
        ["generate", "a red circle", "--defense", "negative_prompt(text=[1, 2])", "--steps", "1"],
        ["eval", "--benchmark", str(rows), "--out", str(tmp_path / "ev")],
        ["invert", "--concept-images", str(images), "--out", str(tmp_path / "i.safetensors")],
        ["invert", "--concept", "nosuch", "--out", str(tmp_path / "j.safetensors")],
        ["unlearn", "duo", "--concept", "nosuch", "--out", str(tmp_path / "k.safetensors")],
        ["testbed", "train", "--set", "nosuch=1", "--out", str(tmp_path / "tb")],
        ["report", str(tmp_path / "no-run")],
    ]
    for argv in cases:
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("safediff: error:") and "Traceback" not in err, (argv, err)
    assert not (tmp_path / "no-run").exists()
