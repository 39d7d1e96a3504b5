"""SAM architectures by configuration: official sizes and tiny ones for tests and the demo.

The parts are segment-anything's own modules (``ImageEncoderViT``, ``PromptEncoder``,
``MaskDecoder``), so official checkpoints load into them unchanged.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import partial

import torch
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)
from segment_anything.modeling.common import LayerNorm2d
from torch import nn

from .stem_skip import StemSkip, stem_tap


@dataclass
class SamConfig:
    """Shape of a SAM model. Defaults are the official ``vit_b``."""

    encoder_embed_dim: int = 768
    encoder_depth: int = 12
    encoder_num_heads: int = 12
    encoder_global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    img_size: int = 1024
    patch_size: int = 16
    window_size: int = 14
    prompt_embed_dim: int = 256
    mask_in_chans: int = 16
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    iou_head_hidden_dim: int = 256
    pixel_mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    pixel_std: tuple[float, float, float] = (58.395, 57.12, 57.375)
    #: Channels of a convolutional stem in place of SAM's single ``patch_size`` convolution
    #: (see :func:`conv_stem`); empty — SAM's own, as in every official checkpoint.
    patch_stem: tuple[int, ...] = ()
    #: The mask head also reads the patch stem's features on the mask grid (a high-resolution
    #: skip, see :mod:`~napari_clipsam.models.stem_skip`); needs a ``patch_stem``. Off in every
    #: official checkpoint.
    stem_skip: bool = False

    @property
    def embed_size(self) -> int:
        """Side of the image-embedding grid (64 for the official 1024/16)."""
        return self.img_size // self.patch_size

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SamConfig":
        d = dict(d)
        d["encoder_global_attn_indexes"] = tuple(d.get("encoder_global_attn_indexes", ()))
        d["pixel_mean"] = tuple(d.get("pixel_mean", cls.pixel_mean))
        d["pixel_std"] = tuple(d.get("pixel_std", cls.pixel_std))
        d["patch_stem"] = tuple(d.get("patch_stem", ()))
        return cls(**d)


SAM_CONFIGS: dict[str, SamConfig] = {
    "vit_b": SamConfig(),
    "vit_l": SamConfig(
        encoder_embed_dim=1024,
        encoder_depth=24,
        encoder_num_heads=16,
        encoder_global_attn_indexes=(5, 11, 17, 23),
    ),
    "vit_h": SamConfig(
        encoder_embed_dim=1280,
        encoder_depth=32,
        encoder_num_heads=16,
        encoder_global_attn_indexes=(7, 15, 23, 31),
    ),
    # Tiny shape for unit tests: 64 px input, 4x4 embedding grid.
    "tiny": SamConfig(
        encoder_embed_dim=32,
        encoder_depth=2,
        encoder_num_heads=2,
        encoder_global_attn_indexes=(1,),
        img_size=64,
        patch_size=16,
        window_size=2,
        prompt_embed_dim=32,
        mask_in_chans=4,
        decoder_depth=1,
        decoder_mlp_dim=64,
        decoder_num_heads=2,
        iou_head_hidden_dim=32,
    ),
}


def conv_stem(channels: tuple[int, ...], embed_dim: int, patch_size: int) -> nn.Sequential:
    """A convolutional patch embedding: one stride-2 3×3 convolution (+ LayerNorm2d + GELU) per
    entry of ``channels``, then a convolution of the remaining stride to ``embed_dim`` — same
    output grid as SAM's ``patch_size`` convolution. Early convolutions make a small ViT trained
    from scratch learn shapes inside a patch faster (Xiao et al. 2021, "Early convolutions help
    transformers see better"); the demo model uses one."""
    stride = patch_size // 2 ** len(channels)
    if not channels or stride < 1 or stride * 2 ** len(channels) != patch_size:
        raise ValueError(f"patch_stem {channels}: need 1..log2(patch_size) layers with patch_size "
                         f"{patch_size} a multiple of 2**layers")
    layers: list[nn.Module] = []
    for cin, cout in zip((3, *channels[:-1]), channels):
        layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1), LayerNorm2d(cout), nn.GELU()]
    layers.append(nn.Conv2d(channels[-1], embed_dim, stride, stride=stride))
    return nn.Sequential(*layers)


def build_sam(config: SamConfig | str) -> Sam:
    """Build a randomly initialised segment-anything ``Sam`` of the given shape.

    ``config`` is a :class:`SamConfig` or a key of :data:`SAM_CONFIGS` (``"vit_b"``...).
    """
    if isinstance(config, str):
        if config not in SAM_CONFIGS:
            raise ValueError(
                f"unknown SAM architecture {config!r}; choose one of {sorted(SAM_CONFIGS)}"
            )
        config = SAM_CONFIGS[config]
    c = config
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=c.encoder_depth,
            embed_dim=c.encoder_embed_dim,
            img_size=c.img_size,
            mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=c.encoder_num_heads,
            patch_size=c.patch_size,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=c.encoder_global_attn_indexes,
            window_size=c.window_size,
            out_chans=c.prompt_embed_dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=c.prompt_embed_dim,
            image_embedding_size=(c.embed_size, c.embed_size),
            input_image_size=(c.img_size, c.img_size),
            mask_in_chans=c.mask_in_chans,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=c.decoder_depth,
                embedding_dim=c.prompt_embed_dim,
                mlp_dim=c.decoder_mlp_dim,
                num_heads=c.decoder_num_heads,
            ),
            transformer_dim=c.prompt_embed_dim,
            iou_head_depth=3,
            iou_head_hidden_dim=c.iou_head_hidden_dim,
        ),
        pixel_mean=list(c.pixel_mean),
        pixel_std=list(c.pixel_std),
    )
    if c.patch_stem:
        sam.image_encoder.patch_embed.proj = conv_stem(c.patch_stem, c.encoder_embed_dim, c.patch_size)
    if c.stem_skip:
        tap = stem_tap(c.patch_stem, c.patch_size)
        sam.mask_decoder.stem_skip = StemSkip(c.patch_stem[tap], c.prompt_embed_dim // 8)
    sam.eval()
    return sam


def sam_config_of(name_or_config: SamConfig | str) -> SamConfig:
    """Resolve a config name to a :class:`SamConfig`."""
    if isinstance(name_or_config, SamConfig):
        return name_or_config
    return SAM_CONFIGS[name_or_config]


__all__ = ["SamConfig", "SAM_CONFIGS", "build_sam", "conv_stem", "sam_config_of"]
