"""UCE -- Unified Concept Editing (Gandikota, Orgad, Belinkov, Materzynska, Bau; WACV 2024,
arXiv 2308.14761): a closed-form, training-free edit of the UNet's cross-attention projections.

Every cross-attention key and value projection ``W`` (``attn2.to_k`` / ``attn2.to_v``) maps a
text-token embedding ``c`` to a key or value. UCE rewrites each ``W`` independently so that the
tokens of the concepts to erase map to what the *guide* concepts' tokens mapped to, while the
tokens of the concepts to preserve keep their old outputs, and everything else moves as little as
possible. The least-squares solution of that objective (paper, Eq. 7; methods.md 4.4) is::

    W_new = [ lamb W_old + sum_i s_e v*_i c_i^T + sum_j s_p (W_old c_j) c_j^T ]
          @ [ lamb I     + sum_i s_e c_i c_i^T  + sum_j s_p c_j c_j^T        ]^-1

with ``v*_i = W_old c_guide(i)``, ``s_e`` = ``erase_scale``, ``s_p`` = ``preserve_scale`` and
``lamb`` the weight of staying close to ``W_old``. Directions orthogonal to every edit vector are
left exactly as they were. The edit is applied in place when a pipeline is built and reverted
bit for bit (the original tensors are kept) when it is closed.

Which token embeddings are ``c`` (``token_mode``):

* ``"last_word"`` (default; the current UCE code, ``trainscripts/uce_sd_erase.py``): one vector
  per concept, the embedding of its **last word token**, position ``sum(attention_mask) - 2``.
  The same rule gives the guide's vector (for the empty guide ``""`` that is position 0, the
  start token) and the preserve vectors.
* ``"to_end"`` (the old UCE code, ``train-scripts/train_erase.py``, with which RECE's starting
  nudity checkpoint was made): the concept's tokens **from its last word token to the end of the
  sequence** (last word, end token, padding), paired position by position with the guide's
  tokens from the guide's last word token on; both runs are cut to the same length. As in that
  code, every position of a *preserve* prompt is used (its whole sequence), and "no preserve set"
  there still preserved the empty prompt ``""``: the ``sd-nudity`` preset says so explicitly.

**SD3 and FLUX** (MMDiT transformers): text enters the transformer through one linear map, the
``context_embedder``, and every block's context projections (``add_k_proj`` / ``add_v_proj``) then
read text features that have been modulated by the timestep and mixed with the image tokens by
joint attention, so no closed form exists for them. UCE (and RECE) therefore edit the
``context_embedder`` weight [a documented choice]: the same objective, on the map every text token
goes through. Token positions are taken per text segment: SD3's CLIP part (77 tokens) and its T5
part (256), FLUX's T5 tokens (512); in each, the last word token is the one before the end token
(T5 has no start token, so ``""`` is its end token alone).

Example:
    >>> import safediff                                                       # doctest: +SKIP
    >>> pipe = safediff.build(defenses="uce(preset=testbed-striped)")         # doctest: +SKIP
    >>> out = pipe(["a red circle on white background, zebra"], seed=0)      # doctest: +SKIP
    >>> pipe.close()   # the UNet is back to its original weights, bit for bit  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch

from ..options import option
from .base import DefenseConfig, WeightEditDefense, register_defense

TokenMode = Literal["last_word", "to_end"]
Targets = Literal["kv", "k", "v"]
TOKEN_MODES: tuple[str, ...] = ("last_word", "to_end")
#: the ``targets`` choices (which of a UNet's key / value projections; the family adapter names the layers)
TARGETS: dict[str, tuple[str, ...]] = {"kv": ("to_k", "to_v"), "k": ("to_k",), "v": ("to_v",)}


# ---------------------------------------------------------------------------------------------
# The closed form (pure)
# ---------------------------------------------------------------------------------------------


def uce_closed_form(
    weight: torch.Tensor,
    erase: torch.Tensor,
    guide: torch.Tensor,
    preserve: torch.Tensor | None = None,
    *,
    erase_scale: float = 1.0,
    preserve_scale: float = 1.0,
    lamb: float = 0.5,
) -> torch.Tensor:
    """UCE's closed-form update of one projection matrix (paper Eq. 7, methods.md 4.4).

    Args:
        weight: ``(out, d)`` the projection ``W_old`` (a ``Linear`` weight: ``y = W c``).
        erase: ``(n, d)`` the embeddings ``c_i`` to remap, one per row.
        guide: ``(n, d)`` the guide embeddings ``c_guide(i)``, paired row by row with ``erase``;
            the target outputs are ``v*_i = W_old c_guide(i)``.
        preserve: ``(m, d)`` embeddings ``c_j`` whose outputs are kept (``None`` or ``m = 0``: none).
        erase_scale / preserve_scale: the weights ``s_e`` / ``s_p`` of the two sums.
        lamb: the weight of ``||W - W_old||^2``; must be > 0 (it keeps the system invertible).

    Returns:
        ``W_new``, same shape, dtype and device as ``weight``. The algebra runs in float64: the
        system is solved (``W_new B = A`` with ``B`` symmetric), not inverted.
    """
    if weight.dim() != 2:
        raise ValueError(f"`weight` must be a (out, d) matrix, got shape {tuple(weight.shape)}.")
    d = weight.shape[1]
    if erase.dim() != 2 or guide.shape != erase.shape or erase.shape[1] != d:
        raise ValueError(
            f"`erase` and `guide` must both be (n, {d}) with the same n; got {tuple(erase.shape)} and {tuple(guide.shape)}."
        )
    if preserve is not None and (preserve.dim() != 2 or preserve.shape[1] != d):
        raise ValueError(f"`preserve` must be (m, {d}), got {tuple(preserve.shape)}.")
    if lamb <= 0:
        raise ValueError(f"`lamb` must be > 0, got {lamb}.")
    work = torch.device("cpu") if weight.device.type == "mps" else weight.device  # no float64 on MPS
    W = weight.detach().to(work, torch.float64)
    C = erase.detach().to(work, torch.float64)
    G = guide.detach().to(work, torch.float64)
    eye = torch.eye(d, dtype=torch.float64, device=work)

    v_star = G @ W.T                                           # (n, out): row i is v*_i = W c_guide(i)
    lhs = lamb * W + erase_scale * (v_star.T @ C)              # lamb W + s_e sum v*_i c_i^T
    rhs = lamb * eye + erase_scale * (C.T @ C)                 # lamb I + s_e sum c_i c_i^T
    if preserve is not None and preserve.shape[0] > 0:
        P = preserve.detach().to(work, torch.float64)
        lhs = lhs + preserve_scale * ((P @ W.T).T @ P)         # + s_p sum (W c_j) c_j^T
        rhs = rhs + preserve_scale * (P.T @ P)                 # + s_p sum c_j c_j^T
    # W_new = lhs @ rhs^-1  <=>  rhs @ W_new^T = lhs^T  (rhs is symmetric)
    w_new = torch.linalg.solve(rhs, lhs.T).T
    return w_new.to(device=weight.device, dtype=weight.dtype)


# ---------------------------------------------------------------------------------------------
# Which token embeddings are edited
# ---------------------------------------------------------------------------------------------


def last_word_index(n_real: int) -> int:
    """Position of the last word token of a prompt with ``n_real`` real tokens (start, words, first
    end token; the attention-mask sum): ``n_real - 2``, i.e. 0 (the start token) for ``""``."""
    return max(int(n_real) - 2, 0)


def erase_positions(n_real_concept: int, n_real_guide: int, seq_len: int, mode: str) -> tuple[list[int], list[int]]:
    """Token positions ``(concept_positions, guide_positions)``, paired by index.

    ``"last_word"``: one pair, the last word token of each. ``"to_end"``: from each one's last
    word token on, cut to the same length ``seq_len - max(i_concept, i_guide)``, as the old UCE
    code aligns them.
    """
    i_c, i_g = last_word_index(n_real_concept), last_word_index(n_real_guide)
    if mode == "last_word":
        return [i_c], [i_g]
    if mode == "to_end":
        n = seq_len - max(i_c, i_g)
        return list(range(i_c, i_c + n)), list(range(i_g, i_g + n))
    raise ValueError(f"Unknown token_mode {mode!r}; choose one of {list(TOKEN_MODES)}.")


def preserve_positions(n_real: int, seq_len: int, mode: str) -> list[int]:
    """Positions of a preserve prompt: its last word token (``"last_word"``), or its whole
    sequence (``"to_end"``, as the old UCE code preserves)."""
    if mode == "last_word":
        return [last_word_index(n_real)]
    if mode == "to_end":
        return list(range(seq_len))
    raise ValueError(f"Unknown token_mode {mode!r}; choose one of {list(TOKEN_MODES)}.")


def edit_vectors(
    model, erase: Sequence[str], guide: Sequence[str], preserve: Sequence[str], mode: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Encode the concepts with the model's own tokenizer and text encoder and pick the token
    embeddings UCE edits. Returns ``(C_erase (n, d), C_guide (n, d), C_preserve (m, d))``."""
    from ..encoding import encode_prompts

    texts = list(dict.fromkeys([*erase, *guide, *preserve]))  # each distinct prompt once
    embeds, _, mask = encode_prompts(model, texts, warn_truncation=False)
    row = {t: i for i, t in enumerate(texts)}
    ce, cg, cp = [], [], []
    for offset, seq_len, n_real in text_segments(model, texts, mask):
        for e, g in zip(erase, guide):
            pe, pg = erase_positions(n_real[row[e]], n_real[row[g]], seq_len, mode)
            ce.append(embeds[row[e], [offset + i for i in pe]])
            cg.append(embeds[row[g], [offset + i for i in pg]])
        for p in preserve:
            cp.append(embeds[row[p], [offset + i for i in preserve_positions(n_real[row[p]], seq_len, mode)]])
    d = embeds.shape[-1]
    empty = embeds.new_zeros(0, d)
    return (torch.cat(ce) if ce else empty, torch.cat(cg) if cg else empty, torch.cat(cp) if cp else empty)


def text_segments(model, texts: Sequence[str], mask: torch.Tensor) -> list[tuple[int, int, list[int]]]:
    """The text segments of the encoded sequence (:func:`safediff.encoding.token_segments`) with
    the real token count of each text in each, ``[(offset, length, counts)]``: a CLIP count is the
    attention mask's (start, words, end token); a T5 count its words plus the end token (no start
    token). SD3 loaded without T5 has zeros in its T5 part: nothing to edit there."""
    from ..encoding import t5_tokens, token_segments

    t5 = t5_tokens(model, texts)
    out = []
    for kind, offset, length in token_segments(model):
        if kind == "clip":
            out.append((offset, length, mask.sum(1).tolist()))
        elif t5 is not None:
            out.append((offset, length, t5.attention_mask.sum(1).tolist()))
    return out


def cross_attention_projections(unet: torch.nn.Module, targets: str = "kv", *,
                                family: str | None = None) -> dict[str, torch.nn.Module]:
    """The denoiser's text projections UCE edits, ``{module name: Linear}``, as the family adapter
    names them (:meth:`~safediff.families.FamilyAdapter.text_projections`): on a UNet every
    ``...attn2.to_k`` and/or ``...attn2.to_v`` (``targets`` ``"kv"``, ``"k"`` or ``"v"``); on an
    SD3 / FLUX transformer its ``context_embedder`` (see the module docstring; ``targets`` must be
    ``"kv"``). ``family``: the model's (``Model.family``); default the first registered family whose
    denoiser class ``unet`` is."""
    from ..families import FamilyAdapter, families, get_family

    if family is not None:
        adapter = get_family(family)
    else:
        cls = type(unet).__name__
        adapter = next((a for a in families().values() if a.required_components.get(a.denoiser_folder) == cls),
                       FamilyAdapter())
    return adapter.text_projections(unet, targets)


def edit_targets(model, targets: str = "kv") -> dict[str, torch.nn.Module]:
    """The projections of ``model``'s denoiser that UCE / RECE edit, named by its family adapter."""
    return model.adapter.text_projections(model.denoiser_net, targets)


# ---------------------------------------------------------------------------------------------
# Config and defense
# ---------------------------------------------------------------------------------------------


def _as_tuple(value) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    return tuple(value)


@dataclass(frozen=True)
class UCEConfig(DefenseConfig):
    """Args:
    erase: the concepts to erase (prompts; each one's token embedding(s) are remapped). Empty:
        no edit (the defense is skipped, bit-identical to no defense).
    guide: what each erased concept maps to instead: empty (the empty prompt ``""``, the UCE
        default for objects), one prompt for all, or one per erase concept.
    preserve: concepts whose cross-attention outputs are kept.
    erase_scale / preserve_scale: ``s_e`` / ``s_p`` of the closed form (UCE defaults 1 and 1).
    lamb: weight of staying close to the original weights (UCE default 0.5); > 0.
    token_mode: ``"last_word"`` (current UCE code, default) or ``"to_end"`` (old UCE code; see the
        module docstring).
    targets: ``"kv"`` (keys and values, default), ``"k"`` or ``"v"``.
    """

    #: conformance (tests/test_conformance.py): stack texts at zero strength and an acting one
    zero_strength = ('uce(erase=["zebra"], erase_scale=0)',)
    acting_example = 'uce(erase=["zebra"], guide=["horse"], erase_scale=0.5)'

    requires = frozenset({"text_projections"})  # it edits the layers that read the text embedding

    erase: tuple[str, ...] = option((), nonblank=True, help="the concepts to erase (empty: no edit)")
    guide: tuple[str, ...] = option((), help="what each erased concept maps to: none (\"\"), one, or one per concept")
    preserve: tuple[str, ...] = option((), help="concepts whose cross-attention outputs are kept")
    erase_scale: float = option(1.0, low=0, help="s_e of the closed form")
    preserve_scale: float = option(1.0, low=0, help="s_p of the closed form")
    lamb: float = option(0.5, above=0, why="it keeps the closed form invertible",
                         help="weight of staying close to the original weights")
    token_mode: str = option("last_word", choices=TOKEN_MODES, help="which token embeddings are edited")
    targets: str = option("kv", choices=tuple(TARGETS), help="keys and values, keys or values")

    menu = {"UCE (closed-form edit)": 'uce(erase=["{concept}"])'}

    def __post_init__(self) -> None:
        for f in ("erase", "guide", "preserve"):
            object.__setattr__(self, f, _as_tuple(getattr(self, f)))
        super().__post_init__()  # types, bounds and choices, from the schema above
        if self.guide and len(self.guide) not in (1, len(self.erase)):
            raise ValueError(
                f"UCE has {len(self.erase)} concept(s) to erase but {len(self.guide)} guide concept(s): give none "
                "(the empty prompt), one for all, or one per erase concept."
            )
        both = sorted(set(self.erase) & set(self.preserve))
        if both:
            raise ValueError(f"UCE cannot both erase and preserve {both}.")

    def is_active(self) -> bool:
        return bool(self.erase) and self.erase_scale > 0

    def unconfigured(self) -> str:
        return "" if self.erase else ("`uce` erases nothing: give the concepts with `uce(erase=[\"...\"])` or a preset "
                                      "(`uce(preset=...)`).")

    def guides(self) -> tuple[str, ...]:
        """One guide prompt per erase concept."""
        if not self.guide:
            return ("",) * len(self.erase)
        return self.guide * len(self.erase) if len(self.guide) == 1 else self.guide

    @classmethod
    def own_presets(cls) -> dict[str, dict]:
        """``sd-nudity``: "nudity" towards ``""`` with the old UCE code's settings, i.e. RECE's
        starting checkpoint (``erased-nudity-towards_uncond-preserve_false-...-method_replace``):
        erase_scale 1, preserve_scale 0.1, lamb 0.5, keys and values, token_mode ``to_end``, and the
        empty prompt preserved (what that code does when no preserve set is given). The testbed
        registers ``testbed-striped`` / ``testbed-caged`` / ``testbed-all``
        (:mod:`safediff.testbed.presets`)."""
        return {"sd-nudity": {"erase": ("nudity",), "guide": ("",), "preserve": ("",), "erase_scale": 1.0,
                              "preserve_scale": 0.1, "lamb": 0.5, "token_mode": "to_end", "targets": "kv"}}


class UCE(WeightEditDefense):
    """Applies :func:`uce_closed_form` to every selected cross-attention projection of
    ``model.unet`` (each layer on its own, all from the weights they hold when applied)."""

    config: UCEConfig

    @property
    def edited_parameter_names(self) -> list[str]:
        """Full names (in ``unet.named_parameters()``) of the parameters this edit rewrites."""
        if not self.config.is_active():
            return []
        return sorted(f"{n}.weight" for n in edit_targets(self.model, self.config.targets))

    def new_weights(self) -> dict[str, torch.Tensor]:
        """The new weights, ``{parameter name: W_new}``, from the UNet's current weights; the
        model is not changed."""
        cfg = self.config
        if not cfg.is_active():
            return {}
        with torch.no_grad():
            ce, cg, cp = edit_vectors(self.model, cfg.erase, cfg.guides(), cfg.preserve, cfg.token_mode)
            return {
                f"{name}.weight": uce_closed_form(m.weight, ce, cg, cp, erase_scale=cfg.erase_scale,
                                                  preserve_scale=cfg.preserve_scale, lamb=cfg.lamb)
                for name, m in edit_targets(self.model, cfg.targets).items()
            }

    compute = new_weights


register_defense(name="uce", config_cls=UCEConfig, impl_cls=UCE)
