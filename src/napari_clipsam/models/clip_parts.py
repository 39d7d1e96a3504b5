"""CLIP models through open_clip: named architectures with pretrained tags, or small custom ones.

A :class:`ClipConfig` says which CLIP to build. Named models (``"ViT-B-16"``) use open_clip's own
builder and tokenizer; ``custom`` models (tests, the bundled demo) are built from open_clip's
``CLIP`` class with a given vision/text shape and, optionally, a tiny character tokenizer so that
the demo does not carry CLIP's 49k-entry BPE embedding table.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import open_clip
import torch
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class ClipConfig:
    """Which CLIP to build.

    Either ``model_name`` (an open_clip architecture such as ``"ViT-B-16"`` or an
    ``"hf-hub:..."`` name) or ``custom`` (``{"embed_dim", "vision": CLIPVisionCfg kwargs,
    "text": CLIPTextCfg kwargs}``). ``tokenizer`` is ``"open_clip"`` (the model's own) or
    ``"char"`` (printable ASCII, for small custom models).
    """

    model_name: str | None = "ViT-B-16"
    custom: dict | None = None
    tokenizer: str = "open_clip"
    image_size: int = 224
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ClipConfig":
        d = dict(d)
        d["mean"] = tuple(d.get("mean", OPENAI_MEAN))
        d["std"] = tuple(d.get("std", OPENAI_STD))
        return cls(**d)


def tiny_clip_config(
    width: int = 32, layers: int = 1, embed_dim: int = 32, image_size: int = 64, patch_size: int = 16,
    context_length: int = 24,
) -> ClipConfig:
    """A small custom CLIP with the character tokenizer (tests and the demo model)."""
    return ClipConfig(
        model_name=None,
        custom={
            "embed_dim": embed_dim,
            "vision": {"layers": layers, "width": width, "head_width": max(width // 2, 8),
                       "patch_size": patch_size, "image_size": image_size},
            "text": {"context_length": context_length, "vocab_size": CharTokenizer.vocab_size,
                     "width": width, "heads": max(width // 16, 1), "layers": layers},
        },
        tokenizer="char",
        image_size=image_size,
    )


class CharTokenizer:
    """Printable-ASCII tokenizer for small custom CLIPs.

    Ids: 0 = padding, 1..95 = characters ``' '``..``'~'`` (lower-cased), 96 = start, 97 = end.
    The end token has the highest id, as open_clip's ``argmax`` text pooling expects.
    """

    vocab_size = 98
    sot = 96
    eot = 97

    def __init__(self, context_length: int = 24):
        self.context_length = context_length

    def __call__(self, texts: str | list[str]) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        out = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for i, t in enumerate(texts):
            ids = [self.sot] + [ord(c) - 31 for c in t.lower() if 32 <= ord(c) <= 126]
            ids = ids[: self.context_length - 1] + [self.eot]
            out[i, : len(ids)] = torch.tensor(ids)
        return out


def build_clip(config: ClipConfig, pretrained: str | None = None) -> tuple[torch.nn.Module, Callable]:
    """Build an open_clip model and its tokenizer (randomly initialised unless ``pretrained``).

    ``pretrained`` is an open_clip pretrained tag or a path to a local weights file; it only
    applies to named models (custom models load their weights through the ClipSam checkpoint).
    """
    if config.custom is not None:
        c = config.custom
        model = CLIP(
            embed_dim=c["embed_dim"],
            vision_cfg=CLIPVisionCfg(**c["vision"]),
            text_cfg=CLIPTextCfg(**c["text"]),
        )
        ctx = c["text"].get("context_length", 77)
        if config.tokenizer == "char":
            tokenizer: Callable = CharTokenizer(ctx)
        else:
            tokenizer = open_clip.get_tokenizer("ViT-B-16", context_length=ctx)
    elif config.model_name:
        model = open_clip.create_model(config.model_name, pretrained=pretrained)
        tokenizer = open_clip.get_tokenizer(config.model_name)
    else:
        raise ValueError("ClipConfig needs either model_name or custom")
    model.eval()
    return model, tokenizer


def clip_embed_dim(model: torch.nn.Module) -> int:
    """Dimension of the joint image–text space."""
    proj = getattr(model.visual, "proj", None)
    if proj is not None:
        return proj.shape[1]
    return model.visual.output_dim


def clip_text_width(model: torch.nn.Module) -> int:
    """Width of the text tower's per-token features."""
    if hasattr(model, "token_embedding"):
        return model.token_embedding.weight.shape[1]
    return clip_embed_dim(model)


__all__ = ["ClipConfig", "CharTokenizer", "build_clip", "tiny_clip_config", "clip_embed_dim",
           "clip_text_width"]
