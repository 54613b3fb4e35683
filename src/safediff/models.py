"""The model layer: load a diffusers text-to-image pipeline, detect its family, hash its content.

Supported families (``Model.family``):

* ``sd1`` -- Stable Diffusion v1.x layout (CLIP ViT-L text encoder, conv attention projections);
* ``sd2`` -- Stable Diffusion v2.x layout (OpenCLIP text encoder, linear attention projections),
  epsilon- or v-prediction (``Model.prediction_type``);
* ``sdxl`` -- Stable Diffusion XL base layout (two CLIP text encoders, the second with a
  projection for the pooled embedding; size/crop conditioning); the refiner (no first text
  encoder) is refused;
* ``sd3`` -- Stable Diffusion 3 / 3.5 layout (two CLIP text encoders with projections and an
  optional T5 encoder, the MMDiT ``SD3Transformer2DModel``, flow matching: ``prediction_type``
  ``"flow"``); the transformer is held in ``Model.unet`` (the one denoising network);
* ``flux`` -- FLUX.1 layout (CLIP ViT-L for the pooled embedding, T5 for the tokens, the
  ``FluxTransformer2DModel`` on packed 2x2 latent patches, flow matching; FLUX.1-dev's distilled
  guidance enters as an embedding, ``Model.distilled_guidance``; true classifier-free guidance
  runs only with ``guidance_scale > 1``, as diffusers' ``true_cfg_scale``);
* ``safediff-testbed`` -- the project's own tiny model (``safediff.json`` marker in the folder).

The family is read from the architecture (component classes and ``use_linear_projection``), never
from the folder name, so the tiny random components of :mod:`safediff.testing` are detected as the
family they mimic. Anything else (a folder that is not a diffusers model, a
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

TESTBED_FAMILY = "safediff-testbed"  # the testbed's family name (its adapter: safediff.testbed.family)
#: The shipped testbed model, inside the package.
TESTBED_PATH = Path(__file__).parent / "testbed" / "model"
#: The world-v3 testbed model (``load_model("testbed-v3")``), shipped beside it for the issue-32 reruns;
#: docs/testbed.md, "World v3": its acceptance with the misses recorded.
TESTBED_V3_PATH = Path(__file__).parent / "testbed" / "model_v3"
#: Every testbed model shipped inside the package, by the name ``load_model`` and ``--model`` take,
#: with the command that rebuilds it (said when its folder is missing).
SHIPPED_TESTBEDS: dict[str, tuple[Path, str]] = {
    "testbed": (TESTBED_PATH, "`safediff testbed train --out <dir>`"),
    "testbed-v3": (TESTBED_V3_PATH, "`safediff testbed train --out <dir> --set world_version=3` and "
                                    "`safediff testbed check <dir> --guidance-scale 4.0`"),
}

#: the scheduler classes of flow-matching families (their model predicts a velocity)
FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler")


class ModelError(ValueError):
    """A model folder or hub id that safediff cannot use (the message says why and what to do)."""


#: ``--dtype`` names and the torch dtypes they stand for
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "half": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


#: why ``--cpu-offload`` is refused (checked before a model is loaded)
CPU_OFFLOAD_UNSUPPORTED = (
    "Model CPU offload is not supported yet: safediff's sampler calls the text encoders, the denoiser and the VAE "
    "directly and keeps its tensors on one device, which offload hooks would move under it. Use --dtype fp16/bf16, "
    "--vae-tiling and --attention-slicing, or a smaller --batch-size.")


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` (or None): CUDA when available, else the CPU; otherwise the device named, checked.

    Raises:
        ModelError: a CUDA device asked for where CUDA is unavailable (or the index is out of
            range), or a name torch does not know.
    """
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ModelError(f"Unknown device {str(device)!r}; use auto, cpu, cuda or cuda:N.") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelError(f"Device {str(device)!r} asked for, but CUDA is not available here (torch "
                             f"{torch.__version__}, built {'with' if torch.version.cuda else 'without'} CUDA); install "
                             "a CUDA build of torch (README: GPU) or pass --device cpu.")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ModelError(f"Device {str(device)!r} asked for, but only {torch.cuda.device_count()} CUDA device(s) exist.")
    elif dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ModelError(f"Device {str(device)!r} asked for, but MPS is not available here; pass --device cpu.")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None = "auto", device: str | torch.device = "cpu") -> torch.dtype:
    """``"auto"`` (or None): fp16 on a GPU, fp32 on the CPU (as diffusers users run them);
    otherwise fp32 / fp16 / bf16 (or a torch floating dtype).

    Raises:
        ModelError: a name that is not one of those.
    """
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ModelError(f"dtype {dtype} is not supported; use fp32, fp16 or bf16.")
        return dtype
    if dtype is None or str(dtype) == "auto":
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
    key = str(dtype).lower().removeprefix("torch.")
    if key not in DTYPES:
        raise ModelError(f"Unknown dtype {str(dtype)!r}; use auto, fp32, fp16 or bf16.")
    return DTYPES[key]


def require_fp32(model: "Model", what: str) -> None:
    """Refuse to train on a half-precision model: ``what`` updates weights or vectors with
    gradients and keeps fp32 master weights (load the model with ``dtype="fp32"`` / ``--dtype fp32``)."""
    if model.dtype != torch.float32:
        raise ModelError(f"{what} runs in fp32 (fp32 master weights); this model is loaded in {dtype_name(model.dtype)}. "
                         "Load it with dtype='fp32' (CLI: --dtype fp32, the default of training commands).")


def dtype_name(dtype: torch.dtype) -> str:
    """The short name of a torch dtype as the CLI spells it (``fp32``, ``fp16``, ``bf16``)."""
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, str(dtype))


@dataclass
class Model:
    """A loaded text-to-image model: diffusers components plus what safediff knows about them.

    The denoising network is :attr:`denoiser_net` (a UNet, or SD3's / FLUX's MMDiT transformer);
    ``unet`` is the same object under its older name, kept as an alias (the constructor's field) for
    existing code. New code uses ``denoiser_net``.
    """

    #: the denoising network: a ``UNet2DConditionModel``, or SD3's / FLUX's MMDiT (diffusers'
    #: ``transformer``); the alias of :attr:`denoiser_net`
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
    #: SD3's T5 encoder and its tokenizer (None: SD3 loaded without T5, whose part is then zeros);
    #: FLUX's T5 is ``text_encoder_2`` / ``tokenizer_2``, as diffusers names it
    text_encoder_3: Any = None
    tokenizer_3: Any = None
    #: FLUX.1-dev's embedded (distilled) guidance, diffusers' ``guidance_scale`` (3.5); None for a
    #: transformer without a guidance embedding (FLUX.1-schnell) and other families
    distilled_guidance: float | None = None

    @property
    def is_testbed(self) -> bool:
        """Whether this is the project's testbed model (its world's detectors and prompts apply).

        Not an architecture question (those are :attr:`capabilities`), nor the way to pick defaults:
        the testbed world's concepts, prompts and exact detectors come from
        :func:`safediff.worlds.world_of` ``(model)``, which production code asks instead."""
        return self.family == TESTBED_FAMILY

    @property
    def denoiser_net(self) -> Any:
        """The denoising network, whatever the family: a UNet, or SD3's / FLUX's MMDiT transformer
        (the object ``unet`` also names)."""
        return self.unet

    @denoiser_net.setter
    def denoiser_net(self, net: Any) -> None:
        self.unet = net

    @property
    def adapter(self):
        """This model's :class:`~safediff.families.FamilyAdapter` (what its family has and how it runs)."""
        from .families import get_family

        return get_family(self.family)

    @property
    def capabilities(self) -> frozenset:
        """What this model's family has (:data:`safediff.families.CAPABILITIES`)."""
        return self.adapter.capabilities

    @property
    def has_pooled(self) -> bool:
        """Whether the denoiser also takes a pooled text embedding (SDXL, with size conditioning; SD3; FLUX)."""
        return "pooled" in self.capabilities

    @property
    def is_transformer(self) -> bool:
        """Whether the denoising network is an MMDiT transformer (SD3, FLUX) rather than a UNet."""
        return "transformer" in self.capabilities

    @property
    def prediction_type(self) -> str:
        """``epsilon``, ``v_prediction`` or ``sample`` (the scheduler's), or ``flow`` for a
        flow-matching model, which predicts the velocity ``noise - x0`` (SD3, FLUX)."""
        if type(self.scheduler).__name__ in FLOW_SCHEDULERS:
            return "flow"
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
    def size_multiple(self) -> int:
        """Image heights and widths must be multiples of this: the VAE's factor (twice it for
        FLUX, whose latents pack into 2x2 patches)."""
        return self.vae_scale_factor * self.adapter.size_multiple_factor

    def check_size(self, height: int | None, width: int | None, what: str = "") -> tuple[int, int]:
        """``(height, width)`` with None meaning the model's default; a size that is not a positive
        multiple of :attr:`size_multiple` is refused (``what`` names where it came from)."""
        h = self.default_size if height is None else height
        w = self.default_size if width is None else width
        f = self.size_multiple
        for name, v in (("height", h), ("width", w)):
            if isinstance(v, bool) or not isinstance(v, int) or v < f or v % f:
                raise ValueError(f"{what}`{name}` must be a positive multiple of {f} for this {self.family} model "
                                 f"(its VAE factor{' x2 for latent packing' if self.adapter.size_multiple_factor == 2 else ''}), got {v!r}; "
                                 f"e.g. {max(f, (int(v) // f) * f) if isinstance(v, int) else self.default_size}.")
        return h, w

    def enable_memory_options(self, *, attention_slicing: bool = False, vae_tiling: bool = False,
                              cpu_offload: bool = False) -> "Model":
        """diffusers' memory savers on this model's components: sliced attention (UNet models;
        torch's SDPA already runs everywhere by default), tiled VAE decoding (large images).

        Raises:
            ModelError: ``attention_slicing`` on a transformer model (diffusers has none for
                SD3 / FLUX), or ``cpu_offload`` (not supported: see the message).
        """
        if cpu_offload:
            raise ModelError(CPU_OFFLOAD_UNSUPPORTED)
        if attention_slicing:
            if self.is_transformer:  # a capability (the adapter's): diffusers' slicing is a UNet method
                raise ModelError(f"--attention-slicing applies to UNet models; {self.family}'s transformer has none in "
                                 "diffusers (it already uses torch's memory-efficient SDPA).")
            self.unet.set_attention_slice("auto")
        if vae_tiling:
            self.vae.enable_tiling()
        return self

    @property
    def default_size(self) -> int:
        """The image side diffusers' pipeline uses by default (FLUX: 128 latent pixels); a
        ``default_size`` in the folder's ``safediff.json`` overrides it."""
        if "default_size" in self.meta:
            return int(self.meta["default_size"])
        return self.adapter.latent_sample_size(self) * self.vae_scale_factor

    def to(self, device: str | torch.device) -> "Model":
        for m in (self.unet, self.text_encoder, self.vae, self.text_encoder_2, self.text_encoder_3):
            if m is not None:
                m.to(device)
        return self

    def components(self) -> dict:
        """The components as diffusers' pipeline class for the family takes them."""
        return self.adapter.components(self)

    def to_diffusers(self):
        """diffusers' own pipeline for the family sharing these components (no safety checker):
        ``StableDiffusionPipeline``, ``StableDiffusionXLPipeline``, ``StableDiffusion3Pipeline`` or ``FluxPipeline``."""
        return self.adapter.to_diffusers(self)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelError(f"{path} is not valid JSON ({e}); the model folder looks damaged.") from None


def _resolve(model: str | os.PathLike | None) -> Path:
    name = "testbed" if model is None else str(model)
    if name in SHIPPED_TESTBEDS:
        path, rebuild = SHIPPED_TESTBEDS[name]
        if not (path / "model_index.json").exists():
            raise ModelError(f"The shipped testbed model {name!r} is missing at {path}; reinstall safediff, or "
                             f"rebuild it with {rebuild}, then pass `--model <dir>`.")
        return path
    p = Path(model).expanduser()
    if p.exists():
        if not p.is_dir():
            raise ModelError(f"`model` {str(model)!r} is a file; give a .safetensors / .ckpt checkpoint (SD 1.x / 2.x / "
                             "SDXL) or the folder of a diffusers pipeline (the one with model_index.json).")
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
    from .families import detect, families

    transformers = {a.required_components["transformer"] for a in families().values() if "transformer" in a.required_components}
    transformer = (index.get("transformer") or [None, None])[1]
    if "transformer" in index and transformer not in transformers:
        raise ModelError(
            f"{path} holds a transformer-based pipeline ({index.get('_class_name')}, {transformer}) that safediff does not "
            f"run; supported families: {list(families())} (transformers: {sorted(transformers)})."
        )
    layout = detect(index, {}, {})  # the components' layout, from model_index.json alone
    problem = layout.index_problem(index)
    if problem:
        raise ModelError(f"{path} {problem}")
    required = layout.required_components
    for comp, cls in required.items():
        entry = index.get(comp)
        if not entry or entry[1] is None:
            raise ModelError(f"{path}/model_index.json has no `{comp}` component; a {cls} is required.")
        if entry[1] != cls and not (comp.startswith("tokenizer") and entry[1] in ("CLIPTokenizerFast", "T5TokenizerFast")):
            raise ModelError(
                f"Unsupported model family: `{comp}` of {path} is a {entry[1]}, expected {cls}. "
                f"Supported families: {list(families())}."
            )
    optional = layout.optional_components(index)
    nets = [c for c in required if not c.startswith("tokenizer")] + optional
    for comp in (*nets, "scheduler"):
        if not (path / comp / ("scheduler_config.json" if comp == "scheduler" else "config.json")).exists():
            raise ModelError(f"{path}/{comp} has no config file; the model folder is incomplete.")
        if comp != "scheduler" and not any((path / comp).glob("*.safetensors")) and not any((path / comp).glob("*.bin")):
            raise ModelError(f"Missing weight file: {path}/{comp} holds no .safetensors (or .bin) weights.")
    net_cfg = _read_json(path / layout.denoiser_folder / "config.json")
    sched_cfg = _read_json(path / "scheduler" / "scheduler_config.json")
    scheduler_class(path)  # a bad `_class_name` is refused before any weight is loaded
    marker = path / "safediff.json"
    meta = _read_json(marker) if marker.exists() else {}
    family = detect(index, net_cfg, meta).name  # the family: the layout, told apart by configs and the marker
    info = {"prediction_type": "flow" if sched_cfg.get("_class_name") in FLOW_SCHEDULERS
            else sched_cfg.get("prediction_type", "epsilon"), "meta": meta,
            "cross_attention_dim": net_cfg.get(layout.text_width_key),
            "guidance_embeds": bool(net_cfg.get("guidance_embeds", False)),
            "force_zeros_for_empty_prompt": bool(index.get("force_zeros_for_empty_prompt", layout.force_zeros_default)),
            "has_t5": "text_encoder_3" in optional}
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


def load_model(model: str | os.PathLike | None = None, *, device: str | torch.device = "auto",
               dtype: str | torch.dtype | None = "auto", config: str | os.PathLike | None = None,
               prediction_type: str | None = None) -> Model:
    """Load a Stable Diffusion v1.x / v2.x / XL / 3 / FLUX pipeline or the testbed from a folder or hub id.

    Args:
        model: a local diffusers folder, a hub id, or ``None`` / ``"testbed"`` for the shipped testbed.
        device: where to put the components: ``"auto"`` (CUDA when available, else the CPU),
            ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
        dtype: weights are cast to this dtype on load: ``"auto"`` (fp16 on CUDA, fp32 on the CPU),
            ``"fp32"``, ``"fp16"``, ``"bf16"`` or a torch dtype (the testbed is stored in fp16).
        config, prediction_type: for a single checkpoint file (``.safetensors`` / ``.ckpt``, SD 1.x /
            2.x / SDXL), the diffusers folder giving its configs and tokenizer, and the prediction type
            the keys cannot tell (see :func:`safediff.single_file.load_single_file`).

    Raises:
        ModelError: missing folder or file, unsupported family, broken checkpoint, a device that is
            not available, an unknown dtype.
    """
    device = resolve_device(device)  # before reading anything
    dtype = resolve_dtype(dtype, device)
    from .single_file import is_single_file, load_single_file

    if is_single_file(model):  # options given with the path (safediff.single_file.CheckpointPath) count unless passed here
        return load_single_file(model, config=config or getattr(model, "config", None),
                                prediction_type=prediction_type or getattr(model, "prediction_type", None),
                                device=device, dtype=dtype)
    path = _resolve(model)
    family, info = detect_family(path)
    from .families import get_family

    adapter = get_family(family)
    loaded = {}
    vae_fp32 = adapter.vae_in_fp32(path, dtype == torch.float16)
    for name, (cls, sub) in adapter.loaders(info).items():
        try:
            dt = torch.float32 if name == "vae" and vae_fp32 else dtype
            loaded[name] = cls.from_pretrained(str(path), subfolder=sub, torch_dtype=dt).to(device).eval()
        except Exception as e:
            raise ModelError(f"Broken checkpoint: could not load `{sub}` from {path}/{sub} ({type(e).__name__}: {e}).") from None
        loaded[name].requires_grad_(False)
    for name, cls in adapter.tokenizers(info).items():
        try:
            loaded[name] = cls.from_pretrained(str(path), subfolder=name)
        except Exception as e:
            raise ModelError(f"Broken tokenizer in {path}/{name} ({type(e).__name__}: {e}).") from None
    loaded["scheduler"] = load_scheduler(path)
    meta = info["meta"]
    return Model(
        **loaded,
        family=family,
        source=str(model) if model is not None else "testbed",
        content_hash=model_content_hash(path),
        default_guidance_scale=float(meta.get("default_guidance_scale", adapter.default_guidance_scale)),
        default_steps=int(meta.get("default_steps", adapter.default_steps)),
        meta=meta,
        **adapter.model_fields(info, meta),
    )


def ensure_model(model: "str | os.PathLike | Model | None", *, device: str | torch.device | None = None,
                 dtype: str | torch.dtype | None = None) -> Model:
    """``model`` loaded on ``device`` in ``dtype`` (None: ``auto``); a :class:`Model` already loaded
    is used as it is, and refused when an explicit ``device`` / ``dtype`` differs from where it is."""
    if not isinstance(model, Model):
        return load_model(model, device=device or "auto", dtype=dtype or "auto")
    if device is not None and str(device) != "auto":
        want = resolve_device(device)
        if want.type != model.device.type or (want.index is not None and want.index != model.device.index):
            raise ModelError(f"The model is already loaded on {model.device}, not {want}; load it with device={str(want)!r}.")
    if dtype is not None and str(dtype) != "auto" and resolve_dtype(dtype, model.device) != model.dtype:
        raise ModelError(f"The model is already loaded in {dtype_name(model.dtype)}, not {dtype}; load it with that dtype.")
    return model


def load_scheduler(path: Path):
    return scheduler_class(path).from_pretrained(str(path), subfolder="scheduler")


def scheduler_class(path: Path) -> type:
    """The diffusers scheduler class a model folder's ``scheduler/scheduler_config.json`` names
    (checked before any weight is loaded; nothing but a scheduler class is looked up)."""
    import diffusers

    cfg = _read_json(Path(path) / "scheduler" / "scheduler_config.json")
    cls_name = cfg.get("_class_name", "PNDMScheduler") if isinstance(cfg, dict) else None
    # only diffusers' scheduler classes may be named here (not a pipeline, a model or `__class__`)
    cls = getattr(diffusers, cls_name, None) if isinstance(cls_name, str) and not cls_name.startswith("_") else None
    if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
        raise ModelError(f"{path}/scheduler/scheduler_config.json names {cls_name!r} as its `_class_name`, which is not "
                         "a diffusers scheduler class (e.g. PNDMScheduler, DDIMScheduler, EulerDiscreteScheduler).")
    return cls


def state_dict_hash(module: torch.nn.Module) -> str:
    """sha256 of a module's parameters and buffers (names, dtypes, shapes and bytes)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
