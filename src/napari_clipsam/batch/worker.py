"""What runs on a Dask worker: a worker-local model cache and the per-image / per-slice tasks.

The model travels as a small :class:`ModelSpec` (a registry name or path, and the adapter's path
and content hash), never as pickled weights: each worker process loads it once, on its first
task, and keeps it in a module-level cache keyed by the spec. With ``ship="bytes"`` the files
themselves are sent once per worker by a :class:`~.plugin.ModelFiles` worker plugin (for workers
that do not see the client's files) and the spec points at the worker's copy.

Threads of one worker share the loaded model; each thread gets its own :class:`Segmenter`
(segmenters hold the current image, so they are not shared between threads).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

_LOCK = threading.Lock()
_MODELS: dict[str, Any] = {}  # spec.key → ClipSam, loaded once per process
_LOCAL = threading.local()  # .segmenters: {spec.key: Segmenter} per thread
_SHIPPED: dict[str, str] = {}  # content hash → local path of a file shipped by plugin.ModelFiles
#: Embedding-cache size of each worker thread's segmenter. A batch sees each image once, so the
#: cache only serves within one task and is emptied after it (memory stays flat over many slices).
CACHE_BYTES = 64 << 20


def file_hash(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class ModelSpec:
    """How a worker gets its model: ``model`` a registered name or a ``.safetensors`` path,
    ``adapter`` an adapter file (or None); the hashes name shipped copies and key the cache, so a
    changed file is never served from a stale cache entry."""

    model: str
    adapter: str | None = None
    model_hash: str | None = None
    adapter_hash: str | None = None
    device: str | None = None
    tile_size: int | None = None
    halo: int | None = None

    @classmethod
    def create(cls, model: str | os.PathLike = "demo", adapter: str | os.PathLike | None = None,
               device: str | None = None, tile_size: int | None = None, halo: int | None = None) -> "ModelSpec":
        """A spec with absolute paths and content hashes; ``ValueError`` for a missing file."""
        from ..models.registry import MODELS

        name = os.fspath(model)
        model_hash = None
        if name not in MODELS:
            p = Path(name).expanduser()
            if not p.is_file():
                raise ValueError(f"model {name!r} is neither a registered name (see 'napari-clipsam models list') "
                                 "nor an existing .safetensors file")
            name, model_hash = str(p.resolve()), file_hash(p)
        adapter_path = adapter_hash = None
        if adapter is not None:
            p = Path(adapter).expanduser()
            if not p.is_file():
                raise ValueError(f"adapter file not found: {p}")
            adapter_path, adapter_hash = str(p.resolve()), file_hash(p)
        return cls(name, adapter_path, model_hash, adapter_hash, device, tile_size, halo)

    @property
    def key(self) -> str:
        return "|".join(str(x) for x in (self.model if self.model_hash is None else self.model_hash,
                                         self.adapter_hash, self.device, self.tile_size, self.halo))

    def files(self) -> dict[str, str]:
        """{content hash: local path} of the files a worker needs (for shipping as bytes)."""
        out = {}
        if self.model_hash:
            out[self.model_hash] = self.model
        if self.adapter_hash:
            out[self.adapter_hash] = self.adapter
        return out


def _local(spec: ModelSpec) -> ModelSpec:
    """The spec with shipped copies substituted for paths this worker may not see."""
    def pick(digest: str | None, path: str | None) -> str | None:
        copy = _SHIPPED.get(digest or "")
        return copy if copy is not None and os.path.exists(copy) else path

    return replace(spec, model=pick(spec.model_hash, spec.model), adapter=pick(spec.adapter_hash, spec.adapter))


def load_model(spec: ModelSpec):
    """The spec's ClipSam with the adapter applied; loaded once per process."""
    with _LOCK:
        model = _MODELS.get(spec.key)
        if model is None:
            from ..models.clipsam import ClipSam
            from ..models.registry import load_model as _load

            local = _local(spec)
            model = _load(local.model)
            if not isinstance(model, ClipSam):
                raise ValueError(f"{spec.model!r} is a {type(model).__name__}, not a napari-clipsam model")
            if local.adapter is not None:
                from ..training.adapter_file import load_adapter

                load_adapter(local.adapter, model)
            model.eval()
            _MODELS[spec.key] = model
            log.info("worker process %d loaded model %s", os.getpid(), spec.key)
        return model


def get_segmenter(spec: ModelSpec):
    """This thread's :class:`Segmenter` for ``spec`` (the model is shared by the process's threads)."""
    segs = getattr(_LOCAL, "segmenters", None)
    if segs is None:
        segs = _LOCAL.segmenters = {}
    seg = segs.get(spec.key)
    if seg is None:
        from ..engine.cache import EmbeddingCache
        from ..engine.segmenter import Segmenter

        model = load_model(spec)
        with _LOCK:  # moving to the device / fingerprinting touches shared weights
            seg = Segmenter(model, device=spec.device, cache=EmbeddingCache(max_bytes=CACHE_BYTES),
                            tile_size=spec.tile_size, halo=spec.halo)
        segs[spec.key] = seg
    return seg


def loaded_models() -> list[str]:
    """Keys of the models this process holds (for tests and diagnostics)."""
    return sorted(_MODELS)


# ---- tasks ------------------------------------------------------------------------------------
def _text_params(params: dict) -> dict:
    return {k: params[k] for k in ("threshold", "min_area", "min_score", "seeds", "min_support") if k in params}


def segment_image(spec: ModelSpec, source: Any, text: str, params: dict) -> tuple[np.ndarray, dict[int, float]]:
    """One 2D image (a path or an array) → ((H, W) uint32 labels, {id: score})."""
    from .io import lazy_array

    with lazy_array(source) as arr:
        image = np.asarray(arr[...])
    seg = get_segmenter(spec)
    seg.set_image(image, channel_axis=params.get("channel_axis"), channels=params.get("channels"))
    res = seg.segment_text(text, **_text_params(params))
    seg.reset_image()
    seg.cache.clear()
    return res.labels, res.scores


def segment_image_file(spec: ModelSpec, source: Any, output: str, text: str, params: dict,
                       overwrite: bool = False) -> dict:
    """Task: segment one 2D image and write its labels to ``output`` (atomically).
    Returns {"objects": n, "shape": (H, W)}."""
    from .io import labels_dtype, write_labels

    labels, scores = segment_image(spec, source, text, params)
    write_labels(Path(output), [labels], labels.shape, labels_dtype(len(scores)), overwrite=overwrite)
    return {"objects": len(scores), "shape": tuple(labels.shape)}


@functools.lru_cache(maxsize=4)
def _open_file(path: str, mtime_ns: int):
    from .io import open_lazy

    return open_lazy(path)


def _open(source: Any):
    """A lazy array for ``source``; a volume file is opened once per process (not per slice)."""
    if isinstance(source, (str, os.PathLike)):
        return _open_file(os.fspath(source), os.stat(source).st_mtime_ns)
    from .io import open_lazy

    return open_lazy(source)


def segment_slice(spec: ModelSpec, source: Any, z: int | None, limits: np.ndarray, text: str, params: dict,
                  store_output: str | None = None) -> dict[int, float] | tuple[np.ndarray, dict[int, float]]:
    """Task: text instances of one volume slice, normalised with the volume's ``limits``.

    source: the volume (a path, re-opened lazily here, or an array) with ``z``, or the slice
    itself with ``z=None``. With ``store_output`` the labels go to that output's
    :class:`~.io.SliceStore` and only the scores come back; else (labels, scores).
    """
    from ..engine.preprocess import normalize_image
    from .io import SliceStore

    arr = _open(source)
    image = np.asarray(arr[z] if z is not None else arr[...])
    seg = get_segmenter(spec)
    seg.set_normalized(normalize_image(image, params.get("channel_axis"), params.get("channels"), limits=limits),
                       embed=False)
    res = seg.segment_text(text, **_text_params(params))
    seg.reset_image()
    seg.cache.clear()
    if store_output is None:
        return res.labels, res.scores
    SliceStore(Path(store_output)).write(int(z), res.labels, res.scores)
    return res.scores


__all__ = ["ModelSpec", "file_hash", "get_segmenter", "load_model", "loaded_models",
           "segment_image", "segment_image_file", "segment_slice"]
