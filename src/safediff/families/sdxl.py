"""``sdxl``: Stable Diffusion XL base (two CLIP text encoders, pooled embedding, size conditioning)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .base import FamilyAdapter
from .registry import register_family


class SDXL(FamilyAdapter):
    name = "sdxl"
    title = "Stable Diffusion XL base"
    capabilities = frozenset({"unet", "trainable_unet", "cross_attention", "text_projections", "clip_tokens",
                              "pooled", "size_conditioning", "second_clip", "textual_inversion", "single_file",
                              "text_attention"})
    default_guidance_scale = 5.0
    default_steps = 50
    detected_by = "a second text encoder `CLIPTextModelWithProjection`"
    priority = 40
    required_components = {**FamilyAdapter.required_components, "text_encoder_2": "CLIPTextModelWithProjection",
                           "tokenizer_2": "CLIPTokenizer"}
    force_zeros_default = True
    pipeline_class = "StableDiffusionXLPipeline"
    no_safety_checker = {}
    single_file_text = {"conditioner.embedders.0.transformer.": ("text_encoder", "hf_clip"),
                        "conditioner.embedders.1.model.": ("text_encoder_2", "open_clip")}
    shipped_config, published_repo = "sdxl-base", "stabilityai/stable-diffusion-xl-base-1.0"

    def detect(self, index: dict, net_config: dict, meta: dict) -> bool:
        return "text_encoder_2" in index and "transformer" not in index

    def index_problem(self, index: dict) -> str:
        if not (index.get("text_encoder") or [None, None])[1]:
            return (f"holds an SDXL refiner ({index.get('_class_name')}: no first text encoder); safediff runs the SDXL "
                    "base model (text-to-image), not the refiner.")
        return ""

    def loaders(self, info: dict) -> dict:
        from transformers import CLIPTextModelWithProjection

        return {**super().loaders(info), "text_encoder_2": (CLIPTextModelWithProjection, "text_encoder_2")}

    def tokenizers(self, info: dict) -> dict:
        from transformers import CLIPTokenizer

        return {**super().tokenizers(info), "tokenizer_2": CLIPTokenizer}

    def vae_in_fp32(self, path: Path, half: bool) -> bool:
        # SDXL's VAE overflows in fp16 (its config says force_upcast): it stays fp32, as diffusers decodes it
        return half and json.loads((Path(path) / "vae" / "config.json").read_text()).get("force_upcast", True)

    def model_fields(self, info: dict, meta: dict) -> dict:
        return {"force_zeros_for_empty_prompt": info["force_zeros_for_empty_prompt"]}

    def call_denoiser(self, model: Any, x: Any, t: Any, cond: Any, *, pooled: Any, time_ids: Any, image_ids: Any,
                      latents_dtype: Any) -> Any:
        # the pooled text embedding and the six size/crop numbers, per branch
        added = {"text_embeds": pooled, "time_ids": time_ids.repeat(x.shape[0], 1)}
        return model.unet(x, t, encoder_hidden_states=cond, return_dict=False, added_cond_kwargs=added)[0]

    def added_conditioning(self, model: Any, height: int, width: int) -> dict:
        from ..encoding import sdxl_time_ids

        return {"time_ids": sdxl_time_ids(height, width)}

    def encode_tokens(self, model: Any, ids: Any, prompts: list[str], attention_mask: Any) -> Any:
        from ..encoding import _sdxl_forward, clip_ids

        return _sdxl_forward(model, ids, clip_ids(model.tokenizer_2, prompts))[0]

    def token_embedding_width(self, model: Any) -> int:
        return model.text_encoder.config.hidden_size + model.text_encoder_2.config.hidden_size  # both, concatenated

    def encode_text(self, model: Any, ids: Any, prompts: list[str], attention_mask: Any, *,
                    pooled: bool) -> tuple[Any, Any]:
        from ..encoding import _sdxl_forward, clip_ids

        tokens, pool = _sdxl_forward(model, ids, clip_ids(model.tokenizer_2, prompts))  # the pooled one comes free
        return tokens, (pool if pooled else None)

    def encode_pooled(self, model: Any, prompts: list[str]) -> Any:
        from ..encoding import clip_ids

        te_2 = model.text_encoder_2  # the second encoder's projection (only that encoder runs)
        return te_2(clip_ids(model.tokenizer_2, prompts).to(te_2.device))[0].to(model.dtype)

    def components(self, model: Any) -> dict:
        return {**super().components(model), "text_encoder_2": model.text_encoder_2, "tokenizer_2": model.tokenizer_2}

    def to_diffusers(self, model: Any) -> Any:
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline(**self.components(model),
                                         force_zeros_for_empty_prompt=model.force_zeros_for_empty_prompt)


register_family(SDXL())
