"""The mask head's high-resolution skip from the patch stem (SamConfig.stem_skip)."""

import dataclasses

import numpy as np
import pytest
import torch

from napari_clipsam.engine.segmenter import Segmenter
from napari_clipsam.models.clipsam import ClipSam, Encoded, Prompts, tiny_config
from napari_clipsam.models.sam_parts import build_sam
from napari_clipsam.models.stem_skip import StemSkip, stem_tap
from napari_clipsam.training.finetune import features_from_cache, frozen_features


def _config(skip: bool, strategy: str = "adapter"):
    c = tiny_config(strategy)
    return dataclasses.replace(c, sam=dataclasses.replace(c.sam, patch_stem=(4, 8), stem_skip=skip))


def _model(skip: bool = True, strategy: str = "adapter", trained: bool = True) -> ClipSam:
    torch.manual_seed(0)
    m = ClipSam(_config(skip, strategy))
    if skip and trained:  # zero at init: give the skip weights so that it changes the masks
        with torch.no_grad():
            for p in m.sam.mask_decoder.stem_skip.parameters():
                p.normal_(0, 0.5)
    return m


def _click(n: int = 1) -> Prompts:
    return Prompts(torch.zeros(n, dtype=torch.long), points=torch.rand(n, 1, 2) * 64, labels=torch.ones(n, 1))


def test_stem_tap_is_the_layer_on_the_mask_grid():
    assert stem_tap((16, 32, 64), 16) == 1  # stride 4: the demo's 64² features for a 16² embedding
    assert stem_tap((8,), 8) == 0
    with pytest.raises(ValueError, match="stem_skip needs a patch_stem"):
        stem_tap((16,), 16)  # only stride 2: no layer on the mask grid
    with pytest.raises(ValueError, match="stem_skip needs a patch_stem"):
        stem_tap((), 16)
    with pytest.raises(ValueError, match="stem_skip needs a patch_stem"):
        stem_tap((4, 8), 12)
    c = _config(True).sam
    with pytest.raises(ValueError, match="stem_skip needs a patch_stem"):
        build_sam(dataclasses.replace(c, patch_stem=()))


def test_zero_initialised_skip_leaves_the_masks_as_without_it():
    plain, skip = _model(False), _model(True, trained=False)
    missing, unexpected = skip.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("sam.mask_decoder.stem_skip.") for k in missing)
    x = torch.rand(2, 3, 64, 64)
    p = Prompts(torch.tensor([0, 1, 1]), points=torch.rand(3, 1, 2) * 64, labels=torch.ones(3, 1))
    with torch.no_grad():
        enc = skip.encode(x, ["nucleus", "vesicle"])
        assert enc.stem.shape == (2, 8, 16, 16)  # on the 16² mask grid of the 4² embedding
        torch.testing.assert_close(skip.decode(enc, p)[0], plain.decode(plain.encode(x, ["nucleus", "vesicle"]), p)[0],
                                   rtol=1e-5, atol=1e-5)


def test_trained_skip_reads_each_prompts_own_image():
    m = _model()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        enc = m.encode(x, ["nucleus", "nucleus"])
        both, _ = m.decode(enc, Prompts(torch.tensor([0, 1]), points=torch.full((2, 1, 2), 30.0),
                                        labels=torch.ones(2, 1)))
        swapped = dataclasses.replace(enc, stem=enc.stem.flip(0), sides={})
        other, _ = m.decode(swapped, Prompts(torch.tensor([0, 1]), points=torch.full((2, 1, 2), 30.0),
                                             labels=torch.ones(2, 1)))
        for i in range(2):
            alone = m.encode(x[i : i + 1], ["nucleus"])
            one, _ = m.decode(alone, Prompts(torch.tensor([0]), points=torch.full((1, 1, 2), 30.0), labels=torch.ones(1, 1)))
            torch.testing.assert_close(both[i], one[0], rtol=1e-4, atol=1e-4)
    assert (both - other).abs().max() > 1e-2  # the stem features matter, per image


def test_decode_without_stem_features_is_refused():
    m = _model()
    with torch.no_grad():
        enc = m.encode(torch.rand(1, 3, 64, 64), ["nucleus"])
    with pytest.raises(ValueError, match="patch-stem features"):
        m.decode(Encoded(enc.embeddings, enc.prompt_tokens, enc.semantic, enc.similarity, enc.texts), _click())
    skip = m.sam.mask_decoder.stem_skip
    with pytest.raises(ValueError, match="stem features must be"):
        skip(torch.zeros(1, 4, 16, 16), torch.zeros(1, 8, 8, 8), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="one stem row per prompt"):
        skip(torch.zeros(2, 4, 16, 16), torch.zeros(1, 8, 16, 16), torch.zeros(1, dtype=torch.long))


def test_image_parts_are_computed_once_per_image_with_the_same_result():
    """The skip computes its image-only parts per image; that equals running its modules on the
    concatenated per-prompt inputs, as written."""
    skip = StemSkip(8, 4)
    torch.manual_seed(0)
    for p in skip.parameters():
        torch.nn.init.normal_(p, 0, 0.3)
    x, stem, index = torch.randn(5, 4, 16, 16), torch.randn(2, 8, 16, 16), torch.tensor([0, 1, 1, 0, 1])
    per_prompt = stem[index]
    y = x + skip.proj(per_prompt)
    want = y + skip.refine(torch.cat([y, per_prompt], dim=1))
    torch.testing.assert_close(skip(x, stem, index), want, rtol=1e-5, atol=1e-5)


def test_skip_model_saves_and_loads(tmp_path):
    m = _model()
    x = torch.rand(1, 3, 64, 64)
    path = m.save(tmp_path / "m.safetensors")
    back = ClipSam.load(path)
    assert back.config.sam.stem_skip and isinstance(back.sam.mask_decoder.stem_skip, StemSkip)
    with torch.no_grad():
        p = _click(2)
        torch.testing.assert_close(back.decode(back.encode(x, ["nucleus"]), p)[0], m.decode(m.encode(x, ["nucleus"]), p)[0])
    plain = ClipSam(_config(False))  # a file of a model without the skip does not load into one with it
    plain.save(tmp_path / "plain.safetensors")
    assert not ClipSam.load(tmp_path / "plain.safetensors").config.sam.stem_skip


def test_segmenter_caches_each_images_stem_features():
    """A cached image must come back with its own stem features (not the last embedded image's)."""
    seg = Segmenter(_model())
    rng = np.random.default_rng(0)
    a, b = rng.random((64, 64)).astype(np.float32), rng.random((64, 64)).astype(np.float32)
    seg.set_image(a)
    first, _ = seg.predict_torch(points=np.array([[30.0, 30.0]]), labels=np.array([1]), text="nucleus")
    seg.set_image(b)
    seg.predict_torch(points=np.array([[30.0, 30.0]]), labels=np.array([1]), text="nucleus")
    seg.set_image(a)  # from the cache
    again, _ = seg.predict_torch(points=np.array([[30.0, 30.0]]), labels=np.array([1]), text="nucleus")
    torch.testing.assert_close(again, first)


def test_prefix_cache_carries_the_stem_features():
    m = _model(strategy="ssp")
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        direct = m.embed_image(x)
        for k in (0, 1, 2):
            cached = features_from_cache(m, [frozen_features(m, x[i : i + 1], k) for i in range(2)], k)
            torch.testing.assert_close(cached.stem, direct.stem)
            torch.testing.assert_close(cached.embeddings if cached.embeddings is not None else cached.tokens,
                                       direct.embeddings if direct.embeddings is not None else direct.tokens,
                                       rtol=1e-4, atol=1e-5)
