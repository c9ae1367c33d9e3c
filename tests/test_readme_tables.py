"""The README's held-out table is the rendering of the committed results file, never a hand copy."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _tool():
    spec = importlib.util.spec_from_file_location("update_tables", ROOT / "scripts" / "update_tables.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_readme_table_is_generated_from_the_results_file():
    tool = _tool()
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = tool.rendered()
    assert "gist+anchors" in block and "pool+anchors" in block and "full" in block
    assert tool.replace_block(readme, block, "README.md") == readme, "run python scripts/update_tables.py"


def test_model_card_holds_the_same_tables():
    tool = _tool()
    card = (ROOT / "gist_memory" / "assets" / "default_model" / "MODEL_CARD.md").read_text(encoding="utf-8")
    assert tool.replace_block(card, tool.rendered(), "MODEL_CARD.md") == card
    block = tool.rendered_reader()
    assert "(frozen reader) @4x" in block and "(adapted reader) @4x" in block
    assert tool.replace_block(card, block, "MODEL_CARD.md", "reader-table") == card


def test_missing_markers_are_named():
    with pytest.raises(ValueError, match="no <!-- heldout-table"):
        _tool().replace_block("no markers here", "x", "somewhere.md")


def test_benchmark_doc_tables_are_generated_from_their_results():
    """docs/benchmarks.md's generated blocks (peers, ingest, TTFT breakdown) match their committed results."""
    tool = _tool()
    path = ROOT / "docs" / "benchmarks.md"
    text = path.read_text(encoding="utf-8")
    assert tool.refresh(text, str(path), required=False) == text, "run python scripts/update_tables.py"
