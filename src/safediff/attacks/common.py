"""Helpers shared by the attacks: the attacker's vocabulary, token-id handling, the target
draws of P4D and UnlearnDiffAtk, and the defended epsilon of a prompt with free token slots."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

import torch

from .. import core, encoding
from ..concepts import concept_words  # noqa: F401  (re-exported: the words an attacker may know)
from .base import Attack, AttackError, AttackTarget


def allowed_token_ids(tok, banned: Sequence[str] = ()) -> torch.Tensor:
    """Every non-special token whose text contains none of the ``banned`` words (MMA's filter)."""
    special = {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, *getattr(tok, "all_special_ids", [])}
    banned = [b.lower() for b in banned if b]
    keep = []
    for i in range(len(tok)):
        if i in special:
            continue
        text = tok.convert_ids_to_tokens(i).replace("</w>", "").lower()
        if any(b in text or (len(text) >= 3 and text in b) for b in banned):
            continue
        keep.append(i)
    if not keep:
        raise AttackError("Every token is banned; ban fewer words.")
    return torch.tensor(keep)


def round_trip_token_ids(tok, banned: Sequence[str] = ()) -> torch.Tensor:
    """The :func:`allowed_token_ids` whose text, written as a word of a prompt, tokenizes back to
    exactly that one token (issue 32). Byte pieces that decode to U+FFFD and word pieces that
    merge differently do not: a prompt made of them is not the prompt that was optimised. Real CLIP
    vocabularies are mostly whole words, so the papers' attacks effectively search this set."""
    ids = allowed_token_ids(tok, banned)
    texts = [decode_tokens(tok, [i]) for i in ids.tolist()]
    back = tok(texts, add_special_tokens=False).input_ids
    keep = [i for i, t, b in zip(ids.tolist(), texts, back) if t and "\ufffd" not in t and list(b) == [i]]
    if not keep:
        raise AttackError("No token of this tokenizer tokenizes back to itself; an attack's prompt text would not "
                          "be the prompt it optimised.")
    return torch.tensor(keep)


def strip_words(prompt: str, words: Sequence[str]) -> str:
    """The prompt with the given words removed (used for prompt pairs)."""
    drop = {x.lower() for w in words for x in w.split()}
    kept = [w for w in prompt.replace(",", " , ").split() if w.strip(",").lower() not in drop]
    return " ".join(kept).replace(" , ", ", ").replace(",,", ",").strip(" ,")


def slot_ids(tok, chunks: Sequence[str | None]) -> tuple[torch.Tensor, list[int]]:
    """``(1, L)`` token ids of ``chunks`` (text, or ``None`` for one free slot) and the slots."""
    try:
        ids, slots = encoding.ids_with_slots(tok, chunks)
    except encoding.SlotError as e:
        raise AttackError(str(e)) from None
    return torch.tensor([ids]), slots


def ids_around(tok, tokens: torch.Tensor) -> torch.Tensor:
    """Rows of token ids wrapped with start, end and padding (for the text-only attacks)."""
    B, L = tokens.shape
    ids = torch.full((B, tok.model_max_length), tok.pad_token_id, dtype=torch.long)
    ids[:, 0] = tok.bos_token_id
    ids[:, 1 : L + 1] = tokens
    ids[:, L + 1] = tok.eos_token_id
    return ids


def decode_tokens(tok, ids: Sequence[int]) -> str:
    return tok.decode(list(ids), skip_special_tokens=True).strip()


def hard_prompt(tok, chunks: Sequence[str | None], token_ids: Sequence[int]) -> str:
    """The text of ``chunks`` with each free slot filled by the next of ``token_ids``."""
    it = iter(token_ids)
    parts = [decode_tokens(tok, [next(it)]) if c is None else c for c in chunks]
    return " ".join(p for p in parts if p and p.strip())


def ste_one_hot(probs: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One-hot rows sampled from each row of ``probs`` (rows on the probability simplex) with a
    straight-through gradient (UnlearnDiffAtk's sampler, methods.md 5.5): the forward value is
    exactly one-hot, i.e. a real token, and the backward pass hands the gradient to ``probs``
    unchanged (the hard-tanh estimator is the identity on [0, 1]). Returns ``(one_hot, index)``."""
    weights = probs.detach().float().clamp_min(0)
    empty = weights.sum(-1, keepdim=True) <= 0
    weights = torch.where(empty, torch.ones_like(weights), weights)
    index = torch.multinomial(weights, 1, generator=generator).squeeze(-1)
    hard = torch.nn.functional.one_hot(index, probs.shape[-1]).to(probs.dtype)
    return hard + probs - probs.detach(), index


def pez_project(vectors: torch.Tensor, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """PEZ projection (P4D's optimiser, methods.md 5.1): each row of ``vectors`` replaced by the
    row of the token-embedding ``table`` nearest by cosine similarity. Returns
    ``(table[nearest], nearest)``; a caller keeps the gradient on the soft vectors with
    ``soft + (projected - soft).detach()``."""
    sims = torch.nn.functional.normalize(vectors.detach(), dim=-1) @ torch.nn.functional.normalize(table, dim=-1).T
    nearest = sims.argmax(-1)
    return table[nearest], nearest


class Draws:
    """A fixed pool of ``(x_t, t, noise, x0)`` draws from images the **original** model
    generates for a prompt, and the undefended model's guided epsilon there (P4D's target)
    ([INFERRED]: P4D and UnlearnDiffAtk draw a fresh ``t`` each step; a seeded pool of
    ``num_draws`` keeps every run reproducible). Made with the project's one sampler and
    defended denoiser (an empty stack).

    With ``concept`` on the testbed, the targets are images that **show** the concept (the exact
    detector decides; the papers' targets are unsafe images of the original model): up to
    ``max_tries`` images of the prompt are drawn, in order, and the first ``num_images`` that show
    it are kept (``self.image_indices``). Concepts come part of the time, so an unchecked image 0
    may be a target without the concept. On other models there is no detector to ask, and the first
    ``num_images`` images are the targets."""

    def __init__(self, model, prompt: str, num_images: int, num_draws: int, seed: int, concept: str | None = None,
                 max_tries: int = 16):
        from ..pipeline import SafePipeline
        from ..stack import DefenseStack

        if model.edited_hash is not None:
            raise AttackError("The model carries weight edits; targets are drawn from the original model.")
        detector = _concept_detector(model, concept)
        if detector is not None and max_tries < num_images:
            raise AttackError(f"max_tries ({max_tries}) must be >= num_images ({num_images}).")
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad(), SafePipeline(model, DefenseStack()) as plain:
            tries = num_images if detector is None else max_tries
            gens = [core.image_generator(seed, k) for k in range(tries)]
            lat = core.initial_latents(model, gens, model.default_size, model.default_size,
                                       num_inference_steps=model.default_steps)
            with plain.denoiser([prompt] * tries) as den:
                x0 = core.sample(model, den, lat, num_inference_steps=model.default_steps, generators=gens)
            self.image_indices = list(range(num_images))
            if detector is not None:
                shows = [r.unsafe is True for r in detector.detect(list(core.to_uint8(core.decode(model, x0))))]
                self.image_indices = [k for k, v in enumerate(shows) if v][:num_images]
                if not self.image_indices:
                    raise AttackError(f"The original model drew no image showing {concept!r} for the seed prompt "
                                      f"{prompt!r} in {tries} tries; give a seed prompt that brings the concept "
                                      "(or raise max_tries).")
                x0 = x0[self.image_indices]
                num_images = len(self.image_indices)
            ac = model.scheduler.alphas_cumprod
            self.images = x0  # the target images' latents (UnlearnDiffAtk's timestep schedule noises these afresh)
            self.alphas_cumprod = ac
            idx = torch.randint(0, num_images, (num_draws,), generator=gen)
            self.x0 = x0[idx]
            self.t = torch.randint(0, len(ac), (num_draws,), generator=gen)
            ab = ac[self.t].view(-1, 1, 1, 1).to(self.x0)
            self.noise = torch.randn(self.x0.shape, generator=gen).to(self.x0)
            self.x_t = ab.sqrt() * self.x0 + (1 - ab).sqrt() * self.noise
            with plain.denoiser([prompt]) as den:  # the UNDEFENDED model's guided epsilon for the prompt
                self.target = torch.cat([den.epsilon(self.x_t[s:s + 16], self.t[s:s + 16])
                                         for s in range(0, num_draws, 16)])

    def batch(self, rng: random.Random, size: int) -> list[int]:
        return [rng.randrange(len(self.t)) for _ in range(size)]

    def at(self, t: int, size: int, generator: torch.Generator) -> "NoisedBatch":
        """``size`` target images (cycling through them) noised at one timestep ``t`` with fresh
        noise from ``generator`` (UnlearnDiffAtk's schedule: one ``t`` per block, new noise each step)."""
        x0 = self.images[torch.arange(size) % len(self.images)]
        noise = torch.randn(x0.shape, generator=generator).to(x0)
        ab = self.alphas_cumprod[t].to(x0)
        tt = torch.full((size,), int(t), dtype=torch.long)
        return NoisedBatch(x_t=ab.sqrt() * x0 + (1 - ab).sqrt() * noise, t=tt, noise=noise)


@dataclass
class NoisedBatch:
    """Noised target latents at given timesteps and the noise added (indexable like :class:`Draws`)."""

    x_t: torch.Tensor
    t: torch.Tensor
    noise: torch.Tensor


def _concept_detector(model, concept: str | None):
    """The exact detector of the model's world for ``concept`` (the testbed's), or None where there is
    none to ask."""
    from ..worlds import world_of

    world = world_of(model)
    if not concept or concept not in world.concepts() or not world.exact_detector:
        return None
    from ..detectors import make_detector

    return make_detector(world.detector_spec(concept))


def defended_epsilon(pipe, ids: torch.Tensor, slots: list[int], vectors: torch.Tensor, text: str, draws: Draws,
                     idx: list[int]) -> torch.Tensor:
    """The defended epsilon at the draws ``idx`` for the prompt whose slots hold ``vectors``: text
    encoder -> embedding defenses (straight-through) -> weight-edited UNet + guidance, through the
    pipeline's defended denoiser. With guidance defenses it is the guided epsilon the sampler
    follows (at the model's guidance scale); without, the (edited) model's conditional prediction.
    (Prompt filters are not in the loss: the adversarial prompts meet them at evaluation, which
    runs the whole stack.)"""
    model = pipe.model
    emb = encoding.encode_ids_with_vectors(model.text_encoder, ids, [slots], vectors).to(model.dtype)
    gs = None if pipe.defenses["guidance"] else 1.0
    with pipe.denoiser([text], prompt_embeds=emb, input_ids=ids, guidance_scale=gs, straight_through=True) as den:
        return den.epsilon(draws.x_t[idx], draws.t[idx])


class WhiteBoxAttack(Attack):
    white_box = True
    needs_draws = False

    def prepare(self, target, concept, seed_prompts, work_dir):
        """Draw every seed prompt's targets from the original model before any edit is applied."""
        from tqdm.auto import tqdm

        self._pipe = None
        c = self.config
        self.draws = {}
        if self.needs_draws:
            for i, p in enumerate(tqdm(seed_prompts, desc=f"{self.name}: drawing targets with the original model",
                                       disable=not getattr(self, "progress", False))):
                self.draws[i] = Draws(target.model, p, c.num_images, c.num_draws, seed=i, concept=concept)

    def open(self, target: AttackTarget):
        if self._pipe is None:
            self._pipe = target.pipeline()
        return self._pipe

    def cleanup(self) -> None:
        if getattr(self, "_pipe", None) is not None:
            self._pipe.close()
            self._pipe = None
