"""Targets and prompt simulation for training (train the way you will infer).

Targets live on the model's low-resolution mask grid (m × m, m = 4 × embedding grid), the grid
of ``ClipSam.decode``'s logits. :func:`downsample_target` maps a mask the same way
``engine.preprocess`` maps images: longest side resized to S, zero-padded bottom/right, then
averaged down to m × m — so a target pixel is the covered fraction of its S/m × S/m cell,
and ``postprocess_logits`` (bilinear m → S → original) is its inverse up to interpolation.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..engine.preprocess import Frame, frame_for


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


__all__ = ["downsample_target", "image_target"]
