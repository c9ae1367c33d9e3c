"""Held-out evaluation: kinds, templates and values that training never generated (issue 12).

- `items`: planted facts with new templates and values (`entity_*`, `common_*`), one passage or among four.
- `faq`: real questions over real text (the Python FAQ), shipped as `assets/heldout/python_faq.jsonl`.
- `run`: the method x kind x ratio table through `GistModel`'s public API; `render_markdown(results)`.

Command: `python -m gist_memory.eval.heldout --ratios 4 8 --out results.jsonl` (see
docs/evaluation.md). Rebuild the shipped data: `python -m gist_memory.eval.heldout.build_assets`.
"""

from gist_memory.eval.heldout.items import (
    COMMON_TEMPLATES,
    ENTITY_TEMPLATES,
    KINDS,
    PLANTED_KINDS,
    HeldoutError,
    HeldoutItem,
    build_items,
    build_planted,
    load_wiki_passages,
    prompt,
)
from gist_memory.eval.heldout.run import LABEL, METHODS, read_results, render_details, render_markdown, run_table

__all__ = [
    "COMMON_TEMPLATES", "ENTITY_TEMPLATES", "KINDS", "LABEL", "METHODS", "PLANTED_KINDS", "HeldoutError",
    "HeldoutItem", "build_items", "build_planted", "load_wiki_passages", "prompt", "read_results",
    "render_details", "render_markdown", "run_table",
]  # fmt: skip
