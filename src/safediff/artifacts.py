"""Artifacts: safetensors files with a provenance record in their metadata.

Every artifact records what made it, its config, the content hash of the base model it was made
on, the edited model (stack hash of the weight edits) if any, the library version and the seed.
Applying one to a model of another base is refused (:class:`ArtifactMismatchError`) unless the
caller passes ``allow_other_base=True``; applying it to another edited model of the same base is
allowed with a warning, since transfer across edited models is something users measure.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from ._version import __version__
from .fileio import atomic_path

META_KEY = "safediff"


class ArtifactMismatchError(ValueError):
    """An artifact made on another base model (or for another text encoder)."""


def save_artifact(tensors: dict[str, torch.Tensor], path: str | os.PathLike, *, kind: str, base_model_hash: str,
                  config: dict, seed: int | None, edited_model_hash: str | None = None, extra: dict | None = None,
                  base_model_family: str | None = None) -> Path:
    """Write ``tensors`` + provenance atomically (:func:`safediff.fileio.atomic_path`: temporary name,
    fsync, rename). Replaces an existing ``path``: every command refuses an existing output before its
    work unless given ``--overwrite``."""
    from safetensors.torch import save_file

    path = Path(path)
    record = {"kind": kind, "base_model_hash": base_model_hash, "base_model_family": base_model_family,
              "edited_model_hash": edited_model_hash,
              "config": config, "seed": seed, "safediff_version": __version__, **(extra or {})}
    with atomic_path(path, overwrite=True) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={META_KEY: json.dumps(record, default=str)})
    return path


def read_artifact(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and provenance record of a safetensors artifact; a missing, empty, corrupt or
    non-file path is a clear error naming it."""
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Artifact {path} does not exist.")
    if not path.is_file():
        raise ValueError(f"Artifact {path} is a folder; give the .safetensors file itself.")
    tensors = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            for k in f.keys():
                tensors[k] = f.get_tensor(k)
        record = json.loads(meta[META_KEY]) if META_KEY in meta else {}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for damaged files
        raise ValueError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e}); it may be empty, "
                         "truncated or of another format.") from None
    return tensors, record


def check_provenance(record: dict, model, *, path: str, allow_other_base: bool = False,
                     edited_model_hash: str | None = None) -> None:
    """Refuse an artifact made on another base model; note one made on another edited model."""
    base = record.get("base_model_hash")
    if base is None:
        warnings.warn(f"{path} carries no safediff provenance record; its base model cannot be checked.", stacklevel=3)
        return
    made_family = record.get("base_model_family")
    family = getattr(model, "family", None)
    if made_family and family and made_family != family and not allow_other_base:  # another architecture
        raise ArtifactMismatchError(
            f"{path} was made on a {made_family} model ({base[:16]}), but this is a {family} model "
            f"({model.source}); an artifact does not carry over between model families. Make it again on this model "
            "(allow_other_base=True applies it anyway, where the shapes happen to match)."
        )
    if base != model.content_hash and not allow_other_base:
        raise ArtifactMismatchError(
            f"{path} was made on base model {base[:16]}, but this model is {model.content_hash[:16]} ({model.source}). "
            "Use it with the model it was made on, or pass allow_other_base=True to apply it anyway."
        )
    made_on = record.get("edited_model_hash")
    if made_on is not None and made_on != edited_model_hash:
        warnings.warn(
            f"{path} was made on the edited model {made_on} of this base; applying it to "
            f"{edited_model_hash or 'the unedited model'} measures transfer across edited models.",
            stacklevel=3,
        )


def file_sha256(path: str | os.PathLike) -> str:
    """Content hash of a file (what a cached result that depends on it records)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
