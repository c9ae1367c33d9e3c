"""Layout: token ids + sentence pieces -> interleaved ids, the sentence-anchored 4D mask, positions, kept rows.

Pure tensor code; knows nothing of models.
"""

from gist_memory.layout.layout import (
    KIND_GIST_TOKEN,
    KIND_PAD,
    KIND_TAIL,
    KIND_TEXT,
    Layout,
    Segment,
    allowed_matrix,
    build_layout,
    float_mask,
    interleave,
)

__all__ = [
    "Segment",
    "Layout",
    "build_layout",
    "interleave",
    "allowed_matrix",
    "float_mask",
    "KIND_TEXT",
    "KIND_GIST_TOKEN",
    "KIND_TAIL",
    "KIND_PAD",
]
