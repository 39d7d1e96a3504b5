"""Parameter-efficient fine-tuning setup: LoRA (``peft``) on SAM's encoder attention + strategy params.

:func:`attach_lora` wraps the ``qkv`` projections of chosen image-encoder blocks
(``sam.image_encoder.blocks.{i}.attn.qkv``) in ``peft`` LoRA layers, in place, with
``peft.inject_adapter_in_model``: the model stays a plain :class:`ClipSam` (no ``PeftModel``
wrapper), so the engine uses it unchanged. LoRA's ``B`` starts at zero, so a freshly attached
model computes exactly what the base did. :func:`detach_lora` puts the original ``nn.Linear``
objects back (their weights were never touched), :func:`merge_lora` folds the update into them.

:func:`set_trainable` freezes everything, then enables LoRA factors, the conditioning
strategy's parameters and, optionally, SAM's mask decoder. :func:`trainable_report` gives the
counts as a % of the whole model (frozen base included).
"""

from __future__ import annotations

import logging
import numbers
from dataclasses import asdict, dataclass
from typing import Sequence

import torch
from torch import nn

log = logging.getLogger(__name__)

LORA_TARGET = "sam.image_encoder.blocks.{}.attn.qkv"


@dataclass
class LoraSettings:
    """LoRA on the image encoder's attention.

    rank: LoRA rank r (0 disables LoRA); alpha: scaling numerator (update scaled by alpha / r);
    blocks: ``"all"``, ``"half"`` (the last ⌈depth/2⌉ blocks, default: the first half stays frozen
    and its output is cached during training), an int k (the last k blocks, clamped to the depth)
    or explicit block indices; dropout: LoRA dropout.
    """

    rank: int = 8
    alpha: float = 16.0
    blocks: str | int | tuple[int, ...] = "half"
    dropout: float = 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        if isinstance(self.blocks, (list, tuple)):
            d["blocks"] = list(self.blocks)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "LoraSettings":
        blocks = d.get("blocks", "half")
        if isinstance(blocks, list):
            blocks = tuple(int(b) for b in blocks)
        return cls(rank=int(d.get("rank", 8)), alpha=float(d.get("alpha", 16.0)), blocks=blocks,
                   dropout=float(d.get("dropout", 0.0)))


def resolve_lora_blocks(blocks: str | int | Sequence[int], depth: int) -> tuple[int, ...]:
    """``"all"`` / ``"half"`` / int k (last k, clamped) / indices → sorted block indices."""
    if blocks == "all":
        return tuple(range(depth))
    if blocks == "half":
        return tuple(range(depth // 2, depth))
    if isinstance(blocks, bool) or blocks is None:
        raise ValueError(f"lora_blocks={blocks!r}: use 'all', 'half', an int (the last k blocks) or block indices")
    if isinstance(blocks, numbers.Integral):
        if blocks < 1:
            raise ValueError(f"lora_blocks={blocks}: need at least 1 block (or lora_rank=0 to disable LoRA)")
        return tuple(range(max(0, depth - blocks), depth))
    if isinstance(blocks, str) or not isinstance(blocks, (list, tuple, range)) or \
            not all(isinstance(b, numbers.Integral) and not isinstance(b, bool) for b in blocks):
        raise ValueError(f"lora_blocks={blocks!r}: use 'all', 'half', an int (the last k blocks) or block indices")
    out = tuple(sorted({int(b) for b in blocks}))
    if not out or out[0] < 0 or out[-1] >= depth:
        raise ValueError(f"lora_blocks {list(blocks)} out of range for an image encoder of {depth} blocks (0..{depth - 1})")
    return out


def lora_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Name → peft LoRA layer for every LoRA-wrapped module of ``model``."""
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def has_lora(model: nn.Module) -> bool:
    return bool(lora_modules(model))


def lora_blocks_of(model: nn.Module) -> tuple[int, ...]:
    """Encoder blocks whose ``qkv`` carries LoRA."""
    out = []
    for name in lora_modules(model):
        parts = name.split(".")
        if "blocks" in parts:
            out.append(int(parts[parts.index("blocks") + 1]))
    return tuple(sorted(out))


def lora_settings_of(model: nn.Module) -> LoraSettings | None:
    """The settings of the LoRA layers ``model`` carries (rank, alpha and dropout read from the
    layers themselves, blocks as indices), or None without LoRA. ValueError if the layers
    disagree with each other (not something :func:`attach_lora` makes)."""
    mods = list(lora_modules(model).values())
    if not mods:
        return None
    found = {(int(m.r["default"]), float(m.lora_alpha["default"]), float(getattr(m.lora_dropout["default"], "p", 0.0)))
             for m in mods}
    if len(found) > 1:
        raise ValueError(f"the model's LoRA layers have different settings (rank, alpha, dropout): {sorted(found)}")
    rank, alpha, dropout = found.pop()
    return LoraSettings(rank=rank, alpha=alpha, blocks=lora_blocks_of(model), dropout=dropout)


def attach_lora(model: nn.Module, settings: LoraSettings) -> tuple[int, ...]:
    """Wrap ``qkv`` of the chosen encoder blocks in LoRA layers (in place). Returns the blocks.

    Parameters' ``requires_grad`` flags are left as ``peft`` sets them (only LoRA factors
    trainable): call :func:`set_trainable` afterwards. Raises if the model already has LoRA.
    """
    from peft import LoraConfig, inject_adapter_in_model

    if has_lora(model):
        raise ValueError("the model already has LoRA layers (a fine-tuned or loaded adapter): "
                         "detach_lora(model) first, or fine-tune it further without attaching")
    depth = len(model.sam.image_encoder.blocks)
    blocks = resolve_lora_blocks(settings.blocks, depth)
    if settings.rank < 1:
        raise ValueError(f"lora rank {settings.rank}: must be >= 1 to attach LoRA")
    cfg = LoraConfig(r=int(settings.rank), lora_alpha=float(settings.alpha), lora_dropout=float(settings.dropout),
                     target_modules=[LORA_TARGET.format(i) for i in blocks], bias="none")
    device = model.sam.pixel_mean.device
    inject_adapter_in_model(cfg, model)
    model.to(device)
    return blocks


def detach_lora(model: nn.Module) -> None:
    """Remove LoRA layers: put each wrapped module's original ``base_layer`` back (in place)."""
    for name, mod in sorted(lora_modules(model).items(), key=lambda kv: -kv[0].count(".")):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, mod.get_base_layer())
    if "peft_config" in model.__dict__:
        del model.__dict__["peft_config"]


def merge_lora(model: nn.Module) -> None:
    """Fold LoRA updates into the wrapped weights and remove the LoRA layers (plain SAM layout again,
    e.g. to export the whole model with ``ClipSam.save``). Not reversible: the fine-tuned weights
    are the model's own now, and it no longer carries an adapter (nothing to save or remove)."""
    from .finetune import ADAPTER_ATTR, BASE_ATTR  # here: finetune imports this module

    for mod in lora_modules(model).values():
        mod.merge()
    detach_lora(model)
    for attr in (ADAPTER_ATTR, BASE_ATTR):
        if hasattr(model, attr):
            delattr(model, attr)


def lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA factors: ``{module name + ".lora_A.weight" | ".lora_B.weight": tensor}``
    (the adapter name ``default`` is dropped from the keys)."""
    out = {}
    for name, mod in lora_modules(model).items():
        for which in ("lora_A", "lora_B"):
            layer = getattr(mod, which)["default"]
            out[f"{name}.{which}.weight"] = layer.weight
    return out


def set_trainable(model: nn.Module, train_decoder: bool = False, train_conditioning: bool = True) -> None:
    """Freeze everything, then enable LoRA factors, the strategy's parameters and, optionally,
    SAM's mask decoder."""
    model.requires_grad_(False)
    for p in lora_state(model).values():
        p.requires_grad_(True)
    if train_conditioning:
        model.conditioning.requires_grad_(True)
    if train_decoder:
        model.sam.mask_decoder.requires_grad_(True)


def trainable_report(model: nn.Module) -> dict[str, float | int]:
    """``{"trainable", "total", "percent", "lora", "conditioning", "decoder"}`` parameter counts
    (``percent`` = trainable / total × 100; total includes the frozen SAM and CLIP)."""
    params = list(model.parameters())
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    lora = sum(p.numel() for p in lora_state(model).values() if p.requires_grad)
    cond = sum(p.numel() for p in model.conditioning.parameters() if p.requires_grad)
    dec = sum(p.numel() for p in model.sam.mask_decoder.parameters() if p.requires_grad)
    return {"trainable": trainable, "total": total, "percent": 100.0 * trainable / max(total, 1),
            "lora": lora, "conditioning": cond, "decoder": dec}


__all__ = ["LoraSettings", "LORA_TARGET", "attach_lora", "detach_lora", "has_lora", "lora_blocks_of",
           "lora_modules", "lora_settings_of", "lora_state", "merge_lora", "resolve_lora_blocks", "set_trainable", "trainable_report"]
