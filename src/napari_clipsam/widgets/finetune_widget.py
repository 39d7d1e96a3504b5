"""The "Fine-tune" panel: corrected Labels layers → examples → LoRA/adapter training → the Segment panel uses it.

Examples are (image or one slice of a volume, the instance labels of one class, the class text).
With a folder chosen, every example is also written there (``NNN_image.tif``, ``NNN_labels.tif``
and ``examples.json``), so a later session resumes with "Open folder". Training runs in the
viewer's job queue (a worker: the UI stays live) with a progress bar and a live loss /
validation-IoU plot; Cancel restores the model exactly. On success the shared model carries the
adapter, so the Segment panel uses it at once; "Save adapter…" / "Load adapter…" handle
``.safetensors`` adapter files and show their metadata. Behaviour lives in :mod:`napari_clipsam.training`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from qtpy.QtCore import QPointF, Qt, Signal
from qtpy.QtGui import QColor, QPainter, QPen, QPolygonF
from qtpy.QtWidgets import (QComboBox, QDoubleSpinBox, QFileDialog, QFormLayout, QGroupBox, QHBoxLayout, QLabel,
                            QLineEdit, QListWidget, QProgressBar, QPushButton, QSpinBox, QVBoxLayout, QWidget)

from ._common import LayerCombo, alive, Report, current_z, layer_array, session_for, show_error, show_info

if TYPE_CHECKING:
    import napari

    from ..training.finetune import FineTuneResult

log = logging.getLogger(__name__)

INDEX = "examples.json"
SCOPES = ("current slice", "whole image / volume")


@dataclass
class Example:
    """One added example: a 2D image (or a volume with ``scope`` whole) + labels of one class.
    A slice of a volume keeps the volume's intensity ``limits`` (C, 2): it is normalised as
    segmenting the volume normalises it."""

    name: str
    text: str
    image: np.ndarray
    labels: np.ndarray
    z: int | None = None
    files: tuple[str, str] | None = None
    limits: np.ndarray | None = None

    def training_examples(self) -> list:
        from ..training.examples import examples_from_arrays

        return examples_from_arrays(self.image, self.labels, self.text, name=self.name, limits=self.limits)

    def describe(self) -> str:
        n = len(np.unique(self.labels[self.labels > 0]))
        where = f" z={self.z}" if self.z is not None else ""
        return f"{self.name}{where} · '{self.text}' · {n} objects · {'×'.join(map(str, self.labels.shape))}"


def class_labels(layer, text: str) -> np.ndarray:
    """The layer's labels restricted to ``text`` when its metadata names classes (``{"classes": {id: name}}``)
    and ``text`` is one of them; otherwise all labels."""
    data = layer_array(layer)
    classes = (layer.metadata or {}).get("classes") or {}
    ids = [int(i) for i, name in classes.items() if str(name) == text]
    if not ids:
        return np.asarray(data)
    return np.where(np.isin(data, ids), data, 0)


class LossPlot(QWidget):
    """A small live plot: training loss (blue, own scale) and validation score (orange, 0–1) per step."""

    def __init__(self):
        super().__init__()
        self.setMinimumHeight(110)
        self.loss: list[tuple[int, float]] = []
        self.val: list[tuple[int, float]] = []
        self.total = 1

    def reset(self, total: int) -> None:
        self.loss, self.val, self.total = [], [], max(1, total)
        self.update()

    def add(self, step: int, loss: float, val_score: float) -> None:
        if not math.isnan(loss):
            self.loss.append((step, loss))
        if not math.isnan(val_score) and (not self.val or self.val[-1] != (step, val_score)):
            self.val.append((step, val_score))
        self.update()

    def paintEvent(self, event) -> None:  # noqa: N802 (Qt)
        p = QPainter(self)
        w, h, m = self.width(), self.height(), 6
        p.fillRect(0, 0, w, h, QColor(38, 41, 48))
        p.setPen(QColor(160, 160, 160))
        p.drawText(m, 14, "loss")
        p.setPen(QColor(255, 165, 0))
        p.drawText(m + 40, 14, "val score")

        def curve(points, lo, hi, color):
            if not points:
                return
            span = (hi - lo) or 1.0
            poly = QPolygonF([QPointF(m + (w - 2 * m) * s / self.total, h - m - (h - 2 * m - 16) * (v - lo) / span)
                              for s, v in points])
            p.setPen(QPen(QColor(color), 1.5))
            p.drawPolyline(poly)

        if self.loss:
            vals = [v for _, v in self.loss]
            curve(self.loss, min(vals), max(vals), "#4da6ff")
        curve(self.val, 0.0, 1.0, "#ffa500")
        p.end()


class FineTuneWidget(QWidget):
    """Collect corrected labels as examples and fine-tune the shared model (see the module docstring)."""

    #: (step, loss or NaN, val score or NaN): emitted from the training thread, drawn in the UI thread
    trained_step = Signal(int, float, float)

    def __init__(self, napari_viewer: napari.Viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.session = session_for(napari_viewer)
        self.jobs = self.session.jobs
        self.examples: list[Example] = []
        self.result: FineTuneResult | None = None
        self.adapter_meta: dict | None = None
        self._cancel = threading.Event()
        self.jobs.cancel_hooks.append(self._cancel.set)
        self._build()
        self.trained_step.connect(self._on_step)
        self.session.model_changed.connect(self._refresh_buttons)
        self.jobs.started.connect(self._refresh_buttons)
        self.jobs.idle.connect(self._refresh_buttons)
        self._refresh_buttons()

    # ------------------------------------------------------------------------------------------- UI
    def _build(self) -> None:
        lay = QVBoxLayout(self)
        box = QGroupBox("Examples")
        form = QFormLayout(box)
        self.image_combo = LayerCombo(self.viewer, "Image")
        form.addRow("image", self.image_combo)
        self.labels_combo = LayerCombo(self.viewer, "Labels", exclude=lambda lay: lay.name.startswith("clipsam "))
        self.labels_combo.setToolTip("the corrected instance labels of the class")
        form.addRow("labels", self.labels_combo)
        self.text_edit = QLineEdit()
        self.text_edit.setPlaceholderText("class name, e.g. nucleus")
        self.text_edit.setToolTip("the text the class will answer to; when the Labels layer names classes "
                                  "(metadata 'classes'), only the ids of this class are used")
        form.addRow("text", self.text_edit)
        self.scope_combo = QComboBox()
        self.scope_combo.addItems(SCOPES)
        self.scope_combo.setToolTip("volumes: the slice shown, or slices sampled from the whole volume")
        form.addRow("use", self.scope_combo)
        row = QHBoxLayout()
        self.add_btn = QPushButton("Add example")
        self.add_btn.clicked.connect(self.add_example)
        self.remove_btn = QPushButton("Remove")
        self.remove_btn.clicked.connect(self.remove_selected)
        row.addWidget(self.add_btn)
        row.addWidget(self.remove_btn)
        form.addRow(row)
        self.example_list = QListWidget()
        self.example_list.setMaximumHeight(110)
        form.addRow(self.example_list)
        self.folder_edit = QLineEdit()
        self.folder_edit.setPlaceholderText("folder to keep examples (optional)")
        self.folder_edit.setToolTip("examples are saved there as TIFF + examples.json; open it again to resume")
        browse = QPushButton("…")
        browse.clicked.connect(self._browse_folder)
        self.open_btn = QPushButton("Open")
        self.open_btn.setToolTip("load the examples saved in this folder")
        self.open_btn.clicked.connect(lambda: self.open_folder())
        row = QHBoxLayout()
        row.addWidget(self.folder_edit, 1)
        row.addWidget(browse)
        row.addWidget(self.open_btn)
        form.addRow("folder", row)
        lay.addWidget(box)

        box = QGroupBox("Training")
        form = QFormLayout(box)
        self.mode_combo = QComboBox()
        self.mode_combo.addItems(["both", "manual", "text"])
        self.mode_combo.setToolTip("train the way you will segment: manual (text + clicks/boxes), text (text only), "
                                   "or both")
        form.addRow("mode", self.mode_combo)
        self.steps_spin = QSpinBox()
        self.steps_spin.setRange(1, 100_000)
        self.steps_spin.setValue(200)
        form.addRow("steps", self.steps_spin)
        self.rank_spin = QSpinBox()
        self.rank_spin.setRange(0, 64)
        self.rank_spin.setValue(8)
        self.rank_spin.setToolTip("LoRA rank in the image encoder (0: no LoRA)")
        form.addRow("LoRA rank", self.rank_spin)
        self.lr_spin = QDoubleSpinBox()
        self.lr_spin.setDecimals(6)
        self.lr_spin.setRange(1e-6, 1e-1)
        self.lr_spin.setSingleStep(1e-4)
        self.lr_spin.setValue(3e-4)
        form.addRow("learning rate", self.lr_spin)
        row = QHBoxLayout()
        self.train_btn = QPushButton("Train")
        self.train_btn.clicked.connect(self.train)
        self.cancel_btn = QPushButton("Cancel")
        self.cancel_btn.setToolTip("stop training; the model is left exactly as it was")
        self.cancel_btn.clicked.connect(self.cancel)
        row.addWidget(self.train_btn)
        row.addWidget(self.cancel_btn)
        form.addRow(row)
        self.progress = QProgressBar()
        form.addRow(self.progress)
        self.plot = LossPlot()
        form.addRow(self.plot)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        form.addRow(self.status)
        lay.addWidget(box)

        box = QGroupBox("Adapter")
        form = QFormLayout(box)
        row = QHBoxLayout()
        self.save_btn = QPushButton("Save adapter…")
        self.save_btn.clicked.connect(lambda: self.save_adapter())
        self.load_btn = QPushButton("Load adapter…")
        self.load_btn.clicked.connect(lambda: self.load_adapter())
        row.addWidget(self.save_btn)
        row.addWidget(self.load_btn)
        form.addRow(row)
        self.meta_label = QLabel("")
        self.meta_label.setWordWrap(True)
        self.meta_label.setTextInteractionFlags(Qt.TextSelectableByMouse)
        form.addRow(self.meta_label)
        lay.addWidget(box)
        lay.addStretch(1)

    def _refresh_buttons(self, *_) -> None:
        if not alive(self):
            return
        training = self.jobs.has("train")  # running or waiting behind another job: Cancel works on both
        have_model = self.session.segmenter is not None
        self.train_btn.setEnabled(have_model and not training)
        self.cancel_btn.setEnabled(training)
        self.save_btn.setEnabled(have_model and not training and self.session.adapter_info() is not None)
        self.load_btn.setEnabled(have_model and not training)

    def _browse_folder(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Folder for training examples")
        if path:
            self.folder_edit.setText(path)
            self.open_folder(path)

    # ------------------------------------------------------------------------------------------- examples
    def add_example(self) -> Example | None:
        """Add the chosen image (or its current slice) + the labels of the text's class as an example."""
        try:
            image, labels = self.image_combo.value(), self.labels_combo.value()
            if image is None or labels is None:
                raise ValueError("choose an image layer and a Labels layer with the corrected objects")
            text = self.text_edit.text().strip()
            if not text:
                raise ValueError("type the class name (the text the model should answer to)")
            img = layer_array(image)
            lab = class_labels(labels, text)
            spatial = img.shape[:-1] if image.rgb else img.shape
            if tuple(lab.shape) != tuple(spatial):
                raise ValueError(f"labels {labels.name!r} {lab.shape} do not match image {image.name!r} {spatial}")
            z, limits = None, None
            if lab.ndim == 3 and self.scope_combo.currentText() == SCOPES[0]:
                from ..engine.volume import volume_limits

                z = current_z(self.viewer, labels)
                limits = volume_limits(img)
                img, lab = img[z], lab[z]
            ex = Example(image.name, text, np.array(img), np.array(lab, np.uint32), z, limits=limits)
            ex.training_examples()  # validates (clear message for empty labels, bad shapes)
        except ValueError as err:
            show_error(str(err))
            return None
        self.examples.append(ex)
        self._persist_new(ex)
        self._refresh_list()
        return ex

    def remove_selected(self) -> None:
        row = self.example_list.currentRow()
        if 0 <= row < len(self.examples):
            self.remove_example(row)

    def remove_example(self, index: int) -> None:
        ex = self.examples.pop(index)
        folder = self.folder()
        if folder is not None and ex.files:
            try:
                for f in ex.files:
                    (folder / f).unlink(missing_ok=True)
                self._write_index(folder)
            except OSError as err:
                show_error(f"could not update the examples in {folder}: {err}")
        self._refresh_list()

    def _refresh_list(self) -> None:
        self.example_list.clear()
        self.example_list.addItems([ex.describe() for ex in self.examples])
        self.status.setText(f"{len(self.examples)} example(s)")

    # ------------------------------------------------------------------------------------------- persistence
    def folder(self) -> Path | None:
        text = self.folder_edit.text().strip()
        return Path(text).expanduser() if text else None

    def _write_index(self, folder: Path) -> None:
        """Write ``examples.json``: the entries already there whose files still exist (another session's,
        even if this panel never opened the folder), then this panel's examples."""
        entries = [{"name": ex.name, "text": ex.text, "z": ex.z, "image": ex.files[0], "labels": ex.files[1],
                    **({} if ex.limits is None else {"limits": np.asarray(ex.limits).tolist()})}
                   for ex in self.examples if ex.files]
        mine = {(e["image"], e["labels"]) for e in entries}
        kept = [e for e in self._read_index(folder)
                if (e.get("image"), e.get("labels")) not in mine
                and all(isinstance(e.get(k), str) and (folder / e[k]).is_file() for k in ("image", "labels"))]
        entries = kept + entries
        tmp = folder / f".{INDEX}.tmp"
        tmp.write_text(json.dumps({"format": "napari-clipsam/examples", "version": 1, "examples": entries}, indent=1))
        os.replace(tmp, folder / INDEX)

    @staticmethod
    def _read_index(folder: Path) -> list[dict]:
        """The entries of ``folder``'s ``examples.json`` ([] without one); OSError if it cannot be read
        (so that it is never overwritten by a shorter list)."""
        path = folder / INDEX
        if not path.is_file():
            return []
        try:
            entries = json.loads(path.read_text()).get("examples", [])
            if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
                raise ValueError("'examples' is not a list of entries")
        except (ValueError, AttributeError) as err:
            raise OSError(f"{path} is not a readable examples index ({err}): move it away or choose another "
                          "folder") from None
        return entries

    def _persist_new(self, ex: Example) -> None:
        folder = self.folder()
        if folder is None:
            return
        import tifffile

        try:
            folder.mkdir(parents=True, exist_ok=True)
            taken = {p.name for p in folder.iterdir()}
            i = 0
            while f"{i:03d}_image.tif" in taken or f"{i:03d}_labels.tif" in taken:
                i += 1
            files = (f"{i:03d}_image.tif", f"{i:03d}_labels.tif")
            for name, arr in zip(files, (ex.image, ex.labels)):
                tmp = folder / f".{name}.tmp"
                tifffile.imwrite(tmp, arr, compression="zlib")
                os.replace(tmp, folder / name)
            ex.files = files
            self._write_index(folder)
        except OSError as err:
            show_error(f"could not save the example to {folder}: {err}")

    def open_folder(self, path: str | os.PathLike | None = None) -> int:
        """Load the examples saved in the folder (``examples.json``); returns how many were added."""
        if path is not None:
            self.folder_edit.setText(str(path))
        folder = self.folder()
        if folder is None or not (folder / INDEX).is_file():
            return 0
        import tifffile

        try:
            index = json.loads((folder / INDEX).read_text())
            loaded = []
            for e in index.get("examples", []):
                files = (e["image"], e["labels"])
                if any(ex.files == files for ex in self.examples):
                    continue
                limits = None if e.get("limits") is None else np.asarray(e["limits"], np.float64)
                loaded.append(Example(e["name"], e["text"], tifffile.imread(folder / files[0]),
                                      tifffile.imread(folder / files[1]).astype(np.uint32), e.get("z"), files, limits))
        except (OSError, ValueError, KeyError) as err:
            show_error(f"could not read the examples in {folder}: {err}")
            return 0
        self.examples += loaded
        self._refresh_list()
        return len(loaded)

    # ------------------------------------------------------------------------------------------- training
    def config(self):
        from ..training.finetune import FineTuneConfig

        return FineTuneConfig(mode=self.mode_combo.currentText(), steps=self.steps_spin.value(),
                              lora_rank=self.rank_spin.value(), lr=float(self.lr_spin.value()))

    def train(self, config=None) -> None:
        """Fine-tune the shared model on the examples, in a worker (``config`` overrides the panel's settings)."""
        try:
            if self.jobs.has("train"):
                raise ValueError("a training is already running or waiting to start: wait for it or Cancel it")
            self.session.require_segmenter()  # a model to train (the job takes the one current then)
            if not self.examples:
                raise ValueError("add at least one example (image + corrected labels + text)")
            examples = [t for ex in self.examples for t in ex.training_examples()]
            config = config or self.config()
            config.check()
            self.mode_combo.setCurrentText(config.mode)
            self.steps_spin.setValue(config.steps)
            self.rank_spin.setValue(config.lora_rank)
            self.lr_spin.setValue(config.lr)
        except (ValueError, RuntimeError) as err:
            show_error(str(err))
            return
        from ..training.finetune import finetune

        self._cancel.clear()
        self.plot.reset(config.steps)
        self.progress.setRange(0, config.steps)
        self.progress.setValue(0)
        self.status.setText("training…")

        def job(report: Report):
            def callback(p) -> None:
                report(p.step, p.total, p.phase)
                self.trained_step.emit(p.step, float("nan") if p.loss is None else float(p.loss),
                                       float("nan") if p.val_score is None else float(p.val_score))

            # the model when the job runs: a "Load model" queued before it has replaced the one of now
            return finetune(self.session.require_segmenter().model, examples, config, callback=callback,
                            cancel=self._cancel)

        self.jobs.submit("train", job, self._trained, on_error=lambda err: self.status.setText(f"failed: {err}"),
                         desc="fine-tuning", key="train")
        self._refresh_buttons()

    def cancel(self) -> None:
        """Stop training at the next step; the model is restored exactly."""
        self._cancel.set()

    def _on_step(self, step: int, loss: float, val_score: float) -> None:
        self.progress.setValue(step)
        self.plot.add(step, loss, val_score)

    def _trained(self, result: FineTuneResult) -> None:
        self.result = result
        if result.cancelled:
            self.status.setText("cancelled: the model is unchanged")
            self.progress.setValue(0)
            return
        self.session.weights_changed()
        self.status.setText(f"done: {result.steps} steps in {result.seconds:.0f} s; validation score "
                            f"{result.start_val_score:.3f} → {result.best_val_score:.3f} (kept the weights of step "
                            f"{result.best_step}); the Segment panel now uses the adapter")
        self.meta_label.setText(self._describe(self.session.adapter_info() or {}))

    # ------------------------------------------------------------------------------------------- adapter files
    @staticmethod
    def _describe(meta: dict) -> str:
        summary = meta.get("summary") or (meta.get("training") or {}).get("summary") or {}
        # adapters written before the score included the text mode's F1 call it "val_iou"
        best, start = ((summary.get(part) or {}).get("val_score", (summary.get(part) or {}).get("val_iou"))
                       for part in ("best_metrics", "start_metrics"))
        lines = []
        base = meta.get("base")
        if isinstance(base, dict):
            lines.append(f"base: {base.get('name')} ({str(base.get('fingerprint', ''))[:12]}…)")
        lines.append(f"texts: {', '.join(meta.get('texts') or []) or '-'} · mode: {meta.get('mode')}")
        if meta.get("strategy"):
            lines.append(f"strategy: {meta['strategy']} · LoRA: {meta.get('lora') and meta['lora'].get('rank')}")
        if best is not None:
            lines.append(f"validation score: {start if start is None else round(start, 3)} → {best:.3f}")
        if meta.get("created"):
            lines.append(f"created: {meta['created']}")
        return "\n".join(lines)

    def save_adapter(self, path: str | os.PathLike | None = None) -> Path | None:
        """Write the model's adapter (``.safetensors`` + metadata); asks for a file without ``path``."""
        if path is None:
            path, _ = QFileDialog.getSaveFileName(self, "Save adapter", "adapter.safetensors",
                                                  "adapter (*.safetensors)")
            if not path:
                return None
        if self.jobs.busy:
            show_error("busy (training or segmenting): save the adapter when it has finished")
            return None
        from ..training.adapter_file import save_adapter

        try:
            seg = self.session.require_segmenter()
            chosen = Path(path)
            path = chosen if chosen.suffix == ".safetensors" else chosen.with_name(chosen.name + ".safetensors")
            if path != chosen and path.exists():  # the dialog asked about `chosen`, not about this file
                raise FileExistsError(f"{path} exists and was not chosen: pick {path.name} itself to replace it, "
                                      "or type another name")
            meta = {"examples": [ex.name for ex in self.examples], "source_model": self.session.model_source}
            out = save_adapter(path, seg.model, metadata=meta, overwrite=path == chosen)  # the dialog asked
        except (ValueError, RuntimeError, OSError) as err:
            show_error(str(err))
            return None
        show_info(f"adapter saved to {out}")
        return out

    def load_adapter(self, path: str | os.PathLike | None = None) -> None:
        """Apply an adapter file to the shared model (checked against the base) and show its metadata."""
        if path is None:
            path, _ = QFileDialog.getOpenFileName(self, "Load adapter", "", "adapter (*.safetensors)")
            if not path:
                return
        try:
            self.session.require_segmenter()
        except RuntimeError as err:
            show_error(str(err))
            return
        from ..training.adapter_file import load_adapter

        def done(meta: dict) -> None:
            self.adapter_meta = meta
            self.session.weights_changed()
            self.meta_label.setText(self._describe(meta))
            self.status.setText(f"adapter {Path(path).name} loaded: the Segment panel uses it")

        # the model when the job runs: a "Load model" queued before it has replaced the one of now
        self.jobs.submit("load_adapter", lambda report: load_adapter(path, self.session.require_segmenter().model),
                         done, desc=f"loading adapter {Path(path).name}")
