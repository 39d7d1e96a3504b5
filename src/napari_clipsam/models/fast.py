"""Inference fast path for SAM's parts (inside :class:`~napari_clipsam.models.clipsam.ClipSam`
or a plain segment-anything ``Sam``).

Five pieces, all reversible and none touching a parameter:

* **SDPA attention in the image encoder.** segment-anything's ``image_encoder.Attention``
  materialises the (N, N) score matrix, adds the decomposed relative-position terms and runs a
  softmax; here the relative-position terms (``rel_h``/``rel_w``, computed exactly as SAM does)
  go into :func:`torch.nn.functional.scaled_dot_product_attention` (fused kernel, no separate
  softmax pass): as an additive ``attn_mask`` built in slabs, or, in bf16/fp16 global attention,
  as extra query/key channels, so that the (N, N) bias (805 MB at 1024²) never exists. In bf16
  on a CPU, where torch's flash kernel runs no faster than in fp32, and in fp32 training on a
  CPU, attention is explicit products with the scores, bias and softmax in cache-sized fp32
  chunks, recomputed in backward (see :class:`FastEncoderAttention`).
* **Contiguous patch tokens** (:class:`FastPatchEmbed`): stock hands the blocks a strided view,
  which slows every element-wise op of the encoder.
* **oneDNN linear layers in the image encoder** (:class:`FastEncoderMLP` and the attention's
  ``qkv``/``proj``, through :func:`~napari_clipsam.models.onednn.linear`): on x86 CPUs, each
  linear layer, with the MLP's GELU fused into the first, is one oneDNN call when no gradient is
  needed (torch's fp32 products go through MKL, which takes its AVX2 code on AMD CPUs).
* **SDPA in the mask decoder's two-way transformer** (click latency). The decoder itself is
  run by :mod:`~napari_clipsam.models.decoding` (always: same math as segment-anything's): the
  prompt-independent image side is computed once per image and, under autocast, the image-side
  tensors stay in bf16/fp16 from op to op (autocast would cast them back and forth).
* **Autocast** (bf16 on CPUs with native bf16 matmuls — ``avx512_bf16`` or ``amx_bf16`` — where
  a bf16 matrix product measures clearly faster than an fp32 one, see :func:`cpu_has_fast_bf16`;
  bf16 or fp16 on CUDA) plus ``torch.inference_mode`` through :func:`fast_inference`.

Besides, once per process and not undone (it is process-wide), :func:`tune_malloc` sets glibc's
allocator on Linux: buffers of up to 32 MB stay in the heap and up to 256 MB of freed heap is
kept for reuse, instead of glibc's defaults, which hand such buffers back to the kernel and fault
them in again page by page on the next call (millions of page faults per ``segment_text`` at
vit_b).

The swap is a class swap of SAM's attention, patch-embedding and encoder MLP modules
(``module.__class__``): parameters, buffers, ``state_dict`` keys and submodules stay as they
are, so checkpoints load unchanged and peft's LoRA wrapping ``attn.qkv`` keeps working (the fast
forward calls ``self.qkv(x)`` for any module that is not a plain ``nn.Linear``, never its
weight).

Tolerances (tests/test_fast.py; bench/run.py at vit_b size): SDPA in fp32 is the same math as
the reference — relative difference ≤ 1e-5. Under bf16 autocast the image embedding differs from
the fp32 reference by a relative L2 ≤ 1e-2 and masks by IoU ≥ 0.98.

Switches: ``NAPARI_CLIPSAM_FAST=0`` turns the whole fast path off (:func:`enable_fast_path`
then restores stock modules); ``NAPARI_CLIPSAM_BF16=0|1`` overrides the autocast decision;
``NAPARI_CLIPSAM_THREADS=n`` sets torch's intra-op threads; ``NAPARI_CLIPSAM_MALLOC=0`` leaves
glibc's allocator settings alone; ``NAPARI_CLIPSAM_ONEDNN=0`` keeps torch's own linear layers.
The first three have a parameter twin.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import platform
import time
from dataclasses import dataclass, field
from functools import lru_cache, partial
from typing import Iterator

import torch
import torch.nn.functional as F
from segment_anything.modeling import common as _sam_common
from segment_anything.modeling import image_encoder as _sam_enc
from segment_anything.modeling import transformer as _sam_tr
from torch import nn
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from .onednn import linear, onednn_linear_available
from .switches import env_flag

log = logging.getLogger(__name__)

#: Largest additive bias (bytes) built at once by the masked encoder attention: slabs of
#: (window, head) items, or of one item's query rows where an item's bias is larger (a 4096-token
#: global block: 1024 rows in fp32, 2048 in bf16). Small enough to stay in cache between being
#: built and being read. Measured per vit_b global block (12 heads, 2 threads, Zen 5 EPYC) against
#: 192 MB slabs of whole heads: bf16 0.42 → 0.31 s, fp32 0.47 → 0.29 s, fp32 forward + backward
#: 2.9 → 1.6 s (8 MB 0.32 / 0.32 / 1.73 s, 32 MB 0.40 / 0.50 / 1.92 s); 25 windows: bf16 unchanged
#: (35 ms), fp32 41 → 29 ms.
_MASK_BUDGET = 16 * 2**20
#: In bf16/fp16, windows of at most this many tokens a side (vit_b/l/h: 14) build the bias as one
#: matrix product with the one-hot key positions rather than by broadcasting, whose inner loops
#: are only w long. vit_b's 25 windows × 12 heads, Zen 5 EPYC, 2 threads: bf16 10.3 → 1.2 ms
#: (32 a side: 1.5 vs 1.8 ms, 64: 0.8 vs 2.3 ms; in fp32 broadcasting is faster at every size).
_PRODUCT_BIAS_MAX_SIDE = 16
#: In bf16/fp16 on CUDA or a CPU with AMX (:func:`augment_on_cpu`), attention over this many
#: tokens or more carries the relative positions in extra query/key channels instead of a mask:
#: global attention at 1024² (4096 tokens) and 512² (1024). Measured at vit_b, 2 threads: bf16
#: (Intel Xeon, AMX) 4096 tokens 0.38 s augmented vs 0.46 s masked per block, 196-token windows
#: 54 vs 35 ms; but bf16 on an AMD EPYC with avx512_bf16 and no AMX, the whole 1024² embedding
#: 5.8-6.2 s augmented vs 4.8 s masked (with gradients the channels won there too: a bf16 LoRA
#: step at 1024² 7.9 s augmented vs 10.8 s masked, whose bias slabs are rebuilt in backward;
#: since then bf16 on such CPUs takes explicit products, faster than both: explicit_scores). In
#: fp32 the extra channels triple the kernel's work for nothing and the mask wins everywhere: AMD
#: EPYC (AVX2), 4096 tokens 1.4-1.9 s masked vs 2.7-3.3 s augmented (SDPA alone); a global
#: block's attention with gradients, slabs rebuilt in backward, forward + backward 9.0 vs 11.1 s.
_AUGMENT_FROM = 1024
_AUGMENT_DTYPES = (torch.bfloat16, torch.float16)
#: Largest chunk of scores (bytes; fp32, float64 in tests) in the explicit attention
#: (:func:`_explicit_attention`, :func:`explicit_scores`), forward and backward. Measured at vit_b
#: (12 heads, 2 threads, Zen 5 EPYC, bf16 inference), per 4096-token global block / 25 windows /
#: 1024-token global block (512² input): 1 MB 189 / 14.2 / 10.9 ms, 2 MB 162 / 13.1 / 9.6, 4 MB 157 / 12.9 / 10.0, 8 MB
#: 202 / 22.3 / 11.9, 16 MB 230 / 25.5 / 13.5; the masked flash kernel 335 / 25.0 / 20.4 ms.
_SCORES_BUDGET = 4 * 2**20

_INFO_ATTR = "_clipsam_fast_path"
_HOOKS_ATTR = "_clipsam_fast_hooks"


# ---- switches -------------------------------------------------------------------------------
def fast_path_allowed() -> bool:
    """False when ``NAPARI_CLIPSAM_FAST=0`` (the user turned the fast path off)."""
    return env_flag("NAPARI_CLIPSAM_FAST") is not False


# ---- hardware -------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _cpuinfo() -> dict[str, str]:
    """The first processor's fields in Linux ``/proc/cpuinfo`` (empty elsewhere)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def cpu_flags() -> frozenset[str]:
    """CPU feature flags (Linux ``/proc/cpuinfo``; empty elsewhere)."""
    info = _cpuinfo()
    return frozenset(info.get("flags", info.get("Features", "")).split())


def cpu_model() -> str:
    """A human-readable CPU name."""
    return _cpuinfo().get("model name") or platform.processor() or platform.machine()


def cpu_id() -> str:
    """The CPU's family, model and stepping, e.g. "cpu family 26 model 2 stepping 1" ("" where
    /proc/cpuinfo does not give them): virtual machines often name every AMD CPU just "AMD EPYC"
    (family 25 is Zen 3/4, 26 is Zen 5)."""
    info = _cpuinfo()
    return " ".join(f"{k} {info[k]}" for k in ("cpu family", "model", "stepping") if k in info)


#: bf16 autocast is used on a CPU only where a bf16 matrix product runs at least this many times
#: faster than an fp32 one. Measured (2 cores, rate bf16 / fp32): AMD EPYC with avx512_bf16 3.8×;
#: an Intel Xeon with avx512_bf16 and no AMX 0.72× (its vit_b embedding: fp32 8.1 s, bf16 11.4 s).
BF16_MIN_SPEEDUP = 1.3


@lru_cache(maxsize=1)
def bf16_matmul_speedup() -> float:
    """How many times faster a bf16 matrix product runs than an fp32 one here: a (1024 × 768) ·
    (768 × 768) product, best of 5 each after a warm-up, measured once per process (~0.1 s)."""

    def best(dtype: torch.dtype) -> float:
        a, b = torch.randn(1024, 768).to(dtype), torch.randn(768, 768).to(dtype)
        a @ b
        times = []
        for _ in range(5):
            t = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t)
        return max(min(times), 1e-9)

    with torch.inference_mode():
        return best(torch.float32) / best(torch.bfloat16)


#: CPU flags of native bf16 matrix products (AVX512-BF16, AMX); without one oneDNN emulates bf16.
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def cpu_has_native_bf16() -> bool:
    """True where the CPU has native bf16 matrix products (any of :data:`NATIVE_BF16_FLAGS`);
    whether they are also faster than fp32 here is :func:`cpu_has_fast_bf16`."""
    return bool(NATIVE_BF16_FLAGS & cpu_flags())


def cpu_has_fast_bf16() -> bool:
    """True where the CPU has native bf16 matmuls (:func:`cpu_has_native_bf16`) and they measure
    at least :data:`BF16_MIN_SPEEDUP` × fp32's rate (:func:`bf16_matmul_speedup`); elsewhere
    oneDNN emulates bf16, or runs it no faster, and autocast would be slower than fp32."""
    return cpu_has_native_bf16() and bf16_matmul_speedup() >= BF16_MIN_SPEEDUP


def augment_on_cpu() -> bool:
    """Whether bf16/fp16 global attention on this CPU carries the relative positions as extra
    query/key channels (AMX: ``amx_bf16``) rather than as explicit products (see
    ``_AUGMENT_FROM`` and :func:`explicit_scores`). Measured at vit_b 1024², 2 threads, Intel Xeon
    with AMX (bench/README.md, run 19): a bf16 embedding 1.14-1.27 s with the channels vs
    1.77-1.85 s with explicit products in the global blocks too; a bf16 LoRA step (last 2 blocks)
    2.40 vs 3.26 s, with the frozen-prefix cache 1.38 vs 1.64 s."""
    return "amx_bf16" in cpu_flags()


def bias_as_channels(tokens: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether encoder attention over ``tokens`` tokens in ``dtype`` on ``device`` applies the
    relative positions as extra query/key channels: bf16/fp16 from ``_AUGMENT_FROM`` tokens (the
    global blocks), on CUDA or on a CPU where :func:`augment_on_cpu`."""
    return (tokens >= _AUGMENT_FROM and dtype in _AUGMENT_DTYPES
            and (torch.device(device).type != "cpu" or augment_on_cpu()))


def explicit_scores(dtype: torch.dtype, device: torch.device, grad: bool) -> bool:
    """Whether encoder attention in ``dtype`` on ``device`` (``grad``: gradients recorded) that
    does not take the channels (:func:`bias_as_channels`) runs as explicit products
    (:func:`_explicit_attention`) rather than SDPA with a mask: bf16 on a CPU, and fp32 on a CPU
    with gradients. Measured at vit_b, Zen 5 EPYC, 2 threads: torch's CPU flash kernel runs at
    the same ~185 GFLOP/s in bf16 as in fp32 (a 4096-token global block, 0.28 s without a bias),
    while a bf16 product of the same shapes runs at ~530. Per global block / 25 windows: bf16
    inference 335 → 157 ms / 25.0 → 12.9 ms; bf16 forward + backward 1.87 s (channels) → 0.70 s
    / 140 → 63 ms (mask); fp32 forward + backward 1.68-1.91 → 1.44-1.56 s / 150 → 108 ms. fp32
    inference keeps the mask (341 vs 508 ms per global block). In bf16 the bias is also added to
    fp32 scores, where the mask is a bf16 tensor."""
    if torch.device(device).type != "cpu":
        return False
    return dtype == torch.bfloat16 or (grad and dtype == torch.float32)


def autocast_dtype_for(device: torch.device | str) -> tuple[torch.dtype | None, str]:
    """(dtype to autocast to on ``device`` or None, the reason in words)."""
    device = torch.device(device)
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "CUDA with bf16"
        return torch.float16, "CUDA without bf16: fp16"
    if device.type == "cpu":
        if not cpu_has_native_bf16():
            return None, "CPU without avx512_bf16/amx_bf16: bf16 would be emulated (slower than fp32)"
        speedup = bf16_matmul_speedup()
        if speedup >= BF16_MIN_SPEEDUP:
            return torch.bfloat16, f"CPU with native bf16 (avx512_bf16/amx_bf16), matmuls {speedup:.1f}× fp32's rate"
        return None, (f"CPU with avx512_bf16/amx_bf16, but bf16 matmuls measured {speedup:.2f}× fp32's rate "
                      f"(< {BF16_MIN_SPEEDUP}×): fp32 is faster here")
    return None, f"no autocast on {device.type}"


# ---- allocator --------------------------------------------------------------------------------
#: glibc ``mallopt`` parameters and the values :func:`tune_malloc` sets: allocations up to
#: M_MMAP_THRESHOLD (32 MB, glibc's largest) come from the heap, and freed heap is handed back to
#: the kernel only beyond M_TRIM_THRESHOLD. vit_b 1024², bf16, 2 threads (Intel Xeon, AMX), one
#: process each: embedding 1.75-2.58 → 1.30-1.49 s, ``segment_text`` (1377 seeds) 15.8-16.3 →
#: 14.7-15.1 s, minor page faults of 3 embeddings + 3 ``segment_text`` 7.3 M → 1.3 M
#: (bench/README.md, fifteenth session).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MALLOC_SETTINGS = {_M_MMAP_THRESHOLD: 32 * 2**20, _M_TRIM_THRESHOLD: 256 * 2**20}


@lru_cache(maxsize=1)
def tune_malloc() -> str:
    """Set glibc's allocator for large, short-lived tensors (:data:`MALLOC_SETTINGS`), once per
    process; returns what was done, in words.

    glibc's defaults adapt its mmap threshold to freed blocks but trim the heap beyond twice that,
    so the decoder's and the encoder's temporaries of a few to tens of MB are returned to the
    kernel after each call and faulted in again, page by page, on the next. Process-wide and not
    undone; skipped with ``NAPARI_CLIPSAM_MALLOC=0``, off Linux, and where the C library is not
    glibc.
    """
    if env_flag("NAPARI_CLIPSAM_MALLOC") is False:
        return "allocator untouched (NAPARI_CLIPSAM_MALLOC=0)"
    if platform.system() != "Linux":
        return f"allocator untouched ({platform.system()}: not glibc)"
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        version = libc.gnu_get_libc_version().decode()
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return "allocator untouched (the C library is not glibc)"
    if not all(mallopt(param, value) == 1 for param, value in MALLOC_SETTINGS.items()):
        return f"allocator: glibc {version} refused mallopt"
    return (f"allocator: glibc {version} keeps blocks up to {MALLOC_SETTINGS[_M_MMAP_THRESHOLD] >> 20} MB in "
            f"the heap and up to {MALLOC_SETTINGS[_M_TRIM_THRESHOLD] >> 20} MB freed heap for reuse")


# ---- fast attention modules -----------------------------------------------------------------
def _key_positions(h: int, w: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(h·w, h + w): each key's row and column as one-hot codes, in segment-anything's token order."""
    rows = torch.arange(h, device=device).repeat_interleave(w)
    cols = torch.arange(w, device=device).repeat(h)
    return torch.cat([F.one_hot(rows, h), F.one_hot(cols, w)], dim=1).to(dtype)


def _chunks(items: int, n: int, size: int, budget: int) -> tuple[int, int]:
    """(items a chunk, query rows a chunk) so that a chunk's (rows, n) matrices of ``size``-byte
    numbers — a bias slab, or scores — over ``items`` (window, head) items of ``n`` tokens stay
    under ``budget`` bytes: several whole items where one fits, else one item's query rows."""
    rows = max(1, min(n, budget // (size * n)))
    step = max(1, min(items, budget // (size * n * n))) if rows == n else 1
    return step, rows


def _bias_slab(q, k, v, t_h, t_w, keys=None):
    """SDPA of (I, 1, R, c) query rows over (I, 1, N, c) keys and values with the bias built
    from their (I, 1, R, h) and (I, 1, R, w) terms: by broadcasting, or with ``keys`` (the
    (N, h + w) one-hot key positions) as one product ``[t_h, t_w] · keysᵀ`` (the same sums)."""
    if keys is None:
        bias = t_h[..., :, None] + t_w[..., None, :]
    else:
        bias = torch.cat([t_h, t_w], dim=-1) @ keys.t()
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.reshape(q.shape[0], 1, q.shape[2], k.shape[2]))


def _masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, t_h: torch.Tensor,
                      t_w: torch.Tensor) -> torch.Tensor:
    """SDPA of (B, nh, N, c) ``q, k, v`` plus the bias ``t_h[..., n, row(m)] + t_w[..., n, col(m)]``
    ((B, nh, N, h) and (B, nh, N, w) terms; key m = row·w + col).

    The bias is built in slabs under ``_MASK_BUDGET`` bytes: several (window, head) items, or
    one item's query rows (attention rows are independent). When there is more than one slab
    and gradients are recorded, each slab runs under :func:`torch.utils.checkpoint.checkpoint`:
    backward rebuilds its bias instead of keeping it, so training holds one slab's bias at a
    time, not all of a global block's (805 MB at 1024²).
    """
    b, nh, n, _ = q.shape
    items = b * nh
    q, k, v = (x.reshape(items, 1, n, x.shape[-1]) for x in (q, k, v))
    h, w = t_h.shape[-1], t_w.shape[-1]
    t_h, t_w = t_h.reshape(items, 1, n, h), t_w.reshape(items, 1, n, w)
    slab = _bias_slab
    if q.dtype in _AUGMENT_DTYPES and max(h, w) <= _PRODUCT_BIAS_MAX_SIDE:
        slab = partial(_bias_slab, keys=_key_positions(h, w, q.dtype, q.device))
    step, rows = _chunks(items, n, q.element_size(), _MASK_BUDGET)
    recompute = ((step < items or rows < n) and torch.is_grad_enabled()
                 and any(x.requires_grad for x in (q, k, v, t_h, t_w)))
    outs = []
    for i in range(0, items, step):
        qi, ki, vi, hi, wi = (x[i:i + step] for x in (q, k, v, t_h, t_w))
        parts = []
        for r in range(0, n, rows):
            part = (qi[:, :, r:r + rows], ki, vi, hi[:, :, r:r + rows], wi[:, :, r:r + rows])
            parts.append(checkpoint(slab, *part, use_reentrant=True) if recompute else slab(*part))
        outs.append(parts[0] if len(parts) == 1 else torch.cat(parts, 2))
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    return out.reshape(b, nh, n, -1)


def _chunk_geometry(items: int, n: int, dtype: torch.dtype) -> tuple[int, int, torch.dtype]:
    """(items a chunk, query rows a chunk, the scores' dtype) for explicit attention over ``items``
    (window, head) items of ``n`` tokens: at most ``_SCORES_BUDGET`` bytes of scores a chunk."""
    acc = torch.promote_types(dtype, torch.float32)
    return (*_chunks(items, n, torch.finfo(acc).bits // 8, _SCORES_BUDGET), acc)


def _chunk_weights(q, k_t, t_h, t_w, scale, acc):
    """Attention weights ``softmax(scale · q kᵀ + bias)`` of one chunk, in ``acc`` (fp32 for bf16
    inputs): (m, R, c) queries, (m, c, N) keys, (m, R, h) and (m, R, w) bias terms."""
    scores = torch.bmm(q, k_t)
    m, rows = scores.shape[:2]
    h, w = t_h.shape[-1], t_w.shape[-1]
    biased = torch.add(t_h[..., None].to(acc), scores.view(m, rows, h, w), alpha=scale)
    biased += t_w[..., None, :]
    return torch.softmax(biased.view(m, rows, h * w), dim=-1)


class _ExplicitAttention(torch.autograd.Function):
    """(I, N, c) ``q, k, v`` and (I, N, h), (I, N, w) bias terms → (I, N, c), chunk by chunk
    (:func:`_chunk_geometry`). Backward recomputes each chunk's weights (the same ops, so the
    same values as forward) instead of keeping any (N, N) tensor, and returns the gradients of
    ``q, k, v`` and of both bias terms."""

    @staticmethod
    def forward(ctx, q, k, v, t_h, t_w, scale):
        items, n, _ = q.shape
        step, rows, acc = _chunk_geometry(items, n, q.dtype)
        k_t = k.transpose(1, 2)
        out = torch.empty_like(q)
        for i in range(0, items, step):
            for r in range(0, n, rows):
                at = (slice(i, i + step), slice(r, r + rows))
                weights = _chunk_weights(q[at], k_t[i:i + step], t_h[at], t_w[at], scale, acc)
                torch.bmm(weights.to(q.dtype), v[i:i + step], out=out[at])
        ctx.save_for_backward(q, k, v, t_h, t_w, out)
        ctx.scale = scale
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out):
        q, k, v, t_h, t_w, out = ctx.saved_tensors
        scale = ctx.scale
        items, n, _ = q.shape
        step, rows, acc = _chunk_geometry(items, n, q.dtype)
        h, w = t_h.shape[-1], t_w.shape[-1]
        d_out = d_out.contiguous()
        # softmax backward: dS = P ⊙ (dO vᵀ − rowsum(dO ⊙ O))
        delta = (d_out.to(acc) * out.to(acc)).sum(-1)
        d_q, d_th, d_tw = torch.empty_like(q), torch.empty_like(t_h), torch.empty_like(t_w)
        d_k, d_v = (torch.zeros(x.shape, dtype=acc, device=x.device) for x in (k, v))
        k_t, v_t = k.transpose(1, 2), v.transpose(1, 2)
        for i in range(0, items, step):
            for r in range(0, n, rows):
                at = (slice(i, i + step), slice(r, r + rows))
                weights = _chunk_weights(q[at], k_t[i:i + step], t_h[at], t_w[at], scale, acc)
                d_v[i:i + step] += torch.bmm(weights.to(q.dtype).transpose(1, 2), d_out[at])
                d_s = torch.bmm(d_out[at], v_t[i:i + step]).to(acc).sub_(delta[at][..., None]).mul_(weights)
                m, rr = d_s.shape[:2]
                d_th[at] = d_s.view(m, rr, h, w).sum(-1)
                d_tw[at] = d_s.view(m, rr, h, w).sum(-2)
                d_s = d_s.to(q.dtype)
                torch.mul(torch.bmm(d_s, k[i:i + step]), scale, out=d_q[at])
                d_k[i:i + step] += torch.bmm(d_s.transpose(1, 2), q[at]).mul_(scale)
        return d_q, d_k.to(k.dtype), d_v.to(v.dtype), d_th, d_tw, None


def _explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, t_h: torch.Tensor,
                        t_w: torch.Tensor, scale: float) -> torch.Tensor:
    """``softmax(scale · q kᵀ + bias) v`` for (B, nh, N, c) ``q, k, v`` and the bias
    ``t_h[..., n, row(m)] + t_w[..., n, col(m)]`` ((B, nh, N, h) and (B, nh, N, w) terms), as
    explicit products. In bf16: the scores ``q kᵀ`` are a bf16 product (fp32 accumulation,
    rounded to bf16 like the bf16 ``q`` and ``k`` are), then the scale, the bias and the softmax
    run in fp32, and the weights go back to bf16 for the product with ``v``. (In fp32 or float64
    every step keeps the inputs' precision: the same math as segment-anything's attention.)

    Done in chunks of (window, head) items or of one item's query rows, each at most
    ``_SCORES_BUDGET`` bytes of scores, so that the scores stay in cache; with gradients,
    backward recomputes each chunk (:class:`_ExplicitAttention`).
    """
    b, nh, n, c = q.shape
    items = b * nh
    # Contiguous once here: the encoder's q, k and v are strided views of one qkv tensor, and a
    # product with a strided slice copies it, chunk after chunk (a global block's keys 16 times
    # per head). vit_b 1024² bf16 embedding, Zen 5: 1.80 → 1.61 s.
    q, k, v = (x.reshape(items, n, c).contiguous() for x in (q, k, v))
    t_h, t_w = t_h.reshape(items, n, -1), t_w.reshape(items, n, -1)
    return _ExplicitAttention.apply(q, k, v, t_h, t_w, scale).reshape(b, nh, n, c)


class FastEncoderAttention(_sam_enc.Attention):
    """segment-anything's image-encoder ``Attention`` computed with SDPA or explicit products.

    Same parameters and state_dict keys. SAM's decomposed relative-position bias is
    ``rel_h[q, row(k)] + rel_w[q, col(k)]``: the dot product of the query's terms
    ``[rel_h[q], rel_w[q]]`` (h + w numbers, computed as SAM does) with the key's one-hot row and
    column (:func:`_key_positions`). Three exact ways to apply it:

    * **masked** (fp32 inference, fp16 on a CPU, and wherever no other way applies;
      :func:`_masked_attention`): the (N, N) bias, built by broadcasting the row and column
      terms, is SDPA's additive ``attn_mask``;
    * **augmented** (bf16/fp16 from ``_AUGMENT_FROM`` tokens, the global blocks, on CUDA or a
      CPU with AMX; :func:`bias_as_channels`): queries carry their terms and keys their one-hot
      position as h + w extra channels, so SDPA without a mask computes scores and bias in one
      fused pass and the (N, N) bias never exists. Values get h + w zero channels (the CPU flash
      kernel needs one head size for q, k and v; the output drops them);
    * **explicit** (on a CPU, bf16 where the channels do not apply — every window, and global
      blocks without AMX — and fp32 with gradients; :func:`explicit_scores`,
      :func:`_explicit_attention`): products ``q kᵀ`` and ``weights · v``, between them the
      scale, bias and softmax in fp32, chunk by chunk, each chunk recomputed in backward. vit_b
      1024², Zen 5 EPYC, 2 threads: bf16 embedding 2.45 → 1.84 s, relative L2 against fp32
      0.0076 → 0.0066 (the bias is added in fp32, where the mask is bf16).

    Input/output (B, H, W, C).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        n = h * w
        nh = self.num_heads
        qkv = linear(x, self.qkv).reshape(b, n, 3, nh, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, nh, N, c)
        if not self.use_rel_pos:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            rh = _sam_enc.get_rel_pos(h, h, self.rel_pos_h).to(q.dtype)  # (h, h, c)
            rw = _sam_enc.get_rel_pos(w, w, self.rel_pos_w).to(q.dtype)  # (w, w, c)
            r_q = q.reshape(b, nh, h, w, -1)
            t_h = torch.einsum("bnhwc,hkc->bnhwk", r_q, rh).reshape(b, nh, n, h)
            t_w = torch.einsum("bnhwc,wkc->bnhwk", r_q, rw).reshape(b, nh, n, w)
            grad = q.requires_grad or t_h.requires_grad
            if bias_as_channels(n, q.dtype, q.device):
                keys = _key_positions(h, w, q.dtype, q.device)  # (N, h + w)
                q_aug = torch.cat([q * self.scale, t_h, t_w], dim=-1)
                k_aug = torch.cat([k, keys.expand(b, nh, n, h + w)], dim=-1)
                v_aug = torch.cat([v, v.new_zeros(b, nh, n, h + w)], dim=-1)
                out = F.scaled_dot_product_attention(q_aug, k_aug, v_aug, scale=1.0)[..., : v.shape[-1]]
            elif explicit_scores(q.dtype, q.device, grad):
                out = _explicit_attention(q, k, v, t_h, t_w, self.scale)
            else:
                out = _masked_attention(q, k, v, t_h, t_w)
        out = out.reshape(b, nh, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1)
        return linear(out, self.proj)


class FastEncoderMLP(_sam_common.MLPBlock):
    """segment-anything's ``MLPBlock`` in the image encoder, each linear layer (the first with
    its GELU) one oneDNN call where :func:`~napari_clipsam.models.onednn.linear` applies (same
    math). Only the encoder's: in the mask decoder the token-side products are small, the grid
    mode was no faster, and its labels moved with the last bits of fp32 (F1 0.967 against
    F.linear with random weights)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if type(self.act) is nn.GELU and self.act.approximate == "none":
            return linear(linear(x, self.lin1, "gelu"), self.lin2)
        return super().forward(x)


class FastPatchEmbed(_sam_enc.PatchEmbed):
    """segment-anything's ``PatchEmbed`` returning contiguous (B, H, W, C) tokens (same values).

    Stock permutes the convolution's (B, C, H, W) output into a strided view; every later
    element-wise op (position add, residual adds, layer norms, autocast's casts) then inherits
    that layout and runs several times slower (vit_b 1024² bf16: 5.0 → 3.9 s per embedding).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1).contiguous()


class FastDecoderAttention(_sam_tr.Attention):
    """segment-anything's two-way-transformer ``Attention`` computed with SDPA (same math)."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q = self._separate_heads(self.q_proj(q), self.num_heads)
        k = self._separate_heads(self.k_proj(k), self.num_heads)
        v = self._separate_heads(self.v_proj(v), self.num_heads)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(self._recombine_heads(out))


_SWAPS: dict[type, type] = {
    _sam_enc.Attention: FastEncoderAttention,
    _sam_enc.PatchEmbed: FastPatchEmbed,
    _sam_tr.Attention: FastDecoderAttention,
}
_UNSWAPS: dict[type, type] = {v: k for k, v in _SWAPS.items()}
_UNSWAPS[FastEncoderMLP] = _sam_common.MLPBlock  # swapped in the encoder's blocks only


# ---- enabling -------------------------------------------------------------------------------
@dataclass
class FastPathInfo:
    """What :func:`enable_fast_path` did.

    enabled: any part of the fast path is on; encoder_modules / decoder_modules: attention
    modules running SDPA; onednn_linear: the encoder's linear layers run oneDNN's fused linear
    (:mod:`~napari_clipsam.models.onednn`; CPU inference); autocast_dtype: dtype
    :func:`fast_inference` autocasts to (None: fp32); device: the model's device type; threads:
    torch intra-op threads after the call; notes: reasons for each decision.
    """

    enabled: bool = False
    encoder_modules: int = 0
    decoder_modules: int = 0
    onednn_linear: bool = False
    autocast_dtype: torch.dtype | None = None
    device: str = "cpu"
    threads: int = 0
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"enabled": self.enabled, "encoder_modules": self.encoder_modules,
                "decoder_modules": self.decoder_modules,
                "onednn_linear": self.onednn_linear,
                "autocast_dtype": None if self.autocast_dtype is None else str(self.autocast_dtype).replace("torch.", ""),
                "device": self.device, "threads": self.threads, "notes": list(self.notes)}


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for buf in model.buffers():
        return buf.device
    return torch.device("cpu")


def _to_float32(_module: nn.Module, _inputs, output):
    return output.float() if torch.is_tensor(output) and output.is_floating_point() else output


def enable_fast_path(
    model: nn.Module,
    bf16: bool | None = None,
    sdpa: bool = True,
    threads: int | None = None,
    enabled: bool | None = None,
) -> FastPathInfo:
    """Switch ``model`` (a ClipSam, a ``Sam`` or anything holding SAM parts) to the fast path.

    Parameters
    ----------
    bf16 : autocast in :func:`fast_inference` — True forces it (bf16; fp16 on CUDA without
        bf16), False forbids it, None decides by hardware (:func:`autocast_dtype_for`) unless
        ``NAPARI_CLIPSAM_BF16`` says otherwise.
    sdpa : swap SAM's attention modules for the SDPA versions.
    threads : torch intra-op threads to set (default: ``NAPARI_CLIPSAM_THREADS`` or untouched).
        Enabling also sets glibc's allocator once per process (:func:`tune_malloc`).
    enabled : False (or ``NAPARI_CLIPSAM_FAST=0`` when None) turns everything off, restoring
        stock behaviour via :func:`disable_fast_path`.

    The image encoder's output (``neck``) is cast back to fp32 under autocast, so cached
    embeddings are fp32 whatever the path. Idempotent; returns what it did (also stored on the
    model, see :func:`fast_path_info`).
    """
    if enabled is None:
        enabled = fast_path_allowed()
    disable_fast_path(model)
    device = _model_device(model)
    info = FastPathInfo(device=device.type)
    if threads is None and os.environ.get("NAPARI_CLIPSAM_THREADS", "").strip():
        threads = int(os.environ["NAPARI_CLIPSAM_THREADS"])
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be ≥ 1, got {threads}")
        torch.set_num_threads(threads)
    info.threads = torch.get_num_threads()
    if not enabled:
        info.notes.append("fast path off (enabled=False or NAPARI_CLIPSAM_FAST=0)")
        setattr(model, _INFO_ATTR, info)
        return info
    info.notes.append(tune_malloc())

    if sdpa:
        for m in model.modules():
            new = _SWAPS.get(type(m))
            if new is not None:
                m.__class__ = new
                info.encoder_modules += new is FastEncoderAttention
                info.decoder_modules += new is FastDecoderAttention
    else:
        info.notes.append("SDPA off (sdpa=False)")
    for m in model.modules():
        if isinstance(m, _sam_enc.Block) and type(m.mlp) is _sam_common.MLPBlock:
            m.mlp.__class__ = FastEncoderMLP
    if device.type == "cpu":
        info.onednn_linear = onednn_linear_available()
        info.notes.append("encoder linear layers: oneDNN's fused linear (+ GELU)" if info.onednn_linear
                          else "encoder linear layers: torch's (no oneDNN fused linear, or NAPARI_CLIPSAM_ONEDNN=0)")

    env_bf16 = env_flag("NAPARI_CLIPSAM_BF16")
    if bf16 is None and env_bf16 is not None:
        bf16 = env_bf16
        info.notes.append(f"NAPARI_CLIPSAM_BF16={int(env_bf16)}")
    auto_dtype, reason = autocast_dtype_for(device)
    if bf16 is None:
        info.autocast_dtype = auto_dtype
        info.notes.append(reason)
    elif bf16:
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            info.autocast_dtype = torch.float16
        else:
            info.autocast_dtype = torch.bfloat16
        info.notes.append("autocast forced on")
    else:
        info.notes.append("autocast forced off")

    hooks = []
    if info.autocast_dtype is not None:
        for m in model.modules():
            if isinstance(m, _sam_enc.ImageEncoderViT):
                hooks.append(m.neck.register_forward_hook(_to_float32))
    object.__setattr__(model, _HOOKS_ATTR, hooks)
    info.enabled = bool(info.encoder_modules or info.decoder_modules or info.onednn_linear or info.autocast_dtype)
    setattr(model, _INFO_ATTR, info)
    log.info("fast path: %s", info.as_dict())
    return info


def disable_fast_path(model: nn.Module) -> None:
    """Restore segment-anything's own attention, patch-embedding and MLP modules and drop the
    autocast hooks."""
    for m in model.modules():
        old = _UNSWAPS.get(type(m))
        if old is not None:
            m.__class__ = old
    for h in getattr(model, _HOOKS_ATTR, ()) or ():
        h.remove()
    if hasattr(model, _HOOKS_ATTR):
        object.__delattr__(model, _HOOKS_ATTR)
    if hasattr(model, _INFO_ATTR):
        delattr(model, _INFO_ATTR)


def fast_path_info(model: nn.Module) -> FastPathInfo | None:
    """The :class:`FastPathInfo` of the last :func:`enable_fast_path` on ``model`` (None if never)."""
    return getattr(model, _INFO_ATTR, None)


def inference_autocast(model: nn.Module) -> torch.dtype | None:
    """The dtype :func:`fast_inference` (with autocast) runs ``model`` in, or None (no autocast)."""
    info = fast_path_info(model)
    return info.autocast_dtype if info is not None and info.enabled else None


@contextlib.contextmanager
def fast_inference(model: nn.Module, autocast: bool = True) -> Iterator[FastPathInfo | None]:
    """``torch.inference_mode`` plus, where the fast path chose it, autocast to bf16/fp16.

    Use around embedding and decoding calls. Tensors made inside are inference tensors (no
    autograd later). With ``autocast=False`` only inference mode applies (e.g. for the cheap
    decoder on CPU). Outputs of the mask decoder may be bf16/fp16 under autocast: call
    ``.float()`` where precision matters; image embeddings are returned in fp32.
    """
    info = fast_path_info(model)
    dtype = inference_autocast(model) if autocast else None
    with torch.inference_mode():
        if dtype is None:
            yield info
        else:
            with torch.autocast(device_type=info.device, dtype=dtype):
                yield info


__all__ = ["FastPathInfo", "FastEncoderAttention", "FastEncoderMLP", "FastDecoderAttention", "enable_fast_path",
           "disable_fast_path", "fast_inference", "fast_path_info", "fast_path_allowed",
           "autocast_dtype_for", "inference_autocast", "augment_on_cpu", "bf16_matmul_speedup", "bias_as_channels", "cpu_has_fast_bf16",
           "cpu_flags", "cpu_id", "cpu_model",
           "MALLOC_SETTINGS", "tune_malloc"]
