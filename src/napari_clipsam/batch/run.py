"""Batch segmentation on Dask: many files, per-slice tasks for volumes, resumable and fault tolerant.

Scheduling: one task per 2D file (the worker reads, segments and writes the output itself) and one
task per volume slice (the worker writes the slice's labels into the volume's
:class:`~.io.SliceStore`). Slices are linked across z on the client with the engine's
:class:`~napari_clipsam.engine.volume.ZLinker` from the stored slices, in z order, and the
output is written slice by slice. Tiles within a slice are the engine's (stitched by
:func:`~napari_clipsam.engine.tiling.stitch` on the worker), so results equal
``Segmenter.segment_text`` / ``segment_volume(text=...)`` run in one process.

Faults: a task whose worker dies is rescheduled by Dask (``distributed.scheduler.allowed-failures``
times); a task that raises is retried ``retries`` times, then its file is reported as failed and
the rest go on. Outputs appear atomically; a rerun skips finished outputs and finished slices.

Files must be on a file system that the client and the workers share (inputs are read and outputs
written by the workers); with ``ship="bytes"`` only the model/adapter files need not be.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from ..engine.instances import MIN_SUPPORT, TEXT_THRESHOLD, check_fraction, check_seeds
from .io import SliceStore, expand_inputs, file_kind, labels_dtype, lazy_array, output_for, write_labels
from .worker import ModelSpec, segment_image_file, segment_slice

log = logging.getLogger(__name__)

#: ``progress(done, total, message)``: tasks finished so far (files and slices).
Progress = Callable[[int, int, str], None]


@dataclass
class FileResult:
    """One input: status "done" (written now), "skipped" (output existed), "failed" or
    "cancelled"; ``objects``: number of objects written; ``seconds``: from the start of the
    batch until this output was written; ``slices_computed``/``slices_reused``: volume slices
    segmented in this run / kept from an interrupted earlier run."""

    input: Path
    output: Path
    status: str
    message: str = ""
    objects: int = 0
    seconds: float = 0.0
    slices_computed: int = 0
    slices_reused: int = 0


@dataclass
class BatchReport:
    """Per-input results of :func:`segment_files`, in input order."""

    results: list[FileResult] = field(default_factory=list)

    def _with(self, status: str) -> list[FileResult]:
        return [r for r in self.results if r.status == status]

    @property
    def done(self) -> list[FileResult]:
        return self._with("done")

    @property
    def skipped(self) -> list[FileResult]:
        return self._with("skipped")

    @property
    def failed(self) -> list[FileResult]:
        return self._with("failed")

    @property
    def cancelled(self) -> list[FileResult]:
        return self._with("cancelled")

    @property
    def ok(self) -> bool:
        return not self.failed and not self.cancelled

    def summary(self) -> str:
        parts = [f"{len(self.done)} done", f"{len(self.skipped)} skipped", f"{len(self.failed)} failed"]
        if self.cancelled:
            parts.append(f"{len(self.cancelled)} cancelled")
        lines = [", ".join(parts)]
        lines += [f"failed: {r.input}: {r.message}" for r in self.failed]
        return "\n".join(lines)


# ---- scheduler --------------------------------------------------------------------------------
@contextlib.contextmanager
def dask_client(scheduler: Any = "local", n_workers: int = 2, threads_per_worker: int = 1) -> Iterator[Any]:
    """A ``distributed.Client`` for ``scheduler``, closed on exit if made here.

    "local": a ``LocalCluster`` of ``n_workers`` processes on loopback, no dashboard; "threads":
    one in-process worker with ``n_workers`` threads (the model is loaded once, shared);
    "tcp://host:port" (or any scheduler address): that cluster; a ``Client``: used as is.
    """
    from distributed import Client, LocalCluster

    if isinstance(scheduler, Client):
        yield scheduler
        return
    if not isinstance(scheduler, str) or not scheduler:
        raise ValueError(f"scheduler {scheduler!r}: give 'local', 'threads', a scheduler address "
                         "(tcp://host:8786) or a distributed.Client")
    if n_workers < 1 or threads_per_worker < 1:
        raise ValueError(f"n_workers={n_workers}, threads_per_worker={threads_per_worker}: need at least 1")
    if scheduler in ("local", "processes"):
        cluster = LocalCluster(n_workers=n_workers, threads_per_worker=threads_per_worker, processes=True,
                               host="127.0.0.1", dashboard_address=None)
    elif scheduler == "threads":
        cluster = LocalCluster(n_workers=1, threads_per_worker=n_workers, processes=False, dashboard_address=None)
    else:
        if "://" not in scheduler and ":" not in scheduler:
            raise ValueError(f"scheduler {scheduler!r}: give 'local', 'threads' or a scheduler address "
                             "such as tcp://10.0.0.5:8786")
        client = Client(scheduler)
        try:
            yield client
        finally:
            client.close()
        return
    client = Client(cluster)
    try:
        yield client
    finally:
        client.close()
        cluster.close()


def _ship(client, spec: ModelSpec, ship: str) -> None:
    if ship == "path":
        return
    if ship != "bytes":
        raise ValueError(f"ship={ship!r}: choose 'path' (workers read the files) or 'bytes' (sent once per worker)")
    files = {h: Path(p).read_bytes() for h, p in spec.files().items()}
    if files:
        from .plugin import ModelFiles

        plugin = ModelFiles(files)
        client.register_plugin(plugin, name=plugin.name)


# ---- planning ---------------------------------------------------------------------------------
def _slice_axis(channel_axis: int | None, ndim: int) -> int | None:
    """A volume's channel axis → the axis in one slice ``volume[z]``."""
    if channel_axis is None:
        return None
    ca = channel_axis % ndim
    if ca == 0:
        raise ValueError("channel_axis=0 on a volume: the first axis must be z; move channels last")
    return ca - 1


def _plan(inputs, output_dir, outputs, fmt) -> list[tuple[Path, Path]]:
    paths = expand_inputs(inputs)
    if outputs is not None:
        outs = [Path(o).expanduser() for o in ([outputs] if isinstance(outputs, (str, os.PathLike)) else outputs)]
        if len(outs) != len(paths):
            raise ValueError(f"{len(paths)} inputs but {len(outs)} outputs: give one output per input or output_dir")
    else:
        folder = Path(output_dir).expanduser() if output_dir is not None else None
        outs = [output_for(p, folder, fmt) for p in paths]
    seen: dict[Path, Path] = {}
    for inp, out in zip(paths, outs):
        key = out.resolve()
        if key in seen:
            raise ValueError(f"{seen[key]} and {inp} would both be written to {out}: rename one or use outputs=")
        if key == inp.resolve():
            raise ValueError(f"output {out} is the input itself")
        if out.suffix not in (".tif", ".tiff", ".zarr"):
            raise ValueError(f"output {out}: name it .tif or .zarr")
        seen[key] = inp
    return list(zip(paths, outs))


class _Volume:
    """Client-side state of one volume: its slice tasks, then linking and writing."""

    def __init__(self, output: Path, shape: tuple[int, ...], limits: np.ndarray, meta: dict):
        self.output = output
        self.shape = tuple(int(s) for s in shape[:3])
        self.limits = limits
        self.store = SliceStore(output)
        self.store.open(self.shape, meta)
        self.reused = self.store.done()
        self.todo = [z for z in range(self.shape[0]) if z not in self.reused]
        self.pending = len(self.todo)
        self.error: str | None = None

    def finish(self, overwrite: bool, link_overlap: float) -> int:
        """Link the stored slices across z and write the output; returns the number of 3D objects."""
        from ..engine.volume import ZLinker

        import zarr

        raw = zarr.open_array(str(self.store.raw_path), mode="r")
        luts, linker = [], ZLinker(link_overlap)
        for z in range(self.shape[0]):
            labels, scores = self.store.read(z, raw)
            luts.append(linker.link(labels, scores))
        next_id = linker.next_id
        dtype = labels_dtype(next_id - 1)
        slices = (luts[z][np.asarray(raw[z])] for z in range(self.shape[0]))
        write_labels(self.output, slices, self.shape, dtype, overwrite=overwrite)
        self.store.remove()
        return next_id - 1


def _message(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}".strip().rstrip(":")


def segment_files(inputs: Sequence[str | os.PathLike] | str | os.PathLike, output_dir: str | os.PathLike | None = None,
                  text: str | None = None, *, outputs: Sequence[str | os.PathLike] | None = None,
                  model: str | os.PathLike = "demo", adapter: str | os.PathLike | None = None, volume: bool = False,
                  scheduler: Any = "local", n_workers: int = 2, threads_per_worker: int = 1,
                  overwrite: bool = False, output_format: str = "tif", channel_axis: int | None = None,
                  channels: Sequence[int] | None = None, threshold: float = TEXT_THRESHOLD, min_area: int = 16,
                  min_score: float = 0.25, seeds: str = "grid", min_support: float = MIN_SUPPORT, link_overlap: float = 0.5, tile_size: int | None = None,
                  halo: int | None = None, device: str | None = None, retries: int = 1, ship: str = "path",
                  progress: Progress | None = None, should_stop: Callable[[], bool] | None = None) -> BatchReport:
    """Segment every object of ``text`` in many images/volumes with Dask; one labels file per input.

    Args:
        inputs: TIFF files, zarr/OME-Zarr folders, folders of those, or glob patterns.
        output_dir: where ``<stem>_labels.<output_format>`` go (default: beside each input);
            or ``outputs``: one path per input (.tif or .zarr).
        text: the concept, e.g. "nucleus".
        model, adapter: registry name or ``.safetensors`` path, optional adapter file; loaded once
            per worker process.
        volume: treat 3D inputs as (Z, Y, X) volumes: per-slice tasks linked across z into 3D ids.
        scheduler: "local" (LocalCluster, ``n_workers`` processes), "threads", a scheduler
            address "tcp://host:port", or a ``distributed.Client``.
        overwrite: replace existing outputs; otherwise they are skipped (resume).
        threshold, min_area, min_score, seeds, min_support, tile_size, halo, link_overlap: as in
            ``Segmenter.segment_text`` / ``segment_volume``.
        retries: extra attempts for a task that raised (a dead worker's tasks are rescheduled
            by Dask regardless).
        ship: "path" (workers open the model/adapter files) or "bytes" (sent once per worker).
        progress: ``progress(done, total, message)`` per finished task.
        should_stop: polled while waiting; when it returns True, pending work is cancelled
            (finished slices are kept for the next run) and the report says "cancelled".

    Returns a :class:`BatchReport`. Raises ``ValueError`` for bad arguments (before any work);
    errors in single files are reported, not raised.
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"text must name a concept, e.g. 'nucleus', got {text!r}")
    text = text.strip()
    pairs = _plan(inputs, output_dir, outputs, output_format)
    spec = ModelSpec.create(model, adapter, device, tile_size, halo)
    base = {"threshold": threshold, "min_area": min_area, "min_score": min_score, "seeds": check_seeds(seeds),
            "min_support": check_fraction(min_support, "min_support"), "channels": channels}
    report = BatchReport([FileResult(i, o, "pending") for i, o in pairs])
    todo = []
    for r in report.results:
        if r.output.exists() and not overwrite:
            r.status, r.message = "skipped", "output exists"
        else:
            todo.append(r)
    if not todo:
        return report
    from distributed import as_completed

    with dask_client(scheduler, n_workers, threads_per_worker) as client:
        _ship(client, spec, ship)
        futures: dict[Any, tuple[FileResult, _Volume | None]] = {}
        start = time.perf_counter()
        for r in todo:
            try:
                with lazy_array(r.input) as arr:
                    shape = tuple(arr.shape)
                kind = file_kind(shape, volume, channel_axis)
            except ValueError as err:
                r.status, r.message = "failed", str(err)
                continue
            if kind == "2d":
                params = {**base, "channel_axis": channel_axis}
                f = client.submit(segment_image_file, spec, str(r.input), str(r.output), text, params, overwrite,
                                  key=f"clipsam-file-{r.input.name}-{_token()}", retries=retries, pure=False)
                futures[f] = (r, None)
                continue
            try:
                from ..engine.volume import volume_limits

                ca = _slice_axis(channel_axis, len(shape))
                params = {**base, "channel_axis": ca}
                with lazy_array(r.input) as arr:
                    limits = volume_limits(arr, ca, channels)
                meta = {"input": str(r.input), "shape": list(shape), "text": text, "model": spec.key,
                        "params": params, "mtime": os.stat(r.input).st_mtime_ns}
                vol = _Volume(r.output, shape, limits, meta)
            except Exception as err:  # an unreadable file fails alone
                r.status, r.message = "failed", _message(err)
                continue
            r.slices_reused = len(vol.reused)
            for z in vol.todo:
                f = client.submit(segment_slice, spec, str(r.input), z, limits, text, params, str(r.output),
                                  key=f"clipsam-slice-{r.input.name}-{z}-{_token()}", retries=retries, pure=False)
                futures[f] = (r, vol)
            if not vol.todo:  # every slice was done by an earlier run
                _finish_volume(r, vol, overwrite, link_overlap, start)
        total, finished = len(futures), 0
        seq = as_completed(list(futures))
        stopped = False
        for f in _poll(seq, should_stop):
            if f is None:  # asked to stop
                stopped = True
                client.cancel([g for g in futures if not g.done()])
                break
            r, vol = futures[f]
            finished += 1
            err = None if f.status == "finished" else (f.exception() if f.status == "error" else "cancelled")
            if vol is None:
                if err is None:
                    info = f.result()
                    r.status, r.objects = "done", info["objects"]
                    r.seconds = time.perf_counter() - start
                else:
                    r.status, r.message = "failed", _message(err) if not isinstance(err, str) else err
            else:
                if err is not None and vol.error is None:
                    vol.error = _message(err) if not isinstance(err, str) else err
                vol.pending -= 1
                r.slices_computed += err is None
                if vol.pending <= 0:
                    _finish_volume(r, vol, overwrite, link_overlap, start)
            if progress is not None:
                progress(finished, total, "segment")
            f.release()
        if stopped:
            for r, vol in futures.values():
                if r.status == "pending":
                    r.status, r.message = "cancelled", "stopped before it finished"
                    if vol is not None:
                        r.slices_computed = len(vol.store.done()) - r.slices_reused
    for r in report.results:
        log.info("%s -> %s: %s %s", r.input, r.output, r.status, r.message)
    return report


def _finish_volume(r: FileResult, vol: _Volume, overwrite: bool, link_overlap: float, start: float) -> None:
    if vol.error is not None:
        r.status = "failed"
        r.message = (f"{vol.error} ({len(vol.store.done())} of {vol.shape[0]} slices kept: "
                     "run again to finish)")
        return
    try:
        r.objects = vol.finish(overwrite, link_overlap)
        r.status = "done"
        r.seconds = time.perf_counter() - start
    except Exception as err:  # a write or read error of this file must not stop the batch
        r.status, r.message = "failed", _message(err)


def _poll(seq, should_stop) -> Iterator[Any]:
    """Futures as they complete; None once ``should_stop()`` is true (checked every 0.2 s)."""
    if should_stop is None:
        yield from seq
        return
    while not seq.is_empty():
        if should_stop():
            yield None
            return
        batch = seq.next_batch(block=False)
        if not batch:
            time.sleep(0.2)
            continue
        for f in batch:
            yield f
            if should_stop():
                yield None
                return


def _token() -> str:
    return os.urandom(4).hex()


__all__ = ["BatchReport", "FileResult", "dask_client", "segment_files"]
