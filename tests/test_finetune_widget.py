"""The Fine-tune panel, headless: examples from the sample's labels → Train → the Segment panel uses the
adapter; Cancel leaves the weights bit for bit; examples persist to a folder; adapters round-trip."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from napari_clipsam._sample_data import sample_2d, sample_3d
from napari_clipsam.engine.segmenter import Segmenter
from napari_clipsam.models.clipsam import ClipSam, tiny_config
from napari_clipsam.models.registry import load_model, model_status
from napari_clipsam.training.finetune import ADAPTER_ATTR, FineTuneConfig

pytestmark = pytest.mark.gui


def _add(viewer, layers):
    return [getattr(viewer, f"add_{kind}")(data, **kw) for data, kw, kind in layers]


def _wait(qtbot, widget, timeout=300_000):
    qtbot.waitUntil(lambda: not widget.jobs.busy, timeout=timeout)


def _model() -> ClipSam:
    """The demo model when built (what users fine-tune), else a tiny random one."""
    if model_status("demo") != "not built":
        return load_model("demo")
    torch.manual_seed(0)
    return ClipSam(tiny_config())


def _state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _panels(viewer, qtbot, model):
    from napari_clipsam.widgets._common import session_for
    from napari_clipsam.widgets.finetune_widget import FineTuneWidget
    from napari_clipsam.widgets.segment_widget import SegmentWidget

    seg_panel = SegmentWidget(viewer)
    ft_panel = FineTuneWidget(viewer)
    viewer.window.add_dock_widget(seg_panel, name="Segment (text + clicks)")
    viewer.window.add_dock_widget(ft_panel, name="Fine-tune")
    session_for(viewer).set_segmenter(Segmenter(model), "demo")
    _wait(qtbot, seg_panel)
    return seg_panel, ft_panel


def _quick(steps: int) -> FineTuneConfig:
    return FineTuneConfig(mode="both", steps=steps, lora_rank=4, augment_pool=2, val_every=2, patience=0,
                          val_max_instances=4)


def test_train_cancel_save_load(make_napari_viewer, qtbot, tmp_path):
    from qtpy.QtCore import QTimer

    viewer = make_napari_viewer(show=True)
    image, labels = _add(viewer, sample_2d())
    model = _model()
    seg_panel, panel = _panels(viewer, qtbot, model)
    base = _state(model)

    # an example: the sample's nuclei (the Labels layer names its classes: only nucleus ids are used)
    panel.image_combo.setCurrentText(image.name)
    panel.labels_combo.setCurrentText(labels.name)
    panel.text_edit.setText("nucleus")
    panel.folder_edit.setText(str(tmp_path / "examples"))
    ex = panel.add_example()
    nuclei = [i for i, c in labels.metadata["classes"].items() if c == "nucleus"]
    assert ex is not None and set(np.unique(ex.labels)) - {0} == set(nuclei)
    assert panel.example_list.count() == 1
    assert (tmp_path / "examples" / "examples.json").is_file()

    # Cancel: the model is unchanged, bit for bit
    from test_segment_widget import _errors

    started = []
    panel.jobs.started.connect(started.append)
    panel.steps_spin.setValue(500)
    panel.train()
    qtbot.waitUntil(lambda: panel.progress.value() >= 1, timeout=120_000)
    panel.train()  # again while it runs: refused, nothing queued behind it
    assert "already running" in _errors()[-1]
    panel.cancel()
    _wait(qtbot, panel)
    assert started.count("train") == 1
    assert panel.result is not None and panel.result.cancelled
    after = _state(model)
    assert after.keys() == base.keys() and all(torch.equal(after[k], base[k]) for k in base)
    assert getattr(model, ADAPTER_ATTR, None) is None

    # Train a few steps while a QTimer keeps ticking (the UI is live); live plot and progress
    ticks = []
    timer = QTimer()
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start(20)
    t0 = time.perf_counter()
    panel.train(_quick(4))
    _wait(qtbot, panel)
    timer.stop()
    seconds = time.perf_counter() - t0
    gaps = np.diff([t0, *ticks])
    # the event loop kept running all through training (a blocked UI would show one gap ≈ the run)
    assert len(ticks) >= seconds / 0.25 and gaps.max() < min(2.0, 0.5 * seconds), (len(ticks), seconds, gaps.max())
    result = panel.result
    assert result is not None and not result.cancelled and result.steps == 4
    assert panel.progress.value() == 4 and len(panel.plot.loss) >= 1 and len(panel.plot.val) >= 1
    info = getattr(model, ADAPTER_ATTR)
    assert info["texts"] == ["nucleus"]
    from test_segment_widget import screenshot

    screenshot(viewer, "finetune_panel", tmp_path)

    # the Segment panel uses the adapted model at once (same object, fresh embedding)
    assert seg_panel.session.segmenter.model is model
    assert "adapter" in seg_panel.model_info.text()
    seg_panel.ensure_prompt_layers()[0].add([[60, 60]])
    _wait(qtbot, seg_panel)
    fresh = Segmenter(model)
    fresh.set_image(image.data)
    mask, _ = fresh.predict(points=[[60, 60]], labels=[1])
    assert np.array_equal(seg_panel.preview, mask)

    # Save adapter… / Load adapter… round-trip (onto a fresh copy of the base)
    path = panel.save_adapter(tmp_path / "nuclei.safetensors")
    assert path is not None and path.is_file()
    trained = _state(model)
    from napari_clipsam.training.adapter_file import remove_adapter

    remove_adapter(model)
    panel.session.weights_changed()
    panel.load_adapter(path)
    _wait(qtbot, panel)
    assert panel.adapter_meta["texts"] == ["nucleus"]
    assert "texts: nucleus" in panel.meta_label.text() and "validation score" in panel.meta_label.text()
    reloaded = _state(model)
    assert reloaded.keys() == trained.keys() and all(torch.equal(reloaded[k], trained[k]) for k in trained)

    # the example folder resumes in a new panel
    from napari_clipsam.widgets.finetune_widget import FineTuneWidget

    other = FineTuneWidget(viewer)
    assert other.open_folder(tmp_path / "examples") == 1
    assert np.array_equal(other.examples[0].labels, ex.labels) and other.examples[0].text == "nucleus"
    other.remove_example(0)
    assert not any(p.suffix == ".tif" for p in (tmp_path / "examples").iterdir())
    other.deleteLater()


def test_volume_slice_example_and_errors(make_napari_viewer, qtbot, tmp_path):
    from napari.utils.notifications import NotificationSeverity, notification_manager

    viewer = make_napari_viewer()
    image, labels = _add(viewer, sample_3d())
    torch.manual_seed(0)
    _, panel = _panels(viewer, qtbot, ClipSam(tiny_config()))
    panel.image_combo.setCurrentText(image.name)
    panel.labels_combo.setCurrentText(labels.name)
    panel.text_edit.setText("nucleus")
    panel.folder_edit.setText(str(tmp_path / "examples"))
    nuc = [i for i, c in labels.metadata["classes"].items() if c == "nucleus"]
    z = int(np.flatnonzero(np.isin(labels.data, nuc).any((1, 2)))[0])
    viewer.dims.set_current_step(0, z)
    ex = panel.add_example()
    assert ex.z == z and ex.image.shape == image.data.shape[1:]
    from napari_clipsam.engine.volume import NormalizedVolume

    # the slice trains on what segmenting the volume feeds the model: the volume's intensity limits
    assert np.array_equal(ex.training_examples()[0].normalized(), NormalizedVolume(image.data)[z])
    panel.scope_combo.setCurrentIndex(1)
    ex3 = panel.add_example()
    assert ex3.z is None and ex3.labels.ndim == 3 and len(ex3.training_examples()) > 1

    # a slice without the class: a clear message, no example
    empty = [k for k in range(labels.data.shape[0]) if not np.isin(labels.data[k], nuc).any()]
    panel.scope_combo.setCurrentIndex(0)
    if empty:
        viewer.dims.set_current_step(0, empty[0])
        assert panel.add_example() is None
        errors = [n.message for n in notification_manager.records if n.severity == NotificationSeverity.ERROR]
        assert "labels are all zero" in errors[-1]
    assert len(panel.examples) == 2
    from napari_clipsam.widgets.finetune_widget import FineTuneWidget

    reopened = FineTuneWidget(viewer)  # the limits are saved with the slice
    assert reopened.open_folder(tmp_path / "examples") == 2
    assert np.array_equal(reopened.examples[0].limits, ex.limits) and reopened.examples[1].limits is None


def test_adapter_description_reads_old_and_new_validation_keys():
    """Adapters written before the score included the text mode's F1 stored it as "val_iou"."""
    from napari_clipsam.widgets.finetune_widget import FineTuneWidget

    for key in ("val_score", "val_iou"):
        meta = {"texts": ["nucleus"], "mode": "both",
                "summary": {"start_metrics": {key: 0.5}, "best_metrics": {key: 0.625}}}
        assert "validation score: 0.5 → 0.625" in FineTuneWidget._describe(meta)
    assert "validation" not in FineTuneWidget._describe({"texts": ["nucleus"], "mode": "text"})


def test_typed_examples_folder_keeps_the_examples_already_there(make_napari_viewer, tmp_path):
    """A folder typed (not opened) in a new session: adding an example keeps the earlier ones indexed."""
    import json

    from napari_clipsam.widgets.finetune_widget import INDEX, FineTuneWidget

    viewer = make_napari_viewer()
    _add(viewer, sample_2d())
    folder = tmp_path / "examples"

    def panel(text: str) -> FineTuneWidget:
        p = FineTuneWidget(viewer)
        p.folder_edit.setText(str(folder))
        p.text_edit.setText(text)
        return p

    def indexed() -> list[str]:
        return [e["text"] for e in json.loads((folder / INDEX).read_text())["examples"]]

    first = panel("nucleus")
    first.add_example()
    first.text_edit.setText("mitochondrion")
    first.add_example()
    second = panel("vesicle")  # a later session: the folder typed, Open not pressed
    second.add_example()
    assert indexed() == ["nucleus", "mitochondrion", "vesicle"]
    assert FineTuneWidget(viewer).open_folder(folder) == 3
    second.remove_example(0)  # removing its own example keeps the others
    assert indexed() == ["nucleus", "mitochondrion"]
    assert not (folder / "002_image.tif").exists()


def test_save_adapter_replaces_only_the_file_chosen(make_napari_viewer, qtbot, tmp_path):
    """A name typed without .safetensors gets the suffix added, never replacing another file silently."""
    from napari_clipsam.training import examples_from_arrays, finetune

    torch.manual_seed(0)
    model = ClipSam(tiny_config())
    (img, _, _), (lab, _, _) = sample_2d()
    finetune(model, examples_from_arrays(img, lab, "nucleus"),
             FineTuneConfig(steps=1, patience=0, autocast=False, lora_rank=2, augment_pool=1))
    viewer = make_napari_viewer()
    _, panel = _panels(viewer, qtbot, model)
    existing = tmp_path / "cells.safetensors"
    existing.write_bytes(b"a colleague's adapter")

    assert panel.save_adapter(tmp_path / "cells") is None  # what the dialog returns when "cells" is typed
    assert existing.read_bytes() == b"a colleague's adapter"
    out = panel.save_adapter(tmp_path / "cells.v2")
    assert out == tmp_path / "cells.v2.safetensors" and out.is_file()
    assert existing.read_bytes() == b"a colleague's adapter"
    assert panel.save_adapter(existing) == existing  # the file itself chosen (the dialog asked): replaced
    assert existing.read_bytes() != b"a colleague's adapter"


def test_train_and_load_adapter_act_on_the_model_loaded_before_them(make_napari_viewer, qtbot, tmp_path):
    """Train (or Load adapter) pressed while a model load is still queued works on the model that
    load brings, the one the Segment panel then uses, not on the one it replaces."""
    from napari_clipsam.training.finetune import ADAPTER_ATTR

    viewer = make_napari_viewer()
    image, labels = _add(viewer, sample_2d())
    old = _model()
    _, panel = _panels(viewer, qtbot, old)
    panel.image_combo.setCurrentText(image.name)
    panel.labels_combo.setCurrentText(labels.name)
    panel.text_edit.setText("nucleus")
    assert panel.add_example() is not None
    session = panel.session

    def queue_a_model_load() -> Segmenter:
        new = Segmenter(_model())
        session.jobs.submit("load", lambda report: new, lambda seg: session.set_segmenter(seg, "new"))
        return new

    new = queue_a_model_load()
    panel.train(_quick(2))
    _wait(qtbot, panel)
    assert session.segmenter is new and getattr(new.model, ADAPTER_ATTR, None) is not None
    assert getattr(old, ADAPTER_ATTR, None) is None
    adapter = panel.save_adapter(tmp_path / "a.safetensors")
    assert adapter is not None

    new = queue_a_model_load()
    panel.load_adapter(adapter)
    _wait(qtbot, panel)
    assert session.segmenter is new and getattr(new.model, ADAPTER_ATTR, None) is not None
    assert getattr(old, ADAPTER_ATTR, None) is None


def test_cancel_is_offered_while_a_training_waits_in_the_queue(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    image, labels = _add(viewer, sample_2d())
    torch.manual_seed(0)
    model = ClipSam(tiny_config())
    _, panel = _panels(viewer, qtbot, model)
    base = _state(model)
    panel.image_combo.setCurrentText(image.name)
    panel.labels_combo.setCurrentText(labels.name)
    panel.text_edit.setText("nucleus")
    assert panel.add_example() is not None
    panel.jobs.submit("busy", lambda report: time.sleep(1.0))  # the training waits behind this
    panel.train(_quick(2))
    assert panel.jobs.running == "busy" and panel.cancel_btn.isEnabled() and not panel.train_btn.isEnabled()
    panel.cancel()
    _wait(qtbot, panel)
    assert panel.result is not None and panel.result.cancelled
    after = _state(model)
    assert all(torch.equal(after[k], base[k]) for k in base)
    assert panel.train_btn.isEnabled() and not panel.cancel_btn.isEnabled()
