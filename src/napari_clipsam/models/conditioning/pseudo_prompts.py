"""Pseudo prompts from a correlation map, and the ``pseudo`` strategy.

Two ways to turn a per-pixel probability map of a text into prompts, both used by
``Segmenter.segment_text`` (every strategy) as the instance mechanism of text-only mode:

- :func:`grid_seeds` (the default there): a grid of points inside the map's regions, away from
  their edges. Each point is decoded alone, like a click; the masks that many points agree on
  are the objects, so touching objects merged into one region still get one seed each.
- :func:`pseudo_prompts` (after ESC-Net): regions — connected components, with large or necked
  components split by k-means on pixel coordinates — each with one point (its highest-probability
  pixel among the deeper half of the region) and its mask, fed to SAM as point + mask prompts:
  one decode per region, cheaper, but touching objects without a neck share one prompt.

The ``pseudo`` strategy itself learns only a light semantic head: raw CLIP similarity plus a
zero-initialised refinement from CLIP patch features modulated by the text, and a text token
for the decoder. Untrained, its map *is* the raw CLIP similarity, as in ESC-Net.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

from ..sam_parts import SamConfig
from .base import Conditioning, Context


@dataclass
class PseudoPrompts:
    """N regions of a (H, W) map: points (N, 2) as (x, y) pixel centres, masks (N, H, W) bool,
    scores (N,) mean probability inside each region, areas (N, H, W) bool the whole connected
    component each region was split from (= its mask when it was not split)."""

    points: np.ndarray
    masks: np.ndarray
    scores: np.ndarray
    areas: np.ndarray

    def __len__(self) -> int:
        return len(self.points)


@dataclass
class GridSeeds:
    """N seed points in the regions of a (H, W) map: points (N, 2) as (x, y) cell centres,
    region (N,) the id of each point's connected region in ``regions`` ((H, W) int32, 0 outside)."""

    points: np.ndarray
    region: np.ndarray
    regions: np.ndarray

    def __len__(self) -> int:
        return len(self.points)


def grid_seeds(prob: np.ndarray, threshold: float = 0.5, stride: int = 2, min_depth: float = 1.5,
               rel_depth: float = 0.5, min_area: int = 1) -> GridSeeds:
    """Points every ``stride`` cells inside the regions of ``prob`` (H, W) above ``threshold``.

    A grid point is kept when it lies at least ``min(min_depth, rel_depth × its region's
    greatest depth)`` cells from the region's edge (distance transform), so thin regions keep
    their midline and wide ones drop their rims. Every region of at least ``min_area`` cells gets
    at least one point (its deepest cell) even when no grid point falls in it.
    """
    prob = np.asarray(prob, dtype=np.float32)
    if prob.ndim != 2:
        raise ValueError(f"grid_seeds expects a (H, W) map, got shape {prob.shape}")
    if not np.isfinite(prob).all():
        raise ValueError("grid_seeds: the probability map contains NaN or inf")
    if stride < 1:
        raise ValueError(f"grid_seeds: stride must be >= 1, got {stride}")
    inside = prob > threshold
    regions, n = ndimage.label(inside)
    regions = regions.astype(np.int32)
    if n:
        areas = ndimage.sum_labels(inside, regions, np.arange(1, n + 1))
        small = np.flatnonzero(areas < min_area) + 1
        if len(small):
            regions[np.isin(regions, small)] = 0
    if not regions.any():
        return GridSeeds(np.zeros((0, 2), np.float32), np.zeros(0, np.int32), regions)
    depth = ndimage.distance_transform_edt(np.pad(regions > 0, 1))[1:-1, 1:-1]
    deepest = np.concatenate([[0.0], ndimage.maximum(depth, regions, np.arange(1, n + 1))])
    need = np.minimum(min_depth, rel_depth * deepest)[regions]
    grid = np.zeros_like(inside)
    grid[::stride, ::stride] = True
    ys, xs = np.nonzero(grid & (regions > 0) & (depth >= need))
    seeded = set(regions[ys, xs].tolist())
    extra = [r for r in range(1, n + 1) if r not in seeded and deepest[r] > 0]
    if extra:
        where = ndimage.maximum_position(depth, regions, extra)
        ys = np.concatenate([ys, [p[0] for p in where]]).astype(np.int64)
        xs = np.concatenate([xs, [p[1] for p in where]]).astype(np.int64)
    points = np.stack([xs, ys], 1).astype(np.float32) + 0.5
    return GridSeeds(points, regions[ys, xs], regions)


def _kmeans(coords: np.ndarray, k: int, iters: int = 10, init: np.ndarray | None = None) -> np.ndarray:
    """Deterministic k-means on (n, 2) coordinates → labels (n,).

    Starts from ``init`` (k, 2) centres when given, else from farthest-point initialisation.
    """
    if init is not None:
        centres = [c for c in np.asarray(init, np.float64)[:k]]
    else:
        centres = [coords[0]]
    while len(centres) < k:
        d = np.min([((coords - c) ** 2).sum(1) for c in centres], axis=0)
        centres.append(coords[int(np.argmax(d))])
    centres = np.array(centres, dtype=np.float64)
    labels = np.zeros(len(coords), dtype=np.int64)
    for _ in range(iters):
        d = ((coords[:, None, :] - centres[None]) ** 2).sum(-1)
        labels = d.argmin(1)
        for j in range(k):
            sel = coords[labels == j]
            if len(sel):
                centres[j] = sel.mean(0)
    return labels


def _centres(region: np.ndarray, depth: float) -> np.ndarray:
    """(k, 2) (y, x) centres of the parts of ``region`` separated by necks: maxima of its distance
    transform that rise at least ``depth`` pixels above the saddle to any higher maximum."""
    from skimage.morphology import h_maxima

    dist = ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]
    peaks, n = ndimage.label(h_maxima(dist, depth))
    if n == 0:
        return np.zeros((0, 2))
    return np.asarray(ndimage.center_of_mass(peaks, peaks, range(1, n + 1)), np.float64).reshape(-1, 2)


def pseudo_prompts(
    prob: np.ndarray,
    threshold: float = 0.5,
    min_area: int = 4,
    split_area: float | None = None,
    max_splits: int = 5,
    max_regions: int = 512,
    neck_depth: float | None = 1.0,
) -> PseudoPrompts:
    """Regions of ``prob`` (H, W) in [0, 1] above ``threshold``, one point + mask each.

    A component is split by k-means on its pixel coordinates (at most ``max_splits`` parts) when
    it is larger than ``split_area`` pixels (default: 2.5× the median component area; then into
    ``round(area / typical area)`` parts) or when it has necks: several maxima of its distance
    transform, each ``neck_depth`` pixels deep (touching round objects; then one part per
    maximum, k-means starting there; ``None`` turns this off). Components smaller than
    ``min_area`` are dropped.
    """
    prob = np.asarray(prob, dtype=np.float32)
    if prob.ndim != 2:
        raise ValueError(f"pseudo_prompts expects a (H, W) map, got shape {prob.shape}")
    if not np.isfinite(prob).all():
        raise ValueError("pseudo_prompts: the probability map contains NaN or inf")
    if neck_depth is not None and not neck_depth > 0:
        raise ValueError(f"pseudo_prompts: neck_depth must be > 0 pixels (or None to not split at necks), got {neck_depth}")
    h, w = prob.shape
    comp, n = ndimage.label(prob > threshold)
    empty = PseudoPrompts(np.zeros((0, 2), np.float32), np.zeros((0, h, w), bool), np.zeros(0, np.float32),
                          np.zeros((0, h, w), bool))
    if n == 0:
        return empty
    areas = ndimage.sum_labels(np.ones_like(comp), comp, index=np.arange(1, n + 1))
    kept = [i + 1 for i, a in enumerate(areas) if a >= min_area]
    if not kept:
        return empty
    typical = float(np.median([areas[i - 1] for i in kept]))
    split_at = split_area if split_area is not None else 2.5 * typical
    points, masks, scores, regions = [], [], [], []
    for lab in kept:
        if len(points) >= max_regions:
            break
        region = comp == lab
        area = areas[lab - 1]
        parts = [region]
        k = int(min(max_splits, max(2, round(area / max(typical, 1.0))))) if area > split_at else 1
        centres = _centres(region, neck_depth) if neck_depth is not None else np.zeros((0, 2))
        if len(centres) > k:
            k = min(max_splits, len(centres))
        else:
            centres = None
        if k > 1 and max_splits > 1:
            ys, xs = np.nonzero(region)
            coords = np.stack([ys, xs], 1).astype(np.float64)
            labels = _kmeans(coords, k, init=centres)
            parts = []
            for j in range(k):
                part = np.zeros_like(region)
                part[ys[labels == j], xs[labels == j]] = True
                if part.sum() >= min_area:
                    parts.append(part)
        for part in parts:
            # Its highest-probability point among the deep half of the part (clicks are centred).
            depth = ndimage.distance_transform_edt(np.pad(part, 1))[1:-1, 1:-1]
            vals = np.where(depth >= 0.5 * depth.max(), prob, -1.0)
            y, x = np.unravel_index(int(np.argmax(vals)), vals.shape)
            points.append((x + 0.5, y + 0.5))
            masks.append(part)
            regions.append(region)
            scores.append(float(prob[part].mean()))
            if len(points) >= max_regions:
                break
    order = np.argsort(scores)[::-1]
    return PseudoPrompts(np.asarray(points, np.float32)[order], np.asarray(masks, bool)[order],
                         np.asarray(scores, np.float32)[order], np.asarray(regions, bool)[order])


class PseudoConditioning(Conditioning):
    """Semantic head over CLIP features + a text token for SAM's decoder."""

    name = "pseudo"

    def __init__(self, sam: SamConfig, clip_dim: int, text_width: int, clip_grid: int,
                 hidden: int = 64):
        super().__init__(sam, clip_dim, text_width, clip_grid)
        self.text_token = nn.Linear(clip_dim, sam.prompt_embed_dim)
        self.feat = nn.Conv2d(clip_dim + 1, hidden, kernel_size=1)
        self.film = nn.Linear(clip_dim, 2 * hidden)
        self.refine = nn.Sequential(
            nn.Conv2d(hidden, hidden, kernel_size=3, padding=1), nn.GELU(), nn.Conv2d(hidden, 1, kernel_size=1)
        )
        nn.init.zeros_(self.refine[-1].weight)
        nn.init.zeros_(self.refine[-1].bias)
        self.sim_scale = nn.Parameter(torch.tensor(10.0))
        self.sim_offset = nn.Parameter(torch.tensor(0.5))

    def prompt_tokens(self, ctx: Context) -> torch.Tensor:
        return self.text_token(ctx.text.embedding)[:, None]

    def semantic_logits(self, ctx: Context, size: int) -> torch.Tensor:
        scale, shift = self.film(ctx.text.embedding).chunk(2, dim=-1)
        h = self.feat(torch.cat([ctx.patches, ctx.similarity], dim=1))
        h = F.gelu(h * (1 + scale[..., None, None]) + shift[..., None, None])
        logits = self.sim_scale * (ctx.similarity - self.sim_offset) + self.refine(h)
        return F.interpolate(logits, size=(size, size), mode="bilinear", align_corners=False)
