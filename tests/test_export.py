"""`safediff export` (issue 21, part 3): weight edits as a diffusers folder, an original-layout
single-file checkpoint (A1111 / ComfyUI; SD 1.x, SD 2.x, SDXL) and DUO's LoRA file; other stacks as
their stack file."""

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


def _ours(model, stack, gs=None):
    with SafePipeline(model, DefenseStack.parse(stack)) as pipe:
        out = pipe(PROMPTS, seed=0, num_inference_steps=4, guidance_scale=gs)
    return np.stack([np.asarray(im) for im in out.images]).astype(np.int16)


def _theirs(pipe, gs=7.5):
    pipe.set_progress_bar_config(disable=True)
    gens = [core.image_generator(i, 0) for i in range(len(PROMPTS))]
    img = pipe(PROMPTS, generator=gens, num_inference_steps=4, guidance_scale=gs, output_type="np").images
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


def _unet_vae_round_trip(sd, model):
    # diffusers' own LDM importers map every UNet / VAE tensor of the file back onto the model's
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )

    for back, module in ((convert_ldm_unet_checkpoint(sd, dict(model.unet.config)), model.unet),
                         (convert_ldm_vae_checkpoint(sd, dict(model.vae.config)), model.vae)):
        ref = module.state_dict()
        assert set(back) == set(ref)
        assert all(torch.equal(back[k].reshape(ref[k].shape), ref[k]) for k in ref)


def _same(back, text_encoder):
    ref = {k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()}
    back = {k.removeprefix("text_model."): v for k, v in back.items()}
    assert set(back) == set(ref)
    assert all(torch.equal(back[k], ref[k]) for k in ref)


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_single_file_checkpoint_of_sd2_and_sdxl_in_the_original_layout(family, tiny_dir, tmp_path):
    # SD 2.x: OpenCLIP-H as open_clip keys under cond_stage_model.model.; SDXL: CLIP-L (HF keys)
    # and OpenCLIP-bigG (open_clip keys, with its text_projection) under conditioner.embedders.
    # diffusers' importers give back every tensor, and from_single_file (offline, configs from the
    # tiny folder) generates what the stack generates. Tolerance: 0 grey levels (measured: 0).
    import diffusers
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_open_clip_checkpoint,
    )

    from safediff.testing import tiny_model

    model = tiny_model(family, cache_dir=tiny_dir)
    sd = to_ldm_state_dict(model)
    _unet_vae_round_trip(sd, model)
    if family == "sd2":
        assert model.unet.config.use_linear_projection  # linear proj_in / proj_out, kept 2-D as in SD 2.x files
        text = "cond_stage_model.model."
        assert {k for k in sd if k.startswith(text)} == {text + k for k in (
            "token_embedding.weight", "positional_embedding", "ln_final.weight", "ln_final.bias",
            *(f"transformer.resblocks.{i}.{n}.{t}" for i in range(2) for t in ("weight", "bias")
              for n in ("ln_1", "ln_2", "mlp.c_fc", "mlp.c_proj", "attn.out_proj")),
            *(f"transformer.resblocks.{i}.attn.in_proj_{t}" for i in range(2) for t in ("weight", "bias")))}
        _same(convert_open_clip_checkpoint(model.text_encoder, sd, prefix=text), model.text_encoder)
        cls, texts = diffusers.StableDiffusionPipeline, ("cond_stage_model.model.",)
    else:
        assert torch.equal(sd["model.diffusion_model.label_emb.0.2.weight"], model.unet.add_embedding.linear_2.weight)
        assert "model.diffusion_model.input_blocks.3.1.transformer_blocks.1.attn2.to_k.weight" in sd  # depth 2
        assert not any(k.startswith("model.diffusion_model.input_blocks.1.1.") for k in sd)  # no attention there
        assert torch.equal(sd["conditioner.embedders.1.model.text_projection"],
                           model.text_encoder_2.text_projection.weight.T)
        _same(convert_ldm_clip_checkpoint(sd), model.text_encoder)
        _same(convert_open_clip_checkpoint(model.text_encoder_2, sd, prefix="conditioner.embedders.1.model."),
              model.text_encoder_2)
        cls = diffusers.StableDiffusionXLPipeline
        texts = ("conditioner.embedders.0.transformer.text_model.", "conditioner.embedders.1.model.")
    assert all(k.startswith(("model.diffusion_model.", "first_stage_model.", *texts)) for k in sd)
    (path,) = export(model, UCE, tmp_path / "edited.safetensors", fmt="single-file")
    kw = {} if family == "sdxl" else {"safety_checker": None, "requires_safety_checker": False}
    pipe = cls.from_single_file(str(path), config=str(tiny_dir / f"{family}-0"), **kw)
    theirs = _theirs(pipe)
    assert np.abs(theirs - _ours(model, UCE, gs=7.5)).max() == 0  # measured: 0 grey levels
    assert np.abs(theirs - _ours(model, None, gs=7.5)).max() > 0


def test_open_clip_text_projection_is_stored_width_by_projection():
    # bigG's projection is square; a non-square one shows the convention: open_clip keeps P with
    # x @ P (width x projection), the transpose of HF's Linear weight, and diffusers' importer reads
    # the width from P's first axis to split the stacked q, k, v back
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from safediff.export import open_clip_state_dict

    torch.manual_seed(0)
    te = CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=50, hidden_size=12, intermediate_size=24,
                                                    num_hidden_layers=2, num_attention_heads=2, projection_dim=6,
                                                    max_position_embeddings=16)).eval()
    oc = open_clip_state_dict(te)
    assert oc["text_projection"].shape == (12, 6)
    assert oc["transformer.resblocks.0.attn.in_proj_weight"].shape == (36, 12)
    _same(convert_open_clip_checkpoint(te, {"m." + k: v for k, v in oc.items()}, prefix="m."), te)


def test_full_size_sdxl_keys_are_the_published_checkpoint_keys():
    # SDXL base's UNet and OpenCLIP-bigG (built on the meta device: no weights) have two resnets per
    # level, transformer depths 1/2/10 and 32 text blocks: spot-check keys of the published
    # sd_xl_base_1.0 file, that diffusers detects the layout as SDXL base, and that its importer
    # maps every UNet key back to its own name
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, infer_diffusers_model_type
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from safediff.export import open_clip_state_dict, unet_key_to_ldm
    from safediff.testing import full_size_sdxl_configs

    cfg = full_size_sdxl_configs()
    with torch.device("meta"):
        unet = UNet2DConditionModel(**cfg["unet"])
        big_g = CLIPTextModelWithProjection(CLIPTextConfig(**cfg["text_encoder_2"]))
    up_attn = [hasattr(b, "attentions") for b in unet.up_blocks]
    names = {unet_key_to_ldm(k, 2, up_attn): k for k in unet.state_dict()}
    for k in ("label_emb.0.0.weight", "label_emb.0.2.bias", "input_blocks.3.0.op.weight", "input_blocks.6.0.op.bias",
              "input_blocks.8.1.transformer_blocks.9.attn2.to_k.weight",
              "middle_block.1.transformer_blocks.9.ff.net.2.bias",
              "middle_block.2.out_layers.3.weight", "output_blocks.2.2.conv.weight", "output_blocks.5.2.conv.bias",
              "output_blocks.8.0.skip_connection.weight", "input_blocks.4.1.proj_in.weight", "out.2.weight"):
        assert k in names, k
    assert not any(k.startswith(("input_blocks.9.", "output_blocks.9.", "output_blocks.8.1", "input_blocks.1.1."))
                   for k in names)
    back = convert_ldm_unet_checkpoint({"model.diffusion_model." + k: v for k, v in names.items()}, dict(unet.config))
    assert back == {v: v for v in names.values()}
    oc = open_clip_state_dict(big_g)
    assert oc["text_projection"].shape == (1280, 1280) and "transformer.resblocks.31.mlp.c_proj.bias" in oc
    unet_sd = unet.state_dict()
    sd = {**{"model.diffusion_model." + k: unet_sd[v] for k, v in names.items()},
          **{"conditioner.embedders.1.model." + k: v for k, v in oc.items()}}
    assert infer_diffusers_model_type(sd) == "xl_base"


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
    if family != "sdxl":  # no original single-file layout written for SD3 / FLUX: refused before any work
        with pytest.raises(ValueError, match="--format diffusers"):
            export(model, stack, tmp_path / "x.safetensors", fmt="single-file")
        assert not (tmp_path / "x.safetensors").exists()
    (out,) = export(model, stack, tmp_path / "edited")
    cls = {"sdxl": "StableDiffusionXLPipeline", "sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}[family]
    assert isinstance(getattr(diffusers, cls).from_pretrained(out), getattr(diffusers, cls))
    exported = load_model(out)
    assert exported.family == family and exported.content_hash != model.content_hash

    def image(m, s):
        with SafePipeline(m, DefenseStack.parse(s)) as pipe:
            return np.asarray(pipe(["a zebra"], num_inference_steps=3, guidance_scale=gs).images[0]).astype(int)

    assert np.abs(image(exported, None) - image(model, stack)).max() == 0  # measured: 0 grey levels
