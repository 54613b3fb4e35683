"""Single-file checkpoints (``.safetensors``, ``.ckpt``): the family from the keys, the configs
from a folder the user names or from the ones safediff ships, the weights through diffusers'
``from_single_file``.

* The family is read from the state dict's keys: SDXL's second text encoder lives under
  ``conditioner.embedders.1.``, SD 2.x's OpenCLIP text encoder under ``cond_stage_model.model.``,
  SD 1.x's CLIP under ``cond_stage_model.transformer.`` (the testbed has SD 1.x's layout). What the
  keys cannot say -- SD 2.x's prediction type (v for 2.0-v / 2.1, epsilon for 2.x-base), the image
  size -- comes from the config folder, or ``prediction_type``.
* Configs: ``config`` (a diffusers folder: its ``model_index.json``, component configs and
  tokenizers; no weights needed), else the shipped configs of the published architectures under
  ``safediff/configs/`` (SD 1.5, SD 2.1 768-v, SDXL base 1.0). CLIP's tokenizer files are not
  shipped: they are taken from the Hugging Face cache when there, otherwise the error says which
  files are missing and how to get them.
* ``.ckpt`` files are read by diffusers with ``torch.load(weights_only=True)``: tensors only, no
  code runs.
* The content hash of a single file is the sha256 of its bytes (its name does not count).

Loading an export in plain diffusers, offline::

    StableDiffusionPipeline.from_single_file("uce.safetensors", config="path/to/base-model-folder")
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
#: the configs shipped for the published architectures, by family
SHIPPED_CONFIGS_DIR = Path(__file__).parent / "configs"


def _single_file_families() -> dict:
    """The families whose own single-file key layout safediff reads (each adapter's ``single_file_text``)."""
    from .families import families

    return {n: a for n, a in families().items() if a.single_file_text and a.layout == n}


#: the configs shipped for the published architectures, by family (the adapters' ``shipped_config``)
SHIPPED_CONFIGS = {n: a.shipped_config for n, a in _single_file_families().items()}
PREDICTION_TYPES = ("epsilon", "v_prediction")


class CheckpointPath(str):
    """A checkpoint file's path carrying its loading options (``config``, ``prediction_type``), as
    the command line passes ``--model FILE --model-config DIR``: every command hands its ``--model``
    to :func:`safediff.load_model`, which reads them, so the file is loaded only when a command
    needs it (after the command's own checks)."""

    config: str | None
    prediction_type: str | None

    def __new__(cls, path: str | os.PathLike, config: str | os.PathLike | None = None,
                prediction_type: str | None = None) -> "CheckpointPath":
        obj = super().__new__(cls, os.fspath(path))
        obj.config = os.fspath(config) if config is not None else None
        obj.prediction_type = prediction_type
        return obj


def is_single_file(model) -> bool:
    """Whether ``model`` names a single checkpoint file (by its suffix)."""
    return isinstance(model, (str, os.PathLike)) and Path(model).suffix in SINGLE_FILE_SUFFIXES


def checkpoint_keys(path: str | os.PathLike) -> list[str]:
    """The state dict's keys (a ``.safetensors`` header is read without the tensors)."""
    from .models import ModelError

    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                return list(f.keys())
        sd = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is a ModelError naming it
        raise ModelError(f"Could not read the checkpoint {path} ({type(e).__name__}: {e}); is it a complete "
                         ".safetensors / .ckpt file?") from None
    while isinstance(sd, dict) and "state_dict" in sd:
        sd = sd["state_dict"]
    return list(sd) if isinstance(sd, dict) else []


def family_from_keys(keys: list[str], path: str | os.PathLike = "the checkpoint") -> str:
    """``sd1``, ``sd2`` or ``sdxl`` from original-layout (LDM / SGM) checkpoint keys.

    Raises:
        ModelError: keys of no supported layout (a diffusers-layout or SD3 / FLUX file, a LoRA, a VAE).
    """
    from .models import ModelError

    has = lambda prefix: any(k.startswith(prefix) for k in keys)  # noqa: E731
    if not has("model.diffusion_model."):
        hint = (" It looks like a LoRA or a delta file: apply it with --defense." if has("lora") or has("delta")
                else " An SD3 / FLUX single file is not supported: give its diffusers folder.")
        raise ModelError(f"{path} is not an SD 1.x / 2.x / SDXL checkpoint (no `model.diffusion_model.*` keys).{hint}")
    if has("conditioner.embedders.1.") and not has("conditioner.embedders.0."):  # SGM keys: a layout, not a family
        raise ModelError(f"{path} is an SDXL refiner (no first text encoder); safediff runs the SDXL base model.")
    for name, adapter in _single_file_families().items():  # the family whose text-encoder prefixes are all there
        if all(has(prefix) for prefix in adapter.single_file_text):
            return name
    raise ModelError(f"{path} holds a UNet but no text encoder (no `cond_stage_model.*` or `conditioner.*` keys); "
                     "safediff needs a full checkpoint.")


def _config_family(config: Path) -> str:
    from .models import ModelError, _read_json

    index = config / "model_index.json"
    if not index.is_file():
        raise ModelError(f"--model-config {config} has no model_index.json: give a diffusers pipeline folder (its "
                         "configs and tokenizer are enough, the weights are not needed).")
    from .families import detect

    marker, unet = config / "safediff.json", config / "unet" / "config.json"
    return detect(_read_json(index), _read_json(unet) if unet.is_file() else {},
                  _read_json(marker) if marker.is_file() else {}).name


_TOKENIZER_FILES = ("vocab.json", "merges.txt")


def _has_tokenizer_files(folder: Path) -> bool:
    """A CLIP tokenizer's vocabulary: ``vocab.json`` + ``merges.txt`` (transformers 4) or ``tokenizer.json`` (5)."""
    return (folder / "tokenizer.json").is_file() or all((folder / f).is_file() for f in _TOKENIZER_FILES)


def _cached_tokenizer(repo: str, subfolder: str) -> Path | None:
    """The folder of a published tokenizer in the Hugging Face cache (no download), or None."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = [try_to_load_from_cache(repo, f"{subfolder}/{f}") for f in _TOKENIZER_FILES]
    except Exception:  # noqa: BLE001 - no cache: missing
        return None
    return Path(found[0]).parent if all(isinstance(f, str) for f in found) else None


def _tokenizers(family: str, config: Path, shipped: bool) -> dict:
    from transformers import CLIPTokenizer

    from .models import ModelError

    from .families import get_family

    names = tuple(get_family(family).tokenizers({"has_t5": False}))
    out, missing = {}, []
    for name in names:
        folder = config / name if _has_tokenizer_files(config / name) else None
        if folder is None and shipped:
            folder = _cached_tokenizer(get_family(family).published_repo, name)
        if folder is None:  # transformers would build an empty tokenizer without these files: refuse instead
            missing.append(name)
            continue
        out[name] = CLIPTokenizer.from_pretrained(str(folder))
    if missing:
        where = (f"the configs of {family} ship with safediff ({config}), CLIP's tokenizer files do not"
                 if shipped else f"{config} has no {' / '.join(missing)} folder")
        raise ModelError(
            f"Missing tokenizer: {where} (needed: {', '.join(f'{m}/vocab.json and {m}/merges.txt' for m in missing)}). "
            f"Pass --model-config DIR, a diffusers folder of the architecture with its tokenizer (weights not needed), "
            f"e.g. `huggingface-cli download {get_family(family).published_repo or 'REPO'} --include '*.json' '*.txt' "
            "--local-dir DIR`; or pass the original diffusers folder of the model the checkpoint was exported from.")
    return out


def load_single_file(path: str | os.PathLike, *, config: str | os.PathLike | None = None,
                     prediction_type: str | None = None, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """Load a ``.safetensors`` / ``.ckpt`` checkpoint in the original SD layout as a :class:`Model`.

    Args:
        path: the checkpoint file (SD 1.x, SD 2.x or SDXL base).
        config: a diffusers folder giving the configs and tokenizer(s) (default: the shipped configs
            of the detected family, tokenizers from the Hugging Face cache).
        prediction_type: ``epsilon`` or ``v_prediction``, overriding the configs' (SD 2.x: the keys
            cannot tell 2.x-base (epsilon) from 2.0-v / 2.1 (v)).

    Raises:
        ModelError: unreadable file, unsupported layout, a config of another family, missing tokenizer.
    """
    from .families import get_family
    from .models import Model, ModelError, _read_json, load_scheduler

    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelError(f"Checkpoint file {str(path)!r} does not exist.")
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise ModelError(f"prediction_type must be one of {list(PREDICTION_TYPES)}, got {prediction_type!r}.")
    family = family_from_keys(checkpoint_keys(path), path)
    shipped = config is None
    cfg = SHIPPED_CONFIGS_DIR / SHIPPED_CONFIGS[family] if shipped else Path(config).expanduser()
    cfg_family = _config_family(cfg)
    adapter = get_family(cfg_family)  # the configs' family (the testbed's configs fit an sd1-layout checkpoint)
    if adapter.layout != family:
        raise ModelError(f"{path} is an {family} checkpoint (from its keys) but --model-config {cfg} holds an "
                         f"{cfg_family} pipeline; give the configs of the checkpoint's architecture.")
    tokenizers = _tokenizers(family, cfg, shipped)
    scheduler = load_scheduler(cfg)
    if prediction_type is not None:
        scheduler = type(scheduler).from_config({**scheduler.config, "prediction_type": prediction_type})
    import diffusers

    cls, kw = getattr(diffusers, adapter.pipeline_class), adapter.no_safety_checker
    try:
        pipe = cls.from_single_file(str(path), config=str(cfg), local_files_only=True, torch_dtype=dtype,
                                    scheduler=scheduler, **tokenizers, **kw)
    except Exception as e:  # noqa: BLE001 - weights that do not fit the configs
        raise ModelError(f"Could not load {path} with the configs of {cfg} ({type(e).__name__}: {e}); if the "
                         "checkpoint is a fine-tune of another architecture, pass its diffusers folder with "
                         "--model-config DIR.") from None
    nets = {name: getattr(pipe, sub) for name, (_, sub) in adapter.loaders({"has_t5": False}).items()}
    for m in nets.values():
        m.to(device).eval().requires_grad_(False)
    marker = cfg / "safediff.json"
    meta = _read_json(marker) if marker.is_file() else {}
    gs, steps = adapter.default_guidance_scale, adapter.default_steps
    index = json.loads((cfg / "model_index.json").read_text())
    info = {"force_zeros_for_empty_prompt": bool(index.get("force_zeros_for_empty_prompt", True))}
    return Model(**nets, **tokenizers, scheduler=scheduler, family=adapter.name, source=str(path),
                 content_hash=single_file_hash(path), default_guidance_scale=float(meta.get("default_guidance_scale", gs)),
                 default_steps=int(meta.get("default_steps", steps)), meta=meta, **adapter.model_fields(info, meta))


_HASHES: dict[tuple, str] = {}


def single_file_hash(path: str | os.PathLike) -> str:
    """sha256 of the file's bytes (cached by path, size, inode and mtime: checkpoints are gigabytes)."""
    from .artifacts import file_sha256

    st = Path(path).stat()
    key = (str(Path(path).resolve()), st.st_size, st.st_ino, st.st_mtime_ns)
    if key not in _HASHES:
        _HASHES[key] = file_sha256(path)
    return _HASHES[key]
