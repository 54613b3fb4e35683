"""Concept inversion: one textual-inversion core (Gal et al. ICLR 2023, methods.md 4.7) used
against any model, edited (unlearned) ones included (Pham et al. ICLR 2024, "Circumventing concept
erasure", methods.md 4.8). INE, Dark Miner's mining and the inversion attacks reuse it.

* Learns ``num_vectors`` token embeddings for a placeholder such as ``<striped*>``; the UNet, VAE
  and text encoder stay frozen and **unmodified**: the vectors enter through a forward hook on the
  text encoder's input-embedding layer at known token positions (:func:`encode_with_vectors`), so
  no row of the model's embedding table is touched and nothing needs restoring.
* Loss in epsilon space whatever the model predicts: ``|| eps - eps_theta(x_t, t, tau(caption)) ||^2``
  with the prediction converted by :func:`safediff.core.to_epsilon`.
* Concept images come from a folder, or are generated on the fly by the **original, unedited**
  model (an edited one may no longer draw the concept), from training-side prompts only.
* Optionally the stack's guidance (negative prompt, SLD...) acts inside the training forward pass
  (methods.md 4.8: CCE's NP/SLD variants): the loss is then on the guided epsilon.
* Saved in the textual-inversion format that vanilla diffusers ``load_textual_inversion`` reads
  (``{placeholder: (num_vectors, D)}``), with a provenance record naming the base model's content
  hash and the edited model's (the stack hash of the weight edits) it was inverted on.
* Resumable: a checkpoint next to the output is written every ``checkpoint_every`` steps.

Testbed defaults are [INFERRED] (the INE paper's own settings are unknown; CCE uses 5,000 steps,
lr 5e-3, batch 4 x 4, 25 images at 512 px): 400 steps, lr 1e-2, batch 8, 32 images.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from . import core
from .artifacts import check_provenance, read_artifact, save_artifact


@dataclass(frozen=True)
class InversionConfig:
    """Args:
    placeholder: the new token, e.g. ``"<striped*>"``.
    initializer: word whose embedding initialises every vector (default: the first concept word).
    num_vectors: vectors behind the placeholder.
    steps / lr / batch_size: optimisation (Adam, constant lr).
    num_images: concept images generated when no folder is given.
    guidance_scale: guidance of the on-the-fly generation (default: the model's).
    through_guidance: apply the stack's guidance defenses inside the training forward pass.
    checkpoint_every: steps between resumable checkpoints.
    seed: seeds generation, initialisation order and noise.
    """

    placeholder: str = "<concept*>"
    initializer: str = ""
    num_vectors: int = 1
    steps: int = 400
    lr: float = 1e-2
    batch_size: int = 8
    num_images: int = 32
    guidance_scale: float | None = None
    through_guidance: bool = False
    checkpoint_every: int = 100
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.placeholder.strip() or " " in self.placeholder:
            raise ValueError(f"`placeholder` must be one non-empty word, got {self.placeholder!r}.")
        for name in ("num_vectors", "steps", "batch_size", "num_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be >= 1, got {getattr(self, name)}.")
        if not self.lr > 0:
            raise ValueError(f"`lr` must be > 0, got {self.lr}.")


# ---------------------------------------------------------------------------------------------
# encoding with learned vectors (no change to the model)
# ---------------------------------------------------------------------------------------------


def _slot_ids(tok, text: str, placeholder: str, n: int, slot_id: int) -> tuple[list[int], list[int]]:
    """Token ids of ``text`` with each ``placeholder`` expanded to ``n`` slots; returns (ids, slot positions)."""
    parts = text.split(placeholder)
    ids = [tok.bos_token_id]
    slots: list[int] = []
    for i, part in enumerate(parts):
        if part.strip():
            ids += tok(part.strip(), add_special_tokens=False).input_ids
        if i < len(parts) - 1:
            slots += list(range(len(ids), len(ids) + n))
            ids += [slot_id] * n
    max_len = tok.model_max_length
    if len(ids) + 1 > max_len:
        raise ValueError(f"{text!r} is longer than the tokenizer's {max_len} tokens once the placeholder is expanded.")
    ids.append(tok.eos_token_id)
    ids += [tok.pad_token_id] * (max_len - len(ids))
    return ids, slots


@contextlib.contextmanager
def _inject(text_encoder, positions: list[list[int]], vectors: torch.Tensor):
    """Forward hook replacing input-embedding rows at ``positions[b]`` by ``vectors``."""
    emb = text_encoder.get_input_embeddings()

    def hook(module, inputs, output):
        out = output.clone()
        for b, pos in enumerate(positions):
            if pos:
                out[b, pos] = vectors.to(out.dtype).repeat(len(pos) // len(vectors), 1)
        return out

    handle = emb.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def encode_with_vectors(model, texts: Sequence[str], placeholder: str, vectors: torch.Tensor,
                        pooled: bool = False) -> torch.Tensor:
    """Encode ``texts`` in which ``placeholder`` stands for the learned ``vectors`` ``(n, D)``.

    Returns the hidden states ``(B, L, D)``, or the pooled output ``(B, D)`` with ``pooled=True``.
    Differentiable in ``vectors``; the model is not modified.
    """
    tok = model.tokenizer
    slot_id = tok.bos_token_id  # any real id: its embedding is replaced; not EOS (pooling looks for EOS)
    rows = [_slot_ids(tok, t, placeholder, len(vectors), slot_id) for t in texts]
    ids = torch.tensor([r[0] for r in rows], device=model.text_encoder.device)
    with _inject(model.text_encoder, [r[1] for r in rows], vectors):
        out = model.text_encoder(ids)
        return (out.pooler_output if pooled else out[0]).to(model.dtype)


def encode_prompts_with_tokens(model, prompts: Sequence[str], concepts: Sequence["InvertedConcept"], *,
                               warn_truncation: bool = True):
    """:func:`core.encode_prompts` in which each concept's placeholder stands for its vectors
    (a prompt may hold one kind of placeholder). Returns ``(embeds, input_ids, mask)``; the ids of
    the placeholder slots are the start token's (their embedding rows are replaced)."""
    prompts = list(prompts)
    embeds, ids, mask = core.encode_prompts(model, prompts, warn_truncation=warn_truncation)
    for c in concepts:
        idx = [i for i, p in enumerate(prompts) if c.placeholder in p]
        if not idx:
            continue
        tok = model.tokenizer
        rows = torch.tensor([_slot_ids(tok, prompts[i], c.placeholder, len(c.vectors), tok.bos_token_id)[0] for i in idx])
        with torch.no_grad():
            e = encode_with_vectors(model, [prompts[i] for i in idx], c.placeholder, c.vectors)
        embeds = embeds.clone()
        embeds[idx] = e.to(embeds)
        ids[idx] = rows
        mask[idx] = core._real_token_mask(rows, tok)
    return embeds, ids, mask


# ---------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------


@dataclass
class InvertedConcept:
    placeholder: str
    vectors: torch.Tensor  # (n, D)
    record: dict

    def encode(self, model, texts: Sequence[str] | None = None, pooled: bool = False) -> torch.Tensor:
        return encode_with_vectors(model, texts or [self.placeholder], self.placeholder, self.vectors, pooled=pooled)


def load_inverted(path: str | os.PathLike, model=None, *, allow_other_base: bool = False,
                  edited_model_hash: str | None = None) -> InvertedConcept:
    """Read a textual-inversion file (ours or diffusers'); check its base model against ``model``."""
    tensors, record = read_artifact(path)
    keys = [k for k in tensors if k not in ("emb_params", "string_to_param")]
    if "emb_params" in tensors:
        placeholder, vec = record.get("placeholder", "<concept*>"), tensors["emb_params"]
    elif len(keys) == 1:
        placeholder, vec = keys[0], tensors[keys[0]]
    else:
        raise ValueError(f"{path} is not a textual-inversion file (expected one token key, got {list(tensors)}).")
    vec = vec if vec.dim() == 2 else vec[None]
    if model is not None:
        width = model.text_encoder.get_input_embeddings().weight.shape[1]
        if vec.shape[1] != width:
            raise ValueError(f"{path} holds {vec.shape[1]}-wide vectors, but this text encoder is {width} wide: "
                             "it was made for another text encoder.")
        check_provenance(record, model, path=str(path), allow_other_base=allow_other_base,
                         edited_model_hash=edited_model_hash)
    return InvertedConcept(placeholder, vec.float(), record)


# ---------------------------------------------------------------------------------------------
# concept images
# ---------------------------------------------------------------------------------------------


def testbed_concept_prompts(concept: str, n: int, seed: int = 0) -> list[tuple[str, str]]:
    """``n`` (prompt, caption-template) pairs for a testbed concept, training-side words only.

    The caption template is the prompt with the concept word replaced by ``{}``, so the learned
    token absorbs the concept, not the shape or colour.
    """
    from .testbed import world

    c = world.CONCEPTS[concept]
    rng = random.Random(f"invert:{concept}:{seed}")
    out = []
    for i in range(n):
        s = world.random_scene(rng)
        word = c.training_words[i % len(c.training_words)]
        bg = f"on {s.background} background"
        out.append((world.compose_prompt(s.colour, s.shape, bg, [word]), world.compose_prompt(s.colour, s.shape, bg, ["{}"])))
    return out


def draw_with_original_model(model, prompts: Sequence[str], *, guidance_scale: float | None = None, seed: int = 0,
                             seeds: Sequence[int] | None = None, concept: str | None = None,
                             present: bool = True) -> tuple[list[np.ndarray], list[int]]:
    """Images the ORIGINAL model (no defense, no edit) draws for ``prompts``, and the indices to
    keep: on the testbed with ``concept``, those in which the exact detector finds the concept
    (``present=True``) or does not (``present=False``); otherwise all. Shared by inversion, Dark
    Miner's concept pool and relearning."""
    from .pipeline import SafePipeline
    from .stack import DefenseStack

    with SafePipeline(model, DefenseStack()) as plain:
        res = plain(list(prompts), seed=seed, seeds=seeds, guidance_scale=guidance_scale, batch_size=32)
    arrays = [np.asarray(r.image) for r in res.records]
    if concept is None or model.family != "safediff-testbed":
        return arrays, list(range(len(arrays)))
    from .testbed import world

    return arrays, [i for i, a in enumerate(arrays) if (concept in world.detect(a).concepts) == present]


def load_image_folder(folder: str | os.PathLike, size: int) -> list[np.ndarray]:
    from PIL import Image

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"Concept image folder {folder} does not exist.")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".webp"})
    if not files:
        raise ValueError(f"{folder} holds no .png/.jpg/.webp images.")
    return [np.asarray(Image.open(p).convert("RGB").resize((size, size), Image.BICUBIC)) for p in files]


# ---------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------


def invert(
    model,
    out_path: str | os.PathLike,
    *,
    concept: str | None = None,
    images: Sequence[np.ndarray] | str | os.PathLike | None = None,
    captions: Sequence[str] | None = None,
    defenses=None,
    config: InversionConfig = InversionConfig(),
    progress: bool = True,
    verify: bool = True,
) -> Path:
    """Learn ``config.placeholder`` for ``concept`` against ``model`` with ``defenses`` applied.

    Args:
        model: the **original** model (images are generated with it before any edit is applied).
        concept: a testbed concept name: its training-side prompts generate the images.
        images: a folder or arrays of concept images instead of generating them.
        captions: caption templates with ``{}`` for the placeholder (default ``"{}"``).
        defenses: a stack; its weight edits are the edited model inverted on; with
            ``config.through_guidance`` its guidance defenses act inside the loss.
        verify: on the testbed, keep only generated images the exact detector confirms.
    """
    from tqdm.auto import tqdm

    from .pipeline import SafePipeline
    from .stack import DefenseStack

    stack = DefenseStack.parse(defenses)
    out_path = Path(out_path)
    cfg = config
    gen = torch.Generator().manual_seed(cfg.seed)

    # 1. concept images, from the ORIGINAL model (no stack)
    if images is None:
        if concept is None:
            raise ValueError("Give `images` (a folder) or a testbed `concept` to generate them from.")
        pairs = testbed_concept_prompts(concept, cfg.num_images, cfg.seed)
        arrays, keep = draw_with_original_model(model, [p for p, _ in pairs], seed=cfg.seed,
                                                guidance_scale=cfg.guidance_scale, concept=concept if verify else None)
        if not keep:
            raise RuntimeError(f"The model drew the concept {concept!r} in none of {len(arrays)} images; cannot invert it.")
        arrays, caps = [arrays[i] for i in keep], [pairs[i][1] for i in keep]
    else:
        arrays = load_image_folder(images, model.default_size) if isinstance(images, (str, os.PathLike)) else list(images)
        caps = list(captions) if captions else ["{}"] * len(arrays)
    if len(caps) != len(arrays):
        raise ValueError(f"{len(caps)} captions for {len(arrays)} images.")
    caps = [c.replace("{}", cfg.placeholder) for c in caps]

    tok = model.tokenizer
    init_word = cfg.initializer or (concept or "")
    init_ids = tok(init_word, add_special_tokens=False).input_ids if init_word else []
    table = model.text_encoder.get_input_embeddings().weight
    init = table[init_ids].mean(0) if init_ids else table.mean(0)
    vectors = torch.nn.Parameter(init.detach().float().clone()[None].repeat(cfg.num_vectors, 1))
    opt = torch.optim.Adam([vectors], lr=cfg.lr)

    with torch.no_grad():
        px = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div(127.5).sub(1).to(model.device, model.dtype)
        latents = model.vae.encode(px).latent_dist.mean * model.vae.config.scaling_factor

    ckpt = out_path.with_name(out_path.name + ".ckpt.safetensors")
    start = 0
    cfg_json = json.dumps(dataclasses.asdict(cfg), sort_keys=True)
    if ckpt.exists():
        t, rec = read_artifact(ckpt)
        if rec.get("config_json") != cfg_json:
            raise ValueError(f"{ckpt} was made with another inversion config; delete it to start over.")
        vectors.data.copy_(t["vectors"])
        start = int(rec["step"])
        gen.manual_seed(cfg.seed + start)

    pipe = SafePipeline(model, stack)  # applies the weight edits: the edited model we invert on
    edited_hash = model.edited_hash
    guidance = pipe.defenses["guidance"] if cfg.through_guidance else []
    ac = model.scheduler.alphas_cumprod.to(model.device)
    try:
        bar = tqdm(range(start, cfg.steps), desc=f"invert {cfg.placeholder}", initial=start, total=cfg.steps,
                   disable=not progress)
        for step in bar:
            idx, x_t, t, ab, noise = core.noised_batch(latents, ac, cfg.batch_size, gen)
            texts = [caps[i] for i in idx.tolist()]
            emb = encode_with_vectors(model, texts, cfg.placeholder, vectors)
            ectx = None
            if pipe.defenses["embedding"]:  # the stack's embedding stage in the loss (BPDA gradient)
                slot = model.tokenizer.bos_token_id
                ids = torch.tensor([_slot_ids(model.tokenizer, x, cfg.placeholder, cfg.num_vectors, slot)[0] for x in texts])
                emb, ectx = apply_embedding_defenses(pipe, emb, texts, ids)
            if guidance:
                eps = _guided_epsilon(pipe, model, guidance, x_t, t, ab, emb, cfg, step, ectx)
            else:
                out = model.unet(x_t, t, encoder_hidden_states=emb).sample
                eps = core.to_epsilon(out, x_t, ab, model.prediction_type)
            loss = torch.nn.functional.mse_loss(eps.float(), noise.float())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step % 10 == 0:
                bar.set_postfix(loss=f"{loss.item():.4f}")
            if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
                save_artifact({"vectors": vectors.detach()}, ckpt, kind="inversion-checkpoint",
                              base_model_hash=model.content_hash, config=dataclasses.asdict(cfg), seed=cfg.seed,
                              extra={"step": step + 1, "config_json": cfg_json})
    finally:
        pipe.close()
    save_artifact({cfg.placeholder: vectors.detach()}, out_path, kind="textual-inversion",
                  base_model_hash=model.content_hash, edited_model_hash=edited_hash, seed=cfg.seed,
                  config={**dataclasses.asdict(cfg), "concept": concept, "stack": stack.to_string(),
                          "num_concept_images": len(arrays)},
                  extra={"placeholder": cfg.placeholder})
    if ckpt.exists():
        ckpt.unlink()
    return out_path


def _guided_epsilon(pipe, model, guidance, x_t, t, ab, emb, cfg, step, embedding_ctx=None):
    """The stack's guided epsilon for the placeholder caption (through_guidance)."""
    return guided_epsilon(pipe, x_t, t, ab, emb, [cfg.placeholder] * x_t.shape[0],
                          guidance_scale=cfg.guidance_scale or model.default_guidance_scale, step=step,
                          num_steps=cfg.steps, embedding_ctx=embedding_ctx)


def apply_embedding_defenses(pipe, emb: torch.Tensor, texts: Sequence[str], ids: torch.Tensor):
    """The stack's embedding-stage defenses in a differentiable forward pass, their gradient
    approximated by the identity (BPDA, Athalye et al. 2018): ``emb + (transform(emb) - emb).detach()``.
    ``texts`` is the current prompt text (what SAFREE re-encodes; a learned placeholder in it is
    re-encoded as plain text there, an approximation). Returns ``(embedding, embedding context)``,
    the context ``None`` when the stack has no embedding defense; pass it to
    :func:`guided_epsilon` (guidance defenses such as SAFREE's filter read it)."""
    from .defenses.base import EmbeddingContext

    if not pipe.defenses["embedding"]:
        return emb, None
    model = pipe.model
    B = emb.shape[0]
    ids = ids.expand(B, -1) if ids.shape[0] == 1 else ids
    with torch.no_grad():
        neg, _, _ = core.encode_prompts(model, [""] * B, warn_truncation=False)
        ctx = EmbeddingContext(prompts=list(texts), input_ids=ids, attention_mask=core._real_token_mask(ids, model.tokenizer),
                               original_prompt_embeds=emb.detach(), prompt_embeds=emb.detach(), negative_embeds=neg,
                               encode=pipe._encode, text_encoder=model.text_encoder, tokenizer=model.tokenizer)
        for d in pipe.defenses["embedding"]:
            ctx.prompt_embeds, ctx.negative_embeds = d.transform(ctx)
    return emb + (ctx.prompt_embeds - emb).detach(), ctx


def guided_epsilon(pipe, x_t: torch.Tensor, t: torch.Tensor, ab: torch.Tensor, emb: torch.Tensor,
                   prompts: Sequence[str], *, guidance_scale: float, step: int = 0, num_steps: int = 1,
                   negative: torch.Tensor | None = None, embedding_ctx=None) -> torch.Tensor:
    """The epsilon the pipeline's sampler would follow at ``(x_t, t)`` for prompt embedding
    ``emb``: classifier-free guidance against the empty prompt (or ``negative``), then every
    guidance defense of ``pipe`` (weight edits are whatever ``pipe`` applied). Differentiable in
    ``emb``. ``embedding_ctx``: what :func:`apply_embedding_defenses` returned, for guidance
    defenses that read the embedding stage (SAFREE's filter). Shared by inversion through
    guidance and the white-box attacks."""
    from .defenses.base import GuidanceContext, StepInfo

    model = pipe.model
    guidance = pipe.defenses["guidance"]
    B = x_t.shape[0]
    if negative is None:
        negative, _, _ = core.encode_prompts(model, [""] * B, warn_truncation=False)
    neg = negative
    original = embedding_ctx.original_prompt_embeds if embedding_ctx is not None else emb
    ctx = GuidanceContext(prompts=list(prompts), prompt_embeds=emb, original_prompt_embeds=original,
                          negative_embeds=neg, guidance_scale=guidance_scale, encode=pipe._encode, model=model,
                          embedding_ctx=embedding_ctx)
    extras: dict[str, torch.Tensor] = {}
    for g in guidance:
        u = g.unconditional(ctx)
        if u is not None:
            neg = u.expand(B, -1, -1)
            ctx.negative_embeds = neg
        for k, v in g.prepare(ctx).items():
            extras[k] = v.expand(B, -1, -1) if v.shape[0] == 1 else v
    conds = torch.cat([neg, emb, *extras.values()])
    k = conds.shape[0] // B
    out = model.unet(torch.cat([x_t] * k), torch.cat([t] * k), encoder_hidden_states=conds).sample.chunk(k)
    eps = {"uncond": core.to_epsilon(out[0], x_t, ab, model.prediction_type),
           "cond": core.to_epsilon(out[1], x_t, ab, model.prediction_type)}
    for name, o in zip(extras, out[2:]):
        eps[name] = core.to_epsilon(o, x_t, ab, model.prediction_type)
    guided = eps["uncond"] + guidance_scale * (eps["cond"] - eps["uncond"])
    info = StepInfo(index=step, num_steps=num_steps, timestep=t, alpha_bar=ab, latents=x_t)
    for g in guidance:
        guided = g.guide(eps, guided, info)
    return guided

