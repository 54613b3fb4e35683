"""``sd3``: Stable Diffusion 3 / 3.5 (two CLIP encoders with projections, optional T5, MMDiT, flow matching)."""

from __future__ import annotations

from typing import Any

from .base import FamilyAdapter
from .registry import register_family


class SD3(FamilyAdapter):
    name = "sd3"
    title = "Stable Diffusion 3 / 3.5"
    capabilities = frozenset({"transformer", "context_embedder", "text_projections", "clip_tokens", "pooled",
                              "second_clip", "t5", "text_attention"})
    default_guidance_scale = 7.0
    default_steps = 28
    detected_by = "`SD3Transformer2DModel`"
    priority = 50
    required_components = {"transformer": "SD3Transformer2DModel", "vae": "AutoencoderKL",
                           "text_encoder": "CLIPTextModelWithProjection", "tokenizer": "CLIPTokenizer",
                           "text_encoder_2": "CLIPTextModelWithProjection", "tokenizer_2": "CLIPTokenizer"}
    denoiser_folder = "transformer"
    text_width_key = "joint_attention_dim"
    context_embedder = "context_embedder"  # UCE / RECE edit it (every text token goes through it)

    def optional_components(self, index: dict) -> list[str]:
        return ["text_encoder_3"] if (index.get("text_encoder_3") or [None, None])[1] else []  # T5 may be left out

    def detect(self, index: dict, net_config: dict, meta: dict) -> bool:
        return (index.get("transformer") or [None, None])[1] == "SD3Transformer2DModel"

    def loaders(self, info: dict) -> dict:
        from diffusers import AutoencoderKL, SD3Transformer2DModel
        from transformers import CLIPTextModelWithProjection, T5EncoderModel

        out = {"unet": (SD3Transformer2DModel, "transformer"), "vae": (AutoencoderKL, "vae"),
               "text_encoder": (CLIPTextModelWithProjection, "text_encoder"),
               "text_encoder_2": (CLIPTextModelWithProjection, "text_encoder_2")}
        if info["has_t5"]:
            out["text_encoder_3"] = (T5EncoderModel, "text_encoder_3")
        return out

    def tokenizers(self, info: dict) -> dict:
        from transformers import CLIPTokenizer, T5Tokenizer

        out = {"tokenizer": CLIPTokenizer, "tokenizer_2": CLIPTokenizer}
        if info["has_t5"]:
            out["tokenizer_3"] = T5Tokenizer
        return out

    #: T5's sequence length (diffusers' ``max_sequence_length`` default)
    t5_length = 256

    def t5_parts(self, model: Any) -> tuple:
        return model.text_encoder_3, model.tokenizer_3, self.t5_length  # (None, None, n): loaded without T5

    def call_denoiser(self, model: Any, x: Any, t: Any, cond: Any, *, pooled: Any, time_ids: Any, image_ids: Any,
                      latents_dtype: Any) -> Any:
        import torch

        t_vec = torch.as_tensor(t, device=x.device).expand(x.shape[0])  # one timestep per sample
        return model.denoiser_net(hidden_states=x, timestep=t_vec, encoder_hidden_states=cond, pooled_projections=pooled,
                                  return_dict=False)[0]

    def token_embedding_width(self, model: Any) -> int:
        return model.denoiser_net.config.joint_attention_dim  # the transformer's joint attention width

    def encode_tokens(self, model: Any, ids: Any, prompts: list[str], attention_mask: Any) -> Any:
        from ..encoding import _sd3_forward, clip_ids

        return _sd3_forward(model, ids, clip_ids(model.tokenizer_2, prompts), prompts)[0]

    def encode_text(self, model: Any, ids: Any, prompts: list[str], attention_mask: Any, *,
                    pooled: bool) -> tuple[Any, Any]:
        from ..encoding import _sd3_forward, clip_ids

        tokens, pool = _sd3_forward(model, ids, clip_ids(model.tokenizer_2, prompts), prompts)  # pooled comes free
        return tokens, (pool if pooled else None)

    def encode_pooled(self, model: Any, prompts: list[str]) -> Any:
        import torch

        from ..encoding import clip_ids

        te, te_2 = model.text_encoder, model.text_encoder_2  # both CLIP projections, concatenated
        pooled_2 = te_2(clip_ids(model.tokenizer_2, prompts).to(te_2.device))[0]
        return torch.cat([te(clip_ids(model.tokenizer, prompts).to(te.device))[0], pooled_2], dim=-1).to(model.dtype)

    def components(self, model: Any) -> dict:
        comps = super().components(model)
        comps["transformer"] = comps.pop("unet")
        return {**comps, "text_encoder_2": model.text_encoder_2, "tokenizer_2": model.tokenizer_2,
                "text_encoder_3": model.text_encoder_3, "tokenizer_3": model.tokenizer_3}

    def to_diffusers(self, model: Any) -> Any:
        from diffusers import StableDiffusion3Pipeline

        return StableDiffusion3Pipeline(**self.components(model))


register_family(SD3())
