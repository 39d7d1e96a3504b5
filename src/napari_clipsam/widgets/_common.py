"""What the two panels share: one :class:`Session` per viewer (the model, a job queue), layer helpers.

The Segment and Fine-tune panels of one viewer use the same :class:`~napari_clipsam.engine.segmenter.Segmenter`
(so a fine-tuned adapter is used for segmentation at once) and the same :class:`Jobs` queue: every
piece of work on the model (embedding, decoding, segment-all, training) runs in a napari
``thread_worker``, one at a time, so the UI never blocks and the model is never used by two
threads. Progress goes to napari's activity dock; errors become napari notifications carrying the
engine's message.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Hashable

import numpy as np
from qtpy.QtCore import QEvent, QObject, QThreadPool, Signal
from qtpy.QtWidgets import QComboBox

if TYPE_CHECKING:
    import napari

    from ..engine.segmenter import Segmenter

log = logging.getLogger(__name__)

#: ``report(done, total, message)``: what a job function gets to report progress (any thread).
Report = Callable[[int, int, str], None]


class JobCancelled(Exception):
    """Raised by a job's ``report`` once its viewer is closing: the job stops at its next progress
    step (a tile, a decode chunk, a slice) instead of running to its end while the window waits."""


def alive(obj: QObject) -> bool:
    """Whether the Qt object behind ``obj`` still exists (napari events may outlive closed widgets)."""
    try:
        obj.objectName()
    except RuntimeError:
        return False
    return True


def show_error(message: str) -> None:
    """A napari error notification (no traceback dialog)."""
    from napari.utils.notifications import show_error as _show

    _show(message)


def show_info(message: str) -> None:
    from napari.utils.notifications import show_info as _show

    _show(message)


@dataclass
class _Job:
    name: str
    fn: Callable[[Report], Any]
    on_done: Callable[[Any], None] | None
    on_error: Callable[[BaseException], None] | None
    desc: str | None
    key: Hashable | None = None


class Jobs(QObject):
    """A queue of functions run one at a time in napari thread workers.

    ``submit(name, fn, on_done)``: ``fn(report)`` runs in a worker thread; ``on_done(result)`` in
    the main thread. With ``coalesce`` a job still waiting under the same name is replaced (the
    latest prompt wins). ``desc`` shows a napari progress bar fed by ``report``. Errors are shown
    as notifications ``"<desc or name>: <message>"`` (and passed to ``on_error``). A job with a
    ``key`` is not queued while one with an equal key runs or waits (:meth:`has`). After
    :meth:`shutdown`, ``report`` raises :class:`JobCancelled` in the running job.
    """

    progressed = Signal(int, int, str)
    idle = Signal()
    started = Signal(str)

    def __init__(self, parent: QObject | None = None):
        super().__init__(parent)
        self._pending: deque[_Job] = deque()
        self._current: _Job | None = None
        self._worker = None
        self._pbar = None
        self._closed = False
        self.cancel_hooks: list[Callable[[], None]] = []  # called on shutdown (e.g. cancel training)
        self.progressed.connect(self._on_progress)

    @property
    def busy(self) -> bool:
        return self._current is not None or bool(self._pending)

    @property
    def running(self) -> str | None:
        """Name of the running job, or None."""
        return None if self._current is None else self._current.name

    def has(self, key: Hashable) -> bool:
        """Whether a job submitted with ``key`` is running or waiting."""
        return any(j is not None and j.key == key for j in (self._current, *self._pending))

    def submit(self, name: str, fn: Callable[[Report], Any], on_done: Callable[[Any], None] | None = None,
               on_error: Callable[[BaseException], None] | None = None, desc: str | None = None,
               coalesce: bool = False, key: Hashable | None = None) -> bool:
        """Queue ``fn``; False (nothing queued) when closed or a job with an equal ``key`` is there."""
        if self._closed or (key is not None and self.has(key)):
            return False
        job = _Job(name, fn, on_done, on_error, desc, key)
        if coalesce:
            self._pending = deque(j for j in self._pending if j.name != name)
        self._pending.append(job)
        self._next()
        return True

    def shutdown(self, timeout_ms: int = 60_000) -> None:
        """The viewer is closing: drop waiting jobs, cancel what can be cancelled, wait for the running one."""
        self._closed = True
        self._pending.clear()
        for hook in self.cancel_hooks:
            hook()
        if self._current is not None:
            QThreadPool.globalInstance().waitForDone(timeout_ms)

    def _next(self) -> None:
        if self._closed or self._current is not None or not self._pending:
            return
        from napari.qt.threading import create_worker

        job = self._current = self._pending.popleft()
        if job.desc:
            from napari.utils import progress

            self._pbar = progress(total=0, desc=job.desc)
        worker = create_worker(job.fn, self._report, _ignore_errors=True)
        worker.returned.connect(self._on_returned)
        worker.errored.connect(self._on_errored)
        worker.finished.connect(self._on_finished)
        self._worker = worker
        self.started.emit(job.name)
        worker.start()

    def _report(self, done: int, total: int, message: str) -> None:
        """The running job's ``report`` (its thread): progress, or the end of the job once closing."""
        if self._closed:
            raise JobCancelled("the viewer is closing")
        self.progressed.emit(done, total, message)

    def _on_progress(self, done: int, total: int, message: str) -> None:
        pbar, job = self._pbar, self._current
        if pbar is None or job is None:
            return
        if pbar.total != total:
            pbar.total = total
        desc = f"{job.desc}: {message}" if message else job.desc
        if desc != pbar.desc:
            pbar.set_description(desc)
        pbar.update(done - pbar.n)

    def _on_returned(self, result: Any) -> None:
        job = self._current
        if job is not None and job.on_done is not None:
            try:
                job.on_done(result)
            except Exception as err:  # a widget bug must not kill the queue
                log.exception("job %s: result handler failed", job.name)
                show_error(f"{job.desc or job.name}: {err}")

    def _on_errored(self, err: BaseException) -> None:
        job = self._current
        if isinstance(err, JobCancelled):
            log.info("job %s stopped: %s", job.name if job else "?", err)
            return
        log.info("job %s failed: %s", job.name if job else "?", err, exc_info=err)
        show_error(f"{(job.desc or job.name) if job else 'napari-clipsam'}: {err}")
        if job is not None and job.on_error is not None:
            job.on_error(err)

    def _on_finished(self) -> None:
        if self._pbar is not None:
            self._pbar.close()
            self._pbar = None
        self._current = None
        self._worker = None
        if self._pending:
            self._next()
        else:
            self.idle.emit()


class _CloseWatcher(QObject):
    """Shuts the session's jobs down when the viewer window closes (no worker outlives its window)."""

    def __init__(self, window: QObject, jobs: Jobs):
        super().__init__(window)
        self.jobs = jobs
        window.installEventFilter(self)

    def eventFilter(self, obj, event) -> bool:  # noqa: N802 (Qt)
        if event.type() == QEvent.Close:
            self.jobs.shutdown()
        return False


class Session(QObject):
    """Per-viewer state shared by the panels: the segmenter (model) and the job queue.

    ``model_changed`` fires when a new model is set or its weights change (adapter trained,
    loaded or removed); panels re-embed and refresh what they show.
    """

    model_changed = Signal()

    def __init__(self, parent: QObject | None = None):
        super().__init__(parent)
        self.jobs = Jobs(self)
        self.segmenter: Segmenter | None = None
        self.model_source: str = ""

    def set_segmenter(self, segmenter: Segmenter | None, source: str = "") -> None:
        self.segmenter = segmenter
        self.model_source = source
        self.model_changed.emit()

    def weights_changed(self) -> None:
        """Declare that the model's weights changed (fine-tuning, adapter): embeddings are redone."""
        if self.segmenter is not None:
            self.segmenter.model_changed()
            self.segmenter.reset_image()
        self.model_changed.emit()

    def require_segmenter(self) -> Segmenter:
        if self.segmenter is None:
            raise RuntimeError("no model loaded: choose a model in the Segment panel and press 'Load model'")
        return self.segmenter

    def adapter_info(self) -> dict | None:
        """The applied adapter's description (``model.clipsam_adapter``) or None."""
        from ..training.finetune import ADAPTER_ATTR

        return None if self.segmenter is None else getattr(self.segmenter.model, ADAPTER_ATTR, None)


_SESSIONS: dict[int, tuple[weakref.ref, Session]] = {}
_LOCK = threading.Lock()


def session_for(viewer: napari.Viewer) -> Session:
    """The :class:`Session` of ``viewer`` (created on first use, forgotten with the viewer)."""
    with _LOCK:
        for key, (ref, _) in list(_SESSIONS.items()):
            if ref() is None:
                del _SESSIONS[key]
        entry = _SESSIONS.get(id(viewer))
        if entry is not None and entry[0]() is viewer:
            return entry[1]
        window = getattr(getattr(viewer, "window", None), "_qt_window", None)
        session = Session(window)  # deleted with the viewer's window
        if window is not None:
            session._watcher = _CloseWatcher(window, session.jobs)
        key = id(viewer)
        _SESSIONS[key] = (weakref.ref(viewer), session)
        session.destroyed.connect(lambda *_: _SESSIONS.pop(key, None))
        return session


# ---------------------------------------------------------------------------------------------- layers
class LayerCombo(QComboBox):
    """A combo box of the viewer's layers of one type (kept in sync with the layer list).

    ``extra``: entries listed first (e.g. ``"new layer"``) whose ``value()`` is None.
    """

    def __init__(self, viewer: napari.Viewer, layer_type: str, extra: tuple[str, ...] = (),
                 exclude: Callable[[Any], bool] | None = None):
        super().__init__()
        self.viewer = viewer
        self.layer_type = layer_type
        self.extra = extra
        self.exclude = exclude
        self._chosen: Any = None  # what the last currentIndexChanged announced (see _selection)
        self.currentIndexChanged.connect(self._remember)
        for ev in (viewer.layers.events.inserted, viewer.layers.events.removed, viewer.layers.events.reordered):
            ev.connect(self.refresh)
        viewer.layers.events.inserted.connect(self._on_inserted)
        for lay in viewer.layers:
            lay.events.name.connect(self.refresh)
        self.refresh()

    def _on_inserted(self, event) -> None:
        """A renamed layer is relisted under its new name (and stays selected if it was)."""
        if alive(self):
            event.value.events.name.connect(self.refresh)

    def _layers(self) -> list:
        import napari.layers

        cls = getattr(napari.layers, self.layer_type)
        return [lay for lay in self.viewer.layers
                if isinstance(lay, cls) and not (self.exclude is not None and self.exclude(lay))]

    def _selection(self) -> Any:
        """The selected layer object, an ``extra`` entry's name, or None (empty)."""
        name = self.currentText()
        if not name or name in self.extra:
            return name or None
        return self.value()

    def _remember(self, *_) -> None:
        self._chosen = self._selection()

    def refresh(self, event=None) -> None:
        """Relist the layers, keeping the selection; ``currentIndexChanged`` fires only when the
        selected layer itself changed (it was removed), not when its row moved."""
        if not alive(self):
            return
        current = self.currentText()
        layers = self._layers()
        if self._chosen is not None and not isinstance(self._chosen, str) and any(lay is self._chosen for lay in layers):
            current = self._chosen.name  # the chosen layer, under its name now (it may have been renamed)
        self.blockSignals(True)
        try:
            self.clear()
            self.addItems(list(self.extra) + [lay.name for lay in layers])
            i = self.findText(current)
            self.setCurrentIndex(i if i >= 0 else 0)
        finally:
            self.blockSignals(False)
        now = self._selection()
        if not (now is self._chosen or (isinstance(now, str) and now == self._chosen)):
            self.currentIndexChanged.emit(self.currentIndex())

    def value(self):
        """The selected layer, or None (an ``extra`` entry or nothing)."""
        name = self.currentText()
        if name in self.extra or not name:
            return None
        return next((lay for lay in self._layers() if lay.name == name), None)

    def set_value(self, layer) -> None:
        self.refresh()
        i = self.findText(layer.name if layer is not None else self.extra[0])
        if i >= 0:
            self.setCurrentIndex(i)


def image_kind(layer, channel_axis: int | None) -> str:
    """``"2d"``, ``"volume"`` for what the engine sees in an Image layer; ValueError otherwise."""
    data = layer.data[0] if getattr(layer, "multiscale", False) else layer.data
    nd = data.ndim - (1 if layer.rgb else 0) - (1 if channel_axis is not None else 0)
    if layer.rgb and channel_axis is not None:
        raise ValueError(f"layer {layer.name!r} is RGB: leave the channel axis at 'none'")
    if channel_axis is not None and not -data.ndim <= channel_axis < data.ndim:
        raise ValueError(f"channel axis {channel_axis} does not exist in layer {layer.name!r} of shape {data.shape}")
    if nd == 2:
        return "2d"
    if nd == 3:
        return "volume"
    raise ValueError(f"layer {layer.name!r} has shape {data.shape}: expected a 2D image, RGB, or a (Z, Y, X) "
                     "volume (set the channel axis for multichannel data)")


def layer_data(layer):
    """Full-resolution data of a layer as stored: NumPy, or a lazy dask/zarr array (not read)."""
    return layer.data[0] if getattr(layer, "multiscale", False) else layer.data


def is_lazy(data) -> bool:
    """True for array-likes that are read on demand (dask, zarr, ...), False for NumPy arrays."""
    return not isinstance(data, np.ndarray)


def layer_array(layer) -> np.ndarray:
    """Full-resolution data of a layer as NumPy (reads a lazy layer whole)."""
    return np.asarray(layer_data(layer))


def current_z(viewer: napari.Viewer, layer, axis: int = 0) -> int:
    """Index of the slice along ``layer``'s data axis ``axis`` (its z) shown in the viewer."""
    coords = layer.world_to_data(viewer.dims.point[-layer.ndim:])
    n = layer_data(layer).shape[axis]
    return int(np.clip(np.round(coords[axis]), 0, n - 1))


def visible_region(viewer: napari.Viewer, layer, channel_axis: int | None = None) -> tuple[float, float, float, float] | None:
    """The part of ``layer``'s (Y, X) plane on screen, ``(y0, x0, y1, x1)`` in data pixels (not
    clipped to the image), or None when the viewer shows 3D, shows other axes than the layer's
    (Y, X), or has no canvas size yet."""
    h, w = viewer.canvas.size
    if viewer.dims.ndisplay != 2 or h <= 0 or w <= 0 or viewer.camera.zoom <= 0:
        return None
    cy, cx = viewer.camera.center[-2:]
    dy, dx = h / (2 * viewer.camera.zoom), w / (2 * viewer.camera.zoom)
    axes = list(range(layer.ndim))  # an RGB axis is not a layer dimension; a channel axis is
    if channel_axis is not None:
        del axes[channel_axis]
    ya, xa = axes[-2:]
    offset = viewer.dims.ndim - layer.ndim  # the layer's axes are the last of the world's
    if tuple(viewer.dims.displayed[-2:]) != (ya + offset, xa + offset):
        return None  # the screen shows other axes of it (e.g. X and the channels of a (Y, X, C) layer)
    corners = []
    for y, x in ((cy - dy, cx - dx), (cy + dy, cx + dx)):
        point = list(viewer.dims.point[-layer.ndim:])
        point[-2:] = [y, x]
        corners.append(np.asarray(layer.world_to_data(point), np.float64)[[ya, xa]])
    lo, hi = np.minimum(*corners), np.maximum(*corners)
    return float(lo[0]), float(lo[1]), float(hi[0]), float(hi[1])


def spatial_shape(layer, channel_axis: int | None) -> tuple[int, ...]:
    """Shape without the RGB/channel axis."""
    shape = list(layer_data(layer).shape)
    if layer.rgb:
        shape = shape[:-1]
    elif channel_axis is not None:
        del shape[channel_axis]
    return tuple(shape)
