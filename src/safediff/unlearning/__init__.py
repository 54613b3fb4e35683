"""Concept unlearning: one entry point over every method, each trained (or computed in closed
form) into a weight-delta file that any stack applies.

    >>> from safediff.unlearning import unlearn
    >>> path = unlearn("esd", model, "esd.safetensors", concept="striped")      # doctest: +SKIP

* ``esd`` (:mod:`.esd`), ``duo`` (:mod:`.duo`), ``dark_miner`` (:mod:`.dark_miner`): trained,
  resumable; ``uce`` / ``rece``: closed form (:mod:`safediff.defenses.uce` / ``rece``), frozen
  into a delta by :func:`freeze_edit`.

Delta files hold ``{unet parameter name: delta}`` (names as in ``unet.named_parameters()``, without
a ``unet.`` prefix); applying one does ``W <- W + scale * delta`` (docs/defenses.md).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

METHODS = ("esd", "uce", "rece", "duo", "dark_miner")


def _testbed_concept(model, concept: str | None) -> str | None:
    """``concept`` if it names a testbed concept of a testbed model (else it is the concept's text)."""
    if not concept or not model.is_testbed:
        return None
    from ..testbed import world

    return concept if concept in world.CONCEPTS else None


def _testbed_concepts() -> list[str]:
    from ..testbed import world

    return sorted(world.CONCEPTS)


def freeze_edit(model, stack: str, out_path, *, method: str, config: dict, overwrite: bool = False) -> Path:
    """Apply a closed-form edit (UCE, RECE), save ``edited - original`` as a delta file usable as
    ``delta(path=...)`` in any stack, and revert the model exactly."""
    import torch

    from ..artifacts import save_artifact
    from ..pipeline import SafePipeline
    from ..stack import DefenseStack

    out_path = Path(out_path)
    if out_path.exists() and not overwrite:
        raise FileExistsError(f"{out_path} exists; choose another output or pass overwrite=True (--overwrite).")
    original = {n: p.detach().clone() for n, p in model.unet.named_parameters()}
    with SafePipeline(model, DefenseStack.parse(stack)):
        delta = {n: (p.detach() - original[n]).cpu() for n, p in model.unet.named_parameters()
                 if not torch.equal(p.detach(), original[n])}
    if not delta:
        raise ValueError(f"The edit {stack!r} changed no weight; nothing to save.")
    return save_artifact(delta, out_path, kind=f"{method}-delta", base_model_hash=model.content_hash, base_model_family=model.family,
                         config={"stack": stack, **config}, seed=None)


def unlearn(method: str, model, out_path, *, concept: str | None = None, prompts: Sequence[str] = (),
            anchor: str = "", pairs_dir: str | None = None, concept_images: str | None = None,
            clip_model: str | None = None, preset: str | None = None, seed: int = 0, overwrite: bool = False,
            options: dict[str, Any] | None = None, work_dir: str | None = None, progress: bool = True) -> Path:
    """Erase a concept with ``method`` and write the weight-delta file ``out_path``.

    Args:
        concept: on the testbed, a concept name (its training-side words and detector are used);
            elsewhere the concept's text (one word or phrase; ``prompts`` for several).
        anchor: what the concept maps to (UCE's guide, Dark Miner's anchor).
        pairs_dir: DUO on a real model: ``unsafe/`` and ``safe/`` image folders.
        concept_images / clip_model: Dark Miner on a real model: the concept pool and its verifier.
        preset: the method's preset (default: ``testbed`` on the testbed, the paper's otherwise).
        options: config fields that replace the preset's (e.g. ``{"iterations": 300}``).
    Raises before any work for an unknown method, concept, preset or option, or an existing output.
    """
    if method not in METHODS:
        raise ValueError(f"Unknown unlearning method {method!r}; choose one of {list(METHODS)}.")
    from ..support import check_supported

    check_supported(method, model)  # before any data is asked for
    from ..models import require_fp32

    require_fp32(model, f"Unlearning ({method})")
    out_path = Path(out_path)
    if out_path.exists() and not overwrite:
        raise FileExistsError(f"{out_path} exists; choose another output or pass overwrite=True (--overwrite).")
    options = dict(options or {})
    if concept is None and not prompts and not pairs_dir and not concept_images and model.is_testbed:
        concept = "striped"  # the testbed's default concept
    tb = _testbed_concept(model, concept)
    concepts = [c for c in ([concept] if concept else []) + list(prompts) if c and c.strip()]
    if not concepts and not (method == "duo" and pairs_dir) and not (method == "dark_miner" and concept_images):
        raise ValueError("Give the concept to erase (a testbed concept name, or the concept's text).")
    if anchor and anchor.strip() in concepts:
        raise ValueError(f"The anchor {anchor!r} equals a concept to erase; choose a different anchor.")

    if method in ("uce", "rece"):
        if tb and not anchor:
            stack = f"{method}(preset=testbed-{tb})"
        else:
            if method == "rece":
                raise ValueError("RECE outside the testbed presets: use the `rece(...)` defense with its options "
                                 "(see `safediff defenses`), or a testbed concept.")
            q = lambda xs: "[" + ", ".join(json.dumps(x) for x in xs) + "]"  # noqa: E731
            stack = f"uce(erase={q(concepts)}, guide={q([anchor])})"
        return freeze_edit(model, stack, out_path, method=method, config={"concepts": concepts}, overwrite=overwrite)

    if method == "esd":
        from .esd import ESDTrainConfig, testbed_prompts, train_esd

        esd_prompts = testbed_prompts(tb) if tb and not prompts else tuple(concepts)
        cfg = _with(ESDTrainConfig.preset(preset or ("testbed" if tb else "original"), esd_prompts), seed=seed, **options)
        return train_esd(model, out_path, cfg, progress=progress, overwrite=overwrite)

    if method == "duo":
        from .duo import DUOTrainConfig, train_duo

        # the testbed world renders exact pairs, so a testbed concept works on any model
        tb = tb or (concept if concept in _testbed_concepts() else None)
        if not (pairs_dir or tb):
            raise ValueError("Give pairs_dir (unsafe/ and safe/ images of the same names, e.g. DUO's SDEdit pairs), "
                             f"or on the testbed one of its concepts {_testbed_concepts()}.")
        cfg = DUOTrainConfig.preset(preset or ("testbed" if tb else "sd-nudity"), concept="" if pairs_dir else tb,
                                    pairs_dir=pairs_dir or "", seed=seed, **options)
        return train_duo(model, out_path, cfg, progress=progress, overwrite=overwrite)

    from .dark_miner import CLIPDirectionalVerifier, DarkMinerTrainConfig, train_dark_miner

    if not tb and not (prompts or concept or concept_images):
        raise ValueError("Give training-side concept prompts or concept images for the concept pool.")
    if not tb and model.is_testbed and not concept_images:
        raise ValueError(f"Dark Miner on the testbed needs one of its concepts {_testbed_concepts()} (got {concept!r}), "
                         "or concept images and a CLIP verifier.")
    if not tb and not clip_model:
        raise ValueError("Give clip_model (a CLIP folder or hub id, e.g. openai/clip-vit-large-patch14) to verify "
                         "mined embeddings.")
    cfg = DarkMinerTrainConfig.preset(preset or ("testbed" if tb else "sd-inferred"), concept=tb or "",
                                      prompts=() if tb else tuple(concepts), anchor=anchor, seed=seed, **options)
    verifier = CLIPDirectionalVerifier.from_pretrained(clip_model, device=model.device) if clip_model else None
    if out_path.exists() and not overwrite:
        raise FileExistsError(f"{out_path} exists; choose another output or pass overwrite=True (--overwrite).")
    return train_dark_miner(model, out_path, cfg, verifier=verifier, images=concept_images, work_dir=work_dir,
                            progress=progress)


def _with(cfg, **changes):
    """``cfg`` with ``changes``; an unknown field is a clear error."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(cfg)}
    unknown = set(changes) - names
    if unknown:
        raise ValueError(f"Unknown option(s) {sorted(unknown)} for {type(cfg).__name__}; known: {sorted(names)}.")
    return dataclasses.replace(cfg, **changes)
