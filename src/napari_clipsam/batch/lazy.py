"""Segment one lazy array (a dask-backed napari layer, a zarr array) without loading it whole.

Volumes are processed slice by slice: each slice is read, segmented, linked to the previous
slice's 3D ids and written into a zarr array, so memory holds about two slices. In this process
(the default, what a napari widget uses with its own :class:`Segmenter`) or, with ``scheduler``,
slices run as Dask tasks (dask arrays are then read by the workers) and are linked here in z order.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from ..engine.instances import TEXT_THRESHOLD
from .io import file_kind, lazy_array, looks_rgb, open_lazy

log = logging.getLogger(__name__)


@dataclass
class LazyResult:
    """labels: zarr array (Y, X) or (Z, Y, X) uint32 (napari shows it as a Labels layer without
    loading it); scores: {id: mean score}; complete: False if stopped early."""

    labels: Any
    scores: dict[int, float] = field(default_factory=dict)
    complete: bool = True

    @property
    def n_objects(self) -> int:
        return len(self.scores)


def _create_output(out, shape: tuple[int, ...], overwrite: bool):
    import zarr

    chunks = (1,) * (len(shape) - 2) + tuple(shape[-2:])
    if out is None:
        store = zarr.storage.MemoryStore()
    else:
        store = os.fspath(out)
        if os.path.exists(store) and not overwrite:
            raise FileExistsError(f"{store} exists: pass overwrite=True or another out=")
    return zarr.create_array(store, shape=shape, dtype=np.uint32, chunks=chunks, fill_value=0, overwrite=True)


def segment_lazy(data: Any, text: str, *, segmenter=None, model: str | os.PathLike = "demo",
                 adapter: str | os.PathLike | None = None, volume: bool | None = None,
                 channel_axis: int | None = None, channels: Sequence[int] | None = None,
                 out: str | os.PathLike | None = None, overwrite: bool = False, scheduler: Any = None,
                 n_workers: int = 2, threshold: float = TEXT_THRESHOLD, min_area: int = 16, min_score: float = 0.25,
                 seeds: str = "grid", link_overlap: float = 0.5,
                 progress: Callable[[int, int, str], None] | None = None,
                 should_stop: Callable[[], bool] | None = None) -> LazyResult:
    """All instances of ``text`` in a lazy 2D image or (Z, Y, X) volume → a zarr labels array.

    data: a dask/zarr/numpy array or a TIFF/zarr path (read lazily). volume: treat a 3D array
    as (Z, Y, X) (default: yes unless it looks like (H, W, 3) RGB or ``channel_axis`` makes it
    2D). segmenter: run here with this :class:`Segmenter` (default: load ``model``/``adapter``);
    scheduler: run slices on Dask instead ("threads", "local", an address or a Client; the model
    is then loaded by the workers from ``model``/``adapter``). out: a ``.zarr`` folder for the
    labels (default: in memory, compressed). should_stop: polled per slice; on True returns the
    partial labels with ``complete=False``. Same results as ``Segmenter.segment_text`` /
    ``segment_volume(text=...)`` on the loaded array.
    """
    from ..engine.volume import ZLinker, volume_limits
    from .run import _slice_axis

    if isinstance(data, (str, os.PathLike)):  # a file: opened lazily here, closed when done
        options = {k: v for k, v in locals().items() if k in _OPTIONS}
        with lazy_array(data) as arr:
            return segment_lazy(arr, text, **options)
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"text must name a concept, e.g. 'nucleus', got {text!r}")
    text = text.strip()
    arr = open_lazy(data)
    shape = tuple(int(s) for s in arr.shape)
    if volume is None:
        volume = len(shape) - (channel_axis is not None) == 3 and not looks_rgb(shape, channel_axis)
    kind = file_kind(shape, volume, channel_axis)
    params = {"threshold": threshold, "min_area": min_area, "min_score": min_score, "seeds": seeds, "channels": channels}
    if kind == "2d":
        spatial = shape[:2] if channel_axis is None else tuple(
            s for i, s in enumerate(shape) if i != channel_axis % len(shape))
        labels_out = _create_output(out, spatial, overwrite)
        image = np.asarray(arr[...])
        if scheduler is None:
            seg = segmenter if segmenter is not None else _load(model, adapter)
            seg.set_image(image, channel_axis=channel_axis, channels=channels)
            res = seg.segment_text(text, threshold=threshold, min_area=min_area, min_score=min_score, seeds=seeds)
            labels, scores = res.labels, res.scores
        else:
            from .run import dask_client
            from .worker import ModelSpec, segment_image

            with dask_client(scheduler, n_workers) as client:
                spec = ModelSpec.create(model, adapter)
                labels, scores = client.submit(segment_image, spec, image, text,
                                               {**params, "channel_axis": channel_axis}, pure=False).result()
        labels_out[...] = labels
        if progress:
            progress(1, 1, "segment")
        return LazyResult(labels_out, dict(scores))

    if channel_axis is not None and channel_axis % len(shape) == 0:  # (C, Z, Y, X): channels last, lazily
        arr, channel_axis = _lazy_channels_last(arr), -1
        shape = tuple(int(s) for s in arr.shape)
    ca = _slice_axis(channel_axis, len(shape))
    nz = shape[0]
    limits = volume_limits(arr, ca, channels)
    labels_out = _create_output(out, shape[:3], overwrite)
    per_id: dict[int, list[float]] = {}
    linker = ZLinker(link_overlap)

    def add(z: int, labels: np.ndarray, scores: dict[int, float]) -> None:
        lut = linker.link(labels, scores)
        for k, s in scores.items():
            per_id.setdefault(int(lut[k]), []).append(s)
        final = lut[labels]
        labels_out[z] = final
        if progress:
            progress(z + 1, nz, "segment")

    def result(complete: bool) -> LazyResult:
        return LazyResult(labels_out, {k: float(np.mean(v)) for k, v in per_id.items()}, complete)

    params["channel_axis"] = ca
    if scheduler is None:
        from ..engine.preprocess import normalize_image

        seg = segmenter if segmenter is not None else _load(model, adapter)
        for z in range(nz):
            if should_stop is not None and should_stop():
                return result(False)
            seg.set_normalized(normalize_image(np.asarray(arr[z]), ca, channels, limits=limits), embed=False)
            res = seg.segment_text(text, threshold=threshold, min_area=min_area, min_score=min_score, seeds=seeds)
            add(z, res.labels, res.scores)
        return result(True)

    from .run import dask_client
    from .worker import ModelSpec, segment_slice

    spec = ModelSpec.create(model, adapter)
    with dask_client(scheduler, n_workers) as client:
        if _is_dask(arr):
            import dask

            task = dask.delayed(segment_slice, pure=False)
            futures = client.compute([task(spec, arr[z], None, limits, text, params) for z in range(nz)])
        else:
            futures = [client.submit(segment_slice, spec, np.asarray(arr[z]), None, limits, text, params, pure=False)
                       for z in range(nz)]
        try:
            for z, f in enumerate(futures):
                if should_stop is not None and should_stop():
                    return result(False)
                labels, scores = f.result()
                f.release()
                add(z, labels, scores)
        finally:
            client.cancel([f for f in futures if not f.done()])
    return result(True)


_OPTIONS = ("segmenter", "model", "adapter", "volume", "channel_axis", "channels", "out", "overwrite", "scheduler",
            "n_workers", "threshold", "min_area", "min_score", "seeds", "link_overlap", "progress", "should_stop")


def _lazy_channels_last(arr) -> Any:
    """A lazy (C, Z, Y, X) array as a lazy (Z, Y, X, C) dask array (nothing is read here)."""
    import dask.array as da

    if not _is_dask(arr):
        arr = da.from_array(arr, chunks=getattr(arr, "chunks", None) or "auto")
    return da.moveaxis(arr, 0, -1)


def _is_dask(arr) -> bool:
    return type(arr).__module__.startswith("dask")


def _load(model, adapter):
    from ..engine.segmenter import Segmenter
    from .worker import ModelSpec, load_model

    return Segmenter(load_model(ModelSpec.create(model, adapter)))


__all__ = ["LazyResult", "segment_lazy"]
