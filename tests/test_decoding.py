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
        before = [x.clone() for x in (side.keys, side.pe, side.k, side.v, side.q)]
        hs, src = two_way(tr, side, tokens)  # 3 prompts on each of 2 rows
        # later blocks add to their image tokens in place outside autograd, never to the side's
        assert all(torch.equal(x, y) for x, y in zip(before, (side.keys, side.pe, side.k, side.v, side.q)))
        # keep=2: the first two tokens only, the same values (the final attention's rows are independent)
        hs2, src2 = two_way(tr, side, tokens, keep=2)
        assert hs2.shape == (6, 2, c) and torch.equal(src2, src)
        torch.testing.assert_close(hs2, hs[:, :2], rtol=1e-6, atol=1e-6)
        masks = upscale_masks(decoder.output_upscaling, src, hyper, 4, 4)
        for i in range(6):
            r, j = divmod(i, 3)
            ref_hs, ref_src = tr(emb[r : r + 1], pos, tokens[r, j][None])
            up = decoder.output_upscaling(ref_src.transpose(1, 2).reshape(1, c, 4, 4))
            ref_masks = (hyper[i][None] @ up.flatten(2)).reshape(1, 3, 16, 16)
            torch.testing.assert_close(hs[i], ref_hs[0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(src[i], ref_src[0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(masks[i], ref_masks[0], rtol=1e-5, atol=1e-5)


class _Wrapped(torch.nn.Module):  # a projection that is not a plain Linear (as a LoRA wrapper is)
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


class _ImageLinears(torch.overrides.TorchFunctionMode):
    """Counts linear maps applied to image tokens (inputs with ``length`` rows per item)."""

    def __init__(self, length: int):
        super().__init__()
        self.length, self.count = length, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.nn.functional.linear and args[0].dim() == 3 and args[0].shape[1] == self.length:
            self.count += 1
        return func(*args, **(kwargs or {}))


# wrapped projection → linear maps on image tokens (each runs once for both prompts): a wrapped
# token→image projection runs both k and v on the image; a wrapped image→token one runs q
# (and out_proj where that is the wrapped one) on it; in the first block q is the image side's.
_WRAPPED = {None: 0, "t2i.k_proj": 2, "i2t.q_proj": 1, "i2t.out_proj": 2, "final.v_proj": 2, "first.out_proj": 1}


@pytest.mark.parametrize("wrap", list(_WRAPPED))
def test_image_side_projections_fold_onto_the_tokens_unless_wrapped(decoder, wrap):
    """Projections of image tokens are folded onto the prompt tokens (no linear map runs on the
    image tokens in two_way); a wrapped projection (as LoRA's is) runs as a module on them
    instead. Same values either way."""
    torch.manual_seed(4)
    tr, c = decoder.transformer, decoder.transformer_dim
    emb, pos, tokens = torch.randn(1, c, 4, 4), torch.randn(1, c, 4, 4), torch.randn(1, 2, 5, c)
    owners = {"t2i.k_proj": (tr.layers[1].cross_attn_token_to_image, "k_proj"),
              "i2t.q_proj": (tr.layers[1].cross_attn_image_to_token, "q_proj"),
              "i2t.out_proj": (tr.layers[2].cross_attn_image_to_token, "out_proj"),
              "final.v_proj": (tr.final_attn_token_to_image, "v_proj"),
              "first.out_proj": (tr.layers[0].cross_attn_image_to_token, "out_proj")}
    owner, name = owners.get(wrap, (None, None))
    plain = None if owner is None else getattr(owner, name)
    try:
        if owner is not None:
            setattr(owner, name, _Wrapped(plain))
        with torch.no_grad():
            side = image_side(tr, emb, pos)
            with _ImageLinears(16) as seen:
                hs, src = two_way(tr, side, tokens)
    finally:
        if owner is not None:
            setattr(owner, name, plain)
    assert seen.count == _WRAPPED[wrap]
    with torch.no_grad():
        for j in range(2):
            ref_hs, ref_src = tr(emb, pos, tokens[0, j][None])
            torch.testing.assert_close(hs[j], ref_hs[0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(src[j], ref_src[0], rtol=1e-5, atol=1e-5)


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
        assert sorted(k[:2] for k in enc.sides) == [("none", 0), ("none", 1)]
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


def test_decode_equals_segment_anythings_decoder_for_one_mask_and_three():
    """ClipSam.decode (image side per row, folded projections, the final attention for the tokens
    the masks need only) gives segment-anything's MaskDecoder outputs, one mask or three."""
    torch.manual_seed(2)
    m = ClipSam(tiny_config("adapter"))  # no prompt tokens of its own: stock takes the same inputs
    with torch.no_grad():
        for p in m.sam.mask_decoder.parameters():
            p.normal_(0, 0.2)
    md, pe = m.sam.mask_decoder, m.sam.prompt_encoder
    pts, labels = torch.rand(4, 2, 2) * 60, torch.tensor([[1, 0], [1, 1], [1, 0], [0, 1]])
    idx = torch.tensor([1, 0, 1, 0])
    with torch.inference_mode():
        enc = m.encode(torch.rand(2, 3, 64, 64), ["nucleus", "cell"])
        for multimask in (False, True):
            masks, iou = m.decode(enc, Prompts(idx, points=pts, labels=labels), multimask=multimask)
            assert masks.shape[1] == iou.shape[1] == (3 if multimask else 1)
            for i in range(4):
                sparse, dense = pe(points=(pts[i : i + 1], labels[i : i + 1]), boxes=None, masks=None)
                ref, ref_iou = md(enc.embeddings[idx[i] : idx[i] + 1], pe.get_dense_pe(), sparse, dense,
                                  multimask_output=multimask)
                torch.testing.assert_close(masks[i], ref[0], rtol=1e-4, atol=1e-4)
                torch.testing.assert_close(iou[i], ref_iou[0], rtol=1e-4, atol=1e-4)


def test_mask_prompts_decode_with_an_image_side_each_and_keep_none():
    """Mask prompts get one image side each (their dense input differs); nothing is kept on the
    Encoded for them, and decoding them again gives the same logits."""
    m = _model()
    images = torch.rand(1, 3, 64, 64)
    p = Prompts(torch.zeros(3, dtype=torch.long), points=torch.rand(3, 1, 2) * 60, labels=torch.ones(3, 1),
                masks=torch.randn(3, 1, m.mask_size, m.mask_size))
    with torch.inference_mode():
        enc = m.encode(images, ["nucleus"])
        first, _ = m.decode(enc, p)
        assert not enc.sides
        one, _ = m.decode(enc, p[1:2])
        again, _ = m.decode(enc, p)
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    torch.testing.assert_close(one[0], first[1], rtol=1e-5, atol=1e-5)
    with torch.enable_grad():  # training: gradients reach the decoder through the folded projections
        enc = m.encode(images, ["nucleus"])
        out, _ = m.decode(enc, p)
        out.sum().backward()
        assert not enc.sides
        assert m.sam.mask_decoder.transformer.final_attn_token_to_image.k_proj.weight.grad is not None
        torch.testing.assert_close(out.detach(), first, rtol=1e-5, atol=1e-5)


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
    assert sorted(str(k[2]) for k in enc.sides) == ["torch.bfloat16", "torch.float32"]  # one per dtype
    a, b = ref > 0, low > 0
    assert (a & b).sum() / (a | b).sum() >= 0.98


def _windowed_equal_inside_and_outside_filled(m, enc, p, windows):
    from napari_clipsam.models.decoding import OUTSIDE

    full, iou = m.decode(enc, p, multimask=True)
    part, part_iou = m.decode(enc, p, multimask=True, windows=windows)
    f = m.mask_size // m.embed_size
    for i, (y0, x0, y1, x1) in enumerate(windows.tolist()):
        ty0, tx0, ty1, tx1 = y0 // f * f, x0 // f * f, -(-y1 // f) * f, -(-x1 // f) * f  # rounded out to tokens
        inside = torch.zeros(full.shape[2:], dtype=torch.bool)
        inside[ty0:ty1, tx0:tx1] = True
        assert inside.sum() < inside.numel()
        torch.testing.assert_close(part[i][:, inside], full[i][:, inside], rtol=1e-5, atol=1e-5)
        assert (part[i][:, ~inside] == OUTSIDE).all()
    torch.testing.assert_close(part_iou, iou)


@pytest.mark.parametrize("skip", [False, True])
def test_decode_windows_give_the_full_logits_inside_and_outside_elsewhere(skip):
    """segment_text upscales each seed's mask only near its region: inside a window (rounded out
    to the token grid) the logits are the whole-grid ones, outside they are OUTSIDE — for the
    stock head (run on the window's tokens only) and for a stem-skip head (run whole, filled)."""
    if skip:
        from test_stem_skip import _model as skip_model

        m, size = skip_model(), 64
    else:
        m, size = _model(), 64
    torch.manual_seed(3)
    p = Prompts(torch.tensor([0, 0, 1, 1]), points=torch.rand(4, 1, 2) * 60, labels=torch.ones(4, 1))
    # mask pixels (16² grid); the stock head runs all windows in crops of the largest one's size
    # (3 × 4 tokens), the last one's moved up and left to stay inside the grid
    windows = torch.tensor([[0, 0, 5, 7], [3, 2, 9, 16], [6, 1, 16, 3], [13, 14, 16, 16]])
    with torch.inference_mode():
        enc = m.encode(torch.rand(2, 3, size, size), ["nucleus", "cell"])
        assert m.mask_size == 16
        _windowed_equal_inside_and_outside_filled(m, enc, p, windows)
        groups = [p[0:2], p[2:4]]  # a list of prompt groups splits the windows alike
        a, _ = m.decode(enc, groups, windows=windows)
        b, _ = m.decode(enc, p, windows=windows)
        torch.testing.assert_close(a, b)


def test_decode_rejects_bad_windows():
    m = _model()
    p = Prompts(torch.zeros(2), points=torch.rand(2, 1, 2) * 60, labels=torch.ones(2, 1))
    with torch.inference_mode():
        enc = m.encode(torch.rand(1, 3, 64, 64), ["nucleus"])
        for bad, msg in [(torch.zeros(2, 3, dtype=torch.long), "integer mask-pixel boxes"),
                         (torch.zeros(2, 4), "integer mask-pixel boxes"),
                         (torch.tensor([[0, 0, 4, 4], [2, 2, 2, 5]]), "empty or outside"),
                         (torch.tensor([[0, 0, 4, 4], [0, 0, 17, 4]]), "outside the 16×16 mask-pixel grid")]:
            with pytest.raises(ValueError, match=msg):
                m.decode(enc, p, windows=bad)
        with pytest.raises(ValueError, match="3 boxes for 2 prompts"):
            m.decode(enc, [p[0:1], p[1:2]], windows=torch.zeros(3, 4, dtype=torch.long))


def test_bounding_windows():
    from napari_clipsam.engine.text_instances import bounding_windows

    masks = torch.zeros(3, 8, 10, dtype=torch.bool)
    masks[0, 2:5, 3:4] = True
    masks[1, 7, 9] = True
    assert bounding_windows(masks).tolist() == [[2, 3, 5, 4], [7, 9, 8, 10], [0, 0, 8, 10]]
