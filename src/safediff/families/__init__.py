"""Model families: one adapter per family (:mod:`.base`), a registry, and the built-in families.

    >>> from safediff.families import get_family
    >>> get_family("sdxl").capabilities >= {"pooled", "second_clip"}
    True

The testbed's adapter registers itself from :mod:`safediff.testbed.family` (a plug-in the
registry imports on first lookup).
"""

from .base import CAPABILITIES, FamilyAdapter  # noqa: F401
from .registry import PLUGINS, detect, families, get_family, register_family  # noqa: F401
from . import sd1, sd2, sdxl, sd3, flux  # noqa: F401,E402  (registering the built-in families)

__all__ = ["CAPABILITIES", "FamilyAdapter", "PLUGINS", "detect", "families", "get_family", "register_family"]
