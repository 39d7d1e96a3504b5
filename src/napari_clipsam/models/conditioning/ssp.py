"""Semantic-spatial prompts (after SSP-SAM): CLIP features → K sparse prompt tokens for SAM's decoder.

Visual adapter: CLIP patch features weighted by the similarity map, through an MLP. Linguistic
adapter: attention pooling over the text's token features to a phrase vector. Fusion: image
tokens cross-attend over words, gated by the phrase. A small transformer over [K learnable prompt
tokens, fused tokens] emits the K prompt tokens. The image embedding is never touched, so a new
text on an embedded image costs only this generator.
"""

from __future__ import annotations

import torch
from torch import nn

from ..sam_parts import SamConfig
from .base import Conditioning, Context


class SSPConditioning(Conditioning):
    name = "ssp"

    def __init__(self, sam: SamConfig, clip_dim: int, text_width: int, clip_grid: int,
                 num_tokens: int = 8, depth: int = 2, heads: int = 8):
        super().__init__(sam, clip_dim, text_width, clip_grid)
        d = sam.prompt_embed_dim
        heads = max(1, min(heads, d // 16))
        self.visual = nn.Sequential(nn.Linear(clip_dim, d), nn.GELU(), nn.Linear(d, d))
        self.pos = nn.Parameter(torch.randn(1, clip_grid * clip_grid, d) * 0.02)
        self.word_proj = nn.Linear(text_width, d)
        self.word_score = nn.Linear(d, 1)
        self.cross = nn.MultiheadAttention(d, heads, batch_first=True)
        self.norm = nn.LayerNorm(d)
        self.queries = nn.Parameter(torch.randn(1, num_tokens, d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, heads, dim_feedforward=2 * d, dropout=0.0,
                                           batch_first=True, norm_first=True)
        self.generator = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.out = nn.Linear(d, d)
        self.num_tokens = num_tokens

    def prompt_tokens(self, ctx: Context) -> torch.Tensor:
        b = ctx.patches.shape[0]
        weighted = (ctx.patches * ctx.similarity).flatten(2).transpose(1, 2)  # (B, G, D)
        vis = self.visual(weighted)
        if vis.shape[1] == self.pos.shape[1]:
            vis = vis + self.pos
        words = self.word_proj(ctx.text.tokens)  # (B, L, d)
        mask = ctx.text.token_mask
        score = self.word_score(words).squeeze(-1).masked_fill(~mask, float("-inf"))
        phrase = (score.softmax(-1)[..., None] * words).sum(1)  # (B, d)
        attended, _ = self.cross(vis, words, words, key_padding_mask=~mask, need_weights=False)
        fused = torch.tanh(self.norm(vis + attended)) * torch.tanh(phrase)[:, None]
        seq = torch.cat([self.queries.expand(b, -1, -1), fused], dim=1)
        return self.out(self.generator(seq)[:, : self.num_tokens])
