"""Adapter files: only the fine-tuned weights as ``.safetensors`` + JSON metadata, checked on load.

An adapter file holds the LoRA factors, the conditioning strategy's weights and (if it was
trained) SAM's mask decoder — a few MB instead of the whole model — and, in the safetensors
header, JSON metadata: format + version, the base model (SAM architecture/name and a
fingerprint of its frozen weights), CLIP name, strategy + options, the full model config, LoRA
settings, texts/classes, the training summary and metrics, package/torch versions, and a
SHA-256 of the weights.

Base fingerprint (:func:`base_fingerprint`): BLAKE2b over the *frozen* weights an adapter never
changes — SAM's image encoder (LoRA layers read through to their original ``qkv``), prompt
encoder and the CLIP model — plus the SAM/CLIP configs. It is the same before and after
fine-tuning or loading an adapter, and differs between bases (official SAM vs micro-sam vs the
demo). The mask decoder is not part of it (adapters may replace it). It is cached on the model
(recomputed if any hashed tensor is replaced, modified in place, or has one of 8 sampled values
changed through ``.data``). An adapter that does not carry the strategy or the mask decoder
records a digest of the base's ones (``base.uncarried_sha256``): they must match on load.

Files are written atomically (temp file + rename) and never overwrite an existing file unless
``overwrite=True``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

import torch

from ..models.clipsam import ClipSam
from .finetune import ADAPTER_ATTR, BASE_ATTR
from .lora import LoraSettings, attach_lora, detach_lora, has_lora, lora_state

log = logging.getLogger(__name__)

FORMAT = "napari-clipsam/adapter"
FORMAT_VERSION = 1
_FP_ATTR = "_clipsam_base_fp"


class AdapterMismatchError(ValueError):
    """The adapter was trained for another base model or strategy."""


# ---------------------------------------------------------------------------------------------- fingerprints
def _hashed_tensors(model: ClipSam) -> list[tuple[str, torch.Tensor]]:
    out = []
    for prefix, mod in (("sam.image_encoder", model.sam.image_encoder), ("sam.prompt_encoder", model.sam.prompt_encoder),
                        ("clip", model.semantics.clip)):
        for name, t in mod.state_dict(keep_vars=True).items():
            if ".lora_" in name:
                continue
            out.append((f"{prefix}.{name.replace('.base_layer.', '.')}", t))
    out.sort(key=lambda kv: kv[0])
    return out


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def base_fingerprint(model: ClipSam) -> str:
    """Hex fingerprint (32 chars) of the model's frozen base weights and shapes (see module docstring)."""
    tensors = _hashed_tensors(model)
    # in-place edits through .data (peft's merge) bump no version counter: a few values join the key
    key = tuple((n, t.data_ptr(), t._version, t.detach().reshape(-1)[:: max(1, t.numel() // 8)][:8].tolist())
                for n, t in tensors)
    cached = model.__dict__.get(_FP_ATTR)
    if cached is not None and cached[0] == key:
        return cached[1]
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps({"sam": model.config.sam.to_dict(), "clip": model.config.clip.to_dict()},
                        sort_keys=True).encode())
    for name, t in tensors:
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(_tensor_bytes(t))
    fp = h.hexdigest()
    model.__dict__[_FP_ATTR] = (key, fp)
    return fp


def base_name(model: ClipSam) -> str:
    """A human name for the base: the model file's ``name`` metadata (a registered model such
    as ``demo``), else the name of the file it was loaded from, else its SAM architecture (a
    model built in memory, e.g. by ``build_clipsam``)."""
    name = (model.file_metadata or {}).get("name")
    if name:
        return str(name)
    if model.source:
        return Path(model.source).name
    from ..models.checkpoints import sam_arch_name

    arch = sam_arch_name(model.config.sam)
    return f"a ClipSam on SAM {arch or 'of a custom shape'} built in memory"


def _load_hint(want_name: str) -> str:
    """How to get the base an adapter was trained on, from the name its file records."""
    from ..models.registry import MODELS

    if want_name in MODELS or want_name.endswith(".safetensors"):
        return f"load it with --model {want_name}"
    return f"load it onto the model it was trained on ({want_name}), saved with ClipSam.save to reuse it"


def _clip_name(model: ClipSam) -> str:
    return model.config.clip.model_name or "custom clip"


def adapter_tensors(model: ClipSam) -> dict[str, torch.Tensor]:
    """The weights an adapter file holds for ``model``'s current adapter (CPU, contiguous)."""
    info = getattr(model, ADAPTER_ATTR, None)
    if info is None:
        raise ValueError("the model carries no fine-tuned adapter: run training.finetune (or load_adapter) first")
    out = {k: v for k, v in lora_state(model).items()}
    if info.get("lora") and not out:
        raise ValueError("the model's adapter had LoRA layers that are gone (merged with merge_lora or detached): "
                         "its weights are now part of the model: save the whole model with ClipSam.save instead")
    if info.get("train_conditioning", True):
        out.update({f"conditioning.{k}": v for k, v in model.conditioning.state_dict().items()})
    if info.get("train_decoder"):
        out.update({f"sam.mask_decoder.{k}": v for k, v in model.sam.mask_decoder.state_dict().items()})
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}


def weights_digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k]
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()


def uncarried_digest(model: ClipSam, train_conditioning: bool, train_decoder: bool) -> str | None:
    """SHA-256 of the base's strategy and/or mask-decoder weights that an adapter trained with
    these flags does not carry (its results depend on them), or None when it carries both. The
    base's values are read from a loaded adapter's saved copy where the model carries one."""
    base = getattr(model, BASE_ATTR, None) or {}
    parts = {}
    for prefix, mod, carried in (("conditioning.", model.conditioning, train_conditioning),
                                 ("sam.mask_decoder.", model.sam.mask_decoder, train_decoder)):
        if not carried:
            parts.update({prefix + k: base.get(prefix + k, v) for k, v in mod.state_dict().items()})
    return weights_digest({k: v.detach().cpu().contiguous() for k, v in parts.items()}) if parts else None


def adapter_fingerprint(model: ClipSam) -> str | None:
    """SHA-256 of the current adapter weights, or None without adapter (for embedding-cache keys)."""
    if getattr(model, ADAPTER_ATTR, None) is None:
        return None
    return weights_digest(adapter_tensors(model))


# ---------------------------------------------------------------------------------------------- save
def _package_version() -> str:
    try:
        from importlib.metadata import version

        return version("napari-clipsam")
    except Exception:
        return "unknown"


def save_adapter(path: str | os.PathLike, model: ClipSam, metadata: dict | None = None,
                 overwrite: bool = False) -> Path:
    """Write ``model``'s adapter (LoRA + strategy + decoder if trained) to ``path`` (.safetensors).

    ``metadata`` (JSON-able) is stored under ``"user"``. Raises ``FileExistsError`` if ``path``
    exists and ``overwrite`` is False, ``ValueError`` if the model has no adapter.
    """
    from ..models.checkpoints import write_safetensors

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"adapter files end in .safetensors, got {path.name!r}")
    if path.exists() and not overwrite:  # before hashing the base: write_safetensors checks again
        raise FileExistsError(f"{path} exists: choose another name or pass overwrite=True")
    tensors = adapter_tensors(model)
    info = dict(getattr(model, ADAPTER_ATTR))
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "base": {"name": base_name(model), "fingerprint": info.get("base_fingerprint") or base_fingerprint(model),
                 "sam": model.config.sam.to_dict(),
                 "uncarried_sha256": uncarried_digest(model, bool(info.get("train_conditioning", True)),
                                                      bool(info.get("train_decoder")))},
        "clip": {"name": _clip_name(model), "config": model.config.clip.to_dict()},
        "strategy": model.config.strategy,
        "strategy_options": model.config.strategy_options,
        "model_config": model.config.to_dict(),
        "lora": info.get("lora"),
        "train_decoder": bool(info.get("train_decoder")),
        "train_conditioning": bool(info.get("train_conditioning", True)),
        "texts": list(info.get("texts", [])),
        "mode": info.get("mode"),
        "training": {"config": info.get("config"), "summary": info.get("summary")},
        "weights_sha256": weights_digest(tensors),
        "package_version": _package_version(),
        "torch_version": torch.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "user": metadata or {},
    }
    write_safetensors(path, tensors, {"format": FORMAT, "adapter": json.dumps(meta, default=str)}, overwrite=overwrite)
    log.info("saved adapter %s (%d tensors, %.2f MB)", path, len(tensors), path.stat().st_size / 1e6)
    return path


# ---------------------------------------------------------------------------------------------- load
def read_adapter(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata, tensors) of an adapter file; ``ValueError`` with a clear message if unreadable."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"adapter file not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises several types for damaged files
        raise ValueError(f"{path} is not a readable adapter file (truncated or corrupt?): {err}") from err
    if header.get("format") != FORMAT:
        hint = " (a whole model? load it with --model / ClipSam.load)" if header.get("format") == "napari-clipsam/model" else ""
        raise ValueError(f"{path} is not a napari-clipsam adapter file{hint}")
    try:
        meta = json.loads(header["adapter"])
    except Exception as err:
        raise ValueError(f"{path}: adapter metadata is missing or corrupt: {err}") from err
    if not isinstance(meta, dict) or not isinstance(meta.get("format_version", 0), int) \
            or not isinstance(meta.get("base", {}), dict):
        raise ValueError(f"{path}: adapter metadata is not what napari-clipsam writes (corrupt or hand-made file)")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{path} was written by a newer napari-clipsam (format {meta.get('format_version')}): "
                         "update napari-clipsam to load it")
    if weights_digest(tensors) != meta.get("weights_sha256"):
        raise ValueError(f"{path}: the weights do not match their checksum (corrupt file): re-export the adapter")
    return meta, tensors


def _j(x):
    return json.loads(json.dumps(x, default=str))


def check_compatible(meta: dict, model: ClipSam, path: str | os.PathLike = "adapter") -> None:
    """Raise :class:`AdapterMismatchError` if the adapter was not trained for ``model``."""
    base = meta.get("base", {})
    want_fp, want_name = base.get("fingerprint", ""), base.get("name", "?")
    if _j(model.config.sam.to_dict()) != base.get("sam") or _j(model.config.clip.to_dict()) != meta.get("clip", {}).get("config"):
        have = base_name(model)
        raise AdapterMismatchError(
            f"adapter {Path(path).name} was trained on {want_name} (hash {want_fp[:12]}…) with CLIP "
            f"{meta.get('clip', {}).get('name')}, current base is {have} with CLIP {_clip_name(model)}: "
            f"{_load_hint(want_name)}")
    if meta.get("strategy") != model.config.strategy or meta.get("strategy_options", {}) != _j(model.config.strategy_options):
        raise AdapterMismatchError(
            f"adapter {Path(path).name} was trained for strategy {meta.get('strategy')!r} "
            f"{meta.get('strategy_options') or ''}, current model uses {model.config.strategy!r} "
            f"{model.config.strategy_options or ''}: load a base model built with that strategy")
    trained = meta.get("model_config") or {}
    for key in ("templates", "surgery"):  # how texts become CLIP features (not in the weights' hash)
        have = _j(getattr(model.config, key))
        if key in trained and trained[key] != have:
            raise AdapterMismatchError(
                f"adapter {Path(path).name} was trained on a model with {key} {trained[key]!r}, the current "
                f"model has {have!r}: its texts would be read differently; load the base model it was trained on")
    have_fp = base_fingerprint(model)
    if have_fp != want_fp:
        raise AdapterMismatchError(
            f"adapter {Path(path).name} was trained on {want_name} (hash {want_fp[:12]}…), current base is "
            f"{base_name(model)} (hash {have_fp[:12]}…): {_load_hint(want_name)}")
    want_rest = base.get("uncarried_sha256")
    if want_rest and uncarried_digest(model, bool(meta.get("train_conditioning", True)),
                                      bool(meta.get("train_decoder"))) != want_rest:
        parts = [p for p, carried in (("strategy", meta.get("train_conditioning", True)),
                                      ("mask decoder", meta.get("train_decoder"))) if not carried]
        raise AdapterMismatchError(
            f"adapter {Path(path).name} does not carry the {' and '.join(parts)} weights and was trained with "
            f"other ones than {base_name(model)} has: {_load_hint(want_name)}")


def remove_adapter(model: ClipSam) -> None:
    """Put the base back: remove LoRA layers and restore the strategy/decoder weights the base had."""
    if has_lora(model):
        detach_lora(model)
    base = getattr(model, BASE_ATTR, None)
    if base is not None:
        current = {f"conditioning.{n}": p for n, p in model.conditioning.named_parameters()}
        current.update({f"sam.mask_decoder.{n}": p for n, p in model.sam.mask_decoder.named_parameters()})
        with torch.no_grad():
            for n, t in base.items():
                current[n].copy_(t)
        delattr(model, BASE_ATTR)
    if hasattr(model, ADAPTER_ATTR):
        delattr(model, ADAPTER_ATTR)


def load_adapter(path: str | os.PathLike, model: ClipSam) -> dict:
    """Apply the adapter at ``path`` to ``model`` (in place) after checking it fits; returns its metadata.

    A model that already carries an adapter is first put back to its base. Raises
    :class:`AdapterMismatchError` (a ``ValueError``) for another base/strategy, ``ValueError``
    for a damaged file; the model is unchanged on any error.
    """
    meta, tensors = read_adapter(path)
    check_compatible(meta, model, path)
    from .finetune import _Snapshot

    snap = _Snapshot(model)
    try:
        if getattr(model, ADAPTER_ATTR, None) is not None or has_lora(model):
            remove_adapter(model)
        base_copy = {f"conditioning.{n}": p.detach().clone() for n, p in model.conditioning.named_parameters()}
        base_copy.update({f"sam.mask_decoder.{n}": p.detach().clone()
                          for n, p in model.sam.mask_decoder.named_parameters()})
        lora = meta.get("lora")
        if lora:
            attach_lora(model, LoraSettings.from_dict({**lora, "blocks": tuple(lora["blocks"])}))
            ls = lora_state(model)
            missing = sorted(set(ls) - set(tensors))
            if missing:
                raise ValueError(f"{path}: LoRA weights missing for {missing[:3]} (corrupt file)")
            with torch.no_grad():
                for k, p in ls.items():
                    p.copy_(tensors[k])
        for prefix, mod in (("conditioning.", model.conditioning), ("sam.mask_decoder.", model.sam.mask_decoder)):
            part = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            if part:
                dev = next(iter(mod.state_dict().values())).device
                try:
                    mod.load_state_dict({k: v.to(dev) for k, v in part.items()}, strict=True)
                except RuntimeError as err:  # names or shapes that do not fit: a damaged or edited file
                    raise ValueError(f"{path}: its {prefix.rstrip('.')} weights do not fit the model (corrupt "
                                     f"file?): {' '.join(str(err).split())[:300]}") from None
        snap.restore_flags(model)  # as before; the new LoRA factors frozen
        model.eval()
        setattr(model, BASE_ATTR, base_copy)
        setattr(model, ADAPTER_ATTR, {
            "lora": lora, "train_decoder": meta.get("train_decoder", False),
            "train_conditioning": meta.get("train_conditioning", True), "texts": meta.get("texts", []),
            "mode": meta.get("mode"), "config": (meta.get("training") or {}).get("config"),
            "summary": (meta.get("training") or {}).get("summary"), "base_fingerprint": meta["base"]["fingerprint"],
            "source": str(path),
        })
    except BaseException:
        snap.restore(model)
        raise
    log.info("loaded adapter %s (texts %s)", path, meta.get("texts"))
    return meta


__all__ = ["AdapterMismatchError", "FORMAT", "adapter_fingerprint", "adapter_tensors", "base_fingerprint",
           "base_name", "check_compatible", "load_adapter", "read_adapter", "remove_adapter", "save_adapter",
           "uncarried_digest"]
