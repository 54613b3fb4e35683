"""Which UNet parameters an ESD run trains (Gandikota et al., "Erasing Concepts from Diffusion
Models", ICCV 2023; methods.md 4.3), by diffusers parameter name.

The original code (``train-scripts/train-esd.py``, CompVis naming) selects by name:

* ``noxattn`` -> **esd-u**: everything except the cross-attention (``attn2``), the final output
  layers (CompVis ``out.``, i.e. diffusers ``conv_norm_out`` / ``conv_out``) and the timestep
  embedding MLP (CompVis ``time_embed``, diffusers ``time_embedding``). Used for nudity. Only the
  *top-level* ``out.`` is meant: a substring test on ``"out."`` would also drop every
  ``to_out`` / ``proj_out``, and ``time_embed`` does not cover the resnets' ``time_emb_proj``
  (CompVis ``emb_layers``), which are trained;
* ``xattn`` -> **esd-x**: only the cross-attention ``attn2`` (to_q, to_k, to_v, to_out). Used for
  artist styles;
* ``selfattn`` -> **esd-self**: only the self-attention ``attn1``;
* ``full`` -> **esd-all**: every parameter;
* ``notime`` -> **esd-notime**: everything except the output layers and the timestep embedding;
* the 2024 diffusers rewrite (``esd_sd.py``) adds **esd-x-strict**: ``attn2.to_k`` and
  ``attn2.to_v`` only.

(The 2024 rewrite also keeps only ``Linear``/``Conv2d`` weights, dropping norms, and its esd-u
keeps ``conv_out`` and ``time_embedding``; the sets here follow the original code, which made the
ESD-u checkpoints the attacks are evaluated on.)
"""

from __future__ import annotations

from typing import Callable

import torch

_OUTPUT_AND_TIME = ("conv_out.", "conv_norm_out.", "time_embedding.")


def _is_xattn(name: str) -> bool:
    return ".attn2." in f".{name}"


def _is_selfattn(name: str) -> bool:
    return ".attn1." in f".{name}"


def _is_output_or_time(name: str) -> bool:
    return name.startswith(_OUTPUT_AND_TIME)


def _is_xattn_kv(name: str) -> bool:
    return ".attn2.to_k." in f".{name}" or ".attn2.to_v." in f".{name}"


#: method -> predicate on a diffusers UNet parameter name
ESD_METHODS: dict[str, Callable[[str], bool]] = {
    "esd-u": lambda n: not (_is_xattn(n) or _is_output_or_time(n)),
    "esd-x": _is_xattn,
    "esd-x-strict": _is_xattn_kv,
    "esd-self": _is_selfattn,
    "esd-all": lambda n: True,
    "esd-notime": lambda n: not _is_output_or_time(n),
}


def esd_parameter_names(unet: torch.nn.Module, method: str) -> list[str]:
    """Names of the ``unet`` parameters that ESD ``method`` trains, in ``named_parameters`` order.

    Args:
        unet: a diffusers ``UNet2DConditionModel`` (names as in its ``named_parameters()``).
        method: one of :data:`ESD_METHODS` (``esd-u``, ``esd-x``, ``esd-x-strict``, ``esd-self``,
            ``esd-all``, ``esd-notime``).

    Raises:
        ValueError: an unknown method, or a method that selects nothing on this UNet.
    """
    if method not in ESD_METHODS:
        raise ValueError(f"Unknown ESD parameter set {method!r}; choose one of {list(ESD_METHODS)}.")
    keep = ESD_METHODS[method]
    names = [n for n, _ in unet.named_parameters() if keep(n)]
    if not names:
        raise ValueError(f"ESD parameter set {method!r} selects no parameter of this UNet.")
    return names


def esd_parameters(unet: torch.nn.Module, method: str) -> dict[str, torch.nn.Parameter]:
    """``{name: parameter}`` of :func:`esd_parameter_names` (the tensors to hand an optimiser)."""
    params = dict(unet.named_parameters())
    return {n: params[n] for n in esd_parameter_names(unet, method)}
