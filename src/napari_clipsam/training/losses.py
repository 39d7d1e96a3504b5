"""Training losses: focal + dice on mask logits, MSE of the IoU head (segment-anything's recipe).

SAM supervises masks with a 20:1 combination of focal and dice loss and regresses the IoU head
onto the IoU of the predicted mask with the target. We keep that recipe with configurable
weights (:class:`LossWeights`). Everything works on the model's low-resolution logits
(N, 1, m, m) against float targets (N, 1, m, m) in [0, 1] made by
:func:`napari_clipsam.training.prompts.downsample_target`, so no upsampling is needed while training.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from ..checks import check_number


@dataclass
class LossWeights:
    """Weights of the loss terms (SAM: focal 20, dice 1, IoU MSE 1).

    focal_alpha: weight of positives in the focal loss (``None`` or < 0: no class balancing,
    as SAM); focal_gamma: focusing exponent.
    """

    focal: float = 20.0
    dice: float = 1.0
    iou: float = 1.0
    focal_alpha: float | None = 0.25
    focal_gamma: float = 2.0

    def to_dict(self) -> dict:
        return asdict(self)

    def check(self) -> None:
        """ValueError naming the first weight out of range (all ≥ 0, not all 0)."""
        for name in ("focal", "dice", "iou", "focal_gamma"):
            check_number(getattr(self, name), f"loss.{name}", 0)
        if self.focal_alpha is not None:
            check_number(self.focal_alpha, "loss.focal_alpha", high=1)
        if self.focal == self.dice == self.iou == 0:
            raise ValueError("loss.focal, loss.dice and loss.iou are all 0: nothing would be learned")


def _check(logits: torch.Tensor, targets: torch.Tensor) -> None:
    if logits.shape != targets.shape:
        raise ValueError(f"mask logits {tuple(logits.shape)} and targets {tuple(targets.shape)} differ in shape")
    if logits.ndim != 4:
        raise ValueError(f"mask logits must be (N, M, m, m), got {tuple(logits.shape)}")


def focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float | None = 0.25,
               gamma: float = 2.0) -> torch.Tensor:
    """Sigmoid focal loss per mask → (N, M), mean over pixels.

    ``targets`` may be soft (float in [0, 1], e.g. area-downsampled masks).
    """
    _check(logits, targets)
    logits = logits.float()
    targets = targets.float()
    prob = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha is not None and alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss.flatten(2).mean(-1)


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Soft dice loss per mask → (N, M): ``1 - (2·|P∩T| + eps) / (|P| + |T| + eps)``."""
    _check(logits, targets)
    prob = torch.sigmoid(logits.float()).flatten(2)
    t = targets.float().flatten(2)
    inter = (prob * t).sum(-1)
    return 1 - (2 * inter + eps) / (prob.sum(-1) + t.sum(-1) + eps)


def mask_iou(logits: torch.Tensor, targets: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    """IoU of the binarised prediction (logits > threshold) with the binarised target (> 0.5) → (N, M).

    Two empty masks count as IoU 1.
    """
    _check(logits, targets)
    pred = (logits > threshold).flatten(2)
    t = (targets > 0.5).flatten(2)
    inter = (pred & t).sum(-1).float()
    union = (pred | t).sum(-1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def mask_loss(logits: torch.Tensor, targets: torch.Tensor, iou_pred: torch.Tensor | None = None,
              weights: LossWeights | None = None,
              sample_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """SAM's loss for N predicted masks.

    Parameters
    ----------
    logits : (N, 1, m, m) low-resolution mask logits (``ClipSam.decode`` output).
    targets : (N, 1, m, m) float targets in [0, 1].
    iou_pred : (N, 1) IoU-head predictions, or None to skip the IoU term.
    weights : loss weights (default :class:`LossWeights`).
    sample_weights : (N,) non-negative per-mask weights (e.g. empty slices down-weighted); the
        loss is their weighted mean.

    Returns
    -------
    (total, parts): a scalar tensor to backpropagate and a dict of floats
    ``{"focal", "dice", "iou_mse", "iou", "total"}`` (``iou`` = mean actual IoU, for logging).
    """
    w = weights or LossWeights()
    n = logits.shape[0]
    if n == 0:
        raise ValueError("mask_loss got no masks (N = 0)")
    focal = focal_loss(logits, targets, w.focal_alpha, w.focal_gamma).mean(1)
    dice = dice_loss(logits, targets).mean(1)
    actual = mask_iou(logits.detach(), targets).mean(1)
    if sample_weights is None:
        sw = torch.full((n,), 1.0 / n, device=logits.device)
    else:
        sw = torch.as_tensor(sample_weights, dtype=torch.float32, device=logits.device).reshape(-1)
        if sw.shape[0] != n or bool((sw < 0).any()) or not bool(torch.isfinite(sw).all()):
            raise ValueError(f"sample_weights must be ({n},) finite and non-negative, got {sw.tolist()[:8]}")
        sw = sw / sw.sum().clamp(min=1e-8)
    total = w.focal * (sw * focal).sum() + w.dice * (sw * dice).sum()
    iou_mse = torch.zeros((), device=logits.device)
    if iou_pred is not None:
        if iou_pred.shape[0] != n:
            raise ValueError(f"iou_pred must have N={n} rows, got {tuple(iou_pred.shape)}")
        iou_mse = (sw * ((iou_pred.float().reshape(n, -1) - actual[:, None]) ** 2).mean(1)).sum()
        total = total + w.iou * iou_mse
    parts = {
        "focal": float((sw * focal).sum().detach()),
        "dice": float((sw * dice).sum().detach()),
        "iou_mse": float(iou_mse.detach()),
        "iou": float((sw * actual).sum()),
        "total": float(total.detach()),
    }
    return total, parts


__all__ = ["LossWeights", "dice_loss", "focal_loss", "mask_iou", "mask_loss"]
