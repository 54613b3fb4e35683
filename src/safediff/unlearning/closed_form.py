"""Closed-form erasers as trainers: UCE and RECE (:mod:`safediff.defenses.uce` / ``rece``)
computed once and frozen into a weight-delta file that any stack applies (``delta(path=...)``)."""

from __future__ import annotations

import json
from pathlib import Path

from .registry import register_trainer


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
    return save_artifact(delta, out_path, kind=f"{method}-delta", base_model_hash=model.content_hash,
                         base_model_family=model.family, config={"stack": stack, **config}, seed=None)


def _stack(method: str, request) -> str:
    """The defense stack whose edit is frozen: the testbed concept's preset, or UCE on the texts."""
    if request.testbed_concept and not request.anchor:
        return f"{method}(preset=testbed-{request.testbed_concept})"
    if method == "rece":
        raise ValueError("RECE outside the testbed presets: use the `rece(...)` defense with its options "
                         "(see `safediff defenses`), or a testbed concept.")
    q = lambda xs: "[" + ", ".join(json.dumps(x) for x in xs) + "]"  # noqa: E731
    return f"uce(erase={q(request.concepts)}, guide={q([request.anchor])})"


def _freezer(method: str):
    def run(model, out_path: Path, request) -> Path:
        return freeze_edit(model, _stack(method, request), out_path, method=method,
                           config={"concepts": list(request.concepts)}, overwrite=request.overwrite)

    run.__doc__ = f"The registered trainer: {method.upper()}'s closed form, frozen into a delta file."
    return run


_TARGET = "mapped to the preset's guide words (testbed concept) or else to the empty prompt"
register_trainer(name="uce", run=_freezer("uce"), summary="UCE, closed form (no training): the edit frozen into a delta",
                 defense="delta", target=_TARGET, uses_anchor=True)
register_trainer(name="rece", run=_freezer("rece"), summary="RECE, closed form (no training): the edit frozen into a delta",
                 defense="delta", target=_TARGET, uses_anchor=True)
