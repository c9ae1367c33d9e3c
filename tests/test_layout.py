"""The sentence-anchored mask as a matrix (pure tensor code, no model)."""

import numpy as np
import pytest
import torch

from gist_memory.layout import KIND_GIST_TOKEN, KIND_PAD, KIND_TAIL, KIND_TEXT, Segment, build_layout, interleave

G = [900, 901, 902]  # gist token ids


def seg(lengths, n_gists, anchors=None, start=0):
    ids, pieces, pos = [], [], 0
    for n in lengths:
        ids += list(range(start + pos, start + pos + n))
        pieces.append((pos, pos + n))
        pos += n
    return Segment(ids=ids, pieces=pieces, n_gists=n_gists, anchors=anchors)


def test_interleave_places_gists_after_each_piece():
    il = interleave(seg([3, 2], [2, 1]), G)
    assert il.ids.tolist() == [0, 1, 2, 900, 901, 3, 4, 900]
    assert il.kind.tolist() == [0, 0, 0, 1, 1, 0, 0, 1]
    assert il.piece.tolist() == [0, 0, 0, 0, 0, 1, 1, 1]
    assert il.raw_index.tolist() == [0, 1, 2, -1, -1, 3, 4, -1]
    assert il.gist_slot.tolist() == [-1, -1, -1, 0, 1, -1, -1, 0]


def test_segment_validation():
    with pytest.raises(ValueError, match="contiguous"):
        Segment(ids=[1, 2, 3], pieces=[(0, 1), (2, 3)], n_gists=[1, 1])
    with pytest.raises(ValueError, match="cover"):
        Segment(ids=[1, 2, 3], pieces=[(0, 2)], n_gists=[1])
    with pytest.raises(ValueError, match="gist counts"):
        Segment(ids=[1, 2], pieces=[(0, 2)], n_gists=[1, 1])


def _check_rules(lay):
    A = lay.allowed()
    B, T, _ = A.shape
    kind, segm, piece, kept = lay.kind, lay.segment, lay.piece, lay.kept
    for b in range(B):
        for i in range(T):
            for j in range(T):
                a = bool(A[b, i, j])
                if kind[b, i] == KIND_PAD:
                    assert a == (i == j)
                    continue
                if kind[b, j] == KIND_PAD or j > i:
                    assert not a
                    continue
                if kind[b, i] == KIND_TAIL:
                    expect = bool(kind[b, j] == KIND_TAIL or kept[b, j])
                elif segm[b, i] != segm[b, j]:
                    expect = False
                elif piece[b, i] == piece[b, j]:
                    expect = True
                else:
                    expect = bool(kept[b, j])
                assert a == expect, (b, i, j)


def test_mask_matrix_rules_with_anchors_segments_tail_and_padding():
    s1 = seg([3, 2, 2], [1, 2, 1], anchors=[False, True, False, False, False, True, False])
    s2 = seg([2, 3], [1, 1], start=50)
    lay = build_layout([[s1, s2], [seg([2], [1])]], G, pad_id=0, tails=[[7, 8, 9], None])
    assert lay.input_ids.shape == (2, 7 + 4 + 5 + 2 + 3)
    _check_rules(lay)
    A = lay.allowed()[0]
    # a text token of piece 2 never sees raw non-anchor tokens of pieces 0/1 ...
    t = (lay.piece[0] == 2) & (lay.kind[0] == KIND_TEXT)
    raw_earlier = (lay.piece[0] < 2) & (lay.kind[0] == KIND_TEXT) & ~lay.kept[0] & (lay.segment[0] == 0)
    assert not A[t][:, raw_earlier].any()
    # ... but sees the earlier anchors and gists of its segment
    kept_earlier = (lay.piece[0] < 2) & lay.kept[0] & (lay.segment[0] == 0)
    assert A[t][:, kept_earlier].all()
    # nothing in segment 2 sees segment 1
    assert not A[lay.segment[0] == 1][:, lay.segment[0] == 0].any()
    # the tail sees every kept row, no raw non-kept one
    tail = lay.kind[0] == KIND_TAIL
    assert A[tail][:, lay.kept[0]].all()
    assert not A[tail][:, (lay.kind[0] == KIND_TEXT) & ~lay.kept[0]].any()


def test_positions_are_gapped_row_indices_and_mask_is_float():
    lay = build_layout([[seg([2, 2], [1, 1])]], G, pad_id=0, tails=[[5]])
    assert lay.position_ids[0].tolist() == list(range(7))
    m = lay.attention_mask(torch.float32)
    assert m.shape == (1, 1, 7, 7) and m.dtype == torch.float32
    assert torch.equal(m[0, 0] == 0, lay.allowed()[0])


def test_zero_gists_and_gist_kind():
    lay = build_layout([[seg([2, 2], [0, 2])]], G, pad_id=0)
    assert (lay.kind[0] == KIND_GIST_TOKEN).sum() == 2
    assert lay.kept[0].sum() == 2


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
        _check_rules(build_layout(rows, G, pad_id=0, tails=tails))
