"""The writer layout and mask: where gist slots sit in a passage and what each row may see.

A passage is compressed in two passes over the *base* model (since 0.3):

1. the raw text, causally, exactly as the base model reads it (positions 0..n-1): its rows are the reader's
   own rows, so anchor tokens are kept as the base model would have computed them;
2. the gist slots of every sentence piece, attending to that text and to earlier gists (the only pass in which
   the writer's trained weights act).

Gist slot j of a piece `[s, e)` with g gists stands for the j-th of g equal sub-chunks of the piece and sits at
the position of that sub-chunk's last token, `p = s + ceil((j + 1) (e - s) / g) - 1`. Visibility of a gist at
position p, in order of slots within its segment:

  - raw tokens of its own segment (and visibility window) at positions <= p;
  - gists of its own segment that come earlier in slot order, and itself;
  - nothing of another segment, never padding.

For a reference single pass (`build_full_layout`, used by tests and training checks) a row holds segments one
after another (each as its text then its gists), then a tail: text tokens see earlier text of their segment
(causal), gists as above, and the tail sees the kept rows (gists and anchors) of every segment and the earlier
tail. Positions are gapped: segment k starts where segment k-1's text ended (its span), gists take the position
of their sub-chunk's end, the tail starts after the last segment's span. That is exactly what splicing states
computed alone reproduces.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

KIND_PAD = -1
KIND_TEXT = 0
KIND_GIST_TOKEN = 1
KIND_TAIL = 2


@dataclass
class Segment:
    """One passage to compress.

    Attributes:
        ids: Raw token ids of the passage (no special tokens).
        pieces: Token spans `[start, end)` of its sentence pieces, contiguous and covering `ids`.
        n_gists: Gist slots of each piece (0 allowed, e.g. for training-free compressors).
        anchors: Per raw token, True if it keeps its own K/V (seen by the tail).
    """

    ids: Sequence[int]
    pieces: Sequence[tuple[int, int]]
    n_gists: Sequence[int]
    anchors: Optional[Sequence[bool]] = None

    def __post_init__(self) -> None:
        n = len(self.ids)
        if len(self.pieces) != len(self.n_gists):
            raise ValueError(f"{len(self.pieces)} pieces but {len(self.n_gists)} gist counts")
        pos = 0
        for s, e in self.pieces:
            if s != pos or e <= s:
                raise ValueError(f"pieces must be contiguous, non-empty and cover the ids; got {list(self.pieces)}")
            pos = e
        if pos != n:
            raise ValueError(f"pieces cover {pos} tokens but the segment has {n}")
        if any(int(g) < 0 for g in self.n_gists):
            raise ValueError(f"gist counts must be >= 0, got {list(self.n_gists)}")
        if self.anchors is not None and len(self.anchors) != n:
            raise ValueError(f"anchors has {len(self.anchors)} entries for {n} tokens")


@dataclass
class GistSlots:
    """The gist slots of one segment, in slot order (numpy, length G).

    Attributes:
        piece: (G,) piece index of each gist.
        slot: (G,) slot of the gist within its piece (0..g-1): which gist embedding it uses.
        pos: (G,) position (= index of the last raw token of its sub-chunk).
    """

    piece: np.ndarray
    slot: np.ndarray
    pos: np.ndarray


def gist_slots(seg: Segment) -> GistSlots:
    """Where a segment's gists sit (vectorised; no per-token Python loop)."""
    starts = np.asarray([s for s, _ in seg.pieces], dtype=np.int64)
    lengths = np.asarray([e - s for s, e in seg.pieces], dtype=np.int64)
    ng = np.asarray(seg.n_gists, dtype=np.int64)
    piece = np.repeat(np.arange(len(ng)), ng)
    slot = np.arange(int(ng.sum())) - np.repeat(np.cumsum(ng) - ng, ng)
    g = ng[piece]
    L = lengths[piece]
    pos = starts[piece] + np.maximum(1, -(-(slot + 1) * L // np.maximum(g, 1))) - 1
    return GistSlots(piece=piece, slot=slot, pos=np.minimum(pos, starts[piece] + L - 1))


@dataclass
class WriterBatch:
    """Pass-2 inputs for a batch of segments compressed alone (right padding). Tensors are per row b.

    Attributes:
        text_ids: (B, N) raw ids (pad id in padding).
        text_len: (B,) raw tokens per row.
        anchors: (B, N) bool, raw tokens kept.
        gist_slot: (B, G) slot index (0 in padding).
        gist_pos: (B, G) positions (0 in padding).
        gist_valid: (B, G) bool.
        window: (B, N) visibility window of each raw token; gist_window (B, G) that of each gist.
    """

    text_ids: torch.Tensor
    text_len: torch.Tensor
    anchors: torch.Tensor
    gist_slot: torch.Tensor
    gist_pos: torch.Tensor
    gist_valid: torch.Tensor
    window: torch.Tensor
    gist_window: torch.Tensor

    def gist_allowed(self) -> torch.Tensor:
        """(B, G, N + G) bool: may gist i see raw token j (first N columns) or gist j (last G columns)."""
        B, N = self.text_ids.shape
        G = self.gist_slot.shape[1]
        dev = self.text_ids.device
        text_valid = torch.arange(N, device=dev)[None] < self.text_len[:, None]  # (B, N)
        j = torch.arange(N, device=dev)
        see_text = (
            (j[None, None, :] <= self.gist_pos[:, :, None])
            & text_valid[:, None, :]
            & (self.window[:, None, :] == self.gist_window[:, :, None])
        )
        g = torch.arange(G, device=dev)
        see_gist = (g[None, None, :] <= g[None, :, None]) & self.gist_valid[:, None, :] & (
            self.gist_window[:, None, :] == self.gist_window[:, :, None]
        )
        allowed = torch.cat([see_text, see_gist], dim=2)
        # a padding gist sees itself only, so softmax never meets an all-masked row
        eye = torch.zeros(B, G, N + G, dtype=torch.bool, device=dev)
        eye[:, g, N + g] = True
        return allowed | (~self.gist_valid[:, :, None] & eye)


def build_writer_batch(
    segs: Sequence[Segment], pad_id: int, window_tokens: Optional[int] = None, device: Optional[torch.device] = None
) -> WriterBatch:
    """Lay out segments compressed alone, one per row (positions start at 0 in every row).

    `window_tokens`: a gist sees raw tokens of its own window only (windows of that many raw tokens, aligned to
    piece boundaries by the caller's choice of pieces; here a token's window is `index // window_tokens` unless
    the piece that holds it starts earlier, in which case the piece's start decides).
    """
    B = len(segs)
    N = max((len(s.ids) for s in segs), default=0)
    slots = [gist_slots(s) for s in segs]
    G = max((len(sl.slot) for sl in slots), default=0)
    text_ids = np.full((B, N), pad_id, dtype=np.int64)
    anchors = np.zeros((B, N), dtype=bool)
    window = np.zeros((B, N), dtype=np.int64)
    gist_slot = np.zeros((B, G), dtype=np.int64)
    gist_pos = np.zeros((B, G), dtype=np.int64)
    gist_valid = np.zeros((B, G), dtype=bool)
    gist_window = np.zeros((B, G), dtype=np.int64)
    lens = np.zeros(B, dtype=np.int64)
    for b, (s, sl) in enumerate(zip(segs, slots)):
        n, g = len(s.ids), len(sl.slot)
        lens[b] = n
        text_ids[b, :n] = np.asarray(s.ids, dtype=np.int64)
        if s.anchors is not None:
            anchors[b, :n] = np.asarray(s.anchors, dtype=bool)
        w = piece_windows(s, window_tokens)
        window[b, :n] = w
        gist_slot[b, :g] = sl.slot
        gist_pos[b, :g] = sl.pos
        gist_valid[b, :g] = True
        gist_window[b, :g] = w[sl.pos] if g else 0
    t = lambda a: torch.as_tensor(a, device=device)  # noqa: E731
    return WriterBatch(
        text_ids=t(text_ids), text_len=t(lens), anchors=t(anchors), gist_slot=t(gist_slot), gist_pos=t(gist_pos),
        gist_valid=t(gist_valid), window=t(window), gist_window=t(gist_window),
    )


def piece_windows(seg: Segment, window_tokens: Optional[int]) -> np.ndarray:
    """(n,) visibility window of each raw token: a new window starts at the first piece that would carry the
    current one past `window_tokens` raw tokens (pieces never straddle windows)."""
    n = len(seg.ids)
    out = np.zeros(n, dtype=np.int64)
    if not window_tokens:
        return out
    w, start = 0, 0
    for s, e in seg.pieces:
        if s > start and e - start > window_tokens:
            w, start = w + 1, s
        out[s:e] = w
    return out


def window_starts(seg: Segment, window_tokens: Optional[int]) -> list[int]:
    """Raw-token index where each visibility window starts."""
    w = piece_windows(seg, window_tokens)
    return [0] + [int(i) for i in np.flatnonzero(np.diff(w)) + 1]


@dataclass
class Layout:
    """A reference single pass over segments, their gists and a tail (right padding). Tensors are (B, T).

    Attributes:
        input_ids: Raw ids for text and tail rows (pad id elsewhere).
        gist_slot: Slot of gist rows (-1 elsewhere): the model puts its gist embedding there.
        position_ids: Gapped positions (see module docstring; 0 in padding).
        kind: KIND_TEXT / KIND_GIST_TOKEN / KIND_TAIL / KIND_PAD.
        segment: Segment index within the row (-1 for tail and padding).
        kept: Gist or anchor rows (what the tail may see).
        window: Visibility window inside the segment (0 unless `window_tokens` splits it).
        lengths: (B,) valid length of each row.
    """

    input_ids: torch.Tensor
    gist_slot: torch.Tensor
    position_ids: torch.Tensor
    kind: torch.Tensor
    segment: torch.Tensor
    kept: torch.Tensor
    window: torch.Tensor
    lengths: torch.Tensor
    segment_bounds: list[list[tuple[int, int]]] = field(default_factory=list)

    @property
    def valid(self) -> torch.Tensor:
        """(B, T) True where not padding."""
        return self.kind != KIND_PAD

    def allowed(self) -> torch.Tensor:
        """(B, T, T) bool visibility matrix (see module docstring)."""
        return allowed_matrix(self.segment, self.kind, self.kept, self.position_ids, self.window)

    def attention_mask(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(B, 1, T, T) additive float mask (0 where allowed, dtype-min elsewhere)."""
        return float_mask(self.allowed(), dtype)


def allowed_matrix(
    segment: torch.Tensor, kind: torch.Tensor, kept: torch.Tensor, position: torch.Tensor, window: torch.Tensor
) -> torch.Tensor:
    """(B, T, T) bool: may query i attend to key j. Pure broadcasting over (B, T) tensors.

    Row order within a segment is its text, then its gists in slot order, so "earlier gist" is j <= i.
    """
    B, T = segment.shape
    idx = torch.arange(T, device=segment.device)
    row_le = idx[None, None, :] <= idx[None, :, None]  # j <= i
    valid = kind != KIND_PAD
    text_i, text_j = (kind == KIND_TEXT)[:, :, None], (kind == KIND_TEXT)[:, None, :]
    gist_i, gist_j = (kind == KIND_GIST_TOKEN)[:, :, None], (kind == KIND_GIST_TOKEN)[:, None, :]
    tail_i, tail_j = (kind == KIND_TAIL)[:, :, None], (kind == KIND_TAIL)[:, None, :]
    same = (segment[:, :, None] == segment[:, None, :]) & (segment[:, :, None] >= 0) & (
        window[:, :, None] == window[:, None, :]
    )
    pos_le = position[:, None, :] <= position[:, :, None]
    text_sees = text_i & text_j & same & row_le
    gist_sees = gist_i & same & ((text_j & pos_le) | (gist_j & row_le))
    tail_sees = tail_i & ((kept[:, None, :] & (segment[:, None, :] >= 0)) | (tail_j & row_le))
    allowed = valid[:, None, :] & valid[:, :, None] & (text_sees | gist_sees | tail_sees)
    pad_q = ~valid
    return allowed | (pad_q[:, :, None] & torch.eye(T, dtype=torch.bool, device=segment.device)[None])


def float_mask(allowed: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Bool (B, Q, K) -> additive (B, 1, Q, K) mask for eager/sdpa attention (bool masks misbehave in eager)."""
    m = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    m.masked_fill_(~allowed, torch.finfo(dtype).min)
    return m[:, None]


def build_layout(
    rows: Sequence[Sequence[Segment]],
    pad_id: int,
    tails: Optional[Sequence[Optional[Sequence[int]]]] = None,
    window_tokens: Optional[int] = None,
    device: Optional[torch.device] = None,
) -> Layout:
    """The reference single pass: each row is a list of segments (text, then gists) and an optional tail."""
    if tails is not None and len(tails) != len(rows):
        raise ValueError(f"{len(rows)} rows but {len(tails)} tails")
    parts = []
    for r, segs in enumerate(rows):
        cols: dict[str, list[np.ndarray]] = {k: [] for k in ("ids", "slot", "pos", "kind", "seg", "kept", "win")}
        bounds, row_pos, offset = [], 0, 0
        for s_i, s in enumerate(segs):
            n = len(s.ids)
            sl = gist_slots(s)
            g = len(sl.slot)
            w = piece_windows(s, window_tokens)
            anchors = np.asarray(s.anchors, dtype=bool) if s.anchors is not None else np.zeros(n, dtype=bool)
            cols["ids"] += [np.asarray(s.ids, dtype=np.int64), np.full(g, pad_id)]
            cols["slot"] += [np.full(n, -1), sl.slot]
            cols["pos"] += [offset + np.arange(n), offset + sl.pos]
            cols["kind"] += [np.full(n, KIND_TEXT), np.full(g, KIND_GIST_TOKEN)]
            cols["seg"] += [np.full(n, s_i), np.full(g, s_i)]
            cols["kept"] += [anchors, np.ones(g, dtype=bool)]
            cols["win"] += [w, w[sl.pos] if g else np.zeros(0, np.int64)]
            bounds.append((row_pos, row_pos + n + g))
            row_pos += n + g
            offset += n
        tail = tails[r] if tails is not None else None
        if tail is not None and len(tail):
            t = np.asarray(tail, dtype=np.int64)
            cols["ids"].append(t)
            cols["slot"].append(np.full(len(t), -1))
            cols["pos"].append(offset + np.arange(len(t)))
            cols["kind"].append(np.full(len(t), KIND_TAIL))
            cols["seg"].append(np.full(len(t), -1))
            cols["kept"].append(np.zeros(len(t), dtype=bool))
            cols["win"].append(np.zeros(len(t), dtype=np.int64))
        cat = {k: (np.concatenate(v) if v else np.zeros(0)) for k, v in cols.items()}
        parts.append((cat, bounds))
    B = len(parts)
    T = max((len(p[0]["ids"]) for p, _ in [(p, None) for p in parts]), default=0)
    arr = {
        "ids": np.full((B, T), pad_id, dtype=np.int64), "slot": np.full((B, T), -1, dtype=np.int64),
        "pos": np.zeros((B, T), dtype=np.int64), "kind": np.full((B, T), KIND_PAD, dtype=np.int64),
        "seg": np.full((B, T), -1, dtype=np.int64), "kept": np.zeros((B, T), dtype=bool),
        "win": np.zeros((B, T), dtype=np.int64),
    }
    lengths = np.zeros(B, dtype=np.int64)
    for b, (cat, _) in enumerate(parts):
        n = len(cat["ids"])
        lengths[b] = n
        for k in arr:
            arr[k][b, :n] = cat[k].astype(arr[k].dtype)
    t = lambda a: torch.as_tensor(a, device=device)  # noqa: E731
    return Layout(
        input_ids=t(arr["ids"]), gist_slot=t(arr["slot"]), position_ids=t(arr["pos"]), kind=t(arr["kind"]),
        segment=t(arr["seg"]), kept=t(arr["kept"]), window=t(arr["win"]), lengths=t(lengths),
        segment_bounds=[b for _, b in parts],
    )
