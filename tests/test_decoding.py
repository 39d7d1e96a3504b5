"""models.decoding: the two-way transformer with a per-image side equals segment-anything's."""

import dataclasses

import numpy as np
import pytest
import torch

from napari_clipsam.engine.segmenter import Segmenter
from napari_clipsam.models.clipsam import ClipSam, Prompts, tiny_config
from napari_clipsam.models.decoding import image_side, two_way, upscale_masks
from napari_clipsam.models.sam_parts import SAM_CONFIGS, build_sam


@pytest.fixture(scope="module")
def decoder():
    torch.manual_seed(0)
    sam = build_sam(dataclasses.replace(SAM_CONFIGS["tiny"], decoder_depth=3))
    with torch.no_grad():
        for p in sam.mask_decoder.parameters():  # far from init, so every term matters
            p.normal_(0, 0.2)
    return sam.mask_decoder


def test_two_way_and_mask_head_equal_segment_anything(decoder):
    torch.manual_seed(1)
    tr, c = decoder.transformer, decoder.transformer_dim
    emb, pos, tokens = torch.randn(2, c, 4, 4), torch.randn(1, c, 4, 4), torch.randn(2, 3, 5, c)
    hyper = torch.randn(6, 3, c // 8)
    with torch.no_grad():
        side = image_side(tr, emb, pos)
        # token-major rows, as every click adds to and normalises them (strided: a copy per op)
        assert side.keys.is_contiguous() and side.pe.is_contiguous()
        hs, src = two_way(tr, side, tokens)  # 3 prompts on each of 2 rows
        masks = upscale_masks(decoder.output_upscaling, src, hyper, 4, 4)
        for i in range(6):
            r, j = divmod(i, 3)
            ref_hs, ref_src = tr(emb[r : r + 1], pos, tokens[r, j][None])
            up = decoder.output_upscaling(ref_src.transpose(1, 2).reshape(1, c, 4, 4))
            ref_masks = (hyper[i][None] @ up.flatten(2)).reshape(1, 3, 16, 16)
            torch.testing.assert_close(hs[i], ref_hs[0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(src[i], ref_src[0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(masks[i], ref_masks[0], rtol=1e-5, atol=1e-5)


def test_two_way_rejects_a_transformer_that_is_not_sams(decoder):
    tr = decoder.transformer
    block = tr.layers[0]
    block.skip_first_layer_pe = False
    try:
        with pytest.raises(ValueError, match="TwoWayTransformer"):
            image_side(tr, torch.zeros(1, decoder.transformer_dim, 4, 4), torch.zeros(1, decoder.transformer_dim, 4, 4))
    finally:
        block.skip_first_layer_pe = True


def _model():
    torch.manual_seed(2)
    m = ClipSam(tiny_config("ssp"))
    with torch.no_grad():
        for p in m.sam.mask_decoder.parameters():
            p.normal_(0, 0.2)
    return m


def test_decode_reuses_the_image_side_and_matches_per_prompt_decoding():
    m = _model()
    images = torch.rand(2, 3, 64, 64)
    pts = torch.rand(5, 2, 2) * 60
    idx = torch.tensor([1, 0, 1, 1, 0])
    p = Prompts(idx, points=pts, labels=torch.tensor([[1, 0]] * 5))
    with torch.inference_mode():
        enc = m.encode(images, ["nucleus", "cell"])
        grouped, iou = m.decode(enc, p)  # per row, side cached
        assert len(enc.sides) == 2
        again, _ = m.decode(enc, p)
    with torch.no_grad():  # grad mode off but not inference: still cached; compare per prompt
        for i in range(5):
            one, one_iou = m.decode(enc, Prompts(idx[i : i + 1], points=pts[i : i + 1], labels=p.labels[i : i + 1]))
            torch.testing.assert_close(grouped[i], one[0], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(iou[i], one_iou[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(again, grouped)
    with torch.enable_grad():  # training: no cached sides, gradients reach the decoder
        enc = m.encode(images, ["nucleus", "cell"])
        out, _ = m.decode(enc, p)
        out.sum().backward()
        assert not enc.sides
        assert m.sam.mask_decoder.transformer.layers[0].cross_attn_token_to_image.k_proj.weight.grad is not None
        torch.testing.assert_close(out.detach(), grouped, rtol=1e-4, atol=1e-4)


def test_segmenter_drops_image_sides_when_the_decoder_changes():
    m = _model()
    seg = Segmenter(m, fast=False)
    seg.set_image(np.random.default_rng(0).random((64, 64)).astype(np.float32))
    before, _ = seg.predict(points=[[30, 30]])
    logits0, _ = seg.predict_torch(points=[[30, 30]])
    assert len(seg._sides) == 1
    with torch.no_grad():  # an in-place edit of the first block's image-side projection
        m.sam.mask_decoder.transformer.layers[0].cross_attn_token_to_image.k_proj.weight.mul_(-3.0)
    logits1, _ = seg.predict_torch(points=[[30, 30]])
    fresh = Segmenter(m, fast=False)
    fresh.set_image(np.random.default_rng(0).random((64, 64)).astype(np.float32))
    ref, _ = fresh.predict_torch(points=[[30, 30]])
    assert not torch.allclose(logits0, logits1)
    torch.testing.assert_close(logits1, ref)


def test_bf16_decoding_agrees_with_fp32():
    m = _model()
    images = torch.rand(1, 3, 64, 64)
    p = Prompts(torch.zeros(16), points=torch.rand(16, 1, 2) * 60, labels=torch.ones(16, 1))
    with torch.inference_mode():
        enc = m.encode(images, ["nucleus"])
        ref, _ = m.decode(enc, p)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low, _ = m.decode(enc, p)
    assert low.dtype == torch.float32
    assert len(enc.sides) == 2  # one side per compute dtype
    a, b = ref > 0, low > 0
    assert (a & b).sum() / (a | b).sum() >= 0.98
