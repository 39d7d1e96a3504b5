"""The npe2 labels writer: what it keeps, and what it never overwrites or leaves stale."""

import json

import numpy as np
import pytest
import tifffile

from napari_clipsam._writer import write_labels


def _labels():
    lab = np.zeros((32, 32), np.uint16)
    lab[2:10, 2:10] = 1
    lab[20:30, 20:30] = 2
    return lab


def test_resaving_without_classes_removes_the_old_class_sidecar(tmp_path):
    path = tmp_path / "cells.tif"
    written = write_labels(str(path), _labels(), {"scale": [1, 1], "metadata": {"classes": {1: "nucleus", 2: "vesicle"}}})
    assert written == [str(path), str(path) + ".classes.json"]
    assert json.loads((tmp_path / "cells.tif.classes.json").read_text())["classes"] == {"1": "nucleus", "2": "vesicle"}
    edited = np.zeros((32, 32), np.uint8)
    edited[5:25, 5:25] = 1  # id 1 is something else now, and there is no class map
    assert write_labels(str(path), edited, {"scale": [1, 1], "metadata": {}}) == [str(path)]
    assert not (tmp_path / "cells.tif.classes.json").exists()
    assert np.array_equal(tifffile.imread(path), edited)


def test_a_name_without_suffix_never_replaces_an_existing_tif(tmp_path):
    keep = _labels()
    tifffile.imwrite(tmp_path / "cells.tif", keep)
    with pytest.raises(FileExistsError, match="cells.tif exists"):
        write_labels(str(tmp_path / "cells"), np.ones((32, 32), np.uint8), {})
    assert np.array_equal(tifffile.imread(tmp_path / "cells.tif"), keep)
    assert write_labels(str(tmp_path / "other"), keep, {}) == [str(tmp_path / "other.tif")]


def test_label_dtypes(tmp_path):
    lab = _labels()
    out = write_labels(str(tmp_path / "f.tif"), lab.astype(np.float32), {})[0]
    assert tifffile.imread(out).dtype == np.uint8 and np.array_equal(tifffile.imread(out), lab)
    with pytest.raises(ValueError, match="non-integer values"):
        write_labels(str(tmp_path / "g.tif"), lab.astype(np.float32) + 0.5, {})
    with pytest.raises(ValueError, match="negative"):
        write_labels(str(tmp_path / "n.tif"), lab.astype(np.int32) - 1, {})
    assert tifffile.imread(write_labels(str(tmp_path / "b.tif"), lab > 0, {})[0]).max() == 1
    assert not (tmp_path / "g.tif").exists() and not (tmp_path / "n.tif").exists()


def test_pixel_size_is_written_per_axis_and_infinite_ids_are_refused(tmp_path):
    path = tmp_path / "aniso.tif"
    write_labels(str(path), _labels(), {"scale": [0.5, 0.25]})  # y 0.5, x 0.25 units per pixel
    with tifffile.TiffFile(path) as tif:
        tags = tif.pages[0].tags
        x, y = tags["XResolution"].value, tags["YResolution"].value
    assert x[0] / x[1] == pytest.approx(4.0) and y[0] / y[1] == pytest.approx(2.0)  # pixels per unit
    bad = _labels().astype(np.float32)
    bad[0, 0] = np.inf
    with pytest.raises(ValueError, match="non-integer values"):
        write_labels(str(tmp_path / "inf.tif"), bad, {})
