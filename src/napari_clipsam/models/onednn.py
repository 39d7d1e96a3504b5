"""Linear layers through oneDNN's fused linear on x86 CPUs, for inference.

On the CPU, torch computes an fp32 ``nn.Linear`` with its BLAS (MKL in the x86 wheels) and a
bf16 one with oneDNN, and the activation after it (SAM's encoder MLP: GELU) is a pass of its own
over memory. ``torch.ops.mkldnn._linear_pointwise`` (what ``torch.compile``'s CPU backend emits
for a linear layer and its activation) runs the product in oneDNN and applies the bias and the
activation as the result is written. Measured on an AMD EPYC (Zen 5, 2 threads): MKL's fp32
products ran at 198-225 GFLOP/s against oneDNN's 373-499 (MKL takes its AVX2 code on AMD), and
a vit_b 1024² embedding with the fast path's encoder layers through :func:`linear` took 5.08 →
3.25 s in fp32 and 2.51 → 2.45 s in bf16 (best of 5, interleaved in one process).

:func:`linear` uses the op for a plain ``nn.Linear`` (a peft LoRA wrapper keeps its own forward)
on CPU tensors, where no gradient is needed, in fp32 or, where oneDNN supports it, bf16. In fp32
training of a frozen layer (LoRA's other layers) it also runs forward and the input's gradient
through the op (:class:`_FrozenLinear`; the op itself has no backward): a vit_b training step with
LoRA on the last 2 blocks, fp32, 2.94–3.58 → 2.56–2.91 s on the Zen 5. In bf16 training it gained
nothing (torch's bf16 products are oneDNN's already), so there and with trainable weights it is
``layer(x)``. The op exists only on x86-64 builds with oneDNN, and is checked once per process
against ``F.linear`` before it is used. ``NAPARI_CLIPSAM_ONEDNN=0`` turns it off.
"""

from __future__ import annotations

import logging
import platform
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from .switches import env_flag

log = logging.getLogger(__name__)

_X86 = {"x86_64", "amd64", "i686", "x86"}
_ACTIVATIONS = {"none": None, "gelu": F.gelu}


def _fused(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, act: str) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, act, [], "none" if act == "gelu" else "")


class _FrozenLinear(torch.autograd.Function):
    """``x wᵀ + b`` through the op, for a weight and bias that take no gradient; backward gives
    the input's, ``dy w``, through the op as well (with ``wᵀ`` as its weight)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(weight)
        return _fused(x, weight, bias, "none")

    @staticmethod
    @once_differentiable
    def backward(ctx, d_y):
        (weight,) = ctx.saved_tensors
        return _fused(d_y.contiguous(), weight.t().contiguous(), None, "none"), None, None


@torch.autocast("cpu", enabled=False)  # the reference in fp32, whatever the caller's context
def _agrees(dtype: torch.dtype, tol: float) -> bool:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 24, generator=g).to(dtype)
    w, b = torch.randn(40, 24, generator=g).to(dtype), torch.randn(40, generator=g).to(dtype)
    for act, fn in _ACTIVATIONS.items():
        ref = F.linear(x.float(), w.float(), b.float())
        ref = fn(ref) if fn else ref
        out = _fused(x, w, b, act)
        if out.shape != ref.shape or out.dtype != dtype:
            return False
        if float((out.float() - ref).norm() / ref.norm()) > tol:
            return False
    return True


@lru_cache(maxsize=None)
def _supported(dtype: torch.dtype) -> bool:
    if platform.machine().lower() not in _X86 or not torch.backends.mkldnn.is_available():
        return False
    if not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return False
    if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return False
    try:
        ok = _agrees(dtype, 1e-5 if dtype == torch.float32 else 1e-2)
    except (RuntimeError, TypeError, NotImplementedError) as e:  # op missing or refusing in this build
        log.info("oneDNN fused linear unavailable for %s: %s", dtype, e)
        return False
    if not ok:
        log.warning("oneDNN fused linear disagrees with F.linear for %s: not used", dtype)
    return ok


def onednn_linear_available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether :func:`linear` runs oneDNN's fused linear for CPU tensors of ``dtype`` here."""
    if env_flag("NAPARI_CLIPSAM_ONEDNN") is False:
        return False
    return dtype in (torch.float32, torch.bfloat16) and _supported(dtype)


def linear(x: torch.Tensor, layer: nn.Module, act: str = "none") -> torch.Tensor:
    """``act(layer(x))`` for an ``nn.Linear`` ``layer`` and ``act`` ``"none"`` or ``"gelu"``
    (exact, erf): one oneDNN call where it applies (see the module), else
    ``layer(x)`` and the activation. Under CPU autocast the product runs in the autocast dtype,
    as ``nn.Linear`` would."""
    if act not in _ACTIVATIONS:
        raise ValueError(f"linear: act must be one of {sorted(_ACTIVATIONS)}, got {act!r}")
    if type(layer) is nn.Linear and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16):
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
        w, b = layer.weight, layer.bias
        grads = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, w, b))
        if not grads and onednn_linear_available(dtype):
            return _fused(x.to(dtype).contiguous(), w.to(dtype), None if b is None else b.to(dtype), act)
        frozen = not any(t is not None and t.requires_grad for t in (w, b))
        if grads and frozen and dtype == x.dtype == w.dtype == torch.float32 and onednn_linear_available(dtype):
            y = _FrozenLinear.apply(x.contiguous(), w, b)
            return F.gelu(y) if act == "gelu" else y
    y = layer(x)
    fn = _ACTIVATIONS[act]
    return fn(y) if fn else y


__all__ = ["linear", "onednn_linear_available"]
