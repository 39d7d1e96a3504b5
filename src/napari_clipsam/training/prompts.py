"""Targets and prompt simulation for training (train the way you will infer).

Modes (``FineTuneConfig.mode``):

- ``manual``: the example's text + 1..N positive/negative clicks or a jittered box on one
  ground-truth instance → that instance; optionally followed by correction clicks sampled from
  the error region of the model's own prediction (SAM's interactive training).
- ``text``: text only. (a) The text-only/semantic path (``ClipSam.semantic_logits``) → the union
  mask of the class; (b) per instance, a seed click as ``segment_text`` decodes its grid of
  seeds: the text + one point anywhere but the instance's rim → that instance.
- ``both``: each view is simulated as ``manual`` or ``text`` with equal probability.

Points are sampled in image pixels and mapped with ``Frame.to_input`` like user clicks.

Targets live on the model's low-resolution mask grid (m × m, m = 4 × embedding grid), the grid
of ``ClipSam.decode``'s logits. :func:`downsample_target` maps a mask the same way
``engine.preprocess`` maps images: longest side resized to S, zero-padded bottom/right, then
averaged down to m × m — so a target pixel is the covered fraction of its S/m × S/m cell,
and ``postprocess_logits`` (bilinear m → S → original) is its inverse up to interpolation.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from ..checks import check_number
from ..engine.preprocess import Frame, frame_for, postprocess_logits
from ..models.clipsam import Prompts

MODES = ("manual", "text", "both")


def downsample_target(mask: np.ndarray | torch.Tensor, mask_size: int, frame: Frame | None = None) -> torch.Tensor:
    """A boolean mask → (m, m) float32 target in [0, 1] on the low-resolution logit grid.

    Parameters
    ----------
    mask : (H, W) bool (or 0/1) mask. With ``frame=None`` it is already in the model frame
        (H = W = S, the padded model input); with a ``frame`` it is at the original image size
        ``frame.original`` and is resized + padded exactly like the image
        (``engine.preprocess.to_model_input``).
    mask_size : m, the side of the low-resolution logits (``ClipSam.mask_size``).
    frame : where the image sits in the S × S model input, or None.
    """
    m = torch.as_tensor(np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask)
    if m.ndim != 2:
        raise ValueError(f"downsample_target expects a (H, W) mask, got shape {tuple(m.shape)}")
    m = m.to(torch.float32)[None, None]
    if frame is not None:
        if tuple(m.shape[2:]) != tuple(frame.original):
            raise ValueError(f"mask shape {tuple(m.shape[2:])} does not match the frame's image {frame.original}")
        if frame.resized != frame.original:
            m = _resize(m, frame.resized)
        full = torch.zeros(1, 1, frame.size, frame.size)
        full[..., : frame.resized[0], : frame.resized[1]] = m
        m = full
    elif m.shape[2] != m.shape[3]:
        raise ValueError(f"a mask in the model frame must be square (S, S), got {tuple(m.shape[2:])}: pass frame=")
    return _resize(m, (mask_size, mask_size))[0, 0].clamp_(0.0, 1.0)


def _resize(m: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Area average when shrinking (covered fraction), bilinear when growing."""
    if size[0] <= m.shape[2] and size[1] <= m.shape[3]:
        return F.interpolate(m, size=size, mode="area")
    return F.interpolate(m, size=size, mode="bilinear", align_corners=False)


def image_target(mask: np.ndarray, size: int, mask_size: int) -> torch.Tensor:
    """A (H, W) mask at original image size → (m, m) target, with the frame of a model input of side ``size``."""
    return downsample_target(mask, mask_size, frame_for(np.shape(mask), size))


@dataclass
class PromptSettings:
    """How prompts are simulated.

    max_points: manual clicks per prompt are 1..max_points; p_negative: chance that each extra
    click is a negative one just outside the object; p_box: chance that a manual prompt is a box
    instead of clicks; box_jitter: std of the box-corner noise as a fraction of the box side
    (SAM: 0.1, at most 20 px); correction_clicks: rounds of correction clicks (manual mode);
    instances_per_view: at most this many instances prompted per view and step; seed_depth: a
    text-mode seed click lies at least this fraction of the instance's greatest depth from its
    edge; seed_weight: loss weight of each seed click relative to the view's semantic map (0.25:
    with 4 seeds the clicks and the text-only map weigh the same, and the map stays text-specific).
    """

    max_points: int = 3
    p_negative: float = 0.3
    p_box: float = 0.3
    box_jitter: float = 0.1
    correction_clicks: int = 1
    instances_per_view: int = 4
    seed_depth: float = 0.3
    seed_weight: float = 0.25

    def to_dict(self) -> dict:
        return asdict(self)

    def check(self) -> None:
        """ValueError naming the first setting out of range."""
        check_number(self.max_points, "prompts.max_points", 1, integer=True)
        check_number(self.instances_per_view, "prompts.instances_per_view", 1, integer=True)
        check_number(self.correction_clicks, "prompts.correction_clicks", 0, integer=True)
        for name in ("p_negative", "p_box"):
            check_number(getattr(self, name), f"prompts.{name}", 0, 1)
        check_number(self.seed_depth, "prompts.seed_depth", 0, 1, high_open=True)
        for name in ("box_jitter", "seed_weight"):
            check_number(getattr(self, name), f"prompts.{name}", 0)


@dataclass
class PromptItem:
    """One simulated prompt of one encoded row and its target.

    kind: ``"semantic"`` (text only, decoded by the semantic path), ``"seed"``, ``"points"``,
    ``"box"`` or ``"correction"``; points (P, 2) input-frame (x, y) with labels (P,); box (4,)
    input frame; mask (1, m, m) mask-prompt logits; target (1, m, m) float; gt: (H, W) bool
    instance mask at image size (for correction clicks and validation).
    """

    row: int
    kind: str
    target: torch.Tensor
    gt: np.ndarray
    weight: float = 1.0
    points: np.ndarray | None = None
    labels: np.ndarray | None = None
    box: np.ndarray | None = None
    mask: torch.Tensor | None = None
    image_points: list = field(default_factory=list)  # (x, y, label) in image pixels, for corrections
    image_box: np.ndarray | None = None  # x0, y0, x1, y1 in image pixels

    def signature(self) -> tuple:
        return (0 if self.points is None else len(self.points), self.box is not None, self.mask is not None)


def group_prompts(items: list[PromptItem]) -> tuple[list[Prompts], list[int]]:
    """Group non-semantic items by prompt shape → (Prompts groups, order) where ``order[j]`` is the
    item index of the j-th decoded mask (``ClipSam.decode`` concatenates groups in order)."""
    groups: dict[tuple, list[int]] = {}
    for i, it in enumerate(items):
        groups.setdefault(it.signature(), []).append(i)
    out, order = [], []
    for (npts, has_box, has_mask), idx in groups.items():
        sel = [items[i] for i in idx]
        kw = {}
        if npts:
            kw["points"] = torch.from_numpy(np.stack([it.points for it in sel]).astype(np.float32))
            kw["labels"] = torch.from_numpy(np.stack([it.labels for it in sel]).astype(np.int64))
        if has_box:
            kw["boxes"] = torch.from_numpy(np.stack([it.box for it in sel]).astype(np.float32))
        if has_mask:
            kw["masks"] = torch.stack([it.mask for it in sel])
        out.append(Prompts(torch.tensor([it.row for it in sel]), **kw))
        order.extend(idx)
    return out, order


def _instances(labels: np.ndarray) -> list[int]:
    ids = np.unique(labels)
    return [int(i) for i in ids if i != 0]


def _pick(mask: np.ndarray, rng: np.random.Generator) -> tuple[float, float]:
    ys, xs = np.nonzero(mask)
    i = int(rng.integers(len(ys)))
    return float(xs[i]) + 0.5, float(ys[i]) + 0.5


def interior_point(mask: np.ndarray, rng: np.random.Generator | None = None,
                   depth: float = 0.5) -> tuple[float, float]:
    """An (x, y) pixel-centre point deep inside ``mask``: the distance-transform maximum, or with
    ``rng`` a random pixel at least ``depth`` × as deep."""
    dist = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    if rng is None:
        y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
        return float(x) + 0.5, float(y) + 0.5
    return _pick(dist >= max(1.0, depth * float(dist.max())), rng)


def _box_of(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)


def jitter_box(box: np.ndarray, shape: tuple[int, int], rng: np.random.Generator, frac: float) -> np.ndarray:
    """SAM-style box noise: each corner moves by N(0, frac × side), at most 20 px, clipped to the image."""
    w, h = box[2] - box[0], box[3] - box[1]
    std = np.minimum(frac * np.array([w, h, w, h], np.float32), 20.0)
    out = box + rng.normal(0, 1, 4).astype(np.float32) * std
    out = np.clip(out, 0, [shape[1], shape[0], shape[1], shape[0]]).astype(np.float32)
    if out[2] <= out[0] + 1 or out[3] <= out[1] + 1:
        return box.copy()
    return out


def _item(row: int, kind: str, gt: np.ndarray, frame: Frame, m: int, weight: float,
          image_points: list | None = None, box: np.ndarray | None = None, mask: torch.Tensor | None = None) -> PromptItem:
    it = PromptItem(row=row, kind=kind, target=downsample_target(gt, m, frame)[None], gt=gt, weight=weight, mask=mask)
    if image_points:
        xy = np.array([(x, y) for x, y, _ in image_points], np.float32)
        it.points = frame.to_input(xy)
        it.labels = np.array([lab for _, _, lab in image_points], np.int64)
        it.image_points = list(image_points)
    if box is not None:
        it.box = frame.to_input(box.reshape(2, 2)).reshape(4)
        it.image_box = box
    return it


def manual_prompts(row: int, labels: np.ndarray, frame: Frame, mask_size: int, rng: np.random.Generator,
                   settings: PromptSettings, weight: float = 1.0) -> list[PromptItem]:
    """Clicks or a jittered box on up to ``instances_per_view`` random instances of ``labels``."""
    ids = _instances(labels)
    if not ids:
        return []
    chosen = rng.permutation(ids)[: settings.instances_per_view]
    items = []
    for k in chosen:
        gt = labels == k
        if rng.random() < settings.p_box:
            box = jitter_box(_box_of(gt), labels.shape, rng, settings.box_jitter)
            items.append(_item(row, "box", gt, frame, mask_size, weight, box=box))
            continue
        n = int(rng.integers(1, settings.max_points + 1))
        pts = [(*_pick(gt, rng), 1)]
        ring = ndimage.binary_dilation(gt, iterations=int(rng.integers(2, 8))) & (labels != k)
        for _ in range(n - 1):
            if ring.any() and rng.random() < settings.p_negative:
                pts.append((*_pick(ring, rng), 0))
            else:
                pts.append((*_pick(gt, rng), 1))
        items.append(_item(row, "points", gt, frame, mask_size, weight, image_points=pts))
    return items


def text_prompts(row: int, labels: np.ndarray, frame: Frame, mask_size: int, rng: np.random.Generator,
                 settings: PromptSettings, weight: float = 1.0) -> list[PromptItem]:
    """The semantic (union) target of the row, then a seed click on each of up to
    ``instances_per_view`` instances (a random pixel at least ``seed_depth`` × as deep as its
    deepest, as ``segment_text``'s seeds land)."""
    union = labels != 0
    items = [_item(row, "semantic", union, frame, mask_size, weight)]
    for k in rng.permutation(_instances(labels))[: settings.instances_per_view]:
        gt = labels == k
        x, y = interior_point(gt, rng, settings.seed_depth)
        items.append(_item(row, "seed", gt, frame, mask_size, weight * settings.seed_weight, image_points=[(x, y, 1)]))
    return items


def simulate(mode: str, row: int, labels: np.ndarray, frame: Frame, mask_size: int, rng: np.random.Generator,
             settings: PromptSettings, weight: float = 1.0) -> list[PromptItem]:
    """Prompt items of one view in ``mode`` (``manual`` / ``text`` / ``both``)."""
    if mode not in MODES:
        raise ValueError(f"unknown fine-tuning mode {mode!r}; choose one of {MODES}")
    if mode == "both":
        mode = "manual" if rng.random() < 0.5 else "text"
    fn = manual_prompts if mode == "manual" else text_prompts
    items = fn(row, labels, frame, mask_size, rng, settings, weight)
    if not items:  # an empty view in manual mode: teach "nothing here" through the text path
        items = text_prompts(row, labels, frame, mask_size, rng, settings, weight)
    return items


def correction_prompts(items: list[PromptItem], logits: torch.Tensor, frames: dict[int, Frame], mask_size: int,
                       rng: np.random.Generator) -> list[PromptItem]:
    """One correction click per item, from the error region of its predicted mask.

    ``logits`` (N, 1, m, m) are the predictions of ``items`` in order. The click goes deep into
    a random error pixel's region (positive where the object was missed, negative where too
    much was taken), added to the item's previous clicks (a box keeps its box). Items without
    error are dropped.
    """
    out = []
    for it, lg in zip(items, logits.detach()):
        frame = frames[it.row]
        pred = (postprocess_logits(lg[None], frame)[0, 0] > 0).cpu().numpy()
        err = pred ^ it.gt
        if not err.any():
            continue
        comp, n = ndimage.label(err)
        sizes = ndimage.sum_labels(np.ones_like(comp), comp, index=np.arange(1, n + 1))
        pick = int(rng.choice(n, p=sizes / sizes.sum())) + 1  # larger error regions more likely
        x, y = interior_point(comp == pick, rng)
        label = int(it.gt[int(y), int(x)])
        box = it.image_box
        pts = list(it.image_points) + [(x, y, label)]
        new = _item(it.row, "correction", it.gt, frame, mask_size, it.weight, image_points=pts, box=box)
        new.target = it.target
        out.append(new)
    return out


__all__ = ["MODES", "PromptItem", "PromptSettings", "correction_prompts", "downsample_target", "group_prompts",
           "image_target", "interior_point", "jitter_box", "manual_prompts", "simulate", "text_prompts"]
