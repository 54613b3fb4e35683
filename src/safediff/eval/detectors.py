"""Detectors with pinned protocols: the implementation lives in :mod:`safediff.detectors`, below
the defenses (the output filter and the attacks use it too); this module keeps the evaluation's
import path working."""

from ..detectors import (  # noqa: F401
    NUDENET_PRESETS,
    NUDENET_V3_LABELS,
    Detector,
    DetectorProtocol,
    DetectorResult,
    NudeNetDetector,
    Q16Detector,
    SafetyCheckerDetector,
    TestbedDetector,
    clip_preprocess,
    make_detector,
    nudenet_decision,
    q16_decision,
    safety_checker_decision,
)
