"""``sd1``: Stable Diffusion v1.x (CLIP ViT-L text encoder, conv attention projections)."""

from __future__ import annotations

from .base import FamilyAdapter
from .registry import register_family

#: what every one-CLIP-encoder UNet family has (SD 1.x, SD 2.x, the testbed)
UNET_ONE_CLIP = frozenset({"unet", "trainable_unet", "cross_attention", "text_projections", "clip_tokens",
                           "one_clip_encoder", "textual_inversion", "single_file", "text_attention"})


class SD1(FamilyAdapter):
    name = "sd1"
    title = "Stable Diffusion v1.x"
    capabilities = UNET_ONE_CLIP
    detected_by = "`CLIPTextModel`, conv attention projections"
    priority = 0
    single_file_text = {"cond_stage_model.transformer.": ("text_encoder", "hf_clip")}
    shipped_config, published_repo = "sd15", "stable-diffusion-v1-5/stable-diffusion-v1-5"

    def detect(self, index: dict, net_config: dict, meta: dict) -> bool:
        return True  # the fallback: a one-encoder UNet folder no other family claims


register_family(SD1())
