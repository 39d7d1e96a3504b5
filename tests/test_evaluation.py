"""Metrics: one-to-one instance matching, F1, label checks, and the per-concept evaluation's counting."""

from __future__ import annotations

import numpy as np
import pytest

from napari_clipsam.data.synthetic import make_image
from napari_clipsam.engine.instances import label_overlap
from napari_clipsam.engine.segmenter import TextSegmentation
from napari_clipsam.evaluation import evaluate, f1_score, instance_f1, match_instances


def test_matching_below_half_takes_the_most_pairs_not_the_largest_total_iou():
    pred = np.array([[1, 2, 2, 2, 3, 3, 0, 0, 0, 0, 0, 0]])
    gt = np.array([[0, 0, 0, 2, 2, 3, 3, 3, 3, 4, 4, 4]])
    # IoUs: p2-g2 1/4, p3-g2 1/3, p3-g3 1/5. At 0.3 only p3-g2 qualifies, though the largest total
    # IoU (1/4 + 1/5 > 1/3) pairs p3 with g3
    assert match_instances(pred, gt, 0.3) == (1, 2, 2)
    assert instance_f1(pred, gt, 0.3) == pytest.approx(1 / 3)
    assert match_instances(pred, gt, 0.2) == (2, 1, 1)  # p2-g2 and p3-g3: two pairs
    apart = np.zeros((4, 4), int)
    apart[0, 0], other = 1, np.zeros((4, 4), int)
    other[3, 3] = 1
    assert match_instances(apart, other, 0.01) == (0, 1, 1)  # disjoint objects never match


def test_matching_at_and_above_half_is_unchanged_and_exact():
    gt = make_image(3, size=96).instance_labels("nucleus")
    n = len(np.unique(gt)) - 1
    assert match_instances(gt, gt) == (n, 0, 0) and match_instances(gt, gt, 1.0) == (n, 0, 0)
    shifted = np.roll(gt, 200)  # same objects, moved: IoU well below 1
    tp, fp, fn = match_instances(shifted, gt, 0.5)
    assert tp + fp == n and tp + fn == n
    assert match_instances(np.zeros_like(gt), gt) == (0, 0, n) and match_instances(gt, np.zeros_like(gt)) == (0, n, 0)
    assert instance_f1(np.zeros((8, 8), int), np.zeros((8, 8), int)) == 1.0


@pytest.mark.parametrize("threshold", [0, -1, 1.5, float("nan")])
def test_matching_threshold_outside_0_1_is_refused(threshold):
    with pytest.raises(ValueError, match="iou_threshold"):
        match_instances(np.ones((4, 4), int), np.ones((4, 4), int), threshold)


def test_labels_that_are_not_instance_ids_are_refused():
    gt = np.zeros((8, 8), np.int32)
    gt[2:5, 2:5] = 1
    with pytest.raises(ValueError, match="predicted labels must be integer.*threshold and label"):
        match_instances(np.random.default_rng(0).random((8, 8)), gt)
    with pytest.raises(ValueError, match="ground-truth labels contain negative values"):
        instance_f1(gt, -gt)
    with pytest.raises(ValueError, match="second labels contain negative"):
        label_overlap(gt, -gt)
    assert match_instances(gt.astype(bool), gt) == (1, 0, 0)  # a mask is one object
    with pytest.raises(ValueError, match="counts must be >= 0"):
        f1_score(-1, 0, 1)


class _Perfect:
    """Finds every instance of a concept exactly, and one object on images without the concept."""

    def set_image(self, image):
        self.sample = next(s for s in self.samples if s.image is image)

    def segment_text(self, concept):
        s = self.sample
        labels = s.instance_labels(concept)
        if concept not in s.concepts_present:
            labels = np.zeros_like(labels)
            labels[:4, :4] = 1
        ids = [int(i) for i in np.unique(labels) if i]
        return TextSegmentation(labels, {i: 1.0 for i in ids}, (labels > 0).astype(np.float32))

    def predict(self, points, labels, text):
        return self.sample.semantic_mask(text), 1.0


def test_evaluate_counts_objects_found_where_the_concept_is_absent():
    samples = [make_image(seed, size=64, p_absent=0.5) for seed in range(8)]
    seg = _Perfect()
    seg.samples = samples
    scores = evaluate(seg, samples, ["nucleus"], points_per_image=0)["nucleus"]
    absent = sum("nucleus" not in s.concepts_present for s in samples)
    tp = sum(len(s.ids_of("nucleus")) for s in samples)
    assert 0 < absent < len(samples) and scores["n_absent"] == absent
    assert scores["instance_f1"] == pytest.approx(2 * tp / (2 * tp + absent))  # each absent image: one false positive
    assert np.isnan(scores["point_iou"])  # no clicks asked for
    with pytest.raises(ValueError, match="not in the synthetic data"):
        evaluate(seg, samples, ["cell"])
    with pytest.raises(ValueError, match="points_per_image"):
        evaluate(seg, samples, ["nucleus"], points_per_image=-1)
