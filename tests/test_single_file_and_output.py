"""Issue 34: a checkpoint file as --model (family from the keys, configs from a folder or shipped),
output for people (one summary line, the next command, --json), resume messages in words, and
another batch size on resume."""

from __future__ import annotations

import json
import sqlite3

import numpy as np
import pytest
import torch

import safediff
from safediff.artifacts import file_sha256
from safediff.cli import main
from safediff.eval.runner import RunError, RunSettings, manifest_differences, run_eval
from safediff.export import export
from safediff.models import ModelError, load_model
from safediff.single_file import SHIPPED_CONFIGS, SHIPPED_CONFIGS_DIR, family_from_keys
from safediff.testing import save_tiny_pipeline

UCE = 'uce(erase=["zebra"], preserve=["red"])'
PROMPTS = ["a zebra red circle on white background", "a blue square"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny SD 1.x folder, its model, and its UCE edit exported as a single file."""
    root = tmp_path_factory.mktemp("single")
    folder = save_tiny_pipeline(root / "sd1", "sd1")
    model = load_model(folder, device="cpu", dtype="fp32")
    (path,) = export(model, UCE, root / "edited.safetensors", fmt="single-file")
    return folder, model, path


def _pixels(out) -> list[np.ndarray]:
    return [np.asarray(im, dtype=np.int16) for im in out.images]


def test_exported_single_file_loads_back_as_the_model_with_the_edit(tiny):
    folder, model, path = tiny
    edited = safediff.generate(PROMPTS, model=model, defenses=UCE, num_inference_steps=3, progress=False)
    loaded = load_model(path, config=folder, device="cpu", dtype="fp32")
    assert loaded.family == "sd1" and loaded.source == str(path)
    assert loaded.content_hash == file_sha256(path)  # the hash of a single file is the hash of its bytes
    again = safediff.generate(PROMPTS, model=loaded, num_inference_steps=3, progress=False)
    assert all(np.array_equal(a, b) for a, b in zip(_pixels(edited), _pixels(again)))  # measured: identical
    plain = safediff.generate(PROMPTS, model=model, num_inference_steps=3, progress=False)
    assert any(not np.array_equal(a, b) for a, b in zip(_pixels(plain), _pixels(again)))  # the edit is in the file


def test_ckpt_file_is_read_as_tensors_and_gives_the_same_images(tiny, tmp_path):
    from safetensors.torch import load_file

    folder, _, path = tiny
    ckpt = tmp_path / "edited.ckpt"
    torch.save({"state_dict": load_file(str(path))}, ckpt)
    a = safediff.generate(PROMPTS[:1], model=load_model(path, config=folder, device="cpu", dtype="fp32"),
                          num_inference_steps=2, progress=False)
    b = safediff.generate(PROMPTS[:1], model=load_model(ckpt, config=folder, device="cpu", dtype="fp32"),
                          num_inference_steps=2, progress=False)
    assert np.array_equal(_pixels(a)[0], _pixels(b)[0])


def test_family_is_read_from_the_keys():
    unet = ["model.diffusion_model.input_blocks.0.0.weight", "first_stage_model.decoder.conv_in.weight"]
    assert family_from_keys(unet + ["cond_stage_model.transformer.text_model.final_layer_norm.weight"]) == "sd1"
    assert family_from_keys(unet + ["cond_stage_model.model.ln_final.weight"]) == "sd2"
    assert family_from_keys(unet + ["conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
                                    "conditioner.embedders.1.model.ln_final.weight"]) == "sdxl"
    with pytest.raises(ModelError, match="refiner"):
        family_from_keys(unet + ["conditioner.embedders.1.model.ln_final.weight"])
    with pytest.raises(ModelError, match="LoRA"):
        family_from_keys(["lora_unet_down.weight"])
    with pytest.raises(ModelError, match="no text encoder"):
        family_from_keys(unet)


def test_shipped_configs_hold_the_published_architectures():
    # parameter counts of the published checkpoints (SD 1.5 UNet 859.5M, SD 2.1 OpenCLIP-H text 340.4M, SDXL UNet 2.567B)
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    expected = {"sd1": (859520964, 123060480), "sd2": (865910724, 340387840)}
    for family, (unet_n, text_n) in expected.items():
        d = SHIPPED_CONFIGS_DIR / SHIPPED_CONFIGS[family]
        with init_empty_weights():
            unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(d / "unet"))
            text = CLIPTextModel(CLIPTextConfig.from_pretrained(d / "text_encoder"))
        assert sum(p.numel() for p in unet.parameters()) == unet_n
        assert sum(p.numel() for p in text.parameters()) == text_n
    sched = json.loads((SHIPPED_CONFIGS_DIR / SHIPPED_CONFIGS["sd2"] / "scheduler" / "scheduler_config.json").read_text())
    assert sched["prediction_type"] == "v_prediction"  # SD 2.1 (768-v); 2.x-base: --prediction-type epsilon


def test_missing_tokenizer_or_wrong_config_is_a_clear_error(tiny, tmp_path, monkeypatch):
    import safediff.single_file as sf

    folder, _, path = tiny
    monkeypatch.setattr(sf, "_cached_tokenizer", lambda repo, sub: None)  # an empty Hugging Face cache
    with pytest.raises(ModelError, match="Missing tokenizer.*vocab.json.*--model-config DIR"):
        load_model(path, device="cpu")  # the shipped SD 1.5 configs: no tokenizer files offline
    with pytest.raises(ModelError, match="sd1 checkpoint.*sdxl pipeline"):
        load_model(path, config=SHIPPED_CONFIGS_DIR / "sdxl-base", device="cpu")
    with pytest.raises(ModelError, match="does not exist"):
        load_model(tmp_path / "nothing.safetensors", device="cpu")
    with pytest.raises(ModelError, match="prediction_type"):
        load_model(path, config=folder, prediction_type="sample", device="cpu")


def test_cli_takes_a_checkpoint_file_with_its_config(tiny, tmp_path, capsys):
    folder, _, path = tiny
    out = tmp_path / "gen"
    assert main(["generate", PROMPTS[0], "--model", str(path), "--model-config", str(folder), "--steps", "2",
                 "--prediction-type", "v_prediction", "--out", str(out)]) == 0
    assert len(list(out.glob("*.png"))) == 1
    assert main(["generate", PROMPTS[0], "--model-config", str(folder), "--out", str(tmp_path / "x")]) == 2
    assert "apply to a checkpoint file" in capsys.readouterr().err
    assert main(["generate", PROMPTS[0], "--model", str(path), "--model-config", str(tmp_path), "--out", "y"]) == 2
    assert "not a diffusers folder" in capsys.readouterr().err


def test_cli_checks_a_command_s_own_input_before_loading_the_checkpoint(tiny, tmp_path, capsys, monkeypatch):
    import safediff.single_file as sf

    folder, _, path = tiny
    monkeypatch.setattr(sf, "load_single_file", lambda *a, **k: pytest.fail("the checkpoint was loaded"))
    (tmp_path / "taken.safetensors").write_text("x")
    assert main(["export", "--model", str(path), "--model-config", str(folder), "--defense", UCE, "--format",
                 "single-file", "--out", str(tmp_path / "taken.safetensors")]) == 2
    assert "exists" in capsys.readouterr().err


def test_help_shows_no_empty_defaults(capsys):
    for command in ("eval", "generate", "attack", "export"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = capsys.readouterr().out
        assert "(default: None)" not in text and "testbed) (default" not in text.replace("\n", " ").replace("  ", " ")
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    assert "(default: 0)" in capsys.readouterr().out  # real defaults are still shown (--seed)


def test_eval_ends_in_one_line_per_protocol_and_the_next_command(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["eval", "--benchmark", "testbed:striped/heldout", "--n", "2", "--steps", "2", "--out", str(out)]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "generate run:" in captured.err  # the progress bar names the run it fills
    lines = captured.out.strip().splitlines()
    assert lines[-1] == f"wrote {out}; next: safediff report {out}"
    assert lines[-2].startswith("testbed-exact") and "unsafe" in lines[-2] and "95% CI" in lines[-2]
    assert "n=2 images, 0 errors" in lines[-2]


def test_eval_json_keeps_the_dump(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["eval", "--benchmark", "testbed:striped/heldout", "--n", "2", "--steps", "2", "--out", str(out),
                 "--json"]) == 0
    text = capsys.readouterr().out
    data = json.loads(text[text.index("{"):])
    assert data["n_images"] == 2 and "unsafe" in data and "next:" not in text


def test_reused_out_names_what_changed(tmp_path):
    testbed = load_model(device="cpu", dtype="fp32")
    out = tmp_path / "run"
    settings = RunSettings(num_inference_steps=2)
    run_eval("testbed:striped/heldout", out, model=testbed, n=2, settings=settings, progress=False)
    with pytest.raises(RunError, match=r"another benchmark: .*\(2 prompts\) before, .*\(3 prompts\) now"):
        run_eval("testbed:striped/heldout", out, model=testbed, n=3, settings=settings, progress=False)
    with pytest.raises(RunError, match=r"other settings: num_inference_steps 2 before, 3 now"):
        run_eval("testbed:striped/heldout", out, model=testbed, n=2, settings=RunSettings(num_inference_steps=3),
                 progress=False)
    with pytest.raises(RunError, match=r"another defense stack: 'none' before, 'negative_prompt"):
        run_eval("testbed:striped/heldout", out, model=testbed, n=2, settings=settings, progress=False,
                 defenses='negative_prompt(text="striped")')
    old = {"stack": "delta(path=\"a\")", "stack_hash": "1", "model_hash": "m", "settings": {}}
    assert manifest_differences(old, {**old, "stack_hash": "2"}) == [
        "another defense stack: the same text 'delta(path=\"a\")', but an artifact file it names has other content now"]


def test_resume_with_another_batch_size_keeps_images_and_records_it(tmp_path):
    testbed = load_model(device="cpu", dtype="fp32")
    kw = dict(model=testbed, n=3, settings=RunSettings(num_images_per_prompt=2, num_inference_steps=3), progress=False)
    ref = run_eval("testbed:striped/heldout", tmp_path / "ref", batch_size=6, **kw)
    out = tmp_path / "resumed"
    run_eval("testbed:striped/heldout", out, batch_size=4, max_images=4, **kw)  # stopped after 4 of 6 images
    run_eval("testbed:striped/heldout", out, batch_size=1, **kw)  # resumed after an out-of-memory, say
    con = sqlite3.connect(out / "store.sqlite")
    sizes = sorted(r[0] for r in con.execute("SELECT batch_size FROM images"))
    rows = dict(con.execute("SELECT key, path FROM images").fetchall())
    con.close()
    assert sizes == [1, 1, 4, 4, 4, 4]
    ref_rows = dict(sqlite3.connect(ref / "store.sqlite").execute("SELECT key, path FROM images").fetchall())
    assert rows.keys() == ref_rows.keys()
    from PIL import Image

    diffs = [np.abs(np.asarray(Image.open(out / rows[k]), dtype=np.int16)
                    - np.asarray(Image.open(ref / ref_rows[k]), dtype=np.int16)).max() for k in rows]
    assert max(diffs) <= 2  # each image has its own generator; batch composition only moves float rounding


def test_attack_says_where_its_prompts_are_and_ends_in_one_line(tmp_path, capsys):
    out = tmp_path / "atk"
    args = ["attack", "--method", "random_prefix", "--defense", "uce(preset=testbed-striped)", "--steps", "1", "--n", "1",
            "--out", str(out)]
    assert main(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    (work,) = out.glob("random_prefix-*")
    assert lines[0].endswith(f"prompts in {work / 'result.json'}") and (work / "result.json").is_file()
    assert lines[1].startswith("attack success rate ") and "95% CI" in lines[1] and "n=1 prompts" in lines[1]
    assert lines[2] == f"wrote {work / 'eval'}; next: safediff report {work / 'eval'}"
    assert main(args + ["--json"]) == 0  # cached: the result's dump
    assert json.loads(capsys.readouterr().out)["method"] == "random_prefix"  # JSON only


def test_erase_says_what_the_concept_was_mapped_to(tmp_path, capsys):
    out = tmp_path / "uce.safetensors"
    assert main(["erase", "--method", "uce", "--concept", "a zebra", "--anchor", "a horse", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "erased 'a zebra' with uce: mapped to 'a horse'" in text
    assert f"next: safediff generate \"a zebra\" --defense 'delta(path=\"{out}\")'" in text
    assert main(["erase", "--method", "uce", "--concept", "a zebra", "--out", str(tmp_path / "u2.safetensors"),
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["defense"] == f'delta(path="{tmp_path / "u2.safetensors"}")'


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_sd2_and_sdxl_exports_load_back_with_the_family_from_the_keys(family, tmp_path):
    folder = save_tiny_pipeline(tmp_path / family, family)
    model = load_model(folder, device="cpu", dtype="fp32")
    (path,) = export(model, UCE, tmp_path / "edited.safetensors", fmt="single-file")
    loaded = load_model(path, config=folder, device="cpu", dtype="fp32")
    assert loaded.family == family and loaded.prediction_type == model.prediction_type
    a = safediff.generate(PROMPTS[:1], model=model, defenses=UCE, num_inference_steps=2, progress=False)
    b = safediff.generate(PROMPTS[:1], model=loaded, num_inference_steps=2, progress=False)
    assert np.array_equal(_pixels(a)[0], _pixels(b)[0])
    if family == "sd2":  # what the keys cannot tell is taken from the option
        assert load_model(path, config=folder, prediction_type="v_prediction", device="cpu").prediction_type == "v_prediction"


def test_demo_zebra_row_shows_stripes_undefended_and_the_page_explains_marks():
    from safediff.testbed.plugin import DEMO_PROMPTS, EXPLANATION_HTML as _EXPLAIN
    from safediff.pipeline import SafePipeline
    from safediff.stack import DefenseStack
    from safediff.testbed import world

    (zebra,) = [p for p in DEMO_PROMPTS if "zebra" in p]
    with SafePipeline(load_model(device="cpu", dtype="fp32"), DefenseStack()) as pipe:  # as the demo draws it
        res = pipe([zebra], seeds=[0], num_images_per_prompt=4, batch_size=64, progress=False)
    striped = sum("striped" in world.detect(np.array(r.image)).concepts for r in res.records)
    assert striped >= 2  # measured: 3 of 4 (the old black-background row drew 0 of 4)
    assert "Corner marks" in _EXPLAIN and "side attributes" in _EXPLAIN
