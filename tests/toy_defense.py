"""Toy concept push: a guidance defense written as docs/extending.md's template (this file is the
template the doc shows, checked by tests/test_extending.py).

Each step moves the guided noise prediction away from the concept's prediction:
``eps <- eps - strength * (eps_concept - eps_uncond)``, from ``start`` of the schedule on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from safediff.defenses.base import DefenseConfig, GuidanceContext, GuidanceDefense, StepInfo, register_defense
from safediff.options import option


@dataclass(frozen=True)
class ToyPushConfig(DefenseConfig):
    """Args:
    concept: the concept's text.
    strength: how far each step is pushed; 0 switches the defense off.
    start: the fraction of the schedule after which it acts.
    """

    concept: str = option("zebra", nonblank=True, help="the concept's text")
    strength: float = option(1.0, low=0, high=20, help="how far each step is pushed; 0 switches it off")
    start: float = option(0.0, low=0, below=1, help="the fraction of the schedule after which it acts")

    #: what the serve page offers (``{concept}`` is filled in); leave out to offer nothing
    menu = {"toy push (template)": 'toy_push(concept="{concept}", strength=2)'}
    #: family capabilities it needs (safediff.families.CAPABILITIES); none: it runs everywhere
    requires = frozenset()
    #: for the conformance suite: stack texts at zero strength (bit for bit no defense) and an acting one
    zero_strength = ('toy_push(concept="striped", strength=0)',)
    acting_example = 'toy_push(concept="striped", strength=3, start=0.25)'

    def is_active(self) -> bool:
        return self.strength > 0  # zero strength: skipped, bit-identical to no defense


class ToyPush(GuidanceDefense):
    config: ToyPushConfig

    def conditionings(self, ctx: GuidanceContext) -> dict[str, torch.Tensor]:
        embeds, _, _ = ctx.encode([self.config.concept] * len(ctx.prompts))
        return {"toy_concept": embeds}

    def conditionings_pooled(self, ctx: GuidanceContext) -> dict[str, torch.Tensor] | None:
        if ctx.encode_pooled is None:  # SDXL needs the pooled embedding of every conditioning
            return None
        return {"toy_concept": ctx.encode_pooled([self.config.concept] * len(ctx.prompts))}

    def guide(self, eps: dict[str, torch.Tensor], guided: torch.Tensor, step: StepInfo, state) -> torch.Tensor:
        push = self.config.strength * (eps["toy_concept"] - eps["uncond"])
        return torch.where(step.within(self.config.start), guided - push, guided)


register_defense(name="toy_push", config_cls=ToyPushConfig, impl_cls=ToyPush)
