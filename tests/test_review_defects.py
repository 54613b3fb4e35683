"""Regression tests for the defects an independent review of the tree found (issue 19): each
failed before its fix. (Defects 1, 5, 6, 9, 11 of the runner, 13, 14 are in test_runner.py;
5 of the report in test_report.py; 8 in test_inversion_and_esd.py; 10 in test_models_and_stack.py;
15 in test_study.py.)"""

import json
import pickle

import numpy as np
import pytest
import torch

import safediff
from safediff.cli import main
from safediff.stack import DefenseStack


# 2 -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("a,b", [
    ('uce(erase=["zebra"], erase_scale=1)', 'uce(erase=["zebra"], erase_scale=1.0)'),
    ('uce(erase=["zebra"], preserve=["red"])', 'uce(erase=["zebra"], preserve=["red"], lamb=0.5)'),
    ("sld(guidance_scale=1000)", "sld(guidance_scale=1000.0)"),
    ("delta(path=\"x\", scale=2)", "delta(path=\"x\", scale=2.0)"),
    ("safree_svf(freeu=[1, 1, 0.9, 0.2])", "safree_svf(freeu=[1.0, 1.0, 0.9, 0.2])"),
])
def test_configs_that_print_the_same_hash_the_same(a, b):
    sa, sb = DefenseStack.parse(a), DefenseStack.parse(b)
    assert sa.to_string() == sb.to_string()
    # the hash covers artifact contents: compare the config part (no file for "x")
    assert json.dumps(sa.to_list(), sort_keys=True) == json.dumps(sb.to_list(), sort_keys=True)


def test_stack_hash_equal_for_int_and_float(tiny_sd1):
    assert DefenseStack.parse('uce(erase=["zebra"], erase_scale=1)').hash(tiny_sd1.content_hash) == \
        DefenseStack.parse('uce(erase=["zebra"], erase_scale=1.0)').hash(tiny_sd1.content_hash)


# 3 -------------------------------------------------------------------------------------------
def test_an_image_is_blanked_only_by_a_check_that_blanks_it(testbed):
    # a "flag" check flags the striped image; the "blank" check (a threshold no image reaches)
    # does not: the image must be kept, flagged
    stack = ('output_filter(detector="testbed:striped", action="flag")'
             '+output_filter(detector="testbed:caged", action="blank")')
    prompt = ["a striped red circle on white background"]
    plain = safediff.build(testbed, None)(prompt, seed=3).records[0]
    rec = safediff.build(testbed, stack)(prompt, seed=3).records[0]
    assert rec.flagged and np.array_equal(np.asarray(rec.image), np.asarray(plain.image))


# 4 -------------------------------------------------------------------------------------------
class _Boom:
    def __reduce__(self):
        return (exec, ("open('PWNED', 'w').write('x')",))


def test_a_planted_checkpoint_runs_no_code(tiny_sd1, tmp_path, monkeypatch):
    from safediff.unlearning.esd import ESDTrainConfig, train_esd

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "esd.safetensors"
    with open(out.with_name(out.name + ".ckpt.safetensors"), "wb") as f:
        pickle.dump({"state": _Boom()}, f)
    with open(out.with_name(out.name + ".ckpt"), "wb") as f:  # the old name, for good measure
        pickle.dump({"state": _Boom()}, f)
    cfg = ESDTrainConfig(prompts=("a zebra",), method="esd-x", iterations=2, ddim_steps=2)
    with pytest.raises(ValueError, match="unreadable"):
        train_esd(tiny_sd1, out, cfg, progress=False)
    assert not (tmp_path / "PWNED").exists()


# 7 -------------------------------------------------------------------------------------------
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


def test_generate_never_overwrites_a_png_without_sidecar(tiny_sd1, tmp_path):
    out = safediff.generate("a red circle", model=tiny_sd1, num_inference_steps=1, progress=False)
    name = f"p0000_s0_i0_{out.stack_hash[:8]}.png"
    (tmp_path / name).write_bytes(b"not ours")
    safediff.generate("a red circle", model=tiny_sd1, num_inference_steps=1, progress=False, out_dir=tmp_path)
    assert (tmp_path / name).read_bytes() == b"not ours"
    assert len(list(tmp_path.glob("*.png"))) == 2


# 10 (pipeline level) -------------------------------------------------------------------------
def test_a_stack_whose_second_edit_fails_leaves_the_model_unedited(testbed, tmp_path):
    from safetensors.torch import save_file

    bad = tmp_path / "bad.safetensors"
    save_file({"conv_in.weight": torch.zeros(1, 2, 3)}, str(bad))  # wrong shape
    before = {k: v.clone() for k, v in testbed.unet.state_dict().items()}
    with pytest.warns(UserWarning, match="provenance"), pytest.raises(ValueError, match="shape"):
        safediff.build(testbed, f'uce(preset=testbed-striped)+delta(path="{bad}")')
    assert all(torch.equal(before[k], v) for k, v in testbed.unet.state_dict().items())
    assert testbed.edited_hash is None


# 11 ------------------------------------------------------------------------------------------
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


# 12 ------------------------------------------------------------------------------------------
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
