"""CLIP-guided adapters inside SAM's image encoder (after CLIP-Guided SAM).

After each selected encoder block: ``x = x + FC2(GELU(FC1(LN(x) + t + v)))`` where ``t`` is the
projected text embedding broadcast over space and ``v`` the CLIP patch features concatenated with
the similarity map, projected and resized to SAM's grid. ``t`` and ``v`` projections are shared by
all blocks (one per model instead of one per block: far fewer parameters), the bottleneck is
per block, and FC2 starts at zero so the untrained model reproduces plain SAM exactly.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..sam_parts import SamConfig
from .base import Conditioning, Context


class BlockAdapter(nn.Module):
    """Bottleneck ``C → r → C`` on the block's tokens plus the conditioning, zero-initialised output."""

    def __init__(self, dim: int, bottleneck: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, bottleneck)
        self.fc2 = nn.Linear(bottleneck, dim)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(self.norm(x) + cond)))


def resolve_blocks(blocks: str | int | Sequence[int], depth: int) -> tuple[int, ...]:
    """``"all"`` → every block; an int k → the last k blocks; a list → those indices."""
    if blocks == "all":
        return tuple(range(depth))
    if isinstance(blocks, (bool, str)) or blocks is None:
        raise ValueError(f"adapter blocks={blocks!r}: use 'all', an int k (the last k blocks) or block indices")
    if isinstance(blocks, int):
        if not 1 <= blocks <= depth:
            raise ValueError(f"adapter blocks={blocks}: need 1..{depth} (the encoder has {depth} blocks)")
        return tuple(range(depth - blocks, depth))
    out = tuple(sorted(int(b) for b in blocks))
    if not out or out[0] < 0 or out[-1] >= depth:
        raise ValueError(f"adapter blocks {list(blocks)} out of range for an encoder of {depth} blocks")
    return out


class AdapterConditioning(Conditioning):
    name = "adapter"

    def __init__(self, sam: SamConfig, clip_dim: int, text_width: int, clip_grid: int,
                 blocks: str | int | Sequence[int] = "all", bottleneck: int = 64):
        super().__init__(sam, clip_dim, text_width, clip_grid)
        dim = sam.encoder_embed_dim
        self._blocks = resolve_blocks(blocks, sam.encoder_depth)
        self.text_proj = nn.Linear(clip_dim, dim)
        self.vision_proj = nn.Conv2d(clip_dim + 1, dim, kernel_size=1)
        self.adapters = nn.ModuleDict({str(i): BlockAdapter(dim, bottleneck) for i in self._blocks})

    @property
    def adapted_blocks(self) -> tuple[int, ...]:
        return self._blocks

    def prepare(self, ctx: Context, grid: int) -> torch.Tensor:
        t = F.gelu(self.text_proj(ctx.text.embedding))  # (B, C)
        v = self.vision_proj(torch.cat([ctx.patches, ctx.similarity], dim=1))  # (B, C, g, g)
        v = F.interpolate(v, size=(grid, grid), mode="bilinear", align_corners=False)
        return v.permute(0, 2, 3, 1) + t[:, None, None, :]  # (B, h, w, C)

    def adapt(self, index: int, x: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        return x + self.adapters[str(index)](x, state)
