"""ingest: chunking by sentences under a token budget, file types and bad files, resuming, and a real SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest

from gist_memory.store import GistMemory, IngestSummary, ingest
from gist_memory.store.ingest import Chunker, iter_passages
from gist_memory.store.testing import FakeGistModel, HashingEmbedder

STORY = (
    "Maren Voss became the chief curator in 1912. She catalogued the archive, box by box, for eleven years. "
    "The archive code QX-4471 marks the oldest maps. Nobody opened them until the flood of 1954 forced a move. "
    "Then the maps went north to a dry cellar in Bergen! Was that the right call? Historians still argue about it."
)


def _words(s: str) -> list[str]:
    return s.split()


@pytest.mark.parametrize("budget", [12, 40])
def test_chunks_respect_budget_and_sentences_with_hf_tokenizer(tiny_base_dir, budget):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_base_dir)
    text = STORY + "\n\n" + STORY.replace("1912", "1913")
    chunker = Chunker(budget, tok)
    chunks = chunker.chunk(text)
    assert len(chunks) > 1
    for t, n in chunks:
        assert n <= budget
        assert len(tok(t, add_special_tokens=False)["input_ids"]) <= budget + 1  # re-tokenised alone
    assert _words(" ".join(t for t, _ in chunks)) == _words(text)  # nothing lost, nothing repeated, in order
    if budget == 40:  # every sentence fits: passages end at sentence ends
        assert all(t.rstrip()[-1] in ".!?" for t, _ in chunks)


def test_long_sentence_is_cut_and_whitespace_counting():
    text = " ".join(f"w{i}" for i in range(50)) + ". Short one."
    chunks = Chunker(16).chunk(text)  # no tokenizer: words
    assert [n for _, n in chunks] == [16, 16, 16, 4] and chunks[-1][0] == "w48 w49. Short one."
    with pytest.raises(ValueError, match="max_passage_tokens"):
        Chunker(2)


def _make_corpus(root) -> dict[str, str]:
    (root / "sub").mkdir(parents=True)
    (root / ".hidden").mkdir()
    files = {
        "a.txt": STORY,
        "b.md": "# Title\n\nSome *markdown* text about gardens. Roses need sun.\n\n- list item one\n- item two\n",
        "sub/d.txt": "Deep file. It has two sentences.",
        "empty.txt": "",
    }
    for name, text in files.items():
        (root / name).write_text(text, encoding="utf-8")
    recs = [
        {"text": "Record with an id and metadata.", "id": "rec-1", "metadata": {"lang": "en"}},
        {"text": "Record without an id."},
        "just a string",
        {"text": ""},
        {"text": "bad metadata", "metadata": [1]},
    ]
    lines = [json.dumps(r) for r in recs] + ["{not json", ""]
    (root / "c.jsonl").write_text("\n".join(lines), encoding="utf-8")
    (root / "bin.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    (root / "latin1.txt").write_bytes("Caf\xe9 cr\xe8me".encode("latin-1"))
    (root / "image.png").write_bytes(b"\x89PNG")
    (root / ".hidden" / "secret.txt").write_text("never read")
    return files


def test_ingest_folder_reports_bad_files_and_resumes(tmp_path):
    _make_corpus(tmp_path / "docs")
    model, emb = FakeGistModel(), HashingEmbedder()
    mem = GistMemory(model, tmp_path / "mem", embedder=emb)
    summary = ingest([tmp_path / "docs", tmp_path / "missing.txt"], mem, max_passage_tokens=12, show_progress=False)
    assert isinstance(summary, IngestSummary)
    skipped = {os.path.basename(p): why for p, why in summary.files_skipped}
    assert skipped.keys() == {"bin.txt", "latin1.txt", "image.png", "missing.txt"}
    assert "binary" in skipped["bin.txt"] and "UTF-8" in skipped["latin1.txt"]
    assert "unsupported" in skipped["image.png"] and "no such" in skipped["missing.txt"]
    assert summary.files_read == 5  # a, b, c, sub/d, empty
    assert len(summary.records_skipped) == 4  # string, empty text, bad metadata, bad json
    assert summary.passages_added == len(mem) > 5 and summary.passages_present == 0
    assert summary.tokens_added > 0 and summary.seconds > 0 and "passages added" in str(summary)
    rec = mem.get("rec-1")
    assert rec.text == "Record with an id and metadata." and rec.metadata["lang"] == "en"
    assert rec.metadata["source"].endswith("c.jsonl") and rec.metadata["line"] == 1
    assert not any("secret" in h.text for h in mem.search("never read", k=50))
    hits = mem.search("roses need sun", k=1, filter={"source": str((tmp_path / "docs" / "b.md").resolve())})
    assert "Roses" in hits[0].text
    # a second run adds nothing and compresses nothing
    calls, seen = model.compress_calls, []
    again = ingest(
        tmp_path / "docs",
        mem,
        max_passage_tokens=12,
        show_progress=False,
        on_progress=lambda s: seen.append(s.passages_total),
    )
    assert seen and seen == sorted(seen) and seen[-1] == summary.passages_added
    assert again.passages_added == 0 and again.passages_present == summary.passages_added
    assert model.compress_calls == calls
    # an edited file: its new passages are added next to the old ones (ids carry the text hash)
    (tmp_path / "docs" / "sub" / "d.txt").write_text("Deep file. It now has other words.")
    third = ingest(tmp_path / "docs", mem, max_passage_tokens=12, show_progress=False)
    assert third.passages_added == 1


_INGESTER = textwrap.dedent(
    """
    import sys
    from gist_memory.store import GistMemory, ingest
    from gist_memory.store.testing import FakeGistModel, HashingEmbedder
    docs, path = sys.argv[1], sys.argv[2]
    mem = GistMemory(FakeGistModel(delay_s=0.04), path, embedder=HashingEmbedder(), storage_dtype="int8")
    ingest(docs, mem, max_passage_tokens=10, batch_size=2, commit_every=3, show_progress=False)
    print("finished")
    """
)


def _count_docs(db: str) -> int:
    try:
        con = sqlite3.connect(db, timeout=5)
        try:
            return con.execute("SELECT count(*) FROM docs").fetchone()[0]
        finally:
            con.close()
    except sqlite3.Error:
        return 0


def test_sigkill_halfway_then_rerun_has_every_passage_once(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(6):
        sents = [f"File {i} sentence {j} talks about topic{j} and item{i * j}." for j in range(12)]
        (docs / f"f{i}.txt").write_text(" ".join(sents))
    expected = {p.id: p.text for _, ps in iter_passages(docs, 10) for p in ps}
    assert len(expected) > 40
    path = tmp_path / "mem"
    script = tmp_path / "ingest.py"
    script.write_text(_INGESTER)
    proc = subprocess.Popen([sys.executable, str(script), str(docs), str(path)], stderr=subprocess.PIPE)
    deadline = time.time() + 90
    while _count_docs(str(path / "memory.sqlite")) < 12:
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.time() < deadline, "ingest subprocess made no progress"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    done_before = _count_docs(str(path / "memory.sqlite"))
    assert 12 <= done_before < len(expected)  # really killed half-way

    model = FakeGistModel()
    mem = GistMemory.load(path, model=model, embedder=HashingEmbedder())
    assert mem.storage_dtype == "int8" and len(mem) == done_before
    summary = ingest(docs, mem, max_passage_tokens=10, commit_every=5, show_progress=False)
    assert summary.passages_present == done_before
    assert summary.passages_added == len(expected) - done_before
    # every passage exactly once, with its text
    assert sorted(mem.ids()) == sorted(expected) and len(mem) == len(expected)
    assert all(mem.get(pid).text == t for pid, t in list(expected.items())[:: max(1, len(expected) // 10)])
    # no corrupt or missing state: every state reads back (checksum verified) without recompression
    calls = model.compress_calls
    hits = [mem.get(pid) for pid in expected]
    assert len(mem.states_for(hits)) == len(expected) and model.compress_calls == calls
    assert mem.store.stats["corrupt"] == 0
    # the index agrees with the docstore; leftovers of the killed writer are collectable
    assert mem._index.ntotal == len(expected)
    some = next(iter(expected.values()))
    assert mem.search(some, k=1)[0].text == some
    mem.gc(min_age_s=0)
    tmp_left = [f for d, _, fs in os.walk(path) for f in fs if f.startswith(".tmp-")]
    assert tmp_left == []
    assert len(list(mem.store.keys())) == len(set(expected.values()))
