"""Training losses and targets: SAM's focal + dice + IoU-MSE recipe on low-res logits."""

import numpy as np
import pytest
import torch

from napari_clipsam.engine.preprocess import frame_for, postprocess_logits
from napari_clipsam.training.losses import LossWeights, dice_loss, focal_loss, mask_iou, mask_loss
from napari_clipsam.training.prompts import downsample_target, image_target


def _disk(h, w, cy, cx, r):
    yy, xx = np.mgrid[:h, :w]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def test_perfect_prediction_has_low_loss_and_iou_one():
    t = torch.from_numpy(_disk(16, 16, 8, 8, 4)).float()[None, None]
    good = (t * 2 - 1) * 20
    bad = -good
    lg, pg = mask_loss(good, t, torch.ones(1, 1))
    lb, pb = mask_loss(bad, t, torch.ones(1, 1))
    assert pg["iou"] == 1.0 and pb["iou"] == 0.0
    assert lg < 0.01 and lb > 1.0
    assert pb["iou_mse"] == pytest.approx(1.0)
    assert set(pg) == {"focal", "dice", "iou_mse", "iou", "total"}


def test_loss_gradients_flow_and_weights_apply():
    t = torch.from_numpy(_disk(16, 16, 8, 8, 4)).float()[None, None].repeat(2, 1, 1, 1)
    logits = torch.zeros(2, 1, 16, 16, requires_grad=True)
    iou = torch.zeros(2, 1, requires_grad=True)
    total, parts = mask_loss(logits, t, iou, LossWeights(focal=0.0, dice=1.0, iou=0.0))
    assert total.item() == pytest.approx(parts["dice"], rel=1e-5)
    total.backward()
    assert logits.grad.abs().sum() > 0
    # sample weights: a zero-weighted sample does not contribute
    logits2 = torch.cat([(t[:1] * 2 - 1) * 20, -(t[1:] * 2 - 1) * 20])
    _, p = mask_loss(logits2, t, None, sample_weights=torch.tensor([1.0, 0.0]))
    assert p["iou"] == 1.0
    with pytest.raises(ValueError, match="differ in shape"):
        mask_loss(torch.zeros(1, 1, 8, 8), t)


def test_focal_dice_iou_shapes():
    t = (torch.rand(3, 1, 8, 8) > 0.5).float()
    lg = torch.randn(3, 1, 8, 8)
    assert focal_loss(lg, t).shape == (3, 1)
    assert dice_loss(lg, t).shape == (3, 1)
    assert mask_iou(lg, t).shape == (3, 1)
    assert mask_iou(torch.full((1, 1, 4, 4), -5.0), torch.zeros(1, 1, 4, 4)).item() == 1.0


def test_downsample_target_matches_model_frame():
    # a non-square image: 48 x 64 → resized 48 x 64 in a 64 frame (no scale), padded rows 48..63
    mask = np.zeros((48, 64), bool)
    mask[8:24, 16:48] = True
    tgt = image_target(mask, 64, 16)
    assert tgt.shape == (16, 16) and tgt.dtype == torch.float32
    # cells fully inside are 1, fully outside 0; padded area is 0
    assert tgt[2:6, 4:12].min() == 1.0 and tgt[12:].max() == 0.0
    # the target, read back as logits through postprocess, recovers the mask
    frame = frame_for(mask.shape, 64)
    back = postprocess_logits(((tgt - 0.5) * 10)[None, None], frame)[0, 0] > 0
    inter = (back.numpy() & mask).sum()
    assert inter / (back.numpy() | mask).sum() > 0.9
    # model-frame masks (square) need no frame
    sq = np.zeros((64, 64), bool)
    sq[:32] = True
    t2 = downsample_target(sq, 16)
    assert t2[:8].min() == 1.0 and t2[8:].max() == 0.0
    with pytest.raises(ValueError, match="square"):
        downsample_target(mask, 16)
    # large image: 128 x 128 → 64 frame
    big = np.zeros((128, 128), bool)
    big[:64, :64] = True
    t3 = image_target(big, 64, 16)
    assert t3[:8, :8].min() == 1.0 and t3[8:, :].max() == 0.0
