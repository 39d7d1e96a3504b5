"""Safe loading of weight files (SAM checkpoints and CLIP weights), and writing our own.

Everything here works on *files*; :mod:`napari_clipsam.models.registry` turns model names
into files. Files are read with ``torch.load(..., weights_only=True)`` (or safetensors), so a
checkpoint can never run code, and every failure is a :class:`CheckpointError` that names
the file and says what to do, instead of a traceback from pickle or zipfile.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from .registry import CheckpointError
from .sam_parts import SAM_CONFIGS, SamConfig, build_sam

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike


def _new_file_mode() -> int:
    mask = os.umask(0o022)  # read the umask (set back at once; done once, at import)
    os.umask(mask)
    return 0o666 & ~mask


#: Permissions a new file gets in this process (safetensors alone writes owner-only files).
NEW_FILE_MODE = _new_file_mode()


def write_safetensors(path: PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str],
                      overwrite: bool = False) -> Path:
    """Write ``tensors`` (contiguous, CPU) with string ``metadata`` to a ``.safetensors`` file,
    atomically (a temp file in the same folder, then a rename), readable as any new file here
    so it can be shared. FileExistsError if ``path`` exists and ``overwrite`` is False."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists: choose another name or pass overwrite=True")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        try:
            save_file(dict(tensors), str(tmp), metadata=dict(metadata))
        except SafetensorError as err:  # its I/O failures (no permission, disk full) as the OSError they are
            raise OSError(f"cannot write {path}: {err}") from err
        os.chmod(tmp, NEW_FILE_MODE)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


# --------------------------------------------------------------------------------------
# reading files
# --------------------------------------------------------------------------------------


def read_weights(path: PathLike, what: str = "checkpoint") -> Any:
    """Read a ``.pth``/``.pt``/``.bin`` (torch, ``weights_only=True``) or ``.safetensors`` file on CPU.

    Raises :class:`CheckpointError` naming the file when it is missing, truncated, corrupt or
    holds pickled Python objects other than tensors and plain containers.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} file not found: {path}")
    size = path.stat().st_size
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(
                f"cannot read {what} {path} ({size} bytes): the safetensors file is truncated or "
                f"corrupt ({_short(e)}). Delete it and get it again."
            ) from None
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        msg = str(e)
        if "Weights only load failed" in msg or "weights_only" in msg and "Unsupported" in msg:
            raise CheckpointError(
                f"refusing to load {what} {path}: it contains pickled Python objects, not only tensors, "
                "and loading it could run code (torch.load weights_only=True rejected it). "
                "Re-save its state_dict() with torch.save, or convert it to .safetensors."
            ) from None
        raise CheckpointError(
            f"cannot read {what} {path} ({size} bytes): the file is truncated or corrupt "
            f"({type(e).__name__}: {_short(e)}). Delete it and download or copy it again."
        ) from None


def _short(e: BaseException, n: int = 160) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return first if len(first) <= n else first[: n - 3] + "..."


def _as_state_dict(obj: Any, path: PathLike, what: str) -> dict[str, torch.Tensor]:
    """Unwrap common containers: ``{"state_dict": ...}``, ``{"model": ...}``,
    micro-sam/torch_em ``{"model_state": ...}`` with a ``sam.`` prefix, DDP ``module.`` prefix."""
    if isinstance(obj, Mapping):
        for key in ("model_state", "state_dict", "model"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{what} {path} does not hold a state dict (found {type(obj).__name__})")
    sd = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise CheckpointError(f"{what} {path} holds no tensors")
    for prefix in ("module.", "sam."):
        if all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def _mismatches(expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor]
                ) -> tuple[list[str], list[str], list[str]]:
    """(missing keys, unexpected keys, "key: file shape vs model shape" for wrongly shaped ones)."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shapes = [
        f"{k}: file {tuple(found[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in found and tuple(found[k].shape) != tuple(expected[k].shape)
    ]
    return missing, unexpected, shapes


def mismatch_summary(
    expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor], n_examples: int = 5
) -> str | None:
    """Readable summary of missing, unexpected and wrongly shaped keys, or ``None`` if they match."""
    missing, unexpected, shapes = _mismatches(expected, found)
    if not (missing or unexpected or shapes):
        return None

    def part(label: str, items: list[str]) -> str:
        more = f", ... (+{len(items) - n_examples} more)" if len(items) > n_examples else ""
        return f"{len(items)} {label}" + (f" ({', '.join(items[:n_examples])}{more})" if items else "")

    return "; ".join(
        [part("missing keys", missing), part("unexpected keys", unexpected), part("shape mismatches", shapes)]
    )


# --------------------------------------------------------------------------------------
# SAM
# --------------------------------------------------------------------------------------

_BLOCK = re.compile(r"^image_encoder\.blocks\.(\d+)\.")
_DEC_LAYER = re.compile(r"^mask_decoder\.transformer\.layers\.(\d+)\.")


def infer_sam_config(state_dict: Mapping[str, torch.Tensor]) -> SamConfig:
    """Read the SAM architecture off a state dict's tensor shapes.

    Uses ``image_encoder.pos_embed`` ``(1, H/p, W/p, D)``, the patch-embedding kernel, the
    number of encoder blocks, the relative-position tables (global blocks have ``2*H/p-1`` rows,
    windowed ones ``2*window-1``; columns = head dim) and the decoder's layer shapes.
    ``decoder_num_heads`` cannot be read from weights and stays at the official 8.
    """
    sd = state_dict
    try:
        pos = sd["image_encoder.pos_embed"]
        patch = sd["image_encoder.patch_embed.proj.weight"]
        _, gh, _, dim = pos.shape
        ps = int(patch.shape[-1])
        depth = 1 + max(int(m.group(1)) for k in sd if (m := _BLOCK.match(k)))
        global_idx, window, head_dim = [], 14, 64
        for i in range(depth):
            rel = sd[f"image_encoder.blocks.{i}.attn.rel_pos_h"]
            head_dim = int(rel.shape[1])
            if rel.shape[0] == 2 * gh - 1:
                global_idx.append(i)
            else:
                window = (int(rel.shape[0]) + 1) // 2
        out_chans = int(sd["image_encoder.neck.0.weight"].shape[0])
        mask_in = int(sd["prompt_encoder.mask_downscaling.3.weight"].shape[0])
        dec_depth = 1 + max(int(m.group(1)) for k in sd if (m := _DEC_LAYER.match(k)))
        mlp_dim = int(sd["mask_decoder.transformer.layers.0.mlp.lin1.weight"].shape[0])
        iou_hidden = int(sd["mask_decoder.iou_prediction_head.layers.0.weight"].shape[0])
    except (KeyError, ValueError, IndexError, AttributeError) as e:
        raise CheckpointError(f"this does not look like a SAM state dict (no usable {e})") from None
    return SamConfig(
        encoder_embed_dim=int(dim),
        encoder_depth=depth,
        encoder_num_heads=max(int(dim) // head_dim, 1),
        encoder_global_attn_indexes=tuple(global_idx),
        img_size=int(gh) * ps,
        patch_size=ps,
        window_size=window,
        prompt_embed_dim=out_chans,
        mask_in_chans=mask_in,
        decoder_depth=dec_depth,
        decoder_mlp_dim=mlp_dim,
        iou_head_hidden_dim=iou_hidden,
    )


def sam_arch_name(config: SamConfig) -> str | None:
    """The :data:`SAM_CONFIGS` key whose shape equals ``config``, else ``None``.

    Pixel statistics and ``decoder_num_heads`` are ignored: they leave no trace in the weights.
    """
    ignore = ("pixel_mean", "pixel_std", "decoder_num_heads")
    keys = [f.name for f in fields(SamConfig) if f.name not in ignore]
    for name, known in SAM_CONFIGS.items():
        if all(getattr(known, k) == getattr(config, k) for k in keys):
            return name
    return None


def _describe(config: SamConfig) -> str:
    name = sam_arch_name(config)
    shape = f"embed {config.encoder_embed_dim}, {config.encoder_depth} blocks, input {config.img_size}"
    return f"{name!r} ({shape})" if name else f"a custom SAM ({shape})"


_SAM_PARTS = ("image_encoder.", "prompt_encoder.", "mask_decoder.")


def _unreadable_sam(sd: Mapping[str, torch.Tensor], path: PathLike, what: str) -> CheckpointError:
    """The error for a state dict whose SAM architecture cannot be read: where its keys are SAM's,
    what it lacks against the closest known architecture (shapes only: built on the meta device)."""
    if not any(k.startswith(_SAM_PARTS) for k in sd):
        return CheckpointError(f"{what} {path} is not a SAM state dict (no image_encoder/prompt_encoder/mask_decoder "
                               f"weights; first keys: {', '.join(list(sd)[:3])})")
    problems = {}
    for name in SAM_CONFIGS:
        with torch.device("meta"):
            expected = build_sam(name).state_dict()
        problems[name] = (sum(map(len, _mismatches(expected, sd))), mismatch_summary(expected, sd))
    closest = min(problems, key=lambda n: problems[n][0])
    return CheckpointError(f"{what} {path} is an incomplete or damaged SAM checkpoint: against the closest "
                           f"architecture, {closest!r}, it has {problems[closest][1]}")


def load_sam_file(path: PathLike, arch: str | SamConfig | None = None, what: str = "SAM checkpoint"):
    """Load a SAM checkpoint file into segment-anything's ``Sam`` (eval mode, CPU).

    ``arch`` is a :data:`SAM_CONFIGS` key (``"vit_b"``...), a :class:`SamConfig`, or ``None`` to
    infer it from the tensor shapes. Keys must match exactly (strict); otherwise a
    :class:`CheckpointError` lists the missing/unexpected/misshaped keys and the architecture
    the file actually has.
    """
    sd = _as_state_dict(read_weights(path, what), path, what)
    inferred: SamConfig | None
    try:
        inferred = infer_sam_config(sd)
    except CheckpointError:
        inferred = None
    if arch is None:
        if inferred is None:
            raise _unreadable_sam(sd, path, what)
        known = sam_arch_name(inferred)
        config = SAM_CONFIGS[known] if known else inferred
    elif isinstance(arch, str):
        if arch not in SAM_CONFIGS:
            raise CheckpointError(f"unknown SAM architecture {arch!r}; choose one of {sorted(SAM_CONFIGS)}")
        config = SAM_CONFIGS[arch]
    else:
        config = arch
    sam = build_sam(config)
    problem = mismatch_summary(sam.state_dict(), sd)
    if problem:
        hint = ""
        if inferred is not None and sam_arch_name(inferred) != sam_arch_name(config):
            looks = sam_arch_name(inferred)
            hint = f" The file looks like {_describe(inferred)}" + (
                f": load it with arch={looks!r}." if looks else "."
            )
        raise CheckpointError(
            f"{what} {path} does not fit SAM architecture {_describe(config)}: {problem}.{hint}"
        )
    sam.load_state_dict(sd, strict=True)
    sam.eval()
    logger.info("loaded %s from %s as %s", what, path, _describe(config))
    return sam


# --------------------------------------------------------------------------------------
# CLIP
# --------------------------------------------------------------------------------------


def load_clip_file(
    model: str | Any,
    path: PathLike | None = None,
    *,
    quick_gelu: bool = False,
) -> tuple[torch.nn.Module, Callable]:
    """Build a CLIP and load its weights from a local file (or folder); returns ``(model, tokenizer)``.

    ``model`` is an open_clip architecture name (``"ViT-B-16"``), a ``ClipConfig`` from
    :mod:`napari_clipsam.models.clip_parts` (custom shapes included), or, with ``path`` a folder
    holding ``open_clip_config.json`` and the weights, any name (``hf-hub:`` models downloaded
    by hand). ``path=None`` gives random weights. ``quick_gelu`` must be True for OpenAI weights.
    Weights are read with ``weights_only=True``; keys must match exactly.
    """
    import open_clip

    from .clip_parts import ClipConfig, build_clip

    if path is not None and Path(path).is_dir():
        try:
            net = open_clip.create_model(f"local-dir:{path}", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"cannot load CLIP from folder {path}: {_short(e)}") from None
        return net.eval(), open_clip.get_tokenizer(f"local-dir:{path}")

    if isinstance(model, ClipConfig) and model.custom is None:
        model = model.model_name
    if isinstance(model, str):
        try:
            net = open_clip.create_model(model, pretrained=None, force_quick_gelu=quick_gelu)
        except RuntimeError as e:
            raise CheckpointError(f"unknown open_clip model {model!r}: {_short(e)}") from None
        tokenizer = open_clip.get_tokenizer(model)
    else:
        net, tokenizer = build_clip(model)
    if path is not None:
        # read it ourselves first: unreadable/unsafe files give our clear errors
        sd = _as_state_dict(read_weights(path, "CLIP weights"), path, "CLIP weights")
        if isinstance(model, str):  # open_clip's loader knows its models' older/third-party layouts
            try:
                open_clip.load_checkpoint(net, str(path), strict=True, weights_only=True)
            except Exception as e:
                problem = mismatch_summary(net.state_dict(), _convert_clip_state_dict(net, sd)) or _short(e)
                raise CheckpointError(f"CLIP weights {path} do not fit {_clip_name(model)}: {problem}.") from None
        else:
            sd = _convert_clip_state_dict(net, sd)
            problem = mismatch_summary(net.state_dict(), sd)
            if problem:
                raise CheckpointError(f"CLIP weights {path} do not fit {_clip_name(model)}: {problem}.")
            net.load_state_dict(sd, strict=True)
        logger.info("loaded CLIP weights %s into %s", path, _clip_name(model))
    net.eval()
    return net, tokenizer


def _convert_clip_state_dict(net: torch.nn.Module, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Apply open_clip's own conversions for third-party/older layouts (no-op for open_clip files)."""
    try:
        from open_clip.factory import convert_state_dict

        sd = convert_state_dict(net, sd)
    except Exception:  # pragma: no cover - conversion helper absent or not applicable
        pass
    if "positional_embedding" in sd and not hasattr(net, "positional_embedding"):
        try:
            from open_clip.model import convert_to_custom_text_state_dict

            sd = convert_to_custom_text_state_dict(sd)
        except Exception:  # pragma: no cover
            pass
    # buffers open_clip does not keep in its state dict
    expected = net.state_dict()
    return {k: v for k, v in sd.items() if k in expected or not k.endswith("attn_mask")}


def _clip_name(model: Any) -> str:
    return model if isinstance(model, str) else f"custom CLIP {getattr(model, 'custom', model)!r}"


__all__ = [
    "CheckpointError",
    "NEW_FILE_MODE",
    "write_safetensors",
    "read_weights",
    "mismatch_summary",
    "infer_sam_config",
    "sam_arch_name",
    "load_sam_file",
    "load_clip_file",
]
