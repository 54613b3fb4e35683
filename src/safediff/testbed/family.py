"""The testbed's family adapter (``safediff-testbed``): an SD 1.x-shaped UNet model marked by the
``safediff.json`` in its folder; registered with :mod:`safediff.families` as a plug-in."""

from __future__ import annotations

from ..families.registry import register_family
from ..families.sd1 import UNET_ONE_CLIP, SD1

#: ``Model.family`` of the testbed
TESTBED_FAMILY = "safediff-testbed"


class Testbed(SD1):
    name = TESTBED_FAMILY
    title = "the shipped testbed"
    capabilities = UNET_ONE_CLIP
    default_guidance_scale = 7.5  # its folder's safediff.json gives 4.0
    default_steps = 25
    detected_by = "`safediff.json` marker"
    priority = 100
    checkpoint_layout = "sd1"  # its single-file checkpoints have SD 1.x's keys
    shipped_config = published_repo = ""  # its configs are its own folder's

    def detect(self, index: dict, net_config: dict, meta: dict) -> bool:
        return meta.get("family") == TESTBED_FAMILY


register_family(Testbed())
