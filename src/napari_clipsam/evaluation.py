"""Segmentation quality metrics and the demo-model evaluation used by ``bench/quality.py`` and tests.

Metrics: mask IoU, instance matching F1 at an IoU threshold (one-to-one, Hungarian on IoU),
cross-concept leakage and the absent-concept empty rate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from .engine.instances import check_labels, label_overlap

if TYPE_CHECKING:
    from .data.synthetic import SyntheticSample
    from .engine.segmenter import Segmenter


def mask_iou(a: np.ndarray, b: np.ndarray, empty: float = 1.0) -> float:
    """IoU of two boolean masks of the same shape (``empty`` when both are empty)."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    if a.shape != b.shape:
        raise ValueError(f"masks differ in shape: {a.shape} vs {b.shape}")
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else empty


def match_instances(pred: np.ndarray, gt: np.ndarray, iou_threshold: float = 0.5) -> tuple[int, int, int]:
    """One-to-one matching of instance label images → (true positives, false positives, false negatives).

    pred, gt: integer label images (0 = background) of the same shape, 2D or 3D. A predicted and
    a ground-truth instance may match when their IoU ≥ ``iou_threshold`` (in (0, 1]); the
    Hungarian assignment takes as many such pairs as possible, then the highest total IoU (below
    0.5 one object can overlap several, and the largest total IoU need not give the most pairs).
    """
    if not 0 < iou_threshold <= 1:
        raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold}")
    pred, gt = check_labels(pred, "predicted labels"), check_labels(gt, "ground-truth labels")
    if pred.shape != gt.shape:
        raise ValueError(f"label images differ in shape: {pred.shape} vs {gt.shape}")
    p_ids, g_ids, iou = label_overlap(pred, gt)
    if len(p_ids) == 0 or len(g_ids) == 0:
        return 0, len(p_ids), len(g_ids)
    ok = iou >= iou_threshold
    rows, cols = linear_sum_assignment(-(ok + iou / (2 * min(iou.shape))))  # pairs first: the IoU term sums to < 1
    tp = int(ok[rows, cols].sum())
    return tp, len(p_ids) - tp, len(g_ids) - tp


def f1_score(tp: int, fp: int, fn: int) -> float:
    """F1 from counts (1.0 when there is nothing to find and nothing was found)."""
    if min(tp, fp, fn) < 0:
        raise ValueError(f"counts must be >= 0, got tp={tp}, fp={fp}, fn={fn}")
    return 1.0 if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn)


def instance_f1(pred: np.ndarray, gt: np.ndarray, iou_threshold: float = 0.5) -> float:
    """Instance F1 of a predicted label image against ground truth at ``iou_threshold``."""
    return f1_score(*match_instances(pred, gt, iou_threshold))


def interior_point(mask: np.ndarray) -> tuple[float, float]:
    """The (x, y) pixel deepest inside a 2D ``mask``: the distance-transform maximum, with the
    image border counted as outside (an object cut by the border is clicked in its middle, not
    on the border). ValueError for an empty mask."""
    mask = np.asarray(mask, bool)
    if mask.ndim != 2 or not mask.any():
        raise ValueError(f"interior_point needs a non-empty 2D mask, got shape {mask.shape} with "
                         f"{int(mask.sum())} pixels set")
    dist = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return float(x), float(y)


@dataclass
class ConceptScores:
    """Accumulated scores of one concept."""

    text_iou: list[float] = field(default_factory=list)
    point_iou: list[float] = field(default_factory=list)
    leakage: list[float] = field(default_factory=list)
    absent_empty: list[bool] = field(default_factory=list)
    counts: list[int] = field(default_factory=lambda: [0, 0, 0])  # tp, fp, fn

    def summary(self) -> dict[str, float | int]:
        mean = lambda v: float(np.mean(v)) if len(v) else float("nan")  # noqa: E731
        return {
            "text_iou": mean(self.text_iou),
            "point_iou": mean(self.point_iou),
            "leakage": mean(self.leakage),
            "absent_empty_rate": mean(self.absent_empty),
            "instance_f1": f1_score(*self.counts),
            "n_present": len(self.text_iou),
            "n_absent": len(self.absent_empty),
        }


def evaluate(segmenter: "Segmenter", samples: Sequence["SyntheticSample"], concepts: Iterable[str] | None = None,
             points_per_image: int = 3, empty_area: int = 32) -> dict[str, dict[str, float | int]]:
    """Score a segmenter on labelled synthetic samples, per concept.

    - ``text_iou``: IoU of the text-only semantic mask (prob > 0.5) with the concept's union mask,
      on images that contain the concept;
    - ``point_iou``: text + one positive click at the deepest point of an instance → IoU with it
      (up to ``points_per_image`` instances per image);
    - ``leakage``: IoU of the concept's text-only mask with each *other* concept's union mask;
    - ``absent_empty_rate``: on images without the concept, the fraction where the text-only mask
      has fewer than ``empty_area`` pixels;
    - ``instance_f1``: F1@0.5 of ``segment_text`` instances against the concept's instances (on
      images without the concept, every instance found is a false positive).
    """
    from .data.synthetic import CONCEPTS

    concepts = tuple(concepts or CONCEPTS)
    unknown = [c for c in concepts if c not in CONCEPTS]
    if unknown:
        raise ValueError(f"concepts {unknown} are not in the synthetic data: choose from {list(CONCEPTS)}")
    if points_per_image < 0:
        raise ValueError(f"points_per_image must be >= 0, got {points_per_image}")
    scores = {c: ConceptScores() for c in concepts}
    for sample in samples:
        segmenter.set_image(sample.image)
        present = set(sample.concepts_present)
        for c in concepts:
            res = segmenter.segment_text(c)
            pred = res.prob > 0.5
            s = scores[c]
            if c not in present:
                s.absent_empty.append(bool(pred.sum() < empty_area))
                s.counts[1] += len(res.scores)
                continue
            s.text_iou.append(mask_iou(pred, sample.semantic_mask(c)))
            gt = sample.instance_labels(c)
            for i, v in enumerate(match_instances(res.labels, gt)):
                s.counts[i] += v
            for other in present - {c}:
                s.leakage.append(mask_iou(pred, sample.semantic_mask(other), empty=0.0))
            ids = np.unique(gt[gt > 0])
            for k in ids[:: max(1, len(ids) // max(1, points_per_image))][:points_per_image]:
                target = gt == k
                mask, _ = segmenter.predict(points=[interior_point(target)], labels=[1], text=c)
                s.point_iou.append(mask_iou(mask, target))
    return {c: s.summary() for c, s in scores.items()}
