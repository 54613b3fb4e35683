"""Weight edits stored as deltas: ``W <- W + scale * delta`` for the parameters a file names.

Shared by every training-based unlearning method (ESD now; DUO and Dark Miner write the same
kind of file): the methods differ in how the delta is trained (``safediff.unlearning.*``), not in
how it is applied. Applying keeps the original tensors, so ``revert()`` restores them exactly.
The file's provenance is checked: a delta made on another base model is refused unless
``allow_other_base``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..artifacts import check_provenance, read_artifact
from .base import DefenseConfig, EditHandle, WeightEditDefense, register_defense


@dataclass(frozen=True)
class WeightDeltaConfig(DefenseConfig):
    """Args:
    path: safetensors file of ``{unet parameter name: delta}`` with a provenance record.
    scale: multiplier of the delta; 0 disables the edit (skipped, bit-identical to no edit).
    allow_other_base: apply a delta made on another base model.
    """

    path: str = ""
    scale: float = 1.0
    allow_other_base: bool = False

    def __post_init__(self) -> None:
        if self.scale < 0:
            raise ValueError(f"`scale` must be >= 0, got {self.scale}.")

    def is_active(self) -> bool:
        return bool(self.path) and self.scale != 0

    def artifact_paths(self) -> list[str]:
        return [self.path] if self.path else []


@dataclass(frozen=True)
class ESDConfig(WeightDeltaConfig):
    """ESD (Gandikota et al., ICCV 2023) delta, trained by ``safediff.unlearning.esd.train_esd``."""


@dataclass(frozen=True)
class DUOConfig(WeightDeltaConfig):
    """DUO (Park et al., NeurIPS 2024) delta (a merged LoRA), trained by
    ``safediff.unlearning.duo.train_duo``; ``scale`` plays the LoRA weight at inference."""


@dataclass(frozen=True)
class DarkMinerConfig(WeightDeltaConfig):
    """Dark Miner (Meng et al.; methods.md 3) delta, trained by the mine -> verify -> circumvent
    loop of ``safediff.unlearning.dark_miner.train_dark_miner``."""


class WeightDelta(WeightEditDefense):
    def apply(self) -> EditHandle:
        tensors, record = read_artifact(self.config.path)
        check_provenance(record, self.model, path=self.config.path, allow_other_base=self.config.allow_other_base)
        params = dict(self.model.unet.named_parameters())
        unknown = [k for k in tensors if k not in params]
        if unknown:
            raise ValueError(f"{self.config.path} names parameters this UNet does not have (e.g. {unknown[:3]}): "
                             "it was made for another architecture.")
        saved = {}
        module_of = {n: m for n, m in self.model.unet.named_modules()}
        with torch.no_grad():
            for name, delta in tensors.items():
                p = params[name]
                if p.shape != delta.shape:
                    raise ValueError(f"{self.config.path}: delta for {name} has shape {tuple(delta.shape)}, parameter is {tuple(p.shape)}.")
                mod_name, _, pname = name.rpartition(".")
                saved[name] = (module_of[mod_name], pname, p.detach().clone())
                p.add_(self.config.scale * delta.to(p.dtype).to(p.device))
        return EditHandle(saved)


@dataclass(frozen=True)
class DeltaConfig(WeightDeltaConfig):
    """Any weight-delta file, e.g. a UCE or RECE edit frozen by ``safediff erase``."""


register_defense(name="delta", config_cls=DeltaConfig, impl_cls=WeightDelta)
register_defense(name="esd", config_cls=ESDConfig, impl_cls=WeightDelta)
register_defense(name="duo", config_cls=DUOConfig, impl_cls=WeightDelta)
register_defense(name="dark_miner", config_cls=DarkMinerConfig, impl_cls=WeightDelta)
