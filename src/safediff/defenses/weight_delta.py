"""Weight edits stored as deltas: ``W <- W + scale * delta`` for the parameters a file names.

Shared by every training-based unlearning method (ESD now; DUO and Dark Miner write the same
kind of file): the methods differ in how the delta is trained (``safediff.unlearning.*``), not in
how it is applied. Applying keeps the original tensors, so ``revert()`` restores them exactly; it is all or nothing
(every name and shape is checked before any weight changes).
The file's provenance is checked: a delta made on another base model is refused unless
``allow_other_base``. Entries named ``text_encoder.<name>`` (SDXL: also ``text_encoder_2.<name>``)
edit that text encoder's parameter ``<name>`` (AdvUnlearn's delta, :mod:`safediff.unlearning.advunlearn`);
the others name UNet parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..artifacts import check_provenance, read_artifact
from ..options import option
from .base import DefenseConfig, EditHandle, WeightEditDefense, apply_weights, register_defense


#: the largest ``scale`` a weight delta may be applied at (100 times its trained size)
MAX_DELTA_SCALE = 100.0
#: delta-file entries with these prefixes name (first / second) text-encoder parameters; the others
#: name UNet parameters
TEXT_ENCODER_PREFIX, TEXT_ENCODER_2_PREFIX = "text_encoder.", "text_encoder_2."


def delta_targets(model) -> dict[str, torch.nn.Parameter]:
    """The parameters a delta file may name: the UNet's by their own names, the text encoders' as
    ``text_encoder.<name>`` and (SDXL) ``text_encoder_2.<name>``."""
    params = dict(model.unet.named_parameters())
    for prefix, attr in ((TEXT_ENCODER_PREFIX, "text_encoder"), (TEXT_ENCODER_2_PREFIX, "text_encoder_2")):
        te = getattr(model, attr, None)
        if te is not None:
            params.update({prefix + n: p for n, p in te.named_parameters()})
    return params


class _DeltaTargets:
    """The UNet and text encoder as one parameter namespace (:func:`delta_targets`) for ``apply_weights``."""

    def __init__(self, model):
        self._params = delta_targets(model)

    def named_parameters(self):
        return iter(self._params.items())


@dataclass(frozen=True)
class WeightDeltaConfig(DefenseConfig):
    """Args:
    path: safetensors file of ``{unet parameter name: delta}`` with a provenance record.
    scale: multiplier of the delta, in [0, MAX_DELTA_SCALE]; 0 disables the edit (skipped,
        bit-identical to no edit). A delta is trained at scale 1; far beyond it the weights leave
        the range the model works in (``scale=1e30`` gave black images), so larger is refused.
    allow_other_base: apply a delta made on another base model.
    """

    path: str = option("", help="the .safetensors delta file a trainer wrote")
    scale: float = option(1.0, low=0, high=MAX_DELTA_SCALE, why="1 applies the delta as trained, 0 switches it off",
                          help="multiplier of the delta")
    allow_other_base: bool = option(False, help="apply a delta made on another base model")
    requires = frozenset({"unet"})  # a delta file names UNet parameters (not a field: no annotation)

    def is_active(self) -> bool:
        return bool(self.path) and self.scale != 0

    def unconfigured(self) -> str:
        return "" if self.path else (f"`{self.name}` has no `path`: give the .safetensors delta file a trainer wrote, "
                                     f"`{self.name}(path=\"...\")` (`safediff erase` / `safediff unlearn` write one).")

    def artifact_paths(self) -> list[str]:
        return [self.path] if self.path else []


@dataclass(frozen=True)
class ESDConfig(WeightDeltaConfig):
    """ESD (Gandikota et al., ICCV 2023) delta, trained by ``safediff.unlearning.esd.train_esd``."""

    #: conformance (tests/test_conformance.py): stack texts at zero strength and an acting one
    zero_strength = ('esd(path="missing.safetensors", scale=0)',)
    acting_example = 'esd(path="esd.safetensors")'

    menu = {"ESD / DUO / Dark Miner delta (trained file)": 'esd(path="PATH/TO/delta.safetensors")'}

    requires = frozenset({"trainable_unet"})


@dataclass(frozen=True)
class DUOConfig(WeightDeltaConfig):
    """DUO (Park et al., NeurIPS 2024) delta (a merged LoRA), trained by
    ``safediff.unlearning.duo.train_duo``; ``scale`` plays the LoRA weight at inference."""

    #: conformance (tests/test_conformance.py): stack texts at zero strength and an acting one
    zero_strength = ('duo(path="missing.safetensors", scale=0)',)
    acting_example = 'duo(path="duo.safetensors", scale=2)'

    requires = frozenset({"trainable_unet", "one_clip_encoder"})


@dataclass(frozen=True)
class DarkMinerConfig(WeightDeltaConfig):
    """Dark Miner (Meng et al.; methods.md 3) delta, trained by the mine -> verify -> circumvent
    loop of ``safediff.unlearning.dark_miner.train_dark_miner``."""

    #: conformance (tests/test_conformance.py): stack texts at zero strength and an acting one
    zero_strength = ('dark_miner(path="missing.safetensors", scale=0)',)
    acting_example = 'dark_miner(path="dm.safetensors")'

    requires = frozenset({"trainable_unet", "one_clip_encoder"})


class WeightDelta(WeightEditDefense):
    def new_weights(self) -> dict[str, torch.Tensor]:
        path = self.config.path
        if not Path(path).is_file():
            raise FileNotFoundError(f"Weight-delta file {path} does not exist (or is a folder); give the .safetensors "
                                    "file a trainer wrote.")
        try:
            tensors, record = read_artifact(path)
        except Exception as e:  # noqa: BLE001 - a corrupt or empty file
            raise ValueError(f"{path} is not a readable safetensors weight delta ({type(e).__name__}: {e}).") from None
        if not tensors:
            raise ValueError(f"{path} holds no tensors: it is not a weight delta.")
        check_provenance(record, self.model, path=path, allow_other_base=self.config.allow_other_base)
        params = delta_targets(self.model)
        unknown = [k for k in tensors if k not in params]
        if unknown:
            raise ValueError(f"{path} names parameters this model's UNet / text encoder does not have (e.g. "
                             f"{unknown[:3]}): it was made for another architecture.")
        new = {}
        for name, delta in tensors.items():
            p = params[name]
            if p.shape != delta.shape:
                raise ValueError(f"{path}: delta for {name} has shape {tuple(delta.shape)}, parameter is {tuple(p.shape)}.")
            new[name] = p.detach() + self.config.scale * delta.to(p.dtype).to(p.device)
        return new

    def apply(self) -> EditHandle:
        """Set the new UNet and text-encoder weights, all or nothing (reverted exactly by the handle)."""
        return apply_weights(_DeltaTargets(self.model), self.new_weights(), source=f"`{self.config.name}`")


@dataclass(frozen=True)
class DeltaConfig(WeightDeltaConfig):
    """Any weight-delta file, e.g. a UCE or RECE edit frozen by ``safediff erase``."""

    #: conformance (tests/test_conformance.py): stack texts at zero strength and an acting one
    zero_strength = ('delta(path="missing.safetensors", scale=0)',)
    acting_example = 'delta(path="d.safetensors", scale=0.5)'


register_defense(name="delta", config_cls=DeltaConfig, impl_cls=WeightDelta)
register_defense(name="esd", config_cls=ESDConfig, impl_cls=WeightDelta)
register_defense(name="duo", config_cls=DUOConfig, impl_cls=WeightDelta)
register_defense(name="dark_miner", config_cls=DarkMinerConfig, impl_cls=WeightDelta)
