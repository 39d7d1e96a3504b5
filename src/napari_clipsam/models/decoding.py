"""SAM's two-way transformer, run with its prompt-independent image side computed once per image.

The math is segment-anything's ``TwoWayTransformer`` (tests compare the two in fp32); what
differs is what gets computed once. Without a mask prompt every prompt on an image sees the same
dense input (the image embedding plus the "no mask" embedding), so the first block's projections
of the image tokens — the keys and values the prompt tokens attend to, and the queries with which
the image tokens attend back — do not depend on the prompt. :func:`image_side` computes them per
image; :class:`~napari_clipsam.models.clipsam.ClipSam` keeps them on the ``Encoded`` rows, so a
click (or each chunk of ``segment_text``'s seeds) starts from them.

Later blocks' image tokens depend on the prompt, and no projection runs on them: each projection
of an image token either meets a prompt token's vector in an attention score or is summed with
attention weights that add up to one, so it is folded onto the few prompt tokens instead (same
math, reassociated):

* token→image: scores ``(q Wk) · x`` instead of ``q · (x Wk + bk)`` (``q · bk`` adds the same
  number to a whole softmax row), output ``(P x) Wv + bv`` instead of ``P (x Wv + bv)``;
* image→token: scores ``x · (Wq k) + bq · k`` instead of ``(x Wq + bq) · k``, output
  ``P (v Wo + bo / heads)`` instead of ``(P v) Wo + bo`` (each head's weights of a pixel add up
  to one), added to the image tokens (the residual) in the same product. The first block's
  image→token output is folded the same way.

Each image-side product then has heads × T columns (T prompt tokens: 7 for a click, 15 with the
``ssp`` strategy's 8 extra tokens; × 8 heads at vit_b) where it had a 256 → 128 projection or a
128 → 256 output projection, and no projected copy of the image tokens is written. vit_b, 4
prompts per call, bf16, 2 threads: ``two_way`` 25 → 19 ms with 7 tokens, 30 → 26 ms with 15.
A projection that is not a plain ``nn.Linear`` (e.g. LoRA-wrapped) runs as a module on the image
tokens instead.

Prompts on one image share those tensors without copies: the first block's token→image attention
runs all prompts' tokens as one query sequence (attention rows are independent), and the
image→token attention scores every prompt's tokens in one matrix product.

Each prompt's image tokens are (HW, C) — 2 MB in bf16 at vit_b — and passes over them are about
half of a grid decode, so few are made: later blocks add their image→token output in place
outside autograd, and the final attention (a few query rows) adds the positional encoding's
scores from one small product instead of forming ``keys + pe``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from segment_anything.modeling.common import LayerNorm2d
from segment_anything.modeling.transformer import TwoWayTransformer
from torch import nn


@dataclass
class ImageSide:
    """The prompt-independent part of the two-way transformer for R image rows.

    keys: (R, HW, C) image tokens (embedding + dense prompt); pe: (1, HW, C) positional
    encoding (both contiguous); k, v: (R, heads, HW, d) the first block's token→image keys and
    values; q: (R, heads, HW, d) its image→token queries.
    """

    keys: torch.Tensor
    pe: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    q: torch.Tensor


def _heads(x: torch.Tensor, n: int) -> torch.Tensor:
    """(B, L, n·d) → (B, n, L, d)."""
    b, length, c = x.shape
    return x.reshape(b, length, n, c // n).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    """(B, n, L, d) → (B, L, n·d)."""
    b, n, length, d = x.shape
    return x.transpose(1, 2).reshape(b, length, n * d)


def _lin(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``mod(x)`` computed in ``x``'s dtype (a plain Linear casts its small weight, never the
    large input; other modules, e.g. LoRA-wrapped ones, run in their own dtype)."""
    if type(mod) is nn.Linear:
        return F.linear(x, mod.weight.to(x.dtype), None if mod.bias is None else mod.bias.to(x.dtype))
    return mod(x.to(next(mod.parameters()).dtype)).to(x.dtype)


def _norm(mod: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, mod.normalized_shape, mod.weight.to(x.dtype), mod.bias.to(x.dtype), mod.eps)


def _check(tr: TwoWayTransformer) -> None:
    if not tr.layers or not tr.layers[0].skip_first_layer_pe:
        raise ValueError("two_way: expects segment-anything's TwoWayTransformer (first block skips the PE)")


def _plain(*mods: nn.Module) -> bool:
    """True when every module is a plain ``nn.Linear`` with a bias (its weights can be folded)."""
    return all(type(mod) is nn.Linear and mod.bias is not None for mod in mods)


def image_side(tr: TwoWayTransformer, src: torch.Tensor, pos: torch.Tensor,
               dtype: torch.dtype = torch.float32) -> ImageSide:
    """:class:`ImageSide` of (R, C, h, w) dense inputs ``src`` (embedding + dense prompt) with the
    (1, C, h, w) positional encoding ``pos``, in ``dtype`` (the image side's compute dtype)."""
    _check(tr)
    block = tr.layers[0]
    # Contiguous (HW, C) rows: every click adds to and normalises these, and strided operands
    # cost a copy per op (~20 % of a vit_b click) instead of one here.
    keys = src.flatten(2).transpose(1, 2).to(dtype).contiguous()
    pe = pos.flatten(2).transpose(1, 2).to(dtype).contiguous()
    with_pe = keys + pe
    t2i, i2t = block.cross_attn_token_to_image, block.cross_attn_image_to_token
    return ImageSide(keys, pe, _heads(_lin(t2i.k_proj, with_pe), t2i.num_heads),
                     _heads(_lin(t2i.v_proj, keys), t2i.num_heads), _heads(_lin(i2t.q_proj, with_pe), i2t.num_heads))


def _per_head(lin: nn.Linear, heads: int) -> torch.Tensor:
    """A projection's (out, C) weight as (heads, d, C): head h's rows."""
    return lin.weight.view(heads, -1, lin.in_features)


def _out_per_head(lin: nn.Linear, heads: int) -> torch.Tensor:
    """An output projection's (C, heads·d) weight as (heads, d, C): what head h's d channels add."""
    return lin.weight.view(lin.out_features, heads, -1).permute(1, 2, 0)


def _image_to_tokens(a, q: torch.Tensor, queries: torch.Tensor, qpe: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """Image tokens attend to prompt tokens: q (r, h, HW, d) projected image queries of r rows,
    tokens (n, T, C) of m = n / r prompts per row → the image tokens ``base`` (n or 1, HW, C)
    plus the attention's output, (n, HW, C) in q's dtype. Few keys: one small matrix product (all
    prompts of a row at once) and a softmax along the long HW axis."""
    r, h, hw, d = q.shape
    n, t, c = queries.shape
    m = n // r
    k = (_heads(a.k_proj(queries + qpe), a.num_heads) * (1 / math.sqrt(d))).to(q.dtype)  # (n, h, T, d), scaled
    v = _heads(a.v_proj(queries), a.num_heads)
    k = k.reshape(r, m, h, t, d).transpose(1, 2).reshape(r, h, m * t, d)
    scores = k @ q.transpose(2, 3)  # (r, h, m·T, HW): softmax along HW-contiguous rows
    p = scores.reshape(r, h, m, t, hw).softmax(3)
    if not _plain(a.out_proj):
        out = p.permute(0, 2, 1, 4, 3) @ v.reshape(r, m, h, t, d).to(q.dtype)  # (r, m, h, HW, d)
        return base + _lin(a.out_proj, _merge(out.reshape(n, h, hw, d)))
    return _plus_weighted_values(base, a, p.transpose(1, 2).reshape(n, h * t, hw), v)


def _plus_weighted_values(base: torch.Tensor, a, p: torch.Tensor, v: torch.Tensor,
                          in_place: bool = False) -> torch.Tensor:
    """Image tokens ``base`` (n or 1, HW, C) plus the image→token output from attention weights
    p (n, heads·T, HW) and token values v (n, heads, T, d), with the output projection folded
    onto the values: ``base + P (v Wo + bo / heads)`` (each head's T weights of a pixel add up to
    one, so the bias shares add up to ``bo``) in one product → (n, HW, C) in p's dtype.
    ``in_place``: the sum is accumulated into ``base`` where no gradient is being recorded (one
    pass less over the image tokens; the caller no longer needs them)."""
    n, h, t, _ = v.shape
    vo = (v.float() @ _out_per_head(a.out_proj, h) + a.out_proj.bias / h).reshape(n, h * t, -1).to(p.dtype)
    if in_place and not torch.is_grad_enabled() and base.shape[0] == n:
        return base.baddbmm_(p.transpose(1, 2), vo)
    return torch.baddbmm(base, p.transpose(1, 2), vo)


def _image_to_tokens_folded(a, keys: torch.Tensor, with_pe: torch.Tensor, queries: torch.Tensor,
                            qpe: torch.Tensor) -> torch.Tensor:
    """Image tokens ``keys`` (n, HW, C) — ``with_pe``: plus the positional encoding — attend to
    their prompt's tokens (n, T, C) with the image queries' projection folded onto the keys,
    ``(x Wq + bq) · k = x · (Wq k) + bq · k`` → ``keys`` plus the output, (n, HW, C) in their dtype
    (accumulated into ``keys`` itself outside autograd)."""
    n, t, c = queries.shape
    h = a.num_heads
    d = a.internal_dim // h
    k = _heads(a.k_proj(queries + qpe), h)  # (n, h, T, d)
    v = _heads(a.v_proj(queries), h)
    scale = 1 / math.sqrt(d)
    kq = ((k @ _per_head(a.q_proj, h)) * scale).reshape(n, h * t, c).to(with_pe.dtype)  # (n, h·T, C)
    kb = ((k @ a.q_proj.bias.view(h, d, 1)) * scale).reshape(n, h * t, 1).to(with_pe.dtype)
    scores = torch.baddbmm(kb, kq, with_pe.transpose(1, 2))  # (n, h·T, HW)
    hw = scores.shape[-1]
    p = scores.view(n, h, t, hw).softmax(2).view(n, h * t, hw)
    return _plus_weighted_values(keys, a, p, v, in_place=True)


def _tokens_to_image(a, queries: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Prompt tokens (n, T, C) of m = n / r prompts per row attend to projected image keys and
    values (r, h, HW, d) → (n, T, C); the prompts of a row run as one query sequence (attention
    rows are independent)."""
    r, h, _, d = k.shape
    n, t, _ = queries.shape
    m = n // r
    q = _heads(a.q_proj(queries), a.num_heads).to(k.dtype)  # (n, h, T, d)
    q = q.reshape(r, m, h, t, d).transpose(1, 2).reshape(r, h, m * t, d)
    out = F.scaled_dot_product_attention(q, k, v).float()
    out = out.reshape(r, h, m, t, d).transpose(1, 2).reshape(n, h, t, d)
    return a.out_proj(_merge(out))


def _tokens_to_image_folded(a, queries: torch.Tensor, keys: torch.Tensor, with_pe: torch.Tensor | None,
                            pe: torch.Tensor) -> torch.Tensor:
    """Prompt tokens (n, T, C) attend to their prompt's image tokens (n, HW, C) (``with_pe``: plus
    the positional encoding ``pe`` (1, HW, C); None: not formed, see below), with the image
    projections folded onto the queries: scores ``(q Wk) · x`` (``q · bk`` is the same for a whole
    softmax row) and output ``(P x) Wv + bv`` (P's rows add up to one) → (n, T, C). Without
    ``with_pe`` the scores are ``(q Wk) · x + (q Wk) · pe``: for a few queries (the final
    attention's) that second product costs less than a pass over every prompt's image tokens."""
    n, t, c = queries.shape
    h = a.num_heads
    q = _heads(a.q_proj(queries), h)  # (n, h, T, d)
    qk = ((q @ _per_head(a.k_proj, h)) * (1 / math.sqrt(q.shape[-1]))).reshape(n, h * t, c).to(keys.dtype)
    if with_pe is None:
        scores = torch.baddbmm((qk.reshape(-1, c) @ pe[0].t()).view(n, h * t, -1), qk, keys.transpose(1, 2))
    else:
        scores = qk @ with_pe.transpose(1, 2)
    p = scores.softmax(-1)  # (n, h·T, HW)
    px = (p @ keys).float().view(n, h, t, c)
    out = px @ _per_head(a.v_proj, h).transpose(1, 2)  # (n, h, T, d)
    return a.out_proj(_merge(out) + a.v_proj.bias)


def two_way(tr: TwoWayTransformer, side: ImageSide, tokens: torch.Tensor,
            keep: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``tr`` for prompt tokens (R, m, T, C) — m prompts on each of the R rows of ``side`` —
    → (tokens (R·m, T, C) fp32, image tokens (R·m, HW, C) in the side's dtype), as
    ``tr(src, pos, tokens)`` would. Token-side work (small) runs in fp32, image-side work in the
    side's dtype; call it with autocast off. With ``keep``, only the first ``keep`` tokens come
    out, (R·m, keep, C): the final attention's rows are independent, so the others (prompt
    tokens, which the mask decoder does not read) are not computed there."""
    _check(tr)
    r, m, t, c = tokens.shape
    n = r * m
    block = tr.layers[0]  # its image side is the row's (side.k, side.v, side.q)
    qpe = tokens.reshape(n, t, c).float()
    queries = block.norm1(block.self_attn(q=qpe, k=qpe, v=qpe))
    queries = block.norm2(queries + _tokens_to_image(block.cross_attn_token_to_image, queries + qpe, side.k, side.v))
    queries = block.norm3(queries + block.mlp(queries))
    base = side.keys if r == 1 or m == 1 else side.keys.repeat_interleave(m, dim=0)  # each prompt's row
    keys = _norm(block.norm4, _image_to_tokens(block.cross_attn_image_to_token, side.q, queries, qpe, base))

    pe = side.pe
    for block in list(tr.layers)[1:]:  # per prompt from here on
        queries = block.norm1(queries + block.self_attn(q=queries + qpe, k=queries + qpe, v=queries))
        a, b = block.cross_attn_token_to_image, block.cross_attn_image_to_token
        with_pe = keys + pe
        queries = block.norm2(queries + _attend_image(a, queries + qpe, keys, pe, with_pe))
        queries = block.norm3(queries + block.mlp(queries))
        if _plain(b.q_proj, b.out_proj):
            keys = _image_to_tokens_folded(b, keys, with_pe, queries, qpe)
        else:
            keys = _image_to_tokens(b, _heads(_lin(b.q_proj, with_pe), b.num_heads), queries, qpe, keys)
        keys = _norm(block.norm4, keys)
    a = tr.final_attn_token_to_image
    queries, qpe = queries[:, :keep], qpe[:, :keep]
    return tr.norm_final_attn(queries + _attend_image(a, queries + qpe, keys, pe)), keys


def _attend_image(a, queries: torch.Tensor, keys: torch.Tensor, pe: torch.Tensor,
                  with_pe: torch.Tensor | None = None) -> torch.Tensor:
    """Token→image attention of prompt tokens (n, T, C) over their own image tokens (n, HW, C)
    with the positional encoding pe (1, HW, C) (``with_pe``: their sum, where the caller has it):
    folded where the image projections are plain, else through the modules."""
    if _plain(a.k_proj, a.v_proj):
        return _tokens_to_image_folded(a, queries, keys, with_pe, pe)
    k, v = _lin(a.k_proj, keys + pe if with_pe is None else with_pe), _lin(a.v_proj, keys)
    return _tokens_to_image(a, queries, _heads(k, a.num_heads), _heads(v, a.num_heads))


def _is_stock_upscaling(up: nn.Sequential) -> bool:
    kinds = [type(mod) for mod in up]
    return (kinds == [nn.ConvTranspose2d, LayerNorm2d, nn.GELU, nn.ConvTranspose2d, nn.GELU]
            and all(mod.kernel_size == (2, 2) and mod.stride == (2, 2) and mod.padding == (0, 0)
                    for mod in (up[0], up[3]))
            and up[2].approximate == "none" and up[4].approximate == "none")


def _convt2(x: torch.Tensor, conv: nn.ConvTranspose2d) -> torch.Tensor:
    """A 2×2 stride-2 transposed convolution on channels-last (..., C) pixels → (..., 2, 2, C')."""
    w = conv.weight.permute(0, 2, 3, 1)  # (C, 2, 2, C')
    y = F.linear(x, w.reshape(w.shape[0], -1).t().to(x.dtype), conv.bias.repeat(4).to(x.dtype))
    return y.reshape(*x.shape[:-1], 2, 2, w.shape[-1])


#: Logit given outside a prompt's window by :func:`upscale_masks` (and ``ClipSam.decode``).
OUTSIDE = -1e4


def _stock_features(up: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """segment-anything's stock upscaling of channels-last tokens x (n, h, w, C) → features
    (n, h, w, 2, 2, 2, 2, C/8): each 2×2 transposed convolution is one matrix product, the
    channel LayerNorm a ``layer_norm`` over the last axis (same math; token by token)."""
    x = _convt2(x, up[0])  # (n, h, w, 2, 2, C/4)
    x = F.gelu(F.layer_norm(x, x.shape[-1:], up[1].weight.to(x.dtype), up[1].bias.to(x.dtype), up[1].eps))
    return F.gelu(_convt2(x, up[3]))


def _as_image(x: torch.Tensor) -> torch.Tensor:
    """(n, h, w, 2, 2, 2, 2, K) per-token pixels → (n, K, 4h, 4w): y = 4i + 2a + a', x = 4j + 2b + b'."""
    n, h, w, k = x.shape[0], x.shape[1], x.shape[2], x.shape[-1]
    return x.permute(0, 7, 1, 3, 5, 2, 4, 6).reshape(n, k, 4 * h, 4 * w)


def _stock_head(up: nn.Sequential, x: torch.Tensor, hyper: torch.Tensor) -> torch.Tensor:
    """The stock head on tokens x (n, h, w, C) with hypernetwork outputs (n, M, C/8) → mask
    logits (n, M, 4h, 4w); only the final one-channel masks are rearranged into images."""
    f = _stock_features(up, x)
    masks = f.reshape(f.shape[0], -1, f.shape[-1]) @ hyper.transpose(1, 2).to(f.dtype)  # (n, h·w·16, M)
    return _as_image(masks.reshape(*f.shape[:-1], hyper.shape[1]))


def check_windows(windows: torch.Tensor, n: int, h: int, w: int, grid: str = "token") -> list[list[int]]:
    """``windows`` (n, 4) integer boxes (y0, x0, y1, x1), end exclusive, each non-empty and inside
    the h × w ``grid`` (named in errors) → the boxes as lists; ValueError otherwise."""
    windows = torch.as_tensor(windows)
    if windows.shape != (n, 4) or windows.dtype.is_floating_point:
        raise ValueError(f"windows must be ({n}, 4) integer {grid} boxes (y0, x0, y1, x1), got "
                         f"{tuple(windows.shape)} {windows.dtype}")
    boxes = windows.tolist()
    for y0, x0, y1, x1 in boxes:
        if not (0 <= y0 < y1 <= h and 0 <= x0 < x1 <= w):
            raise ValueError(f"window {(y0, x0, y1, x1)} is empty or outside the {h}×{w} {grid} grid")
    return boxes


def upscale_masks(up: nn.Sequential, src: torch.Tensor, hyper: torch.Tensor, h: int, w: int,
                  skip: nn.Module | None = None, stem: torch.Tensor | None = None,
                  index: torch.Tensor | None = None, windows: torch.Tensor | None = None) -> torch.Tensor:
    """SAM's mask head: image tokens (n, h·w, C) through ``output_upscaling`` (4× finer), dotted
    with hypernetwork outputs (n, M, C/8) → mask logits (n, M, 4h, 4w). With ``skip`` (a
    :class:`~napari_clipsam.models.stem_skip.StemSkip`), the upscaled features are first
    refined with the stem features ``stem`` (B, Cs, 4h, 4w) of the prompts' images (``index``
    (n,): each prompt's row of ``stem``), in the image tokens' dtype.

    ``windows`` (n, 4) integer boxes (y0, x0, y1, x1) on the h × w token grid (end exclusive):
    each prompt's logits are only wanted inside its box (pixels 4·y0 to 4·y1 and 4·x0 to 4·x1)
    and are :data:`OUTSIDE` elsewhere. segment-anything's stock head works token by token (each
    token becomes its own 4 × 4 pixels), so it then runs on the boxes' tokens only, with the
    values it would give there; other heads (a stem skip's 3 × 3 convolutions reach across
    tokens) run on the whole grid and are filled outside the boxes. The stock head runs on
    channels-last pixels (:func:`_stock_head`: same math); other heads go through their modules.
    """
    n, m = src.shape[0], hyper.shape[1]
    if (skip is None) != (stem is None) or (stem is None) != (index is None):
        raise ValueError("upscale_masks: give the stem skip, its stem features and their index together")
    boxes = None if windows is None else check_windows(windows, n, h, w)
    stock = _is_stock_upscaling(up)
    if stock and skip is None:
        tokens = src.reshape(n, h, w, -1)
        if boxes is None:
            return _stock_head(up, tokens, hyper)
        # One head call for all prompts: each box's tokens within a crop of the largest box's size
        # (moved inside the grid where it would stick out), then each box pasted from its crop.
        ch, cw = max(y1 - y0 for y0, _, y1, _ in boxes), max(x1 - x0 for _, x0, _, x1 in boxes)
        corners = [(min(y0, h - ch), min(x0, w - cw)) for y0, x0, _, _ in boxes]
        crops = torch.stack([tokens[i, cy : cy + ch, cx : cx + cw] for i, (cy, cx) in enumerate(corners)])
        heads = _stock_head(up, crops, hyper)  # (n, M, 4·ch, 4·cw)
        out = src.new_full((n, m, 4 * h, 4 * w), OUTSIDE)
        for i, ((y0, x0, y1, x1), (cy, cx)) in enumerate(zip(boxes, corners)):
            out[i, :, 4 * y0 : 4 * y1, 4 * x0 : 4 * x1] = heads[i, :, 4 * (y0 - cy) : 4 * (y1 - cy), 4 * (x0 - cx) : 4 * (x1 - cx)]
        return out
    if stock:
        x = _as_image(_stock_features(up, src.reshape(n, h, w, -1)))
    else:
        x = up(src.transpose(1, 2).reshape(n, -1, h, w))
    if skip is not None:  # in the image side's dtype (bf16/fp16 under the fast path and in training)
        with torch.autocast(x.device.type, dtype=x.dtype, enabled=x.dtype in (torch.bfloat16, torch.float16)):
            x = skip(x, stem.to(x.dtype), index)
    masks = (hyper.to(x.dtype) @ x.flatten(2)).reshape(n, m, x.shape[2], x.shape[3])
    if boxes is not None:
        keep = torch.zeros(n, 1, 4 * h, 4 * w, dtype=torch.bool, device=masks.device)
        for i, (y0, x0, y1, x1) in enumerate(boxes):
            keep[i, :, 4 * y0 : 4 * y1, 4 * x0 : 4 * x1] = True
        masks = masks.masked_fill(~keep, OUTSIDE)
    return masks


__all__ = ["OUTSIDE", "ImageSide", "check_windows", "image_side", "two_way", "upscale_masks"]
