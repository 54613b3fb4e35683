"""The five defense stages, their small interfaces, and the registry.

A defense is a frozen config dataclass plus an implementation class for one stage::

    prompt ─► [prompt_filter] ─► tokenizer ─► text encoder ─► [embedding] ─►
       denoising loop: UNet with [weight_edit] + [guidance] ─► VAE decode ─► [output_check]

Adding a defense touches only its own module plus one :func:`register_defense` call (docs/extending.md):
its options are declared with :func:`safediff.options.option`, and its class carries what the
CLI, the serve menu and the docs tables print.

Guidance rules are written once, in epsilon space: the defended denoiser
(:mod:`safediff.denoiser`) converts whatever the model predicts (epsilon, v or sample) into
epsilon before calling :meth:`GuidanceDefense.guide`, and converts the guided epsilon back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Literal, Sequence, TypeVar

import torch

from ..options import canonical, check_options, check_type, config_from_options

_T = TypeVar("_T")

Stage = Literal["prompt_filter", "embedding", "weight_edit", "guidance", "output_check"]
STAGES: tuple[str, ...] = ("prompt_filter", "embedding", "weight_edit", "guidance", "output_check")


#: the schema's type helpers (:mod:`safediff.options`), under their historical names
_canonical = canonical
_check_type = check_type


class DefenseConfig:
    """Base of every defense config (a frozen dataclass).

    Subclasses set ``name`` (the registry key) and may override :meth:`is_active` (a defense at
    zero strength is skipped entirely, so it costs nothing and equals no defense bit for bit),
    :meth:`artifact_paths` (files whose content hash enters the stack hash) and :meth:`presets`.
    Values are normalised (``1`` for a float field becomes ``1.0``, a list for a tuple field a
    tuple) in :meth:`from_options` and in :meth:`to_dict`, which the stack's text form and hash
    are made from, so two configs that mean the same print and hash the same.
    """

    name: ClassVar[str] = ""
    #: options whose defaults name the testbed's concepts: on any other model a config that leaves
    #: them unset (not given, by option or preset) is refused by :func:`check_config_for_model`
    testbed_defaults: ClassVar[tuple[str, ...]] = ()

    def is_active(self) -> bool:
        return True

    def unconfigured(self) -> str:
        """Why this config would do nothing because something it needs was not given (a stack
        refuses it), e.g. a weight delta without its file; ``""`` when it is configured. A zero
        strength given on purpose is not "unconfigured": it is the documented way to switch a
        defense off."""
        return ""

    def preset_name(self) -> str | None:
        """The preset this config was built from by :meth:`from_options` (None: none, or built directly)."""
        return getattr(self, "_preset", None)

    def given_options(self) -> frozenset[str] | None:
        """The options set by :meth:`from_options` (by name or through a preset); None when the
        config was built directly (every option then counts as given)."""
        return getattr(self, "_given", None)

    def record(self) -> dict:
        """What a record or sidecar says of this config: every option (:meth:`to_dict`), plus what a
        subclass resolves at build time (SLD: a registered concept's text)."""
        return self.to_dict()

    def unset_testbed_options(self) -> list[str]:
        """The :attr:`testbed_defaults` options this config leaves at their testbed default (and uses)."""
        given = self.given_options()
        return [] if given is None else [o for o in self.testbed_defaults if o not in given]

    def artifact_paths(self) -> list[str]:
        return []

    @classmethod
    def presets(cls) -> dict[str, dict]:
        """Named option sets: the class's own plus those registered by :func:`register_preset`."""
        return {**cls.own_presets(), **{k: dict(v) for k, v in _PRESETS.get(cls.name, {}).items()}}

    @classmethod
    def own_presets(cls) -> dict[str, dict]:
        return {}

    #: the serve page's "Add a defense" entries, ``{label: stack text}`` (``{concept}`` and
    #: ``{detector}`` are filled in); empty: not offered there
    menu: ClassVar[dict[str, str]] = {}
    #: conformance (tests/test_conformance.py): stack texts of this defense at zero strength, each
    #: skipped and equal to no defense bit for bit (artifact paths need not exist: a skipped defense
    #: reads no file); or a sentence saying why it has no zero-strength setting
    zero_strength: ClassVar[tuple[str, ...] | str] = ()
    #: an acting stack text of this defense (artifact files need not exist), for the round trip
    acting_example: ClassVar[str] = ""

    #: the family capabilities this defense needs (:data:`safediff.families.CAPABILITIES`); a stack
    #: with it is refused on a family that lacks one (:func:`safediff.support.check_defenses`)
    requires: ClassVar[frozenset[str]] = frozenset()

    def __post_init__(self) -> None:
        """Judge every option from its schema (:func:`safediff.options.check_options`); a
        subclass with its own ``__post_init__`` calls this, then checks what relates options."""
        check_options(self)

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> "DefenseConfig":
        """Build from a plain dict (CLI / YAML); ``preset`` selects a named preset first
        (:func:`safediff.options.config_from_options`, the parser every method shares)."""
        return config_from_options(cls, options, kind="defense", presets=cls.presets())

    def to_dict(self) -> dict:
        d = {f.name: _canonical(getattr(self, f.name), f.type) for f in dataclasses.fields(self)}  # type: ignore[arg-type]
        return {"name": self.name, **dataclasses.asdict(self), **d}


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
        outputs: what a defense hands to a later stage, keyed by its type (see :meth:`put`).
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
    outputs: dict = field(default_factory=dict)

    def put(self, obj: Any) -> None:
        """Hand ``obj`` to later defenses, keyed by its type (one per type per batch)."""
        self.outputs[type(obj)] = obj

    def get(self, cls: type[_T]) -> _T | None:
        """What an earlier defense handed over as a ``cls``, or None."""
        return self.outputs.get(cls)


@dataclass
class StepInfo:
    """Where a guided prediction is made.

    In the sampler: step ``index`` of ``num_steps`` (the requested step count; a multistep
    scheduler such as PNDM may take one timestep more, whose progress is then 1) at ``timestep``,
    ``progress = index / num_steps``. In a training or attack loss at random timesteps (``index is None``):
    ``progress = 1 - (t + 1) / T`` per sample, the fraction of a schedule done when it reaches
    ``t``. ``alpha_bar`` gives the epsilon-space conversion of this step; ``latents`` is ``x_t``.
    """

    index: int | None
    num_steps: int
    timestep: Any
    alpha_bar: Any
    latents: torch.Tensor
    progress: Any = 0.0

    def within(self, start: Any = 0.0, stop: Any = math.inf) -> torch.Tensor:
        """``(B, 1, ..., 1)`` bool (as many dims as the latents: ``(B, 1, 1, 1)``, or ``(B, 1, 1)`` for
        FLUX's packed tokens): whether each sample's step lies in ``[start, stop)``, fractions of
        the schedule (scalars or per-sample tensors; the default ``stop`` keeps every step to the
        end). The common window of every guidance rule."""
        B = self.latents.shape[0]
        p = torch.as_tensor(self.progress, dtype=torch.float64).reshape(-1)
        lo = torch.as_tensor(start, dtype=torch.float64).reshape(-1)
        hi = torch.as_tensor(stop, dtype=torch.float64).reshape(-1)
        ones = (1,) * (self.latents.dim() - 1)
        return ((p >= lo) & (p < hi)).expand(B).reshape(B, *ones).to(self.latents.device)


def schedule_fraction(steps: float, schedule_steps: int | None, num_steps: int) -> float:
    """``steps`` counted on a ``schedule_steps``-step schedule, as a fraction of any schedule
    (``None``: counted in the actual ``num_steps``, as diffusers' pipelines count them). SLD's
    warm-up and SAFREE's ``t_stop`` are defined on Stable Diffusion's 50-step schedule; their
    fraction keeps their meaning at another step count."""
    return float(steps) / float(schedule_steps if schedule_steps else num_steps)


@dataclass
class GuidanceContext:
    """What a guidance defense sees once per generation (before the loop).

    ``prompt_embeds`` is the embedding the UNet gets (after embedding-stage defenses);
    ``original_prompt_embeds`` the one before them; ``negative_embeds`` the unconditional one (None
    without classifier-free guidance, where the pipeline encodes none). ``guidance_scale`` is the base classifier-free guidance scale; ``num_steps`` the sampler's
    step count (a loss at random timesteps passes the model's default).
    """

    prompts: list[str]
    prompt_embeds: torch.Tensor
    original_prompt_embeds: torch.Tensor
    negative_embeds: torch.Tensor
    guidance_scale: float
    encode: Callable[[list[str]], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    model: Any
    embedding_ctx: EmbeddingContext | None = None
    num_steps: int = 50
    #: SDXL: the pooled text embedding of texts, ``(B, P)`` (None for models without one)
    encode_pooled: Callable[[list[str]], torch.Tensor] | None = None


@dataclass
class FilterDecision:
    """Verdict of a prompt filter: allowed (maybe rewritten) or refused with a reason."""

    allowed: bool
    prompt: str
    reason: str = ""
    score: float | None = None


@dataclass
class OutputDecision:
    """Verdict of an output check for one image: ``flagged``, and what to do with it (``action``:
    ``"blank"`` replaces the image with a black one, ``"flag"`` keeps it and marks its record)."""

    flagged: bool
    scores: dict[str, float] = field(default_factory=dict)
    reason: str = ""
    action: str = "flag"


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

    def check(self, prompts: list[str], tokens: Sequence = ()) -> list[FilterDecision]:
        """One decision per prompt. ``tokens``: the learned tokens (:class:`~safediff.encoding.InvertedConcept`)
        loaded into the pipeline; a filter that reads the text encoder must see each placeholder as
        the vectors it stands for, not as the characters of its name."""
        raise NotImplementedError


class EmbeddingDefense(Defense):
    """Transforms the prompt embedding (by default only the prompt's, never the negative one)."""

    stage = "embedding"

    def transform(self, ctx: EmbeddingContext) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(prompt_embeds, negative_embeds)``."""
        raise NotImplementedError


class EditHandle:
    """Reverts a weight edit exactly (the original tensors are kept, not recomputed)."""

    def __init__(self, params: dict[str, torch.nn.Parameter], originals: dict[str, torch.Tensor]):
        self._params = params
        self._originals = originals
        self.reverted = False

    @property
    def edited_parameter_names(self) -> list[str]:
        return sorted(self._originals)

    def delta(self) -> dict[str, torch.Tensor]:
        """``{name: W_now - W_original}`` (float32, CPU) of the applied edit."""
        return {n: (self._params[n].detach().float() - o.float()).cpu() for n, o in self._originals.items()}

    def revert(self) -> None:
        if self.reverted:
            return
        with torch.no_grad():
            for n, orig in self._originals.items():
                self._params[n].copy_(orig)
        self.reverted = True


def apply_weights(module: torch.nn.Module, new: dict[str, torch.Tensor], *, source: str = "the edit") -> EditHandle:
    """Set ``module``'s parameters named in ``new`` to those values, all or nothing: every name
    and shape is checked before any weight changes, and a failure while writing restores what
    was written. Returns the handle that restores the originals bit for bit."""
    params = dict(module.named_parameters())
    unknown = [n for n in new if n not in params]
    if unknown:
        raise ValueError(f"{source} names parameters this {type(module).__name__} does not have (e.g. {unknown[:3]}): "
                         "it was made for another architecture.")
    for n, v in new.items():
        if tuple(v.shape) != tuple(params[n].shape):
            raise ValueError(f"{source}: {n} has shape {tuple(v.shape)}, the parameter is {tuple(params[n].shape)}.")
        if not torch.isfinite(v).all():
            raise ValueError(f"{source}: the new value of {n} is not finite (NaN or inf); nothing was changed.")
    originals: dict[str, torch.Tensor] = {}
    try:
        with torch.no_grad():
            for n, v in new.items():
                originals[n] = params[n].detach().clone()
                params[n].copy_(v.to(params[n].device, params[n].dtype))
    except BaseException:
        EditHandle(params, originals).revert()
        raise
    return EditHandle(params, originals)


class WeightEditDefense(Defense):
    """Edits UNet weights in place. Subclasses implement :meth:`new_weights`; :meth:`apply` sets
    them all or nothing and returns the handle that reverts them exactly."""

    stage = "weight_edit"

    def new_weights(self) -> dict[str, torch.Tensor]:
        """``{unet parameter name: new value}`` computed from the UNet's current weights; the model
        is not changed."""
        raise NotImplementedError

    def apply(self) -> EditHandle:
        return apply_weights(self.model.unet, self.new_weights(), source=f"`{self.config.name}`")


class GuidanceDefense(Defense):
    """Contributes to the noise prediction at each step, in epsilon space.

    The lifecycle of one generation (all optional hooks), run by
    :class:`safediff.denoiser.DefendedDenoiser`:

      * :meth:`unconditional`: a replacement for the unconditional embedding (the negative prompt);
      * :meth:`conditionings`: extra conditionings (name -> ``(B, L, D)`` embedding) batched into the
        same UNet call as the conditional and unconditional ones;
      * :meth:`new_state`: the per-generation state (SLD's momentum), kept by the denoiser, never
        on the defense, so one defense serves several generations at once;
      * :meth:`patch`: a context manager for model patches during the generation (FreeU), undone
        on exit even after an exception;
      * :meth:`guide` at each step: ``eps`` holds ``"uncond"``, ``"cond"`` and the extra
        conditionings' epsilon predictions; ``guided`` the current guided epsilon. Returns the new
        one. Windows in the schedule are :meth:`StepInfo.within`.
    """

    stage = "guidance"
    #: whether the defense acts through the CFG branches (``guide``, extra conditionings) and so
    #: needs ``guidance_scale > 1``; False for one that acts only through :meth:`patch` (NAG)
    needs_cfg: ClassVar[bool] = True

    def replaces_unconditional(self) -> bool:
        """Whether :meth:`unconditional` may replace the unconditional embedding (at most one
        defense of a stack may)."""
        return False

    def unconditional(self, ctx: GuidanceContext) -> torch.Tensor | None:
        return None

    def unconditional_pooled(self, ctx: GuidanceContext) -> torch.Tensor | None:
        """SDXL: the pooled embedding of the unconditional branch this defense replaces (None:
        the defense cannot give one, so it is refused on SDXL)."""
        return None

    def conditionings_pooled(self, ctx: GuidanceContext) -> dict[str, torch.Tensor] | None:
        """SDXL: the pooled embedding of each of :meth:`conditionings` (None: the defense cannot
        give them, so it is refused on SDXL)."""
        return None

    def conditionings(self, ctx: GuidanceContext) -> dict[str, torch.Tensor]:
        return {}

    def new_state(self, ctx: GuidanceContext) -> Any:
        return None

    def patch(self, model: Any):
        return contextlib.nullcontext()

    def guide(self, eps: dict[str, torch.Tensor], guided: torch.Tensor, step: StepInfo, state: Any) -> torch.Tensor:
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


_PRESETS: dict[str, dict[str, dict]] = {}


def register_preset(defense: str, name: str, options: dict[str, Any]) -> None:
    """Register a named option set for ``defense`` (e.g. the testbed package registers its
    ``testbed-striped`` presets, so no production defense imports the testbed)."""
    presets = _PRESETS.setdefault(defense, {})
    if name in presets and presets[name] != options:
        raise KeyError(f"Preset {name!r} of defense {defense!r} is already registered with other options.")
    presets[name] = dict(options)


def check_config_for_model(cfg: DefenseConfig, model: Any) -> None:
    """Refuse, before any work, a testbed-only setting on a model whose world does not take the
    defenses' defaults (any but the testbed): a ``testbed-*`` preset, or an option left at a default
    that names the testbed's concepts."""
    from ..worlds import world_of

    if not hasattr(model, "family") or world_of(model).defense_defaults:  # a stub with no family: nothing to check
        return
    family = getattr(model, "family", "this")
    preset = cfg.preset_name()
    if preset and preset.startswith("testbed"):
        raise ValueError(f"`{cfg.name}(preset={preset})` is the testbed's preset (its synthetic concepts) and does not "
                         f"apply to this {family} model; give `{cfg.name}`'s options for your concept "
                         "(`safediff concepts` lists the registered ones).")
    unset = cfg.unset_testbed_options()
    if unset:
        from ..concepts import concept_names

        option = unset[0]
        raise ValueError(f"`{cfg.name}` needs option `{option}` on this {family} model (its default "
                         f"{getattr(type(cfg)(), option)!r} names the testbed's concepts); give it: a registered "
                         f"concept {concept_names(testbed=False)} (`safediff concepts`) or your own text.")


def get_defense(name: str) -> DefenseSpec:
    if name not in _REGISTRY:
        raise ValueError(f"Unknown defense {name!r}. Known defenses: {sorted(_REGISTRY)}.")
    return _REGISTRY[name]


def known_defenses() -> dict[str, DefenseSpec]:
    return dict(_REGISTRY)
