"""Images in, model frames out: normalisation, resize + pad to the model input, and back.

The model sees (3, S, S) float RGB in [0, 1]: the image's longest side resized to S (as
segment-anything's ``ResizeLongestSide``), zero-padded bottom/right. Masks come back at the
original image size through :func:`postprocess_logits`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F


def _channels_last(image: np.ndarray, channel_axis: int | None, channels: Sequence[int] | None) -> np.ndarray:
    """Validate a 2D image and bring it to (H, W, C) float with the chosen channels: float32, or
    float64 for 32/64-bit integers and float64 (float32 would drop their low bits or overflow)."""
    arr = np.asarray(image)
    if arr.size == 0:
        raise ValueError(f"image is empty (shape {arr.shape})")
    if arr.dtype == bool:
        arr = arr.astype(np.float32)
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ValueError(f"image dtype {arr.dtype} is not numeric")
    if channel_axis is not None:
        if arr.ndim != 3:
            raise ValueError(f"channel_axis={channel_axis} needs a 3D array (Y, X, C), got shape {arr.shape}")
        arr = np.moveaxis(arr, channel_axis, -1)
    elif arr.ndim == 3 and arr.shape[-1] in (3, 4):
        arr = arr[..., :3]
    elif arr.ndim != 2:
        raise ValueError(
            f"expected a 2D image (Y, X) or RGB (Y, X, 3), got shape {arr.shape}: pass channel_axis= for "
            "multichannel data, or use segment_volume for (Z, Y, X) volumes"
        )
    if arr.ndim == 2:
        arr = arr[..., None]
    if min(arr.shape[:2]) < 2:
        raise ValueError(f"image is too small: {arr.shape[:2]}")
    wide = arr.dtype.itemsize >= 8 or (np.issubdtype(arr.dtype, np.integer) and arr.dtype.itemsize == 4)
    arr = arr.astype(np.float64 if wide else np.float32)
    if channels is not None:
        channels = list(channels)
        if not 1 <= len(channels) <= 3 or any(not 0 <= c < arr.shape[-1] for c in channels):
            raise ValueError(f"channels={channels}: choose 1 to 3 of the {arr.shape[-1]} channels (0-based)")
        arr = arr[..., channels]
    return arr


def channel_limits(arr: np.ndarray, percentiles: tuple[float, float] = (1.0, 99.8),
                   max_samples: int = 1 << 22) -> np.ndarray:
    """Per-channel (lo, hi) intensity limits of a channels-last array (..., C) → (C, 2).

    Percentiles over the finite values (at most ``max_samples`` of them, evenly strided); when
    they coincide, the min/max; NaN limits for a channel without finite values.
    """
    flat = arr.reshape(-1, arr.shape[-1])
    flat = flat[:: max(1, len(flat) // max_samples)]
    out = np.full((arr.shape[-1], 2), np.nan, np.float64)
    for c in range(arr.shape[-1]):
        finite = flat[:, c][np.isfinite(flat[:, c])]
        if finite.size == 0:
            continue
        lo, hi = np.percentile(finite, percentiles)
        if hi <= lo:
            lo, hi = finite.min(), finite.max()
        out[c] = lo, hi
    return out


def normalize_image(
    image: np.ndarray,
    channel_axis: int | None = None,
    channels: Sequence[int] | None = None,
    percentiles: tuple[float, float] = (1.0, 99.8),
    limits: np.ndarray | None = None,
) -> np.ndarray:
    """Any 2D microscopy image → (H, W, 3) float32 in [0, 1].

    Accepts (H, W) grayscale of any integer/float dtype, (H, W, 3|4) RGB(A), or multichannel
    with ``channel_axis`` given: ``channels`` picks up to 3 channels shown as R, G, B (one: as
    gray); without it all channels are merged into gray (maximum over percentile-normalised
    channels), whatever their number. Intensities are
    percentile-normalised per channel, or with fixed per-channel ``limits`` (C, 2) (e.g. computed
    once for a whole volume by :func:`channel_limits`). A constant image gives zeros (allowed),
    and so does an all-NaN one with ``limits`` (e.g. a volume's padding plane); an empty image,
    or an all-NaN one without ``limits``, raises ``ValueError``.
    """
    arr = _channels_last(image, channel_axis, channels)
    if limits is None:
        if np.isnan(arr).all():
            raise ValueError("image is all NaN")
        limits = channel_limits(arr, percentiles)
    limits = np.asarray(limits, np.float64).reshape(-1, 2)
    if len(limits) != arr.shape[-1]:
        raise ValueError(f"limits has {len(limits)} rows for {arr.shape[-1]} channels")
    out = np.zeros(arr.shape, np.float32)
    for c, (lo, hi) in enumerate(limits):
        if not (np.isfinite(lo) and np.isfinite(hi)) or hi <= lo:
            continue
        out[..., c] = np.clip((np.nan_to_num(arr[..., c], nan=lo) - lo) / (hi - lo), 0.0, 1.0)
    if (channel_axis is not None and channels is None) or out.shape[-1] > 3:  # merged, as documented
        out = out.max(-1, keepdims=True)
    if out.shape[-1] == 1:
        out = np.repeat(out, 3, axis=-1)
    elif out.shape[-1] == 2:
        out = np.concatenate([out, np.zeros_like(out[..., :1])], axis=-1)
    return out


@dataclass
class Frame:
    """Where an image sits in the model's S×S input: scale factor and resized (h, w)."""

    original: tuple[int, int]
    resized: tuple[int, int]
    size: int

    @property
    def scale(self) -> float:
        return self.resized[0] / self.original[0]

    def to_input(self, xy: np.ndarray) -> np.ndarray:
        """(…, 2) image (x, y) pixel coordinates → model input coordinates."""
        sx = self.resized[1] / self.original[1]
        sy = self.resized[0] / self.original[0]
        xy = np.asarray(xy, dtype=np.float32)
        return xy * np.array([sx, sy], dtype=np.float32)


def frame_for(shape: tuple[int, int], size: int) -> Frame:
    """The frame of a (H, W) image in an S×S model input (longest side → S)."""
    h, w = int(shape[0]), int(shape[1])
    scale = size / max(h, w)
    return Frame((h, w), (max(1, int(round(h * scale))), max(1, int(round(w * scale)))), size)


#: SAM's pixel mean in [0, 1]: the padding of a non-square input (what SAM's zero padding after
#: its pixel normalisation is; black padding reads as an edge, and objects were found along it).
PAD_FILL: tuple[float, float, float] = (123.675 / 255, 116.28 / 255, 103.53 / 255)


def to_model_input(image01: np.ndarray, size: int, fill: Sequence[float] = PAD_FILL) -> tuple[torch.Tensor, Frame]:
    """(H, W, 3) [0, 1] → ((3, S, S) tensor, frame): resized, padded bottom/right with ``fill``
    (per channel; the model's pixel mean, ``ClipSam.pad_fill``, so that padding is neutral)."""
    frame = frame_for(image01.shape[:2], size)
    t = torch.from_numpy(np.ascontiguousarray(image01, dtype=np.float32)).permute(2, 0, 1)[None]
    if frame.resized != frame.original:
        t = F.interpolate(t, size=frame.resized, mode="bilinear", align_corners=False,
                          antialias=frame.resized[0] < frame.original[0])
    out = torch.tensor(fill, dtype=torch.float32).view(1, 3, 1, 1).repeat(1, 1, size, size)
    out[..., : frame.resized[0], : frame.resized[1]] = t
    return out[0], frame


def postprocess_logits(low_res: torch.Tensor, frame: Frame) -> torch.Tensor:
    """Low-res logits (N, M, m, m) → logits at the original image size (N, M, H, W)."""
    x = F.interpolate(low_res.float(), size=(frame.size, frame.size), mode="bilinear", align_corners=False)
    x = x[..., : frame.resized[0], : frame.resized[1]]
    if frame.resized != frame.original:
        x = F.interpolate(x, size=frame.original, mode="bilinear", align_corners=False)
    return x


#: Logit magnitude of a mask prompt: a cell fully inside gets +8, fully outside -8.
MASK_PROMPT_STRENGTH = 8.0


def fraction_to_logits(fraction, strength: float = MASK_PROMPT_STRENGTH):
    """Mask-prompt logits of cells covering ``fraction`` (array or tensor in [0, 1]) of an object:
    ``(2·fraction − 1) × strength``. The one encoding of mask prompts (engine and training)."""
    return (fraction * 2 - 1) * strength


def mask_to_prompt(mask: np.ndarray, frame: Frame, mask_size: int, strength: float = MASK_PROMPT_STRENGTH) -> torch.Tensor:
    """A boolean (H, W) image mask → (1, 1, m, m) mask-prompt logits in the model frame."""
    m = torch.from_numpy(np.asarray(mask, dtype=np.float32))[None, None]
    m = F.interpolate(m, size=frame.resized, mode="bilinear", align_corners=False)
    full = torch.zeros(1, 1, frame.size, frame.size)
    full[..., : frame.resized[0], : frame.resized[1]] = m
    low = F.interpolate(full, size=(mask_size, mask_size), mode="bilinear", align_corners=False)
    return fraction_to_logits(low, strength)
