"""Shared by the engine tests: a disk mask and mask IoU."""

from __future__ import annotations

import numpy as np


def disk(shape, cy, cx, r) -> np.ndarray:
    """(H, W) bool mask of the disk of radius ``r`` around (``cy``, ``cx``)."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2


def iou(a: np.ndarray, b: np.ndarray) -> float:
    u = np.count_nonzero(a | b)
    return float(np.count_nonzero(a & b) / u) if u else 1.0
