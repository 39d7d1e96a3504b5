"""A high-resolution skip from a convolutional patch stem into SAM's mask head.

SAM predicts masks at 4× its embedding grid (a 16-px ViT token covers 4 × 4 mask cells), from the
image tokens alone. A small model trained from scratch (the demo) then cannot place the boundary
between two touching objects: a click on one of two touching nuclei returns both. With
:func:`~napari_clipsam.models.sam_parts.conv_stem` in place of the patch convolution, one of the
stem's layers already computes features on exactly the mask grid (stride ``patch_size / 4``).
:class:`StemSkip` adds them to the upscaled mask features of every prompt, and refines the sum
with two 3×3 convolutions, before the mask tokens' hypernetwork outputs read it out (in the
spirit of HQ-SAM's fusion of early features, Ke et al. 2023).

Both additions start at zero (the head is SAM's own until trained). The skip is part of the
mask decoder (``sam.mask_decoder.stem_skip``), so fine-tuning the decoder trains it too. Official
SAM checkpoints have no stem, and so no skip (``SamConfig.stem_skip`` off).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from segment_anything.modeling.common import LayerNorm2d
from torch import nn


def stem_tap(patch_stem: tuple[int, ...], patch_size: int) -> int:
    """Index of the stem layer block whose output lies on the mask grid (stride ``patch_size / 4``).

    ``ValueError`` where the stem has no such layer (fewer stride-2 layers than needed)."""
    j = int(round(math.log2(patch_size))) - 3  # block j has stride 2 ** (j + 1)
    if patch_size < 8 or 2 ** (j + 3) != patch_size or len(patch_stem) <= j:
        raise ValueError(f"stem_skip needs a patch_stem with a layer at stride {patch_size / 4:g} (patch_size "
                         f"{patch_size}, a power of two ≥ 8, and at least {max(j, 0) + 1} stem layers); "
                         f"got patch_stem {tuple(patch_stem)}")
    return j


class StemSkip(nn.Module):
    """Upscaled mask features x (n, Cm, H, W) of n prompts + stem features (B, Cs, H, W) of their
    images → refined (n, Cm, H, W): ``x + proj(stem)``, then ``+ refine([x, stem])`` (two 3×3
    convolutions). Both start at zero.

    What depends on the image alone — ``proj(stem)`` and the stem's share of the first refine
    convolution (a convolution of a concatenation is the sum of the convolutions of its parts) —
    is computed once per image, not per prompt.
    """

    def __init__(self, stem_channels: int, mask_channels: int, hidden: int = 32):
        super().__init__()
        self.proj = nn.Conv2d(stem_channels, mask_channels, 1)
        self.refine = nn.Sequential(nn.Conv2d(mask_channels + stem_channels, hidden, 3, padding=1),
                                    LayerNorm2d(hidden), nn.GELU(), nn.Conv2d(hidden, mask_channels, 3, padding=1))
        for conv in (self.proj, self.refine[-1]):
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor, stem: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """``index`` (n,): the row of ``stem`` (the image) of each prompt."""
        cs = self.proj.in_channels
        if stem.ndim != 4 or stem.shape[1] != cs or stem.shape[2:] != x.shape[2:]:
            raise ValueError(f"stem features must be (B, {cs}, {x.shape[2]}, {x.shape[3]}), "
                             f"got {tuple(stem.shape)}")
        if index.shape != (x.shape[0],):
            raise ValueError(f"index must give one stem row per prompt ({x.shape[0]}), got {tuple(index.shape)}")
        first = self.refine[0]
        cm = x.shape[1]
        x = x + self.proj(stem)[index]
        h = F.conv2d(x, first.weight[:, :cm], first.bias, padding=1)
        h = h + F.conv2d(stem, first.weight[:, cm:], None, padding=1)[index]
        return x + self.refine[1:](h)


def run_stem(stem: nn.Sequential, x: torch.Tensor, tap: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A :func:`~napari_clipsam.models.sam_parts.conv_stem` on normalised images, run once →
    (its output, the output of its block ``tap``: conv + LayerNorm2d + GELU each)."""
    k = 3 * (tap + 1)
    mid = stem[:k](x)
    return stem[k:](mid), mid


__all__ = ["StemSkip", "run_stem", "stem_tap"]
