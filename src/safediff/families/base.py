"""The family adapter: everything safediff knows about one model family, in one class.

A :class:`FamilyAdapter` says how a family is detected from a diffusers folder's configs, which
components it loads and in which classes, diffusers' pipeline class and defaults for it, its
default image size, and -- as :attr:`FamilyAdapter.capabilities` -- what it *has*. Defenses,
trainers and attacks declare what they *need* (``requires``); :mod:`safediff.support` computes
which method runs on which family from the two, in one place.

Adding a family is one module that subclasses :class:`FamilyAdapter` and calls
:func:`safediff.families.register_family` (plus one test parameter).
"""

from __future__ import annotations

from typing import Any, ClassVar

#: Every capability a family may have, and what it means (the refusals and docs quote these words).
CAPABILITIES: dict[str, str] = {
    "unet": "a UNet2DConditionModel denoiser, which weight-delta files, FreeU and sliced attention are written for",
    "trainable_unet": "the UNet parameter sets of safediff.unlearning.param_sets that the training loops fine-tune",
    "transformer": "an MMDiT transformer denoiser, held in Model.unet",
    "cross_attention": "cross-attention keys/values reading the token embeddings, UCE/RECE's edit targets on a UNet",
    "text_attention": "attention layers in which the image tokens read the text tokens' keys/values (a UNet's "
                      "cross-attention or an MMDiT's joint attention), where NAG guides",
    "context_embedder": "a transformer context_embedder projecting the token embeddings, UCE/RECE's edit target on an "
                        "MMDiT",
    "text_projections": "linear layers mapping the text embedding into the denoiser, cross-attention keys/values or a "
                        "context_embedder, which closed-form edits change",
    "clip_tokens": "CLIP token embeddings in the sequence the denoiser reads, from which SAFREE builds its concept "
                   "subspace",
    "pooled": "a pooled text embedding the denoiser also takes",
    "size_conditioning": "SDXL's six size/crop numbers as added conditioning",
    "second_clip": "a second CLIP text encoder",
    "t5": "a T5 text encoder",
    "one_clip_encoder": "exactly one CLIP text encoder and no pooled embedding, as the single-encoder UNet calls of the "
                        "DUO, Dark Miner, relearning, P4D and UnlearnDiffAtk loops assume",
    "textual_inversion": "a CLIP token-embedding table a learned token can be written into",
    "packed_latents": "latents packed into 2x2 patches with position ids, as FLUX's",
    "single_file": "an original LDM single-file checkpoint layout that export writes",
}


class FamilyAdapter:
    """One model family. Subclasses set the class attributes and override what differs."""

    #: ``Model.family``, the registry key
    name: ClassVar[str] = ""
    #: what the documentation calls it
    title: ClassVar[str] = ""
    #: what this family has (keys of :data:`CAPABILITIES`)
    capabilities: ClassVar[frozenset[str]] = frozenset()
    #: diffusers' ``__call__`` defaults: guidance scale and steps
    default_guidance_scale: ClassVar[float] = 7.5
    default_steps: ClassVar[int] = 50
    #: detection order: higher is tried first (the plain SD 1.x layout is the fallback)
    priority: ClassVar[int] = 0
    #: how the documentation says the family is detected
    detected_by: ClassVar[str] = ""

    # -- detection -----------------------------------------------------------------------------
    #: ``model_index.json`` components the family must have, ``{name: class}`` (fast tokenizers also pass)
    required_components: ClassVar[dict[str, str]] = {"unet": "UNet2DConditionModel", "text_encoder": "CLIPTextModel",
                                                     "vae": "AutoencoderKL", "tokenizer": "CLIPTokenizer"}
    #: the folder of the denoising network, and the key of its config giving the text width
    denoiser_folder: ClassVar[str] = "unet"
    text_width_key: ClassVar[str] = "cross_attention_dim"
    #: diffusers' ``force_zeros_for_empty_prompt`` when ``model_index.json`` does not say
    force_zeros_default: ClassVar[bool] = False

    def index_problem(self, index: dict) -> str:
        """Why a folder of this layout is refused although its components match ("" when it is not)."""
        return ""

    def optional_components(self, index: dict) -> list[str]:
        """Networks the folder may leave out (``[null, null]`` in ``model_index.json``) and holds."""
        return []

    def detect(self, index: dict, net_config: dict, meta: dict) -> bool:
        """Whether a folder with this ``model_index.json``, denoiser config and ``safediff.json``
        (``meta``) holds this family (its components are checked before)."""
        raise NotImplementedError

    # -- loading ---------------------------------------------------------------------------------
    def loaders(self, info: dict) -> dict[str, tuple[Any, str]]:
        """``{Model field: (class, subfolder)}`` of the networks to load (``info``: :func:`detect_family`'s)."""
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel

        return {"unet": (UNet2DConditionModel, "unet"), "vae": (AutoencoderKL, "vae"),
                "text_encoder": (CLIPTextModel, "text_encoder")}

    def tokenizers(self, info: dict) -> dict[str, Any]:
        """``{Model field: tokenizer class}`` (the subfolder has the field's name)."""
        from transformers import CLIPTokenizer

        return {"tokenizer": CLIPTokenizer}

    def vae_in_fp32(self, path: Any, half: bool) -> bool:
        """Whether the VAE of the folder ``path`` stays fp32 when the model loads in fp16 (SDXL's overflows)."""
        return False

    def model_fields(self, info: dict, meta: dict) -> dict:
        """Family-specific :class:`~safediff.models.Model` fields from the folder's configs."""
        return {}

    # -- sizes ---------------------------------------------------------------------------------
    def latent_sample_size(self, model: Any) -> int:
        """diffusers' default latent side for this model (the denoiser's ``sample_size``)."""
        return model.unet.config.sample_size

    #: image sizes must be multiples of the VAE factor times this (FLUX's 2x2 packing: 2)
    size_multiple_factor: ClassVar[int] = 1

    # -- the denoiser call ----------------------------------------------------------------------
    #: appended to the refusal of guidance defenses without classifier-free guidance
    cfg_hint: ClassVar[str] = ""

    def call_denoiser(self, model: Any, x: Any, t: Any, cond: Any, *, pooled: Any, time_ids: Any, image_ids: Any,
                      latents_dtype: Any) -> Any:
        """One call of the denoising network on the batched branches: latents ``x``, timestep(s)
        ``t``, token embeddings ``cond``, the pooled embeddings already batched (``pooled``, None
        without), SDXL's ``time_ids`` (one row) and FLUX's ``image_ids``; ``latents_dtype``: the
        sampler's (FLUX's timesteps are cast to it). Returns the raw prediction."""
        return model.unet(x, t, encoder_hidden_states=cond, return_dict=False)[0]

    def added_conditioning(self, model: Any, height: int, width: int) -> dict:
        """What the denoiser takes besides the text for a ``height`` x ``width`` image, as
        :class:`~safediff.denoiser.DefendedDenoiser` keywords (SDXL's ``time_ids``, FLUX's ``image_ids``)."""
        return {}

    # -- text encoding -------------------------------------------------------------------------
    def encode_tokens(self, model: Any, ids: Any, prompts: list[str], attention_mask: Any) -> Any:
        """The token embeddings ``(B, L, D)`` the denoiser reads, in the model's dtype, from the first
        tokenizer's ``ids`` (and ``prompts``, for the other encoders); called under ``no_grad``."""
        te = model.text_encoder
        use_mask = getattr(te.config, "use_attention_mask", False)
        out = te(ids.to(te.device), attention_mask=attention_mask.to(te.device) if use_mask else None)
        return out[0].to(model.dtype)

    def encode_pooled(self, model: Any, prompts: list[str]) -> Any:
        """The pooled text embedding ``(B, P)`` the denoiser takes beside the tokens (families with ``pooled``)."""
        raise ValueError(f"A {model.family} model takes no pooled text embedding.")

    def encode_text(self, model: Any, ids: Any, prompts: list[str], attention_mask: Any, *,
                    pooled: bool) -> tuple[Any, Any]:
        """``(token embeddings, pooled embedding or None)`` of one batch, each text encoder running
        once: :meth:`encode_tokens`, and with ``pooled`` :meth:`encode_pooled` (families whose
        encoders give both from one forward override this); called under ``no_grad``."""
        tokens = self.encode_tokens(model, ids, prompts, attention_mask)
        return tokens, (self.encode_pooled(model, prompts) if pooled else None)

    def token_embedding_width(self, model: Any) -> int:
        """The width ``D`` of the token embeddings the denoiser reads (the text encoder's)."""
        return model.text_encoder.config.hidden_size

    def t5_parts(self, model: Any) -> tuple | None:
        """``(T5 encoder, its tokenizer, sequence length)``; None for a family without T5."""
        return None

    def token_segments(self, model: Any) -> list[tuple[str, int, int]]:
        """The text segments of the token sequence the denoiser reads, ``[(kind, offset, length)]``
        (kind ``"clip"`` or ``"t5"``): one CLIP segment, then T5's when the family has one."""
        clip = model.tokenizer.model_max_length
        parts = self.t5_parts(model)
        return [("clip", 0, clip)] if parts is None else [("clip", 0, clip), ("t5", clip, parts[2])]

    # -- closed-form edit targets (UCE, RECE) --------------------------------------------------
    #: the denoiser's cross-attention modules (diffusers' ``attn2``) and the names of their key and
    #: value projections, which closed-form edits change on a UNet
    cross_attention_module: ClassVar[str] = "attn2"
    key_value_projections: ClassVar[dict[str, str]] = {"k": "to_k", "v": "to_v"}
    #: the one linear map every text token goes through on an MMDiT ("" on a UNet): the edit target there
    context_embedder: ClassVar[str] = ""

    def text_projections(self, net: Any, targets: str = "kv") -> dict[str, Any]:
        """The linear maps of the token embeddings in the denoiser ``net`` (``Model.denoiser_net``) that
        closed-form edits (UCE, RECE) change, ``{module name: Linear}``: every cross-attention key
        and/or value projection (``targets`` ``"kv"``, ``"k"`` or ``"v"``); on a family with a
        :attr:`context_embedder`, that one map (keys and values alike: ``targets`` must be ``"kv"``)."""
        import torch

        if targets not in ("kv", "k", "v"):
            raise ValueError(f"Unknown targets {targets!r}; choose one of ['kv', 'k', 'v'].")
        if self.context_embedder:
            if targets != "kv":
                raise ValueError(f"On a transformer, UCE edits the context embedder (keys and values alike); `targets` "
                                 f"must be 'kv', got {targets!r}.")
            return {self.context_embedder: net.get_submodule(self.context_embedder)}
        leaves = {self.key_value_projections[t] for t in targets}
        found = {name: m for name, m in net.named_modules()
                 if name.split(".")[-2:-1] == [self.cross_attention_module] and name.split(".")[-1] in leaves
                 and isinstance(getattr(m, "weight", None), torch.Tensor)}
        if not found:
            names = " / ".join(f"`{self.cross_attention_module}.{leaf}`" for leaf in self.key_value_projections.values())
            raise ValueError(f"This UNet has no cross-attention projections ({names}); UCE cannot edit it.")
        return found

    # -- single-file layout --------------------------------------------------------------------
    #: families with ``single_file``: where each text encoder goes in the LDM checkpoint,
    #: ``{key prefix: (Model field, "hf_clip" | "open_clip" key layout)}``
    single_file_text: ClassVar[dict[str, tuple[str, str]]] = {}
    #: the published model whose configs ship in ``safediff/configs/<shipped_config>`` for loading
    #: this family's single files (its tokenizers are read from the HF cache of ``published_repo``)
    shipped_config: ClassVar[str] = ""
    published_repo: ClassVar[str] = ""
    #: the family whose single-file key layout this family's checkpoints have (itself by default)
    checkpoint_layout: ClassVar[str] = ""

    @property
    def layout(self) -> str:
        """:attr:`checkpoint_layout`, or the family's own name."""
        return self.checkpoint_layout or self.name

    # -- diffusers -----------------------------------------------------------------------------
    #: diffusers' pipeline class for the family, and what it takes to run without a safety checker
    pipeline_class: ClassVar[str] = "StableDiffusionPipeline"
    no_safety_checker: ClassVar[dict] = {"safety_checker": None, "requires_safety_checker": False}

    def components(self, model: Any) -> dict:
        """The components as diffusers' pipeline class for the family takes them."""
        return {"unet": model.unet, "text_encoder": model.text_encoder, "vae": model.vae,
                "tokenizer": model.tokenizer, "scheduler": model.scheduler}

    def to_diffusers(self, model: Any) -> Any:
        """diffusers' own pipeline for the family sharing ``model``'s components (no safety checker)."""
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(**self.components(model), safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)

    def __repr__(self) -> str:
        return f"<family {self.name}>"
