"""Text layer: normalisation, sentence splitting (spaCy), anchor selection, char -> token span mapping.

Knows nothing of torch.
"""

from gist_memory.text.split import (
    SentenceSplitter,
    anchor_char_spans,
    normalize_text,
    token_pieces,
)

__all__ = ["SentenceSplitter", "anchor_char_spans", "normalize_text", "token_pieces"]
