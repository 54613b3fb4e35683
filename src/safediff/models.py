"""The model layer: load a diffusers text-to-image pipeline, detect its family, hash its content.

Supported families (``Model.family``):

* ``sd1`` -- Stable Diffusion v1.x layout (CLIP ViT-L text encoder, conv attention projections);
* ``sd2`` -- Stable Diffusion v2.x layout (OpenCLIP text encoder, linear attention projections),
  epsilon- or v-prediction (``Model.prediction_type``);
* ``sdxl`` -- Stable Diffusion XL base layout (two CLIP text encoders, the second with a
  projection for the pooled embedding; size/crop conditioning); the refiner (no first text
  encoder) is refused;
* ``safediff-testbed`` -- the project's own tiny model (``safediff.json`` marker in the folder).

The family is read from the architecture (component classes and ``use_linear_projection``), never
from the folder name, so the tiny random components of :mod:`safediff.testing` are detected as the
family they mimic. Anything else (SD3, FLUX, a folder that is not a diffusers model, a
missing or broken weight file) is refused with an error that names the problem.

Example:
    >>> import safediff
    >>> model = safediff.load_model()          # the shipped testbed  # doctest: +SKIP
    >>> model.family, model.prediction_type    # doctest: +SKIP
    ('safediff-testbed', 'v_prediction')
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

TESTBED_FAMILY = "safediff-testbed"
FAMILIES = ("sd1", "sd2", "sdxl", TESTBED_FAMILY)
#: The shipped testbed model, inside the package.
TESTBED_PATH = Path(__file__).parent / "testbed" / "model"

_REQUIRED = {
    "unet": "UNet2DConditionModel",
    "text_encoder": "CLIPTextModel",
    "vae": "AutoencoderKL",
    "tokenizer": "CLIPTokenizer",
}
_REQUIRED_SDXL = {**_REQUIRED, "text_encoder_2": "CLIPTextModelWithProjection", "tokenizer_2": "CLIPTokenizer"}


class ModelError(ValueError):
    """A model folder or hub id that safediff cannot use (the message says why and what to do)."""


@dataclass
class Model:
    """A loaded text-to-image model: diffusers components plus what safediff knows about them."""

    unet: Any
    text_encoder: Any
    vae: Any
    tokenizer: Any
    scheduler: Any
    family: str
    source: str
    content_hash: str
    default_guidance_scale: float = 7.5
    default_steps: int = 50
    meta: dict = field(default_factory=dict)
    #: stack hash of the weight edits currently applied in place (None: unedited); set by SafePipeline
    edited_hash: str | None = None
    #: SDXL's second text encoder (``CLIPTextModelWithProjection``) and its tokenizer; None otherwise
    text_encoder_2: Any = None
    tokenizer_2: Any = None
    #: SDXL: the unconditional branch is zeros when no negative prompt is given (diffusers'
    #: ``force_zeros_for_empty_prompt``, True for SDXL base)
    force_zeros_for_empty_prompt: bool = False

    @property
    def is_testbed(self) -> bool:
        """Whether this is the project's testbed model (its world's detectors and prompts apply)."""
        return self.family == TESTBED_FAMILY

    @property
    def has_pooled(self) -> bool:
        """Whether the UNet also takes a pooled text embedding and size conditioning (SDXL)."""
        return self.family == "sdxl"

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.prediction_type

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def default_size(self) -> int:
        return self.unet.config.sample_size * self.vae_scale_factor

    def to(self, device: str | torch.device) -> "Model":
        for m in (self.unet, self.text_encoder, self.vae, self.text_encoder_2):
            if m is not None:
                m.to(device)
        return self

    def components(self) -> dict:
        """The components as diffusers' pipeline class for the family takes them."""
        comps = {"unet": self.unet, "text_encoder": self.text_encoder, "vae": self.vae,
                 "tokenizer": self.tokenizer, "scheduler": self.scheduler}
        if self.family == "sdxl":
            comps.update(text_encoder_2=self.text_encoder_2, tokenizer_2=self.tokenizer_2)
        return comps

    def to_diffusers(self):
        """diffusers' own pipeline for the family sharing these components (no safety checker):
        ``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline``."""
        if self.family == "sdxl":
            from diffusers import StableDiffusionXLPipeline

            return StableDiffusionXLPipeline(**self.components(),
                                             force_zeros_for_empty_prompt=self.force_zeros_for_empty_prompt)
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(**self.components(), safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelError(f"{path} is not valid JSON ({e}); the model folder looks damaged.") from None


def _resolve(model: str | os.PathLike | None) -> Path:
    if model is None or str(model) == "testbed":
        if not (TESTBED_PATH / "model_index.json").exists():
            raise ModelError(
                f"The shipped testbed model is missing at {TESTBED_PATH}; reinstall safediff, or rebuild "
                "it with `safediff testbed train --out <dir>` and pass `--model <dir>`."
            )
        return TESTBED_PATH
    p = Path(model).expanduser()
    if p.exists():
        if not p.is_dir():
            raise ModelError(f"`model` {str(model)!r} is a file; give the folder of a diffusers pipeline (the one with model_index.json).")
        return p
    if str(model).startswith((".", "/", "~")) or os.sep in str(model) and str(model).count("/") > 1:
        raise ModelError(f"Model folder {str(model)!r} does not exist.")
    # a hub id: resolve to the local snapshot (works offline when it is cached)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(model), allow_patterns=["*.json", "*.txt", "*.safetensors"]))
    except Exception as e:  # network, auth, not found
        raise ModelError(
            f"Could not find {str(model)!r} as a local folder nor fetch it from the Hugging Face Hub ({type(e).__name__}: {e}). "
            "Pass the path of a downloaded diffusers pipeline."
        ) from None


def detect_family(path: str | os.PathLike) -> tuple[str, dict]:
    """Read a diffusers folder's configs (no weights) and return ``(family, info)``.

    Raises:
        ModelError: not a diffusers text-to-image folder, or an unsupported family.
    """
    path = Path(path)
    index_path = path / "model_index.json"
    if not index_path.exists():
        raise ModelError(
            f"{path} is not a diffusers model folder: it has no model_index.json. Save a pipeline with "
            "`pipe.save_pretrained(dir)`, or pass a hub id such as 'CompVis/stable-diffusion-v1-4'."
        )
    index = _read_json(index_path)
    if "transformer" in index:
        raise ModelError(
            f"{path} holds a transformer-based (SD3/FLUX-style) pipeline ({index.get('_class_name')}); safediff "
            f"supports the families {list(FAMILIES)} so far."
        )
    sdxl = "text_encoder_2" in index
    if sdxl and not (index.get("text_encoder") or [None, None])[1]:
        raise ModelError(f"{path} holds an SDXL refiner ({index.get('_class_name')}: no first text encoder); safediff "
                         "runs the SDXL base model (text-to-image), not the refiner.")
    for comp, cls in (_REQUIRED_SDXL if sdxl else _REQUIRED).items():
        entry = index.get(comp)
        if not entry or entry[1] is None:
            raise ModelError(f"{path}/model_index.json has no `{comp}` component; a {cls} is required.")
        if entry[1] != cls and not (comp == "tokenizer" and entry[1] == "CLIPTokenizerFast"):
            raise ModelError(
                f"Unsupported model family: `{comp}` of {path} is a {entry[1]}, expected {cls}. "
                f"Supported families: {list(FAMILIES)}."
            )
    for comp in ("unet", "text_encoder", "vae", "scheduler", *(("text_encoder_2",) if sdxl else ())):
        if not (path / comp / ("scheduler_config.json" if comp == "scheduler" else "config.json")).exists():
            raise ModelError(f"{path}/{comp} has no config file; the model folder is incomplete.")
        if comp != "scheduler" and not any((path / comp).glob("*.safetensors")) and not any((path / comp).glob("*.bin")):
            raise ModelError(f"Missing weight file: {path}/{comp} holds no .safetensors (or .bin) weights.")
    unet_cfg = _read_json(path / "unet" / "config.json")
    sched_cfg = _read_json(path / "scheduler" / "scheduler_config.json")
    marker = path / "safediff.json"
    meta = _read_json(marker) if marker.exists() else {}
    if meta.get("family") == TESTBED_FAMILY:
        family = TESTBED_FAMILY
    elif sdxl:
        family = "sdxl"
    elif unet_cfg.get("use_linear_projection"):
        family = "sd2"
    else:
        family = "sd1"
    info = {"prediction_type": sched_cfg.get("prediction_type", "epsilon"), "meta": meta,
            "cross_attention_dim": unet_cfg.get("cross_attention_dim"),
            "force_zeros_for_empty_prompt": bool(index.get("force_zeros_for_empty_prompt", sdxl))}
    return family, info


_HASH_CACHE: dict[tuple, str] = {}
_CACHE_MIN_BYTES = 64 << 20


def hash_files(paths: list[Path], root: Path | None = None) -> str:
    """sha256 over the given files' relative names and bytes.

    Only large sets (model weights) are cached, by path, size, inode and mtime: a small artifact
    rewritten within one file-system timestamp tick would otherwise keep its old hash (a retrained
    file at the same path must never reuse old results), and hashing it again is cheap.
    """
    stats = [(p, p.stat()) for p in sorted(paths)]
    total = sum(st.st_size for _, st in stats)
    key = tuple((str(p), st.st_size, st.st_ino, st.st_mtime_ns) for p, st in stats)
    if total >= _CACHE_MIN_BYTES and key in _HASH_CACHE:
        return _HASH_CACHE[key]
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(str(p.relative_to(root) if root else p.name).encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    digest = h.hexdigest()
    if total >= _CACHE_MIN_BYTES:
        _HASH_CACHE[key] = digest
    return digest


def model_content_hash(path: str | os.PathLike) -> str:
    """Content hash of a diffusers folder: its weights and its configs, not its path."""
    path = Path(path)
    files = [p for p in path.rglob("*") if p.is_file() and p.suffix in {".safetensors", ".bin", ".json", ".txt"}
             and p.name != "safediff.json" and ".partial" not in str(p)]
    return hash_files(files, root=path)


def load_model(model: str | os.PathLike | None = None, *, device: str = "cpu",
               dtype: torch.dtype = torch.float32) -> Model:
    """Load a Stable Diffusion v1.x / v2.x / XL pipeline or the testbed from a folder or hub id.

    Args:
        model: a local diffusers folder, a hub id, or ``None`` / ``"testbed"`` for the shipped testbed.
        device: where to put the components.
        dtype: weights are cast to this dtype on load (the testbed is stored in fp16, used in fp32).

    Raises:
        ModelError: missing folder or file, unsupported family, broken checkpoint.
    """
    path = _resolve(model)
    family, info = detect_family(path)
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.schedulers import KarrasDiffusionSchedulers  # noqa: F401  (import check)
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    loaded = {}
    loaders = {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel}
    if family == "sdxl":
        loaders["text_encoder_2"] = CLIPTextModelWithProjection
    for name, cls in loaders.items():
        try:
            loaded[name] = cls.from_pretrained(str(path), subfolder=name, torch_dtype=dtype).to(device).eval()
        except Exception as e:
            raise ModelError(f"Broken checkpoint: could not load `{name}` from {path}/{name} ({type(e).__name__}: {e}).") from None
        loaded[name].requires_grad_(False)
    for name in ("tokenizer", "tokenizer_2") if family == "sdxl" else ("tokenizer",):
        try:
            loaded[name] = CLIPTokenizer.from_pretrained(str(path), subfolder=name)
        except Exception as e:
            raise ModelError(f"Broken tokenizer in {path}/{name} ({type(e).__name__}: {e}).") from None
    loaded["scheduler"] = load_scheduler(path)
    meta = info["meta"]
    return Model(
        **loaded,
        family=family,
        source=str(model) if model is not None else "testbed",
        content_hash=model_content_hash(path),
        default_guidance_scale=float(meta.get("default_guidance_scale", 5.0 if family == "sdxl" else 7.5)),
        default_steps=int(meta.get("default_steps", 25 if family == TESTBED_FAMILY else 50)),
        meta=meta,
        force_zeros_for_empty_prompt=info["force_zeros_for_empty_prompt"] if family == "sdxl" else False,
    )


def load_scheduler(path: Path):
    import diffusers

    cfg = _read_json(Path(path) / "scheduler" / "scheduler_config.json")
    cls_name = cfg.get("_class_name", "PNDMScheduler")
    cls = getattr(diffusers, cls_name, None)
    if cls is None:
        raise ModelError(f"Unknown scheduler class {cls_name!r} in {path}/scheduler.")
    return cls.from_pretrained(str(path), subfolder="scheduler")


def state_dict_hash(module: torch.nn.Module) -> str:
    """sha256 of a module's parameters and buffers (names, dtypes, shapes and bytes)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
