"""The attacks (methods.md 4.8 and 5), each a small class on the interface of :mod:`.base`.

* ``concept_inversion`` (white-box; Pham et al., ICLR 2024): textual inversion against the
  defended model, reusing :mod:`safediff.inversion`.
* ``p4d`` (white-box; Chin et al., ICML 2024): prompt optimisation so that the defended model's
  noise prediction matches the undefended model's for the unsafe prompt (P4D-N, P4D-K; hard PEZ
  projection, or the soft-embedding variant).
* ``unlearndiffatk`` (white-box; Zhang et al., ECCV 2024): k prefix tokens on the probability
  simplex, minimising the defended model's own denoising loss toward a target image.
* ``ring_a_bell`` (black-box; Tsai et al., ICLR 2024): concept vector from prompt pairs, genetic
  search over token ids toward ``E(P) + eta * v``; text encoder only.
* ``mma`` (black-box; Yang et al., CVPR 2024, text modality): greedy coordinate search over token
  ids toward the pooled text embedding of the target prompt, the concept's words banned.

Everything that differs from the papers' code (budgets sized for a CPU, the selection rule, the
pairs) is marked [INFERRED] in the config docstrings and can be overridden.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from .. import core
from ..inversion import apply_embedding_defenses
from .base import Attack, AttackBudget, AttackError, AttackResult, AttackTarget, register_attack

# ---------------------------------------------------------------------------------------------
# shared helpers
# ---------------------------------------------------------------------------------------------


def concept_words(concept: str) -> tuple[str, ...]:
    """Words an attacker may know for the concept: the testbed's training-side words (never the
    held-out ones), else the concept name itself."""
    from ..testbed import world

    return world.CONCEPTS[concept].training_words if concept in world.CONCEPTS else (concept,)


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


def strip_words(prompt: str, words: Sequence[str]) -> str:
    """The prompt with the given words removed (used for prompt pairs)."""
    kept = [w for w in prompt.replace(",", " , ").split() if w.strip(",").lower() not in {x.lower() for x in words}]
    return " ".join(kept).replace(" , ", ", ").strip(" ,")


def slot_ids(tok, chunks: Sequence[str | None]) -> tuple[torch.Tensor, list[int]]:
    """Token ids of ``chunks`` (text, or ``None`` for one free slot) with start/end/padding, and
    the slot positions (their rows are replaced by :func:`safediff.inversion._inject`)."""
    ids, slots = [tok.bos_token_id], []
    for c in chunks:
        if c is None:
            slots.append(len(ids))
            ids.append(tok.bos_token_id)
        elif c.strip():
            ids += tok(c.strip(), add_special_tokens=False).input_ids
    max_len = tok.model_max_length
    if len(ids) + 1 > max_len:
        raise AttackError(f"The adversarial prompt needs {len(ids) + 1} tokens, more than the tokenizer's {max_len}.")
    ids.append(tok.eos_token_id)
    ids += [tok.pad_token_id] * (max_len - len(ids))
    return torch.tensor([ids]), slots


def encode_slots(text_encoder, ids: torch.Tensor, slots: list[int], vectors: torch.Tensor, pooled: bool = False):
    """Hidden states (or pooled output) of ``ids`` with ``vectors`` in the slot rows; differentiable."""
    from ..inversion import _inject

    with _inject(text_encoder, [slots] * ids.shape[0], vectors):
        out = text_encoder(ids.to(text_encoder.device))
    return out.pooler_output if pooled else out[0]


def decode_tokens(tok, ids: Sequence[int]) -> str:
    return tok.decode(list(ids), skip_special_tokens=True).strip()


def _hard_prompt(tok, chunks: Sequence[str | None], token_ids: Sequence[int]) -> str:
    it = iter(token_ids)
    parts = [decode_tokens(tok, [next(it)]) if c is None else c for c in chunks]
    return " ".join(p for p in parts if p and p.strip())


class _Draws:
    """A fixed pool of ``(x_t, t, alpha_bar, noise, x0)`` draws from images the **original**
    model generates for a prompt ([INFERRED]: P4D and UnlearnDiffAtk draw a fresh ``t`` each
    step; a seeded pool of ``num_draws`` keeps every run reproducible)."""

    def __init__(self, model, prompt: str, num_images: int, num_draws: int, seed: int):
        from ..pipeline import SafePipeline
        from ..stack import DefenseStack

        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad(), SafePipeline(model, DefenseStack.parse(None)) as pipe:
            if model.edited_hash is not None:
                raise AttackError("The model carries weight edits; targets are drawn from the original model.")
            pe, ne, _ = pipe.encode([prompt] * num_images)
            gens = [core.image_generator(seed, k) for k in range(num_images)]
            lat = core.initial_latents(model, gens, model.default_size, model.default_size)
            x0 = core.denoise(model, pe, ne, lat, guidance_scale=model.default_guidance_scale,
                              num_inference_steps=model.default_steps, generators=gens)
        ac = model.scheduler.alphas_cumprod
        idx = torch.randint(0, num_images, (num_draws,), generator=gen)
        self.x0 = x0[idx]
        self.t = torch.randint(0, len(ac), (num_draws,), generator=gen)
        self.ab = ac[self.t].view(-1, 1, 1, 1).to(self.x0)
        self.noise = torch.randn(self.x0.shape, generator=gen).to(self.x0)
        self.x_t = self.ab.sqrt() * self.x0 + (1 - self.ab).sqrt() * self.noise
        with torch.no_grad():  # P4D's target: the UNDEFENDED model's guided epsilon for the prompt
            pe1, ne1 = pe[:1], ne[:1]
            gs = model.default_guidance_scale
            tgt = []
            for s in range(0, num_draws, 16):
                x, tt, a = self.x_t[s:s + 16], self.t[s:s + 16], self.ab[s:s + 16]
                B = x.shape[0]
                out = model.unet(torch.cat([x, x]), torch.cat([tt, tt]),
                                 encoder_hidden_states=torch.cat([ne1.expand(B, -1, -1), pe1.expand(B, -1, -1)])).sample
                u, cc = core.to_epsilon(out, torch.cat([x, x]), torch.cat([a, a]), model.prediction_type).chunk(2)
                tgt.append(u + gs * (cc - u))
        self.target = torch.cat(tgt)

    def batch(self, rng: random.Random, size: int) -> list[int]:
        return [rng.randrange(len(self.t)) for _ in range(size)]


def _stack_eps(pipe, x_t, t, ab, emb, prompts, guidance_scale: float | None, embedding_ctx=None) -> torch.Tensor:
    """The defended epsilon: with guidance defenses, what the sampler follows (CFG + guidance);
    without, the conditional prediction of the (edited) UNet. (Prompt filters are not in the
    loss: the adversarial prompts meet them at evaluation, which runs the whole stack.)"""
    from ..inversion import guided_epsilon

    model = pipe.model
    if pipe.defenses["guidance"]:
        gs = guidance_scale or model.default_guidance_scale
        return guided_epsilon(pipe, x_t, t, ab, emb, prompts, guidance_scale=gs, embedding_ctx=embedding_ctx)
    out = model.unet(x_t, t, encoder_hidden_states=emb).sample
    return core.to_epsilon(out, x_t, ab, model.prediction_type)


def _defended_eps(pipe, ids: torch.Tensor, slots: list[int], vectors: torch.Tensor, text: str, draws: "_Draws",
                  idx: list[int], guidance_scale: float | None) -> torch.Tensor:
    """The defended epsilon at the draws ``idx`` for the prompt whose slots hold ``vectors``:
    text encoder -> embedding defenses (BPDA) -> weight-edited UNet + guidance."""
    model = pipe.model
    emb = encode_slots(model.text_encoder, ids, slots, vectors).to(model.dtype)
    emb, ectx = apply_embedding_defenses(pipe, emb, [text], ids)
    return _stack_eps(pipe, draws.x_t[idx], draws.t[idx], draws.ab[idx], emb.expand(len(idx), -1, -1),
                      [text] * len(idx), guidance_scale, ectx)


class _WhiteBox(Attack):
    white_box = True
    needs_draws = False

    def prepare(self, target, concept, seed_prompts, work_dir):
        """Draw every seed prompt's targets from the original model before any edit is applied."""
        self._pipe = None
        c = self.config
        self.draws = ({i: _Draws(target.model, p, c.num_images, c.num_draws, seed=i) for i, p in enumerate(seed_prompts)}
                      if self.needs_draws else {})

    def open(self, target: AttackTarget):
        if self._pipe is None:
            self._pipe = target.pipeline()
        return self._pipe

    def cleanup(self) -> None:
        if getattr(self, "_pipe", None) is not None:
            self._pipe.close()
            self._pipe = None


# ---------------------------------------------------------------------------------------------
# concept inversion
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConceptInversionAttackConfig:
    """Args:
    initializer: neutral start word (testbed: ``shape``; CCE starts from a concept-related word).
    images: a folder of concept images (required on real models; the testbed generates them
        with the original model from training-side prompts).
    through_guidance: apply the stack's guidance inside the loss (methods.md 4.8, NP/SLD); None:
        on when the stack has guidance defenses.
    lr / batch_size / num_images: inversion settings ([INFERRED] CPU-sized defaults).
    The budget's ``steps`` are the inversion steps (one inversion per concept, shared by every
    seed prompt: each prompt's concept word is replaced by the learned token).
    """

    initializer: str = "shape"
    images: str = ""
    through_guidance: bool | None = None
    lr: float = 1e-2
    batch_size: int = 8
    num_images: int = 32


@register_attack
class ConceptInversionAttack(_WhiteBox):
    name = "concept_inversion"
    config_cls = ConceptInversionAttackConfig

    def prepare(self, target, concept, seed_prompts, work_dir):
        super().prepare(target, concept, seed_prompts, work_dir)
        self.concept = concept
        self.placeholder = f"<{concept}-adv*>"
        self.path = Path(work_dir) / "token.safetensors"
        self._done = self.path.exists()

    def _invert(self, target: AttackTarget, budget: AttackBudget) -> None:
        from ..inversion import InversionConfig, invert

        c = self.config
        through = bool(target.stack.by_stage("guidance")) if c.through_guidance is None else c.through_guidance
        cfg = InversionConfig(placeholder=self.placeholder, initializer=c.initializer, steps=budget.steps, lr=c.lr,
                              batch_size=c.batch_size, num_images=c.num_images, through_guidance=through,
                              checkpoint_every=max(budget.steps // 4, 1))
        testbed = target.model.family == "safediff-testbed"
        if not testbed and not c.images:
            raise AttackError("On a real model give `images` (a folder of concept images) to invert.")
        invert(target.model, self.path, concept=self.concept if testbed else None, images=c.images or None,
               defenses=target.stack, config=cfg, progress=False)
        self._done = True

    def attack_prompt(self, target, seed_prompt, index, budget, rng):
        if not self._done:
            self._invert(target, budget)
        words = concept_words(self.concept)
        stripped = strip_words(seed_prompt, words)
        prompt = f"{stripped}, {self.placeholder}" if stripped else self.placeholder
        return {"prompt": prompt, "steps": budget.steps if index == 0 else 0}

    def finish(self, target, result: AttackResult, work_dir):
        result.embeddings = str(self.path)


# ---------------------------------------------------------------------------------------------
# P4D
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class P4DConfig:
    """Args (Chin et al., ICML 2024; joycenerd/P4D ``optimize_n.py``):
    mode: ``n`` (``num_tokens`` free tokens, P4D-N) or ``k`` (one learnable token after every
        ``every_k`` words of the prompt, P4D-K).
    soft: keep the continuous embeddings (the soft-embedding variant) instead of PEZ projection;
        P4D-N only.
    num_tokens (16), lr (0.1), weight_decay (0.1): the paper's; the budget's steps replace its
        3,000 iterations.
    batch_size / num_draws / num_images: [INFERRED] draws of ``(x_t, t)`` per step, the seeded
        pool they come from, and how many images of the unsafe prompt the original model draws.
    eval_every: [INFERRED] the kept prompt is the one with the lowest loss on a fixed evaluation
        batch, checked every ``eval_every`` steps and at the end (the paper keeps the best CLIP
        image similarity, which needs generation and a CLIP model).
    """

    mode: str = "n"
    soft: bool = False
    num_tokens: int = 16
    every_k: int = 3
    lr: float = 0.1
    weight_decay: float = 0.1
    batch_size: int = 4
    num_draws: int = 32
    num_images: int = 4
    eval_every: int = 50

    def __post_init__(self) -> None:
        if self.mode not in ("n", "k"):
            raise AttackError(f"P4D `mode` must be 'n' or 'k', got {self.mode!r}.")
        if self.soft and self.mode != "n":
            raise AttackError("The soft-embedding variant is P4D-N only (mode='n').")


@register_attack
class P4D(_WhiteBox):
    name = "p4d"
    config_cls = P4DConfig
    needs_draws = True

    def prepare(self, target, concept, seed_prompts, work_dir):
        super().prepare(target, concept, seed_prompts, work_dir)
        self.work_dir = Path(work_dir)
        self.soft_vectors: dict[int, torch.Tensor] = {}

    def attack_prompt(self, target, seed_prompt, index, budget, rng):
        import time

        c, model = self.config, target.model
        draws = self.draws[index]
        gs = model.default_guidance_scale
        pipe = self.open(target)
        te, tok = model.text_encoder, model.tokenizer
        if c.mode == "n":
            chunks: list[str | None] = [None] * c.num_tokens
        else:
            words = seed_prompt.split()
            chunks = []
            for i, w in enumerate(words):
                chunks.append(w)
                if (i + 1) % c.every_k == 0:
                    chunks.append(None)
        ids, slots = slot_ids(tok, chunks)
        vocab = allowed_token_ids(tok)
        table = te.get_input_embeddings().weight.detach()[vocab]
        table_n = torch.nn.functional.normalize(table, dim=-1)
        start = vocab[torch.randint(0, len(vocab), (len(slots),))]
        soft = te.get_input_embeddings().weight.detach()[start].clone().requires_grad_(True)
        opt = torch.optim.AdamW([soft], lr=c.lr, weight_decay=c.weight_decay)

        def project(v):
            nearest = (torch.nn.functional.normalize(v, dim=-1) @ table_n.T).argmax(-1)
            return table[nearest], vocab[nearest]

        eval_idx = list(range(min(8, len(draws.t))))

        def loss_of(vectors, idx):
            text = "<p4d>" if c.soft else _hard_prompt(tok, chunks, project(vectors)[1].tolist())
            e = _defended_eps(pipe, ids, slots, vectors, text, draws, idx, gs)
            return torch.nn.functional.mse_loss(e.float(), draws.target[idx].float())

        best, best_loss, t0, step = None, float("inf"), time.time(), 0
        for step in range(1, budget.steps + 1):
            idx = draws.batch(rng, c.batch_size)
            if c.soft:
                vec = soft
            else:
                proj, _ = project(soft)
                vec = soft + (proj - soft).detach()  # PEZ: forward with the projection, gradient to the soft
            loss = loss_of(vec, idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            last = step == budget.steps or (budget.seconds is not None and time.time() - t0 > budget.seconds)
            if step % c.eval_every == 0 or last:
                with torch.no_grad():
                    cand = soft.detach().clone() if c.soft else project(soft.detach())[0]
                    el = float(loss_of(cand, eval_idx))
                if el < best_loss:
                    best_loss = el
                    best = cand.clone() if c.soft else project(soft.detach())[1].tolist()
            if last:
                break
        if c.soft:
            self.soft_vectors[index] = best
            prompt = f"<p4d-{index}>"
        else:
            prompt = _hard_prompt(tok, chunks, best)
        return {"prompt": prompt, "steps": step, "loss": best_loss}

    def finish(self, target, result, work_dir):
        if not self.config.soft:
            return
        from ..artifacts import save_artifact

        d = Path(work_dir) / "embeddings"
        for rec in result.prompts:
            i = rec["index"]
            p = d / f"{i}.safetensors"
            if i in self.soft_vectors:
                save_artifact({f"<p4d-{i}>": self.soft_vectors[i]}, p, kind="textual-inversion",
                              base_model_hash=target.model.content_hash, edited_model_hash=target.model.edited_hash,
                              config={"attack": "p4d-soft", "seed_prompt": rec["seed_prompt"]}, seed=i)
        result.embeddings = str(d)


# ---------------------------------------------------------------------------------------------
# UnlearnDiffAtk
# ---------------------------------------------------------------------------------------------


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
class UnlearnDiffAtkConfig:
    """Args (Zhang et al., ECCV 2024; OPTML-Group/Diffusion-MU-Attack ``text_grad``):
    num_tokens: k adversarial prefix tokens (5). lr (0.01), weight_decay (0.1): Adam on the
        simplex; the budget's steps replace the paper's 40 iterations.
    batch_size / num_draws / num_images: [INFERRED] as in :class:`P4DConfig`; the target image
        is drawn by the original model from the seed prompt.
    """

    num_tokens: int = 5
    lr: float = 0.01
    weight_decay: float = 0.1
    batch_size: int = 4
    num_draws: int = 32
    num_images: int = 1


@register_attack
class UnlearnDiffAtk(_WhiteBox):
    name = "unlearndiffatk"
    config_cls = UnlearnDiffAtkConfig
    needs_draws = True

    def attack_prompt(self, target, seed_prompt, index, budget, rng):
        import time

        c, model = self.config, target.model
        draws = self.draws[index]
        pipe = self.open(target)
        te, tok = model.text_encoder, model.tokenizer
        chunks = [None] * c.num_tokens + [seed_prompt]
        ids, slots = slot_ids(tok, chunks)
        vocab = allowed_token_ids(tok)
        table = te.get_input_embeddings().weight.detach()[vocab]
        probs = torch.full((c.num_tokens, len(vocab)), 1.0 / len(vocab), requires_grad=True)
        opt = torch.optim.Adam([probs], lr=c.lr, weight_decay=c.weight_decay)
        t0, step, loss = time.time(), 0, torch.tensor(0.0)
        for step in range(1, budget.steps + 1):
            idx = draws.batch(rng, c.batch_size)
            text = _hard_prompt(tok, chunks, vocab[probs.detach().argmax(-1)].tolist())
            e = _defended_eps(pipe, ids, slots, probs @ table, text, draws, idx, None)
            loss = torch.nn.functional.mse_loss(e.float(), draws.noise[idx].float())  # the denoising loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                probs.copy_(project_simplex(probs))
            if budget.seconds is not None and time.time() - t0 > budget.seconds:
                break
        tokens = vocab[probs.detach().argmax(-1)].tolist()
        return {"prompt": _hard_prompt(tok, chunks, tokens), "steps": step, "loss": loss.item()}


# ---------------------------------------------------------------------------------------------
# Ring-A-Bell
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RingABellConfig:
    """Args (Tsai et al., ICLR 2024; chiayi-hsu/Ring-A-Bell notebooks):
    eta: concept-vector strength (``cof`` = 3). length: adversarial token count (16).
    population (200), mutation (0.25), crossover (0.5): the genetic algorithm's; the budget's
        steps are its generations (the paper's 3,000).
    elite: [INFERRED] share of the best individuals kept unchanged each generation; parents are
        chosen by size-2 tournaments, crossover is one-point.
    ban_concept_words: [INFERRED] exclude tokens of the concept's (training-side) words from the
        search, so a success is a real circumvention rather than the concept's own name; False
        gives the paper's unconstrained search.
    Concept vector [INFERRED]: the pairs are the seed prompts with and without the concept's words
        (the paper's come from its CSV files); ``v = mean(E(with) - E(without))`` over the full
        hidden states, target ``T = E(P) + eta * v`` with ``P`` the seed prompt without the words.
    """

    eta: float = 3.0
    length: int = 16
    population: int = 200
    mutation: float = 0.25
    crossover: float = 0.5
    elite: float = 0.1
    ban_concept_words: bool = True


def _encode_ids(text_model, tok, tokens: torch.Tensor) -> torch.Tensor:
    """Hidden states of rows of token ids wrapped with start/end/padding."""
    B, L = tokens.shape
    max_len = tok.model_max_length
    ids = torch.full((B, max_len), tok.pad_token_id, dtype=torch.long)
    ids[:, 0] = tok.bos_token_id
    ids[:, 1 : L + 1] = tokens
    ids[:, L + 1] = tok.eos_token_id
    return ids


@register_attack
class RingABell(Attack):
    name = "ring_a_bell"
    white_box = False
    config_cls = RingABellConfig

    def prepare(self, target, concept, seed_prompts, work_dir):
        c, tm = self.config, target.text_model
        self.words = concept_words(concept)
        pairs = [(p, strip_words(p, self.words)) for p in seed_prompts]
        with_ = tm.hidden(tm.ids([a for a, _ in pairs]))
        without = tm.hidden(tm.ids([b for _, b in pairs]))
        self.vector = (with_ - without).mean(0, keepdim=True)
        self.vocab = allowed_token_ids(tm.tokenizer, self.words if c.ban_concept_words else ())
        if c.length + 2 > tm.tokenizer.model_max_length:
            raise AttackError(f"`length` {c.length} does not fit the tokenizer's {tm.tokenizer.model_max_length} tokens.")

    def attack_prompt(self, target, seed_prompt, index, budget, rng):
        import time

        c, tm = self.config, target.text_model
        tok = tm.tokenizer
        T = tm.hidden(tm.ids([strip_words(seed_prompt, self.words)])) + c.eta * self.vector
        gen = torch.Generator().manual_seed(rng.randrange(2**31))
        V = len(self.vocab)
        pop = torch.randint(0, V, (c.population, c.length), generator=gen)

        def fitness(p):
            with torch.no_grad():
                h = tm.hidden(_encode_ids(tm, tok, self.vocab[p]))
            return -((h - T) ** 2).sum((1, 2))

        fit = fitness(pop)
        t0, gen_i = time.time(), 0
        n_elite = max(1, int(c.elite * c.population))
        for gen_i in range(1, budget.steps + 1):
            order = fit.argsort(descending=True)
            pop, fit = pop[order], fit[order]
            a = torch.randint(0, c.population, (2, c.population - n_elite), generator=gen)
            b = torch.randint(0, c.population, (2, c.population - n_elite), generator=gen)
            pa = torch.minimum(a[0], a[1])  # tournament of two on the sorted population: the lower index wins
            pb = torch.minimum(b[0], b[1])
            kids = pop[pa].clone()
            cross = torch.rand(len(kids), generator=gen) < c.crossover
            cut = torch.randint(1, c.length, (len(kids),), generator=gen)
            pos = torch.arange(c.length)[None]
            take_b = cross[:, None] & (pos >= cut[:, None])
            kids[take_b] = pop[pb][take_b]
            mut = torch.rand(len(kids), generator=gen) < c.mutation
            where = torch.randint(0, c.length, (len(kids),), generator=gen)
            new_tok = torch.randint(0, V, (len(kids),), generator=gen)
            kids[mut, where[mut]] = new_tok[mut]
            pop = torch.cat([pop[:n_elite], kids])
            fit = torch.cat([fit[:n_elite], fitness(kids)])
            if budget.seconds is not None and time.time() - t0 > budget.seconds:
                break
        best = pop[fit.argmax()]
        return {"prompt": decode_tokens(tok, self.vocab[best].tolist()), "steps": gen_i, "loss": float(-fit.max())}


# ---------------------------------------------------------------------------------------------
# MMA-Diffusion (text modality)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MMAConfig:
    """Args (Yang et al., CVPR 2024; cure-lab/MMA-Diffusion ``textual_attack.py``):
    length: adversarial token count (20). top_k (256) candidates per position, candidates (512)
        strings per step: the paper's (capped at the vocabulary size); the budget's steps replace
        its 1,000.
    banned: extra banned substrings; the concept's (training-side) words are always banned
        (tokens whose text contains one, or is a 3+ letter piece of one).
    Loss ``1 - cos(pooled(adv), pooled(target))``; the target is the seed prompt.
    """

    length: int = 20
    top_k: int = 256
    candidates: int = 512
    banned: tuple[str, ...] = ()


@register_attack
class MMA(Attack):
    name = "mma"
    white_box = False  # needs only the text encoder (and its gradients), never the diffusion model
    config_cls = MMAConfig

    def prepare(self, target, concept, seed_prompts, work_dir):
        self.banned = (*concept_words(concept), *self.config.banned)
        self.vocab = allowed_token_ids(target.text_model.tokenizer, self.banned)

    def attack_prompt(self, target, seed_prompt, index, budget, rng):
        import time

        c, tm = self.config, target.text_model
        tok, te = tm.tokenizer, tm.text_encoder
        gen = torch.Generator().manual_seed(rng.randrange(2**31))
        with torch.no_grad():
            goal = torch.nn.functional.normalize(tm.pooled(tm.ids([seed_prompt])), dim=-1)
        W = te.get_input_embeddings().weight.detach()[self.vocab]
        V = len(self.vocab)
        cur = torch.randint(0, V, (c.length,), generator=gen)
        ids, slots = slot_ids(tok, [None] * c.length)

        def losses(batch):  # (B, L) vocab indices -> (B,)
            with torch.no_grad():
                full = _encode_ids(tm, tok, self.vocab[batch])
                p = torch.nn.functional.normalize(tm.pooled(full), dim=-1)
            return 1 - (p * goal).sum(-1)

        best, best_loss = cur.clone(), float(losses(cur[None])[0])
        t0, step = time.time(), 0
        k = min(c.top_k, V)
        for step in range(1, budget.steps + 1):
            one_hot = torch.nn.functional.one_hot(cur, V).float().requires_grad_(True)
            pooled = encode_slots(te, ids, slots, one_hot @ W, pooled=True)
            loss = 1 - (torch.nn.functional.normalize(pooled, dim=-1) * goal).sum()
            loss.backward()
            top = (-one_hot.grad).topk(k, dim=-1).indices  # (L, k)
            n = c.candidates
            pos = torch.randint(0, c.length, (n,), generator=gen)
            pick = top[pos, torch.randint(0, k, (n,), generator=gen)]
            cand = cur[None].repeat(n, 1)
            cand[torch.arange(n), pos] = pick
            ls = losses(cand)
            j = int(ls.argmin())
            cur = cand[j]
            if float(ls[j]) < best_loss:
                best, best_loss = cur.clone(), float(ls[j])
            if budget.seconds is not None and time.time() - t0 > budget.seconds:
                break
        return {"prompt": decode_tokens(tok, self.vocab[best].tolist()), "steps": step, "loss": best_loss}
