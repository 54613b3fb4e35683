"""The library entry points; the CLI is a thin layer over these."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from ._version import __version__
from .models import Model, load_model
from .pipeline import GenerationOutput, SafePipeline
from .stack import DefenseStack


def write_images(output: GenerationOutput, out_dir: str | Path, model_source: str = "") -> list[Path]:
    """Write each image as PNG with its provenance in PNG text chunks and a JSON sidecar.

    Existing files are never overwritten silently: a name that exists gets a numbered suffix.
    """
    from PIL.PngImagePlugin import PngInfo

    from .fileio import atomic_path, atomic_write_text

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for r in output.records:
        meta = {
            "prompt": r.prompt, "prompt_index": r.prompt_index, "seed": r.seed, "image_index": r.image_index,
            "stack": output.stack, "stack_config": output.stack_config, "stack_hash": output.stack_hash,
            "model": model_source,
            "model_hash": output.model_hash, "guidance_scale": output.guidance_scale,
            "num_inference_steps": output.num_inference_steps, "height": output.height, "width": output.width,
            "device": output.device, "dtype": output.dtype, "refused": r.refused,
            "refusal_reason": r.refusal_reason, "flagged": r.flagged, "output_scores": r.output_scores,
            "safediff_version": __version__,
        }
        stem = f"p{r.prompt_index:04d}_s{r.seed}_i{r.image_index}_{output.stack_hash[:8]}"
        n = 0
        while any((out / f"{stem}{'' if n == 0 else f'-{n}'}{ext}").exists() for ext in (".json", ".png")):
            n += 1
        stem = f"{stem}{'' if n == 0 else f'-{n}'}"
        if r.image is not None:
            info = PngInfo()
            for k, v in meta.items():
                info.add_text(k, json.dumps(v) if not isinstance(v, str) else v)
            with atomic_path(out / f"{stem}.png") as tmp:
                r.image.save(tmp, format="PNG", pnginfo=info)
            paths.append(out / f"{stem}.png")
        atomic_write_text(out / f"{stem}.json", json.dumps(meta, indent=2))
    return paths


def generate(
    prompts: str | Sequence[str],
    *,
    model: Model | str | None = None,
    defenses=None,
    seed: int = 0,
    seeds: Sequence[int] | None = None,
    num_images_per_prompt: int = 1,
    guidance_scale: float | None = None,
    num_inference_steps: int | None = None,
    out_dir: str | Path | None = None,
    batch_size: int = 16,
    progress: bool = True,
    height: int | None = None,
    width: int | None = None,
    device: str | None = None,
    dtype: str | None = None,
    attention_slicing: bool = False,
    vae_tiling: bool = False,
    cpu_offload: bool = False,
) -> GenerationOutput:
    """Generate images for ``prompts`` with a defense stack (default model: the shipped testbed).

    Seeds: prompt ``i`` uses base seed ``seed + i`` (or ``seeds[i]``), and its image ``k`` the
    seed :func:`safediff.core.image_seed` of it, so no two prompts share noise. Every image's seed
    is in its record; with ``out_dir`` each PNG carries its prompt, seed, image index and stack
    hash in its text chunks (and a JSON sidecar). ``out.images[i].save(...)`` writes a plain PNG:
    use :func:`write_images` to keep the provenance.

    ``height`` / ``width``: the image size (default the model's; multiples of the VAE factor, x2
    on FLUX). ``device`` / ``dtype``: where and in which precision the model is loaded (default
    ``auto``: CUDA in fp16 when available, else the CPU in fp32; see :func:`load_model`);
    ``attention_slicing`` / ``vae_tiling``: diffusers' memory savers (:meth:`Model.enable_memory_options`).

    Example:
        >>> import safediff
        >>> out = safediff.generate("a red circle on white background, zebra",
        ...                         defenses='negative_prompt(text="striped")', seed=0)  # doctest: +SKIP
        >>> out.images[0].size                                                           # doctest: +SKIP
        (32, 32)
    """
    from .encoding import validate_prompts

    from .pipeline import check_seed

    prompts = validate_prompts(prompts)  # fail before loading anything
    for s in ([seed] if seeds is None else list(seeds)):
        check_seed(s)
    if out_dir is not None and Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise FileExistsError(f"--out {out_dir} is a file; give a folder (it is created if missing).")
    for name, v in (("height", height), ("width", width)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"`{name}` must be a positive integer (pixels), got {v!r}.")
    stack = DefenseStack.parse(defenses)
    if cpu_offload:
        from .models import CPU_OFFLOAD_UNSUPPORTED, ModelError

        raise ModelError(CPU_OFFLOAD_UNSUPPORTED)
    from .models import ensure_model, resolve_device, resolve_dtype

    resolve_dtype(dtype, resolve_device(device))  # a bad device or dtype fails before loading
    m = (ensure_model(model, device=device, dtype=dtype) if isinstance(model, Model)
         else load_model(model, device=device or "auto", dtype=dtype or "auto"))
    m.enable_memory_options(attention_slicing=attention_slicing, vae_tiling=vae_tiling, cpu_offload=cpu_offload)
    m.check_size(height, width)  # before any work
    with SafePipeline(m, stack) as pipe:
        output = pipe(prompts, seed=seed, seeds=seeds, num_images_per_prompt=num_images_per_prompt, guidance_scale=guidance_scale,
                      num_inference_steps=num_inference_steps, batch_size=batch_size, progress=progress,
                      height=height, width=width)
    if out_dir is not None:
        write_images(output, out_dir, model_source=m.source)
    return output
