"""AdvUnlearn: defensive unlearning with adversarial training (Zhang et al., "Defensive Unlearning
with Adversarial Training for Robust Concept Erasure in Diffusion Models", NeurIPS 2024; reference
code OPTML-Group/AdvUnlearn, ``train-scripts/AdvUnlearn.py``). Our own implementation of its
bi-level loop, with **the text encoder** as the trained module (the paper's choice: an erased text
encoder transfers to other diffusion models of the same encoder):

* **inner (attack)**: ``k`` adversarial token embeddings prefixed to the concept prompt
  (``prefix_k``) are optimised for ``attack_steps`` Adam steps so that the *current* text encoder
  + the frozen UNet predict what the original model predicts for the concept::

      min_v || eps(x_t, TE_theta([v; c]), t) - eps_orig(x_t, c, t) ||^2

  (``pgd``: Adam on the gradient; ``fast_at``: Adam on its sign, both as in the reference code);
* **outer (unlearning)**: ESD's negative-guidance objective on the adversarial prompt, plus the
  utility-retaining regulariser on a batch of benign retain prompts ``r`` (the reference's
  ``retain_train='reg'``)::

      L = || eps(x_t, TE_theta([v; c]), t) - [eps_o(x_t, "", t) - eta (eps_o(x_t, c, t) - eps_o(x_t, "", t))] ||^2
          + retain_weight * || eps(x_r, TE_theta(r), t) - eps_o(x_r, r, t) ||^2

  where ``eps_o`` is the frozen UNet with the *original* text encoder's embeddings, and
  ``x_t`` / ``x_r`` are drawn, as in ESD (:mod:`.esd`), by DDIM sampling of the original model
  with the concept (retain) prompt and guidance ``start_guidance`` up to a random step ``t_enc``.

The first ``warmup`` iterations train on the plain concept prompt (the reference's
``warmup_iter``); after that a new adversarial prefix is found every ``attack_every`` iterations,
warm-started from the last one (``attack_init='latest'``) or from random vocabulary embeddings
(``'random'``, the README's command). Only the text encoder's transformer layers and final layer
norm train (``text_encoder_full``; ``layer0``: its first layer only); the token and position
embeddings never do. The result is a delta file of ``text_encoder.<parameter>`` entries applied by
``delta(path=...)`` (:mod:`safediff.defenses.weight_delta`); training leaves the model exactly as
it found it, and resumes from its checkpoint like ESD.

Presets: ``original`` = the README's multi-step command (``--attack_init random --attack_step 30
--retain_train reg --dataset_retain coco_object --train_method text_encoder_full --retain_loss_w
0.3``) with the script's other defaults (PGD, lr 1e-5, 1,000 iterations, warm-up 200, one prefix
token, attack lr 1e-3, a new attack every iteration, 5 retain prompts, eta 1, start guidance 3, 50
DDIM steps); ``fast-at``: the same with ``--attack_method fast_at``. [INFERRED]: the retain set on
real models is "a photo of {object}" over the 80 COCO category names with the concept's words left
out (the reference ships a 243-prompt COCO-object list filtered the same way; it is not copied);
on the testbed it is the world's benign prompts (concept-free scenes). ``testbed`` and
``testbed-tiny`` are [INFERRED] CPU budgets (docs/defenses.md says what they cost).
Only ``retain_train='reg'`` is implemented (the script's default ``'iter'`` alternates a separate
retain step; the README's commands use ``'reg'``). [INFERRED] The retain draws (prompt order, x_r
noise) have their own random streams, so runs with and without the regulariser see the same
unlearning draws (the reference shares one global generator).

SDXL [INFERRED: the paper and code are SD 1.4 only]: both CLIP encoders train (the same parameter
set in each; ``text_encoder_2.<name>`` entries), the adversarial prefix is ``k`` vectors per encoder
(the same random tokens to start), every UNet call carries the pooled embedding (from the second
encoder, so it trains too) and the default size's numbers, and ``""`` is SDXL's zero unconditional
branch when the model says so (as in :mod:`.esd`). SD3 and FLUX (transformer denoisers, T5) are
refused before any work (``REQUIRES``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from .. import core
from ..artifacts import save_artifact
from ..defenses.weight_delta import TEXT_ENCODER_2_PREFIX, TEXT_ENCODER_PREFIX
from ..denoiser import DefendedDenoiser
from ..encoding import (SlotError, _sdxl_forward, encode_pooled, encode_prompts, ids_with_slots, inject_vectors,
                        sdxl_time_ids)
from ..options import check_options, option
from ..support import check_supported
from ..testbed import world
from ..training import Checkpoint, trained_subset
from ..worlds import world_of

#: the family capabilities AdvUnlearn training needs: a UNet reading CLIP token embeddings (SD 1.x /
#: 2.x, the testbed, SDXL with both its encoders); the transformer families are refused
REQUIRES = frozenset({"unet", "clip_tokens"})


#: [INFERRED] the 80 COCO object category names; "a photo of {name}" is the real-model retain set
COCO_OBJECTS = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
)

#: which text-encoder parameters train (names without a leading ``text_model.``)
PARAMETER_SETS = {
    "full": lambda n: n.startswith(("encoder.", "final_layer_norm.")),  # the reference's text_encoder_full
    "layer0": lambda n: n.startswith("encoder.layers.0."),  # text_encoder_layer0
}


@dataclass(frozen=True)
class AdvUnlearnTrainConfig:
    """Args:
    prompts: concept prompts (one drawn per attack round), e.g. ``("nudity",)``.
    retain_prompts: benign prompts the retain loss keeps (empty: the default set, see the module).
    parameters: the text-encoder parameters trained: ``full`` (all layers + final norm) or ``layer0``.
    eta: ESD's negative guidance. lr / iterations: Adam on the text encoder, number of updates.
    warmup: updates on the plain concept prompt before the attack starts.
    attack: ``pgd`` (Adam on the gradient) or ``fast_at`` (Adam on its sign).
    attack_steps / attack_lr / attack_tokens: the inner attack's steps, Adam lr and prefix length k.
    attack_init: ``latest`` (warm start from the last prefix) or ``random`` (vocabulary embeddings).
    attack_every: a new adversarial prefix every this many updates.
    retain_weight / retain_batch: weight of the retain loss (0: none) and prompts per update.
    ddim_steps / start_guidance: the x_t sampling (null guidance: the model's default).
    """

    prompts: tuple[str, ...] = option(("nudity",), nonblank=True, min_items=1, why="name the concept to erase",
                                      help="concept prompts (one drawn per attack round)")
    retain_prompts: tuple[str, ...] = option((), nonblank=True, help="benign prompts kept (empty: the default set)")
    parameters: str = option("full", choices=tuple(PARAMETER_SETS), help="the text-encoder parameters trained")
    eta: float = option(1.0, help="ESD's negative guidance")
    lr: float = option(1e-5, above=0, help="Adam learning rate on the text encoder")
    iterations: int = option(1000, low=0, help="updates (0: an all-zero delta)")
    warmup: int = option(200, low=0, help="updates on the plain concept prompt before the attack starts")
    attack: str = option("pgd", choices=("pgd", "fast_at"), help="the inner attack's update")
    attack_steps: int = option(30, low=1, help="inner attack steps per round")
    attack_lr: float = option(1e-3, above=0, help="inner attack Adam learning rate")
    attack_tokens: int = option(1, low=1, high=16, help="adversarial prefix tokens k")
    attack_init: str = option("random", choices=("latest", "random"), help="warm start or random vocabulary init")
    attack_every: int = option(1, low=1, help="a new adversarial prefix every this many updates")
    retain_weight: float = option(0.3, low=0, help="weight of the retain loss (0: none)")
    retain_batch: int = option(5, low=1, help="retain prompts per update")
    ddim_steps: int = option(50, low=2, help="DDIM steps of the x_t sampling")
    start_guidance: float | None = option(3.0, help="its guidance scale (null: the model's default)")
    seed: int = option(0, help="seeds the prompts, timesteps, noise and attack init")

    def __post_init__(self) -> None:
        check_options(self, "advunlearn")  # types, bounds and choices, from the schema above

    @classmethod
    def preset(cls, name: str, prompts: tuple[str, ...], **changes) -> "AdvUnlearnTrainConfig":
        """A named preset for ``prompts``, with ``changes`` (config fields) replacing its values."""
        presets = {
            "original": dict(),
            "fast-at": dict(attack="fast_at"),
            # [INFERRED] CPU budgets for the 150k-parameter testbed text encoder (docs/defenses.md)
            "testbed": dict(lr=1e-3, iterations=100, warmup=20, attack_steps=5, attack_lr=1e-2, attack_every=5,
                            retain_batch=4, ddim_steps=25, start_guidance=None),
            "testbed-tiny": dict(lr=1e-3, iterations=4, warmup=2, attack_steps=2, attack_lr=1e-2, retain_batch=2,
                                 ddim_steps=4, start_guidance=None),
        }
        if name not in presets:
            raise ValueError(f"Unknown AdvUnlearn preset {name!r}; choose one of {sorted(presets)}.")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise ValueError(f"Unknown option(s) {unknown} for advunlearn; known: {sorted(names)}.")
        return cls(prompts=tuple(prompts), **{**presets[name], **changes})


def testbed_prompts(concept: str) -> tuple[str, ...]:
    """The concept prompt on the testbed: the concept's explicit name in the world's grammar (as ESD's)."""
    return (world.compose_prompt(None, "shape", None, [world.CONCEPTS[concept].name]),)


def default_retain_prompts(model, concepts: tuple[str, ...], seed: int = 0, n: int = 64) -> tuple[str, ...]:
    """[INFERRED] The retain set. On the testbed: ``n`` captions of concept-free scenes in the world's
    grammar (drawn with their own seed, so not the evaluation's benign suite). Elsewhere: "a photo
    of {object}" over the COCO categories, leaving out those sharing a word with a concept prompt
    (the reference filters its list against the concept the same way)."""
    scenes = world_of(model).scene_prompts(n, f"advunlearn-retain:{seed}")  # the model's world's (the testbed's)
    if scenes is not None:
        return tuple(scenes)
    stop = {"a", "an", "the", "of", "photo", "on", "in", "with"}
    words = {w for c in concepts for w in re.findall(r"[a-z]+", c.lower())} - stop
    kept = tuple(f"a photo of {o}" for o in COCO_OBJECTS if not words & set(o.split()))
    if not kept:
        raise ValueError("Every default retain prompt shares a word with the concept; give `retain_prompts`.")
    return kept


def text_encoder_parameter_names(text_encoder: torch.nn.Module, parameters: str) -> list[str]:
    """The names (as in ``text_encoder.named_parameters()``) that parameter set ``parameters`` trains."""
    if parameters not in PARAMETER_SETS:
        raise ValueError(f"Unknown text-encoder parameter set {parameters!r}; choose one of {list(PARAMETER_SETS)}.")
    keep = PARAMETER_SETS[parameters]
    names = [n for n, _ in text_encoder.named_parameters() if keep(n.removeprefix("text_model."))]
    if not names:
        raise ValueError(f"Parameter set {parameters!r} selects no parameter of this text encoder.")
    return names


@dataclass
class _Cond:
    """A conditioning: token embeddings ``(B, L, D)`` and, on SDXL, the pooled embedding ``(B, P)``."""

    tokens: torch.Tensor
    pooled: torch.Tensor | None = None

    def rows(self, index) -> "_Cond":
        return _Cond(self.tokens[index], None if self.pooled is None else self.pooled[index])

    def repeat(self, n: int) -> "_Cond":
        return _Cond(self.tokens.repeat(n, 1, 1), None if self.pooled is None else self.pooled.repeat(n, 1))

    @staticmethod
    def cat(conds: Sequence["_Cond"]) -> "_Cond":
        pooled = [c.pooled for c in conds]
        return _Cond(torch.cat([c.tokens for c in conds]), None if pooled[0] is None else torch.cat(pooled))


def _encoders(model) -> list[tuple[str, torch.nn.Module, object]]:
    """``(delta-file prefix, text encoder, tokenizer)`` of each CLIP encoder the UNet reads (SDXL: two)."""
    encs = [(TEXT_ENCODER_PREFIX, model.text_encoder, model.tokenizer)]
    if model.has_pooled:
        encs.append((TEXT_ENCODER_2_PREFIX, model.text_encoder_2, model.tokenizer_2))
    return encs


def _original_conditioning(model, prompts: Sequence[str]) -> _Cond:
    """What the original encoders give ``prompts`` (taken before any update)."""
    tokens = encode_prompts(model, list(prompts), warn_truncation=False)[0]
    return _Cond(tokens, encode_pooled(model, list(prompts)) if model.has_pooled else None)


def encode_with_prefix(model, prompts: Sequence[str], k: int, vectors: Sequence[torch.Tensor] | None) -> _Cond:
    """The current encoders' conditioning of ``prompts``, each behind ``k`` prefix slots holding
    ``vectors`` (one ``(k, D_i)`` tensor per encoder; ``k=0`` / None: the plain prompts, as
    :func:`safediff.encoding.encode_prompts` encodes them). Differentiable in the encoders' weights
    and in ``vectors``."""
    encs = _encoders(model)
    rows = [[_prefixed_ids(tok, p, k) for p in prompts] for _, _, tok in encs]
    with contextlib.ExitStack() as stack:
        if vectors is not None and k > 0:
            for (_, te, _), rs, v in zip(encs, rows, vectors):
                stack.enter_context(inject_vectors(te, [r[1] for r in rs], v))
        ids = [torch.cat([r[0] for r in rs]) for rs in rows]
        if len(encs) == 1:
            te = model.text_encoder
            return _Cond(te(ids[0].to(te.device))[0].to(model.dtype))
        tokens, pooled = _sdxl_forward(model, ids[0], ids[1])
        return _Cond(tokens, pooled)


class _Sampler:
    """x_t by the original model's DDIM sampling (guidance ``gs``) to step ``t_enc``, and the
    matching DDPM timestep (ESD's bins); the UNet is frozen, so ``x_t`` never needs gradients.
    On SDXL every UNet call also carries the pooled embedding and the default size's numbers."""

    def __init__(self, model, cfg: AdvUnlearnTrainConfig, empty: _Cond):
        from diffusers import DDIMScheduler

        self.model, self.cfg, self.empty = model, cfg, empty
        self.sched = DDIMScheduler.from_config(model.scheduler.config)
        self.sched.set_timesteps(cfg.ddim_steps)
        self.ac = self.sched.alphas_cumprod
        self.gs = model.default_guidance_scale if cfg.start_guidance is None else cfg.start_guidance
        self.h = model.default_size // model.vae_scale_factor
        self.time_ids = sdxl_time_ids(model.default_size, model.default_size) if empty.pooled is not None else None

    def timestep(self, rng: random.Random) -> tuple[int, torch.Tensor]:
        t_enc = rng.randrange(self.cfg.ddim_steps)
        T = len(self.ac)
        lo, hi = round(t_enc / self.cfg.ddim_steps * T), round((t_enc + 1) / self.cfg.ddim_steps * T)
        return t_enc, torch.tensor([rng.randrange(lo, max(hi, lo + 1))])

    def x_t(self, cond: _Cond, t_enc: int, gen: torch.Generator) -> torch.Tensor:
        m, B = self.model, cond.tokens.shape[0]
        x = torch.randn((B, m.unet.config.in_channels, self.h, self.h), generator=gen).to(m.device, m.dtype)
        x = x * self.sched.init_noise_sigma
        neg = self.empty.repeat(B)
        pooled = {} if cond.pooled is None else {"prompt_pooled": cond.pooled, "negative_pooled": neg.pooled,
                                                 "time_ids": self.time_ids}
        with torch.no_grad():
            den = DefendedDenoiser(m, cond.tokens, neg.tokens, guidance_scale=self.gs, num_steps=self.cfg.ddim_steps,
                                   **pooled)
            return core.sample(m, den, x, num_inference_steps=self.cfg.ddim_steps, scheduler=self.sched,
                               stop_after=t_enc)

    def eps(self, x: torch.Tensor, t: torch.Tensor, cond: _Cond) -> torch.Tensor:
        """The UNet's epsilon prediction (differentiable in ``cond``)."""
        m, B = self.model, x.shape[0]
        ab = self.ac[t].view(-1, 1, 1, 1).to(x)
        added = {} if cond.pooled is None else {"added_cond_kwargs": {
            "text_embeds": cond.pooled, "time_ids": self.time_ids.to(x.device, m.dtype).reshape(1, -1).repeat(B, 1)}}
        out = m.unet(x, t.repeat(B).to(x.device), encoder_hidden_states=cond.tokens, **added).sample
        return core.to_epsilon(out, x, ab, m.prediction_type)


def _prefixed_ids(tok, prompt: str, k: int) -> tuple[torch.Tensor, list[int]]:
    """``(1, L)`` ids of ``k`` free prefix slots followed by ``prompt``, and the slots."""
    ids, slots = ids_with_slots(tok, [None] * k + [prompt])
    return torch.tensor([ids]), slots


def _random_vectors(model, k: int, gen: torch.Generator) -> list[torch.Tensor]:
    """The embedding rows of ``k`` random tokens in each encoder's table (the reference's random init)."""
    tables = [te.get_input_embeddings().weight.detach() for _, te, _ in _encoders(model)]
    rows = torch.randint(0, min(t.shape[0] for t in tables), (k,), generator=gen)
    return [t[rows.to(t.device)].clone().float() for t in tables]


def adversarial_prefix(model, sampler: _Sampler, prompt: str, original: _Cond, cfg: AdvUnlearnTrainConfig,
                       rng: random.Random, gen: torch.Generator,
                       init: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[float]]:
    """The inner attack: ``cfg.attack_steps`` Adam steps on ``k`` prefix vectors per encoder (from
    ``init``) minimising ``|| eps(x_t, TE([v; c]), t) - eps_orig(x_t, c, t) ||^2`` with the current
    text encoders held fixed; ``original`` is the original encoders' conditioning of ``prompt``.
    Returns the vectors and the attack losses."""
    encoders = [te for _, te, _ in _encoders(model)]
    vs = [v.detach().clone().requires_grad_(True) for v in init]
    opt = torch.optim.Adam(vs, lr=cfg.attack_lr)
    flags = [[p.requires_grad for p in te.parameters()] for te in encoders]
    for te in encoders:
        te.requires_grad_(False)
    losses = []
    try:
        for _ in range(cfg.attack_steps):
            t_enc, t = sampler.timestep(rng)
            x = sampler.x_t(original, t_enc, gen)
            with torch.no_grad():
                target = sampler.eps(x, t, original)
            cond = encode_with_prefix(model, [prompt], cfg.attack_tokens, vs)
            loss = torch.nn.functional.mse_loss(sampler.eps(x, t, cond).float(), target.float())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.attack == "fast_at":
                for v in vs:
                    v.grad.sign_()
            opt.step()
            losses.append(loss.item())
    finally:
        for te, fl in zip(encoders, flags):
            for p, f in zip(te.parameters(), fl):
                p.requires_grad_(f)
    return [v.detach() for v in vs], losses


def train_advunlearn(model, out_path: str | Path, cfg: AdvUnlearnTrainConfig, progress: bool = True,
                     checkpoint_every: int = 50, overwrite: bool = False, history: list | None = None) -> Path:
    """Train an AdvUnlearn text-encoder delta against ``model`` (restored exactly afterwards) and save it.

    The delta file holds ``text_encoder.<name>`` entries (SDXL: also ``text_encoder_2.<name>``),
    trained minus original, applied by ``delta(path=...)``. Resumable: every ``checkpoint_every``
    updates the trained weights, the adversarial prefix, the optimiser and the random states go to
    ``<out>.ckpt.safetensors``; a run started again with the same config resumes there. ``history``
    (a list) receives one dict per update (``loss``, ``unlearn``, ``retain``, ``attack``: the last
    attack round's losses). An unsupported family, a half-precision model, a prompt too long for
    its prefix or an existing ``out_path`` (without ``overwrite``) is refused before any work."""
    from tqdm.auto import tqdm

    from ..models import require_fp32

    check_supported("advunlearn", model)  # before any work
    require_fp32(model, "Unlearning (advunlearn)")
    out_path = Path(out_path)
    if out_path.exists() and not overwrite:
        raise FileExistsError(f"{out_path} exists; choose another output or pass overwrite=True (--overwrite).")
    retain = cfg.retain_prompts or default_retain_prompts(model, cfg.prompts, cfg.seed)
    for p in (*cfg.prompts, *retain):  # a prompt too long for the prefix slots: refused before any work
        for _, _, tok in _encoders(model):
            try:
                _prefixed_ids(tok, p, cfg.attack_tokens)
            except SlotError as e:
                raise ValueError(f"AdvUnlearn prompt {p[:60]!r}: {e} Shorten it or lower attack_tokens.") from None
    ckpt = Checkpoint(out_path.with_name(out_path.name + ".ckpt.safetensors"),
                      config=json.dumps(dataclasses.asdict(cfg), sort_keys=True), base_model_hash=model.content_hash)
    encoders = _encoders(model)
    names = {prefix: text_encoder_parameter_names(te, cfg.parameters) for prefix, te, _ in encoders}
    rng = random.Random(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    # the retain draws have their own streams, so the unlearning draws do not depend on retain_weight
    retain_rng = random.Random(f"{cfg.seed}:retain")
    retain_gen = torch.Generator().manual_seed(cfg.seed + 1)
    streams = dict(generators={"noise": gen, "retain_noise": retain_gen}, rngs={"draws": rng, "retain": retain_rng})

    # the original encoders' conditionings, taken before any update (the frozen side of every loss)
    empty = _original_conditioning(model, [""])
    if model.has_pooled and model.force_zeros_for_empty_prompt:  # SDXL's unconditional branch, as its pipeline's
        empty = _Cond(torch.zeros_like(empty.tokens), torch.zeros_like(empty.pooled))
    original = {p: _original_conditioning(model, [p]) for p in dict.fromkeys(cfg.prompts)}
    retain_original = _original_conditioning(model, retain)
    sampler = _Sampler(model, cfg, empty)
    order: list[int] = []  # the retain prompts not yet seen this pass (the reference's unseen-prompt pool)

    unet = model.unet
    unet_flags = [p.requires_grad for p in unet.parameters()]
    unet.requires_grad_(False)
    try:
        with contextlib.ExitStack() as stack:
            subs = {prefix: stack.enter_context(trained_subset(te, names[prefix])) for prefix, te, _ in encoders}
            opt = torch.optim.Adam([p for sub in subs.values() for p in sub.trainable()], lr=cfg.lr)
            state = ckpt.load(optimizer=opt, **streams)
            start, adv, prompt = 0, None, cfg.prompts[0]
            if state is not None:
                tensors = dict(state["tensors"])
                saved_adv = [tensors.pop(f"__adversarial_prefix__.{i}") for i in range(len(encoders))
                             if f"__adversarial_prefix__.{i}" in tensors]
                adv = saved_adv or None
                for prefix, sub in subs.items():
                    sub.load_values({n[len(prefix):]: v for n, v in tensors.items() if n.startswith(prefix)})
                start, prompt = state["step"], state["extra"]["prompt"]
                order = list(state["extra"]["order"])
            attack_losses: list[float] = []
            for it in tqdm(range(start, cfg.iterations), desc="AdvUnlearn", disable=not progress, initial=start,
                           total=cfg.iterations):
                if it > start and it % checkpoint_every == 0:
                    saved = {prefix + n: v for prefix, sub in subs.items() for n, v in sub.values().items()}
                    saved.update({f"__adversarial_prefix__.{i}": v for i, v in enumerate(adv or [])})
                    ckpt.save(it, tensors=saved, optimizer=opt, extra={"prompt": prompt, "order": order}, **streams)
                if it % cfg.attack_every == 0:
                    prompt = rng.choice(cfg.prompts)
                    if it >= cfg.warmup:
                        init = adv if (cfg.attack_init == "latest" and adv is not None) else \
                            _random_vectors(model, cfg.attack_tokens, gen)
                        adv, attack_losses = adversarial_prefix(model, sampler, prompt, original[prompt], cfg, rng,
                                                                gen, init)
                orig = original[prompt]
                t_enc, t = sampler.timestep(rng)
                x = sampler.x_t(orig, t_enc, gen)
                with torch.no_grad():
                    e0, ep = sampler.eps(torch.cat([x, x]), t, _Cond.cat([empty, orig])).chunk(2)
                    target = e0 - cfg.eta * (ep - e0)
                cond = encode_with_prefix(model, [prompt], cfg.attack_tokens if adv is not None else 0, adv)
                unlearn_loss = torch.nn.functional.mse_loss(sampler.eps(x, t, cond).float(), target.float())
                loss, retain_loss = unlearn_loss, torch.zeros(())
                if cfg.retain_weight > 0:
                    if len(order) < cfg.retain_batch:
                        order = list(range(len(retain)))
                        retain_rng.shuffle(order)
                    batch, order = order[:cfg.retain_batch], order[cfg.retain_batch:]
                    r_orig = retain_original.rows(batch)
                    x_r = sampler.x_t(r_orig, t_enc, retain_gen)
                    with torch.no_grad():
                        r_target = sampler.eps(x_r, t, r_orig)
                    r_cond = encode_with_prefix(model, [retain[i] for i in batch], 0, None)
                    retain_loss = torch.nn.functional.mse_loss(sampler.eps(x_r, t, r_cond).float(), r_target.float())
                    loss = unlearn_loss + cfg.retain_weight * retain_loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if history is not None:
                    history.append({"loss": loss.item(), "unlearn": unlearn_loss.item(), "retain": retain_loss.item(),
                                    "attack": list(attack_losses)})
            delta = {prefix + n: d for prefix, sub in subs.items() for n, d in sub.delta().items()}
    finally:
        for p, f in zip(unet.parameters(), unet_flags):
            p.requires_grad_(f)
    path = save_artifact(delta, out_path, kind="advunlearn-delta", base_model_hash=model.content_hash,
                         base_model_family=model.family, config=dataclasses.asdict(cfg), seed=cfg.seed,
                         extra={"retain_prompts": len(retain)})
    ckpt.remove()
    return path


# ---------------------------------------------------------------------------------------------
# Registration (safediff unlearn advunlearn, safediff erase --method advunlearn)
# ---------------------------------------------------------------------------------------------

PRESETS = ("original", "fast-at", "testbed", "testbed-tiny")


def _run(model, out_path: Path, request) -> Path:
    """The registered trainer: AdvUnlearn on the request's concept prompts (testbed: the concept's
    name); ``request`` is a :class:`.registry.UnlearnRequest`."""
    tb = request.testbed_concept
    prompts = testbed_prompts(tb) if tb and not request.prompts else tuple(request.concepts)
    cfg = AdvUnlearnTrainConfig.preset(request.preset or ("testbed" if tb else "original"), prompts,
                                       **{"seed": request.seed, **request.options})
    return train_advunlearn(model, out_path, cfg, progress=request.progress, overwrite=request.overwrite)


def _cli_arguments(p) -> None:
    p.add_argument("--prompt", action="append", help="concept prompt (repeatable); testbed default: the concept name")
    p.add_argument("--concept", default=None,
                   help="testbed concept (when --prompt is not given; default on the testbed: striped)")
    p.add_argument("--preset", default=None, choices=list(PRESETS))
    p.add_argument("--iterations", type=int, default=None, help="updates (default: the preset's)")
    p.add_argument("--attack-steps", dest="attack_steps", type=int, default=None,
                   help="inner attack steps (default: the preset's)")
    p.add_argument("--retain-weight", dest="retain_weight", type=float, default=None,
                   help="retain loss weight (default: the preset's)")
    p.add_argument("--seed", type=int, default=0)


from .registry import register_trainer  # noqa: E402

register_trainer(name="advunlearn", run=_run,
                 summary="AdvUnlearn (Zhang et al. 2024): adversarial text-encoder unlearning",
                 defense="delta", target="trained away from it by negative guidance under an adversarial prefix",
                 cli_arguments=_cli_arguments,
                 cli_options={"iterations": "iterations", "attack_steps": "attack_steps",
                              "retain_weight": "retain_weight"},
                 config=AdvUnlearnTrainConfig)
