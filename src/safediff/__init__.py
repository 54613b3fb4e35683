"""safediff: composable defenses, attacks and one pinned evaluation protocol for text-to-image diffusion."""

__version__ = "0.1.0"
