"""Tiles with a halo for images larger than the model input, prompt routing, and stitching.

Tiles are windows of ``tile_size`` pixels (the model sees each at its native resolution when
``tile_size`` equals the model input), spread evenly so that neighbours overlap by at least
``2 * halo``. Each pixel belongs to the *core* of exactly one tile (cores meet in the middle of
the overlaps), so every core pixel has at least ``halo`` pixels of context on every inner side.

Stitching instances: an instance is kept only by tiles whose core it touches; two instances from
different tiles are the same object when their IoU *inside the overlap of the two windows* is at
least ``merge_iou`` (both tiles see that region), and are merged into one mask.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np

from .instances import Instances


@dataclass(frozen=True)
class Tile:
    """window, core: (y0, x0, y1, x1) half-open in image pixels; core ⊆ window."""

    window: tuple[int, int, int, int]
    core: tuple[int, int, int, int]

    @property
    def shape(self) -> tuple[int, int]:
        return self.window[2] - self.window[0], self.window[3] - self.window[1]


#: Tiles covering the image more often than this (a halo near half the tile) warn: each is embedded.
MAX_OVERLAP = 4.0


def _axis(length: int, tile: int, halo: int) -> list[tuple[int, int, int, int]]:
    """(start, stop, core_start, core_stop) along one axis."""
    if length <= tile:
        return [(0, length, 0, length)]
    stride = tile - 2 * halo
    n = math.ceil((length - tile) / stride) + 1
    starts = [round(i * (length - tile) / (n - 1)) for i in range(n)]
    bounds = [0] + [(starts[i + 1] + starts[i] + tile) // 2 for i in range(n - 1)] + [length]
    return [(s, s + tile, bounds[i], bounds[i + 1]) for i, s in enumerate(starts)]


def make_tiles(shape: tuple[int, int], tile_size: int, halo: int) -> list[Tile]:
    """Tiles covering a (H, W) image, row-major."""
    if tile_size < 2 or halo < 0 or tile_size - 2 * halo < 1:
        raise ValueError(f"tile_size={tile_size}, halo={halo}: need tile_size > 2 * halo >= 0")
    rows, cols = _axis(int(shape[0]), tile_size, halo), _axis(int(shape[1]), tile_size, halo)
    covered = sum(y1 - y0 for y0, y1, _, _ in rows) * sum(x1 - x0 for x0, x1, _, _ in cols)
    times = covered / max(1, int(shape[0]) * int(shape[1]))
    if times > MAX_OVERLAP:
        warnings.warn(f"{len(rows) * len(cols)} tiles of {tile_size} px cover the {tuple(shape)} image "
                      f"{times:.1f} times over (halo {halo} leaves a stride of {tile_size - 2 * halo} px), "
                      f"and each tile is embedded: a halo of at most {tile_size // 4} keeps it "
                      f"at most {MAX_OVERLAP:g} times", stacklevel=2)
    return [Tile((y0, x0, y1, x1), (cy0, cx0, cy1, cx1))
            for y0, y1, cy0, cy1 in rows for x0, x1, cx0, cx1 in cols]


def route(tiles: list[Tile], box: tuple[float, float, float, float]) -> int | None:
    """Index of the tile whose window contains ``box`` (y0, x0, y1, x1) with the most margin,
    or None if no window contains it."""
    best, best_margin = None, -1.0
    y0, x0, y1, x1 = box
    for i, t in enumerate(tiles):
        ty0, tx0, ty1, tx1 = t.window
        margin = min(y0 - ty0, x0 - tx0, ty1 - y1, tx1 - x1)
        if margin >= 0 and margin > best_margin:
            best, best_margin = i, margin
    return best


def covering(tiles: list[Tile], region: tuple[float, float, float, float]) -> list[int]:
    """Indices of the tiles whose window overlaps ``region`` (y0, x0, y1, x1), the window centre
    nearest the region's centre first."""
    r = np.asarray(region, np.float64)
    wins = np.array([t.window for t in tiles], np.float64).reshape(-1, 4)
    hit = (wins[:, 0] < r[2]) & (r[0] < wins[:, 2]) & (wins[:, 1] < r[3]) & (r[1] < wins[:, 3])
    dist = (((wins[:, :2] + wins[:, 2:]) / 2 - (r[:2] + r[2:]) / 2) ** 2).sum(1)
    return [int(i) for i in np.argsort(dist, kind="stable") if hit[i]]


def _touches_core(inst: Instances, i: int, core: tuple[int, int, int, int]) -> bool:
    return bool(inst.window(i, np.asarray(core)).any())


def stitch(inst: Instances, tiles: list[Tile], merge_iou: float = 0.5) -> Instances:
    """Instances from all tiles (``inst.source`` = tile index, image coordinates) → one set.

    Drops instances that do not touch their own tile's core, then merges instances of different
    tiles whose IoU inside their windows' overlap is at least ``merge_iou`` (transitively).
    """
    keep = np.array([_touches_core(inst, i, tiles[s].core) for i, s in enumerate(inst.source)], bool)
    inst = inst.filter(keep)
    parent = list(range(len(inst)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in inst.overlapping_pairs():
        si, sj = inst.source[i], inst.source[j]
        if si == sj:
            continue
        wi, wj = np.asarray(tiles[si].window), np.asarray(tiles[sj].window)
        shared = np.concatenate([np.maximum(wi[:2], wj[:2]), np.minimum(wi[2:], wj[2:])])
        if (shared[2:] <= shared[:2]).any():
            continue
        if inst.iou(i, j, region=shared) >= merge_iou:
            parent[find(i)] = find(j)
    groups: dict[int, list[int]] = {}
    for i in range(len(inst)):
        groups.setdefault(find(i), []).append(i)
    if all(len(g) == 1 for g in groups.values()):
        return inst
    return inst.union(list(groups.values()))


def paste_cores(tiles: list[Tile], parts: list[np.ndarray], shape: tuple[int, int],
                dtype=np.float32) -> np.ndarray:
    """Per-tile (window-shaped) arrays → one (H, W) array, each pixel from the tile owning it."""
    out = np.zeros(shape, dtype)
    for t, p in zip(tiles, parts):
        y0, x0 = t.window[:2]
        cy0, cx0, cy1, cx1 = t.core
        out[cy0:cy1, cx0:cx1] = p[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0]
    return out


__all__ = ["Tile", "covering", "make_tiles", "paste_cores", "route", "stitch"]
