"""The sentence-anchored layout and mask.

One row of a batch holds `segments` (passages, compressed independently) and an optional `tail` (a question,
an answer, a chat turn). Inside a segment, every sentence piece is followed by its gist tokens:

    s1 ... g1_1..g1_N | s2 ... g2_1..g2_N | ...        (then the next segment, then the tail)

Visibility (`allowed_matrix`), for query i and key j with j <= i in row order:
  - same segment, same piece: yes (causal inside a piece: text sees earlier text of its piece; gists see the
    whole piece and earlier gists of the piece);
  - same segment, earlier piece: only if j is *kept* (a gist token or an anchor token);
  - another segment: never;
  - the tail sees every kept row of every segment and the earlier tail tokens, nothing raw;
  - padding is seen by nobody (a padding query sees only itself, so no row is empty).
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
        n_gists: Gist tokens after each piece (0 allowed, e.g. for training-free compressors).
        anchors: Per raw token, True if it keeps its own K/V (seen by later pieces and the tail).
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
        if self.anchors is not None and len(self.anchors) != n:
            raise ValueError(f"anchors has {len(self.anchors)} entries for {n} tokens")


@dataclass
class Interleaved:
    """One segment laid out with its gists (numpy, length T = tokens + gists)."""

    ids: np.ndarray  # (T,) token ids
    kind: np.ndarray  # (T,) KIND_TEXT / KIND_GIST_TOKEN
    piece: np.ndarray  # (T,) piece index
    kept: np.ndarray  # (T,) bool: gist or anchor
    raw_index: np.ndarray  # (T,) index into the raw ids, -1 for gists
    gist_slot: np.ndarray  # (T,) slot of a gist within its piece, -1 for text


def interleave(seg: Segment, gist_token_ids: Sequence[int]) -> Interleaved:
    """Place each piece's gist tokens right after it (vectorised; no per-token Python loop)."""
    if len(gist_token_ids) == 0 and sum(seg.n_gists) > 0:
        raise ValueError("gist tokens requested but the model has no gist token ids")
    n = len(seg.ids)
    lengths = np.asarray([e - s for s, e in seg.pieces], dtype=np.int64)
    ng = np.asarray(seg.n_gists, dtype=np.int64)
    P = len(lengths)
    total = n + int(ng.sum())
    gists_before = np.concatenate([[0], np.cumsum(ng)[:-1]]) if P else np.zeros(0, np.int64)
    piece_of_tok = np.repeat(np.arange(P), lengths)
    text_pos = np.arange(n) + gists_before[piece_of_tok]
    ends = np.cumsum(lengths)
    piece_of_gist = np.repeat(np.arange(P), ng)
    slot = np.arange(int(ng.sum())) - np.repeat(np.cumsum(ng) - ng, ng)
    gist_pos = ends[piece_of_gist] + gists_before[piece_of_gist] + slot

    ids = np.empty(total, dtype=np.int64)
    kind = np.empty(total, dtype=np.int64)
    piece = np.empty(total, dtype=np.int64)
    kept = np.zeros(total, dtype=bool)
    raw_index = np.full(total, -1, dtype=np.int64)
    gist_slot = np.full(total, -1, dtype=np.int64)
    ids[text_pos] = np.asarray(seg.ids, dtype=np.int64)
    kind[text_pos] = KIND_TEXT
    piece[text_pos] = piece_of_tok
    raw_index[text_pos] = np.arange(n)
    if seg.anchors is not None:
        kept[text_pos] = np.asarray(seg.anchors, dtype=bool)
    if len(gist_pos):
        g = np.asarray(gist_token_ids, dtype=np.int64)
        ids[gist_pos] = g[np.minimum(slot, len(g) - 1)]
        kind[gist_pos] = KIND_GIST_TOKEN
        piece[gist_pos] = piece_of_gist
        kept[gist_pos] = True
        gist_slot[gist_pos] = slot
    return Interleaved(ids, kind, piece, kept, raw_index, gist_slot)


@dataclass
class Layout:
    """A padded batch (right padding). All tensors are (B, T) unless noted.

    Attributes:
        input_ids: Token ids (pad id in padding).
        position_ids: Gapped positions: the row index of each token (0 in padding).
        kind: KIND_TEXT / KIND_GIST_TOKEN / KIND_TAIL / KIND_PAD.
        segment: Segment index within the row (-1 for tail and padding).
        piece: Piece index, unique within the row (-1 for tail and padding).
        kept: Gist or anchor rows (what later text may see).
        raw_index: Index of a text token in its segment's raw ids (-1 otherwise).
        lengths: (B,) valid length of each row.
        segment_bounds: Per row, `(start, end)` of each segment in row coordinates.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    kind: torch.Tensor
    segment: torch.Tensor
    piece: torch.Tensor
    kept: torch.Tensor
    raw_index: torch.Tensor
    lengths: torch.Tensor
    segment_bounds: list[list[tuple[int, int]]] = field(default_factory=list)

    @property
    def valid(self) -> torch.Tensor:
        """(B, T) True where not padding."""
        return self.kind != KIND_PAD

    def allowed(self) -> torch.Tensor:
        """(B, T, T) bool visibility matrix (see module docstring)."""
        return allowed_matrix(self.segment, self.piece, self.kept, self.kind)

    def attention_mask(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(B, 1, T, T) additive float mask (0 where allowed, dtype-min elsewhere)."""
        return float_mask(self.allowed(), dtype)


def allowed_matrix(
    segment: torch.Tensor, piece: torch.Tensor, kept: torch.Tensor, kind: torch.Tensor
) -> torch.Tensor:
    """(B, T, T) bool: may query i attend to key j. Pure broadcasting over (B, T) id tensors."""
    B, T = segment.shape
    idx = torch.arange(T, device=segment.device)
    causal = idx[None, :, None] >= idx[None, None, :]  # (1, T, T) i >= j
    valid = kind != KIND_PAD
    tail = kind == KIND_TAIL
    seg_i, seg_j = segment[:, :, None], segment[:, None, :]
    pc_i, pc_j = piece[:, :, None], piece[:, None, :]
    in_seg_i = (seg_i >= 0) & ~tail[:, :, None]
    same_seg = (seg_i == seg_j) & in_seg_i
    same_piece = same_seg & (pc_i == pc_j)
    earlier_kept = same_seg & kept[:, None, :] & (pc_j < pc_i)
    tail_sees = tail[:, :, None] & ((kept[:, None, :] & (seg_j >= 0)) | tail[:, None, :])
    allowed = causal & valid[:, None, :] & valid[:, :, None] & (same_piece | earlier_kept | tail_sees)
    # a padding query sees itself only, so softmax never meets an all-masked row
    pad_q = ~valid
    allowed = allowed | (pad_q[:, :, None] & torch.eye(T, dtype=torch.bool, device=segment.device)[None])
    return allowed


def float_mask(allowed: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Bool (B, T, T) -> additive (B, 1, T, T) mask for eager/sdpa attention (bool masks misbehave in eager)."""
    m = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    m.masked_fill_(~allowed, torch.finfo(dtype).min)
    return m[:, None]


def build_layout(
    rows: Sequence[Sequence[Segment]],
    gist_token_ids: Sequence[int],
    pad_id: int,
    tails: Optional[Sequence[Optional[Sequence[int]]]] = None,
    device: Optional[torch.device] = None,
) -> Layout:
    """Lay out a batch: each row is a list of segments followed by an optional tail of raw ids.

    Positions are gapped: each token's index in its row (segments one after another, then the tail), which is
    exactly where a spliced state lands when its segment is placed at the same offset.
    """
    if tails is not None and len(tails) != len(rows):
        raise ValueError(f"{len(rows)} rows but {len(tails)} tails")
    parts = []
    for r, segs in enumerate(rows):
        ids, kind, seg, pc, kept, raw = [], [], [], [], [], []
        bounds = []
        pos, piece_base = 0, 0
        for s_i, s in enumerate(segs):
            il = interleave(s, gist_token_ids)
            T = len(il.ids)
            ids.append(il.ids)
            kind.append(il.kind)
            seg.append(np.full(T, s_i))
            pc.append(il.piece + piece_base)
            kept.append(il.kept)
            raw.append(il.raw_index)
            bounds.append((pos, pos + T))
            pos += T
            piece_base += len(s.pieces)
        tail = tails[r] if tails is not None else None
        if tail is not None and len(tail):
            t = np.asarray(tail, dtype=np.int64)
            ids.append(t)
            kind.append(np.full(len(t), KIND_TAIL))
            seg.append(np.full(len(t), -1))
            pc.append(np.full(len(t), -1))
            kept.append(np.zeros(len(t), dtype=bool))
            raw.append(np.full(len(t), -1))
        cat = (lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt))  # noqa: E731
        parts.append(
            (
                cat(ids, np.int64),
                cat(kind, np.int64),
                cat(seg, np.int64),
                cat(pc, np.int64),
                cat(kept, bool),
                cat(raw, np.int64),
                bounds,
            )
        )
    B = len(parts)
    T = max((len(p[0]) for p in parts), default=0)
    input_ids = np.full((B, T), pad_id, dtype=np.int64)
    kind = np.full((B, T), KIND_PAD, dtype=np.int64)
    segment = np.full((B, T), -1, dtype=np.int64)
    piece = np.full((B, T), -1, dtype=np.int64)
    kept = np.zeros((B, T), dtype=bool)
    raw_index = np.full((B, T), -1, dtype=np.int64)
    lengths = np.zeros(B, dtype=np.int64)
    for b, (i_, k_, s_, p_, kp_, r_, _) in enumerate(parts):
        n = len(i_)
        input_ids[b, :n], kind[b, :n], segment[b, :n] = i_, k_, s_
        piece[b, :n], kept[b, :n], raw_index[b, :n] = p_, kp_, r_
        lengths[b] = n
    position_ids = np.where(kind != KIND_PAD, np.arange(T)[None, :], 0)
    t = lambda a: torch.as_tensor(a, device=device)  # noqa: E731
    return Layout(
        input_ids=t(input_ids),
        position_ids=t(position_ids),
        kind=t(kind),
        segment=t(segment),
        piece=t(piece),
        kept=t(kept),
        raw_index=t(raw_index),
        lengths=t(lengths),
        segment_bounds=[p[6] for p in parts],
    )
