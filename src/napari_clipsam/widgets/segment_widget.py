"""The "Segment (text + clicks)" panel: a model, an image layer, a text, and clicks/boxes → labels.

Prompt convention: the panel creates a Points layer ("clipsam points") and a Shapes layer
("clipsam boxes") on demand. Clicking in the Points layer adds a *positive* point (green); with
"negative clicks" on (key ``Shift-N``) new points are *negative* (red). Draw a rectangle in the
Shapes layer for a box (the last box of the slice is used). Every change of the prompts updates
the preview mask ("clipsam preview") with the decoder only; the image embedding is computed once
per image / slice in a worker (napari progress bar; cached).

Keys (viewer-wide): ``Shift-C`` commit, ``Shift-X`` clear prompts, ``Shift-N`` toggle
positive/negative clicks, ``Shift-A`` segment all, ``Shift-P`` propagate through z.

All work on the model runs in the viewer's :class:`~._common.Session` job queue (thread workers);
behaviour lives in :mod:`napari_clipsam.engine`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtWidgets import (QCheckBox, QComboBox, QFileDialog, QFormLayout, QGroupBox, QHBoxLayout, QLabel, QLineEdit,
                            QMessageBox, QPushButton, QSpinBox, QVBoxLayout, QWidget)

from ._common import (LayerCombo, Report, alive, current_z, image_kind, is_lazy, layer_array, layer_data, session_for, show_error, show_info,
                      spatial_shape, visible_region)

if TYPE_CHECKING:
    import napari

    from ..engine.segmenter import Segmenter

log = logging.getLogger(__name__)

POINTS_NAME = "clipsam points"
BOXES_NAME = "clipsam boxes"
PREVIEW_NAME = "clipsam preview"
LOCAL_FILE = "local file…"
NEW_LAYER = "new labels layer"
POSITIVE, NEGATIVE = "lime", "red"
KEYS = {"commit": "Shift-C", "clear": "Shift-X", "toggle": "Shift-N", "segment_all": "Shift-A",
        "propagate": "Shift-P"}
MAX_RECENT = 10
#: "instances" choices of Segment all: (label, ``segment_text(seeds=...)``)
SEEDS = (("grid of clicks", "grid"), ("one per region (faster)", "regions"))


@dataclass(frozen=True)
class Source:
    """What the engine segments: an image layer, 2D or one slice ``z`` of a volume."""

    layer: Any
    kind: str  # "2d" | "volume"
    z: int | None
    channel_axis: int | None
    channels: tuple[int, ...] | None

    @property
    def image(self) -> tuple:
        """Identifies the whole image or volume (layer, its data, channels), read when called."""
        return (id(self.layer), id(self.layer.data), self.channel_axis, self.channels)

    @property
    def key(self) -> tuple:
        """Identifies what the engine segments: the image and the slice."""
        return (*self.image, self.z)


def _clip_models() -> list[str]:
    from ..models.registry import list_models

    return [e.name for e in list_models("clipsam")]


def _devices() -> list[str]:
    import torch

    out = ["auto", "cpu"]
    if torch.cuda.is_available():
        out.append("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        out.append("mps")
    return out


def _row(first: QWidget, *rest: QWidget) -> QHBoxLayout:
    """A row: ``first`` stretched, then ``rest``."""
    row = QHBoxLayout()
    row.addWidget(first, 1)
    for w in rest:
        row.addWidget(w)
    return row


class SegmentWidget(QWidget):
    """Segment by text and clicks/boxes, in 2D or slice-wise in 3D (see the module docstring)."""

    def __init__(self, napari_viewer: napari.Viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.session = session_for(napari_viewer)
        self.jobs = self.session.jobs
        self._embedded: tuple | None = None  # Source.key the segmenter holds
        self._watched = None  # the image layer whose data events we follow
        self._volumes: dict[tuple, Any] = {}  # NormalizedVolume per (layer, channels)
        self.preview: np.ndarray | None = None  # bool, spatial shape of the image (2D, or 3D with the object)
        self.preview_score: float | None = None
        self.propagated = False  # the preview is a 3D object from 'Propagate through z'
        self.negative = False
        self._build()
        self._bind_keys()
        self.session.model_changed.connect(self._on_model_changed)
        self.viewer.dims.events.current_step.connect(self._on_step)
        self._watch(self.image_combo.value())
        self._on_model_changed()

    # ------------------------------------------------------------------------------------------- UI
    def _build(self) -> None:
        lay = QVBoxLayout(self)
        box = QGroupBox("Model")
        form = QFormLayout(box)
        self.model_combo = QComboBox()
        self.model_combo.addItems(_clip_models() + [LOCAL_FILE])
        self.model_combo.currentTextChanged.connect(self._refresh_model_status)
        self.model_status = QLabel()
        form.addRow("model", _row(self.model_combo, self.model_status))
        self.path_edit = QLineEdit()
        self.path_edit.setPlaceholderText("ClipSam .safetensors file")
        form.addRow("file", self._file_row(self.path_edit, "ClipSam model (*.safetensors)"))
        self.adapter_edit = QLineEdit()
        self.adapter_edit.setPlaceholderText("optional adapter .safetensors")
        form.addRow("adapter", self._file_row(self.adapter_edit, "adapter (*.safetensors)"))
        self.device_combo = QComboBox()
        self.device_combo.addItems(_devices())
        form.addRow("device", self.device_combo)
        row = QHBoxLayout()
        self.download_btn = QPushButton("Download")
        self.download_btn.clicked.connect(self.download_model)
        self.load_btn = QPushButton("Load model")
        self.load_btn.clicked.connect(self.load_model)
        row.addWidget(self.download_btn)
        row.addWidget(self.load_btn)
        form.addRow(row)
        self.model_info = QLabel("no model loaded")
        self.model_info.setWordWrap(True)
        form.addRow(self.model_info)
        lay.addWidget(box)

        box = QGroupBox("Image and prompts")
        form = QFormLayout(box)
        self.image_combo = LayerCombo(self.viewer, "Image")
        self.image_combo.currentIndexChanged.connect(self._on_image_changed)
        form.addRow("image", self.image_combo)
        self.channel_spin = QSpinBox()
        self.channel_spin.setRange(-1, 4)
        self.channel_spin.setValue(-1)
        self.channel_spin.setSpecialValueText("none")
        self.channel_spin.setToolTip("axis of the channels of a multichannel layer (none for grayscale / RGB)")
        self.channels_edit = QLineEdit()
        self.channels_edit.setPlaceholderText("all (or e.g. 0,2)")
        self.channels_edit.setToolTip("channels to use (at most 3); empty: all channels merged")
        row = QHBoxLayout()
        row.addWidget(self.channel_spin)
        row.addWidget(self.channels_edit, 1)
        form.addRow("channel axis", row)
        self.channel_spin.valueChanged.connect(self._on_image_changed)
        self.channels_edit.editingFinished.connect(self._on_image_changed)
        self.text_combo = QComboBox()
        self.text_combo.setEditable(True)
        self.text_combo.setToolTip("a concept such as 'nucleus' (recent texts in the list)")
        self.text_combo.lineEdit().setPlaceholderText("text, e.g. nucleus")
        self.text_combo.lineEdit().returnPressed.connect(self._on_text_entered)
        self.text_combo.activated.connect(lambda _: self._on_text_entered())
        form.addRow("text", self.text_combo)
        self.mode_combo = QComboBox()
        self.mode_combo.addItems(["manual", "text-only"])
        self.mode_combo.setToolTip("manual: text + clicks/boxes; text-only: the text alone")
        self.mode_combo.currentTextChanged.connect(lambda _: self.update_preview())
        form.addRow("mode", self.mode_combo)
        self.seeds_combo = QComboBox()
        for label, seeds in SEEDS:
            self.seeds_combo.addItem(label, seeds)
        self.seeds_combo.setToolTip("how Segment all finds instances in the text's map: a grid of clicks "
                                    "(touching objects come out separately) or one prompt per region "
                                    "(faster; for decoders trained with mask prompts, such as SAM's)")
        form.addRow("instances", self.seeds_combo)
        self.negative_check = QCheckBox(f"negative clicks ({KEYS['toggle']})")
        self.negative_check.setToolTip("new points are negative (red) instead of positive (green); "
                                       f"{KEYS['toggle']} toggles")
        self.negative_check.toggled.connect(self._set_negative)
        self.prompts_btn = QPushButton("Prompt layers")
        self.prompts_btn.setToolTip("add the Points (clicks) and Shapes (boxes) layers")
        self.prompts_btn.clicked.connect(self.ensure_prompt_layers)
        row = QHBoxLayout()
        row.addWidget(self.negative_check)
        row.addWidget(self.prompts_btn)
        form.addRow(row)
        lay.addWidget(box)

        box = QGroupBox("Results")
        form = QFormLayout(box)
        self.target_combo = LayerCombo(self.viewer, "Labels", extra=(NEW_LAYER,),
                                       exclude=lambda lay: lay.name == PREVIEW_NAME)
        self.target_combo.setToolTip("Labels layer that Commit and Segment all write into")
        form.addRow("target", self.target_combo)
        grid = QHBoxLayout()
        self.commit_btn = QPushButton("Commit")
        self.commit_btn.setToolTip(f"write the preview into the target as a new id ({KEYS['commit']}); undo with "
                                   "the Labels layer's undo (Ctrl-Z)")
        self.commit_btn.clicked.connect(self.commit)
        self.clear_btn = QPushButton("Clear")
        self.clear_btn.setToolTip(f"remove the prompts and the preview ({KEYS['clear']})")
        self.clear_btn.clicked.connect(self.clear)
        grid.addWidget(self.commit_btn)
        grid.addWidget(self.clear_btn)
        form.addRow(grid)
        grid = QHBoxLayout()
        self.segment_all_btn = QPushButton("Segment all")
        self.segment_all_btn.setToolTip(f"all instances of the text (whole image or volume) ({KEYS['segment_all']})")
        self.segment_all_btn.clicked.connect(self.segment_all)
        self.propagate_btn = QPushButton("Propagate through z")
        self.propagate_btn.setToolTip(f"follow the prompted object up and down the volume ({KEYS['propagate']})")
        self.propagate_btn.clicked.connect(self.propagate)
        grid.addWidget(self.segment_all_btn)
        grid.addWidget(self.propagate_btn)
        form.addRow(grid)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        form.addRow(self.status)
        lay.addWidget(box)
        lay.addStretch(1)
        self.setToolTip(" · ".join(f"{k.replace('_', ' ')}: {v}" for k, v in KEYS.items()))
        self._refresh_model_status()

    def _bind_keys(self) -> None:
        actions = {"commit": self.commit, "clear": self.clear, "toggle": self.toggle_negative,
                   "segment_all": self.segment_all, "propagate": self.propagate}
        for name, key in KEYS.items():
            func = actions[name]
            self.viewer.bind_key(key, lambda viewer, f=func: f(), overwrite=True)

    def _file_row(self, edit: QLineEdit, filt: str) -> QHBoxLayout:
        """``edit`` + a "…" button choosing a file into it."""
        browse = QPushButton("…")

        def choose() -> None:
            path, _ = QFileDialog.getOpenFileName(self, "Choose a file", "", filt)
            if path:
                edit.setText(path)

        browse.clicked.connect(choose)
        return _row(edit, browse)

    # ------------------------------------------------------------------------------------------- model
    def _refresh_model_status(self, *_) -> None:
        name = self.model_combo.currentText()
        if name == LOCAL_FILE:
            self.model_status.setText("")
            self.download_btn.setEnabled(False)
            return
        from ..models.registry import model_status

        status = model_status(name)
        self.model_status.setText(status)
        self.download_btn.setEnabled(status == "not cached")

    def model_source(self) -> str:
        name = self.model_combo.currentText()
        if name == LOCAL_FILE:
            path = self.path_edit.text().strip()
            if not path:
                raise ValueError("choose a ClipSam .safetensors file (or a registered model)")
            return path
        return name

    def download_model(self) -> None:
        name = self.model_combo.currentText()
        if name == LOCAL_FILE:
            return
        from ..models.registry import download

        def job(report: Report):
            return download(name, progress=lambda done, total: report(done, total, "download"))

        self.jobs.submit("download", job, lambda _: self._refresh_model_status(), desc=f"downloading {name}")

    def load_model(self) -> None:
        """Load the chosen model (+ adapter) in a worker and share it with the Fine-tune panel."""
        try:
            source = self.model_source()
        except ValueError as err:
            show_error(str(err))
            return
        adapter = self.adapter_edit.text().strip() or None
        device = self.device_combo.currentText()
        device = None if device == "auto" else device

        def job(report: Report):
            from ..engine.segmenter import Segmenter
            from ..training.adapter_file import load_adapter

            report(0, 0, "loading")
            seg = Segmenter.from_pretrained(source, device=device)
            if adapter:
                load_adapter(adapter, seg.model)
                seg.model_changed()
            return seg

        self.jobs.submit("load", job, lambda seg: self.session.set_segmenter(seg, source),
                         desc=f"loading {source}")

    def _on_model_changed(self) -> None:
        if not alive(self):
            return
        self._embedded = None
        self.preview = None
        seg = self.session.segmenter
        if seg is None:
            self.model_info.setText("no model loaded")
        else:
            info = self.session.adapter_info()
            text = (f"{self.session.model_source or 'model'} · strategy {seg.model.config.strategy} · "
                    f"{seg.model.img_size}px · {seg.device}")
            if info:
                src = info.get("source", "fine-tuned in this session")
                text += f"\nadapter: {src} (texts: {', '.join(info.get('texts', [])) or '-'})"
            self.model_info.setText(text)
            self.prefetch()
        self._refresh_model_status()
        self._show_preview()
        self.update_preview()

    # ------------------------------------------------------------------------------------------- image
    def _channels(self) -> tuple[int | None, tuple[int, ...] | None]:
        axis = self.channel_spin.value()
        axis = None if axis < 0 else axis
        text = self.channels_edit.text().strip()
        if not text:
            return axis, None
        try:
            chans = tuple(int(c) for c in text.replace(" ", "").split(",") if c)
        except ValueError:
            raise ValueError(f"channels {text!r}: give channel numbers separated by commas, e.g. 0,2") from None
        return axis, chans

    def source(self) -> Source | None:
        """The image the engine works on now (None without an image layer). ValueError for bad layers."""
        layer = self.image_combo.value()
        if layer is None:
            return None
        axis, chans = self._channels()
        kind = image_kind(layer, axis)
        z = None
        if kind == "volume":
            z = current_z(self.viewer, layer, self._z_axis(layer, axis))
        return Source(layer, kind, z, axis, chans)

    @staticmethod
    def _z_axis(layer, axis: int | None) -> int:
        return 1 if axis is not None and axis % layer_data(layer).ndim == 0 else 0

    def _volume(self, src: Source):
        from ..engine.volume import NormalizedVolume

        key = src.image
        vol = self._volumes.get(key)
        if vol is None:
            # a lazy layer stays lazy (slices are read when used), also with channels first (C, Z, Y, X)
            vol = NormalizedVolume(layer_data(src.layer), src.channel_axis, src.channels)
            self._volumes = {key: vol}
        return vol

    def _ensure_image(self, seg: Segmenter, src: Source, report: Report | None = None, embed: bool = True,
                      region: tuple[float, float, float, float] | None = None) -> None:
        """Runs in a worker: give the segmenter the source's image; with ``embed`` compute the
        features of its tiles overlapping ``region`` (all when None; cached). Without, the
        engine embeds the tiles a prompt needs when it needs them."""
        key = src.key  # before reading the data: data replaced meanwhile must not pass for what was read
        if self._embedded != key or seg.image_shape is None:
            if src.kind == "volume":
                seg.set_normalized(self._volume(src)[src.z], embed=False)
            else:
                data = layer_array(src.layer)
                seg.set_image(data, channel_axis=src.channel_axis, channels=src.channels, embed=False)
            self._embedded = key
        if embed:
            seg.embed_tiles(region, progress=report)

    def _on_image_changed(self, *_) -> None:
        if not alive(self):
            return
        self._watch(self.image_combo.value())
        self._refit_prompt_layers()
        self.preview = None
        self._show_preview()
        self.prefetch()

    def _refit_prompt_layers(self) -> None:
        """Prompt layers follow the chosen image: made anew for an image of other dimensionality
        (2D clicks on a volume, or the reverse, mean nothing there), and moved to its scale and
        translate (so that a click lands on the pixel under it; earlier clicks keep their place
        on screen)."""
        layer = self.image_combo.value()
        prompts = [lay for lay in (self._layer(POINTS_NAME), self._layer(BOXES_NAME)) if lay is not None]
        if layer is None or not prompts:
            return
        try:
            axis = self._channels()[0]
            shape = spatial_shape(layer, axis)
        except (ValueError, IndexError):
            return
        if any(lay.ndim != len(shape) for lay in prompts):
            self.ensure_prompt_layers()
        tf = self._spatial_transform(layer, axis)
        new_s, new_t = np.asarray(tf["scale"], float), np.asarray(tf["translate"], float)
        for lay in (self._layer(POINTS_NAME), self._layer(BOXES_NAME)):
            if lay is None:  # the user removed one of them
                continue
            old_s, old_t = np.asarray(lay.scale, float), np.asarray(lay.translate, float)
            if np.allclose(old_s, new_s) and np.allclose(old_t, new_t):
                continue
            move = lambda d: (np.asarray(d, float) * old_s + old_t - new_t) / new_s  # noqa: E731 (same world place)
            data = move(lay.data) if lay.name == POINTS_NAME else [move(d) for d in lay.data]
            lay.scale, lay.translate = new_s, new_t
            lay.data = data

    def _watch(self, layer) -> None:
        """Follow the chosen image layer's data: replaced data is a new image (see :meth:`_on_image_data`)."""
        if layer is self._watched:
            return
        if self._watched is not None:
            self._watched.events.data.disconnect(self._on_image_data)
        self._watched = layer
        if layer is not None:
            layer.events.data.connect(self._on_image_data)

    def _on_image_data(self, event=None) -> None:
        """The chosen image's data was replaced: forget its embedding and volume, then embed the new
        data and recompute the preview from the prompts still there (a propagated object is dropped)."""
        if not alive(self):
            return
        self._embedded = None
        self._volumes = {}
        self._refit_prompt_layers()
        self.preview, self.propagated = None, False
        self._show_preview()
        self.prefetch()
        self.update_preview()

    def _on_step(self, event=None) -> None:
        if not alive(self):
            return
        try:
            src = self.source()
        except ValueError:
            return
        if src is not None and src.kind == "volume" and src.key != self._embedded:
            if self.preview is not None and not self.propagated:
                self.preview = None
                self._show_preview()
            self.prefetch()
            self.update_preview()

    def _current(self) -> tuple[Segmenter, Source] | tuple[None, None]:
        """(segmenter, source) when both are there; a bad layer shows an error and gives (None, None)."""
        seg = self.session.segmenter
        try:
            src = self.source()
        except ValueError as err:
            show_error(str(err))
            return None, None
        return (seg, src) if seg is not None and src is not None else (None, None)

    def prefetch(self) -> None:
        """Compute the embedding of the current image / slice in the background: on a large
        (tiled) image the tiles on screen first, then, as a separate job that prompts given
        meanwhile overtake, the others."""
        seg, src = self._current()
        if seg is None or src.key == self._embedded:
            return
        region = visible_region(self.viewer, src.layer, src.channel_axis)

        def rest(_):
            if region is not None and self._embedded == src.key:
                self.jobs.submit("embed", lambda report: self._ensure_image(seg, src, report), desc="embedding",
                                 coalesce=True)

        self.jobs.submit("embed", lambda report: self._ensure_image(seg, src, report, region=region), rest,
                         desc="embedding", coalesce=True)

    # ------------------------------------------------------------------------------------------- prompts
    def _layer(self, name: str):
        return self.viewer.layers[name] if name in self.viewer.layers else None

    def _spatial_transform(self, layer, axis: int | None) -> dict:
        scale, translate = list(layer.scale), list(layer.translate)
        if axis is not None:
            del scale[axis]
            del translate[axis]
        return {"scale": scale, "translate": translate}

    def ensure_prompt_layers(self) -> tuple[Any, Any] | None:
        """Create the Points and Shapes prompt layers for the current image (if missing)."""
        layer = self.image_combo.value()
        if layer is None:
            show_error("add an image layer first")
            return None
        axis, _ = self._channels()
        shape = spatial_shape(layer, axis)
        tf = self._spatial_transform(layer, axis)
        points, boxes = self._layer(POINTS_NAME), self._layer(BOXES_NAME)
        if boxes is None or boxes.ndim != len(shape):
            if boxes is not None:
                self.viewer.layers.remove(boxes)
            boxes = self.viewer.add_shapes(ndim=len(shape), name=BOXES_NAME, edge_color="yellow", face_color="transparent",
                                           edge_width=max(1.0, shape[-1] / 256), **tf)
            boxes.events.data.connect(self._on_prompts_changed)
            boxes.mode = "add_rectangle"
        if points is None or points.ndim != len(shape):
            if points is not None:
                self.viewer.layers.remove(points)
            points = self.viewer.add_points(ndim=len(shape), name=POINTS_NAME, size=max(4.0, shape[-1] / 64),
                                            features={"positive": np.zeros(0, bool)}, face_color=POSITIVE, **tf)
            points.feature_defaults = {"positive": not self.negative}
            points.events.data.connect(self._on_prompts_changed)
            points.mode = "add"
            self.viewer.layers.selection.active = points
        return points, boxes

    def toggle_negative(self) -> None:
        self.negative_check.setChecked(not self.negative_check.isChecked())

    def _set_negative(self, on: bool) -> None:
        self.negative = bool(on)
        points = self._layer(POINTS_NAME)
        if points is not None:
            points.feature_defaults = {"positive": not self.negative}

    def _recolor(self, points) -> None:
        pos = np.asarray(points.features["positive"], bool) if len(points.data) else np.zeros(0, bool)
        if len(pos):
            colors = np.where(pos[:, None], np.array([[0.0, 1.0, 0.0, 1.0]]), np.array([[1.0, 0.0, 0.0, 1.0]]))
            points.face_color = colors

    def _on_prompts_changed(self, event=None) -> None:
        if not alive(self):
            return
        action = str(getattr(event, "action", "")).lower()
        if action.endswith("ing"):  # adding/removing/changing: wait for the final event
            return
        points = self._layer(POINTS_NAME)
        if points is not None and event is not None and event.source is points:
            self._recolor(points)
        self.update_preview()

    def prompts(self, src: Source) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
        """(points (N, 2) as (x, y), labels (N,), box (x0, y0, x1, y1)) on the current image/slice."""
        pts = labels = box = None
        ndim = len(spatial_shape(src.layer, src.channel_axis))
        points = self._layer(POINTS_NAME)
        if points is not None and points.ndim != ndim:  # made for another image: not prompts for this one
            points = None
        if points is not None and len(points.data):
            data = np.asarray(points.data, np.float64)
            pos = np.asarray(points.features["positive"], bool)
            keep = np.ones(len(data), bool)
            if src.kind == "volume":
                keep = np.round(data[:, 0]) == src.z
            if keep.any():
                pts = data[keep][:, -2:][:, ::-1].astype(np.float32)  # (row, col) → (x, y)
                labels = pos[keep].astype(np.int64)
                h, w = spatial_shape(src.layer, src.channel_axis)[-2:]
                pts = np.clip(pts, 0, [w - 1, h - 1]).astype(np.float32)
        boxes = self._layer(BOXES_NAME)
        if boxes is not None and boxes.ndim != ndim:
            boxes = None
        if boxes is not None and len(boxes.data):
            for verts, kind in zip(boxes.data[::-1], boxes.shape_type[::-1]):
                verts = np.asarray(verts, np.float64)
                if src.kind == "volume" and not (np.round(verts[:, 0]) == src.z).all():
                    continue
                y0, x0 = verts[:, -2:].min(0)
                y1, x1 = verts[:, -2:].max(0)
                if x1 > x0 and y1 > y0:
                    box = np.array([x0, y0, x1, y1], np.float32)
                    break
        return pts, labels, box

    def text(self) -> str | None:
        t = self.text_combo.currentText().strip()
        return t or None

    def _remember_text(self, text: str | None) -> None:
        if not text:
            return
        i = self.text_combo.findText(text)
        self.text_combo.blockSignals(True)
        if i >= 0:
            self.text_combo.removeItem(i)
        self.text_combo.insertItem(0, text)
        while self.text_combo.count() > MAX_RECENT:
            self.text_combo.removeItem(self.text_combo.count() - 1)
        self.text_combo.setCurrentIndex(0)
        self.text_combo.blockSignals(False)

    def _on_text_entered(self) -> None:
        self._remember_text(self.text())
        self.update_preview()

    # ------------------------------------------------------------------------------------------- preview
    def update_preview(self) -> None:
        """Recompute the preview mask from the prompts (decoder only once the image is embedded)."""
        seg, src = self._current()
        if seg is None:
            return
        text = self.text()
        if self.mode_combo.currentText() == "text-only":
            pts = labels = box = None
            if text is None:
                return
        else:
            pts, labels, box = self.prompts(src)
            if pts is None and box is None:
                if self.preview is not None and not self.propagated:
                    self.preview = None
                    self._show_preview()
                return

        def job(report: Report):
            self._ensure_image(seg, src, report, embed=False)  # only the tiles the prompt needs
            return seg.predict(points=pts, labels=labels, box=box, text=text)

        asked = src.key  # now: the key reads the layer's data when called

        def done(res) -> None:
            if self._asked_now(asked, text, pts, labels, box):  # else a late answer to an older question
                self._set_preview(src, *res)

        self.jobs.submit("predict", job, done, coalesce=True)

    def _asked_now(self, asked: tuple, text, pts, labels, box) -> bool:
        """Whether the image (``asked``: its key when the preview was asked for: layer, data,
        slice, channels), the text and the prompts are still what a preview was computed for (its
        layer may have gone, its data been replaced, or the prompts moved since)."""
        try:
            now = self.source()
        except ValueError:
            return False
        if now is None or now.key != asked or self.text() != text:
            return False
        if self.mode_combo.currentText() == "text-only":
            return pts is None and box is None
        same = lambda a, b: (a is None and b is None) or (a is not None and b is not None and np.array_equal(a, b))  # noqa: E731
        return all(same(a, b) for a, b in zip(self.prompts(now), (pts, labels, box)))

    def _set_preview(self, src: Source, mask: np.ndarray, score: float) -> None:
        if src.kind == "volume":
            full = np.zeros(spatial_shape(src.layer, src.channel_axis), bool)
            full[src.z] = mask
            mask = full
        self.preview, self.preview_score = mask, float(score)
        self.propagated = False
        self._show_preview(src)
        self.status.setText(f"preview: {int(mask.sum())} px, score {score:.2f}")

    def _show_preview(self, src: Source | None = None) -> None:
        layer = self._layer(PREVIEW_NAME)
        if self.preview is None:
            if layer is not None:
                layer.data = np.zeros_like(layer.data)
            return
        data = self.preview.astype(np.uint8)
        if layer is None or layer.data.shape != data.shape:
            if layer is not None:
                self.viewer.layers.remove(layer)
            tf = self._spatial_transform(src.layer, src.channel_axis) if src is not None else {}
            layer = self.viewer.add_labels(data, name=PREVIEW_NAME, opacity=0.5, **tf)
            self._reselect_prompts()
        else:
            layer.data = data
            if src is not None:  # the image shown now may sit elsewhere than the one before
                tf = self._spatial_transform(src.layer, src.channel_axis)
                layer.scale, layer.translate = tf["scale"], tf["translate"]

    def _reselect_prompts(self) -> None:
        points = self._layer(POINTS_NAME)
        if points is not None:
            self.viewer.layers.selection.active = points

    # ------------------------------------------------------------------------------------------- results
    def _target(self, src: Source, create: bool = True):
        """The target Labels layer (a new one if 'new labels layer' is chosen and ``create``)."""
        shape = spatial_shape(src.layer, src.channel_axis)
        layer = self.target_combo.value()
        if layer is None:
            if not create:
                return None
            layer = self.viewer.add_labels(np.zeros(shape, np.uint32), name=f"{src.layer.name} annotations",
                                           **self._spatial_transform(src.layer, src.channel_axis))
            self.target_combo.set_value(layer)
            self._reselect_prompts()
        if tuple(layer.data.shape) != tuple(shape):
            raise ValueError(f"target layer {layer.name!r} has shape {tuple(layer.data.shape)}, the image "
                             f"{src.layer.name!r} has {tuple(shape)}: choose another target or 'new labels layer'")
        return layer

    def commit(self) -> int | None:
        """Write the preview into the target Labels layer as a new id (max + 1), only over background;
        goes through the layer's undo history. Returns the new id."""
        preview = self.preview  # kept: creating the target layer must not change what is committed
        try:
            src = self.source()
            if src is None or preview is None or not preview.any():
                show_info("nothing to commit: add prompts first")
                return None
            if preview.shape != spatial_shape(src.layer, src.channel_axis):
                raise ValueError("the preview belongs to another image: update it first")
            target = self._target(src)
        except ValueError as err:
            show_error(str(err))
            return None
        data = np.asarray(target.data)
        new_id = int(data.max()) + 1
        idx = np.nonzero(preview & (data == 0))
        if not len(idx[0]):
            show_info("the preview lies entirely on existing labels: nothing committed")
            return None
        if new_id > np.iinfo(target.data.dtype).max:
            show_error(f"target {target.name!r} ({target.data.dtype}) has no free id left")
            return None
        target.data_setitem(idx, new_id)
        text = self.text()
        if text:
            classes = dict(target.metadata.get("classes", {}))
            classes[new_id] = text
            target.metadata = {**target.metadata, "classes": classes}
        self.status.setText(f"committed id {new_id} ({len(idx[0])} px) into {target.name!r}")
        self.clear()
        return new_id

    def clear(self) -> None:
        """Remove all prompts and the preview."""
        for name in (POINTS_NAME, BOXES_NAME):
            layer = self._layer(name)
            if layer is not None and len(layer.data):
                if name == BOXES_NAME:
                    layer.data = []
                else:
                    layer.data = np.zeros((0, layer.ndim))
        self.preview = None
        self._show_preview()

    def confirm(self, message: str) -> bool:
        """Ask the user (a dialog; tests replace this method)."""
        answer = QMessageBox.question(self, "napari-clipsam", message, QMessageBox.Yes | QMessageBox.No,
                                      QMessageBox.No)
        return answer == QMessageBox.Yes

    def segment_all(self) -> None:
        """All instances of the text → a new Labels layer (or the chosen target, after confirmation)."""
        seg = self.session.segmenter
        text = self.text()
        try:
            if seg is None:
                raise ValueError("load a model first")
            src = self.source()
            if src is None:
                raise ValueError("add an image layer first")
            if not text:
                raise ValueError("type a text (e.g. 'nucleus') to segment all its instances")
        except (ValueError, RuntimeError) as err:
            show_error(str(err))
            return
        self._remember_text(text)
        seeds = self.seeds_combo.currentData()
        target = self.target_combo.value()
        key = ("segment_all", src.image, text, seeds, id(target))
        if self.jobs.has(key):
            show_info(f"Segment all '{text}' on {src.layer.name!r} is already running: its result comes as it is done")
            return
        if target is not None and not self.confirm(f"Add the '{text}' instances to layer {target.name!r}? "
                                                   "Existing labels are kept."):
            return

        asked = src.image  # now: the job runs later, maybe after the layer's data was replaced

        def job(report: Report):
            if src.image != asked:
                raise ValueError(f"the data of {src.layer.name!r} was replaced before this Segment all started: "
                                 "press Segment all again for the new data")
            data = layer_data(src.layer)
            if is_lazy(data) and target is None:
                # A dask/zarr layer is read slice by slice into a lazy zarr result.
                from ..batch.lazy import segment_lazy

                self._embedded = None
                res = segment_lazy(data, text, segmenter=seg, volume=src.kind == "volume",
                                   channel_axis=src.channel_axis, channels=src.channels, seeds=seeds,
                                   progress=report)
                return res.labels, sorted(res.scores)
            if src.kind == "volume":
                from ..engine.volume import link_text

                self._embedded = None
                labels = link_text(seg, self._volume(src), text, progress=report, seeds=seeds).labels
            else:
                self._ensure_image(seg, src, report)
                labels = seg.segment_text(text, seeds=seeds, progress=report).labels
            return labels, [int(i) for i in np.unique(labels) if i]

        self.jobs.submit("segment_all", job, lambda res: self._write_all(src, text, *res, target),
                         desc=f"segment all '{text}'", key=key)

    def _write_all(self, src: Source, text: str, labels, ids: list[int], target) -> None:
        n = len(ids)
        if target is None or target not in self.viewer.layers:
            data = labels if is_lazy(labels) else labels.astype(np.uint32)
            layer = self.viewer.add_labels(data, name=f"{text} ({src.layer.name})",
                                           metadata={"classes": {int(i): text for i in ids}},
                                           **self._spatial_transform(src.layer, src.channel_axis))
            self._reselect_prompts()
            self.status.setText(f"segment all '{text}': {n} instances → new layer {layer.name!r}")
            return
        data = np.asarray(target.data)
        if data.shape != labels.shape:
            show_error(f"target {target.name!r} has shape {data.shape}, the result {labels.shape}")
            return
        free = (labels > 0) & (data == 0)
        offset = int(data.max())
        idx = np.nonzero(free)
        if not len(idx[0]):
            self.status.setText(f"segment all '{text}': no instance on background of {target.name!r}: nothing added")
            return
        top = offset + int(labels[idx].max())
        if top > np.iinfo(target.data.dtype).max:
            message = (f"target {target.name!r} ({target.data.dtype}, ids up to {offset}) cannot hold the new ids "
                       f"(up to {top}): nothing was written. Choose '{NEW_LAYER}' as target, or convert the layer "
                       f"to a wider type (e.g. layer.data = layer.data.astype('uint32')) and run Segment all again")
            show_error(message)
            self.status.setText(message)
            return
        target.data_setitem(idx, (labels[idx].astype(np.int64) + offset).astype(target.data.dtype))
        classes = dict(target.metadata.get("classes", {}))
        classes.update({int(i) + offset: text for i in np.unique(labels[free])})
        target.metadata = {**target.metadata, "classes": classes}
        self.status.setText(f"segment all '{text}': {n} instances added to {target.name!r}")

    def propagate(self) -> None:
        """Follow the object prompted on the current slice through z; the 3D result becomes the preview."""
        seg = self.session.segmenter
        try:
            src = self.source()
            if seg is None or src is None:
                raise ValueError("load a model and choose an image layer first")
            if src.kind != "volume":
                raise ValueError(f"layer {src.layer.name!r} is 2D: propagation needs a (Z, Y, X) volume")
            pts, labels, box = self.prompts(src)
            if pts is None and box is None:
                raise ValueError(f"add a point or a box on the current slice (z = {src.z}) first")
        except ValueError as err:
            show_error(str(err))
            return
        text = self.text()

        def job(report: Report):
            from ..engine.volume import propagate

            self._embedded = None
            return propagate(seg, self._volume(src), src.z, points=pts, labels=labels, box=box, text=text,
                             progress=report)

        asked = src.image  # now (it reads the layer's data when called): a result for other data is dropped

        def done(res) -> None:
            try:
                now = self.source()
            except ValueError:
                now = None
            if now is None or now.image != asked:  # another image, or its data replaced (any slice is fine)
                self.status.setText("propagation finished for an image no longer shown: result dropped")
                return
            self.preview = res.labels > 0
            self.propagated = True
            self._show_preview(src)
            nz = int(np.isfinite(res.slice_scores).sum())
            self.status.setText(f"propagated over {nz} slices: Commit to keep it")

        self.jobs.submit("propagate", job, done, desc="propagate through z")
