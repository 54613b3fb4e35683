"""``sd2``: Stable Diffusion v2.x (OpenCLIP text encoder, linear attention projections), epsilon or v."""

from __future__ import annotations

from .registry import register_family
from .sd1 import SD1


class SD2(SD1):
    name = "sd2"
    title = "Stable Diffusion v2.x (epsilon or v-prediction)"
    detected_by = "`use_linear_projection`"
    priority = 10
    single_file_text = {"cond_stage_model.model.": ("text_encoder", "open_clip")}  # OpenCLIP ViT-H
    shipped_config, published_repo = "sd21-v", "stabilityai/stable-diffusion-2-1"

    def detect(self, index: dict, net_config: dict, meta: dict) -> bool:
        return "text_encoder_2" not in index and bool(net_config.get("use_linear_projection"))


register_family(SD2())
