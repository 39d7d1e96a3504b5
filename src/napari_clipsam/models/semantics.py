"""CLIP semantics for SAM: text embeddings, dense patch features and the text–image similarity map.

All CLIP computations here are frozen by default (``requires_grad`` off, no autograd graph):
they are computed once per image and once per text and cached by the callers.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from open_clip.transformer import text_global_pool
from torch import nn

DEFAULT_TEMPLATES: tuple[str, ...] = (
    "{}",
    "a fluorescence microscopy image of {}",
    "a microscopy image of {}",
    "{} in a cell",
)


def text_key(text: str) -> str:
    """The one form of a text that features and caches are keyed by: CLIP's tokenizers lower-case
    and strip, so "Nucleus " and "nucleus" are the same text."""
    return text.strip().lower()


@dataclass
class TextFeatures:
    """Features of T texts.

    embedding: (T, D) unit vectors in CLIP's joint space (templates averaged, optional
    empty-text subtraction). tokens: (T, L, W) per-token features of the plain text; token_mask:
    (T, L) bool, True for real tokens.
    """

    embedding: torch.Tensor
    tokens: torch.Tensor
    token_mask: torch.Tensor

    def index(self, idx: Sequence[int] | torch.Tensor) -> "TextFeatures":
        idx = torch.as_tensor(idx, dtype=torch.long, device=self.embedding.device)
        return TextFeatures(self.embedding[idx], self.tokens[idx], self.token_mask[idx])


class ClipSemantics(nn.Module):
    """Wraps an open_clip model and its tokenizer.

    Parameters
    ----------
    clip : open_clip ``CLIP`` model.
    tokenizer : callable mapping a list of strings to (T, L) token ids.
    image_size : CLIP's input side in pixels.
    mean, std : CLIP's image normalisation (on [0, 1] RGB).
    templates : prompt templates, ``"{}"`` is replaced by the text.
    surgery : subtract the embedding of the empty text (CLIP Surgery's redundancy removal).
    """

    def __init__(
        self,
        clip: nn.Module,
        tokenizer: Callable,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        templates: Sequence[str] = DEFAULT_TEMPLATES,
        surgery: bool = True,
    ):
        super().__init__()
        self.clip = clip
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.templates = tuple(templates)
        self.surgery = surgery
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.clip.requires_grad_(False)
        # Memos of the text tower, which runs in its weights' dtype whatever the caller's autocast.
        self._text_cache: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._empty: torch.Tensor | None = None

    @property
    def trainable(self) -> bool:
        return any(p.requires_grad for p in self.clip.parameters())

    def clear_cache(self) -> None:
        self._text_cache.clear()
        self._empty = None

    def _load_from_state_dict(self, *args, **kwargs):
        # new CLIP weights (load_state_dict on this module or any module holding it): the cached
        # text features were computed with the old ones
        self.clear_cache()
        super()._load_from_state_dict(*args, **kwargs)

    def _device(self) -> torch.device:
        return self.mean.device

    # ---- text ---------------------------------------------------------------------------------
    def _text_tower(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One pass of CLIP's text tower → (token features (T, L, W), token mask (T, L),
        unit embeddings (T, D)).

        With a causal mask (CLIP's text tower) later positions never affect earlier ones, so the
        padding after the longest text is cut off: the same numbers for a fraction of the cost.

        Autocast is off here: a few short sequences gain nothing from bf16. Under CPU autocast
        the attention's input projections on its transposed (L, B, D) view went through a
        batched matmul that copies the weight once per position (ViT-B-16, 4 templates: 148 ms
        per text in bf16 vs 64 ms in fp32), and bf16 moved the embedding by 1.5 %.
        """
        ids = self.tokenizer(texts).to(self._device())
        with torch.autocast(self._device().type, enabled=False):
            m = self.clip
            if not hasattr(m, "token_embedding"):
                # Towers without per-token access (e.g. HF text encoders): the pooled embedding as one token.
                pooled = m.encode_text(ids).float()
                ones = torch.ones(len(texts), 1, dtype=torch.bool, device=pooled.device)
                return pooled[:, None], ones, F.normalize(pooled, dim=-1)
            attn_mask = m.attn_mask
            if attn_mask is not None:
                length = int((ids != 0).any(0).nonzero().max()) + 1
                ids, attn_mask = ids[:, :length], attn_mask[:length, :length]
            x = m.token_embedding(ids) + m.positional_embedding[: ids.shape[1]]
            x = m.ln_final(m.transformer(x, attn_mask=attn_mask))
            pooled = text_global_pool(x, ids, m.text_pool_type, eos_token_id=getattr(m, "text_eos_id", None))
            proj = m.text_projection
            if proj is not None:
                pooled = proj(pooled) if isinstance(proj, nn.Linear) else pooled @ proj
            return x.float(), ids != 0, F.normalize(pooled.float(), dim=-1)

    def _empty_embedding(self) -> torch.Tensor:
        """Mean embedding (D,) of the templates filled with nothing (CLIP Surgery's redundancy)."""
        cached = None if (self.trainable or self.training) else self._empty
        if cached is None:
            cached = self._text_tower([t.format("").strip() for t in self.templates])[2].mean(0)
            if not (self.trainable or self.training):
                self._empty = cached
        return cached

    def _compute_texts(self, texts: list[str]) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Embeddings and token features of several texts in one text-tower pass."""
        n, k = len(texts), len(self.templates)
        tokens, mask, emb = self._text_tower([t.format(x) for x in texts for t in self.templates])
        emb = emb.view(n, k, -1).mean(1)
        if self.surgery:
            emb = emb - self._empty_embedding()
        emb = F.normalize(emb, dim=-1)
        if "{}" in self.templates:  # the plain text's pass gives its token features
            j = self.templates.index("{}")
            tokens, mask = tokens.view(n, k, *tokens.shape[1:])[:, j], mask.view(n, k, -1)[:, j]
        else:
            tokens, mask, _ = self._text_tower(list(texts))
        return [(emb[i], tokens[i], mask[i]) for i in range(n)]

    def _warn_cut(self, texts: list[str]) -> None:
        """Warn for texts that fill the tokenizer's context on their own: their end is cut off.
        (Templates around a text may be cut on short contexts, e.g. the demo's 24 characters:
        the model was trained that way, the text itself still reads whole in the plain one.)"""
        ids = self.tokenizer(list(texts))
        for text, cut in zip(texts, (ids[:, -1] != 0).tolist()):
            if cut:
                warnings.warn(f"text {text!r} fills the model's {ids.shape[1]}-token context: its end is cut off "
                              "(two such texts may read the same); use a shorter text", stacklevel=3)

    def text_features(self, texts: Sequence[str]) -> TextFeatures:
        """Features of ``texts`` (cached per string while CLIP is frozen and in eval mode)."""
        if isinstance(texts, str):
            raise TypeError("text_features expects a list of strings, not a single string")
        keys = []
        for t in texts:
            if not isinstance(t, str) or not t.strip():
                raise ValueError(f"text must be a non-empty string, got {t!r}")
            keys.append(text_key(t))
        use_cache = not (self.trainable or self.training)
        todo = sorted({k for k in keys if not (use_cache and k in self._text_cache)})
        fresh = {}
        if todo:
            self._warn_cut(todo)
            with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
                fresh = dict(zip(todo, self._compute_texts(todo)))
            if use_cache:
                self._text_cache.update(fresh)
        rows = [fresh[k] if k in fresh else self._text_cache[k] for k in keys]
        length = max(r[1].shape[0] for r in rows)
        width = rows[0][1].shape[1]
        tokens = torch.zeros(len(rows), length, width, device=rows[0][0].device)
        mask = torch.zeros(len(rows), length, dtype=torch.bool, device=rows[0][0].device)
        for i, (_, tok, m) in enumerate(rows):
            tokens[i, : tok.shape[0]] = tok
            mask[i, : m.shape[0]] = m
        return TextFeatures(torch.stack([r[0] for r in rows]), tokens, mask)

    # ---- image --------------------------------------------------------------------------------
    def patch_features(self, images: torch.Tensor) -> torch.Tensor:
        """Dense CLIP features (B, D, g, g), unit-normalised, for (B, 3, H, W) images in [0, 1]."""
        x = F.interpolate(images, size=(self.image_size, self.image_size), mode="bilinear",
                          align_corners=False, antialias=images.shape[-1] > self.image_size)
        x = (x - self.mean) / self.std
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            visual = self.clip.visual
            out = visual.forward_intermediates(x, indices=1, normalize_intermediates=True,
                                               intermediates_only=True)
            tokens = out["image_intermediates"][-1]  # (B, W, g, g)
            if getattr(visual, "proj", None) is not None:
                tokens = torch.einsum("bwhv,wd->bdhv", tokens, visual.proj)
        return F.normalize(tokens.float(), dim=1)


def similarity_map(patches: torch.Tensor, text_embedding: torch.Tensor) -> torch.Tensor:
    """Cosine similarity (B, 1, g, g) of patch features (B, D, g, g) with texts (B, D),
    min–max normalised per image to [0, 1]."""
    s = torch.einsum("bdhw,bd->bhw", patches, text_embedding)[:, None]
    lo = s.amin(dim=(2, 3), keepdim=True)
    hi = s.amax(dim=(2, 3), keepdim=True)
    return (s - lo) / (hi - lo).clamp_min(1e-6)


def resize_to_grid(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of (B, C, g, g) maps to SAM's (size, size) grid."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
