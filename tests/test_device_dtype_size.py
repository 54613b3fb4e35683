"""Issue 34 items 1 and 5: device / dtype / memory options and image size, from the API to the CLI.

Everything runs on the CPU (tiny models, few steps); CUDA-only behaviour is checked as its
refusal where CUDA is absent. bf16 tolerance against fp32 on the tiny sd1 model (4 steps): at most
16 grey levels on any pixel and 2 on average (measured: 3 and 0.55).
"""

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

import safediff
from safediff.cli import main
from safediff.core import image_generator, initial_latents
from safediff.eval.benchmarks import load_benchmark
from safediff.eval.runner import RunError, RunSettings, run_eval
from safediff.models import ModelError, ensure_model, resolve_device, resolve_dtype
from safediff.testing import tiny_model

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where CUDA is absent")


@pytest.fixture(scope="module")
def tiny_bf16(tiny_dir):
    return tiny_model("sd1", cache_dir=tiny_dir, dtype="bf16")


# -- device and dtype names --------------------------------------------------------------------


def test_dtype_names_and_defaults_by_device():
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("auto", "cuda") == torch.float16  # the name only: no CUDA needed
    assert resolve_dtype("bf16", "cpu") == torch.bfloat16 and resolve_dtype("fp16", "cpu") == torch.float16
    with pytest.raises(ModelError, match="Unknown dtype 'fp8'.*fp32, fp16 or bf16"):
        resolve_dtype("fp8", "cpu")
    with pytest.raises(ModelError, match="Unknown device 'gpu0'"):
        resolve_device("gpu0")


@no_cuda
def test_auto_is_cpu_and_cuda_is_refused_without_cuda():
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ModelError, match="CUDA is not available.*--device cpu"):
        resolve_device("cuda")


def test_a_loaded_model_on_another_dtype_is_refused(tiny_sd1):
    assert ensure_model(tiny_sd1, device="cpu", dtype="fp32") is tiny_sd1
    with pytest.raises(ModelError, match="already loaded in fp32, not bf16"):
        ensure_model(tiny_sd1, dtype="bf16")


# -- precision ---------------------------------------------------------------------------------


def test_noise_is_the_same_in_every_dtype(tiny_sd1, tiny_bf16):
    """Noise is drawn in fp32 by CPU generators: the same latents whatever the model's dtype."""
    a = initial_latents(tiny_sd1, [image_generator(3, 0)], 16, 16, num_inference_steps=4)
    b = initial_latents(tiny_bf16, [image_generator(3, 0)], 16, 16, num_inference_steps=4)
    assert a.dtype == b.dtype == torch.float32
    assert torch.equal(a, b)


def test_bf16_generates_finite_images_close_to_fp32(tiny_sd1, tiny_bf16):
    assert tiny_bf16.dtype == torch.bfloat16 and tiny_bf16.unet.dtype == torch.bfloat16
    a = safediff.generate("a red circle", model=tiny_sd1, num_inference_steps=4, progress=False)
    b = safediff.generate("a red circle", model=tiny_bf16, num_inference_steps=4, progress=False)
    assert (a.dtype, b.dtype, b.device) == ("fp32", "bf16", "cpu")
    x, y = (np.asarray(o.images[0]).astype(int) for o in (a, b))
    assert x.std() > 5  # a real image, not a constant
    diff = np.abs(x - y)
    assert diff.max() <= 16 and diff.mean() <= 2, (diff.max(), diff.mean())


def test_training_refuses_a_half_precision_model(tiny_bf16, tmp_path):
    from safediff.unlearning import unlearn

    with pytest.raises(ModelError, match="fp32 master weights.*bf16"):
        unlearn("esd", tiny_bf16, tmp_path / "esd.safetensors", concept="zebra")
    assert not (tmp_path / "esd.safetensors").exists()


def test_memory_options_keep_the_images(tiny_sd1, tiny_dir):
    own = tiny_model("sd1", cache_dir=tiny_dir)  # its own copy: the options stay on it
    own.enable_memory_options(vae_tiling=True, attention_slicing=True)
    assert own.vae.use_tiling
    assert {type(p).__name__ for p in own.unet.attn_processors.values()} == {"SlicedAttnProcessor"}
    a = safediff.generate("a red circle", model=tiny_sd1, num_inference_steps=2, progress=False)
    b = safediff.generate("a red circle", model=own, num_inference_steps=2, progress=False)
    assert np.abs(np.asarray(a.images[0]).astype(int) - np.asarray(b.images[0]).astype(int)).max() <= 1
    with pytest.raises(ModelError, match="CPU offload is not supported"):
        safediff.generate("a red circle", model=tiny_sd1, cpu_offload=True)


# -- image size --------------------------------------------------------------------------------


def test_size_from_the_api_and_refused_sizes(tiny_sd1):
    out = safediff.generate("a red circle", model=tiny_sd1, num_inference_steps=2, height=24, width=16, progress=False)
    assert out.images[0].size == (16, 24) and (out.height, out.width) == (24, 16)
    with pytest.raises(ValueError, match="`height` must be a positive multiple of 2.*got 15"):
        safediff.generate("a red circle", model=tiny_sd1, height=15)
    with pytest.raises(ValueError, match="`width` must be a positive integer"):
        safediff.generate("a red circle", model=tiny_sd1, width=0)


def test_cli_device_dtype_and_size(tmp_path, capsys):
    out = tmp_path / "gen"
    assert main(["generate", "a red circle on white background", "--device", "cpu", "--dtype", "fp32", "--steps", "2",
                 "--height", "48", "--width", "32", "--out", str(out)]) == 0
    (png,) = out.glob("*.png")
    assert Image.open(png).size == (32, 48)
    meta = json.loads(png.with_suffix(".json").read_text())
    assert (meta["device"], meta["dtype"], meta["height"], meta["width"]) == ("cpu", "fp32", 48, 32)


@no_cuda
def test_cli_refuses_cuda_without_cuda_and_half_training(tmp_path, capsys):
    assert main(["generate", "a red circle", "--device", "cuda", "--out", str(tmp_path / "g")]) == 2
    assert "CUDA is not available" in capsys.readouterr().err
    assert not (tmp_path / "g").exists()
    assert main(["unlearn", "esd", "--dtype", "bf16", "--out", str(tmp_path / "e.safetensors")]) == 2
    assert "keeps fp32 weights" in capsys.readouterr().err
    assert main(["generate", "a red circle", "--cpu-offload", "--out", str(tmp_path / "g")]) == 2
    assert "CPU offload is not supported" in capsys.readouterr().err


def _i2p_csv(path, sizes):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "categories", "sd_seed", "sd_image_width", "sd_image_height"])
        for i, (wd, ht) in enumerate(sizes):
            w.writerow([f"a red circle on white background {i}", "sexual", i, wd, ht])
    return path


def _image_sizes(run_dir):
    return sorted(Image.open(p).size for p in (run_dir / "images").glob("*.png"))


def test_i2p_sizes_honoured_overridden_and_resume_refused(tiny_sd1, tmp_path):
    csv_path = _i2p_csv(tmp_path / "i2p.csv", [(24, 16), (16, 32)])
    records = load_benchmark(str(csv_path))
    assert [(r.width, r.height) for r in records] == [(24, 16), (16, 32)]
    settings = RunSettings(num_inference_steps=2)
    run = run_eval(records, tmp_path / "own", model=tiny_sd1, settings=settings, progress=False)
    assert _image_sizes(run) == [(16, 32), (24, 16)]  # (width, height) per prompt, as the CSV asked
    manifest = json.loads((run / "run.json").read_text())
    assert manifest["image_sizes"] == ["16x24", "32x16"] and manifest["dtype"] == "fp32" and manifest["device"] == "cpu"
    # the override
    over = RunSettings(num_inference_steps=2, height=8, width=12)
    run2 = run_eval(records, tmp_path / "over", model=tiny_sd1, settings=over, progress=False)
    assert _image_sizes(run2) == [(12, 8), (12, 8)]
    # resuming a run at another size is refused, naming the difference, and nothing is added
    with pytest.raises(RunError, match=r"another image size \(height None -> 8; width None -> 12"):
        run_eval(records, run, model=tiny_sd1, settings=over, progress=False)
    assert _image_sizes(run) == [(16, 32), (24, 16)]
    # a prompt's size the model cannot make is refused before any image, naming the prompt
    bad = load_benchmark(str(_i2p_csv(tmp_path / "bad.csv", [(24, 16), (17, 16)])))
    with pytest.raises(ValueError, match="prompt '1': `width` must be a positive multiple of 2"):
        run_eval(bad, tmp_path / "bad", model=tiny_sd1, settings=settings, progress=False)
    assert not (tmp_path / "bad").exists()


def test_cli_eval_sizes_from_the_csv_and_the_override(tmp_path, capsys):
    csv_path = _i2p_csv(tmp_path / "i2p.csv", [(48, 32)])
    run = tmp_path / "run"
    common = ["eval", "--benchmark", str(csv_path), "--steps", "2", "--device", "cpu", "--dtype", "fp32"]
    assert main(common + ["--out", str(run)]) == 0
    assert _image_sizes(run) == [(48, 32)]
    assert main(common + ["--height", "40", "--width", "24", "--out", str(tmp_path / "over")]) == 0
    assert _image_sizes(tmp_path / "over") == [(24, 40)]
    assert main(common + ["--ignore-prompt-size", "--out", str(tmp_path / "model")]) == 0
    assert _image_sizes(tmp_path / "model") == [(32, 32)]  # the testbed's own size
    capsys.readouterr()
    assert main(common + ["--height", "40", "--width", "24", "--out", str(run)]) == 2
    assert "another image size" in capsys.readouterr().err


def test_a_run_made_before_sizes_were_recorded_resumes(tiny_sd1, tmp_path):
    """run.json of earlier versions has no size settings, image sizes, device or dtype: it resumes
    (those runs used the model's default size, which is what the defaults give)."""
    csv_path = tmp_path / "p.csv"
    csv_path.write_text("prompt,sd_seed\na red circle,1\na blue square,2\n")
    records = load_benchmark(str(csv_path))
    settings = RunSettings(num_inference_steps=2)
    run = run_eval(records, tmp_path / "old", model=tiny_sd1, settings=settings, progress=False, max_images=1)
    manifest = json.loads((run / "run.json").read_text())
    for k in ("image_sizes", "device", "dtype"):
        manifest.pop(k)
    for k in ("height", "width", "respect_prompt_size"):
        manifest["settings"].pop(k)
    (run / "run.json").write_text(json.dumps(manifest))
    run_eval(records, run, model=tiny_sd1, settings=settings, progress=False)
    assert _image_sizes(run) == [(16, 16), (16, 16)]


def test_flux_sizes_are_multiples_of_twice_the_vae_factor(tiny_dir):
    flux = tiny_model("flux", cache_dir=tiny_dir)
    assert flux.size_multiple == 2 * flux.vae_scale_factor
    assert flux.check_size(2 * flux.size_multiple, flux.size_multiple) == (2 * flux.size_multiple, flux.size_multiple)
    with pytest.raises(ValueError, match=f"multiple of {flux.size_multiple} for this flux model .*x2 for latent packing"):
        flux.check_size(flux.size_multiple + flux.vae_scale_factor, None)


def test_sdxl_vae_stays_fp32_under_fp16(tiny_dir):
    """SDXL's VAE overflows in fp16 (force_upcast): it is kept in fp32, and the images match fp32's."""
    a = tiny_model("sdxl", cache_dir=tiny_dir)
    b = tiny_model("sdxl", cache_dir=tiny_dir, dtype="fp16")
    assert (b.dtype, b.vae.dtype) == (torch.float16, torch.float32)
    x, y = (np.asarray(safediff.generate("a red circle", model=m, num_inference_steps=2, progress=False).images[0])
            .astype(int) for m in (a, b))
    assert np.abs(x - y).max() <= 16 and np.isfinite(y).all()
