"""The writer layout and mask as matrices (pure tensor code, no model)."""

import numpy as np
import pytest
import torch

from gist_memory.layout import (
    KIND_GIST_TOKEN,
    KIND_PAD,
    KIND_TAIL,
    KIND_TEXT,
    Segment,
    build_layout,
    build_writer_batch,
    gist_slots,
    piece_windows,
)


def seg(lengths, n_gists, anchors=None, start=0):
    ids, pieces, pos = [], [], 0
    for n in lengths:
        ids += list(range(start + pos, start + pos + n))
        pieces.append((pos, pos + n))
        pos += n
    return Segment(ids=ids, pieces=pieces, n_gists=n_gists, anchors=anchors)


def test_gist_slots_sit_at_the_end_of_their_sub_chunks():
    sl = gist_slots(seg([4, 3, 2], [2, 1, 0]))
    assert sl.piece.tolist() == [0, 0, 1]
    assert sl.slot.tolist() == [0, 1, 0]
    assert sl.pos.tolist() == [1, 3, 6]  # piece 0: tokens 0-1 | 2-3; piece 1: 4-6
    # more gists than tokens: every gist still inside its piece
    sl = gist_slots(seg([2], [5]))
    assert sl.pos.min() >= 0 and sl.pos.max() <= 1


def test_segment_validation():
    with pytest.raises(ValueError, match="contiguous"):
        Segment(ids=[1, 2, 3], pieces=[(0, 1), (2, 3)], n_gists=[1, 1])
    with pytest.raises(ValueError, match="cover"):
        Segment(ids=[1, 2, 3], pieces=[(0, 2)], n_gists=[1])
    with pytest.raises(ValueError, match="gist counts"):
        Segment(ids=[1, 2], pieces=[(0, 2)], n_gists=[1, 1])
    with pytest.raises(ValueError, match=">= 0"):
        Segment(ids=[1, 2], pieces=[(0, 2)], n_gists=[-1])


def _check_rules(lay):
    A = lay.allowed()
    B, T, _ = A.shape
    kind, segm, kept, pos, win = lay.kind, lay.segment, lay.kept, lay.position_ids, lay.window
    for b in range(B):
        for i in range(T):
            for j in range(T):
                a = bool(A[b, i, j])
                if kind[b, i] == KIND_PAD:
                    assert a == (i == j)
                    continue
                if kind[b, j] == KIND_PAD:
                    assert not a
                    continue
                same = segm[b, i] == segm[b, j] and segm[b, i] >= 0 and win[b, i] == win[b, j]
                if kind[b, i] == KIND_TAIL:
                    expect = bool((kind[b, j] == KIND_TAIL and j <= i) or (kept[b, j] and segm[b, j] >= 0))
                elif kind[b, i] == KIND_TEXT:
                    expect = bool(same and kind[b, j] == KIND_TEXT and j <= i)
                else:  # a gist: raw text up to its position, earlier gists of its segment
                    expect = bool(same and ((kind[b, j] == KIND_TEXT and pos[b, j] <= pos[b, i])
                                            or (kind[b, j] == KIND_GIST_TOKEN and j <= i)))
                assert a == expect, (b, i, j)


def test_mask_matrix_rules_with_anchors_segments_tail_and_padding():
    s1 = seg([3, 2, 2], [1, 2, 1], anchors=[False, True, False, False, False, True, False])
    s2 = seg([2, 3], [1, 1], start=50)
    lay = build_layout([[s1, s2], [seg([2], [1])]], pad_id=0, tails=[[7, 8, 9], None])
    assert lay.input_ids.shape == (2, 7 + 4 + 5 + 2 + 3)
    _check_rules(lay)
    A = lay.allowed()[0]
    # nothing in segment 2 sees segment 1
    assert not A[lay.segment[0] == 1][:, lay.segment[0] == 0].any()
    # the tail sees every kept row, no raw non-kept one
    tail = lay.kind[0] == KIND_TAIL
    assert A[tail][:, lay.kept[0]].all()
    assert not A[tail][:, (lay.kind[0] == KIND_TEXT) & ~lay.kept[0]].any()


def test_positions_are_gapped_and_mask_is_float():
    lay = build_layout([[seg([2, 2], [1, 1]), seg([3], [1])]], pad_id=0, tails=[[5]])
    # text of segment 0 at 0-3, its gists at 1 and 3; segment 1 from its span 4; the tail after both spans
    assert lay.position_ids[0].tolist() == [0, 1, 2, 3, 1, 3, 4, 5, 6, 6, 7]
    m = lay.attention_mask(torch.float32)
    assert m.shape == (1, 1, 11, 11) and m.dtype == torch.float32
    assert torch.equal(m[0, 0] == 0, lay.allowed()[0])


def test_writer_batch_matches_the_reference_rows():
    """Pass 2's (gists x [text | gists]) mask is the gist rows of the reference matrix, for each segment."""
    rng = np.random.default_rng(1)
    segs = []
    for _ in range(3):
        lens = rng.integers(1, 6, size=rng.integers(1, 4)).tolist()
        segs.append(seg(lens, rng.integers(0, 3, size=len(lens)).tolist()))
    wb = build_writer_batch(segs, pad_id=0)
    allowed = wb.gist_allowed()
    N = wb.text_ids.shape[1]
    for b, s in enumerate(segs):
        lay = build_layout([[s]], pad_id=0)
        A = lay.allowed()[0]
        n, g = len(s.ids), int(sum(s.n_gists))
        ref = A[n : n + g]
        assert torch.equal(allowed[b, :g, :n], ref[:, :n])
        assert torch.equal(allowed[b, :g, N : N + g], ref[:, n : n + g])
        assert not allowed[b, :g, n:N].any()  # padding of the text is never seen
        assert torch.equal(wb.gist_pos[b, :g], lay.position_ids[0, n : n + g])


def test_windows_split_at_piece_boundaries():
    s = seg([3, 3, 3, 3], [1, 1, 1, 1])
    assert piece_windows(s, 6).tolist() == [0] * 6 + [1] * 6
    lay = build_layout([[s]], pad_id=0, tails=[[1]], window_tokens=6)
    _check_rules(lay)
    A = lay.allowed()[0]
    second = (lay.window[0] == 1) & (lay.kind[0] != KIND_TAIL)
    first = (lay.window[0] == 0) & (lay.segment[0] == 0)
    assert not A[second][:, first].any()


def test_random_layouts_obey_rules():
    rng = np.random.default_rng(0)
    for _ in range(5):
        rows, tails = [], []
        for _ in range(rng.integers(1, 3)):
            segs = []
            for _ in range(rng.integers(1, 3)):
                lens = rng.integers(1, 4, size=rng.integers(1, 4)).tolist()
                n = sum(lens)
                segs.append(seg(lens, rng.integers(0, 3, size=len(lens)).tolist(), anchors=(rng.random(n) < 0.3).tolist()))
            rows.append(segs)
            tails.append(rng.integers(0, 5, size=rng.integers(0, 3)).tolist())
        _check_rules(build_layout(rows, pad_id=0, tails=tails))
