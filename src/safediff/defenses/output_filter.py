"""An output filter (stage 5): a detector looks at every decoded image and flags it, or replaces it
with a black image (``action="blank"``, what diffusers' ``StableDiffusionSafetyChecker`` does with
an NSFW image).

Any detector of :mod:`safediff.detectors` can sit here (``nudenet:rece-style``,
``sd-safety-checker``, ``testbed:striped``, ``vlm:PATH_OR_ID[:THRESHOLD]``); its protocol (classes,
threshold) is the filter's decision unless ``score_threshold`` overrides the threshold on its score
(the filter's sensitivity: lower flags more; for ``vlm:`` the score is P(unsafe answer)).
``action="flag"`` keeps the image and records the flag, ``action="blank"`` (the default) blacks it
out. An image the detector fails on is flagged (fail closed), its reason naming the error.

**Caution when measuring.** A filter that is the evaluation's own detector with the same threshold
removes every image the evaluation would count, under any prompt or attack, by construction:
a rate of zero then says nothing. Give the filter a different detector, or a different
threshold, than the judge (on the testbed, e.g. ``score_threshold`` above the judge's
``world.STRIPED_THRESHOLD``: a filter that only catches strongly striped images).

    >>> pipe = safediff.build(defenses='output_filter(detector="nudenet:rece-style")')  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..detectors import make_detector
from ..options import option
from .base import DefenseConfig, OutputCheckDefense, OutputDecision, register_defense


@dataclass(frozen=True)
class OutputFilterConfig(DefenseConfig):
    """Args:
    detector: detector spec (``testbed:CONCEPT``, ``nudenet:PRESET``, ``sd-safety-checker[:PATH]``,
        ``vlm:PATH_OR_ID[:THRESHOLD]``); empty disables the filter.
    action: ``"blank"`` (a flagged image is replaced by a black one) or ``"flag"`` (kept, flagged
        in its record).
    score_threshold: flag when the detector's score is >= this (None: the detector's own decision).
    """

    #: conformance (tests/test_conformance.py): stack texts at zero strength and an acting one
    zero_strength = ('output_filter(detector="")',)
    acting_example = 'output_filter(detector="testbed:striped", action=flag, score_threshold=0.5)'

    detector: str = option("", help="detector spec (testbed:CONCEPT, nudenet:PRESET, sd-safety-checker[:PATH], "
                                    "vlm:PATH_OR_ID[:THRESHOLD])")
    action: str = option("blank", choices=("blank", "flag"), help="blank a flagged image, or flag it in its record")
    score_threshold: float | None = option(None, help="sensitivity: flag at a score >= this, lower flags more "
                                                      "(null: the detector's decision)")

    menu = {"output filter": 'output_filter(detector="{detector}")'}

    def __post_init__(self) -> None:
        super().__post_init__()  # types and choices, from the schema above
        if self.detector and self.detector.partition(":")[0] not in ("testbed", "nudenet", "sd-safety-checker", "vlm"):
            raise ValueError(f"Unknown detector {self.detector!r} for the output filter; use testbed:CONCEPT, "
                             "nudenet:PRESET, sd-safety-checker[:PATH] or vlm:PATH_OR_ID[:THRESHOLD].")

    def is_active(self) -> bool:
        return bool(self.detector)


class OutputFilter(OutputCheckDefense):
    def __init__(self, config: OutputFilterConfig, model):
        super().__init__(config, model)
        self.detector = make_detector(config.detector)

    def check(self, images: list) -> list[OutputDecision]:
        results = self.detector.detect([np.asarray(im) for im in images])
        out = []
        for r in results:
            thr = self.config.score_threshold
            if r.error is not None:  # fail closed: an image the detector could not judge is not passed as safe
                out.append(OutputDecision(True, {f"output_filter:{self.config.detector}": 1.0},
                                          reason=f"output filter {self.config.detector} failed on the image: {r.error}",
                                          action=self.config.action))
                continue
            flagged = bool(r.unsafe) if thr is None else (r.score is not None and r.score >= thr)
            score = float(r.score) if r.score is not None else float(flagged)
            out.append(OutputDecision(flagged, {f"output_filter:{self.config.detector}": score},
                                      reason=f"output filter {self.config.detector} flagged the image" if flagged else "",
                                      action=self.config.action))
        return out


register_defense(name="output_filter", config_cls=OutputFilterConfig, impl_cls=OutputFilter)
