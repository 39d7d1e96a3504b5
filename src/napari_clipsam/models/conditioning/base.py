"""The interface every conditioning strategy implements.

A strategy may (a) add a residual adapter after chosen blocks of SAM's image encoder, (b) emit
extra sparse prompt tokens for SAM's mask decoder, (c) produce a semantic (text-to-pixel) map
that serves as the mask prompt of text-only decoding. Strategies implement only what they use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..sam_parts import SamConfig
from ..semantics import TextFeatures


@dataclass
class Context:
    """Everything CLIP says about B (image, text) rows.

    text: features of each row's text; patches: (B, D, g, g) CLIP patch features;
    similarity: (B, 1, g, g) min–max normalised text–patch cosine similarity.
    """

    text: TextFeatures
    patches: torch.Tensor
    similarity: torch.Tensor


class Conditioning(nn.Module):
    """Base class. Subclasses set ``name`` and override the hooks they need."""

    name: ClassVar[str] = ""

    def __init__(self, sam: SamConfig, clip_dim: int, text_width: int, clip_grid: int):
        super().__init__()
        self.sam_config = sam
        self.clip_dim = clip_dim
        self.text_width = text_width
        self.clip_grid = clip_grid

    @property
    def adapted_blocks(self) -> tuple[int, ...]:
        """Indices of image-encoder blocks followed by an adapter (text-dependent blocks)."""
        return ()

    def prepare(self, ctx: Context, grid: int) -> object:
        """Per-call state shared by all adapted blocks (e.g. projected text/vision features)."""
        return None

    def adapt(self, index: int, x: torch.Tensor, state: object) -> torch.Tensor:
        """Tokens (B, h, w, C) after block ``index`` → adapted tokens of the same shape."""
        return x

    def prompt_tokens(self, ctx: Context) -> torch.Tensor | None:
        """Extra sparse prompt tokens (B, K, prompt_dim) for the mask decoder, or None."""
        return None

    def semantic_logits(self, ctx: Context, size: int) -> torch.Tensor | None:
        """A semantic map (B, 1, size, size) of logits used as the mask prompt of text-only
        decoding, or None to let the decoder decide from the (conditioned) embedding alone."""
        return None
