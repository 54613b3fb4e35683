"""The text and image side below the pipeline: prompts to embeddings, learned token vectors,
textual-inversion files, images to latents.

* :func:`encode_prompts` -- tokenise and encode as diffusers' ``encode_prompt`` does (an
  over-long prompt is cut with a warning that says what was cut); :func:`encode_text` gives the
  pooled embedding with them from the same encoder forwards (each encoder runs once per batch).
* :func:`ids_with_slots` / :func:`encode_with_vectors` -- prompts in which some token positions
  hold learned vectors (a textual-inversion placeholder, an attack's free tokens): the vectors
  enter through a forward hook on the text encoder's input-embedding layer, so no row of the
  model's embedding table is touched and nothing needs restoring. Differentiable in the vectors.
* :class:`InvertedConcept` / :func:`load_inverted` -- textual-inversion files (ours, with a
  provenance record, or vanilla diffusers' ``{placeholder: vectors}``), checked against the model.
* :func:`encode_images` -- images to VAE latents in chunks (an image set of any size fits).

The pipeline, inversion, the attacks and the defenses that take a concept as an embedding all
encode through this module, so none of them imports another for it.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .artifacts import check_provenance, read_artifact


class PromptError(ValueError):
    """A prompt that cannot be generated (empty, wrong type)."""


def validate_prompts(prompts: str | Sequence[str], *, allow_empty: bool = False) -> list[str]:
    """The prompts as a list, or :class:`PromptError` for no prompt, a non-string or (unless
    ``allow_empty``: the unconditional output, for references) an empty one."""
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise PromptError("No prompt given: pass at least one prompt.")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise PromptError(f"Prompt {i} is a {type(p).__name__}, expected a string.")
        if not p.strip() and not allow_empty:
            raise PromptError(
                f"Prompt {i} is empty. An empty prompt gives the model's unconditional output; "
                "pass some text (use `guidance_scale=1` with a real prompt for unguided sampling)."
            )
    return prompts


def clip_pooled(output) -> torch.Tensor:
    """A CLIP text encoder's pooled embedding: ``CLIPTextModel``'s ``pooler_output``, or the
    projection ``text_embeds`` of a ``CLIPTextModelWithProjection`` (SD3's first encoder)."""
    pooled = getattr(output, "pooler_output", None)
    return pooled if pooled is not None else output.text_embeds


def real_token_mask(ids: torch.Tensor, tok) -> torch.Tensor:
    """1 up to and including the first end-of-text token, 0 after (padding)."""
    eos = ids == tok.eos_token_id
    first = torch.where(eos.any(1), eos.int().argmax(1), torch.full((ids.shape[0],), ids.shape[1] - 1))
    pos = torch.arange(ids.shape[1])[None]
    return (pos <= first[:, None]).long()


def encode_prompts(model, prompts: list[str], *, warn_truncation: bool = True):
    """Encode prompts with the model's tokenizer and text encoder, as diffusers' ``encode_prompt``.

    Returns ``(embeds (B, L, D), input_ids (B, L), attention_mask (B, L))``; the mask marks the
    real tokens (start, words, first end token) and is what embedding defenses use to skip padding.
    """
    return encode_text(model, prompts, pooled=False, warn_truncation=warn_truncation)[:3]


def encode_text(model, prompts: list[str], *, pooled: bool, warn_truncation: bool = True):
    """:func:`encode_prompts` and, with ``pooled`` (families with a pooled embedding), the pooled
    embedding ``(B, P)`` of the same prompts, each text encoder running once for both.

    Returns ``(embeds, input_ids, attention_mask, pooled or None)``.
    """
    tok = model.tokenizer
    max_len = tok.model_max_length
    enc = tok(prompts, padding="max_length", max_length=max_len, truncation=True, return_tensors="pt")
    ids = enc.input_ids
    if warn_truncation:
        full = tok(prompts, padding="longest", return_tensors="pt").input_ids
        if full.shape[-1] > ids.shape[-1]:
            for i, p in enumerate(prompts):
                n_real = int((full[i] != tok.pad_token_id).sum()) + 1 if tok.pad_token_id == tok.eos_token_id else int(full[i].ne(tok.pad_token_id).sum())
                if n_real > max_len:
                    removed = tok.batch_decode(full[i : i + 1, max_len - 1 : -1])[0]
                    warnings.warn(
                        f"The prompt {i} is longer than the tokenizer's {max_len} tokens; this part was cut: "
                        f"{removed!r}",
                        stacklevel=3,
                    )
    mask = real_token_mask(ids, tok)
    with torch.no_grad():  # the family's encoders: one CLIP, SDXL's two, SD3's CLIPs + T5, FLUX's T5 (+ CLIP pooled)
        embeds, pool = _adapter(model).encode_text(model, ids, list(prompts), enc.attention_mask, pooled=pooled)
    return embeds, ids, mask, pool


def _adapter(model):
    from .families import get_family

    return get_family(model.family)


def _sdxl_forward(model, ids: torch.Tensor, ids_2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL's text conditioning as diffusers' ``StableDiffusionXLPipeline.encode_prompt`` computes
    it: both encoders' penultimate hidden states concatenated ``(B, L, D1 + D2)``, and the second
    encoder's projected pooled embedding ``(B, P)``."""
    h_1 = model.text_encoder(ids.to(model.text_encoder.device), output_hidden_states=True).hidden_states[-2]
    out_2 = model.text_encoder_2(ids_2.to(model.text_encoder_2.device), output_hidden_states=True)
    return torch.cat([h_1, out_2.hidden_states[-2]], dim=-1).to(model.dtype), out_2[0].to(model.dtype)




def t5_parts(model):
    """``(T5 encoder, its tokenizer, sequence length)`` of an SD3 / FLUX model (SD3: ``text_encoder_3``,
    FLUX: ``text_encoder_2``, as diffusers names them); ``(None, None, length)`` for SD3 loaded
    without T5; None for the families without T5."""
    return _adapter(model).t5_parts(model)


def t5_tokens(model, prompts: Sequence[str]):
    """T5's tokenisation of ``prompts`` (``input_ids``, ``attention_mask``), padded to the family's
    T5 length as diffusers' pipelines pad it; None when the model has no T5 tokenizer."""
    parts = t5_parts(model)
    if parts is None or parts[1] is None:
        return None
    _, tok, length = parts
    return tok(list(prompts), padding="max_length", max_length=length, truncation=True, add_special_tokens=True,
               return_tensors="pt")


def token_segments(model) -> list[tuple[str, int, int]]:
    """The text segments of the token sequence the denoiser reads, ``[(kind, offset, length)]``
    with kind ``"clip"`` or ``"t5"``: one CLIP segment (SD1/SD2/SDXL/testbed); SD3's CLIP part then
    its T5 part (zeros when loaded without T5); FLUX's T5 tokens."""
    return _adapter(model).token_segments(model)


def sdxl_time_ids(height: int, width: int) -> torch.Tensor:
    """SDXL's six size/crop numbers: original size, crop top-left, target size (diffusers'
    defaults: no crop, the same size)."""
    return torch.tensor([height, width, 0, 0, height, width])


def _sd3_forward(model, ids: torch.Tensor, ids_2: torch.Tensor, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """SD3's text conditioning as diffusers' ``StableDiffusion3Pipeline.encode_prompt``: both CLIP
    encoders' penultimate hidden states concatenated and zero-padded to T5's width, then T5's
    last hidden state after them along the sequence (zeros when the model has no T5), ``(B, 77 +
    256, D_T5)``; the pooled embedding is both CLIP encoders' projections concatenated ``(B, P1 + P2)``."""
    out_1 = model.text_encoder(ids.to(model.text_encoder.device), output_hidden_states=True)
    out_2 = model.text_encoder_2(ids_2.to(model.text_encoder_2.device), output_hidden_states=True)
    clip = torch.cat([out_1.hidden_states[-2], out_2.hidden_states[-2]], dim=-1)
    t5 = _t5_embeds(model, list(prompts), len(ids)).to(clip)
    clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
    return torch.cat([clip, t5], dim=-2).to(model.dtype), torch.cat([out_1[0], out_2[0]], dim=-1).to(model.dtype)


def _t5_embeds(model, prompts: list[str], batch: int) -> torch.Tensor:
    """T5's last hidden state ``(B, L, D)`` (SD3: ``text_encoder_3``, FLUX: ``text_encoder_2``)."""
    te_3, tok_3, length = t5_parts(model)
    if te_3 is None:  # SD3 loaded without T5: diffusers uses zeros for its part
        return torch.zeros(batch, length, model.denoiser_net.config.joint_attention_dim, device=model.device)
    enc = t5_tokens(model, prompts)
    full = tok_3(prompts, padding="longest", return_tensors="pt").input_ids
    if full.shape[-1] > length:
        warnings.warn(f"A prompt is longer than T5's {length} tokens; the rest was cut for the T5 encoder.",
                      stacklevel=4)
    return te_3(enc.input_ids.to(te_3.device))[0]


def clip_ids(tok, prompts: Sequence[str]) -> torch.Tensor:
    """A CLIP tokenizer's ids of ``prompts``, padded to its full length ``(B, 77)`` as diffusers pads them."""
    return tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
               return_tensors="pt").input_ids


def encode_pooled(model, prompts: list[str]) -> torch.Tensor:
    """The pooled text embedding ``(B, P)`` of ``prompts`` that the denoiser takes beside the token
    embeddings: SDXL's second encoder's projection (only that encoder runs); SD3's two CLIP
    projections concatenated; FLUX's CLIP pooled output."""
    with torch.no_grad():
        return _adapter(model).encode_pooled(model, list(prompts))


# ---------------------------------------------------------------------------------------------
# learned token vectors (no change to the model)
# ---------------------------------------------------------------------------------------------


class SlotError(ValueError):
    """A prompt with learned-vector slots that does not fit the tokenizer."""


def ids_with_slots(tok, chunks: Sequence[str | None]) -> tuple[list[int], list[int]]:
    """Token ids of ``chunks`` (text, or ``None`` for one free slot) with start, end and padding,
    and the slot positions. A slot holds the start token's id (its embedding row is replaced;
    never the end token's: pooling looks for it)."""
    ids, slots = [tok.bos_token_id], []
    for c in chunks:
        if c is None:
            slots.append(len(ids))
            ids.append(tok.bos_token_id)
        elif c.strip():
            ids += tok(c.strip(), add_special_tokens=False).input_ids
    max_len = tok.model_max_length
    if len(ids) + 1 > max_len:
        raise SlotError(f"The prompt needs {len(ids) + 1} tokens with its slots, more than the tokenizer's {max_len}.")
    ids.append(tok.eos_token_id)
    ids += [tok.pad_token_id] * (max_len - len(ids))
    return ids, slots


def placeholder_chunks(text: str, placeholder: str, n: int) -> list[str | None]:
    """``text`` split at each ``placeholder``, which becomes ``n`` free slots."""
    parts = text.split(placeholder)
    chunks: list[str | None] = []
    for i, part in enumerate(parts):
        chunks.append(part)
        if i < len(parts) - 1:
            chunks += [None] * n
    return chunks


@contextlib.contextmanager
def inject_vectors(text_encoder, positions: Sequence[Sequence[int]], vectors: torch.Tensor):
    """Forward hook replacing the input-embedding rows at ``positions[b]`` of row ``b`` by
    ``vectors`` (``(n, D)``, repeated over a row's slots)."""
    emb = text_encoder.get_input_embeddings()

    def hook(module, inputs, output):
        out = output.clone()
        for b, pos in enumerate(positions):
            if pos:
                out[b, list(pos)] = vectors.to(out.dtype).repeat(len(pos) // len(vectors), 1)
        return out

    handle = emb.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def encode_ids_with_vectors(text_encoder, ids: torch.Tensor, slots: Sequence[Sequence[int]], vectors: torch.Tensor,
                            pooled: bool = False) -> torch.Tensor:
    """Hidden states ``(B, L, D)`` (or the pooled output ``(B, D)``) of ``ids`` with ``vectors`` in
    the slot rows; differentiable in ``vectors``."""
    with inject_vectors(text_encoder, slots, vectors):
        out = text_encoder(ids.to(text_encoder.device))
    return clip_pooled(out) if pooled else out[0]


def placeholder_ids(tok, texts: Sequence[str], placeholder: str, n: int) -> tuple[torch.Tensor, list[list[int]]]:
    """Token ids ``(B, L)`` of ``texts`` with each ``placeholder`` expanded to ``n`` slots, and the slots."""
    rows = [ids_with_slots(tok, placeholder_chunks(t, placeholder, n)) for t in texts]
    return torch.tensor([r[0] for r in rows]), [r[1] for r in rows]


def encode_with_vectors(model, texts: Sequence[str], placeholder: str, vectors: torch.Tensor,
                        pooled: bool = False) -> torch.Tensor:
    """Encode ``texts`` in which ``placeholder`` stands for the learned ``vectors`` ``(n, D)``.

    Returns the hidden states ``(B, L, D)``, or the pooled output ``(B, D)`` with ``pooled=True``.
    Differentiable in ``vectors``; the model is not modified.
    """
    ids, slots = placeholder_ids(model.tokenizer, texts, placeholder, len(vectors))
    return encode_ids_with_vectors(model.text_encoder, ids, slots, vectors, pooled=pooled).to(model.dtype)


def encode_sdxl_with_vectors(model, texts: Sequence[str], placeholder: str, vectors: torch.Tensor,
                             vectors_2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL: ``texts`` in which ``placeholder`` stands for ``vectors`` in the first text encoder and
    ``vectors_2`` in the second (diffusers' two-encoder textual inversion). Returns the
    concatenated penultimate hidden states ``(B, L, D1 + D2)`` and the pooled embedding ``(B, P)``."""
    ids, slots = placeholder_ids(model.tokenizer, texts, placeholder, len(vectors))
    ids_2, slots_2 = placeholder_ids(model.tokenizer_2, texts, placeholder, len(vectors_2))
    with inject_vectors(model.text_encoder, slots, vectors), inject_vectors(model.text_encoder_2, slots_2, vectors_2):
        return _sdxl_forward(model, ids, ids_2)


@dataclass
class InvertedConcept:
    """A textual-inversion token: ``placeholder`` stands for ``vectors`` ``(n, D)``; on SDXL also
    for ``vectors_2`` ``(n, D2)`` in the second text encoder (diffusers' ``clip_l`` / ``clip_g``)."""

    placeholder: str
    vectors: torch.Tensor
    record: dict
    vectors_2: torch.Tensor | None = None

    def encode(self, model, texts: Sequence[str] | None = None, pooled: bool = False) -> torch.Tensor:
        texts = list(texts or [self.placeholder])
        if "second_clip" in _adapter(model).capabilities:  # the two-encoder layout (clip_l, clip_g)
            embeds, pool = encode_sdxl_with_vectors(model, texts, self.placeholder, self.vectors, self.vectors_2)
            return pool if pooled else embeds
        return encode_with_vectors(model, texts, self.placeholder, self.vectors, pooled=pooled)


def encode_prompts_with_tokens(model, prompts: Sequence[str], concepts: Sequence[InvertedConcept], *,
                               warn_truncation: bool = True):
    """:func:`encode_prompts` in which each concept's placeholder stands for its vectors (a prompt
    may hold one kind of placeholder). Returns ``(embeds, input_ids, mask)``; the ids of the
    placeholder slots are the start token's (their embedding rows are replaced)."""
    prompts = list(prompts)
    embeds, ids, mask = encode_prompts(model, prompts, warn_truncation=warn_truncation)
    return put_token_vectors(model, prompts, concepts, embeds, ids, mask)


def put_token_vectors(model, prompts: Sequence[str], concepts: Sequence[InvertedConcept], embeds: torch.Tensor,
                      ids: torch.Tensor, mask: torch.Tensor):
    """``(embeds, input_ids, mask)`` of ``prompts`` (as :func:`encode_prompts` gave them) with the rows
    of the prompts holding a concept's placeholder re-encoded with its vectors."""
    tok = model.tokenizer
    for c in concepts:
        idx = [i for i, p in enumerate(prompts) if c.placeholder in p]
        if not idx:
            continue
        rows, slots = placeholder_ids(tok, [prompts[i] for i in idx], c.placeholder, len(c.vectors))
        with torch.no_grad():
            e = encode_ids_with_vectors(model.text_encoder, rows, slots, c.vectors).to(model.dtype)
        embeds = embeds.clone()
        embeds[idx] = e.to(embeds)
        ids[idx] = rows
        mask[idx] = real_token_mask(rows, tok)
    return embeds, ids, mask


def load_inverted(path: str | os.PathLike, model=None, *, allow_other_base: bool = False,
                  edited_model_hash: str | None = None) -> InvertedConcept:
    """Read a textual-inversion file (ours or diffusers', SDXL's ``clip_l`` / ``clip_g`` layout
    included); check it against ``model`` (family, text-encoder widths, base model)."""
    if model is not None and "textual_inversion" not in _adapter(model).capabilities:
        raise ValueError(f"{path}: textual-inversion files are not supported on {model.family} models yet (their T5 "
                         "encoder has no common file layout for them); give the concept as text instead.")
    tensors, record = read_artifact(path)
    keys = [k for k in tensors if k not in ("emb_params", "string_to_param")]
    sdxl_file = set(tensors) == {"clip_l", "clip_g"}
    sdxl_model = model is not None and "second_clip" in _adapter(model).capabilities  # SDXL's two-encoder layout
    if model is not None and sdxl_file != sdxl_model:
        raise ValueError(
            f"{path} is a textual-inversion file for SDXL's two text encoders (clip_l, clip_g), but this is a "
            f"{model.family} model." if sdxl_file else
            f"{path} holds vectors for one text encoder, but this {model.family} model has two: an SDXL "
            "textual-inversion file has the keys clip_l and clip_g (diffusers' layout).")
    if sdxl_file:
        vec, vec_2 = (t if t.dim() == 2 else t[None] for t in (tensors["clip_l"], tensors["clip_g"]))
        placeholder = record.get("placeholder", "<concept*>")
        if model is not None:
            for name, v, te in (("clip_l", vec, model.text_encoder), ("clip_g", vec_2, model.text_encoder_2)):
                width = te.get_input_embeddings().weight.shape[1]
                if v.shape[1] != width:
                    raise ValueError(f"{path}: `{name}` holds {v.shape[1]}-wide vectors, but this model's encoder is "
                                     f"{width} wide: it was made for another model.")
            if len(vec) != len(vec_2):
                raise ValueError(f"{path}: clip_l has {len(vec)} vectors and clip_g {len(vec_2)}; they must match.")
            check_provenance(record, model, path=str(path), allow_other_base=allow_other_base,
                             edited_model_hash=edited_model_hash)
        return InvertedConcept(placeholder, vec.float(), record, vectors_2=vec_2.float())
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
# images
# ---------------------------------------------------------------------------------------------


def load_image_folder(folder: str | os.PathLike, size: int) -> list[np.ndarray]:
    """Every ``.png`` / ``.jpg`` / ``.webp`` of ``folder`` (sorted by name) as ``size`` x ``size`` RGB."""
    from PIL import Image, UnidentifiedImageError

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"Image folder {folder} does not exist.")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".webp"})
    if not files:
        raise ValueError(f"{folder} holds no .png/.jpg/.webp images.")
    out = []
    for p in files:
        try:
            with Image.open(p) as im:
                out.append(np.asarray(im.convert("RGB").resize((size, size), Image.BICUBIC)))
        except (OSError, UnidentifiedImageError) as e:
            raise ValueError(f"{p} is not a readable image ({type(e).__name__}: {e}); remove or replace it.") from None
    return out


@torch.no_grad()
def encode_images(model, images: Sequence[np.ndarray], *, chunk: int = 8) -> torch.Tensor:
    """``(N, C, h, w)`` VAE latents (the posterior mean, scaled) of uint8 RGB images, encoded
    ``chunk`` at a time so that an image set of any size fits in memory."""
    if not len(images):
        raise ValueError("No images to encode.")
    out = []
    for i in range(0, len(images), chunk):
        px = torch.from_numpy(np.stack(images[i:i + chunk])).permute(0, 3, 1, 2).float().div(127.5).sub(1)
        out.append(model.vae.encode(px.to(model.device, model.vae.dtype)).latent_dist.mean.to(model.dtype))
    shift = getattr(model.vae.config, "shift_factor", None) or 0.0
    z = torch.cat(out)
    return ((z - shift) if shift else z) * model.vae.config.scaling_factor
