"""``flux``: FLUX.1 (CLIP ViT-L for the pooled embedding, T5 tokens, MMDiT on packed 2x2 latent patches)."""

from __future__ import annotations

from typing import Any

from .base import FamilyAdapter
from .registry import register_family


class Flux(FamilyAdapter):
    name = "flux"
    title = "FLUX.1 (dev, schnell)"
    capabilities = frozenset({"transformer", "context_embedder", "text_projections", "pooled", "t5",
                              "packed_latents", "text_attention"})
    #: the true-CFG scale (diffusers' ``true_cfg_scale``, 1: off); the distilled guidance is ``Model.distilled_guidance``
    default_guidance_scale = 1.0
    default_steps = 28
    detected_by = "`FluxTransformer2DModel`"
    priority = 50
    required_components = {"transformer": "FluxTransformer2DModel", "vae": "AutoencoderKL",
                           "text_encoder": "CLIPTextModel", "tokenizer": "CLIPTokenizer",
                           "text_encoder_2": "T5EncoderModel", "tokenizer_2": "T5Tokenizer"}
    denoiser_folder = "transformer"
    text_width_key = "joint_attention_dim"
    context_embedder = "context_embedder"  # UCE / RECE edit it (every text token goes through it)
    size_multiple_factor = 2

    def detect(self, index: dict, net_config: dict, meta: dict) -> bool:
        return (index.get("transformer") or [None, None])[1] == "FluxTransformer2DModel"

    def loaders(self, info: dict) -> dict:
        from diffusers import AutoencoderKL, FluxTransformer2DModel
        from transformers import CLIPTextModel, T5EncoderModel

        return {"unet": (FluxTransformer2DModel, "transformer"), "vae": (AutoencoderKL, "vae"),
                "text_encoder": (CLIPTextModel, "text_encoder"), "text_encoder_2": (T5EncoderModel, "text_encoder_2")}

    def tokenizers(self, info: dict) -> dict:
        from transformers import CLIPTokenizer, T5Tokenizer

        return {"tokenizer": CLIPTokenizer, "tokenizer_2": T5Tokenizer}

    def model_fields(self, info: dict, meta: dict) -> dict:
        # FLUX.1-dev's embedded (distilled) guidance; None for a transformer without one (schnell)
        return {"distilled_guidance": float(meta.get("distilled_guidance", 3.5)) if info["guidance_embeds"] else None}

    def latent_sample_size(self, model: Any) -> int:
        return 128  # diffusers' FluxPipeline default (1024 pixels)

    #: T5's sequence length (diffusers' ``max_sequence_length`` default)
    t5_length = 512

    def t5_parts(self, model: Any) -> tuple:
        return model.text_encoder_2, model.tokenizer_2, self.t5_length

    def token_segments(self, model: Any) -> list[tuple[str, int, int]]:
        return [("t5", 0, self.t5_length)]  # T5's tokens alone (CLIP gives only the pooled embedding)

    cfg_hint = (" FLUX runs classifier-free guidance only as true CFG: pass guidance_scale > 1 (diffusers' "
                "`true_cfg_scale`, e.g. 4.0); its distilled guidance stays as it is.")

    def call_denoiser(self, model: Any, x: Any, t: Any, cond: Any, *, pooled: Any, time_ids: Any, image_ids: Any,
                      latents_dtype: Any) -> Any:
        import torch

        # timesteps in [0, 1], the distilled guidance as an embedding, RoPE position ids
        t_vec = torch.as_tensor(t, device=x.device).expand(x.shape[0])
        g = model.distilled_guidance
        return model.denoiser_net(hidden_states=x, timestep=t_vec.to(latents_dtype) / 1000,
                                  encoder_hidden_states=cond, pooled_projections=pooled, img_ids=image_ids,
                                  txt_ids=torch.zeros(cond.shape[1], 3, device=cond.device, dtype=cond.dtype),
                                  guidance=None if g is None else torch.full((x.shape[0],), g, device=x.device,
                                                                             dtype=torch.float32),
                                  return_dict=False)[0]

    def added_conditioning(self, model: Any, height: int, width: int) -> dict:
        from ..core import flux_latent_grid, latent_image_ids

        return {"image_ids": latent_image_ids(*flux_latent_grid(model, height, width), model.device, model.dtype)}

    def token_embedding_width(self, model: Any) -> int:
        return model.denoiser_net.config.joint_attention_dim  # the transformer's joint attention width

    def encode_tokens(self, model: Any, ids: Any, prompts: list[str], attention_mask: Any) -> Any:
        from ..encoding import _t5_embeds

        return _t5_embeds(model, prompts, len(ids)).to(model.dtype)

    def encode_pooled(self, model: Any, prompts: list[str]) -> Any:
        from ..encoding import clip_ids

        te = model.text_encoder  # CLIP ViT-L's pooled output
        return te(clip_ids(model.tokenizer, prompts).to(te.device)).pooler_output.to(model.dtype)

    def components(self, model: Any) -> dict:
        comps = super().components(model)
        comps["transformer"] = comps.pop("unet")
        return {**comps, "text_encoder_2": model.text_encoder_2, "tokenizer_2": model.tokenizer_2}

    def to_diffusers(self, model: Any) -> Any:
        from diffusers import FluxPipeline

        return FluxPipeline(**self.components(model))


register_family(Flux())
