import numpy as np
import pytest
import torch

from napari_clipsam.engine.preprocess import (PAD_FILL, frame_for, mask_to_prompt, normalize_image, postprocess_logits,
                                              to_model_input)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int32, np.float32, np.float64])
def test_normalize_dtypes(dtype):
    rng = np.random.default_rng(0)
    img = (rng.random((30, 40)) * 200).astype(dtype)
    out = normalize_image(img)
    assert out.shape == (30, 40, 3) and out.dtype == np.float32
    assert out.min() >= 0 and out.max() <= 1 and out.max() > 0.9
    assert np.array_equal(out[..., 0], out[..., 1])


def test_normalize_rgb_multichannel_and_errors():
    rgb = np.random.default_rng(0).integers(0, 255, (20, 20, 3), dtype=np.uint8)
    assert normalize_image(rgb).shape == (20, 20, 3)
    multi = np.random.default_rng(1).random((5, 20, 20))
    merged = normalize_image(multi, channel_axis=0)
    picked = normalize_image(multi, channel_axis=0, channels=[2])
    assert merged.shape == picked.shape == (20, 20, 3)
    np.testing.assert_allclose(picked[..., 0], normalize_image(multi[2])[..., 0])
    two = multi[:2] * np.array([1.0, 50.0])[:, None, None]  # two channels, not an R-G picture
    gray = normalize_image(two, channel_axis=0)
    each = [normalize_image(c)[..., 0] for c in two]
    np.testing.assert_allclose(gray, np.repeat(np.maximum(*each)[..., None], 3, axis=-1))
    rg = normalize_image(two, channel_axis=0, channels=[0, 1])  # picked: shown as R, G
    np.testing.assert_allclose(rg[..., :2], np.stack(each, -1))
    assert not rg[..., 2].any()
    assert np.all(normalize_image(np.full((8, 8), 7.0)) == 0)
    for bad, msg in [(np.zeros((0, 4)), "empty"), (np.full((4, 4), np.nan), "NaN"),
                     (np.zeros((2, 4, 4, 4)), "2D image"), (np.zeros((5, 8, 8)), "channel_axis")]:
        with pytest.raises(ValueError, match=msg):
            normalize_image(bad)
    with pytest.raises(ValueError, match="channels"):
        normalize_image(multi, channel_axis=0, channels=[7])


def test_frame_roundtrip():
    img = np.zeros((50, 100, 3), np.float32)
    img[10:20, 30:60] = 1
    t, frame = to_model_input(img, 64)
    assert t.shape == (3, 64, 64) and frame.resized == (32, 64)
    # padding: SAM's pixel mean, which SAM's own normalisation turns into 0 (black read as an edge)
    assert torch.equal(t[:, 32:], torch.tensor(PAD_FILL).view(3, 1, 1).expand(3, 32, 64))
    from napari_clipsam.models.clipsam import ClipSam, tiny_config

    model = ClipSam(tiny_config())
    assert model.pad_fill == pytest.approx(PAD_FILL)
    normalised = (t[None] * 255 - model.sam.pixel_mean) / model.sam.pixel_std
    assert normalised[..., 32:, :].abs().max() < 1e-5
    assert to_model_input(img, 64, (0, 0, 0))[0][:, 32:].abs().sum() == 0
    low = torch.from_numpy(np.where(t[0].numpy() > 0.5, 10.0, -10.0)).float()[None, None]
    back = postprocess_logits(low, frame)[0, 0] > 0
    assert back.shape == (50, 100)
    iou = (back.numpy() & (img[..., 0] > 0)).sum() / (back.numpy() | (img[..., 0] > 0)).sum()
    assert iou > 0.85
    np.testing.assert_allclose(frame.to_input([[100, 50]]), [[64, 32]])
    p = mask_to_prompt(img[..., 0] > 0, frame_for((50, 100), 64), 16)
    assert p.shape == (1, 1, 16, 16) and p.max() > 0 and p.min() < 0


def test_wide_integers_and_huge_floats_keep_their_variation():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 4000, (32, 40))
    want = normalize_image(base.astype(np.uint16))
    for image in (base.astype(np.int64) + 2**40, base.astype(np.uint32) + 2**30):  # float32 would drop the low bits
        out = normalize_image(image)
        assert out.dtype == np.float32 and np.allclose(out, want, atol=1e-6)
    huge = normalize_image(base.astype(np.float64) * 1e36)  # beyond float32's range (was all NaN / zeros)
    assert np.allclose(huge, want, atol=1e-6)
    from napari_clipsam.engine.volume import NormalizedVolume

    vol = np.stack([base, base // 2]).astype(np.float64) * 1e36
    assert np.allclose(NormalizedVolume(vol)[0], NormalizedVolume(np.stack([base, base // 2]))[0], atol=1e-6)
