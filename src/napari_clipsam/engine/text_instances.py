"""Text → instances in one model view: the text's semantic map is thresholded into regions, the
regions become prompts, and their decoded masks are kept by consensus and by the map's support.

:meth:`Segmenter.segment_text <napari_clipsam.engine.segmenter.Segmenter.segment_text>` runs
:func:`view_instances` on each view (the image, or its tiles) and :func:`to_labels` on the
stitched result; fine-tuning's validation runs both on its held-out views (:func:`view_labels`),
so the instance F1 it tracks is that of the semi-automatic mode itself.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..models.clipsam import ClipSam, Encoded, Prompts
from ..models.conditioning import grid_seeds, pseudo_prompts
from ..models.decoding import OUTSIDE
from ..models.fast import fast_inference, inference_autocast
from .instances import (MIN_AREA, MIN_SCORE, MIN_SUPPORT, NMS_IOU, REGION_MARGIN, TEXT_THRESHOLD, Instances,
                        consensus_nms, mask_nms, paint_labels)
from .preprocess import Frame, fraction_to_logits, postprocess_logits

DECODE_CHUNK = 32  # prompts per decode call at most, and masks per postprocessing step
#: Image-token elements (prompts × h·w × channels) per decode call: beyond several million the
#: per-prompt cost grows, so large models decode few prompts at a time. ``segment_text`` with
#: 1377 grid seeds at vit_b 1024² (ssp, 15 tokens a prompt), bf16, 2 threads, at 2 / 4 / 8 / 16
#: prompts a call: 14.6-15.6 / 12.2-13.5 / 11.6-12.8 / 14.2-15.3 s (2-5 runs each).
DECODE_ELEMENTS = 1 << 23
#: Bytes of a decode call's image tokens (prompts × h·w × channels, in the image side's dtype) at
#: most: under the largest block glibc's heap serves (32 MB with the fast path's allocator
#: settings, ``fast.MALLOC_SETTINGS``), so each call's image-sized temporaries reuse heap memory
#: instead of being mapped and faulted in afresh. Binds in fp32 only: vit_b's 8 prompts a call
#: are 16 MiB in bf16 but 32 MiB in fp32. vit_b 1024² fp32, 1377 grid seeds, 2 threads (Intel Xeon
#: without AMX), one process, alternating rounds: 8 / 6 / 4 prompts a call 21.6-24.2 / 18.8-22.1 /
#: 20.5-29.6 s (another pair: 8 / 6 21.9-27.1 / 21.0-24.8 s); minor page faults per run 1.56 M at 8,
#: 0.15 M at 7, 6 or 4 prompts; image-side layer norms 4.1 → 1.4 s a run.
DECODE_BYTES = 24 << 20
_CONSENSUS_GRID = 128


def grow(masks: np.ndarray, margin: float) -> np.ndarray:
    """(N, h, w) boolean regions, each dilated by ``margin`` × its equivalent diameter (>= 2 px)."""
    from scipy import ndimage

    out = np.empty_like(masks)
    for i, m in enumerate(masks):
        r = max(2, int(round(margin * 2 * np.sqrt(m.sum() / np.pi))))
        out[i] = ndimage.binary_dilation(m, ndimage.generate_binary_structure(2, 1), iterations=r)
    return out


def bounding_windows(masks: torch.Tensor) -> torch.Tensor:
    """(N, h, w) boolean masks → (N, 4) int64 boxes (y0, x0, y1, x1), end exclusive (an empty
    mask gets the whole grid)."""
    n, h, w = masks.shape
    rows, cols = masks.any(2), masks.any(1)
    y0, x0 = rows.int().argmax(1), cols.int().argmax(1)
    y1, x1 = h - rows.flip(1).int().argmax(1), w - cols.flip(1).int().argmax(1)
    empty = ~rows.any(1)
    boxes = torch.stack([y0, x0, y1, x1], 1).long()
    boxes[empty] = torch.tensor([0, 0, h, w])
    return boxes


def decode_chunk(elements: int, dtype: torch.dtype) -> int:
    """Prompts a decode call, for ``elements`` image-token elements a prompt (h·w × channels) in
    the image side's ``dtype``: at most ``DECODE_CHUNK``, ``DECODE_ELEMENTS`` and ``DECODE_BYTES``."""
    if elements < 1:
        raise ValueError(f"a prompt's image tokens must have at least one element, got {elements}")
    return max(1, min(DECODE_CHUNK, DECODE_ELEMENTS // elements, DECODE_BYTES // (elements * dtype.itemsize)))


def view_instances(model: ClipSam, enc: Encoded, frame: Frame, threshold: float = TEXT_THRESHOLD,
                   min_area: int = MIN_AREA, region_margin: float = REGION_MARGIN, seeds: str = "grid",
                   nms_iou: float = NMS_IOU, min_support: float = MIN_SUPPORT, offset: tuple[int, int] = (0, 0),
                   source: int = 0, report: Callable[[int, int, str], None] | None = None
                   ) -> tuple[Instances, np.ndarray]:
    """Instances of one text-conditioned view (``enc`` holds one image and one text) and its
    (h, w) probability map at image resolution. Instances are shifted by ``offset`` (dy, dx) and
    tagged ``source``; ``report`` gets (prompts decoded, prompts, "segment_text") after each
    decode chunk. The parameters are those of ``Segmenter.segment_text``."""
    s, m = model.img_size, model.mask_size
    with fast_inference(model):
        sem = model.semantic_logits(enc)
        prob = torch.sigmoid(postprocess_logits(sem, frame))[0, 0].float().cpu().numpy()
    low = torch.sigmoid(sem)[0, 0].float().cpu().numpy()
    vh, vw = math.ceil(frame.resized[0] * m / s), math.ceil(frame.resized[1] * m / s)
    low[vh:], low[:, vw:] = 0.0, 0.0  # padding is not image
    cell_area = (s / m / frame.scale) ** 2  # image pixels per low-res cell
    min_cells = max(1, int(min_area / cell_area))
    r = s / m
    if seeds == "grid":
        gs = grid_seeds(low, threshold=threshold, min_area=min_cells)
        if not len(gs):
            return Instances(), prob
        n = len(gs)
        prompts = Prompts(torch.zeros(n), points=torch.from_numpy(gs.points * r - 0.5)[:, None],
                          labels=torch.ones(n, 1))
        ids = np.unique(gs.region)
        grown = grow(gs.regions[None] == ids[:, None, None], region_margin)
        near = torch.from_numpy(grown[np.searchsorted(ids, gs.region)])[:, None]
    else:
        pp = pseudo_prompts(low, threshold=threshold, min_area=min_cells)
        if not len(pp):
            return Instances(), prob
        # Each region's point is decoded with the whole connected area around it as mask
        # prompt: the decoder finds the object at the point, so an over-split region gives
        # duplicates that NMS removes, not fragments.
        n = len(pp)
        region = torch.from_numpy(pp.areas[:, None].astype(np.float32))
        prompts = Prompts(torch.zeros(n), points=torch.from_numpy(pp.points * r - 0.5)[:, None],
                          labels=torch.ones(n, 1), masks=fraction_to_logits(region))
        near = torch.from_numpy(grow(pp.areas, region_margin))[:, None]
    # Each instance stays near its area: a decoder that wanders onto other objects of the same
    # concept would otherwise return their union for every prompt. So only the masks' parts
    # near their regions are upscaled (the mask head's cost), and the rest is cleared.
    windows = bounding_windows(near[:, 0])
    emb = enc.embeddings
    side_dtype = inference_autocast(model) or torch.float32  # the decoder's image side (ClipSam.decode)
    chunk = decode_chunk(emb.shape[1] * emb.shape[2] * emb.shape[3], side_dtype)
    f = max(1, m // _CONSENSUS_GRID)  # grid seeds vote on at most 128² cells (memory: N × cells)
    low_masks = torch.empty(n, 1, m, m, device=emb.device)  # filled chunk by chunk (no concatenation)
    iou = torch.empty(n, device=emb.device)
    votes_on = torch.empty(n, m // f, m // f, dtype=torch.bool) if seeds == "grid" else None
    for c in range(0, n, chunk):
        with fast_inference(model):
            lm, sc = model.decode(enc, prompts[c : c + chunk], windows=windows[c : c + chunk])
            lm = low_masks[c : c + chunk] = lm.masked_fill(~near[c : c + chunk].to(lm.device), OUTSIDE)
            iou[c : c + chunk] = sc[:, 0].clamp(0, 1)
        if votes_on is not None:
            on = lm[:, 0] > 0
            votes_on[c : c + chunk] = (F.avg_pool2d(on.float(), f) > 0.5 if f > 1 else on).cpu()
        if report:
            report(min(n, c + chunk), n, "segment_text")
    rank = iou.float().cpu().numpy().astype(np.float64)
    if votes_on is not None:  # the masks most seeds agree on, ranked by those votes
        keep, votes = consensus_nms(votes_on.numpy(), rank, nms_iou=nms_iou)
        rank = (votes + rank)[keep]
        keep = torch.from_numpy(keep).to(low_masks.device)
        low_masks, iou = low_masks[keep], iou[keep]
    # The map must back each mask: a seed on a faint spot may be decoded onto another kind.
    inside = (low_masks[:, 0] > 0).flatten(1).float()
    support = inside @ torch.from_numpy(low).to(inside).reshape(-1) / inside.sum(1).clamp(min=1)
    backed = support >= min_support
    low_masks, iou, rank = low_masks[backed], iou[backed], rank[backed.cpu().numpy()]
    out = []
    for c in range(0, len(iou), DECODE_CHUNK):
        with fast_inference(model):
            masks = postprocess_logits(low_masks[c : c + DECODE_CHUNK], frame)[:, 0] > 0
        out.append(Instances.from_dense(masks.cpu().numpy(), iou[c : c + DECODE_CHUNK].float().cpu().numpy(),
                                        offset=offset, source=source, rank=rank[c : c + DECODE_CHUNK]))
    return Instances.cat(out), prob


def to_labels(inst: Instances, shape: tuple[int, int], min_area: int = MIN_AREA, min_score: float = MIN_SCORE,
              nms_iou: float = NMS_IOU) -> tuple[np.ndarray, dict[int, float]]:
    """Instances → (H, W) uint32 labels and {id: score}: masks under ``min_area`` pixels or
    ``min_score`` predicted IoU dropped, overlaps above ``nms_iou`` suppressed, then painted."""
    inst = inst.filter((inst.areas >= min_area) & (inst.scores >= min_score))
    return paint_labels(mask_nms(inst, nms_iou), shape, min_area)


def view_labels(model: ClipSam, enc: Encoded, frame: Frame) -> np.ndarray:
    """``segment_text``'s instance labels (default settings) of one untiled view."""
    inst, _ = view_instances(model, enc, frame)
    return to_labels(inst, frame.original)[0]


__all__ = ["DECODE_BYTES", "DECODE_CHUNK", "DECODE_ELEMENTS", "decode_chunk", "bounding_windows", "grow", "to_labels", "view_instances", "view_labels"]
