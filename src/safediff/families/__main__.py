"""``python -m safediff.families --markdown``: print docs/models.md's support table
(:func:`safediff.support.render_markdown`)."""

import sys

from ..support import render_markdown

if sys.argv[1:] != ["--markdown"]:
    sys.exit("usage: python -m safediff.families --markdown   (prints docs/models.md's support table)")
sys.stdout.write(render_markdown())
