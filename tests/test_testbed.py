"""The shipped testbed model, its training script, the demo and the CLI."""

import json

import numpy as np
import pytest
import torch

import safediff
from safediff.cli import main as cli
from safediff.models import TESTBED_PATH
from safediff.pipeline import SafePipeline
from safediff.stack import DefenseStack
from safediff.testbed import world
from safediff.testbed.suites import testbed_suite


def test_stock_diffusers_pipeline_loads_and_runs_the_shipped_model():
    from diffusers import StableDiffusionPipeline

    # regression: with no dtype argument a new user's pipeline failed ("mat1 and mat2 must have
    # the same dtype"): the text encoder's config said float16, which transformers 5 honours
    pipe = StableDiffusionPipeline.from_pretrained(str(TESTBED_PATH))
    pipe.set_progress_bar_config(disable=True)
    img = pipe("a red circle on white background", num_inference_steps=10, guidance_scale=4.0,
               generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    assert img.shape == (32, 32, 3)
    assert pipe.unet.dtype == torch.float32 and pipe.text_encoder.dtype == torch.float32  # stored fp16, used fp32
    d = world.detect((img * 255).round().astype(np.uint8))
    assert (d.colour, d.shape) == ("red", "circle")


def test_model_layer_knows_the_testbed(testbed):
    assert testbed.family == "safediff-testbed" and testbed.prediction_type == "v_prediction"
    assert 1.0 < testbed.default_guidance_scale < 7.5  # measured curve, recorded with the model
    assert testbed.meta["guidance_curve"] and testbed.default_size == 32


def _rate(model, stack, concept="striped", suite="explicit", n=32):
    recs = testbed_suite(concept, suite, n=n, seed=7)
    with SafePipeline(model, DefenseStack.parse(stack)) as pipe:
        out = pipe([r["prompt"] for r in recs], image_ids=[(r["seed"], 0) for r in recs], batch_size=32)
    return np.mean([concept in world.detect(np.asarray(r.image)).concepts for r in out.records])


def _stripe_fraction(model, stack, n=32):
    recs = testbed_suite("striped", "explicit", n=n, seed=7)
    with SafePipeline(model, DefenseStack.parse(stack)) as pipe:
        out = pipe([r["prompt"] for r in recs], image_ids=[(r["seed"], 0) for r in recs], batch_size=32)
    return np.mean([world.detect(np.asarray(r.image)).scores["striped"] for r in out.records])


def test_negative_prompt_lowers_the_implicit_rate(testbed):
    # testbed v2: triggers bring the concept only part of the time, so guidance has room (measured
    # on 200 prompts: 0.44 -> 0.005); on explicit prompts it lowers the stripes' strength
    before = _rate(testbed, None, suite="implicit")
    after = _rate(testbed, 'negative_prompt(text="striped")', suite="implicit")
    assert before >= 0.2 and after <= 0.5 * before
    assert _stripe_fraction(testbed, 'negative_prompt(text="striped")') < _stripe_fraction(testbed, None)


def test_the_readme_example_works_on_the_shipped_model(testbed):
    # the first example of README.md: an implicit prompt, with and without the negative prompt
    prompt = ["a zebra red circle on white background"] * 24
    with SafePipeline(testbed, DefenseStack()) as pipe:
        plain = pipe(prompt, seeds=list(range(24)), batch_size=24)
    with SafePipeline(testbed, DefenseStack.parse('negative_prompt(text="striped")')) as pipe:
        neg = pipe(prompt, seeds=list(range(24)), batch_size=24)

    def rate(out):
        return np.mean(["striped" in world.detect(np.asarray(r.image)).concepts for r in out.records])

    assert rate(plain) >= 0.25 and rate(neg) <= 0.5 * rate(plain)


def test_a_weight_edit_removes_the_concept_on_the_testbed(testbed):
    assert _rate(testbed, None) >= 0.8
    assert _rate(testbed, "uce(preset=testbed-striped)") <= 0.4


def test_benign_prompts_rarely_bring_a_concept(testbed):
    assert _rate(testbed, None, suite="benign") <= 0.1
    assert _rate(testbed, None, concept="caged", suite="near_benign") <= 0.15


def test_the_world_acceptance_is_recorded_with_the_model(testbed):
    acc = testbed.meta["acceptance"]
    assert acc["n"] >= 100 and acc["checks"] and set(acc) >= {"checks", "passed"}
    # what the shipped model misses is recorded, not hidden (docs/testbed.md)
    assert acc["passed"] == all(v["passed"] for v in acc["checks"].values())


def test_a_retrained_model_keeps_the_shipped_scale_unless_another_clearly_beats_it():
    # docs/testbed.md, "Decision on the misses": v3's curve (n = 200) had 2.0 at 0.930 and 4.0 at
    # 0.885, 1.6 SE apart: 4.0 stays; a gap beyond 2 SE moves the default; None takes the best
    from safediff.testbed.train import TrainConfig, choose_guidance_scale

    curve = [{"guidance_scale": 2.0, "all_three": 0.930}, {"guidance_scale": 4.0, "all_three": 0.885}]
    row, why = choose_guidance_scale(curve, 4.0, 200)
    assert row["guidance_scale"] == 4.0 and "does not beat" in why
    row, _ = choose_guidance_scale(curve, 4.0, 2000)  # the same gap is 5 SE at n = 2000
    assert row["guidance_scale"] == 2.0
    assert choose_guidance_scale(curve, None, 200)[0]["guidance_scale"] == 2.0
    with pytest.raises(ValueError, match="not one of `guidance_scales`"):
        TrainConfig(guidance_scales=(2.0,))  # the kept scale must be measured, checked before any training


def test_a_checkpoint_from_before_an_option_existed_still_resumes():
    # a run stopped in one version resumes in the next: an option the checkpoint does not record
    # counts as its default; a different value, or an option the recipe no longer has, does not match
    from safediff.testbed.train import TrainConfig, same_config

    cfg = TrainConfig(world_version=4, steps=9000)
    saved = cfg.to_dict()
    assert same_config(saved, cfg)
    older = {k: v for k, v in saved.items() if k != "min_snr_gamma"}  # written before the option existed
    assert same_config(older, cfg)
    assert not same_config(older, TrainConfig(world_version=4, steps=9000, min_snr_gamma=None))
    assert not same_config({**saved, "steps": 6000}, cfg)
    assert not same_config({**saved, "retired_option": 1}, cfg)


def test_denoiser_size_is_a_recipe_option_with_the_shipped_default():
    # the default builds the shipped model's denoiser; a wider / deeper one has more parameters;
    # a JSON list reads back as the same recipe (so a saved run resumes); a bad size is refused before training
    import json

    from safediff.testbed.train import TrainConfig, build_components, same_config

    class Tok:  # build_components reads only the text encoder's sizes from the tokenizer
        bos_token_id, eos_token_id, pad_token_id, model_max_length = 0, 1, 1, 16

        def __len__(self) -> int:
            return 8

    tok = Tok()
    count = lambda m: sum(p.numel() for p in m.parameters())
    default = build_components(tok, seed=0)["unet"]
    assert tuple(default.config.block_out_channels) == (64, 128, 128) and default.config.layers_per_block == 1
    wide = build_components(tok, seed=0, unet_channels=(96, 192, 192), unet_layers_per_block=2)["unet"]
    assert tuple(wide.config.block_out_channels) == (96, 192, 192) and wide.config.layers_per_block == 2
    assert count(wide) > 3 * count(default)
    cfg = TrainConfig(unet_channels=(96, 192, 192))
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    saved = TrainConfig().to_dict()
    older = {k: v for k, v in saved.items() if k not in ("unet_channels", "unet_layers_per_block")}
    assert same_config(older, TrainConfig()) and not same_config(older, cfg)
    for bad in ((64, 128), (64, 100, 128), (64, 128, 0), [64.0, 128, 128]):
        with pytest.raises(ValueError, match="unet_channels"):
            TrainConfig.from_dict({"unet_channels": bad})
    with pytest.raises(ValueError, match="unet_layers_per_block"):
        TrainConfig(unet_layers_per_block=0)


def test_loss_weighting_min_snr_or_plain_v():
    # min-SNR-5 on the v loss is min(SNR, 5) / (SNR + 1): SNR 0.25 -> 0.2, SNR 1 -> 0.5, SNR 9 -> 0.5;
    # None is the plain v loss (weight 1 at every step); a non-positive gamma is refused before training
    import torch

    from safediff.testbed.train import TrainConfig, loss_weights

    snr = torch.tensor([0.25, 1.0, 9.0])
    assert torch.allclose(loss_weights(snr, 5.0), torch.tensor([0.2, 0.5, 0.5]))
    assert torch.equal(loss_weights(snr, None), torch.ones(3))
    assert TrainConfig.from_dict({"min_snr_gamma": None}).min_snr_gamma is None
    for bad in (0, -1.0, True):
        with pytest.raises(ValueError, match="min_snr_gamma"):
            TrainConfig(min_snr_gamma=bad)


def test_training_script_cut_down(tmp_path):
    out = tmp_path / "tb"
    over = ["--set", "vae_steps=2", "--set", "steps=3", "--set", "warmup=1", "--set", "batch=4", "--set", "vae_batch=4",
            "--set", "curve_samples=2", "--set", "num_inference_steps=2", "--set", "guidance_scales=[2.0]",
            "--set", "checkpoint_every=2", "--set", "keep_guidance_scale=null"]
    assert cli(["testbed", "train", "--out", str(out), *over]) == 0
    m = safediff.load_model(out)
    assert m.family == "safediff-testbed" and m.default_guidance_scale == 2.0
    meta = json.loads((out / "safediff.json").read_text())
    assert meta["train_config"]["steps"] == 3 and meta["train_config"]["seed"] == 0
    # an output folder that already holds a model is refused, nothing is overwritten
    assert cli(["testbed", "train", "--out", str(out), *over]) == 2
    # resuming with another config is refused
    (tmp_path / "tb2.work").mkdir()
    import shutil

    shutil.copy(tmp_path / "tb.work" / "train_checkpoint.pt", tmp_path / "tb2.work" / "train_checkpoint.pt")
    with pytest.raises(ValueError, match="another training config"):
        from safediff.testbed.train import TrainConfig, train

        train(tmp_path / "tb2", TrainConfig(vae_steps=2, steps=5, warmup=1, batch=4, vae_batch=4), progress=False)


def test_demo_writes_grid_and_page(tmp_path, capsys):
    assert cli(["demo", "--out", str(tmp_path), "--seeds", "2"]) == 0
    assert (tmp_path / "grid.png").exists() and (tmp_path / "index.html").exists()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["concept_rate"]["defended"]["striped"] <= summary["concept_rate"]["undefended"]["striped"]


def test_cli_generate_and_errors(tmp_path, capsys):
    assert cli(["generate", "a red circle on white background", "--out", str(tmp_path), "--num-images", "2", "--steps", "5"]) == 0
    assert len(list(tmp_path.glob("*.png"))) == 2
    assert cli(["generate", "x", "--defense", "nosuch", "--out", str(tmp_path)]) == 2
    assert "Known defenses" in capsys.readouterr().err
    assert cli(["generate", " ", "--out", str(tmp_path)]) == 2
    assert cli(["generate", "x", "--model", str(tmp_path / "missing"), "--out", str(tmp_path)]) == 2
