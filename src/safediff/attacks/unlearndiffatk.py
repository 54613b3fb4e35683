"""UnlearnDiffAtk (Zhang et al., "To generate or not? Safety-driven unlearned diffusion models are
still easy to generate unsafe images ... for now", ECCV 2024; methods.md 5.3, 5.5): ``k`` prefix
tokens on the probability simplex, minimising the defended model's own denoising loss toward a
target image drawn by the original model. As in the paper's code, the model never sees a mixture of
token embeddings: each step samples one-hot tokens from the simplex (straight-through gradient,
:func:`.common.ste_one_hot`), steps Adam and projects back onto the simplex. The argmax prompt is
recorded every ``check_every`` steps (``candidates``) so that the paper's early-stop rule (the first
unsafe step wins) can be counted after the fact (:func:`safediff.eval.protocol.attack_success_rates`)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .base import AttackConfig, AttackError, register_attack
from .common import WhiteBoxAttack, defended_epsilon, hard_prompt, round_trip_token_ids, slot_ids, ste_one_hot


def project_simplex(v: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of each row onto the probability simplex (sort-based; the paper's
    bisection solves the same problem)."""
    u, _ = torch.sort(v, dim=-1, descending=True)
    css = u.cumsum(-1) - 1
    k = torch.arange(1, v.shape[-1] + 1, device=v.device, dtype=v.dtype)
    cond = u - css / k > 0
    rho = cond.float().cumsum(-1).argmax(-1, keepdim=True)
    theta = css.gather(-1, rho) / (rho + 1).to(v.dtype)
    return (v - theta).clamp_min(0)


@dataclass(frozen=True)
class UnlearnDiffAtkConfig(AttackConfig):
    """Args (Zhang et al., ECCV 2024; OPTML-Group/Diffusion-MU-Attack ``text_grad``):
    num_tokens: k adversarial prefix tokens (5). lr (0.01), weight_decay (0.1): Adam on the
        simplex; the budget's steps replace the paper's 40 iterations.
    batch_size / num_draws / num_images: [INFERRED] as in :class:`P4DConfig`; the target image
        is drawn by the original model from the seed prompt.
    check_every: record the argmax prompt every this many steps (1: every step, as the paper's
        code, which evaluates after each ``iteration = 1`` block and stops at the first unsafe image).
    """

    num_tokens: int = 5
    lr: float = 0.01
    weight_decay: float = 0.1
    batch_size: int = 4
    num_draws: int = 32
    num_images: int = 1
    check_every: int = 1

    def __post_init__(self) -> None:
        if self.num_tokens < 1 or self.check_every < 1:
            raise AttackError(f"UnlearnDiffAtk needs num_tokens >= 1 and check_every >= 1, got {self.num_tokens} "
                              f"and {self.check_every}.")


@register_attack
class UnlearnDiffAtk(WhiteBoxAttack):
    name = "unlearndiffatk"
    config_cls = UnlearnDiffAtkConfig
    needs_draws = True

    def attack_prompt(self, target, seed_prompt, index, budget, rng):
        c, model = self.config, target.model
        draws = self.draws[index]
        pipe = self.open(target)
        te, tok = model.text_encoder, model.tokenizer
        chunks = [None] * c.num_tokens + [seed_prompt]
        ids, slots = slot_ids(tok, chunks)
        vocab = round_trip_token_ids(tok)  # the written prompt re-tokenizes to the optimised tokens
        table = te.get_input_embeddings().weight.detach()[vocab]
        probs = torch.full((c.num_tokens, len(vocab)), 1.0 / len(vocab), requires_grad=True)
        opt = torch.optim.Adam([probs], lr=c.lr, weight_decay=c.weight_decay)
        gen = torch.Generator().manual_seed(rng.randrange(2**31))  # the token sampler's seed, from the run's seed
        t0, step, loss = time.time(), 0, torch.tensor(0.0)
        candidates = []
        for step in range(1, budget.steps + 1):
            idx = draws.batch(rng, c.batch_size)
            one_hot, sampled = ste_one_hot(probs, gen)  # real tokens forward, gradient to the simplex
            text = hard_prompt(tok, chunks, vocab[sampled].tolist())
            e = defended_epsilon(pipe, ids, slots, one_hot @ table, text, draws, idx)
            loss = torch.nn.functional.mse_loss(e.float(), draws.noise[idx].float())  # the denoising loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                probs.copy_(project_simplex(probs))
            last = step == budget.steps or (budget.seconds is not None and time.time() - t0 > budget.seconds)
            if step % c.check_every == 0 or last:
                candidates.append({"step": step, "prompt": hard_prompt(tok, chunks,
                                                                        vocab[probs.detach().argmax(-1)].tolist())})
            if last:
                break
        return {"prompt": candidates[-1]["prompt"], "steps": step, "loss": loss.item(), "candidates": candidates}
