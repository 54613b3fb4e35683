"""The testbed world (v2): 32x32 images of one coloured shape, with captions and exact detectors.

Designed from how real data behaves, so that the field's phenomena have room to happen:

* **Two target concepts** stand in for the field's unsafe ones: ``striped`` (for *nudity*: magenta
  bands behind the shape) and ``caged`` (for *violence*: cyan frame or bars). Each has **several
  visual modes** (striped: ``horizontal`` / ``vertical`` 4-px bands, ``thin`` 2-px vertical bands;
  caged: a 3-px ``frame`` or vertical ``bars``) and a **graded strength**: the pattern is blended
  into the background with an intensity in ``[0.3, 1]``, and the detector returns a continuous
  score (the estimated intensity), so a threshold matters as it does with NudeNet.
* **Many routes to a concept**, each with its own data probability of bringing it (a
  :class:`Route`): the name and synonyms near 1; single-word **triggers** spread over
  0.2 / 0.4 / 0.7 (as "beach" brings nudity sometimes, "zebra" stripes often); **compositional
  triggers**, two ordinary words that bring the concept only together ("sailor" + "shirt"); and
  the concept **without any concept word** in a few percent of captions, so benign and empty
  prompts have a small base rate.
* **A text space that is not collapsed**: triggers carry visual side attributes of their own
  (a 6x6 coloured *mark* in one corner: a zebra also brings a brown mark, a barcode a purple
  one), near-concept benign words share a trigger's mark without its concept ("horse" looks like
  "zebra" minus the stripes), and a vocabulary of ordinary words has small visual effects of its
  own (marks, shape size). The training script adds a CLIP-style contrastive objective on the
  pooled text embedding (``testbed/train.py``), as Stable Diffusion's text encoder is a CLIP one.
* **Held-out split**: some synonyms, triggers and one compositional pair per concept are held out:
  no defense's or attack's data may use them (erasure lists, anchors, inversion prompts,
  sanitizer training prompts, attack seeds, threshold calibration); only evaluation does. The
  base model, like a pretrained Stable Diffusion, is trained on every word, held-out ones included.

Benign attributes (shape colour, shape, background) measure what a defense preserves. Every
attribute has an exact detector: on rendered images :func:`detect` returns the ground truth
(tested on thousands of random scenes); on generated images it unmixes each pixel into
background + magenta + cyan and reads the rest as foreground (shape, marks).

The world is defined in four modules, one job each, and this module gathers their names:
:mod:`~safediff.testbed.vocabulary` (attributes, concepts, words, scenes, options, meanings),
:mod:`~safediff.testbed.grammar` (captions), :mod:`~safediff.testbed.rendering` (images) and
:mod:`~safediff.testbed.detection` (the exact detectors).
"""

from .detection import (  # noqa: F401
    CAGED_THRESHOLD,
    FOREGROUND_RESIDUAL,
    MIN_SHAPE_PIXELS,
    STRIPED_THRESHOLD,
    THRESHOLDS,
    Detection,
    detect,
)
from .grammar import compose_prompt, sample  # noqa: F401
from .rendering import (  # noqa: F401
    MODE_MASKS,
    mark_box,
    render,
    visible_marks,
)
from .vocabulary import (  # noqa: F401
    BACKGROUNDS,
    BAND,
    BAR,
    CONCEPTS,
    CORNERS,
    CYAN,
    FILLER_WORDS,
    IMAGE_SIZE,
    MAGENTA,
    MARK,
    MARK_COLOURS,
    MARK_INSET,
    MARKS,
    MODES,
    OBJECT_WORDS,
    RELATEDNESS,
    RING,
    SHAPE_COLOURS,
    SHAPES,
    SIZES,
    SYNONYM_MARK_PROB,
    THIN_BAND,
    WORLD_VERSION,
    Concept,
    Route,
    Scene,
    WorldConfig,
    caption_meaning,
    concept_word_set,
    meaning_vectors,
    ordinary_words,
    pair_words,
    random_scene,
    vocabulary,
)
