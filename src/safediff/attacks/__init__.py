"""Attacks that hit every stack: one interface, cached and resumable results, evaluated by the
runner through the whole defended pipeline. Importing this package registers every attack.

    >>> from safediff.attacks import AttackBudget, AttackTarget, run_attack, seed_prompts_for
    >>> target = AttackTarget(model, "uce(preset=testbed-striped)")                 # doctest: +SKIP
    >>> res = run_attack("mma", target, "striped", seed_prompts_for("striped", 8),
    ...                  AttackBudget(steps=50), "runs/attacks")                     # doctest: +SKIP

Fine-tune relearning (``relearn``) is a weight attack in the same registry: its result holds
weight deltas, evaluated as ``stack + delta(path=...)`` at every checkpoint.
"""

from .base import (Attack, AttackBudget, AttackConfig, AttackError, AttackResult, AttackTarget, TextModel,
                   attack_records, evaluate_attack, evaluate_attack_rules, get_attack, list_attacks, load_attack,
                   rediscovered_heldout_words, register_attack, run_attack, seed_prompts_for)
from . import concept_inversion, mma, p4d, random_prefix, ring_a_bell, unlearndiffatk  # noqa: F401,E402  (registering)
from . import adaptive, latent_inversion  # noqa: F401,E402  (registering; adaptive builds on p4d, mma, concept_inversion)
from .relearning import (RelearnConfig, RelearnResult, evaluate_relearning, load_relearning,  # noqa: E402
                         relearn)

__all__ = ["Attack", "AttackBudget", "AttackConfig", "AttackError", "AttackResult", "AttackTarget", "TextModel",
           "attack_records", "evaluate_attack", "evaluate_attack_rules", "get_attack", "list_attacks", "load_attack",
           "rediscovered_heldout_words", "register_attack", "run_attack", "seed_prompts_for", "RelearnConfig",
           "RelearnResult", "evaluate_relearning", "load_relearning", "relearn"]
