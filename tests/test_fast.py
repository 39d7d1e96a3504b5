"""Fast path (models/fast.py): SDPA attention is the same math as segment-anything's, bf16 stays
within the stated tolerance, and the swap is invisible to checkpoints, LoRA and `disable`."""

import copy
import math

import pytest
import torch
from segment_anything.modeling import image_encoder as sam_enc
from segment_anything.modeling import transformer as sam_tr

from napari_clipsam.models import fast
from napari_clipsam.models.clipsam import ClipSam, Prompts, tiny_config
from napari_clipsam.models.sam_parts import SAM_CONFIGS, SamConfig, build_sam

# Official block shape (768 wide, 12 heads, 64-d heads, window 14 with padding, global blocks)
# on a small image: 16×16 tokens, padded to 28×28 in the windowed block.
OFFICIAL_SHAPED = SamConfig(encoder_depth=2, encoder_global_attn_indexes=(1,), img_size=256)
# Small but not tiny, for the bf16 tolerance: 8×8 tokens, windows of 3 (padded to 9).
SMALL = SamConfig(encoder_embed_dim=192, encoder_depth=4, encoder_num_heads=3,
                  encoder_global_attn_indexes=(1, 3), img_size=128, window_size=3,
                  prompt_embed_dim=64, mask_in_chans=8, decoder_mlp_dim=256, decoder_num_heads=4,
                  iou_head_hidden_dim=64)


def _sam(config, seed=0):
    torch.manual_seed(seed)
    sam = build_sam(config)
    with torch.no_grad():  # SAM zero-initialises the relative positions: give them weight
        for m in sam.modules():
            if isinstance(m, sam_enc.Attention):
                m.rel_pos_h.normal_(0, 0.5)
                m.rel_pos_w.normal_(0, 0.5)
    return sam


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def _iou(a, b):
    return float((a & b).sum()) / max(float((a | b).sum()), 1.0)


@pytest.mark.parametrize("config", [SAM_CONFIGS["tiny"], OFFICIAL_SHAPED], ids=["tiny", "official-shaped"])
def test_encoder_sdpa_matches_reference_fp32(config):
    sam = _sam(config)
    x = torch.randn(2, 3, config.img_size, config.img_size)
    with torch.no_grad():
        ref = sam.image_encoder(x)
        info = fast.enable_fast_path(sam, bf16=False)
        out = sam.image_encoder(x)
    assert info.encoder_modules == config.encoder_depth and info.autocast_dtype is None
    assert all(type(b.attn) is fast.FastEncoderAttention for b in sam.image_encoder.blocks)
    assert out.dtype == torch.float32
    assert _rel(out, ref) <= 1e-5


# float64 bias bytes of one (window, head) item at OFFICIAL_SHAPED, 256² input: a 196-token window
# 196 · 196 · 8 = 307 328, the 256-token global block 256 · 256 · 8 = 524 288. A 550 000-byte
# budget makes every item a slab of its own; 131 072 (64 global rows) splits each item's query rows
# into slabs: 4 of 64 rows in the global block, 83 + 83 + 30 in a window.
@pytest.mark.parametrize("augment_from, budget, product_side",
                         [(1, None, 0), (10**9, None, 0), (10**9, None, 16), (10**9, 550_000, 0),
                          (10**9, 131_072, 0), (10**9, 131_072, 16)],
                         ids=["augmented", "masked", "masked-bias-by-product", "masked-one-item-per-slab-recomputed",
                              "masked-query-row-slabs-recomputed", "masked-bias-by-product-query-row-slabs-recomputed"])
def test_encoder_bias_paths_match_reference_with_gradients(monkeypatch, augment_from, budget, product_side):
    """Both ways of applying the relative positions (extra query/key channels; an additive mask,
    built by broadcasting or as a product with the one-hot key positions, in slabs of (window,
    head) items or of an item's query rows, rebuilt in backward when there are several) give
    segment-anything's output (fp32) and gradients (float64: in fp32 the input gradient of this
    deep, random stack is too ill-conditioned to compare). Here fp32/float64 stand in for the
    bf16/fp16 that choose the channels and the product outside tests; 256² input: 14-token
    windows, a 16 × 16 global block."""
    monkeypatch.setattr(fast, "_AUGMENT_FROM", augment_from)
    monkeypatch.setattr(fast, "_AUGMENT_DTYPES", (torch.float32, torch.float64))
    monkeypatch.setattr(fast, "augment_on_cpu", lambda: True)
    monkeypatch.setattr(fast, "_PRODUCT_BIAS_MAX_SIDE", product_side)
    if budget is not None:
        monkeypatch.setattr(fast, "_MASK_BUDGET", budget)
    stock = _sam(OFFICIAL_SHAPED)
    sam = copy.deepcopy(stock)
    fast.enable_fast_path(sam, bf16=False)
    x = torch.randn(2, 3, 256, 256)
    with torch.no_grad():
        assert _rel(sam.image_encoder(x), stock.image_encoder(x)) <= 1e-5
    grads = []
    for model in (stock.double(), sam.double()):
        xi = x.double().requires_grad_(True)
        model.image_encoder(xi).square().mean().backward()
        rel = [m.rel_pos_h.grad for m in model.image_encoder.modules() if isinstance(m, sam_enc.Attention)]
        grads.append([xi.grad, *rel])
    assert len(grads[0]) == 1 + OFFICIAL_SHAPED.encoder_depth
    assert all(_rel(a, b) <= 1e-6 for a, b in zip(grads[1], grads[0]))


def test_bias_by_product_is_the_broadcast_sum_in_bf16(monkeypatch):
    """vit_b windows (14 × 14 tokens) in bf16 build the bias as a product with one-hot key
    positions: each entry is the sum of one row term and one column term, rounded once, as
    broadcasting gives it, so the attention is the same to the bit."""
    q, k, v = (torch.randn(4, 12, 196, 64).bfloat16() for _ in range(3))
    t_h, t_w = torch.randn(4, 12, 196, 14).bfloat16(), torch.randn(4, 12, 196, 14).bfloat16()
    calls = []
    original = fast._bias_slab
    monkeypatch.setattr(fast, "_bias_slab", lambda *a, keys=None: calls.append(keys is not None) or original(*a, keys=keys))
    with torch.inference_mode():
        by_product = fast._masked_attention(q, k, v, t_h, t_w)
        monkeypatch.setattr(fast, "_PRODUCT_BIAS_MAX_SIDE", 0)
        broadcast = fast._masked_attention(q, k, v, t_h, t_w)
    assert calls == [True, False]
    assert torch.equal(by_product, broadcast)


# float64 score bytes of one (window, head) item at OFFICIAL_SHAPED, 256² input: a 196-token window
# 196 · 196 · 8 = 307 328, the 256-token global block 524 288. 700 000 bytes: two window items a
# chunk, one global item; 100 000: 63-row chunks in a window (63 + 63 + 63 + 7), 48 in the global
# block.
@pytest.mark.parametrize("budget", [None, 700_000, 100_000], ids=["default", "items-per-chunk", "query-rows-per-chunk"])
def test_explicit_attention_is_segment_anythings_math_in_float64(monkeypatch, budget):
    """The explicit path (on a CPU, bf16 and fp32 training outside tests) is the same math as
    segment-anything's attention: in float64 every step keeps float64, so the encoder's output
    matches stock's to rounding, and so do the gradients (of the input and of both
    relative-position tables, through backward's recomputed chunks), however the scores are
    chunked."""
    monkeypatch.setattr(fast, "explicit_scores", lambda *args: True)
    if budget is not None:
        monkeypatch.setattr(fast, "_SCORES_BUDGET", budget)
    calls = []
    original = fast._explicit_attention
    monkeypatch.setattr(fast, "_explicit_attention", lambda *a: calls.append(a[0].shape) or original(*a))
    stock = _sam(OFFICIAL_SHAPED).double()
    sam = copy.deepcopy(stock)
    fast.enable_fast_path(sam, bf16=False)
    x = torch.randn(1, 3, 256, 256, dtype=torch.float64)
    with torch.no_grad():
        assert _rel(sam.image_encoder(x), stock.image_encoder(x)) <= 1e-12
    assert calls == [(4, 12, 196, 64), (1, 12, 256, 64)]  # the windowed block, then the global one
    grads = []
    for model in (stock, sam):
        xi = x.clone().requires_grad_(True)
        model.image_encoder(xi).square().mean().backward()
        attns = [m for m in model.image_encoder.modules() if isinstance(m, sam_enc.Attention)]
        grads.append([xi.grad, *(m.rel_pos_h.grad for m in attns), *(m.rel_pos_w.grad for m in attns)])
    assert len(calls) == 4  # the second forward went through the explicit path too
    # measured 0.6-4e-9 (this random stack amplifies rounding; a wrong gradient is off by O(1))
    assert all(_rel(a, b) <= 1e-7 for a, b in zip(grads[1], grads[0]))


def test_explicit_bf16_gradients_are_close_to_the_exact_math():
    """bf16 training on a CPU takes the explicit path: its gradients of q, k, v and both bias
    terms (vit_b's shapes: 25 windows of 14 × 14 tokens; a 32 × 32 global block) are close to
    float64 autograd through the plain formula, closer than SDPA's with a bf16 mask."""
    torch.manual_seed(0)
    for items, side in ((25, 14), (1, 32)):
        n = side * side
        inputs = [torch.randn(items, 12, n, 64).bfloat16() for _ in range(3)]
        inputs += [(torch.randn(items, 12, n, side) * 2).bfloat16() for _ in range(2)]
        d_out = torch.randn(items, 12, n, 64)
        exact = [t.double().requires_grad_(True) for t in inputs]
        qd, kd, vd, hd, wd = exact
        bias = (hd[..., :, None] + wd[..., None, :]).reshape(items, 12, n, n)
        (torch.softmax(qd @ kd.transpose(-1, -2) / 8 + bias, -1) @ vd * d_out.double()).sum().backward()
        ours, masked = ([t.clone().requires_grad_(True) for t in inputs] for _ in range(2))
        (fast._explicit_attention(*ours, 64**-0.5).float() * d_out).sum().backward()
        (fast._masked_attention(*masked).float() * d_out).sum().backward()
        for name, a, m, b in zip("q k v t_h t_w".split(), ours, masked, exact):
            assert a.grad.dtype == torch.bfloat16, name
            err = _rel(a.grad.double(), b.grad)
            assert err <= 8e-3, (name, items, err)  # measured 0.003-0.005
            assert err < 0.8 * _rel(m.grad.double(), b.grad), (name, items)  # SDPA + mask: 0.008-0.013


def test_explicit_bf16_attention_is_closer_to_the_exact_math_than_the_masked_kernel():
    """At vit_b's shapes (25 windows of 14 × 14 tokens; a 32 × 32 global block) in bf16, the
    explicit path adds the bias to fp32 scores, where the masked path's bias is a bf16 tensor: its
    output is closer to float64 math (relative L2; ≈ 0.004-0.006 against 0.007-0.011 measured)."""
    torch.manual_seed(0)
    for items, side in ((25, 14), (1, 32)):
        n = side * side
        q, k, v = (torch.randn(items, 12, n, 64).bfloat16() for _ in range(3))
        q = q * 2  # logits of a few units, as trained attention has
        t_h, t_w = ((torch.randn(items, 12, n, side) * 2).bfloat16() for _ in range(2))
        qd, kd, vd, hd, wd = (t.double() for t in (q, k, v, t_h, t_w))
        bias = (hd[..., :, None] + wd[..., None, :]).reshape(items, 12, n, n)
        exact = torch.nn.functional.scaled_dot_product_attention(qd, kd, vd, attn_mask=bias)
        with torch.inference_mode():
            explicit = fast._explicit_attention(q, k, v, t_h, t_w, 64**-0.5)
            masked = fast._masked_attention(q, k, v, t_h, t_w)
        assert explicit.dtype == torch.bfloat16
        assert _rel(explicit.double(), exact) <= 8e-3
        assert _rel(explicit.double(), exact) < 0.8 * _rel(masked.double(), exact)


def test_explicit_attention_where_it_was_measured_faster():
    """On a CPU the explicit products take bf16 (inference and training) and fp32 training,
    where they were measured faster than SDPA (see explicit_scores); fp32 inference, fp16 and
    CUDA keep SDPA."""
    cases = [(torch.bfloat16, "cpu", False, True), (torch.bfloat16, "cpu", True, True),
             (torch.float32, "cpu", False, False), (torch.float32, "cpu", True, True),
             (torch.float16, "cpu", False, False), (torch.bfloat16, "cuda", False, False),
             (torch.float32, "cuda", True, False)]
    for dtype, device, grad, explicit in cases:
        assert fast.explicit_scores(dtype, torch.device(device), grad) is explicit, (dtype, device, grad)


def test_augmented_attention_only_where_it_was_measured_faster(monkeypatch):
    """bf16 global attention takes the extra channels on CPUs with AMX and on CUDA; on an
    avx512_bf16 EPYC without AMX, bf16 takes explicit products (faster there in inference and in
    training, see explicit_scores). Windows and fp32 never take the channels. (Every path gives
    segment-anything's values: the tests above.)"""
    glob, window = 4096, 196
    cases = [({"avx512_bf16"}, glob, torch.bfloat16, "cpu", False),
             ({"avx512_bf16", "amx_bf16"}, glob, torch.bfloat16, "cpu", True),
             ({"avx512_bf16"}, glob, torch.bfloat16, "cuda", True),
             ({"avx512_bf16", "amx_bf16"}, window, torch.bfloat16, "cpu", False),
             ({"avx512_bf16", "amx_bf16"}, glob, torch.float32, "cpu", False)]
    for flags, tokens, dtype, device, channels in cases:
        monkeypatch.setattr(fast, "cpu_flags", lambda flags=flags: frozenset(flags))
        assert fast.bias_as_channels(tokens, dtype, torch.device(device)) is channels, (flags, tokens, dtype, device)


def test_patch_tokens_are_contiguous():
    sam = _sam(SAM_CONFIGS["tiny"])
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        stock = sam.image_encoder.patch_embed(x)
        fast.enable_fast_path(sam, bf16=False)
        tokens = sam.image_encoder.patch_embed(x)
    assert not stock.is_contiguous() and tokens.is_contiguous()
    assert torch.equal(tokens, stock)


def test_decoder_sdpa_matches_reference_fp32():
    torch.manual_seed(0)
    m = ClipSam(tiny_config("ssp"))
    images = torch.rand(2, 3, 64, 64)
    prompts = Prompts(torch.tensor([0, 1, 1]), points=torch.tensor([[[20.0, 30.0]], [[5.0, 9.0]], [[50.0, 40.0]]]),
                      labels=torch.ones(3, 1, dtype=torch.long))
    with torch.no_grad():
        enc = m.encode(images, ["nucleus", "vesicle"])
        ref_masks, ref_iou = m.decode(enc, prompts, multimask=True)
        info = fast.enable_fast_path(m, bf16=False)
        masks, iou = m.decode(enc, prompts, multimask=True)
    assert info.decoder_modules == 3 * SAM_CONFIGS["tiny"].decoder_depth + 1  # self, 2 cross, final
    assert _rel(masks, ref_masks) <= 1e-5 and _rel(iou, ref_iou) <= 1e-5


def test_bf16_within_tolerance_small_config(monkeypatch):
    """bf16 autocast vs the fp32 reference: embedding relative L2 ≤ 1e-2, mask IoU ≥ 0.98 (every
    block's attention through the explicit bf16 products, as on a CPU outside tests)."""
    calls = []
    original = fast._explicit_attention
    monkeypatch.setattr(fast, "_explicit_attention", lambda *a: calls.append(a[0].dtype) or original(*a))
    sam = _sam(SMALL)
    torch.manual_seed(1)
    x = torch.rand(1, 3, 128, 128) * 255
    pe, md = sam.prompt_encoder, sam.mask_decoder
    points = (torch.tensor([[[40.0, 50.0], [90.0, 20.0]]]), torch.tensor([[1, 0]]))

    def run():
        emb = sam.image_encoder(x)
        sparse, dense = pe(points=points, boxes=None, masks=None)
        low, _ = md(emb, pe.get_dense_pe(), sparse, dense, multimask_output=True)
        return emb, low.float()

    with torch.no_grad():
        ref_emb, ref_low = run()
    fast.enable_fast_path(sam, bf16=True)
    with fast.fast_inference(sam) as info:
        assert info.autocast_dtype == torch.bfloat16
        emb, low = run()
    assert emb.dtype == torch.float32  # embeddings come back in fp32 for caching
    assert calls == [torch.bfloat16] * SMALL.encoder_depth
    assert _rel(emb, ref_emb) <= 1e-2
    for i in range(low.shape[1]):
        assert _iou(low[0, i] > 0, ref_low[0, i] > 0) >= 0.98


def test_state_dict_unchanged_and_disable_restores():
    sam = _sam(SAM_CONFIGS["tiny"])
    stock = copy.deepcopy(sam)
    keys = list(sam.state_dict())
    fast.enable_fast_path(sam, bf16=True)
    state = sam.state_dict()
    assert list(state) == keys
    for k, v in stock.state_dict().items():
        assert torch.equal(state[k], v)
    # A stock checkpoint loads strictly into the fast model and vice versa.
    sam.load_state_dict(stock.state_dict(), strict=True)
    stock.load_state_dict(sam.state_dict(), strict=True)
    copy.deepcopy(sam)  # swapped classes and hooks survive a copy

    fast.disable_fast_path(sam)
    assert fast.fast_path_info(sam) is None
    assert all(type(m) is not fast.FastEncoderAttention and type(m) is not fast.FastDecoderAttention
               for m in sam.modules())
    assert sum(type(m) is sam_enc.Attention for m in sam.modules()) == SAM_CONFIGS["tiny"].encoder_depth
    assert any(type(m) is sam_tr.Attention for m in sam.modules())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(sam.image_encoder(x), stock.image_encoder(x))  # bit-identical again
    assert not sam.image_encoder.neck._forward_hooks


def test_lora_on_qkv_with_fast_path():
    """peft LoRA wraps attn.qkv; the fast forward goes through it (whichever comes first)."""
    peft = pytest.importorskip("peft")
    x = torch.randn(1, 3, 64, 64)
    outs = {}
    for order in ("fast_first", "lora_first"):
        sam = _sam(SAM_CONFIGS["tiny"])
        enc = sam.image_encoder
        with torch.no_grad():
            plain = enc(x)
        cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["qkv"], init_lora_weights=False)
        if order == "fast_first":
            fast.enable_fast_path(sam, bf16=False)
            peft.inject_adapter_in_model(cfg, enc)
        else:
            peft.inject_adapter_in_model(cfg, enc)
            fast.enable_fast_path(sam, bf16=False)
        assert all(type(b.attn) is fast.FastEncoderAttention for b in enc.blocks)
        assert all(hasattr(b.attn.qkv, "lora_A") for b in enc.blocks)
        with torch.no_grad():
            lora_fast = enc(x)
        fast.disable_fast_path(sam)
        with torch.no_grad():
            lora_ref = enc(x)
        assert _rel(lora_fast, lora_ref) <= 1e-5
        assert _rel(lora_fast, plain) > 1e-3  # LoRA really acts
        outs[order] = lora_fast
    # Gradients flow into LoRA through the fast path.
    sam = _sam(SAM_CONFIGS["tiny"])
    peft.inject_adapter_in_model(peft.LoraConfig(r=4, target_modules=["qkv"]), sam.image_encoder)
    fast.enable_fast_path(sam, bf16=False)
    sam.image_encoder(x).square().mean().backward()
    grads = [p.grad for n, p in sam.named_parameters() if "lora_" in n]
    assert grads and all(g is not None for g in grads)


def test_env_switches(monkeypatch):
    sam = _sam(SAM_CONFIGS["tiny"])
    monkeypatch.setenv("NAPARI_CLIPSAM_FAST", "0")
    info = fast.enable_fast_path(sam)
    assert not info.enabled and info.encoder_modules == 0
    assert not any(isinstance(m, (fast.FastEncoderAttention, fast.FastDecoderAttention)) for m in sam.modules())
    with fast.fast_inference(sam):
        assert torch.is_inference_mode_enabled() and not torch.is_autocast_enabled("cpu")
    assert not fast.enable_fast_path(sam, enabled=False).enabled
    monkeypatch.setenv("NAPARI_CLIPSAM_FAST", "1")
    monkeypatch.setenv("NAPARI_CLIPSAM_BF16", "1")
    info = fast.enable_fast_path(sam)
    assert info.enabled and info.autocast_dtype == torch.bfloat16
    with fast.fast_inference(sam):
        assert torch.is_autocast_enabled("cpu")
    with fast.fast_inference(sam, autocast=False):
        assert not torch.is_autocast_enabled("cpu")
    monkeypatch.setenv("NAPARI_CLIPSAM_BF16", "0")
    assert fast.enable_fast_path(sam).autocast_dtype is None
    assert fast.enable_fast_path(sam, bf16=True).autocast_dtype == torch.bfloat16  # parameter wins
    monkeypatch.setenv("NAPARI_CLIPSAM_FAST", "maybe")
    with pytest.raises(ValueError, match="NAPARI_CLIPSAM_FAST"):
        fast.enable_fast_path(sam)


def test_autocast_decision_follows_cpu_flags_and_the_measured_bf16_rate(monkeypatch):
    monkeypatch.setattr(fast, "bf16_matmul_speedup", lambda: 3.8)  # as on an AMD EPYC with avx512_bf16
    monkeypatch.setattr(fast, "cpu_flags", lambda: frozenset({"avx2", "avx512_bf16"}))
    assert fast.autocast_dtype_for("cpu")[0] == torch.bfloat16 and fast.cpu_has_fast_bf16()
    monkeypatch.setattr(fast, "cpu_flags", lambda: frozenset({"avx2", "amx_bf16"}))
    assert fast.autocast_dtype_for("cpu")[0] == torch.bfloat16
    monkeypatch.setattr(fast, "bf16_matmul_speedup", lambda: 0.72)  # as on an Intel Xeon without AMX
    dtype, reason = fast.autocast_dtype_for("cpu")
    assert dtype is None and "0.72×" in reason and not fast.cpu_has_fast_bf16()
    assert fast.cpu_has_native_bf16()  # native, just not faster here

    def not_measured():
        raise AssertionError("no probe without the flags")

    monkeypatch.setattr(fast, "bf16_matmul_speedup", not_measured)
    monkeypatch.setattr(fast, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    dtype, reason = fast.autocast_dtype_for("cpu")
    assert dtype is None and "emulated" in reason and not fast.cpu_has_fast_bf16()
    assert not fast.cpu_has_native_bf16()
    assert fast.autocast_dtype_for("meta")[0] is None


def test_bf16_probe_measures_a_rate_once_per_process():
    speedup = fast.bf16_matmul_speedup()
    assert math.isfinite(speedup) and speedup > 0
    assert fast.bf16_matmul_speedup() == speedup  # cached: one decision per process


def test_clipsam_text_and_clicks_unchanged_with_fast_path():
    """End to end through ClipSam (adapter strategy, text-dependent blocks): fp32 fast == stock."""
    torch.manual_seed(0)
    m = ClipSam(tiny_config("adapter", blocks=1))
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("fc2.weight") or "rel_pos" in name:
                p.normal_(0, 0.3)
    images = torch.rand(2, 3, 64, 64)
    prompts = [Prompts(torch.tensor([0]), points=torch.tensor([[[20.0, 30.0]]]), labels=torch.tensor([[1]])),
               Prompts(torch.tensor([1]))]

    def run():
        feats = m.embed_image(images)
        enc = m.condition(feats, ["nucleus", "vesicle"])
        return m.decode(enc, prompts)

    with torch.no_grad():
        ref_masks, ref_iou = run()
    fast.enable_fast_path(m, bf16=False)
    with fast.fast_inference(m):
        masks, iou = run()
    assert _rel(masks, ref_masks) <= 1e-5 and _rel(iou, ref_iou) <= 1e-5


# vit_b's decoder (64×64 image tokens, 256 wide) decoding 4 clicks at a time.
_DECODE_CALLS = 30
_DECODE_LOOP = """
import resource, torch
from segment_anything.modeling import TwoWayTransformer
from napari_clipsam.models import fast
from napari_clipsam.models.decoding import image_side, two_way
torch.manual_seed(0)
tr = TwoWayTransformer(depth=2, embedding_dim=256, num_heads=8, mlp_dim=2048)
notes = fast.enable_fast_path(tr, bf16=False).notes
side = image_side(tr, torch.randn(1, 256, 64, 64), torch.randn(1, 256, 64, 64))
tokens = torch.randn(1, 4, 7, 256)
with torch.inference_mode():
    for _ in range(2):
        two_way(tr, side, tokens)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range({calls}):
        two_way(tr, side, tokens)
print(next(n for n in notes if n.startswith("allocator")))
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _decode_loop_faults(monkeypatch, malloc: str) -> tuple[str, int]:
    import subprocess
    import sys

    monkeypatch.setenv("NAPARI_CLIPSAM_MALLOC", malloc)
    out = subprocess.run([sys.executable, "-c", _DECODE_LOOP.format(calls=_DECODE_CALLS)], capture_output=True, text=True, check=True).stdout
    note, faults = out.strip().split("\n")[-2:]
    return note, int(faults)


@pytest.mark.skipif(not fast.tune_malloc().startswith("allocator: glibc"), reason="glibc's mallopt only")
def test_malloc_settings_stop_refaulting_the_decoders_temporaries(monkeypatch):
    """With glibc's defaults, vit_b-sized decode calls fault their 16 MB temporaries in again on
    every call (they go back to the kernel after each); with the fast path's settings the heap
    keeps them. 30 calls, measured on EPYCs: 279-449 k faults with the defaults (2.3-3.6
    temporaries a call: glibc's adaptive thresholds vary from run to run, which made a count
    over 10 calls flaky), 2-5000 with ours."""
    import resource

    temporary = 4 * 64 * 64 * 256 * 4 // resource.getpagesize()  # pages of one (4, 4096, 256) fp32 tensor
    note, faults = _decode_loop_faults(monkeypatch, "1")
    assert note.startswith("allocator: glibc") and faults < 25_000, (note, faults)
    note, stock_faults = _decode_loop_faults(monkeypatch, "0")
    assert "untouched" in note and stock_faults > _DECODE_CALLS * temporary, (note, stock_faults)
