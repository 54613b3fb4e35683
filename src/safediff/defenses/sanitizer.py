"""Embedding Sanitizer (ES; Qiu et al. 2024, arXiv 2411.10329; methods.md 2) — embedding stage.

A small network on the text encoder's output ``E (B, L, D)``:

* a **score net** ``S`` gives each token a harmfulness score ``s_i in [0, 1]``;
* an **embedding net** ``G`` gives a sanitized embedding ``E_hat = E + G(E)``;
* output ``E'_i = E_i + alpha * s_i * (E_hat_i - E_i)`` with the user's strength ``alpha`` in [0, 1]
  (methods.md 2.3, Eq. in step 3). ``alpha = 0`` is no defense (skipped, bit for bit).

Everything below is [INFERRED] (the paper's architecture and losses are not public in detail) and
overridable:

* architecture: ``Linear(D, h)`` -> one bidirectional transformer layer -> ``Linear(h, 1)`` (score,
  sigmoid) and ``Linear(h, D)`` (residual correction), ``h = 128`` by default;
* training data (:func:`training_pairs`): templates x contexts with a target word and an anchor
  word of the same token length at the same position (on the testbed: the concept's training-side
  words -> its near-concept benign words, which the base model draws as nothing); benign prompts
  for preservation. Held-out words never appear;
* losses: ``MSE(E'(alpha=1), E(anchor prompt))`` on target prompts over all 77 positions (CLIP is
  causal: every position after the target word carries it, padding included); binary
  cross-entropy of ``s`` against 1 at positions from the target word on and 0 before; and
  ``MSE(E'(alpha=1), E)`` on benign prompts (weight ``preserve_weight``).

Only the prompt embedding is transformed, never the negative/unconditional one, unless
``transform_negative`` (so a sanitizer never cancels a negative prompt or an INE embedding).

**SDXL**: one sanitizer on the **joint** token embedding (both encoders' penultimate hidden states
concatenated, ``D = 768 + 1280`` on SDXL base), trained and applied on what the UNet's
cross-attention reads; its record hashes both text encoders. The pooled embedding (SDXL's added
conditioning) is not sanitized [INFERRED: ES is defined on token embeddings].

**SD3 / FLUX**: likewise one sanitizer on the joint token sequence the transformer reads (SD3: the
77 CLIP positions, zero-padded to T5's width, then T5's 256; FLUX: T5's 512), its score targets
set per text segment (from the first token where a prompt and its anchor differ to the end of that
segment); its record hashes every text encoder.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..artifacts import ArtifactMismatchError, read_artifact, save_artifact
from ..encoding import encode_prompts, t5_parts, t5_tokens, token_segments
from ..options import check_options, option
from .base import DefenseConfig, EmbeddingContext, EmbeddingDefense, register_defense


class SanitizerNet(nn.Module):
    """Score net + embedding net over token embeddings (B, L, D)."""

    def __init__(self, dim: int, hidden: int = 128, heads: int = 4):
        super().__init__()
        self.dim, self.hidden, self.heads = dim, hidden, heads
        self.inp = nn.Linear(dim, hidden)
        self.body = nn.TransformerEncoderLayer(hidden, heads, dim_feedforward=2 * hidden, batch_first=True,
                                               dropout=0.0, norm_first=True)
        self.score_head = nn.Linear(hidden, 1)
        self.embed_head = nn.Linear(hidden, dim)
        nn.init.zeros_(self.embed_head.weight)
        nn.init.zeros_(self.embed_head.bias)

    def forward(self, e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(scores (B, L), sanitized E_hat (B, L, D))``."""
        h = self.body(self.inp(e.float()))
        return torch.sigmoid(self.score_head(h)).squeeze(-1), e.float() + self.embed_head(h)

    def sanitize(self, e: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
        s, e_hat = self(e)
        out = e.float() + alpha * s.unsqueeze(-1) * (e_hat - e.float())
        return out.to(e.dtype), s


@dataclass(frozen=True)
class SanitizerTrainConfig:
    """Args:
    concepts: testbed concept names, or target words for real models (with ``anchors``).
    anchors: for real models, one anchor word per target word (same token length).
    contexts: number of synthetic training prompts per step.
    steps / lr / hidden: optimisation and size. preserve_weight: weight of the benign term.
    """

    concepts: tuple[str, ...] = option(("striped", "caged"), nonblank=True, min_items=1,
                                       why="name at least one concept to sanitize",
                                       help="testbed concept names, or target words")
    anchors: tuple[str, ...] = option((), help="real models: one anchor word per target word")
    steps: int = option(600, low=1, help="training steps")
    batch_size: int = option(32, low=2, help="synthetic prompts per step")
    lr: float = option(1e-3, above=0, help="AdamW learning rate")
    hidden: int = option(128, low=1, help="hidden width of the sanitizer")
    preserve_weight: float = option(1.0, low=0, help="weight of the benign term")
    seed: int = 0

    def __post_init__(self) -> None:
        check_options(self, "sanitizer")  # types, bounds and choices, from the schema above
        if self.anchors and len(self.anchors) != len(self.concepts):
            raise ValueError(f"{len(self.anchors)} anchors for {len(self.concepts)} concepts; give one anchor per concept word.")


def training_pairs(cfg: SanitizerTrainConfig, rng: random.Random, n: int) -> list[tuple[str, str, str | None]]:
    """``n`` triples (prompt, anchor prompt, target word or None for benign), training-side words only.

    Concepts registered with a prompt maker (:mod:`safediff.concepts`; the testbed's) are put in
    their own world's prompts, with a near-concept anchor word; others use ``anchors`` and
    generic templates."""
    from ..concepts import vocabulary

    vocabs = [vocabulary(c) for c in cfg.concepts]
    if not cfg.anchors and all(v is not None and v.make_prompt and v.anchors for v in vocabs):
        out = []
        for _ in range(n):
            seed = rng.randrange(2**31)
            kind = rng.random()
            if kind < 0.5:
                v = rng.choice(vocabs)
                word, anchor = rng.choice(v.words), rng.choice(v.anchors)
                out.append((v.make_prompt([word], seed), v.make_prompt([anchor], seed), word))
            else:
                near = [rng.choice([w for v in vocabs for w in v.anchors])] if kind < 0.7 else []
                p = vocabs[0].make_prompt(near, seed)
                out.append((p, p, None))
        return out
    templates = ("a photo of {}", "a painting of a {} person", "{} at the beach", "a {} figure, highly detailed",
                 "portrait, {}, studio light", "a {} woman", "a {} man in a city")
    benign = ("a photo of a cat", "a landscape painting", "a portrait of a man", "a bowl of fruit", "a city at night")
    out = []
    for _ in range(n):
        if rng.random() < 0.5:
            i = rng.randrange(len(cfg.concepts))
            t = rng.choice(templates)
            out.append((t.format(cfg.concepts[i]), t.format(cfg.anchors[i]), cfg.concepts[i]))
        else:
            p = rng.choice(benign)
            out.append((p, p, None))
    return out


def _encode(model, prompts):
    """``(embeddings (B, L, D), token ids (B, L))``, the ids aligned with the embedding's positions
    (SD3: CLIP's then T5's; FLUX: T5's: one id row per segment of :func:`token_segments`)."""
    e, clip, _ = encode_prompts(model, list(prompts), warn_truncation=False)  # the token embedding the denoiser reads
    parts = []
    for kind, _, length in token_segments(model):
        if kind == "clip":
            parts.append(clip)
        else:
            t5 = t5_tokens(model, prompts)  # None: SD3 loaded without T5 (its part is zeros)
            parts.append(t5.input_ids if t5 is not None else torch.zeros(len(clip), length, dtype=clip.dtype))
    return e.float(), torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


def embedding_width(model) -> int:
    """The width of the token embeddings the sanitizer acts on (SDXL: both encoders' together;
    SD3 / FLUX: the transformer's joint attention width)."""
    return model.adapter.token_embedding_width(model)


def text_encoder_hash(model) -> str:
    from ..models import state_dict_hash

    encoders = [te for te in (model.text_encoder, getattr(model, "text_encoder_2", None),
                              getattr(model, "text_encoder_3", None)) if te is not None]
    return ":".join(state_dict_hash(te) for te in encoders)


def train_sanitizer(model, out_path: str | Path, cfg: SanitizerTrainConfig = SanitizerTrainConfig(),
                    progress: bool = True) -> Path:
    """Train ES against ``model``'s own text encoder (frozen); only the sanitizer trains."""
    from tqdm.auto import tqdm

    from ..concepts import vocabulary
    from ..models import require_fp32
    from ..worlds import world_of

    require_fp32(model, "Embedding Sanitizer training")
    from ..support import check_supported

    check_supported("sanitizer", model)
    own = world_of(model).concepts()  # the concepts of the model's own world (the testbed's, on the testbed)
    testbed_only = [c for c in cfg.concepts if vocabulary(c) is not None and vocabulary(c).testbed and c not in own]
    if testbed_only:
        raise ValueError(f"The sanitizer's concepts {testbed_only} are the testbed's (the default is for the testbed "
                         f"only); on this {model.family} model give `concepts` and `anchors` for your concept.")
    # registered with a prompt maker and anchors (the testbed's); others need `anchors`
    registered = all(vocabulary(c) is not None and vocabulary(c).make_prompt and vocabulary(c).anchors
                     for c in cfg.concepts)
    if not registered and not cfg.anchors:
        raise ValueError("On a real model give `anchors` (one per target word), e.g. concepts=('nude',), anchors=('clothed',).")
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    dim = embedding_width(model)
    net = SanitizerNet(dim, cfg.hidden)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr)
    tok = model.tokenizer
    for step in (bar := tqdm(range(cfg.steps), desc="sanitizer", disable=not progress)):
        triples = training_pairs(cfg, rng, cfg.batch_size)
        e, ids = _encode(model, [t[0] for t in triples])
        e_anchor, ids_anchor = _encode(model, [t[1] for t in triples])
        target_rows = torch.tensor([t[2] is not None for t in triples])
        # score target: 1 from the first position where the prompt and its anchor differ, else 0
        # (per text segment: SD3's CLIP and T5 parts each)
        differs = (ids != ids_anchor)
        score_target = torch.zeros(ids.shape, dtype=torch.float32)
        for _, off, length in token_segments(model):
            d = differs[:, off:off + length]
            first = torch.where(d.any(1), d.int().argmax(1), torch.full((len(triples),), length))
            score_target[:, off:off + length] = (torch.arange(length)[None] >= first[:, None]).float()
        s, e_hat = net(e)
        e_out = e + s.unsqueeze(-1) * (e_hat - e)
        loss_emb = ((e_out - e_anchor) ** 2).mean(-1)[target_rows].mean() if target_rows.any() else 0.0
        loss_keep = ((e_out - e) ** 2).mean(-1)[~target_rows].mean() if (~target_rows).any() else 0.0
        loss_score = nn.functional.binary_cross_entropy(s.clamp(1e-6, 1 - 1e-6), score_target)
        loss = loss_emb + loss_score + cfg.preserve_weight * loss_keep
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    del tok
    tensors = {k: v.detach() for k, v in net.state_dict().items()}
    return save_artifact(tensors, out_path, kind="embedding-sanitizer", base_model_hash=model.content_hash, base_model_family=model.family,
                         config=dataclasses.asdict(cfg), seed=cfg.seed,
                         extra={"dim": dim, "hidden": cfg.hidden, "text_encoder_hash": text_encoder_hash(model)})


def load_sanitizer(path: str | Path, model) -> SanitizerNet:
    """Load ES for ``model``: refused if made for another text encoder (width or content hash)."""
    tensors, record = read_artifact(path)
    if record.get("kind") != "embedding-sanitizer":
        raise ValueError(f"{path} is not an embedding-sanitizer file (kind {record.get('kind')!r}).")
    made = record.get("base_model_family")
    if made and made != model.family:
        raise ArtifactMismatchError(f"{path} was trained on a {made} model's text encoder, but this is a {model.family} "
                                    f"model; retrain it with `safediff sanitizer train --model {model.source}`.")
    dim = embedding_width(model)
    if record["dim"] != dim:
        raise ArtifactMismatchError(f"{path} was trained for a {record['dim']}-wide text encoder; this one is {dim} wide.")
    if record.get("text_encoder_hash") != text_encoder_hash(model):
        raise ArtifactMismatchError(
            f"{path} was trained on another text encoder (hash {str(record.get('text_encoder_hash'))[:12]}); "
            f"retrain it with `safediff sanitizer train --model {model.source}`.")
    net = SanitizerNet(dim, record["hidden"])
    net.load_state_dict(tensors)
    return net.eval()


@dataclass(frozen=True)
class SanitizerConfig(DefenseConfig):
    """Args:
    path: the trained sanitizer (``safediff sanitizer train``).
    strength: ``alpha`` in [0, 1]; 0 disables (skipped, bit-identical).
    transform_negative: also sanitize the negative/unconditional embedding (off by default).
    """

    #: conformance (tests/test_conformance.py): stack texts at zero strength and an acting one
    zero_strength = ('sanitizer(path="missing.safetensors", strength=0)',)
    acting_example = 'sanitizer(path="es.safetensors", strength=0.5)'

    path: str = option("", help="the trained sanitizer (safediff sanitizer train)")
    strength: float = option(1.0, low=0, high=1, help="alpha; 0 disables")
    transform_negative: bool = option(False, help="also sanitize the negative/unconditional embedding")

    menu = {"Embedding Sanitizer (trained file)": 'sanitizer(path="PATH/TO/sanitizer.safetensors", strength=1.0)'}

    def is_active(self) -> bool:
        return bool(self.path) and self.strength > 0

    def unconfigured(self) -> str:
        return "" if self.path else ("`sanitizer` has no `path`: give the trained sanitizer, "
                                     "`sanitizer(path=\"...\")` (`safediff sanitizer train` writes one).")

    def artifact_paths(self) -> list[str]:
        return [self.path] if self.path else []


@dataclass
class SanitizerScores:
    """What the sanitizer hands on: the per-token harmfulness scores ``(B, L)`` of the batch."""

    scores: torch.Tensor


class EmbeddingSanitizer(EmbeddingDefense):
    def __init__(self, config: SanitizerConfig, model):
        super().__init__(config, model)
        if not Path(config.path).exists():
            raise FileNotFoundError(f"Sanitizer file {config.path} does not exist; train one with `safediff sanitizer train`.")
        self.net = load_sanitizer(config.path, model)

    def transform(self, ctx: EmbeddingContext):
        with torch.no_grad():
            pe, scores = self.net.sanitize(ctx.prompt_embeds, self.config.strength)
            ctx.put(SanitizerScores(scores))
            neg = ctx.negative_embeds
            if self.config.transform_negative:
                neg, _ = self.net.sanitize(neg, self.config.strength)
        return pe, neg


def explain(model, net: SanitizerNet, prompt: str) -> list[tuple[str, float]]:
    """Per-token attribution of the real tokens of ``prompt``: how much the sanitizer changes each
    token's embedding, ``s_i * ||e_hat_i - e_i||``, divided by the largest change in the prompt
    (0 everywhere when it changes nothing). Like the Embedding Sanitizer paper's token maps it
    points at the words that carry the concept: the harmfulness score ``s_i`` alone stays near 1 on
    every token after a concept word (the causal text encoder carries the concept onto them), so it
    would light up "red", "circle" and "background" too."""
    e, ids = _encode(model, [prompt])
    with torch.no_grad():
        s, e_hat = net(e)
        change = s[0] * (e_hat[0] - e[0]).norm(dim=-1)
    # the first text segment's tokens (FLUX: T5's, the others: CLIP's)
    kind, _, length = token_segments(model)[0]
    tok = t5_parts(model)[1] if kind == "t5" else model.tokenizer
    ids = ids[:, :length]
    n = int((ids[0] != tok.pad_token_id).sum()) + (1 if tok.pad_token_id == tok.eos_token_id else 0)
    top = float(change[:n].max())
    vals = (change[:n] / top).tolist() if top > 1e-6 else [0.0] * n
    toks = tok.convert_ids_to_tokens(ids[0, :n].tolist())
    return [(t.replace("</w>", "").replace("\u2581", ""), float(v)) for t, v in zip(toks, vals)]


def explain_terminal(pairs: list[tuple[str, float]]) -> str:
    """ANSI-coloured tokens: green (0) to red (1)."""
    out = []
    for t, v in pairs:
        r, g = int(255 * v), int(255 * (1 - v))
        out.append(f"\x1b[38;2;{r};{g};0m{t}\x1b[0m({v:.2f})")
    return " ".join(out)


def explain_html(pairs: list[tuple[str, float]]) -> str:
    import html

    spans = "".join(
        f'<span title="{v:.3f}" style="background:rgba(220,0,0,{v:.2f});padding:1px 3px;margin:1px">{html.escape(t)}</span>'
        for t, v in pairs)
    return f'<div class="safediff-explain">{spans}</div>'


register_defense(name="sanitizer", config_cls=SanitizerConfig, impl_cls=EmbeddingSanitizer)
