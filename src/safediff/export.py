"""``safediff export``: a defense stack as files other tools load (issue 21, part 3).

* ``diffusers`` -- the stack's weight edits (ESD, UCE, RECE, DUO, Dark Miner, any ``delta``)
  applied and saved as a full diffusers folder: ``StableDiffusionPipeline.from_pretrained(dir)``
  then generates what the stack generates (tested to 0 grey levels).
* ``single-file`` -- the same weights as one ``.safetensors`` checkpoint in the original Stability
  (LDM / SGM) key layout that AUTOMATIC1111 and ComfyUI load, for SD 1.x (and the testbed, which has
  its layout), SD 2.x and SDXL (the families with the ``single_file`` capability); SD3 and FLUX are refused (export them
  with ``diffusers``). Every family: UNet under ``model.diffusion_model.*`` (SDXL's added
  size/pooled-text embedding as ``label_emb.0.0`` / ``label_emb.0.2``), VAE under
  ``first_stage_model.*``. The text encoders:

  - SD 1.x: CLIP ViT-L in the HF layout, ``cond_stage_model.transformer.text_model.*``;
  - SD 2.x: OpenCLIP ViT-H in the open_clip layout, ``cond_stage_model.model.*``
    (``token_embedding``, ``positional_embedding``, ``transformer.resblocks.N.*`` with q, k, v
    stacked in ``attn.in_proj_*``, ``ln_final``). diffusers' SD 2.x text encoder holds only the
    layers SD 2.x uses (23 of open_clip's 24: its output is the penultimate layer, then
    ``ln_final``), and exactly those are written: no ``resblocks.23``, no ``text_projection``
    (SD 2.x's UNet never sees the pooled/projected text). The published SD 2.x checkpoints carry
    both; diffusers' importer drops them, and AUTOMATIC1111 and ComfyUI load the text encoder
    non-strictly and take the penultimate layer, so the missing last block is never used;
  - SDXL: CLIP ViT-L in the HF layout, ``conditioner.embedders.0.transformer.text_model.*``, and
    OpenCLIP bigG in the open_clip layout, ``conditioner.embedders.1.model.*``, all its layers and
    its ``text_projection`` (the pooled embedding SDXL's UNet takes), stored as open_clip stores it
    (``x @ P``, width x projection): the transpose of HF's ``text_projection.weight``.

  Tested per family by converting it back with diffusers' own importers (every tensor equal) and
  loading it with ``from_single_file`` (the stack's images, 0 grey levels).
* ``lora`` -- DUO's LoRA adapter file (``pipe.load_lora_weights``), the one edit trained as a LoRA.
* ``stack`` -- the stack file (YAML) of a stack without weight edits; guidance, embedding and filter
  defenses are not weights and travel as this file. A mixed stack exported as weights writes the
  rest of the stack beside them.

The key mapping is written from the layouts' block structure (``layers_per_block + 1`` LDM blocks
per resolution; the open_clip text tower's blocks), not copied from a conversion script.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .artifacts import read_artifact
from .defenses.base import check_config_for_model
from .families import get_family
from .fileio import atomic_copy, atomic_folder, atomic_path, atomic_write_json, atomic_write_text, refuse_existing
from .pipeline import SafePipeline
from .stack import DefenseStack

FORMATS = ("diffusers", "single-file", "lora", "stack")


# ---------------------------------------------------------------------------------------------
# diffusers -> original Stable Diffusion (LDM) keys
# ---------------------------------------------------------------------------------------------

_RESNET = (("norm1.", "in_layers.0."), ("conv1.", "in_layers.2."), ("time_emb_proj.", "emb_layers.1."),
           ("norm2.", "out_layers.0."), ("conv2.", "out_layers.3."), ("conv_shortcut.", "skip_connection."))


def _resnet(rest: str) -> str:
    for d, ldm in _RESNET:
        if rest.startswith(d):
            return ldm + rest[len(d):]
    raise KeyError(rest)


def unet_key_to_ldm(key: str, layers_per_block: int, up_has_attention: list[bool]) -> str:
    """One diffusers UNet2DConditionModel key -> its LDM ``model.diffusion_model`` key."""
    per = layers_per_block + 1  # LDM: per resolution, layers_per_block blocks + a down/upsampler
    p = key.split(".")
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             # SDXL's added conditioning (size/crop numbers + pooled text) -> its label embedding
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    two = p[0] in ("time_embedding", "add_embedding")
    head = ".".join(p[:2]) if two else p[0]
    if head in fixed:
        return fixed[head] + "." + ".".join(p[2:] if two else p[1:])
    if p[0] == "down_blocks":
        i, kind, j, rest = int(p[1]), p[2], int(p[3]), ".".join(p[4:])
        if kind == "resnets":
            return f"input_blocks.{per * i + j + 1}.0.{_resnet(rest)}"
        if kind == "attentions":
            return f"input_blocks.{per * i + j + 1}.1.{rest}"
        if kind == "downsamplers":  # downsamplers.0.conv.*
            return f"input_blocks.{per * (i + 1)}.0.op.{rest.split('.', 1)[1]}"
    if p[0] == "mid_block":
        kind, j, rest = p[1], int(p[2]), ".".join(p[3:])
        if kind == "resnets":
            return f"middle_block.{2 * j}.{_resnet(rest)}"
        if kind == "attentions":
            return f"middle_block.1.{rest}"
    if p[0] == "up_blocks":
        i, kind, j, rest = int(p[1]), p[2], int(p[3]), ".".join(p[4:])
        if kind == "resnets":
            return f"output_blocks.{per * i + j}.0.{_resnet(rest)}"
        if kind == "attentions":
            return f"output_blocks.{per * i + j}.1.{rest}"
        if kind == "upsamplers":  # after the block's last resnet (and attention, if it has one)
            return f"output_blocks.{per * i + per - 1}.{2 if up_has_attention[i] else 1}.{rest}"
    raise KeyError(f"No LDM key for UNet parameter {key!r}: not an SD 1.x / 2.x / SDXL-layout UNet.")


def _vae_resnet(rest: str) -> str:
    return rest.replace("conv_shortcut.", "nin_shortcut.")


def vae_key_to_ldm(key: str, num_blocks: int) -> str:
    """One diffusers AutoencoderKL key -> its LDM ``first_stage_model`` key."""
    p = key.split(".")
    if p[0] in ("quant_conv", "post_quant_conv"):
        return key
    side, rest = p[0], p[1:]
    if rest[0] in ("conv_in", "conv_out"):
        return key
    if rest[0] == "conv_norm_out":
        return f"{side}.norm_out.{'.'.join(rest[1:])}"
    if rest[0] == "mid_block":
        kind, j, tail = rest[1], int(rest[2]), ".".join(rest[3:])
        if kind == "resnets":
            return f"{side}.mid.block_{j + 1}.{_vae_resnet(tail)}"
        attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}
        name, leaf = tail.split(".", 1)
        if name == "to_out":  # to_out.0.weight
            leaf = leaf.split(".", 1)[1]
        return f"{side}.mid.attn_1.{attn[name]}.{leaf}"
    if rest[0] in ("down_blocks", "up_blocks"):
        i, kind, tail = int(rest[1]), rest[2], ".".join(rest[3:])
        level = i if side == "encoder" else num_blocks - 1 - i  # LDM numbers the decoder's levels bottom-up
        group = "down" if side == "encoder" else "up"
        if kind == "resnets":
            j, leaf = tail.split(".", 1)
            return f"{side}.{group}.{level}.block.{j}.{_vae_resnet(leaf)}"
        if kind in ("downsamplers", "upsamplers"):
            return f"{side}.{group}.{level}.{'downsample' if kind == 'downsamplers' else 'upsample'}.{tail.split('.', 1)[1]}"
    raise KeyError(f"No LDM key for VAE parameter {key!r}.")


def hf_clip_state_dict(text_encoder) -> dict[str, torch.Tensor]:
    """An HF CLIP text encoder's weights under ``text_model.*``, as SD checkpoints hold them
    (transformers 5 saves ``CLIPTextModel`` without the ``text_model.`` prefix)."""
    return {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in text_encoder.state_dict().items()}


_OPEN_CLIP_BLOCK = (("layer_norm1.", "ln_1."), ("layer_norm2.", "ln_2."), ("mlp.fc1.", "mlp.c_fc."),
                    ("mlp.fc2.", "mlp.c_proj."), ("self_attn.out_proj.", "attn.out_proj."))


def open_clip_state_dict(text_encoder) -> dict[str, torch.Tensor]:
    """An HF CLIP text encoder (``CLIPTextModel`` or ``...WithProjection``) in open_clip's text-tower
    layout: ``token_embedding.weight``, ``positional_embedding``, ``transformer.resblocks.N.*``
    (``attn.in_proj_weight`` / ``_bias`` = q, k, v stacked in that order), ``ln_final.*`` and, if
    the model has one, ``text_projection`` (open_clip computes ``x @ P``: HF's weight transposed)."""
    sd = {k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()}
    out = {"token_embedding.weight": sd.pop("embeddings.token_embedding.weight"),
           "positional_embedding": sd.pop("embeddings.position_embedding.weight"),
           "ln_final.weight": sd.pop("final_layer_norm.weight"), "ln_final.bias": sd.pop("final_layer_norm.bias")}
    if "text_projection.weight" in sd:
        out["text_projection"] = sd.pop("text_projection.weight").T
    for i in range(text_encoder.config.num_hidden_layers):
        hf, oc = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for t in ("weight", "bias"):
            out[f"{oc}attn.in_proj_{t}"] = torch.cat([sd.pop(f"{hf}self_attn.{x}_proj.{t}") for x in "qkv"])
            for a, b in _OPEN_CLIP_BLOCK:
                out[oc + b + t] = sd.pop(hf + a + t)
    if sd:
        raise KeyError(f"No open_clip key for text-encoder parameters {sorted(sd)}.")
    return out


def _check_single_file_family(family: str) -> None:
    if "single_file" not in get_family(family).capabilities:
        raise ValueError(f"Single-file export writes the SD 1.x, SD 2.x and SDXL checkpoint layouts; a {family} "
                         "model is exported as a diffusers folder (`--format diffusers`).")


def to_ldm_state_dict(model) -> dict[str, torch.Tensor]:
    """The model's current weights (edits applied) in the original checkpoint layout of its family
    (SD 1.x, SD 2.x or SDXL; see the module docstring)."""
    _check_single_file_family(model.family)
    unet = model.unet
    lpb = unet.config.layers_per_block
    if not isinstance(lpb, int):
        raise ValueError("Single-file export needs one `layers_per_block` for every resolution (the LDM layout).")
    up_attn = [hasattr(b, "attentions") for b in unet.up_blocks]
    out: dict[str, torch.Tensor] = {}
    for k, v in unet.state_dict().items():
        out["model.diffusion_model." + unet_key_to_ldm(k, lpb, up_attn)] = v
    n = len(model.vae.config.block_out_channels)
    for k, v in model.vae.state_dict().items():
        ldm = vae_key_to_ldm(k, n)
        if ".mid.attn_1." in ldm and ldm.endswith(".weight") and v.dim() == 2:
            v = v[:, :, None, None]  # LDM's VAE attention uses 1x1 convolutions
        out["first_stage_model." + ldm] = v
    layouts = {"hf_clip": hf_clip_state_dict, "open_clip": open_clip_state_dict}
    text = {prefix: layouts[layout](getattr(model, field))  # the family's text encoders in their LDM layouts
            for prefix, (field, layout) in model.adapter.single_file_text.items()}
    for prefix, part in text.items():
        out.update({prefix + k: v for k, v in part.items()})
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}


# ---------------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------------


def runtime_stack_path(out: str | Path, fmt: str) -> Path:
    """Where a mixed stack's non-weight defenses are written beside an export in ``fmt``."""
    out = Path(out)
    if fmt == "single-file":
        return out.with_name(out.name.split(".")[0] + "-runtime-stack.json")
    return out / "safediff-runtime-stack.json"


def check_targets(stack, out: str | Path, *, fmt: str, overwrite: bool = False) -> list[Path]:
    """Refuse, before any work, what ``export`` would refuse: an unknown format, an ``out`` of the wrong
    kind (a file where a folder is written, or the reverse, even with ``overwrite``), an existing ``out``
    or runtime-stack file without ``overwrite``, or a folder holding files safediff did not write.
    Returns the paths the export will write."""
    if fmt not in FORMATS:
        raise ValueError(f"Unknown export format {fmt!r}; choose one of {list(FORMATS)}.")
    stack = stack if isinstance(stack, DefenseStack) else DefenseStack.parse(stack)
    active = stack.active()
    edits = active.by_stage("weight_edit")
    out = Path(out)
    if fmt == "stack" and out.suffix not in (".json", ".yaml", ".yml"):
        raise ValueError(f"A stack file ends in .json or .yaml (got {out.name}); `--defense {out}` loads it back.")
    refuse_existing(out, overwrite, kind="folder" if fmt == "diffusers" else "file")
    targets = [out]
    if fmt == "single-file" and edits and len(edits) < len(active.defenses):
        side = runtime_stack_path(out, fmt)
        refuse_existing(side, overwrite, kind="file")
        targets.append(side)
    return targets


def export(model, stack, out: str | Path, *, fmt: str = "diffusers", overwrite: bool = False,
           dtype: torch.dtype | None = None) -> list[Path]:
    """Write ``stack`` on ``model`` in format ``fmt`` (see the module docstring); returns the
    written paths. Refuses, before any work, a format the stack cannot take, an existing ``out`` (or
    runtime-stack file) without ``overwrite``, or a target of the wrong kind (:func:`check_targets`).
    Every file goes through :mod:`safediff.fileio`: written under a temporary name and renamed into
    place, so a kill leaves no partial export; ``overwrite`` replaces only what a safediff export wrote."""
    if fmt not in FORMATS:
        raise ValueError(f"Unknown export format {fmt!r}; choose one of {list(FORMATS)}.")
    if fmt == "single-file":
        _check_single_file_family(model.family)
    stack = stack if isinstance(stack, DefenseStack) else DefenseStack.parse(stack)
    active = stack.active()
    edits = active.by_stage("weight_edit")
    rest = [c for c in active.defenses if c not in edits]
    out = Path(out)
    if fmt == "stack":
        if edits:
            raise ValueError(f"The stack has weight edits ({', '.join(c.name for c in edits)}); export them with "
                             "`--format diffusers` or `single-file` (the rest of the stack is written beside them).")
    elif not edits:
        raise ValueError(f"Nothing to write as weights: {', '.join(c.name for c in rest) or 'the stack is empty'} "
                         "act at sampling time (guidance, embeddings, filters), and guidance is not a weight. Export "
                         "the stack file with `--format stack`.")
    elif fmt == "lora" and [c.name for c in edits] != ["duo"]:
        raise ValueError("Only DUO is trained as a LoRA adapter (its LoRA file is written beside its delta); export "
                         "other edits with `--format diffusers` or `single-file`.")
    check_targets(stack, out, fmt=fmt, overwrite=overwrite)

    for cfg in active.defenses:  # a written stack file spells every option: a testbed default would pass as given
        check_config_for_model(cfg, model)
    if fmt == "stack":
        data = {"defenses": stack.to_list()}
        if out.suffix == ".json":
            atomic_write_text(out, json.dumps(data, indent=2) + "\n", overwrite=overwrite)
        else:
            import yaml

            atomic_write_text(out, yaml.safe_dump(data, sort_keys=False), overwrite=overwrite)
        return [out]
    if fmt == "lora":
        path = Path(edits[0].path)
        _, record = read_artifact(path)
        lora = path.parent / record.get("lora_file", "")
        if not record.get("lora_file") or not lora.is_file():
            raise FileNotFoundError(f"{path} has no LoRA file beside it (it was trained with adapter='full'?); "
                                    "export it with `--format diffusers` instead.")
        atomic_copy(lora, out, overwrite=overwrite)
        return [out]
    written: list[Path] = []
    runtime = {"defenses": DefenseStack(tuple(rest)).to_list()} if rest else None
    with SafePipeline(model, DefenseStack(tuple(edits))):
        if fmt == "diffusers":
            with atomic_folder(out, overwrite=overwrite, written_by="safediff export") as tmp:
                pipe = model.to_diffusers()
                pipe.save_pretrained(tmp, safe_serialization=True)
                meta = dict(model.meta)
                if meta:  # the testbed marker: the exported folder is still detected as the testbed family
                    (tmp / "safediff.json").write_text(json.dumps(meta, indent=2))
                (tmp / "safediff-export.json").write_text(json.dumps(
                    {"base_model": model.source, "base_model_hash": model.content_hash,
                     "weight_edits": DefenseStack(tuple(edits)).to_string(),
                     "stack_hash": stack.hash(model.content_hash)}, indent=2))
                if runtime:
                    (tmp / runtime_stack_path(out, fmt).name).write_text(json.dumps(runtime, indent=2) + "\n")
            written.append(out)
            if runtime:
                written.append(runtime_stack_path(out, fmt))
        else:
            from safetensors.torch import save_file

            sd = to_ldm_state_dict(model)
            if dtype is not None:
                sd = {k: v.to(dtype) for k, v in sd.items()}
            with atomic_path(out, overwrite=overwrite) as tmp:
                save_file(sd, str(tmp), metadata={"safediff": json.dumps(
                    {"base_model_hash": model.content_hash, "weight_edits": DefenseStack(tuple(edits)).to_string()})})
            written.append(out)
            if runtime:
                written.append(atomic_write_json(runtime_stack_path(out, fmt), runtime, overwrite=overwrite))
    return written
