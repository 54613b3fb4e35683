"""Which method runs on which model family, checked first by every entry point.

One table for the trainers (unlearning, the sanitizer, concept inversion) and the attacks; the
defenses' table is :data:`safediff.pipeline.FAMILY_DEFENSES`. :func:`check_supported` refuses a
method on a family it does not run on with one sentence naming the method, the family and the
missing capability, **before** any data is asked for or any work is done::

    >>> from safediff.support import check_supported
    >>> check_supported("duo", model)          # doctest: +SKIP
    UnsupportedMethodError: duo does not run on sdxl models: ...
"""

from __future__ import annotations

from typing import Any

from .models import TESTBED_FAMILY

_UNET_ONE_ENCODER = ("sd1", "sd2", TESTBED_FAMILY)
_UNET = (*_UNET_ONE_ENCODER, "sdxl")
_ALL = (*_UNET, "sd3", "flux")

#: method -> (families it runs on, what the others lack)
METHOD_FAMILIES: dict[str, tuple[tuple[str, ...], str]] = {
    # trainers (safediff unlearn / erase / sanitizer train / invert)
    "esd": (_UNET, "its training loop trains a UNet's parameter sets, and the transformer families have none"),
    "duo": (_UNET_ONE_ENCODER, "its training loop is written for one text encoder's UNet calls (no pooled "
                               "embedding or second encoder)"),
    "dark_miner": (_UNET_ONE_ENCODER, "its mining and training loops are written for one text encoder's UNet calls "
                                      "(no pooled embedding or second encoder)"),
    "uce": (_ALL, ""),
    "rece": (_ALL, ""),
    "sanitizer": (_ALL, ""),
    "inversion": (_UNET, "the transformer families' T5 encoder has no textual-inversion layout"),
    # attacks (safediff attack)
    "ring_a_bell": (_ALL, ""),
    "mma": (_ALL, ""),
    "random_prefix": (_ALL, ""),
    "p4d": (_UNET_ONE_ENCODER, "its prompt optimisation goes through one text encoder (not wired through SDXL's two "
                               "encoders or the transformers' T5)"),
    "unlearndiffatk": (_UNET_ONE_ENCODER, "its prompt optimisation goes through one text encoder (not wired through "
                                          "SDXL's two encoders or the transformers' T5)"),
    "concept_inversion": (_UNET, "it inverts a textual-inversion token, which the transformer families' T5 encoder "
                                 "has no layout for"),
    "relearn": (_UNET_ONE_ENCODER, "its fine-tuning loop is written for one text encoder's UNet calls (no pooled "
                                   "embedding or second encoder)"),
}

#: spellings the command line and the registries use for the same method
_ALIASES = {"dark-miner": "dark_miner", "darkminer": "dark_miner", "unlearn_diff_atk": "unlearndiffatk",
            "concept-inversion": "concept_inversion", "ine": "inversion", "invert": "inversion"}


class UnsupportedMethodError(ValueError):
    """A method asked of a model family it does not run on (raised before any work)."""


def _family(model: Any) -> str:
    return model if isinstance(model, str) else getattr(model, "family", "")


def supported_families(method: str) -> tuple[str, ...]:
    """The families ``method`` runs on."""
    key = _ALIASES.get(method, method)
    if key not in METHOD_FAMILIES:
        raise ValueError(f"No support entry for method {method!r}; known: {sorted(METHOD_FAMILIES)}.")
    return METHOD_FAMILIES[key][0]


def is_supported(method: str, model: Any) -> bool:
    """Whether ``method`` runs on ``model`` (a Model or a family name)."""
    return _family(model) in supported_families(method)


def check_supported(method: str, model: Any) -> None:
    """Raise :class:`UnsupportedMethodError` (one sentence) when ``method`` does not run on
    ``model``'s family; call it first, before asking for data or doing any work. ``model`` None
    (no model to check yet) passes."""
    key = _ALIASES.get(method, method)
    families = supported_families(key)
    family = _family(model)
    if model is None or family in families:
        return
    runs_on = ", ".join(f for f in families if f != TESTBED_FAMILY) + " and the testbed"
    raise UnsupportedMethodError(f"{method} does not run on {family} models: {METHOD_FAMILIES[key][1]}; it runs on "
                                 f"{runs_on} (docs/models.md).")
