"""Attacks that hit every stack (attacks issue): one interface, cached and resumable results,
evaluated by the runner through the whole defended pipeline.

    >>> from safediff.attacks import AttackBudget, AttackTarget, run_attack, seed_prompts_for
    >>> target = AttackTarget(model, "uce(preset=testbed-striped)")                 # doctest: +SKIP
    >>> res = run_attack("mma", target, "striped", seed_prompts_for("striped", 8),
    ...                  AttackBudget(steps=50), "runs/attacks")                     # doctest: +SKIP

Fine-tune relearning is a weight attack with its own entry point (:func:`relearn`): it returns
weight deltas, evaluated as ``stack + delta(path=...)``.
"""

from .base import (AttackBudget, AttackError, AttackResult, AttackTarget, TextModel, attack_records, get_attack,
                   list_attacks, load_attack, rediscovered_heldout_words, run_attack, seed_prompts_for)
from .relearning import RelearnConfig, RelearnResult, evaluate_relearning, load_relearning, relearn

__all__ = ["AttackBudget", "AttackError", "AttackResult", "AttackTarget", "TextModel", "attack_records", "get_attack",
           "list_attacks", "load_attack", "rediscovered_heldout_words", "run_attack", "seed_prompts_for",
           "RelearnConfig", "RelearnResult", "evaluate_relearning", "load_relearning", "relearn"]
