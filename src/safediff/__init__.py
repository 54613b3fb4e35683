"""safediff: composable defenses, attacks and one pinned evaluation protocol for text-to-image diffusion.

Example:
    >>> import safediff
    >>> out = safediff.generate("a red circle on white background, zebra",
    ...                         defenses='negative_prompt(text="striped")')  # doctest: +SKIP
"""

from ._version import __version__  # noqa: F401

from . import defenses  # noqa: E402,F401  (registers the built-in defenses)
from .testbed import presets as _testbed_presets  # noqa: E402,F401  (the testbed's concepts and presets)
from .api import generate, write_images  # noqa: E402
from .models import Model, ModelError, load_model  # noqa: E402
from .pipeline import SafePipeline, build  # noqa: E402
from .stack import DefenseStack  # noqa: E402

__all__ = ["generate", "build", "load_model", "Model", "ModelError", "SafePipeline", "DefenseStack", "write_images", "__version__"]
