"""Real questions over real text: the Python FAQ (Python Software Foundation, PSF licence).

`extract_faq(rst_dir)` reads the FAQ's reST sources as Debian's `python3.11-doc` installs them
(`/usr/share/doc/python3.11/html/_sources/faq/*.rst.txt`): every section whose title ends with `?` is one
question; its body, with reST markup reduced to plain text and cut at a paragraph boundary near `max_words`, is
the answer passage; the answer's first sentence (with the next one when the first is shorter than six words, as
in "Yes. ...") is the reference answer; a key phrase is picked from it (a literal such as `__init__` first, else the
run of one or two content words not in the question with the most letters, code-like words counting most and
adverbs/participles not at all).

Scoring (in `gist_memory.eval.heldout.run`): the passage is compressed; the reference answer is scored by
log-likelihood given the states, given the passage as text, and given nothing; the fraction of full text's gain
over no context that the states recover is `(LL_states - LL_none) / (LL_full - LL_none)`; and the key phrase is
looked for in a generated answer.

`python -m gist_memory.eval.heldout.build_assets` writes `gist_memory/assets/heldout/python_faq.jsonl`.
"""

from __future__ import annotations

import glob
import gzip
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Optional, Union

from gist_memory.eval.heldout.items import ASSETS, HeldoutError, HeldoutItem

FAQ_ASSET = ASSETS / "python_faq.jsonl"
DEFAULT_RST_DIR = "/usr/share/doc/python3.11/html/_sources/faq"
FAQ_FILES = ("general", "programming", "design", "library", "extending", "windows", "gui", "installed")

_STOP = frozenset(
    "a an and are as at be been but by can do does doing done for from has have how i if in into is it its just "
    "may more most no not of on one or other so some such than that the their them then there these they this to "
    "use used using was way we what when where which while who why will with would you your yes also only very "
    "there's it's don't you're isn't can't want need make makes get gets lot lots many much well like same "
    "different another any all each should could might must python being several possible ways easiest good best "
    "new even often usually simply general case because although unless since though".split()
)


def _inline(text: str) -> str:
    """reST inline markup to plain text."""
    text = re.sub(r":[\w:+-]+:`~?([^`<]*?)\s*<[^`>]*>`", r"\1", text)  # :role:`text <target>`
    text = re.sub(r":[\w:+-]+:`~([^`]*)`", lambda m: m.group(1).split(".")[-1], text)  # :func:`~a.b` -> b
    text = re.sub(r":[\w:+-]+:`([^`]*)`", r"\1", text)  # :role:`text`
    text = re.sub(r"`([^`<]+?)\s*<[^`>]+>`__?", r"\1", text)  # `text <url>`_
    text = re.sub(r"``([^`]+)``", r"\1", text)
    text = re.sub(r"`([^`]+)`_{0,2}", r"\1", text)
    text = re.sub(r"\*\*([^*]+)\*\*", r"\1", text)
    text = re.sub(r"(?<![\w*])\*([^*\s][^*]*)\*(?![\w*])", r"\1", text)
    text = re.sub(r"\|(\w+)\|", r"\1", text)
    return text


def _literals(text: str) -> list[str]:
    """The ``literal`` and :role:`target` spans of a raw reST text, as they read once rendered."""
    out = re.findall(r"``([^`]+)``", text)
    out += [_inline(m) for m in re.findall(r":[\w:+-]+:`[^`]+`", text)]
    return out


def _body_to_paragraphs(lines: list[str]) -> list[str]:
    """A section body's lines -> plain-text paragraphs (prose joined into one line; code blocks kept as lines)."""
    blocks: list[list[str]] = []
    cur: list[str] = []
    for ln in lines:
        if ln.strip():
            cur.append(ln.rstrip())
        elif cur:
            blocks.append(cur)
            cur = []
    if cur:
        blocks.append(cur)
    paras: list[str] = []
    code_next = False
    for b in blocks:
        first = b[0]
        if re.match(r"\s*\.\. _[^:]+:\s*$", first) or re.match(r"\s*\.\. (only|contents|index|highlight)::", first):
            continue
        if re.match(r"\s*\.\.(\s|$)", first) and "::" not in first:  # a reST comment
            continue
        m = re.match(r"\s*\.\. ([\w-]+)::\s*(.*)$", first)
        if m:
            directive = m.group(1)
            rest = [ln for ln in b[1:] if not re.match(r"\s*:\w[\w-]*:", ln)]
            if directive in ("code-block", "doctest", "testcode", "code", "sourcecode", "productionlist"):
                code_next = False
                if rest:
                    paras.append(_dedent(rest))
                else:
                    code_next = True
                continue
            b = ([m.group(2)] if m.group(2) else []) + rest
            if not b:
                continue
        indented = all(ln.startswith((" ", "\t")) for ln in b)
        if code_next and indented:
            paras.append(_dedent(b))
            code_next = False
            continue
        code_next = False
        text = " ".join(ln.strip() for ln in b)
        if text.endswith("::"):
            code_next = True
            text = text[:-2].rstrip()
            text = (text + ":") if text and not text.endswith(":") else text
        if re.match(r"^[-=~^\"'`#*+]{3,}$", text):
            continue
        text = re.sub(r"\s+", " ", _inline(text)).strip()
        if text:
            paras.append(text)
    return paras


def _dedent(lines: list[str]) -> str:
    ind = min(len(ln) - len(ln.lstrip()) for ln in lines if ln.strip())
    return "\n".join(ln[ind:] for ln in lines)


def _sections(rst: str) -> Iterator[tuple[str, list[str]]]:
    """(title, body lines) of every section of a reST text."""
    lines = rst.split("\n")
    heads = []
    for i in range(len(lines) - 1):
        t, u = lines[i], lines[i + 1]
        if t.strip() and re.match(r"^([-=~^\"'`#*+])\1{2,}\s*$", u) and len(u.rstrip()) >= len(t.rstrip()) - 1:
            if i > 0 and re.match(r"^([-=~^\"'`#*+])\1{2,}\s*$", lines[i - 1]):  # overlined title
                heads.append((i, t.strip(), i + 2))
            elif not re.match(r"^([-=~^\"'`#*+])\1{2,}\s*$", t):
                heads.append((i, t.strip(), i + 2))
    for n, (_i, title, body_start) in enumerate(heads):
        end = heads[n + 1][0] if n + 1 < len(heads) else len(lines)
        if n + 1 < len(heads) and end > 0 and re.match(r"^([-=~^\"'`#*+])\1{2,}\s*$", lines[end - 1]):
            end -= 1  # the next title's overline
        yield title, lines[body_start:end]


_SENT = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9_])")


def first_sentences(paragraph: str, min_words: int = 6) -> str:
    """The first sentence of `paragraph`, with the next one while shorter than `min_words` words."""
    parts = [p.strip() for p in _SENT.split(paragraph) if p.strip()]
    # don't split after common abbreviations
    merged: list[str] = []
    for p in parts:
        if merged and re.search(r"\b(e\.g|i\.e|etc|vs|Mr|Dr|cf)\.$", merged[-1]):
            merged[-1] += " " + p
        else:
            merged.append(p)
    out = merged[0] if merged else paragraph.strip()
    k = 1
    while len(out.split()) < min_words and k < len(merged):
        out += " " + merged[k]
        k += 1
    return out


def _codeish(w: str) -> bool:
    return bool(re.search(r"[._()\d]|[a-z][A-Z]", w)) or (w.isupper() and len(w) > 1)


def _weight(w: str) -> int:
    """How telling a word is as (part of) a key phrase: code-like words most, adverbs and participles not."""
    if _codeish(w):
        return 20 + len(w)
    if re.search(r"(ly|ing|ed)$", w.lower()):
        return 0
    return len(w)


def key_phrase(question: str, sentence: str, literals: tuple[str, ...] = ()) -> str:
    """A short phrase of `sentence` that the question does not give away (see the module docstring)."""
    qwords = {w.lower() for w in re.findall(r"[\w']+", question)}
    for lit in literals:
        lit = lit.strip()
        if (
            3 <= len(lit) <= 30
            and len(lit.split()) <= 2
            and re.search(r"\w", lit)
            and lit.lower() not in qwords
            and re.search(r"(?<![\w.])" + re.escape(lit) + r"(?![\w])", sentence)
        ):
            return lit
    words: list[str] = []
    runs: list[list[re.Match[str]]] = []
    cur: list[re.Match[str]] = []
    prev_end = 0
    for m in re.finditer(r"[\w][\w'.+-]*[\w]|\w", sentence):
        w = m.group()
        words.append(w)
        if cur and sentence[prev_end : m.start()].strip():  # phrases never cross punctuation or slashes
            runs.append(cur)
            cur = []
        prev_end = m.end()
        if w.lower() in _STOP or w.isdigit() and len(w) < 2 or _weight(w) == 0:
            if cur:
                runs.append(cur)
            cur = []
        else:
            cur.append(m)
    if cur:
        runs.append(cur)
    best, best_score = "", (-1, -1)
    for run in runs:
        for a in range(len(run)):
            for b in range(a + 1, min(len(run), a + 2) + 1):
                span = [m.group() for m in run[a:b]]
                new = [w for w in span if w.lower() not in qwords]
                if not new or span[0].lower() in qwords or span[-1].lower() in qwords:
                    continue
                score = (sum(_weight(w) for w in new), -len(span))
                if score > best_score:
                    best, best_score = sentence[run[a].start() : run[b - 1].end()], score
    if not best:  # every content word is in the question: the longest content word
        cands = [w for w in words if w.lower() not in _STOP]
        best = max(cands, key=len) if cands else ""
    return best


def _raw_first_paragraph(lines: list[str]) -> str:
    """The raw reST of the first prose paragraph of a section body (labels, comments and directives skipped)."""
    block: list[str] = []
    for ln in lines:
        if ln.strip():
            block.append(ln)
            continue
        if block and not block[0].lstrip().startswith(".."):
            break
        block = []
    return " ".join(x.strip() for x in block)


def _info_node_names(info: Optional[Union[str, Path]] = None) -> set[str]:
    found = [info] if info else sorted(glob.glob("/usr/share/info/python3*.info.gz"))
    if not found:
        return set()
    with gzip.open(found[-1], "rt", encoding="utf-8", errors="replace") as f:
        raw = f.read()
    return set(re.findall(r"File: [^,]+,\s+Node: ([^,\n]+)", raw))


def _squash(s: str) -> str:
    return re.sub(r"[^a-z0-9]", "", s.lower().replace("’", "'"))


def extract_faq(rst_dir: Union[str, Path] = DEFAULT_RST_DIR, max_words: int = 180, min_answer_words: int = 5,
                info: Optional[Union[str, Path]] = None) -> list[HeldoutItem]:  # fmt: skip
    """FAQ items from the reST sources in `rst_dir` (see the module docstring).

    Each item records `meta.doc_id` = `python-docs:<info node>` (the document id the training corpus gives the
    same answer in the GNU info edition), so whether a training corpus could have held the passage can be checked
    with `gist_memory.data.is_heldout`.

    Raises:
        HeldoutError: No FAQ sources in `rst_dir`.
    """
    d = Path(rst_dir)
    files = [d / f"{name}.rst.txt" for name in FAQ_FILES if (d / f"{name}.rst.txt").is_file()]
    if not files:
        raise HeldoutError(f"no Python FAQ reST sources in {d} (apt-get install -y python3.11-doc)")
    nodes = {_squash(n): n for n in _info_node_names(info)}
    items: list[HeldoutItem] = []
    for fp in files:
        for title, body in _sections(fp.read_text(encoding="utf-8")):
            question = _inline(title).strip()
            if not question.endswith("?"):
                continue
            paras = _body_to_paragraphs(body)
            prose = [p for p in paras if "\n" not in p and len(p.split()) >= 2]
            if not prose:
                continue
            passage_paras: list[str] = []
            words = 0
            for p in paras:
                w = len(p.split())
                if passage_paras and words + w > max_words:
                    break
                passage_paras.append(p)
                words += w
            passage = "\n".join(passage_paras)
            if len(passage.split()) > max_words * 2:  # one huge first paragraph: cut at a sentence end
                passage = " ".join(passage.split()[: max_words * 2])
            reference = first_sentences(prose[0])
            if len(reference.split()) < min_answer_words or reference not in passage:
                continue
            raw_first = _raw_first_paragraph(body)
            kp = key_phrase(question, reference, tuple(_literals(raw_first)))
            if not kp:
                continue
            node = nodes.get(_squash(question), "")
            items.append(HeldoutItem(
                id=f"faq-{len(items):04d}", kind="faq", passages=[passage], question=question, answer=reference,
                key_phrase=kp,
                meta={"source": f"Python {fp.name.split('.')[0]} FAQ", "file": fp.name,
                      "doc_id": f"python-docs:{node}" if node else "", "license": "PSF-2.0"},
            ))  # fmt: skip
    return items


def save_faq(items: list[HeldoutItem], path: Union[str, Path] = FAQ_ASSET) -> None:
    """Writes FAQ items as JSON lines."""
    from gist_memory.data.document import write_jsonl

    write_jsonl(path, (it.to_dict() for it in items))


def load_faq(path: Optional[Union[str, Path]] = None) -> list[HeldoutItem]:
    """The shipped FAQ items (or those at `path`).

    Raises:
        HeldoutError: Missing file or a line that is not an item.
    """
    p = Path(path) if path is not None else FAQ_ASSET
    if not p.is_file():
        raise HeldoutError(f"no FAQ items at {p} (rebuild: python -m gist_memory.eval.heldout.build_assets)")
    out = []
    with open(p, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(HeldoutItem.from_dict(json.loads(line)))
            except (json.JSONDecodeError, TypeError) as e:
                raise HeldoutError(f"{p}:{n}: not a held-out item ({e})") from e
    return out
