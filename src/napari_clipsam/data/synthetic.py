"""Procedural fluorescence-microscopy images and volumes with instance labels of several concepts.

Used by the demo-model training script, the quality benchmark, the tests and the napari sample data.
Everything is NumPy/SciPy, deterministic given a seed, and fast (a 256×256 image in a few ms, a
16×128×128 volume in well under a second on one CPU core).

Concepts (sizes in pixels at ``domain_shift=0``; pixel size is fixed, so a larger image shows a larger field
of view with more objects, not larger objects):

* ``"nucleus"`` — large roundish/elliptical blobs, equivalent radius 12–24 px, slightly irregular outline,
  chromatin texture with darker nucleoli; often in touching clusters.
* ``"mitochondrion"`` — rods/worms, width 7–10 px, end-to-end length 24–50 px, straight or gently curved.
* ``"vesicle"`` — small round dots, radius 6.5–9.5 px.

Brightness distributions of the three classes overlap on purpose (each object's brightness is drawn from a broad
log-normal around a similar class mean), so classes are told apart by shape, size and texture.

Imaging model: object fluorophore density → Gaussian PSF blur → + background → × uneven illumination
(low-frequency field) → Poisson photon noise → camera offset + Gaussian read noise → ``uint16`` (ADU).

``domain_shift`` (0..1 or a preset name from :data:`DOMAIN_SHIFT_PRESETS`) moves the distribution for few-label
adaptation tests: at 1.0 nuclei are ~40 % larger and ~half as bright with a speckled texture, mitochondria are a bit
thicker, the background is ~3× higher, the PSF wider and the read noise larger.
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi

logger = logging.getLogger(__name__)

CONCEPTS: tuple[str, ...] = ("nucleus", "mitochondrion", "vesicle")

#: Text synonyms per concept (first entry = canonical name), for text-prompt training and evaluation.
SYNONYMS: dict[str, tuple[str, ...]] = {
    "nucleus": ("nucleus", "nuclei", "cell nucleus", "nuclear stain", "cell nuclei"),
    "mitochondrion": ("mitochondrion", "mitochondria", "mitochondrial network", "rod-shaped mitochondria"),
    "vesicle": ("vesicle", "vesicles", "small vesicles", "puncta", "round dots"),
}

#: Documented size ranges in pixels at ``domain_shift=0`` (what the generator draws from).
SIZE_RANGES: dict[str, dict[str, tuple[float, float]]] = {
    "nucleus": {"radius": (12.0, 24.0)},
    "mitochondrion": {"width": (7.0, 10.0), "length": (24.0, 50.0)},
    "vesicle": {"radius": (6.5, 9.5)},
}

#: Named ``domain_shift`` values.
DOMAIN_SHIFT_PRESETS: dict[str, float] = {"none": 0.0, "mild": 0.5, "strong": 1.0}

# Default number of objects per 256×256 field of view, as (low, high) inclusive.
_COUNTS_PER_256SQ: dict[str, tuple[int, int]] = {
    "nucleus": (4, 10),
    "mitochondrion": (8, 20),
    "vesicle": (8, 24),
}
# Smallest visible object kept (pixels in 2D; voxels in 3D are twice this).
_MIN_PIXELS = {"nucleus": 40, "mitochondrion": 10, "vesicle": 8}
# An earlier object must keep at least this fraction of its area when a later one is drawn over it.
_KEEP_FRACTION = 0.65
# Voxel spacing along Z relative to X/Y in volumes (optical sections are thicker than pixels).
_Z_SPACING = 2.5
_PLACEMENT_TRIES = 12


@dataclass
class SyntheticSample:
    """One generated image or volume with its instance labels.

    Attributes:
        image: ``(H, W)`` or ``(Z, Y, X)`` ``uint16`` camera counts (ADU; offset ~100, background and signal in
            photons above it).
        labels: same shape, ``uint32`` instance ids; 0 is background, ids are ``1..N`` and unique across concepts
            (a 3D object has one id in every slice it spans).
        classes: instance id → concept name, for every id in ``labels``.
        info: generation parameters (seed, domain_shift, spacing, psf sigma, ...), for provenance.
    """

    image: np.ndarray
    labels: np.ndarray
    classes: dict[int, str]
    info: dict = field(default_factory=dict)

    @property
    def concepts_present(self) -> tuple[str, ...]:
        """Concepts with at least one instance, in :data:`CONCEPTS` order."""
        present = set(self.classes.values())
        return tuple(c for c in CONCEPTS if c in present)

    def ids_of(self, concept: str) -> list[int]:
        """Sorted instance ids of ``concept`` (empty if absent)."""
        _check_concepts([concept])
        return sorted(i for i, c in self.classes.items() if c == concept)

    def semantic_mask(self, concept: str) -> np.ndarray:
        """Boolean mask (same shape as ``image``) of all pixels belonging to ``concept``; all False if absent."""
        ids = self.ids_of(concept)
        if not ids:
            return np.zeros(self.labels.shape, dtype=bool)
        lut = np.zeros(max(int(self.labels.max()), max(ids)) + 1, dtype=bool)
        lut[ids] = True
        return lut[self.labels]

    def instance_labels(self, concept: str) -> np.ndarray:
        """``uint32`` labels (same shape as ``image``) of ``concept`` only, relabelled ``1..n``; 0 elsewhere."""
        ids = self.ids_of(concept)
        lut = np.zeros(max([int(self.labels.max()), *ids]) + 1, dtype=np.uint32)
        if ids:
            lut[ids] = np.arange(1, len(ids) + 1, dtype=np.uint32)
        return lut[self.labels]


# ----------------------------------------------------------------------------------------------- validation


def _check_concepts(concepts: Iterable[str]) -> tuple[str, ...]:
    if isinstance(concepts, str):
        concepts = (concepts,)
    out = tuple(concepts)
    for c in out:
        if c not in CONCEPTS:
            raise ValueError(f"unknown concept {c!r}: choose from {', '.join(CONCEPTS)}")
    return out


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def _check_shape(shape, ndim: int, name: str, min_side: int) -> tuple[int, ...]:
    if isinstance(shape, numbers.Integral) and not isinstance(shape, bool):
        shape = (shape,) * ndim
    try:
        shape = tuple(shape)
    except TypeError:
        raise ValueError(f"{name} must be an int or a tuple of {ndim} ints, got {shape!r}") from None
    if len(shape) != ndim or not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) for s in shape):
        raise ValueError(f"{name} must be an int or a tuple of {ndim} ints, got {shape!r}")
    sides = shape[-2:]
    if any(s < min_side for s in sides) or any(s < 1 for s in shape):
        raise ValueError(f"{name} {shape!r} is too small: Y and X need at least {min_side} pixels, Z at least 1")
    return tuple(int(s) for s in shape)


def _resolve_shift(domain_shift) -> float:
    if isinstance(domain_shift, str):
        if domain_shift not in DOMAIN_SHIFT_PRESETS:
            raise ValueError(
                f"unknown domain_shift preset {domain_shift!r}: choose from {', '.join(DOMAIN_SHIFT_PRESETS)} "
                "or pass a float in [0, 1]"
            )
        return DOMAIN_SHIFT_PRESETS[domain_shift]
    if isinstance(domain_shift, bool) or not isinstance(domain_shift, numbers.Real):
        raise ValueError(f"domain_shift must be a float in [0, 1] or a preset name, got {domain_shift!r}")
    s = float(domain_shift)
    if not (0.0 <= s <= 1.0):
        raise ValueError(f"domain_shift must be in [0, 1], got {s}")
    return s


def _resolve_counts(
    rng: np.random.Generator,
    concepts: tuple[str, ...],
    counts: Mapping | None,
    p_absent: float,
    area_factor: float,
) -> dict[str, int]:
    """Number of objects to try to place per concept (absent concepts get 0)."""
    counts = dict(counts or {})
    for c in counts:
        _check_concepts([c])
        if c not in concepts:
            raise ValueError(f"counts names {c!r}, which is not in concepts {concepts!r}")
    if isinstance(p_absent, bool) or not isinstance(p_absent, numbers.Real) or not 0.0 <= p_absent <= 1.0:
        raise ValueError(f"p_absent must be a probability in [0, 1], got {p_absent!r}")
    out: dict[str, int] = {}
    for c in CONCEPTS:  # fixed order keeps the random stream independent of argument order
        absent = rng.random() < p_absent
        lo, hi = _COUNTS_PER_256SQ[c]
        lo, hi = max(1, round(lo * area_factor)), max(1, round(hi * area_factor))
        n = int(rng.integers(lo, hi + 1))
        if c not in concepts:
            continue
        if c in counts:
            v = counts[c]
            if isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 0:
                out[c] = int(v)
            elif isinstance(v, Sequence) and len(v) == 2 and all(isinstance(x, numbers.Integral) for x in v) \
                    and 0 <= v[0] <= v[1]:
                out[c] = int(rng.integers(v[0], v[1] + 1))
            else:
                raise ValueError(f"counts[{c!r}] must be an int >= 0 or a (low, high) pair, got {v!r}")
        else:
            out[c] = 0 if absent else n
    # Keep at least one concept in the image unless the caller fixed the counts or asked for all-absent.
    free = [c for c in concepts if c not in counts]
    if free and p_absent < 1.0 and sum(out.values()) == 0:
        c = free[int(rng.integers(len(free)))]
        lo, hi = _COUNTS_PER_256SQ[c]
        out[c] = max(1, round(rng.integers(lo, hi + 1) * area_factor))
    return out


# ----------------------------------------------------------------------------------------------- rendering


class _Canvas:
    """Label + fluorophore-density arrays with painter's-algorithm placement that keeps labels consistent."""

    def __init__(self, shape: tuple[int, ...], spacing: tuple[float, ...], min_px: dict[str, int]):
        self.shape = shape
        self.min_px = min_px
        self.spacing = np.asarray(spacing, dtype=np.float32)
        self.labels = np.zeros(shape, dtype=np.uint32)
        self.density = np.zeros(shape, dtype=np.float32)
        self.area: list[int] = [0]  # current visible area per id (index = id)
        self.area0: list[int] = [0]  # area when drawn
        self.window: list[tuple[slice, ...]] = [()]  # window containing each object
        self.classes: dict[int, str] = {}
        self.params: dict[int, dict] = {}

    def grid(self, center: np.ndarray, half: np.ndarray):
        """Clipped local window around ``center`` (index units) with physical half-extent ``half`` per axis.

        Returns ``(slices, coords)`` where coords are broadcastable physical offsets from the centre, or None.
        """
        slices, coords = [], []
        nd = len(self.shape)
        for ax in range(nd):
            h = half[ax] / self.spacing[ax]
            lo = max(0, int(math.floor(center[ax] - h)))
            hi = min(self.shape[ax], int(math.ceil(center[ax] + h)) + 1)
            if hi <= lo:
                return None
            c = (np.arange(lo, hi, dtype=np.float32) - np.float32(center[ax])) * self.spacing[ax]
            shp = [1] * nd
            shp[ax] = hi - lo
            slices.append(slice(lo, hi))
            coords.append(c.reshape(shp))
        return tuple(slices), coords

    def place(self, concept: str, sl: tuple[slice, ...], mask: np.ndarray, dens: np.ndarray, params: dict,
              max_overlap: float = 1.0) -> bool:
        """Draw an object on top if it stays visible and does not hide too much of any earlier object.

        ``max_overlap``: largest fraction of the new object's area that may cover earlier objects
        (small values give touching rather than overlapping objects).
        """
        n = int(mask.sum())
        if n < self.min_px[concept] or ndi.label(mask)[1] != 1:  # too small, or cut in pieces by the border
            return False
        win = self.labels[sl]
        under = win[mask]
        under = under[under > 0]
        if under.size > max_overlap * n:
            return False
        ids, cnt = np.unique(under, return_counts=True)
        for i, k in zip(ids.tolist(), cnt.tolist()):
            left = self.area[i] - k
            if left < _KEEP_FRACTION * self.area0[i] or left < self.min_px[self.classes[i]]:
                return False
        new_id = len(self.area)
        old = win.copy()
        win[mask] = new_id
        for i in ids.tolist():  # an occluded object must stay in one piece
            if ndi.label(self.labels[self.window[i]] == i)[1] != 1:
                win[...] = old
                return False
        for i, k in zip(ids.tolist(), cnt.tolist()):
            self.area[i] -= k
        self.area.append(n)
        self.area0.append(n)
        self.window.append(sl)
        self.classes[new_id] = concept
        self.params[new_id] = params
        self.density[sl][mask] = dens[mask]
        return True


def _rot2(coords: list[np.ndarray], theta: float):
    """Rotate the last two (Y, X) physical coordinates by ``theta``; returns (u, v) along/across."""
    y, x = coords[-2], coords[-1]
    c, s = math.cos(theta), math.sin(theta)
    return x * c + y * s, -x * s + y * c


def _random_center(rng, shape, lo_frac=None):
    c = rng.random(len(shape)) * np.asarray(shape, dtype=np.float64)
    if lo_frac is not None and len(shape) == 3:  # nuclei sit in a cell layer in the middle of the stack
        c[0] = (lo_frac + rng.random() * (1 - 2 * lo_frac)) * shape[0]
    return c - 0.5


def _draw_nuclei(rng, cv: _Canvas, n: int, s: float, tex: dict):
    nd = len(cv.shape)
    placed_centers: list[tuple[np.ndarray, float]] = []
    for _ in range(n):
        for _try in range(_PLACEMENT_TRIES):
            r = rng.uniform(*SIZE_RANGES["nucleus"]["radius"]) * (1.0 + 0.4 * s)
            elong = rng.uniform(1.0, 1.45)
            a, b = r * math.sqrt(elong), r / math.sqrt(elong)  # same area as a circle of radius r
            theta = rng.uniform(0, math.pi)
            if placed_centers and rng.random() < 0.55:  # touch a previous nucleus -> clusters
                c0, r0 = placed_centers[int(rng.integers(len(placed_centers)))]
                d = (r0 + r) * rng.uniform(0.85, 1.0)
                phi = rng.uniform(0, 2 * math.pi)
                center = c0.copy()
                center[-2] += d * math.sin(phi)
                center[-1] += d * math.cos(phi)
                if nd == 3:
                    center[0] += rng.normal(0, 0.8)
            else:
                center = _random_center(rng, cv.shape, lo_frac=0.3)
            c_z = r * rng.uniform(0.5, 0.7)  # flattened along z (physical units)
            harm = [(k, rng.uniform(0, 0.05), rng.uniform(0, 2 * math.pi)) for k in (2, 3, 4)]
            half = np.array(([c_z * 1.1] if nd == 3 else []) + [max(a, b) * 1.2] * 2)
            g = cv.grid(center, half)
            if g is None:
                continue
            sl, co = g
            u, v = _rot2(co, theta)
            q = (u / a) ** 2 + (v / b) ** 2
            if nd == 3:
                q = q + (co[0] / c_z) ** 2
            phi = np.arctan2(v, u)
            rmod = 1.0 + sum(amp * np.cos(k * phi + ph) for k, amp, ph in harm)
            rho2 = q / rmod**2
            mask = rho2 <= 1.0
            # density: slightly brighter periphery (heterochromatin), chromatin texture, dark nucleoli, speckles
            dens = 0.8 + 0.2 * np.clip(rho2, 0, 1)
            dens = dens * (1.0 + rng.uniform(0.15, 0.3) * tex["smooth"][sl])
            for _k in range(int(rng.integers(1, 4))):
                off = [rng.normal(0, 0.3) * a, rng.normal(0, 0.3) * b]
                rn = rng.uniform(2.0, 3.5) * (1 + 0.4 * s)
                du, dv = u - off[0], v - off[1]
                dd = du**2 + dv**2
                if nd == 3:
                    dd = dd + (co[0] - rng.normal(0, 0.2) * c_z) ** 2
                dens = dens * (1.0 - rng.uniform(0.3, 0.5) * np.exp(-dd / (2 * rn * rn)))
            if s > 0:
                dens = dens * (1.0 - 0.35 * s) + 1.6 * s * tex["speckle"][sl]
            bright = float(rng.lognormal(0.0, 0.3)) * (1.0 - 0.5 * s)
            if cv.place("nucleus", sl, mask, dens * bright, {"radius": r}):
                placed_centers.append((center, r))
                break


def _bezier(p0, p1, p2, m):
    t = np.linspace(0.0, 1.0, m, dtype=np.float32)[:, None]
    return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2, t[:, 0]


def _draw_mitochondria(rng, cv: _Canvas, n: int, s: float):
    nd = len(cv.shape)
    for _ in range(n):
        for _try in range(_PLACEMENT_TRIES):
            w = rng.uniform(*SIZE_RANGES["mitochondrion"]["width"]) * (1.0 + 0.2 * s)
            length = rng.uniform(*SIZE_RANGES["mitochondrion"]["length"])
            theta = rng.uniform(0, 2 * math.pi)
            center_idx = _random_center(rng, cv.shape)
            center = (center_idx * cv.spacing).astype(np.float32)
            d = np.zeros(nd, np.float32)
            d[-1], d[-2] = math.cos(theta), math.sin(theta)
            if nd == 3:
                d[0] = rng.normal(0, 0.12)
                d /= np.linalg.norm(d)
            nrm = np.zeros(nd, np.float32)
            nrm[-1], nrm[-2] = -math.sin(theta), math.cos(theta)
            bend = rng.uniform(-0.25, 0.25) * length
            p0, p2 = center - d * length / 2, center + d * length / 2
            p1 = center + nrm * bend
            curve, t = _bezier(p0, p1, p2, max(12, int(length)))
            rad = w / 2
            # in a stack the tube's cross-section spans >= 3 slices (as seen through the elongated axial PSF)
            ext = np.full(nd, rad + 1.0, np.float32)
            squash = np.ones(nd, np.float32)
            if nd == 3:
                rz = max(rad, 1.05 * _Z_SPACING)
                ext[0], squash[0] = rz + 1.0, rad / rz
            lo_p, hi_p = curve.min(0) - ext, curve.max(0) + ext
            mid = (lo_p + hi_p) / 2
            g = cv.grid(mid / cv.spacing, (hi_p - lo_p) / 2)
            if g is None:
                continue
            sl, co = g
            full = np.broadcast_shapes(*[c.shape for c in co])
            pts = np.stack([np.broadcast_to(c + m, full).ravel() for c, m in zip(co, mid)], axis=1) * squash
            curve = curve * squash
            d2 = (pts * pts).sum(1)[:, None] + (curve * curve).sum(1)[None, :] - 2.0 * (pts @ curve.T)
            j = d2.argmin(1)
            dist = np.sqrt(np.maximum(d2[np.arange(len(j)), j], 0.0)).reshape(full)
            tt = t[j].reshape(full)
            mask = dist <= rad
            prof = 0.6 + 0.4 * np.sqrt(np.clip(1 - (dist / rad) ** 2, 0, 1))
            along = 1.0 + 0.15 * np.cos(2 * math.pi * rng.uniform(0.5, 2.0) * tt + rng.uniform(0, 2 * math.pi))
            bright = float(rng.lognormal(0.0, 0.3)) * 0.95
            if cv.place("mitochondrion", sl, mask, prof * along * bright,
                        {"width": w, "length": length}, max_overlap=0.1):
                break


def _draw_vesicles(rng, cv: _Canvas, n: int, s: float):
    nd = len(cv.shape)
    for _ in range(n):
        for _try in range(_PLACEMENT_TRIES):
            r = rng.uniform(*SIZE_RANGES["vesicle"]["radius"])
            e = rng.uniform(0.85, 1.0)
            theta = rng.uniform(0, math.pi)
            center = _random_center(rng, cv.shape)
            half = np.array([r + 1.0] * nd)
            g = cv.grid(center, half)
            if g is None:
                continue
            sl, co = g
            u, v = _rot2(co, theta)
            q = (u / r) ** 2 + (v / (r * e)) ** 2
            if nd == 3:
                q = q + (co[0] / r) ** 2
            mask = q <= 1.0
            dens = 0.55 + 0.45 * (1.0 - q)
            bright = float(rng.lognormal(0.0, 0.3)) * 1.1
            if cv.place("vesicle", sl, mask, dens * bright, {"radius": r}, max_overlap=0.1):
                break


def _smooth_field(rng, shape: tuple[int, ...], cells: float, spacing) -> np.ndarray:
    """Low-frequency random field in [0, 1] with about ``cells`` bumps per 256 px, via separable interpolation."""
    grids = []
    for n, sp in zip(shape, spacing):
        g = max(2, int(round(n * sp / 256.0 * cells)) + 2)
        pos = np.linspace(0, g - 1, n, dtype=np.float32)[:, None]
        w = np.exp(-((pos - np.arange(g, dtype=np.float32)[None]) ** 2) / (2 * 0.7**2))
        grids.append(w / w.sum(1, keepdims=True))
    f = rng.standard_normal([gr.shape[1] for gr in grids]).astype(np.float32)
    for ax, gr in enumerate(grids):
        f = np.moveaxis(np.tensordot(gr, np.moveaxis(f, ax, 0), axes=(1, 0)), 0, ax)
    f -= f.min()
    return f / max(float(f.max()), 1e-6)


def _shot_noise(rng: np.random.Generator, lam: np.ndarray) -> np.ndarray:
    """Poisson photon counts for expected counts ``lam`` (float32).

    Exact Poisson below 15 photons; above, the normal approximation N(lam, lam) (indistinguishable there, and 5×
    faster than NumPy's Poisson sampler for large means)."""
    z = rng.standard_normal(lam.shape, dtype=np.float32)
    out = lam + np.sqrt(lam) * z
    low = lam < 15.0
    if low.any():
        out[low] = rng.poisson(lam[low])
    return out


def _generate(seed: int, shape: tuple[int, ...], concepts, counts, domain_shift, p_absent) -> SyntheticSample:
    concepts = _check_concepts(concepts)
    s = _resolve_shift(domain_shift)
    rng = np.random.default_rng(seed)
    nd = len(shape)
    spacing = (_Z_SPACING, 1.0, 1.0) if nd == 3 else (1.0, 1.0)
    area_factor = shape[-1] * shape[-2] / 256.0**2
    if nd == 3:
        area_factor *= 1.5  # a stack holds more cells per field than one plane
    n_per = _resolve_counts(rng, concepts, counts, p_absent, area_factor)
    min_px = {c: v * (2 if nd == 3 else 1) for c, v in _MIN_PIXELS.items()}

    cv = _Canvas(shape, spacing, min_px)
    # independent streams per part so that e.g. changing the vesicle count does not change the nuclei
    r_tex, r_nuc, r_mito, r_ves, r_img = rng.spawn(5)
    tex: dict[str, np.ndarray] = {}
    if n_per.get("nucleus", 0):
        sm = ndi.gaussian_filter(r_tex.standard_normal(shape).astype(np.float32), 1.5 / np.asarray(spacing))
        tex["smooth"] = sm / max(float(sm.std()), 1e-6)
        sp = (r_tex.random(shape) < 0.03).astype(np.float32)
        sp = ndi.gaussian_filter(sp, 0.7 / np.asarray(spacing))
        tex["speckle"] = sp / max(float(sp.max()), 1e-6)
    _draw_nuclei(r_nuc, cv, n_per.get("nucleus", 0), s, tex)
    _draw_mitochondria(r_mito, cv, n_per.get("mitochondrion", 0), s)
    _draw_vesicles(r_ves, cv, n_per.get("vesicle", 0), s)

    # imaging: PSF blur, background, uneven illumination, Poisson + read noise
    rng = r_img
    psf = rng.uniform(0.9, 1.3) + 0.6 * s
    sigma = (psf * 2.0 / _Z_SPACING, psf, psf) if nd == 3 else (psf, psf)
    photons_peak = rng.uniform(250.0, 600.0)
    signal = ndi.gaussian_filter(cv.density, sigma) * np.float32(photons_peak)
    bg = photons_peak * rng.uniform(0.06, 0.12) * (1.0 + 2.0 * s)
    bg_field = bg * (0.7 + 0.6 * _smooth_field(rng, shape, 2.0, spacing))
    illum = 1.0 - rng.uniform(0.15, 0.4) * _smooth_field(rng, shape, 1.5, spacing)
    lam = np.clip((signal + bg_field) * illum, 0, None)
    counts_img = _shot_noise(rng, lam)
    read = rng.uniform(2.0, 4.0) * (1.0 + 1.5 * s)
    offset = 100.0
    adu = offset + counts_img + np.float32(read) * rng.standard_normal(shape, dtype=np.float32)
    image = np.clip(np.rint(adu), 0, 65535).astype(np.uint16)

    info = {
        "seed": seed,
        "domain_shift": s,
        "spacing": spacing,
        "psf_sigma": tuple(float(x) for x in sigma),
        "photons_peak": float(photons_peak),
        "background_photons": float(bg),
        "read_noise_adu": float(read),
        "offset_adu": offset,
        "requested_counts": n_per,
        "object_params": cv.params,
    }
    logger.debug("synthetic seed=%d shape=%s counts=%s", seed, shape, n_per)
    return SyntheticSample(image=image, labels=cv.labels, classes=cv.classes, info=info)


# ----------------------------------------------------------------------------------------------- public API


def make_image(
    seed: int,
    size: int | tuple[int, int] = 256,
    concepts: Iterable[str] = CONCEPTS,
    counts: Mapping[str, int | tuple[int, int]] | None = None,
    domain_shift: float | str = 0.0,
    p_absent: float = 0.2,
) -> SyntheticSample:
    """Generate one 2D fluorescence-like image with instance labels.

    Args:
        seed: non-negative int; the same arguments give identical arrays.
        size: ``H`` (square) or ``(H, W)``, each >= 32 pixels. Object sizes are in pixels and do not scale with
            ``size``; default object counts scale with the area (per 256×256: 4–10 nuclei, 8–20 mitochondria,
            8–24 vesicles, before occlusion/placement rejections).
        concepts: which of :data:`CONCEPTS` may appear; others never do.
        counts: fixed number (or ``(low, high)`` range) of objects to try to place per concept; a concept named
            here is never randomly made absent (0 makes it absent). Objects that cannot be placed without hiding
            too much of others, or that end up smaller than a few pixels, are dropped, so this is an upper bound.
        domain_shift: 0..1 or a name in :data:`DOMAIN_SHIFT_PRESETS` ("none", "mild", "strong").
        p_absent: probability that each concept not fixed by ``counts`` is absent from the image (at least one
            concept is kept unless ``p_absent == 1``).

    Returns:
        :class:`SyntheticSample` with ``image`` ``(H, W) uint16`` and ``labels`` ``(H, W) uint32``.

    Raises:
        ValueError: unknown concept or preset, bad size, seed, counts, domain_shift or p_absent.
    """
    seed = _check_seed(seed)
    shape = _check_shape(size, 2, "size", 32)
    return _generate(seed, shape, concepts, counts, domain_shift, p_absent)


def make_volume(
    seed: int,
    shape: tuple[int, int, int] = (16, 128, 128),
    concepts: Iterable[str] = CONCEPTS,
    counts: Mapping[str, int | tuple[int, int]] | None = None,
    domain_shift: float | str = 0.0,
    p_absent: float = 0.2,
) -> SyntheticSample:
    """Generate one 3D ``(Z, Y, X)`` fluorescence-like stack with 3D instance labels.

    Z slices are 2.5 pixels apart (``info["spacing"] == (2.5, 1, 1)``): nuclei are flattened ellipsoids spanning
    roughly 4–10 slices, mitochondria are tubes lying mostly in-plane (1–3 slices), vesicles are spheres
    (1–5 slices). Each 3D object has one id in all slices. Axial blur is wider than lateral blur.
    Other arguments as in :func:`make_image`; ``shape`` needs Y, X >= 32 and Z >= 1.

    Returns:
        :class:`SyntheticSample` with ``image`` ``(Z, Y, X) uint16`` and ``labels`` ``(Z, Y, X) uint32``.
    """
    seed = _check_seed(seed)
    shp = _check_shape(shape, 3, "shape", 32)
    return _generate(seed, shp, concepts, counts, domain_shift, p_absent)


def make_dataset(seeds: Iterable[int], volume: bool = False, **kw) -> list[SyntheticSample]:
    """``[make_image(seed, **kw) for seed in seeds]`` (or :func:`make_volume` with ``volume=True``)."""
    fn = make_volume if volume else make_image
    return [fn(seed, **kw) for seed in seeds]
