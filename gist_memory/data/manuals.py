"""Technical manuals as corpus sources: the Python documentation (GNU info) and the PostgreSQL documentation
(HTML), prose paragraphs only (code, tables, menus and navigation dropped)."""

from __future__ import annotations

import glob
import gzip
import html.parser
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Optional, Union

from gist_memory.data.clean import clean_text, is_prose, word_count
from gist_memory.data.document import Document, SourceMissing

_INFO_NOTE = re.compile(r"\*[Nn]ote\s+([^*]+?)(?::\s+[0-9a-f]{1,5}[.,]|::)")
_INFO_FOOTREF = re.compile(r"(?<=[\w)’'\"])\(\d+\)")
_INFO_DEF = re.compile(
    r"^\s*-- (?:Function|Method|Class|Exception|Attribute|Data|Macro|Type|Variable|C Function|"
    r"C Type|C Macro|C Member|C Var|Opcode|Command|Option|Environment variable|[A-Z][\w ]*): (.+)$"
)
_INFO_SKIP_NODES = frozenset({"Index", "Python Module Index", "Changelog", "History and License", "Copyright"})


def _info_paragraphs(body: str) -> list[str]:
    """Prose paragraphs of one info node (code blocks, menus, footnotes and headings dropped).

    A definition header (`-- Function: os.makedirs (name, ...)`) is prefixed to the paragraph after it.
    """
    body = body.split("---------- Footnotes ----------")[0]
    body = _INFO_NOTE.sub(lambda m: m.group(1), body)
    paras: list[str] = []
    pending_def = ""
    for block in re.split(r"\n[ \t]*\n", body):
        lines = [ln for ln in block.split("\n") if ln.strip()]
        if not lines:
            continue
        # section heading: a line underlined with *, =, -, . characters
        if len(lines) >= 2 and re.fullmatch(r"[*=\-.]{3,}", lines[-1].strip()):
            pending_def = ""
            continue
        m = _INFO_DEF.match(lines[0])
        if m:
            head = [m.group(1)]
            lines = lines[1:]
            while lines and len(lines[0]) - len(lines[0].lstrip(" ")) >= 10:  # wrapped signature
                head.append(lines.pop(0))
            pending_def = clean_text(re.sub(r"\s+\(", "(", " ".join(head), count=1))
            if not lines:
                continue
        if lines[0].strip().startswith(("* Menu:", "* ")) and "::" in block:
            continue
        text = _INFO_FOOTREF.sub("", "\n".join(lines))
        text = re.sub(r"‘\s*(?:Return value: [^’]*|Part of the Stable ABI[^’]*)’", " ", text)
        text = re.sub(r"^\s*[*-]\s+", "", text)  # bullet marker
        text = re.sub(r"\(\s+", "(", clean_text(text))
        if not is_prose(text):
            continue
        if pending_def:
            text = f"{pending_def}: {text}"
            pending_def = ""
        paras.append(text)
    return paras


def iter_python_docs(path: Optional[Union[str, Path]] = None) -> Iterator[Document]:
    """Python documentation nodes from the GNU info edition (`/usr/share/info/python3.*.info.gz`).

    One document per info node; the Changelog, indexes and licence texts are skipped.

    Raises:
        SourceMissing: No Python info documentation is installed.
    """
    if path is None:
        found = sorted(glob.glob("/usr/share/info/python3*.info.gz")) + sorted(
            glob.glob("/usr/share/info/python3*.info")
        )
        if not found:
            raise SourceMissing("python-docs")
        path = found[-1]
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as f:
        raw = f.read()
    nodes: list[tuple[str, str, str]] = []
    for chunk in raw.split("\x1f"):
        m = re.match(r"\s*File: [^,]+,\s+Node: ([^,\n]+)(.*)\n", chunk)
        if not m:
            continue
        up = re.search(r"Up: ([^,\n]+)", m.group(2))
        nodes.append((m.group(1).strip(), up.group(1).strip() if up else "", chunk[m.end() :]))
    parent = {name: up for name, up, _ in nodes}

    def skipped(name: str) -> bool:
        seen = set()
        while name and name not in seen:
            if name in _INFO_SKIP_NODES:
                return True
            seen.add(name)
            name = parent.get(name, "")
        return False

    for name, _up, body in nodes:
        if name in ("Top", "Tag Table") or skipped(name):
            continue
        paras = _info_paragraphs(body)
        if paras:
            yield Document(doc_id=f"python-docs:{name}", source="python-docs", paragraphs=paras, title=name)


class _HTMLProse(html.parser.HTMLParser):
    """Collects the text of `<p>` elements, skipping navigation, tables, code and scripts."""

    _SKIP = frozenset({"pre", "table", "script", "style", "head"})
    _VOID = frozenset({"br", "hr", "img", "meta", "link", "input", "col", "area", "base", "wbr"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[tuple[str, bool]] = []  # (tag, skip)
        self.paragraphs: list[str] = []
        self.title = ""
        self._cur: Optional[list[str]] = None
        self._in_title = False
        self._is_term = False
        self._term = ""

    def _skipping(self) -> bool:
        return any(s for _, s in self.stack)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, Optional[str]]]) -> None:
        if tag in self._VOID:
            return
        cls = dict(attrs).get("class") or ""
        skip = tag in self._SKIP or (tag == "div" and any(c in cls for c in ("navheader", "navfooter", "toc")))
        self.stack.append((tag, skip))
        if tag == "title":
            self._in_title = True
        if tag in ("p", "dt") and not self._skipping():
            self._flush()
            self._cur = []
            self._is_term = tag == "dt"

    def handle_endtag(self, tag: str) -> None:
        if tag in self._VOID:
            return
        if tag == "title":
            self._in_title = False
        if tag in ("p", "dt"):
            self._flush()
        for i in range(len(self.stack) - 1, -1, -1):
            if self.stack[i][0] == tag:
                del self.stack[i:]
                break

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title += data
        if self._cur is not None and not self._skipping():
            self._cur.append(data)

    def _flush(self) -> None:
        if self._cur is not None:
            text = clean_text("".join(self._cur))
            if self._is_term:  # a <dt> term is prefixed to the paragraph after it
                self._term = text
            elif text:
                if self._term:
                    text = f"{self._term}: {text}"
                    self._term = ""
                self.paragraphs.append(text)
        self._cur = None
        self._is_term = False

    def close(self) -> None:
        super().close()
        self._flush()


def html_to_paragraphs(markup: str) -> tuple[str, list[str]]:
    """The title and prose paragraphs (`<p>` text) of an HTML page, with the stdlib parser.

    Args:
        markup: HTML source.

    Returns:
        `(title, paragraphs)`.
    """
    p = _HTMLProse()
    p.feed(markup)
    p.close()
    return clean_text(p.title), p.paragraphs


def iter_postgres_docs(path: Optional[Union[str, Path]] = None) -> Iterator[Document]:
    """PostgreSQL documentation pages (`/usr/share/doc/postgresql-doc-*/html/*.html`), one document per page.

    Raises:
        SourceMissing: The HTML documentation is not installed.
    """
    if path is None:
        found = sorted(glob.glob("/usr/share/doc/postgresql-doc-*/html"))
        if not found:
            raise SourceMissing("postgres-docs")
        path = found[-1]
    files = sorted(Path(path).glob("*.html"))
    if not files:
        raise SourceMissing("postgres-docs")
    for fp in files:
        if fp.name in ("bookindex.html", "index.html") or fp.name.startswith(("release-", "appendix-obsolete")):
            continue
        title, paras = html_to_paragraphs(fp.read_text(encoding="utf-8", errors="replace"))
        paras = [p for p in paras if word_count(p) >= 4]
        if paras:
            yield Document(doc_id=f"postgres-docs:{fp.stem}", source="postgres-docs", paragraphs=paras, title=title)
