"""Bridges from safediff's defenses to other libraries' pipelines (:mod:`safediff.integrations.diffusers`)."""
