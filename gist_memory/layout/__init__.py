"""Layout: where gist slots sit in a passage, the writer's mask, gapped positions, kept rows.

Pure tensor code; knows nothing of models.
"""

from gist_memory.layout.layout import (
    KIND_GIST_TOKEN,
    KIND_PAD,
    KIND_TAIL,
    KIND_TEXT,
    GistSlots,
    Layout,
    Segment,
    WriterBatch,
    allowed_matrix,
    build_layout,
    build_writer_batch,
    float_mask,
    gist_slots,
    piece_windows,
    window_starts,
)

__all__ = [
    "Segment",
    "GistSlots",
    "Layout",
    "WriterBatch",
    "build_layout",
    "build_writer_batch",
    "gist_slots",
    "piece_windows",
    "window_starts",
    "allowed_matrix",
    "float_mask",
    "KIND_TEXT",
    "KIND_GIST_TOKEN",
    "KIND_TAIL",
    "KIND_PAD",
]
