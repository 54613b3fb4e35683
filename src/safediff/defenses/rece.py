"""RECE -- Reliable and Efficient Concept Erasure (Gong, Chen, Wei, Chen, Jiang; ECCV 2024,
arXiv 2407.12383; methods.md 4.5): iterated closed-form erasure of the UNet's cross-attention
key/value projections, starting from a UCE edit.

A UCE edit (:mod:`.uce`) remaps the concept's tokens, but some *other* embedding still makes the
edited keys and values reproduce what the original model produced for the concept: that
embedding regenerates the concept. RECE finds it in closed form and erases it too, for a few
rounds ("epochs"):

1. **Start**: UCE-edit every selected ``attn2.to_k`` / ``attn2.to_v`` (UCE's closed form,
   :func:`.uce.uce_closed_form`, methods.md 4.4). ``W_l`` are the edited weights, ``W_l^o`` the
   weights the defense found when it was applied.
2. **Adversarial embedding** (closed form with the "regzero" regularisation towards the zero
   vector, RECE's ``close_form_emb_regzero``): for every token position ``k`` of the concept
   prompt's **whole** encoded sequence ``c_k`` (start token, words, end token and padding)::

       e*_k = argmin_e  sum_l || W_l e - W_l^o c_k ||^2 + lambda_reg || e ||^2
            = ( sum_l W_l^T W_l + lambda_reg I )^-1 ( sum_l W_l^T W_l^o ) c_k

   where ``l`` runs over every edited key and value projection.
3. **Erase it** (paper Eq. 3; its ``lambda_1 = lambda_2 = 0.1`` are ``preserve_scale`` and
   ``lamb``): apply the UCE closed form to the *current* weights with the rows ``e*_k`` as the
   erase set, each paired with the same position of the guide prompt's encoded sequence (target
   ``W_l g_k``), plus a preservation term on every position of the preserve prompts (target
   ``W_l p_k``)::

       W_l <- [ lamb W_l + s_e sum_k (W_l g_k) e*_k^T + s_p sum_k (W_l p_k) p_k^T ]
            @ [ lamb I   + s_e sum_k e*_k e*_k^T      + s_p sum_k p_k p_k^T       ]^-1

   Earlier rounds' erasures are carried by the current weights, which the ``lamb`` term keeps
   close: as in RECE's ``train.py`` each round edits the weights the previous round produced,
   and its erase set is that round's adversarial embedding (one per concept). (RECE's code
   passes one preserve prompt per erased concept, so with no preserve set the empty prompt
   counts once per concept; here each preserve prompt counts once.)
4. Repeat 2-3 ``epochs`` times.

RECE's code keeps the round with the lowest measured concept rate; here every round is applied
(``epochs`` picks how many), so the result does not depend on an evaluation run.

The edit is computed when the pipeline is built (as UCE is) and reverted bit for bit: the
original tensors of every edited projection are kept.

Example:
    >>> import safediff                                                        # doctest: +SKIP
    >>> pipe = safediff.build(defenses="rece(preset=testbed-striped)")         # doctest: +SKIP
    >>> pipe.close()   # the UNet is back to its original weights, bit for bit   # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..options import option
from .base import DefenseConfig, WeightEditDefense, register_defense
from .uce import TARGETS, TOKEN_MODES, UCE, UCEConfig, _as_tuple, edit_targets, uce_closed_form

#: RECE's ``train.py`` list for ``--concepts i2p`` (the "unsafe" concepts of its I2P experiments).
I2P_CONCEPTS: tuple[str, ...] = ("hate", "harassment", "violence", "suffering", "humiliation", "harm", "suicide",
                                 "sexual", "nudity", "bodily fluids", "blood")


# ---------------------------------------------------------------------------------------------
# The closed forms (pure)
# ---------------------------------------------------------------------------------------------


def adversarial_embedding(
    concept: torch.Tensor,
    edited: Sequence[torch.Tensor],
    original: Sequence[torch.Tensor],
    reg: float,
) -> torch.Tensor:
    """RECE's closed-form adversarial embedding ("regzero" regularisation, methods.md 4.5).

    Args:
        concept: ``(..., d)`` the concept's token embeddings ``c_k`` (RECE: the whole ``(L, d)``
            encoded sequence of the concept prompt), one per row.
        edited: the edited projections ``W_l``, each ``(out_l, d)``.
        original: the original projections ``W_l^o``, paired with ``edited``.
        reg: ``lambda_reg`` > 0, the weight of ``||e||^2``.

    Returns:
        ``e*`` with the shape and dtype of ``concept``: each row is
        ``(sum_l W_l^T W_l + reg I)^-1 (sum_l W_l^T W_l^o) c_k``. Solved in float64.
    """
    if len(edited) != len(original) or not edited:
        raise ValueError(f"Need the same non-zero number of edited and original projections, got {len(edited)} "
                         f"and {len(original)}.")
    if not reg > 0:
        raise ValueError(f"`reg` must be > 0 (it keeps the system invertible), got {reg}.")
    d = concept.shape[-1]
    for w, wo in zip(edited, original):
        if w.shape != wo.shape or w.dim() != 2 or w.shape[1] != d:
            raise ValueError(f"Projections must be (out, {d}) and match in pairs; got {tuple(w.shape)} and "
                             f"{tuple(wo.shape)}.")
    work = torch.device("cpu") if concept.device.type == "mps" else concept.device  # no float64 on MPS
    gram = reg * torch.eye(d, dtype=torch.float64, device=work)   # sum_l W_l^T W_l + reg I   (d, d)
    cross = torch.zeros(d, d, dtype=torch.float64, device=work)   # sum_l W_l^T W_l^o         (d, d)
    for w, wo in zip(edited, original):
        w64, wo64 = w.detach().to(work, torch.float64), wo.detach().to(work, torch.float64)
        gram += w64.T @ w64
        cross += w64.T @ wo64
    coefficient = torch.linalg.solve(gram, cross)                 # (d, d): e* = coefficient @ c
    rows = concept.detach().to(work, torch.float64).reshape(-1, d)
    adv = rows @ coefficient.T                                    # (n, d)
    return adv.reshape(concept.shape).to(device=concept.device, dtype=concept.dtype)


def kv_distance(
    embedding: torch.Tensor, weights: Sequence[torch.Tensor], target: torch.Tensor, original: Sequence[torch.Tensor]
) -> float:
    """``sum_l || W_l e_k - W_l^o c_k ||^2`` over rows ``k``: how far the keys/values ``weights``
    give ``embedding`` are from the ones ``original`` gave ``target`` (the concept). RECE's
    adversarial embedding minimises it (plus ``reg ||e||^2``); small means the concept is back."""
    e = embedding.detach().double().reshape(-1, embedding.shape[-1])
    c = target.detach().double().reshape(-1, target.shape[-1])
    total = 0.0
    for w, wo in zip(weights, original):
        total += float(((e @ w.detach().double().T - c @ wo.detach().double().T) ** 2).sum())
    return total


# ---------------------------------------------------------------------------------------------
# Config and defense
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RECEConfig(DefenseConfig):
    """Args:
    erase: concept prompts to erase. Empty: no edit (skipped, bit-identical to no defense).
    guide: what they map to: empty (the empty prompt ``""``; RECE's code uses ``" "``, which
        encodes the same), one prompt for all, or one per erase concept.
    preserve: prompts whose every token position is preserved in the RECE rounds (RECE's code,
        with no preserve set: the empty prompt).
    epochs: number of RECE rounds after the UCE start (0: the UCE edit alone).
    reg: ``lambda_reg`` of the adversarial embedding (> 0).
    erase_scale / preserve_scale / lamb: ``s_e``, ``s_p``, ``lamb`` of the rounds' closed form
        (RECE README: ``lambda_1 = lambda_2 = 0.1``, i.e. preserve_scale 0.1 and lamb 0.1).
    targets: ``"kv"`` (RECE: keys and values), ``"k"`` or ``"v"``; both for the start and rounds.
    uce_preserve / uce_erase_scale / uce_preserve_scale / uce_lamb / uce_token_mode: the starting
        UCE edit (:class:`.uce.UCEConfig`, same erase and guide prompts).
    """

    #: conformance (tests/test_conformance.py): stack texts at zero strength and an acting one
    zero_strength = ('rece(erase=["zebra"], uce_erase_scale=0, erase_scale=0)',
                     'rece(erase=["zebra"], uce_erase_scale=0, epochs=0)')
    acting_example = 'rece(erase=["zebra"], epochs=2)'

    requires = frozenset({"text_projections"})  # it edits the layers that read the text embedding

    erase: tuple[str, ...] = option((), nonblank=True, help="concept prompts to erase (empty: no edit)")
    guide: tuple[str, ...] = option((), help="what they map to: none (\"\"), one, or one per erase concept")
    preserve: tuple[str, ...] = option(("",), help="prompts preserved (every token position) in the RECE rounds")
    epochs: int = option(3, low=0, help="RECE rounds after the UCE start (0: the UCE edit alone)")
    reg: float = option(0.1, above=0, why="it keeps the adversarial embedding's system invertible",
                        help="lambda_reg of the adversarial embedding")
    erase_scale: float = option(1.0, low=0, help="s_e of the rounds' closed form")
    preserve_scale: float = option(0.1, low=0, help="s_p of the rounds' closed form")
    lamb: float = option(0.1, above=0, why="it keeps the closed form invertible", help="lamb of the rounds' closed form")
    targets: str = option("kv", choices=tuple(TARGETS), help="keys and values, keys or values (start and rounds)")
    uce_preserve: tuple[str, ...] = option((), help="the starting UCE edit's preserve prompts")
    uce_erase_scale: float = option(1.0, low=0, help="the starting UCE edit's s_e")
    uce_preserve_scale: float = option(1.0, low=0, help="the starting UCE edit's s_p")
    uce_lamb: float = option(0.5, above=0, why="it keeps the closed form invertible", help="the starting UCE edit's lamb")
    uce_token_mode: str = option("last_word", choices=TOKEN_MODES, help="the starting UCE edit's token_mode")

    def __post_init__(self) -> None:
        for f in ("erase", "guide", "preserve", "uce_preserve"):
            object.__setattr__(self, f, _as_tuple(getattr(self, f)))
        super().__post_init__()  # types, bounds and choices, from the schema above
        self.start_config()  # the UCE start checks how erase and guide pair up
        both = sorted(set(self.erase) & set(self.preserve))
        if both:
            raise ValueError(f"RECE cannot both erase and preserve {both}.")

    def start_config(self) -> UCEConfig:
        """The starting UCE edit."""
        return UCEConfig(erase=self.erase, guide=self.guide, preserve=self.uce_preserve, erase_scale=self.uce_erase_scale,
                         preserve_scale=self.uce_preserve_scale, lamb=self.uce_lamb, token_mode=self.uce_token_mode,
                         targets=self.targets)

    def is_active(self) -> bool:
        return bool(self.erase) and (self.uce_erase_scale > 0 or (self.epochs > 0 and self.erase_scale > 0))

    def unconfigured(self) -> str:
        return "" if self.erase else ("`rece` erases nothing: give the concepts with `rece(erase=[\"...\"])` or a "
                                      "preset (`rece(preset=...)`).")

    def guides(self) -> tuple[str, ...]:
        """One guide prompt per erase concept."""
        return self.start_config().guides()

    @classmethod
    def own_presets(cls) -> dict[str, dict]:
        """RECE README "Notes" (methods.md 4.5): preserve_scale 0.1 and lamb 0.1 in every round;

        * ``sd-nudity``: "nudity" -> ``""``, 3 epochs, reg 0.1, from UCE's nudity checkpoint
          (old UCE code: ``to_end`` tokens, the empty prompt preserved at s_p 0.1, lamb 0.5; the
          same settings as UCE's ``sd-nudity`` preset);
        * ``sd-unsafe``: RECE's I2P concept list (``train.py``), 2 epochs, reg 0.1; the UCE start
          uses the nudity checkpoint's settings [INFERRED: the README does not give them];
        * ``sd-style``: reg 1e-3, 1 epoch, guide ``"art"`` (UCE's guide for art) [INFERRED: start
          settings as for nudity]; give the artists as ``erase``;
        * ``sd-object-hard`` (reg 1e-3) / ``sd-object-easy`` (reg 0.1): 1 epoch; give ``erase``;

        The testbed registers ``testbed-striped`` / ``testbed-caged`` (:mod:`safediff.testbed.presets`).
        """
        old_uce = {"uce_token_mode": "to_end", "uce_preserve": ("",), "uce_erase_scale": 1.0, "uce_preserve_scale": 0.1,
                   "uce_lamb": 0.5}
        rounds = {"preserve": ("",), "erase_scale": 1.0, "preserve_scale": 0.1, "lamb": 0.1, "targets": "kv"}
        out: dict[str, dict] = {
            "sd-nudity": {"erase": ("nudity",), "guide": ("",), "epochs": 3, "reg": 0.1, **rounds, **old_uce},
            "sd-unsafe": {"erase": I2P_CONCEPTS, "guide": ("",), "epochs": 2, "reg": 0.1, **rounds, **old_uce},
            "sd-style": {"guide": ("art",), "epochs": 1, "reg": 1e-3, **rounds, **old_uce},
            "sd-object-hard": {"guide": ("",), "epochs": 1, "reg": 1e-3, **rounds, **old_uce},
            "sd-object-easy": {"guide": ("",), "epochs": 1, "reg": 0.1, **rounds, **old_uce},
        }
        return out


class RECE(WeightEditDefense):
    """Applies the UCE start and ``epochs`` RECE rounds to ``model.unet``'s cross-attention
    projections. After :meth:`compute` (or :meth:`apply`), ``adversarial_embeddings[r]`` holds
    round ``r``'s ``e*``, ``(n_concepts, L, d)``."""

    config: RECEConfig

    def __init__(self, config: RECEConfig, model) -> None:
        super().__init__(config, model)
        self.adversarial_embeddings: list[torch.Tensor] = []

    @property
    def edited_parameter_names(self) -> list[str]:
        """Full names (in ``unet.named_parameters()``) of the parameters this edit rewrites."""
        if not self.config.is_active():
            return []
        return sorted(f"{n}.weight" for n in edit_targets(self.model, self.config.targets))

    def _sequences(self, prompts: Sequence[str]) -> torch.Tensor:
        """``(n, L, d)`` whole encoded sequences of ``prompts`` (RECE uses every position)."""
        from ..encoding import encode_prompts

        if not prompts:
            d = self.model.unet.config.cross_attention_dim
            return torch.zeros(0, 0, d, dtype=self.model.dtype, device=self.model.device)
        return encode_prompts(self.model, list(prompts), warn_truncation=False)[0]

    def compute(self) -> dict[str, torch.Tensor]:
        """The new weights ``{parameter name: W_new}`` from the UNet's current weights (which
        play ``W^o``); the model is not changed. (:meth:`new_weights`, which applying uses.)"""
        cfg = self.config
        self.adversarial_embeddings = []
        if not cfg.is_active():
            return {}
        modules = edit_targets(self.model, cfg.targets)
        with torch.no_grad():
            original = {n: m.weight.detach() for n, m in modules.items()}
            start = UCE(cfg.start_config(), self.model).compute()  # {} when the start is at zero strength
            # float64 through the rounds, cast back once at the end
            current = {n: start.get(f"{n}.weight", original[n]).double() for n in modules}
            if cfg.epochs and cfg.erase_scale > 0:
                concepts = self._sequences(cfg.erase)                      # (n, L, d)
                guides = self._sequences(cfg.guides()).reshape(-1, concepts.shape[-1])
                preserve = self._sequences(cfg.preserve).reshape(-1, concepts.shape[-1])
                names = list(modules)
                for _ in range(cfg.epochs):
                    adv = adversarial_embedding(concepts, [current[n] for n in names], [original[n] for n in names], cfg.reg)
                    self.adversarial_embeddings.append(adv)
                    rows = adv.reshape(-1, adv.shape[-1])                   # (n L, d), paired with guides
                    current = {n: uce_closed_form(current[n], rows, guides, preserve, erase_scale=cfg.erase_scale,
                                                  preserve_scale=cfg.preserve_scale, lamb=cfg.lamb) for n in names}
        return {f"{n}.weight": current[n].to(original[n].dtype) for n in modules}

    new_weights = compute


register_defense(name="rece", config_cls=RECEConfig, impl_cls=RECE)
