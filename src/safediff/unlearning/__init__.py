"""Concept unlearning: one entry point over every method, each trained (or computed in closed
form) into a weight-delta file that any stack applies.

    >>> from safediff.unlearning import unlearn
    >>> path = unlearn("esd", model, "esd.safetensors", concept="striped")      # doctest: +SKIP

* ``esd`` (:mod:`.esd`), ``duo`` (:mod:`.duo`), ``dark_miner`` (:mod:`.dark_miner`),
  ``advunlearn`` (:mod:`.advunlearn`, a text-encoder delta): trained, resumable; ``uce`` /
  ``rece``: closed form (:mod:`safediff.defenses.uce` / ``rece``), frozen into a delta by
  :func:`freeze_edit` (:mod:`.closed_form`).

Each method registers itself (:func:`.registry.register_trainer`, docs/extending.md); :func:`unlearn`
checks what every method shares and calls the registered one.

Delta files hold ``{unet parameter name: delta}`` (names as in ``unet.named_parameters()``, without
a ``unet.`` prefix; text-encoder entries as ``text_encoder.<name>``); applying one does
``W <- W + scale * delta`` (docs/defenses.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from . import esd, closed_form, duo, dark_miner  # noqa: F401  (each registers its trainer)
from . import advunlearn  # noqa: F401,E402  (registers the advunlearn trainer)
from .closed_form import freeze_edit  # noqa: F401
from .registry import (TrainerSpec, UnlearnRequest, erase_target, get_trainer, known_trainers,  # noqa: F401
                       register_trainer)

#: the registered trainers' names, in registration order
METHODS = tuple(known_trainers())


def _testbed_concept(model, concept: str | None) -> str | None:
    """``concept`` if it names a concept of the model's world (a testbed concept of a testbed model;
    else it is the concept's text)."""
    from ..worlds import world_of

    return concept if concept and concept in world_of(model).concepts() else None


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
    spec = get_trainer(method)  # an unknown method: a clear error naming the registered ones
    method = spec.name
    from ..support import check_supported

    check_supported(method, model)  # before any data is asked for
    from ..models import require_fp32

    require_fp32(model, f"Unlearning ({method})")
    out_path = Path(out_path)
    if out_path.exists() and not overwrite:
        raise FileExistsError(f"{out_path} exists; choose another output or pass overwrite=True (--overwrite).")
    options = dict(options or {})
    if concept is None and not prompts and not pairs_dir and not concept_images:
        from ..worlds import world_of

        concept = world_of(model).default_concept  # the testbed's default concept (None: a real model has none)
    tb = _testbed_concept(model, concept)
    concepts = [c for c in ([concept] if concept else []) + list(prompts) if c and c.strip()]
    if not concepts and (spec.needs_concept or not (pairs_dir or concept_images)):
        raise ValueError("Give the concept to erase (a testbed concept name, or the concept's text).")
    if anchor and anchor.strip() in concepts:
        raise ValueError(f"The anchor {anchor!r} equals a concept to erase; choose a different anchor.")
    request = UnlearnRequest(concept=concept, prompts=tuple(prompts), concepts=tuple(concepts), testbed_concept=tb,
                             anchor=anchor, pairs_dir=pairs_dir, concept_images=concept_images, clip_model=clip_model,
                             preset=preset, seed=seed, overwrite=overwrite, options=options, work_dir=work_dir,
                             progress=progress)
    return spec.run(model, out_path, request)
