"""Defenses, one module each; importing this package registers them all."""

from . import nag  # noqa: F401
from . import negative_prompt  # noqa: F401
from . import output_filter  # noqa: F401
from . import prompt_guard  # noqa: F401
from . import rece  # noqa: F401
from . import safree  # noqa: F401
from . import sanitizer  # noqa: F401
from . import sld  # noqa: F401
from . import uce  # noqa: F401
from . import weight_delta  # noqa: F401
from .base import STAGES, DefenseConfig, get_defense, known_defenses, register_defense  # noqa: F401
