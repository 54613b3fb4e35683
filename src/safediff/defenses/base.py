"""The five defense stages, their small interfaces, and the registry.

A defense is a frozen config dataclass plus an implementation class for one stage::

    prompt ─► [prompt_filter] ─► tokenizer ─► text encoder ─► [embedding] ─►
       denoising loop: UNet with [weight_edit] + [guidance] ─► VAE decode ─► [output_check]

Adding a defense touches only its own module plus one :func:`register_defense` call.

Guidance rules are written once, in epsilon space: the core converts whatever the model predicts
(epsilon, v or sample) into epsilon before calling :meth:`GuidanceDefense.guide`, and converts the
guided epsilon back.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Literal

import torch

Stage = Literal["prompt_filter", "embedding", "weight_edit", "guidance", "output_check"]
STAGES: tuple[str, ...] = ("prompt_filter", "embedding", "weight_edit", "guidance", "output_check")


class DefenseConfig:
    """Base of every defense config (a frozen dataclass).

    Subclasses set ``name`` (the registry key) and may override :meth:`is_active` (a defense at
    zero strength is skipped entirely, so it costs nothing and equals no defense bit for bit),
    :meth:`artifact_paths` (files whose content hash enters the stack hash) and :meth:`presets`.
    """

    name: ClassVar[str] = ""

    def is_active(self) -> bool:
        return True

    def artifact_paths(self) -> list[str]:
        return []

    @classmethod
    def presets(cls) -> dict[str, dict]:
        return {}

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> "DefenseConfig":
        """Build from a plain dict (CLI / YAML); ``preset`` selects a named preset first."""
        options = dict(options)
        base: dict[str, Any] = {}
        if "preset" in options:
            p = options.pop("preset")
            presets = cls.presets()
            if p not in presets:
                raise ValueError(f"Unknown preset {p!r} for defense `{cls.name}`; choose one of {sorted(presets)}.")
            base = dict(presets[p])
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = set(options) - names
        if unknown:
            raise ValueError(f"Unknown option(s) {sorted(unknown)} for defense `{cls.name}`; known options: {sorted(names)}.")
        types = {f.name: f.type for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        for k, v in options.items():
            if isinstance(v, list) and "tuple" in str(types.get(k, "")):
                options[k] = tuple(v)
        return cls(**{**base, **options})

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)  # type: ignore[call-overload]
        return {"name": self.name, **d}


# --------------------------------------------------------------------------------------------
# Contexts passed to defenses
# --------------------------------------------------------------------------------------------


@dataclass
class EmbeddingContext:
    """What an embedding-stage defense sees for one batch of prompts.

    Attributes:
        prompts: the prompt texts (after any prompt filter rewrite).
        input_ids: ``(B, L)`` token ids of the prompts, padded to the tokenizer's length.
        attention_mask: ``(B, L)`` 1 on real tokens (BOS, words, first EOS), 0 on padding.
        original_prompt_embeds: ``(B, L, D)`` the prompt embedding before any transform.
        prompt_embeds: ``(B, L, D)`` the current prompt embedding (after earlier transforms).
        negative_embeds: ``(B, L, D)`` the unconditional / negative embedding.
        encode: ``encode(list_of_prompts) -> (embeds, input_ids, mask)`` with the model's own
            tokenizer and text encoder (SAFREE re-encodes masked prompts with it).
        text_encoder / tokenizer: the model's own.
    """

    prompts: list[str]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    original_prompt_embeds: torch.Tensor
    prompt_embeds: torch.Tensor
    negative_embeds: torch.Tensor
    encode: Callable[[list[str]], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    text_encoder: Any
    tokenizer: Any
    extras: dict = field(default_factory=dict)


@dataclass
class StepInfo:
    """Where the sampler is: step index ``i`` of ``num_steps``, timestep ``t``, and epsilon-space
    conversion coefficients of this step (``alpha_bar``)."""

    index: int
    num_steps: int
    timestep: Any
    alpha_bar: float
    latents: torch.Tensor


@dataclass
class GuidanceContext:
    """What a guidance defense sees once per generation (before the loop).

    ``prompt_embeds`` is the embedding the UNet gets (after embedding-stage defenses);
    ``original_prompt_embeds`` the one before them; ``negative_embeds`` the unconditional one.
    ``guidance_scale`` is the base classifier-free guidance scale.
    """

    prompts: list[str]
    prompt_embeds: torch.Tensor
    original_prompt_embeds: torch.Tensor
    negative_embeds: torch.Tensor
    guidance_scale: float
    encode: Callable[[list[str]], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    model: Any
    embedding_ctx: EmbeddingContext | None = None


@dataclass
class FilterDecision:
    """Verdict of a prompt filter: allowed (maybe rewritten) or refused with a reason."""

    allowed: bool
    prompt: str
    reason: str = ""
    score: float | None = None


@dataclass
class OutputDecision:
    """Verdict of an output check for one image."""

    flagged: bool
    scores: dict[str, float] = field(default_factory=dict)
    reason: str = ""


# --------------------------------------------------------------------------------------------
# Stage interfaces
# --------------------------------------------------------------------------------------------


class Defense:
    """Common base: holds the frozen config. Implementations get the model at construction."""

    stage: ClassVar[str] = ""

    def __init__(self, config: DefenseConfig, model: Any):
        self.config = config
        self.model = model


class PromptFilterDefense(Defense):
    stage = "prompt_filter"

    def check(self, prompts: list[str]) -> list[FilterDecision]:
        raise NotImplementedError


class EmbeddingDefense(Defense):
    """Transforms the prompt embedding (by default only the prompt's, never the negative one)."""

    stage = "embedding"

    def transform(self, ctx: EmbeddingContext) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(prompt_embeds, negative_embeds)``."""
        raise NotImplementedError


class EditHandle:
    """Reverts a weight edit exactly (the original tensors are kept, not recomputed)."""

    def __init__(self, saved: dict[str, tuple[torch.nn.Module, str, torch.Tensor]]):
        self._saved = saved
        self.reverted = False

    @property
    def edited_parameter_names(self) -> list[str]:
        return sorted(self._saved)

    def revert(self) -> None:
        if self.reverted:
            return
        with torch.no_grad():
            for module, pname, orig in self._saved.values():
                getattr(module, pname).data.copy_(orig)
        self.reverted = True


class WeightEditDefense(Defense):
    stage = "weight_edit"

    def apply(self) -> EditHandle:
        """Edit ``self.model`` in place; return a handle whose ``revert()`` restores it exactly."""
        raise NotImplementedError


class GuidanceDefense(Defense):
    """Contributes to the noise prediction at each step, in epsilon space.

    Hooks, all optional:
      * :meth:`prepare` once per generation: may return extra conditionings (name -> ``(B, L, D)``
        embedding) batched into the same UNet call as the conditional and unconditional ones;
      * :meth:`unconditional`: a replacement for the unconditional embedding (the negative prompt);
      * :meth:`guide` at each step: ``eps`` holds ``"uncond"``, ``"cond"`` and the extra
        conditionings' epsilon predictions; ``guided`` the current guided epsilon. Returns the new one.
    """

    stage = "guidance"

    def prepare(self, ctx: GuidanceContext) -> dict[str, torch.Tensor]:
        return {}

    def unconditional(self, ctx: GuidanceContext) -> torch.Tensor | None:
        return None

    def guide(self, eps: dict[str, torch.Tensor], guided: torch.Tensor, step: StepInfo) -> torch.Tensor:
        return guided


class OutputCheckDefense(Defense):
    stage = "output_check"

    def check(self, images: list) -> list[OutputDecision]:
        raise NotImplementedError


_STAGE_BASES = {
    "prompt_filter": PromptFilterDefense,
    "embedding": EmbeddingDefense,
    "weight_edit": WeightEditDefense,
    "guidance": GuidanceDefense,
    "output_check": OutputCheckDefense,
}


@dataclass(frozen=True)
class DefenseSpec:
    name: str
    stage: str
    config_cls: type
    impl_cls: type


_REGISTRY: dict[str, DefenseSpec] = {}


def register_defense(*, name: str, config_cls: type, impl_cls: type) -> None:
    """Register a defense (called once, at import, by the defense's own module)."""
    if not name.isidentifier() or not name.islower():
        raise ValueError(f"Defense names must be lower-case identifiers, got {name!r}.")
    if name in _REGISTRY:
        raise KeyError(f"A defense called {name!r} is already registered by {_REGISTRY[name].impl_cls.__module__}.")
    stage = getattr(impl_cls, "stage", "")
    if stage not in STAGES or not issubclass(impl_cls, _STAGE_BASES[stage]):
        raise ValueError(f"{impl_cls.__name__} must subclass one of the stage bases {list(_STAGE_BASES)}.")
    if not (dataclasses.is_dataclass(config_cls) and issubclass(config_cls, DefenseConfig)):
        raise TypeError(f"{config_cls.__name__} must be a dataclass subclassing DefenseConfig.")
    config_cls.name = name
    _REGISTRY[name] = DefenseSpec(name, stage, config_cls, impl_cls)


def get_defense(name: str) -> DefenseSpec:
    if name not in _REGISTRY:
        raise ValueError(f"Unknown defense {name!r}. Known defenses: {sorted(_REGISTRY)}.")
    return _REGISTRY[name]


def known_defenses() -> dict[str, DefenseSpec]:
    return dict(_REGISTRY)
