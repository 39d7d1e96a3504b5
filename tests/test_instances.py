"""Instances container, mask NMS, painting into labels without overlaps, label overlap."""

import numpy as np
import pytest

from napari_clipsam.engine.instances import Instances, consensus_nms, label_overlap, mask_nms, paint_labels


def _square(shape, y0, x0, y1, x1):
    m = np.zeros(shape, bool)
    m[y0:y1, x0:x1] = True
    return m


def test_from_dense_roundtrip_filter_cat():
    shape = (20, 30)
    masks = np.stack([_square(shape, 2, 3, 8, 9), np.zeros(shape, bool), _square(shape, 10, 10, 20, 30)])
    inst = Instances.from_dense(masks, [0.9, 0.5, 0.4], offset=(5, 7), source=3)
    assert len(inst) == 2  # the empty mask is dropped
    assert inst.boxes.tolist() == [[7, 10, 13, 16], [15, 17, 25, 37]]
    assert inst.source.tolist() == [3, 3] and inst.areas.tolist() == [36, 200]
    full = inst.dense(1, (25, 37))
    assert full.sum() == 200 and full[15:25, 17:37].all()
    both = Instances.cat([inst, inst.filter(np.array([False, True]))])
    assert len(both) == 3 and np.allclose(both.scores, [0.9, 0.4, 0.4])
    assert both.iou(1, 2) == 1.0 and both.iou(0, 1) == 0.0


def test_nms_and_painting_without_overlaps():
    shape = (40, 40)
    a = _square(shape, 0, 0, 20, 20)
    a_dup = _square(shape, 1, 1, 20, 20)  # near duplicate of a, lower score
    b = _square(shape, 10, 10, 30, 30)  # overlaps a partly (IoU 1/7)
    c = _square(shape, 32, 32, 34, 34)  # tiny
    inst = Instances.from_dense(np.stack([a_dup, a, b, c]), [0.7, 0.9, 0.8, 0.95])
    kept = mask_nms(inst, 0.5)
    assert len(kept) == 3 and 0.7 not in np.round(kept.scores, 2)
    labels, scores = paint_labels(kept, shape, min_area=5)
    assert labels.dtype == np.uint32 and set(np.unique(labels)) == {0, 1, 2}
    assert scores == {1: np.float32(0.9).item(), 2: np.float32(0.8).item()}  # ids by score; tiny c dropped
    assert (labels[a] == 1).all()  # a painted first, b only takes free pixels
    assert (labels == 2).sum() == b.sum() - (a & b).sum()
    # A mask mostly hidden by a better one is dropped rather than painted as a sliver.
    hidden = Instances.from_dense(np.stack([a, _square(shape, 0, 0, 20, 22)]), [0.9, 0.5])
    lab, sc = paint_labels(hidden, shape)
    assert list(sc) == [1]


def test_label_overlap():
    a = np.zeros((4, 4), np.uint32)
    b = np.zeros((4, 4), np.uint32)
    a[:2], a[2:] = 5, 7
    b[:, :2] = 1
    ids_a, ids_b, iou = label_overlap(a, b)
    assert ids_a.tolist() == [5, 7] and ids_b.tolist() == [1]
    np.testing.assert_allclose(iou[:, 0], [4 / 12, 4 / 12])
    _, _, contain = label_overlap(a, b, metric="min")
    np.testing.assert_allclose(contain[:, 0], [0.5, 0.5])
    with pytest.raises(ValueError, match="same shape"):  # same pixel count, other shape: not comparable
        label_overlap(a.reshape(2, 8), b)


def test_consensus_keeps_the_objects_most_seeds_agree_on_not_their_union():
    shape = (20, 40)
    a, b = _square(shape, 2, 2, 18, 20), _square(shape, 2, 20, 18, 38)  # two touching objects
    union = a | b
    masks = [a, a, _square(shape, 3, 2, 18, 20), b, b, _square(shape, 2, 21, 18, 38), union]
    scores = [0.6, 0.7, 0.6, 0.5, 0.6, 0.6, 0.99]  # the union has the best predicted IoU
    keep, votes = consensus_nms(np.stack(masks), np.array(scores))
    assert votes.tolist() == [3, 3, 3, 3, 3, 3, 1]
    assert keep.tolist() == [1, 4]  # a and b (their best-scored copies), not the union
    # Without the coverage and parts rules the union, overlapping each object by IoU 1/2 only,
    # would survive.
    keep, _ = consensus_nms(np.stack(masks), np.array(scores), max_covered=1.0, prefer_parts=False)
    assert keep.tolist() == [1, 4, 6]
    # A decoder merging the two from most seeds: the union has the most votes, yet its parts win.
    merged = [union] * 4 + [a, a, b, b]
    keep, votes = consensus_nms(np.stack(merged), np.full(8, 0.5))
    assert votes.tolist() == [4, 4, 4, 4, 2, 2, 2, 2] and sorted(keep.tolist()) == [4, 6]
    keep, _ = consensus_nms(np.stack(merged), np.full(8, 0.5), prefer_parts=False)
    assert keep.tolist() == [0]
    # A mask no other agrees with is still kept when nothing covers it; empty masks never are.
    keep, votes = consensus_nms(np.stack([a, np.zeros(shape, bool)]), np.array([0.1, 0.9]))
    assert keep.tolist() == [0] and votes.tolist() == [1, 0]
    assert len(consensus_nms(np.zeros((0, 4, 4), bool), np.zeros(0))[0]) == 0


def test_rank_orders_nms_and_painting_and_survives_filter_cat_union():
    shape = (20, 20)
    a, a2 = _square(shape, 0, 0, 10, 10), _square(shape, 0, 0, 10, 11)
    inst = Instances.from_dense(np.stack([a, a2]), [0.9, 0.5], rank=[1.0, 7.0])
    assert mask_nms(inst).scores.tolist() == [np.float32(0.5)]  # the higher rank wins, not the score
    labels, scores = paint_labels(inst, shape)
    assert list(scores.values()) == [np.float32(0.5).item()] and labels.sum() == a2.sum()
    both = Instances.cat([inst, inst.filter([1])])
    assert both.rank.tolist() == [1.0, 7.0, 7.0]
    assert both.union([[0, 1]]).rank.tolist() == [7.0]
    assert Instances.from_dense(np.stack([a]), [0.3]).rank.tolist() == [np.float32(0.3).item()]
