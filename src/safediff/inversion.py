"""Concept inversion: one textual-inversion core (Gal et al. ICLR 2023, methods.md 4.7) used
against any model, edited (unlearned) ones included (Pham et al. ICLR 2024, "Circumventing concept
erasure", methods.md 4.8). INE, Dark Miner's mining and the inversion attacks reuse it.

* Learns ``num_vectors`` token embeddings for a placeholder such as ``<striped*>``; the UNet, VAE
  and text encoder stay frozen and **unmodified**: the vectors enter through a forward hook on the
  text encoder's input-embedding layer at known token positions
  (:func:`safediff.encoding.encode_with_vectors`), so no row of the model's embedding table is
  touched and nothing needs restoring.
* Loss in epsilon space whatever the model predicts: ``|| eps - eps_theta(x_t, t, tau(caption)) ||^2``
  with the prediction converted by :func:`safediff.core.to_epsilon`.
* Concept images come from a folder, or are generated on the fly by the **original, unedited**
  model (an edited one may no longer draw the concept), from training-side prompts only.
* The stack's embedding stage is in the loss (straight-through gradient), and optionally its
  guidance (negative prompt, SLD...) acts inside the training forward pass (methods.md 4.8: CCE's
  NP/SLD variants): the loss is then on the defended denoiser's guided epsilon.
* SDXL: one set of vectors per text encoder (the placeholder's slots in both), trained together
  through the concatenated token embeddings and the pooled embedding; saved in diffusers' SDXL
  layout (``clip_l``, ``clip_g``). SD3 / FLUX are refused.
* Saved in the textual-inversion format that vanilla diffusers ``load_textual_inversion`` reads
  (``{placeholder: (num_vectors, D)}``), with a provenance record naming the base model's content
  hash and the edited model's (the stack hash of the weight edits) it was inverted on.
* Resumable: a checkpoint next to the output is written every ``checkpoint_every`` steps (the
  vectors, Adam's moments and the noise stream), so a resumed run ends where an uninterrupted one
  does.

Testbed defaults are [INFERRED] (the INE paper's own settings are unknown; CCE uses 5,000 steps,
lr 5e-3, batch 4 x 4, 25 images at 512 px): 400 steps, lr 1e-2, batch 8, 32 images.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from . import core
from .artifacts import save_artifact
from .encoding import (InvertedConcept, encode_ids_with_vectors, encode_images, encode_sdxl_with_vectors,  # noqa: F401
                       encode_with_vectors,
                       load_image_folder, load_inverted, placeholder_ids)
from .models import require_fp32
from .pipeline import SafePipeline
from .stack import DefenseStack
from .support import check_supported
from .training import Checkpoint
from .worlds import world_of


@dataclass(frozen=True)
class InversionConfig:
    """Args:
    placeholder: the new token, e.g. ``"<striped*>"``.
    initializer: word whose embedding initialises every vector (default: the first concept word),
        or a named start: ``":concept"`` (:data:`CONCEPT_INIT`, the concept word, as CCE initialises
        its token; needs ``concept``) or ``":neutral"`` (:data:`NEUTRAL_INIT`, the word
        :data:`NEUTRAL_WORD`, which has no visual content of its own).
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
        if self.initializer.startswith(":") and self.initializer not in NAMED_INITIALIZERS:
            raise ValueError(f"Unknown named initializer {self.initializer!r}; choose {sorted(NAMED_INITIALIZERS)} "
                             "or give a word.")


#: ``InversionConfig.initializer``: start from the concept word (CCE's initialisation)
CONCEPT_INIT = ":concept"
#: ``InversionConfig.initializer``: start from :data:`NEUTRAL_WORD`
NEUTRAL_INIT = ":neutral"
#: the neutral start word: the article, in almost every caption (the testbed's and real ones), with
#: no visual content of its own (the testbed's other neutral start, ``shape``, is its generic noun)
NEUTRAL_WORD = "a"
NAMED_INITIALIZERS = frozenset({CONCEPT_INIT, NEUTRAL_INIT})


def initializer_word(initializer: str, concept: str | None) -> str:
    """The word whose embedding starts the vectors ("" = the mean of the embedding table)."""
    if initializer == CONCEPT_INIT:
        if not concept:
            raise ValueError(f"initializer={CONCEPT_INIT!r} starts from the concept word: give `concept`.")
        return concept
    if initializer == NEUTRAL_INIT:
        return NEUTRAL_WORD
    return initializer or (concept or "")


# ---------------------------------------------------------------------------------------------
# concept images
# ---------------------------------------------------------------------------------------------


def draw_with_original_model(model, prompts: Sequence[str], *, guidance_scale: float | None = None, seed: int = 0,
                             seeds: Sequence[int] | None = None, concept: str | None = None,
                             present: bool = True) -> tuple[list[np.ndarray], list[int]]:
    """Images the ORIGINAL model (no defense, no edit) draws for ``prompts``, and the indices to
    keep: on the testbed with ``concept``, those in which the exact detector finds the concept
    (``present=True``) or does not (``present=False``); otherwise all. Shared by inversion, Dark
    Miner's concept pool and relearning."""
    with SafePipeline(model, DefenseStack()) as plain:
        res = plain(list(prompts), seed=seed, seeds=seeds, guidance_scale=guidance_scale, batch_size=32)
    arrays = [np.asarray(r.image) for r in res.records]
    w = world_of(model)
    if concept is None or not w.exact_detector:
        return arrays, list(range(len(arrays)))

    return arrays, [i for i, a in enumerate(arrays) if (concept in w.concepts_in(a)) == present]


# ---------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------


#: the family capabilities concept inversion needs (a CLIP token table to write the learned token into)
REQUIRES = frozenset({"textual_inversion"})


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
    overwrite: bool = False,
    init_vectors: torch.Tensor | None = None,
    penalty=None,
) -> Path:
    """Learn ``config.placeholder`` for ``concept`` against ``model`` with ``defenses`` applied.

    Args:
        model: the **original** model (images are generated with it before any edit is applied).
        concept: a testbed concept name: its training-side prompts generate the images.
        images: a folder or arrays of concept images instead of generating them.
        captions: caption templates with ``{}`` for the placeholder (default ``"{}"``).
        defenses: a stack; its weight edits are the edited model inverted on, its embedding
            stage is in the loss (straight-through gradient); with ``config.through_guidance`` its
            guidance defenses act inside the loss (the defended denoiser's guided epsilon).
        verify: on the testbed, keep only generated images the exact detector confirms.
        overwrite: replace an existing ``out_path`` (refused otherwise, before any work).
        init_vectors: ``(num_vectors, D)`` start vectors instead of the initializer word's
            embedding (Dark Miner's random start).
        penalty: a function of the learned vectors ``(num_vectors, D)`` added to the loss (the
            adaptive concept-inversion attack's prompt-guard score); one text encoder only.
    """
    from tqdm.auto import tqdm

    check_supported("inversion", model)  # before any work

    stack = DefenseStack.parse(defenses)
    out_path = Path(out_path)

    require_fp32(model, "Concept inversion")
    sdxl = "second_clip" in model.capabilities  # SDXL's two-encoder layout (clip_l, clip_g)
    if sdxl and penalty is not None:
        raise ValueError("A loss `penalty` on the learned vectors is for one text encoder; not supported on sdxl.")
    if sdxl and init_vectors is not None:
        raise ValueError("`init_vectors` (Dark Miner's random start) is for one text encoder; not supported on sdxl.")
    if out_path.exists() and not overwrite:
        raise FileExistsError(f"{out_path} exists; choose another output or pass overwrite=True (--overwrite).")
    if images is None and concept is None:
        raise ValueError("Give `images` (a folder) or a testbed `concept` to generate them from.")
    if concept is not None and images is None:
        _check_testbed_concept(model, concept)
    cfg = config
    init_word = initializer_word(cfg.initializer, concept)  # before any work

    # 1. concept images, from the ORIGINAL model (no stack)
    if images is None:
        pairs = world_of(model).concept_prompts(concept, cfg.num_images, cfg.seed)
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
    init_ids = tok(init_word, add_special_tokens=False).input_ids if init_word else []
    table = model.text_encoder.get_input_embeddings().weight
    init = table[init_ids].mean(0) if init_ids else table.mean(0)
    if init_vectors is not None:
        if tuple(init_vectors.shape) != (cfg.num_vectors, table.shape[1]):
            raise ValueError(f"`init_vectors` must be ({cfg.num_vectors}, {table.shape[1]}), got {tuple(init_vectors.shape)}.")
        vectors = torch.nn.Parameter(init_vectors.detach().float().clone())
    else:
        vectors = torch.nn.Parameter(init.detach().float().clone()[None].repeat(cfg.num_vectors, 1))
    params = [vectors]
    if sdxl:  # the second encoder's vectors, from the same initializer word in its own table
        table_2 = model.text_encoder_2.get_input_embeddings().weight
        init_ids_2 = model.tokenizer_2(init_word, add_special_tokens=False).input_ids if init_word else []
        init_2 = table_2[init_ids_2].mean(0) if init_ids_2 else table_2.mean(0)
        vectors_2 = torch.nn.Parameter(init_2.detach().float().clone()[None].repeat(cfg.num_vectors, 1))
        params.append(vectors_2)
    opt = torch.optim.Adam(params, lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    latents = encode_images(model, arrays)

    ckpt = Checkpoint(out_path.with_name(out_path.name + ".ckpt.safetensors"),
                      config=json.dumps(dataclasses.asdict(cfg), sort_keys=True), base_model_hash=model.content_hash)
    state = ckpt.load(optimizer=opt, generators={"noise": gen})
    start = 0
    if state is not None:  # vectors, Adam's moments and the noise stream: the same run as without the stop
        with torch.no_grad():
            vectors.copy_(state["tensors"]["vectors"])
            if sdxl:
                vectors_2.copy_(state["tensors"]["vectors_2"])
        start = state["step"]

    pipe = SafePipeline(model, stack)  # applies the weight edits: the edited model we invert on
    edited_hash = model.edited_hash
    through = cfg.through_guidance and bool(pipe.defenses["guidance"])
    gs = (cfg.guidance_scale or model.default_guidance_scale) if through else 1.0
    ac = model.scheduler.alphas_cumprod.to(model.device)
    try:
        bar = tqdm(range(start, cfg.steps), desc=f"invert {cfg.placeholder}", initial=start, total=cfg.steps,
                   disable=not progress)
        for step in bar:
            idx, x_t, t, _, noise = core.noised_batch(latents, ac, cfg.batch_size, gen)
            texts = [caps[i] for i in idx.tolist()]
            ids, slots = placeholder_ids(tok, texts, cfg.placeholder, cfg.num_vectors)
            pooled = None
            if sdxl:
                emb, pooled = encode_sdxl_with_vectors(model, texts, cfg.placeholder, vectors, vectors_2)
            else:
                emb = encode_ids_with_vectors(model.text_encoder, ids, slots, vectors).to(model.dtype)
            # the defended denoiser: the stack's embedding stage (straight-through) and, through
            # guidance, its guided epsilon; else the (edited) model's conditional prediction
            den = pipe.denoiser(texts, prompt_embeds=emb, input_ids=ids, guidance_scale=gs, straight_through=True,
                                prompt_pooled=pooled)
            with den:
                eps = den.epsilon(x_t, t)
            loss = torch.nn.functional.mse_loss(eps.float(), noise.float())
            if penalty is not None:
                loss = loss + penalty(vectors)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step % 10 == 0:
                bar.set_postfix(loss=f"{loss.item():.4f}")
            if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
                ckpt.save(step + 1, tensors={"vectors": vectors, **({"vectors_2": vectors_2} if sdxl else {})},
                          optimizer=opt, generators={"noise": gen})
    finally:
        pipe.close()
    tensors = ({"clip_l": vectors.detach(), "clip_g": vectors_2.detach()} if sdxl  # diffusers' SDXL layout
               else {cfg.placeholder: vectors.detach()})
    save_artifact(tensors, out_path, kind="textual-inversion",
                  base_model_hash=model.content_hash, base_model_family=model.family, edited_model_hash=edited_hash, seed=cfg.seed,
                  config={**dataclasses.asdict(cfg), "concept": concept, "stack": stack.to_string(),
                          "initializer_word": init_word,
                          "num_concept_images": len(arrays)},
                  extra={"placeholder": cfg.placeholder})
    ckpt.remove()
    return out_path


def _check_testbed_concept(model, concept: str) -> None:
    own = world_of(model).concepts()  # the concepts of the model's world, which its prompts bring
    if not own:
        raise ValueError(f"Generating concept images from a concept name ({concept!r}) works on the testbed only; "
                         "give a folder of concept images.")
    if concept not in own:
        raise ValueError(f"Unknown testbed concept {concept!r}; choose one of {sorted(own)}.")
