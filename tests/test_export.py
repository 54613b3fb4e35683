"""`safediff export` (issue 21, part 3): weight edits as a diffusers folder, an original-layout
single-file checkpoint (A1111 / ComfyUI) and DUO's LoRA file; other stacks as their stack file."""

import json

import numpy as np
import pytest
import torch

from safediff import core
from safediff.cli import main
from safediff.export import export, to_ldm_state_dict
from safediff.models import load_model
from safediff.pipeline import SafePipeline
from safediff.stack import DefenseStack

UCE = 'uce(erase=["zebra"], preserve=["red"])'
PROMPTS = ["a zebra on grass", "a red circle"]


def _ours(model, stack):
    with SafePipeline(model, DefenseStack.parse(stack)) as pipe:
        out = pipe(PROMPTS, seed=0, num_inference_steps=4)
    return np.stack([np.asarray(im) for im in out.images]).astype(np.int16)


def _theirs(pipe):
    pipe.set_progress_bar_config(disable=True)
    gens = [core.image_generator(i, 0) for i in range(len(PROMPTS))]
    img = pipe(PROMPTS, generator=gens, num_inference_steps=4, guidance_scale=7.5, output_type="np").images
    return (img * 255).round().astype(np.int16)


def test_diffusers_folder_loads_in_vanilla_diffusers_and_equals_the_stack(tiny_sd1, tmp_path):
    from diffusers import StableDiffusionPipeline

    before = {k: v.clone() for k, v in tiny_sd1.unet.state_dict().items()}
    (out,) = export(tiny_sd1, UCE, tmp_path / "edited")
    assert all(torch.equal(tiny_sd1.unet.state_dict()[k], v) for k, v in before.items())  # reverted exactly
    theirs = _theirs(StableDiffusionPipeline.from_pretrained(out, safety_checker=None, requires_safety_checker=False))
    assert np.abs(theirs - _ours(tiny_sd1, UCE)).max() == 0  # measured: 0 grey levels
    assert np.abs(theirs - _ours(tiny_sd1, None)).max() > 0
    assert json.loads((out / "safediff-export.json").read_text())["weight_edits"].startswith("uce(")
    with pytest.raises(FileExistsError, match="--overwrite"):
        export(tiny_sd1, UCE, out)


def test_single_file_checkpoint_in_the_original_layout(tiny_sd1, tiny_dir, tmp_path):
    # diffusers' own importer of original SD checkpoints maps every tensor back exactly, and
    # from_single_file (offline, configs from the tiny folder) generates what the stack generates
    from diffusers import StableDiffusionPipeline
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )

    sd = to_ldm_state_dict(tiny_sd1)
    assert all(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model."))
               for k in sd)
    for back, module in ((convert_ldm_unet_checkpoint(sd, dict(tiny_sd1.unet.config)), tiny_sd1.unet),
                         (convert_ldm_vae_checkpoint(sd, dict(tiny_sd1.vae.config)), tiny_sd1.vae)):
        ref = module.state_dict()
        assert set(back) == set(ref)
        assert all(torch.equal(back[k].reshape(ref[k].shape), ref[k]) for k in ref)
    te = {k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(sd).items()}
    assert set(te) == set(tiny_sd1.text_encoder.state_dict())
    (path,) = export(tiny_sd1, UCE, tmp_path / "edited.safetensors", fmt="single-file")
    pipe = StableDiffusionPipeline.from_single_file(str(path), config=str(tiny_dir / "sd1-0"), safety_checker=None,
                                                    requires_safety_checker=False)
    assert np.abs(_theirs(pipe) - _ours(tiny_sd1, UCE)).max() == 0  # measured: 0 grey levels


def test_exported_testbed_folder_is_still_the_testbed_family(testbed, tmp_path):
    (out,) = export(testbed, "uce(preset=testbed-striped)", tmp_path / "tb")
    m = load_model(out)
    assert m.is_testbed and m.content_hash != testbed.content_hash


def test_guidance_is_not_a_weight_and_travels_as_a_stack_file(tiny_sd1, tmp_path):
    with pytest.raises(ValueError, match="guidance is not a weight"):
        export(tiny_sd1, 'negative_prompt(text="zebra")+sld(preset=medium)', tmp_path / "x")
    assert not (tmp_path / "x").exists()
    stack = 'negative_prompt(text="zebra")+sld(preset=medium, concept="zebra")'
    (f,) = export(tiny_sd1, stack, tmp_path / "stack.json", fmt="stack")
    assert DefenseStack.parse(str(f)).hash(tiny_sd1.content_hash) == DefenseStack.parse(stack).hash(tiny_sd1.content_hash)
    with pytest.raises(ValueError, match="weight edits"):
        export(tiny_sd1, UCE, tmp_path / "s.json", fmt="stack")
    # a mixed stack: the weights, and the rest of the stack beside them
    _, side = export(tiny_sd1, f'{UCE}+negative_prompt(text="zebra")', tmp_path / "mixed")
    assert [d["name"] for d in json.loads(side.read_text())["defenses"]] == ["negative_prompt"]
    with pytest.raises(ValueError, match="LoRA"):
        export(tiny_sd1, UCE, tmp_path / "l.safetensors", fmt="lora")


def test_duo_lora_file_and_the_cli(tiny_sd1, tiny_dir, tmp_path, capsys):
    from safediff.unlearning.duo import DUOTrainConfig, train_duo

    duo = train_duo(tiny_sd1, tmp_path / "duo.safetensors",
                    DUOTrainConfig(concept="striped", num_pairs=8, steps=2, pairs_per_step=2, rank=2, alpha=2.0),
                    progress=False)
    out = tmp_path / "duo-lora.safetensors"
    assert main(["export", "--model", str(tiny_dir / "sd1-0"), "--defense", f'duo(path="{duo}")', "--format", "lora",
                 "--out", str(out)]) == 0
    assert out.read_bytes() == (tmp_path / "duo.lora.safetensors").read_bytes()  # DUO's own LoRA file
    # an existing --out is refused in one line, before the model is loaded
    assert main(["export", "--model", str(tiny_dir / "sd1-0"), "--defense", UCE, "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err


@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux"])
def test_diffusers_folder_export_on_newer_families_loads_in_their_pipeline(family, tiny_dir, tmp_path):
    # UCE's edit (cross-attention on SDXL, the context embedder on SD3/FLUX) written as a folder
    # that diffusers' own pipeline class for the family loads; the same images as the stack
    import diffusers

    from safediff.testing import tiny_model

    model = tiny_model(family, cache_dir=tiny_dir)
    stack, gs = 'uce(erase=["zebra"])', 4.0 if family == "flux" else None
    (out,) = export(model, stack, tmp_path / "edited")
    cls = {"sdxl": "StableDiffusionXLPipeline", "sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}[family]
    assert isinstance(getattr(diffusers, cls).from_pretrained(out), getattr(diffusers, cls))
    exported = load_model(out)
    assert exported.family == family and exported.content_hash != model.content_hash

    def image(m, s):
        with SafePipeline(m, DefenseStack.parse(s)) as pipe:
            return np.asarray(pipe(["a zebra"], num_inference_steps=3, guidance_scale=gs).images[0]).astype(int)

    assert np.abs(image(exported, None) - image(model, stack)).max() == 0  # measured: 0 grey levels
