"""3D (Z, Y, X) volumes: propagate one prompted object through z, or link per-slice text instances.

Slices are normalised with intensity limits computed once for the whole volume (so brightness is
comparable across z) and embedded lazily through the segmenter's cache: re-running on the same
volume costs only decoding.

Propagation: the object is segmented on slice ``z`` from the user's prompts; then, slice by slice
upwards and downwards, the previous slice's mask prompts the next one (as a mask prompt, a
positive point at its deepest interior pixel and its bounding box, slightly grown). It stops
when the mask is empty or smaller than ``min_area``, its score drops below ``min_score``, or its
IoU with the previous mask drops below ``min_iou``.

Text linking: ``segment_text`` on every slice; instances of consecutive slices are matched one to
one (Hungarian assignment) by overlap = intersection / the smaller area, which stays high where
an object shrinks towards its ends; pairs with overlap ≥ ``link_overlap`` share the 3D id.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import numpy as np
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from ..checks import check_number
from ..evaluation import interior_point
from .instances import check_fraction, check_labels, label_overlap
from .preprocess import _channels_last, channel_limits, normalize_image

if TYPE_CHECKING:
    from .segmenter import Progress, Segmenter

log = logging.getLogger(__name__)


@dataclass
class VolumeSegmentation:
    """labels: (Z, Y, X) uint32 (0 background); scores: {3D id: mean score over its slices};
    slice_scores: (Z,) float32 score of the propagated object per slice (NaN where it is absent;
    for text linking, the number of instances per slice)."""

    labels: np.ndarray
    scores: dict[int, float] = field(default_factory=dict)
    slice_scores: np.ndarray | None = None


def volume_limits(volume, channel_axis: int | None = None, channels: Sequence[int] | None = None,
                  percentiles: tuple[float, float] = (1.0, 99.8)) -> np.ndarray:
    """Per-channel (C, 2) intensity limits of a (Z, Y, X[, C]) volume from at most ~16 evenly
    spread slices; ``volume`` only needs ``shape`` and ``volume[z]`` (a lazy zarr/dask array works:
    only the sampled slices are read). ``channel_axis`` is the axis of a slice ``volume[z]``."""
    return _sampled_limits(lambda z: np.asarray(volume[z]), int(volume.shape[0]), channel_axis, channels, percentiles)


def _sampled_limits(read, nz: int, channel_axis: int | None, channels: Sequence[int] | None,
                    percentiles: tuple[float, float]) -> np.ndarray:
    """:func:`volume_limits` of the ``nz`` slices ``read(z)`` gives."""
    step = max(1, nz // 16)
    sample = np.stack([_channels_last(read(z), channel_axis, channels) for z in range(0, nz, step)])
    limits = channel_limits(sample, percentiles)
    if np.isnan(limits).all():
        raise ValueError("volume is all NaN")
    return limits


def link_slice(prev: np.ndarray | None, labels: np.ndarray, scores: dict[int, float], next_id: int,
               link_overlap: float = 0.5) -> tuple[np.ndarray, int]:
    """Link one slice's instances to the previous slice's 3D ids.

    prev: (Y, X) 3D ids of the previous slice (None for the first); labels: (Y, X) this slice's
    ids 1..K with ``scores`` {id: score}. Ids are matched one to one (Hungarian assignment) by
    overlap = intersection / the smaller area; pairs with overlap ≥ ``link_overlap`` share the 3D
    id, the others get new ids from ``next_id``. Returns (lut (K+1,) uint32 mapping slice ids to
    3D ids, next free id).
    """
    ids = np.unique(check_labels(labels, "slice labels"))
    if set(scores) != set(range(1, len(scores) + 1)) or not set(ids[ids > 0].tolist()) <= set(scores):
        raise ValueError(f"slice labels must hold ids 1..K with a score for each id: scores have ids "
                         f"{sorted(scores)[:8]}, the labels {ids[ids > 0][:8].tolist()}")
    lut = np.zeros(len(scores) + 1, np.uint32)
    taken: set[int] = set()
    if prev is not None and scores and prev.any():
        ids_a, ids_b, overlap = label_overlap(prev, labels, metric="min")
        rows, cols = linear_sum_assignment(-overlap)
        for r, c in zip(rows, cols):
            if overlap[r, c] >= link_overlap:
                lut[ids_b[c]] = ids_a[r]
                taken.add(int(ids_b[c]))
    for k in scores:
        if k not in taken:
            lut[k] = next_id
            next_id += 1
    return lut, next_id


class NormalizedVolume:
    """Lazy per-slice normalisation of a (Z, Y, X) or, with ``channel_axis``, (Z, Y, X, C) volume.

    A lazy array (dask, zarr) stays lazy: only the slices used (and ~16 for the limits) are read.
    """

    def __init__(self, volume: np.ndarray, channel_axis: int | None = None, channels: Sequence[int] | None = None,
                 percentiles: tuple[float, float] = (1.0, 99.8)):
        lazy = all(hasattr(volume, a) for a in ("shape", "ndim", "size", "__getitem__"))
        vol = volume if lazy else np.asarray(volume)
        if vol.size == 0:
            raise ValueError(f"volume is empty (shape {vol.shape})")
        self._z_axis = 0
        if channel_axis is not None:
            if vol.ndim != 4:
                raise ValueError(f"channel_axis={channel_axis} needs a 4D volume (Z, Y, X, C), got shape {vol.shape}")
            if not -4 <= channel_axis < 4:
                raise ValueError(f"channel_axis={channel_axis} is outside the volume's 4 axes {tuple(vol.shape)}")
            ca = channel_axis % 4
            self._z_axis = 1 if ca == 0 else 0  # (C, Z, Y, X): slices are vol[:, z]
            channel_axis = 0 if ca == 0 else ca - 1  # the channel axis of one slice
        elif vol.ndim != 3:
            raise ValueError(f"expected a (Z, Y, X) volume, got shape {vol.shape}: pass channel_axis= for a "
                             "multichannel (Z, Y, X, C) volume, or set_image for a 2D image")
        self.volume = vol  # as given: a lazy array is read one slice at a time (see raw)
        self.channel_axis = channel_axis
        self.channels = channels
        self.limits = _sampled_limits(self.raw, len(self), channel_axis, channels, percentiles)

    def __len__(self) -> int:
        return int(self.volume.shape[self._z_axis])

    @property
    def shape(self) -> tuple[int, int, int]:
        """(Z, Y, X): the spatial shape."""
        spatial = [int(n) for i, n in enumerate(self.volume.shape) if i != self._z_axis]
        if self.channel_axis is not None:
            del spatial[self.channel_axis]
        return (len(self), *spatial)

    def raw(self, z: int) -> np.ndarray:
        """Slice ``z`` as stored (channels where they are in a slice), read from a lazy array."""
        return np.asarray(self.volume[(slice(None),) * self._z_axis + (z,)])

    def __getitem__(self, z: int) -> np.ndarray:
        return normalize_image(self.raw(z), self.channel_axis, self.channels, limits=self.limits)


def _report(progress, done: int, total: int, message: str) -> None:
    if progress is not None:
        progress(done, total, message)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return float(np.count_nonzero(a & b) / union) if union else 0.0


def mask_prompts(mask: np.ndarray, grow: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """A mask → (point (1, 2) at its deepest interior pixel as (x, y), box (x0, y0, x1, y1) grown
    by ``grow`` of its size on each side, clipped to the image)."""
    x, y = interior_point(mask)
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    h, w = mask.shape
    gy, gx = grow * (rows[-1] + 1 - rows[0]), grow * (cols[-1] + 1 - cols[0])
    box = np.array([max(0, cols[0] - gx), max(0, rows[0] - gy), min(w, cols[-1] + 1 + gx), min(h, rows[-1] + 1 + gy)],
                   np.float32)
    return np.array([[x, y]], np.float32), box


def propagate(seg: "Segmenter", volume: np.ndarray | NormalizedVolume, z: int, points=None, labels=None, box=None,
              text: str | None = None, min_score: float = 0.3, min_iou: float = 0.25, min_area: int = 8,
              max_shift: float = 0.5, progress: "Progress | None" = None) -> VolumeSegmentation:
    """Segment one object from prompts on slice ``z`` and follow it through the volume.

    Each slice's mask is confined to the previous one grown by ``max_shift`` × its radius (an
    object moves little between slices; this keeps the decoder from jumping to a neighbour).
    Returns labels with the object as id 1 and per-slice scores (NaN where it is absent).
    """
    if isinstance(z, bool) or not isinstance(z, (int, np.integer)):
        raise ValueError(f"z must be a slice index (an integer), got {z!r}")
    min_score, min_iou = check_fraction(min_score, "min_score"), check_fraction(min_iou, "min_iou")
    check_number(min_area, "min_area", 0)
    check_number(max_shift, "max_shift", 0)
    vol = volume if isinstance(volume, NormalizedVolume) else NormalizedVolume(volume)
    nz = len(vol)
    if not -nz <= z < nz:
        raise ValueError(f"z={z} is outside the volume's {nz} slices")
    z = int(z) % nz
    progress = progress or seg.progress
    out = np.zeros(vol.shape, np.uint32)
    slice_scores = np.full(nz, np.nan, np.float32)
    seg.set_normalized(vol[z], embed=False)
    mask, score = seg.predict(points=points, labels=labels, box=box, text=text)
    done = 1
    _report(progress, done, nz, "propagate")
    if not mask.any():
        log.info("propagate: the prompts give an empty mask on slice %d", z)
        _report(progress, nz, nz, "propagate")
        return VolumeSegmentation(out, {}, slice_scores)
    out[z][mask] = 1
    slice_scores[z] = score
    for step in (1, -1):
        prev = mask
        k = z + step
        while 0 <= k < nz:
            seg.set_normalized(vol[k], embed=False)
            point, grown = mask_prompts(prev)
            cur, sc = seg.predict(points=point, labels=[1], box=grown, text=text, mask_input=prev)
            cur &= ndimage.binary_dilation(prev, iterations=max(2, int(max_shift * np.sqrt(prev.sum() / np.pi))))
            done += 1
            _report(progress, done, nz, "propagate")
            iou = _iou(cur, prev)
            if cur.sum() < min_area or sc < min_score or iou < min_iou:
                log.info("propagate: stop at slice %d (area %d, score %.2f, IoU with previous %.2f)",
                         k, int(cur.sum()), sc, iou)
                break
            out[k][cur] = 1
            slice_scores[k] = sc
            prev = cur
            k += step
    _report(progress, nz, nz, "propagate")  # the slices past where the object ended are done too
    return VolumeSegmentation(out, {1: float(np.nanmean(slice_scores))}, slice_scores)


class ZLinker:
    """Links per-slice instance labels, slice after slice, into 3D ids (see :func:`link_slice`).

    An object missed in up to ``max_gap`` consecutive slices keeps its id when it is found again:
    its last footprint is carried over those slices (where no other object is)."""

    def __init__(self, link_overlap: float = 0.5, max_gap: int = 1):
        if max_gap < 0:
            raise ValueError(f"max_gap must be >= 0, got {max_gap}")
        self.link_overlap, self.max_gap = link_overlap, max_gap
        self.next_id = 1
        self._memory: np.ndarray | None = None
        self._missed: dict[int, int] = {}  # carried id → slices missed so far

    def link(self, labels: np.ndarray, scores: dict[int, float]) -> np.ndarray:
        """One slice's labels (ids 1..K) and scores → lut (K+1,) uint32 to 3D ids."""
        lut, self.next_id = link_slice(self._memory, labels, scores, self.next_id, self.link_overlap)
        final = lut[labels]
        if self._memory is None or self.max_gap == 0:
            self._memory = final
            return lut
        seen = set(np.unique(final).tolist())
        missed = {int(i): self._missed.get(int(i), 0) + 1 for i in np.unique(self._memory) if i and int(i) not in seen}
        self._missed = {i: n for i, n in missed.items() if n <= self.max_gap}
        carried = np.isin(self._memory, list(self._missed)) & (final == 0)
        self._memory = np.where(carried, self._memory, final)
        return lut


def link_text(seg: "Segmenter", volume: np.ndarray | NormalizedVolume, text: str, link_overlap: float = 0.5,
              progress: "Progress | None" = None, max_gap: int = 1, **segment_kwargs) -> VolumeSegmentation:
    """``segment_text`` per slice, linked across z by one-to-one overlap matching into 3D ids
    (an object missed in up to ``max_gap`` slices keeps its id, see :class:`ZLinker`)."""
    vol = volume if isinstance(volume, NormalizedVolume) else NormalizedVolume(volume)
    progress = progress or seg.progress
    nz = len(vol)
    out = np.zeros(vol.shape, np.uint32)
    counts = np.zeros(nz, np.float32)
    per_id: dict[int, list[float]] = {}
    linker = ZLinker(link_overlap, max_gap)
    for z in range(nz):
        seg.set_normalized(vol[z], embed=False)
        res = seg.segment_text(text, **segment_kwargs)
        lut = linker.link(res.labels, res.scores)
        for k, s in res.scores.items():
            per_id.setdefault(int(lut[k]), []).append(s)
        out[z] = lut[res.labels]
        counts[z] = len(res.scores)
        _report(progress, z + 1, nz, "segment_text")
    return VolumeSegmentation(out, {k: float(np.mean(v)) for k, v in per_id.items()}, counts)


def segment_volume(seg: "Segmenter", volume: np.ndarray, z: int | None = None, points=None, labels=None, box=None,
                   text: str | None = None, channel_axis: int | None = None, channels: Sequence[int] | None = None,
                   **kwargs) -> VolumeSegmentation:
    """Dispatch: prompts (points/box) on slice ``z`` → :func:`propagate`; text only → :func:`link_text`."""
    vol = NormalizedVolume(volume, channel_axis, channels)
    if points is not None or box is not None:
        if z is None:
            raise ValueError("give z, the slice the points/box are on")
        return propagate(seg, vol, z, points=points, labels=labels, box=box, text=text, **kwargs)
    if labels is not None:
        raise ValueError("labels given without points")
    if text is None:
        raise ValueError("segment_volume needs points/box on a slice z, or a text")
    if z is not None:
        raise ValueError(f"z={z!r} is the slice of points/box; with a text alone every slice is segmented: drop z, "
                         "or use propagate(seg, volume, z, text=...) to follow the text's object from slice z")
    return link_text(seg, vol, text, **kwargs)


__all__ = ["NormalizedVolume", "VolumeSegmentation", "ZLinker", "link_slice", "link_text", "mask_prompts", "propagate",
           "segment_volume", "volume_limits"]
