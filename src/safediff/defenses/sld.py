"""Safe Latent Diffusion (SLD): guidance away from an unsafe concept, at every denoising step.

Paper: P. Schramowski, M. Brack, B. Deiseroth, K. Kersting, "Safe Latent Diffusion: Mitigating
Inappropriate Degeneration in Diffusion Models", CVPR 2023, https://arxiv.org/abs/2211.05105.
Reference code: ``StableDiffusionPipelineSafe`` in diffusers (``pipelines/deprecated/
stable_diffusion_safe``) and ``SLDPipeline`` in ml-research/safe-latent-diffusion; both compute
the same step. The equation numbers below are the ones the reference code's comments use.

Each step the UNet predicts three noises from one batched call: ``eps_u`` (unconditional),
``eps_p`` (the prompt) and ``eps_S`` (the safety concept). With the base CFG scale ``s_g``::

    g_text = eps_p - eps_u                                   classifier-free direction
    mu     = min(1, s_S * |eps_p - eps_S|)        elementwise                        (Eq. 6)
    mu     = 0 where eps_p - eps_S >= lambda      elementwise threshold              (Eq. 6)
    gamma  = mu * (eps_S - eps_u)                 safety direction                   (Eq. 4)
    gamma  = gamma + s_m * nu                     momentum, nu = 0 at the first step (Eq. 7)
    nu     = beta_m * nu + (1 - beta_m) * gamma   momentum update, also in warm-up  (Eq. 8)
    if step_index >= delta:  g_text = g_text - gamma          after delta warm-up steps (Eq. 3)
    eps    = eps_u + s_g * g_text

so after warm-up SLD changes the plain CFG result by ``-s_g * gamma``.

How it fits the toolkit:

* The concept conditioning is requested from :meth:`SLD.prepare` as ``{"sld_concept": ...}``, so
  the core batches it into the same UNet call as ``[uncond, cond]`` (diffusers' layout is
  ``[uncond, cond, concept]`` too).
* The rule is written in epsilon space, as every guidance rule here. On epsilon models this is
  exactly diffusers' computation. On v-prediction (or sample) models the core converts the three
  predictions to epsilon first; diffusers' safe pipeline (SD 1.x only) would instead apply the
  same formulas to the raw model outputs, and because the clamp and threshold are nonlinear the
  two are not the same. Epsilon space is the paper's formulation.
* Stacking: the core passes ``guided``, the epsilon after base CFG and after any earlier guidance
  defense. SLD adds its own change relative to plain CFG (``sld_eps - cfg_eps``, that is
  ``-s_g * gamma``) onto ``guided`` instead of replacing it, so an earlier defense's change is
  kept. With SLD alone this equals diffusers' result up to float rounding.
* Only one SLD defense per stack: the conditioning name ``"sld_concept"`` must be unique.
* **Warm-up on SD's schedule.** ``warmup_steps`` is counted on a ``schedule_steps``-step schedule
  (default 50, diffusers' and the paper's step count) and applied as that fraction of any
  schedule: the presets' warm-up of 7-15 steps means 14-30% of the trajectory at 25 steps as at
  50 (testbed-notes.md: at 25 steps diffusers' step count covers 28-40%). ``schedule_steps=None``
  counts warm-up in the actual steps, as diffusers' pipeline does (identical at 50 steps).
* A zero-strength SLD (``guidance_scale <= 1``) is inactive and skipped by the pipeline, so it is
  bit-identical to no defense. This follows diffusers' code (``sld_guidance_scale > 1.0`` enables
  it); diffusers' docstring and the original repository say ``< 1`` disables it, so the two
  references differ only at exactly 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..options import option
from .base import DefenseConfig, GuidanceContext, GuidanceDefense, StepInfo, register_defense, schedule_fraction

#: The safety concept of the official SLD code (ml-research/safe-latent-diffusion), the one used
#: for its I2P results on Stable Diffusion.
I2P_CONCEPT_ORIGINAL: str = (
    "hate, harassment, violence, suffering, humiliation, harm, suicide, sexual, nudity, bodily fluids, "
    "blood, obscene gestures, illegal activity, drug use, theft, vandalism, weapons, child abuse, "
    "brutality, cruelty"
)

#: The safety concept of diffusers' ``StableDiffusionPipelineSafe``: the same list with the prefix
#: ``"an image showing "``. Use this (the default of the diffusers pipeline) on real Stable
#: Diffusion checkpoints when comparing with diffusers; :data:`I2P_CONCEPT_ORIGINAL` when
#: comparing with the paper's own code.
I2P_CONCEPT: str = "an image showing " + I2P_CONCEPT_ORIGINAL

#: Default concept on the shipped testbed, whose two unsafe stand-in concepts are these words; it
#: applies on the testbed only (any other model must be given ``concept``).
TESTBED_CONCEPT: str = "striped caged"

# The presets of diffusers' ``SafetyConfig`` (identical to the SLD paper's), in our field names.
_PRESETS: dict[str, dict[str, Any]] = {
    "weak": {"warmup_steps": 15, "guidance_scale": 20.0, "threshold": 0.0, "momentum_scale": 0.0, "mom_beta": 0.0},
    "medium": {"warmup_steps": 10, "guidance_scale": 1000.0, "threshold": 0.01, "momentum_scale": 0.3, "mom_beta": 0.4},
    "strong": {"warmup_steps": 7, "guidance_scale": 2000.0, "threshold": 0.025, "momentum_scale": 0.5, "mom_beta": 0.7},
    "max": {"warmup_steps": 0, "guidance_scale": 5000.0, "threshold": 1.0, "momentum_scale": 0.5, "mom_beta": 0.7},
}


@dataclass(frozen=True)
class SLDConfig(DefenseConfig):
    """Safe Latent Diffusion. Defaults are diffusers' ``__call__`` defaults (the MEDIUM preset).

    Args:
        concept: text of the unsafe concept that guidance pushes away from, or the name of a
            registered concept with its own text (``"i2p"``: :data:`I2P_CONCEPT_ORIGINAL`, the
            paper code's default; ``safediff concepts`` lists them). The default
            ``"striped caged"`` applies on the testbed only: on any other model a stack that
            leaves ``concept`` unset is refused, naming the option. On Stable Diffusion give
            ``concept="i2p"`` or :data:`I2P_CONCEPT` (diffusers' default).
        concept_embedding: an INE / textual-inversion file (its placeholder is the concept), or a
            safetensors file whose key ``embedding`` holds a concept embedding of shape ``(L, D)``
            or ``(1, L, D)``. When
            given it is used instead of ``concept``, whose text is then ignored.
        guidance_scale: ``s_S`` in Eq. 6 (diffusers' ``sld_guidance_scale``), >= 0. Values <= 1
            disable SLD (diffusers' convention); typical values 20 to 5000.
        warmup_steps: ``delta`` in Eq. 3, integer >= 0: the safety term is applied from step index
            ``warmup_steps`` on (momentum builds up during warm-up).
        threshold: ``lambda`` in Eq. 6, any finite number: elements where
            ``eps_p - eps_S >= threshold`` get no safety guidance.
        momentum_scale: ``s_m`` in Eq. 7, >= 0; 0 disables momentum.
        mom_beta: ``beta_m`` in Eq. 8, in [0, 1]: the fraction of the previous momentum kept.
        schedule_steps: the schedule ``warmup_steps`` is counted on (default 50: SD's); the warm-up
            is that fraction of any schedule. ``None``: counted in the actual steps (diffusers).
    """

    #: conformance (tests/test_conformance.py): stack texts at zero strength and an acting one
    zero_strength = ('sld(concept="zebra", guidance_scale=0)',)
    acting_example = 'sld(concept="zebra", guidance_scale=1000, warmup_steps=3)'

    concept: str = option(TESTBED_CONCEPT, help="the unsafe concept's text, or a registered concept's name")
    concept_embedding: str | None = option(None, help="an INE / textual-inversion or embedding file used instead")
    guidance_scale: float = option(1000.0, low=0, why="<= 1 disables SLD", help="s_S (Eq. 6)")
    warmup_steps: int = option(10, low=0, help="delta (Eq. 3): steps before the safety term applies")
    threshold: float = option(0.01, help="lambda (Eq. 6), any sign; presets use 0 to 1")
    momentum_scale: float = option(0.3, low=0, help="s_m (Eq. 7); 0 disables momentum")
    mom_beta: float = option(0.4, low=0, high=1, help="beta_m (Eq. 8): the fraction of momentum kept")
    schedule_steps: int | None = option(50, low=1, help="the schedule warmup_steps is counted on (null: the actual steps)")

    menu = {"SLD (medium)": 'sld(preset=medium, concept="{concept}")',
            "SLD (max)": 'sld(preset=max, concept="{concept}")'}

    #: options whose defaults name the testbed's concepts (refused unset on other models)
    testbed_defaults: ClassVar[tuple[str, ...]] = ("concept",)

    def record(self) -> dict:
        from ..concepts import concept_text

        d = super().record()
        if concept_text(self.concept) != self.concept:  # a registered concept's name: record the text it used
            d["concept_text"] = concept_text(self.concept)
        return d

    def unset_testbed_options(self) -> list[str]:
        # a concept embedding file replaces the concept's text, which is then not used
        return [] if self.concept_embedding else super().unset_testbed_options()

    def __post_init__(self) -> None:
        super().__post_init__()  # types and bounds, from the schema above (floats stored as floats)
        if self.concept_embedding is not None and not self.concept_embedding.strip():
            raise ValueError(
                f"`sld` option `concept_embedding` must be the path of a safetensors file, got {self.concept_embedding!r}."
            )
        if not self.concept_embedding and not self.concept.strip():
            raise ValueError(
                "`sld` option `concept` is empty: give the unsafe concept's text (e.g. \"striped caged\") "
                "or a `concept_embedding` file. To switch SLD off, set `guidance_scale` to 0."
            )

    def is_active(self) -> bool:
        return self.guidance_scale > 1.0

    def artifact_paths(self) -> list[str]:
        return [self.concept_embedding] if self.concept_embedding else []

    @classmethod
    def own_presets(cls) -> dict[str, dict]:
        """``weak``, ``medium``, ``strong``, ``max``: exactly diffusers' ``SafetyConfig`` values
        (which are the SLD paper's).

        Warning: some re-implementations use other values under the same names; for example
        UnlearnDiffAtk's SLD baseline uses ``guidance_scale=200`` for WEAK (here and in diffusers
        it is 20). Compare numbers across papers only after checking which values they used.
        """
        return {k: dict(v) for k, v in _PRESETS.items()}


def sld_guidance(
    eps_uncond: torch.Tensor,
    eps_cond: torch.Tensor,
    eps_concept: torch.Tensor,
    momentum: torch.Tensor | None,
    *,
    apply: bool | torch.Tensor,
    cfg: SLDConfig,
    guidance_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One SLD step in epsilon space (Eqs. 3, 4, 6, 7, 8; see the module docstring).

    Args:
        eps_uncond, eps_cond, eps_concept: the unconditional, prompt and safety-concept epsilon
            predictions, all of one shape.
        momentum: ``nu`` from the previous step, or ``None`` at the first step (zeros).
        apply: whether the warm-up is over (Eq. 3), a bool or a per-sample ``(B, 1, 1, 1)`` mask.
        cfg: the SLD hyperparameters.
        guidance_scale: the base classifier-free guidance scale ``s_g``.

    Returns:
        ``(guided_eps, new_momentum)``. During warm-up ``guided_eps`` is plain CFG,
        ``eps_uncond + s_g * (eps_cond - eps_uncond)``, computed in the same order of operations.
    """
    if momentum is None:
        momentum = torch.zeros_like(eps_cond)
    g_text = eps_cond - eps_uncond
    diff = eps_cond - eps_concept
    # Eq. 6: elementwise scale, at most 1; zero where the prompt is already past the threshold
    scale = torch.clamp(diff.abs() * cfg.guidance_scale, max=1.0)
    scale = torch.where(diff >= cfg.threshold, torch.zeros_like(scale), scale)
    # Eq. 4: safety direction; Eq. 7: plus momentum
    gamma = (eps_concept - eps_uncond) * scale
    gamma = gamma + cfg.momentum_scale * momentum
    # Eq. 8: momentum update (runs during warm-up too)
    new_momentum = cfg.mom_beta * momentum + (1 - cfg.mom_beta) * gamma
    # Eq. 3: subtract the safety direction from the CFG direction after warm-up
    g_text = torch.where(torch.as_tensor(apply, device=g_text.device), g_text - gamma, g_text)
    return eps_uncond + guidance_scale * g_text, new_momentum


@dataclass
class SLDState:
    """One generation's SLD state: the momentum ``nu`` and where warm-up ends (a fraction)."""

    warmup: float
    guidance_scale: float
    momentum: torch.Tensor | None = None


class SLD(GuidanceDefense):
    """Applies :func:`sld_guidance` at each step; its momentum lives in the generation's
    :class:`SLDState`, not on the defense."""

    config: SLDConfig

    def __init__(self, config: SLDConfig, model: Any):
        super().__init__(config, model)
        from .negative_prompt import ConceptEmbeddingFile  # an INE / textual-inversion or prompt-embedding file

        self.file = ConceptEmbeddingFile(config.concept_embedding, model) if config.concept_embedding else None
        from ..concepts import concept_text

        #: the text guided away from: a registered concept's own text (``concept="i2p"``), else ``concept``
        self.concept_text = concept_text(config.concept)

    def _concept_embedding(self, ctx: GuidanceContext) -> torch.Tensor:
        if self.file is None:
            emb, _, _ = ctx.encode([self.concept_text])
            return emb
        return self.file.encode().to(device=ctx.prompt_embeds.device, dtype=ctx.prompt_embeds.dtype)

    def conditionings(self, ctx: GuidanceContext) -> dict[str, torch.Tensor]:
        return {"sld_concept": self._concept_embedding(ctx)}

    def conditionings_pooled(self, ctx: GuidanceContext) -> dict[str, torch.Tensor] | None:
        # SDXL: the concept text through both encoders (an embedding file carries no pooled vector)
        if self.file is not None or ctx.encode_pooled is None:
            return None
        return {"sld_concept": ctx.encode_pooled([self.concept_text])}

    def new_state(self, ctx: GuidanceContext) -> SLDState:
        return SLDState(warmup=schedule_fraction(self.config.warmup_steps, self.config.schedule_steps, ctx.num_steps),
                        guidance_scale=float(ctx.guidance_scale))

    def guide(self, eps: dict[str, torch.Tensor], guided: torch.Tensor, step: StepInfo, state: SLDState) -> torch.Tensor:
        eps_u, eps_c = eps["uncond"], eps["cond"]
        active = step.within(state.warmup)
        sld_eps, state.momentum = sld_guidance(eps_u, eps_c, eps["sld_concept"], state.momentum, apply=active,
                                               cfg=self.config, guidance_scale=state.guidance_scale)
        cfg_eps = eps_u + state.guidance_scale * (eps_c - eps_u)
        # add SLD's change relative to plain CFG, keeping any change made by earlier defenses;
        # during warm-up only the momentum moves
        return torch.where(active, guided + (sld_eps - cfg_eps), guided)


register_defense(name="sld", config_cls=SLDConfig, impl_cls=SLD)
