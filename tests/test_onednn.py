"""oneDNN's fused linear (models/onednn.py): same values as ``nn.Linear`` (+ GELU), taken where
no gradient is needed and, in fp32, for a frozen layer's input gradient; the image encoder's MLPs
use it through the fast path."""

import copy
import platform

import pytest
import torch
import torch.nn.functional as F
from segment_anything.modeling import common as sam_common
from torch import nn
from torch.profiler import ProfilerActivity, profile

from napari_clipsam.models import fast, onednn
from napari_clipsam.models.sam_parts import SAM_CONFIGS, build_sam

X86 = platform.machine().lower() in ("x86_64", "amd64")
FUSED = "mkldnn::_linear_pointwise"


def _rel(a, b):
    return float((a.detach().float() - b.detach().float()).norm() / b.detach().float().norm())


def _ops(fn):
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = fn()
    return out, {e.key for e in prof.key_averages()}


def _layer(seed=0, n_in=48, n_out=80):
    torch.manual_seed(seed)
    return nn.Linear(n_in, n_out)


@pytest.mark.skipif(not X86, reason="oneDNN's fused linear is used on x86-64 only")
def test_available_on_x86():
    # The x86 wheels (CI's) have the op; if a torch release drops it this fails loudly instead of
    # the fast path silently losing it.
    assert onednn.onednn_linear_available(torch.float32)


@pytest.mark.parametrize("act", ["none", "gelu"])
def test_same_values_as_nn_linear_fp32(act):
    layer = _layer()
    x = torch.randn(2, 7, 9, 48)
    ref = layer(x) if act == "none" else F.gelu(layer(x))
    with torch.inference_mode():
        out, ops = _ops(lambda: onednn.linear(x, layer, act))
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert _rel(out, ref) <= 1e-6
    assert (FUSED in ops) == onednn.onednn_linear_available(torch.float32)
    # A strided input (a transposed view) gives the same values.
    xt = x.transpose(1, 2)
    with torch.inference_mode():
        assert _rel(onednn.linear(xt, layer, act), ref.transpose(1, 2)) <= 1e-6


@pytest.mark.skipif(not onednn.onednn_linear_available(torch.bfloat16), reason="no oneDNN bf16 on this CPU")
def test_bf16_under_autocast_like_nn_linear():
    layer = _layer()
    x = torch.randn(64, 48)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.gelu(layer(x))
        out, ops = _ops(lambda: onednn.linear(x, layer, "gelu"))
    assert out.dtype == ref.dtype == torch.bfloat16
    assert FUSED in ops
    exact = F.gelu(F.linear(x.double(), layer.weight.double(), layer.bias.double()))
    # One rounding to bf16 (after the GELU) instead of two: at least as close to exact math.
    assert _rel(out, exact) <= _rel(ref, exact) + 1e-3 and _rel(out, exact) <= 8e-3


def test_gradients_take_torchs_linear():
    layer = _layer()
    x = torch.randn(5, 48, requires_grad=True)
    out, ops = _ops(lambda: onednn.linear(x, layer, "gelu"))
    assert FUSED not in ops
    out.square().sum().backward()
    ref_x = x.detach().clone().requires_grad_(True)
    ref_layer = copy.deepcopy(layer)
    ref_layer.weight.grad = None
    F.gelu(ref_layer(ref_x)).square().sum().backward()
    assert torch.allclose(x.grad, ref_x.grad) and torch.allclose(layer.weight.grad, ref_layer.weight.grad)
    # Frozen weights and an input without gradient: nothing to differentiate, so the fused op runs.
    frozen = _layer().requires_grad_(False)
    _, ops = _ops(lambda: onednn.linear(torch.randn(5, 48), frozen))
    assert (FUSED in ops) == onednn.onednn_linear_available(torch.float32)


@pytest.mark.parametrize("act", ["none", "gelu"])
def test_frozen_layer_input_gradient_through_the_op_in_fp32(act):
    """LoRA's frozen layers in fp32 training: forward and the input's gradient run the op (also in
    backward), with torch's values; under bf16 autocast torch's linear keeps them."""
    frozen = _layer().requires_grad_(False)
    x = torch.randn(3, 7, 48, requires_grad=True)
    ref_x = x.detach().clone().requires_grad_(True)
    g = torch.randn(3, 7, 80)

    def run():
        out = onednn.linear(x.transpose(0, 1), frozen, act).transpose(0, 1)  # a strided input too
        out.backward(g)
        return out

    out, ops = _ops(run)
    ref = frozen(ref_x)
    ref = F.gelu(ref) if act == "gelu" else ref
    ref.backward(g)
    assert (FUSED in ops) == onednn.onednn_linear_available(torch.float32)
    assert _rel(out, ref) <= 1e-6 and _rel(x.grad, ref_x.grad) <= 1e-6
    assert frozen.weight.grad is None and frozen.bias.grad is None
    if onednn.onednn_linear_available(torch.float32):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            onednn.linear(x, frozen, act).sum().backward()
        calls = [e.count for e in prof.key_averages() if e.key == FUSED]
        assert calls == [2]  # forward and the input gradient
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, ops = _ops(lambda: onednn.linear(x, frozen, act))
    assert FUSED not in ops


def test_switch_and_other_modules_fall_back(monkeypatch):
    layer = _layer()
    x = torch.randn(3, 48)
    monkeypatch.setenv("NAPARI_CLIPSAM_ONEDNN", "0")
    assert not onednn.onednn_linear_available()
    with torch.inference_mode():
        out, ops = _ops(lambda: onednn.linear(x, layer, "gelu"))
    assert FUSED not in ops and torch.equal(out, F.gelu(layer(x)))
    monkeypatch.setenv("NAPARI_CLIPSAM_ONEDNN", "maybe")  # parsed like the other switches
    with torch.inference_mode(), pytest.raises(ValueError, match="NAPARI_CLIPSAM_ONEDNN"):
        onednn.linear(x, layer)
    monkeypatch.delenv("NAPARI_CLIPSAM_ONEDNN")

    class Scaled(nn.Linear):  # any subclass (peft's LoRA layers wrap instead) keeps its own forward
        def forward(self, x):
            return 2 * super().forward(x)

    scaled = Scaled(48, 80)
    with torch.inference_mode():
        out, ops = _ops(lambda: onednn.linear(x, scaled))
    assert FUSED not in ops and torch.equal(out, scaled(x))
    with pytest.raises(ValueError, match="act must be one of"):
        onednn.linear(x, layer, "relu")


def test_encoder_mlps_swapped_and_restored():
    sam = build_sam(SAM_CONFIGS["tiny"])
    stock = copy.deepcopy(sam)
    x = torch.randn(1, 3, 64, 64)
    info = fast.enable_fast_path(sam, bf16=False)
    assert info.onednn_linear == onednn.onednn_linear_available()
    assert all(type(b.mlp) is fast.FastEncoderMLP for b in sam.image_encoder.blocks)
    # The mask decoder's MLPs stay segment-anything's.
    assert all(type(m) is sam_common.MLPBlock for m in sam.mask_decoder.modules() if isinstance(m, sam_common.MLPBlock))
    with torch.inference_mode():
        out, ops = _ops(lambda: sam.image_encoder(x))
        ref = stock.image_encoder(x)
    assert _rel(out, ref) <= 1e-5
    assert (FUSED in ops) == info.onednn_linear
    fast.disable_fast_path(sam)
    assert all(type(b.mlp) is sam_common.MLPBlock for b in sam.image_encoder.blocks)


def test_first_check_under_autocast_still_finds_the_op():
    # The once-per-process check compares with an fp32 reference even when it first runs inside
    # the caller's bf16 autocast (where F.linear would run in bf16 and fail the fp32 tolerance).
    onednn._supported.cache_clear()
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            found = onednn.onednn_linear_available(torch.float32)
        assert found == X86
    finally:
        onednn._supported.cache_clear()
