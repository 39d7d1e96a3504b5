"""Training examples: 2D/3D arrays, TIFF files, napari-like layers; validation errors name the example."""

import numpy as np
import pytest

from napari_clipsam.training.examples import (TrainingExample, examples_from_arrays, examples_from_files,
                                              examples_from_layers, validate_examples)


def _scene(h=48, w=64):
    img = np.zeros((h, w), np.uint16)
    lab = np.zeros((h, w), np.uint32)
    img[10:20, 10:20] = 1000
    lab[10:20, 10:20] = 1
    img[30:40, 40:50] = 900
    lab[30:40, 40:50] = 2
    return img, lab


def test_2d_and_several_classes():
    img, lab = _scene()
    dots = np.zeros_like(lab)
    dots[5, 5] = 1
    exs = examples_from_arrays(img, {"nucleus": lab, "vesicle": dots}, name="cells")
    assert [e.text for e in exs] == ["nucleus", "vesicle"]
    assert exs[0].num_instances == 2 and exs[0].group == exs[1].group and exs[0].group.startswith("cells#")
    assert examples_from_arrays(img, [lab, dots], ["a", "b"])[1].text == "b"
    validate_examples(exs)


def test_groups_follow_the_pixels_not_the_name(tmp_path):
    """Different images under one name (the default "image", or files named alike in two folders)
    are different images to the validation split; one image given once per class is one."""
    from napari_clipsam.training.finetune import split_examples
    import tifffile

    scenes = [_scene() for _ in range(5)]
    for k, (img, _) in enumerate(scenes):
        img[0, k] = 7  # five different images
    exs = [ex for img, lab in scenes for ex in examples_from_arrays(img, lab, "nucleus")]
    assert all(ex.name == "image" for ex in exs) and len({ex.group for ex in exs}) == 5
    _, val, info = split_examples(exs, 0.25, np.random.default_rng(0))
    assert info["kind"] == "examples" and len(val) == 1  # one whole image held out, not a strip of each
    for k, (img, lab) in enumerate(scenes):
        (tmp_path / f"s{k}").mkdir()
        tifffile.imwrite(tmp_path / f"s{k}" / "raw.tif", img)
        tifffile.imwrite(tmp_path / f"s{k}" / "labels.tif", lab)
    files = [ex for k in range(5) for ex in examples_from_files(tmp_path / f"s{k}" / "raw.tif",
                                                                 tmp_path / f"s{k}" / "labels.tif", "nucleus")]
    assert len({ex.group for ex in files}) == 5 and all(ex.name == "raw.tif" for ex in files)
    img, lab = scenes[0]
    two = examples_from_arrays(img, lab, "nucleus") + examples_from_arrays(img.copy(), (lab > 0).astype(np.uint8), "cell")
    assert two[0].group == two[1].group
    assert examples_from_arrays(img, lab, "nucleus", group="dish 1")[0].group == "dish 1"


def test_volume_slices_sampled_and_empty_down_weighted():
    img = np.random.default_rng(0).integers(0, 100, (20, 32, 32)).astype(np.uint16)
    lab = np.zeros((20, 32, 32), np.uint16)
    lab[2:12, 8:16, 8:16] = 1
    exs = examples_from_arrays(img, lab, "nucleus", name="vol", max_slices=4, max_empty_fraction=0.5)
    full = [e for e in exs if not e.allow_empty]
    empty = [e for e in exs if e.allow_empty]
    assert len(full) == 4 and len(empty) == 2
    assert all(e.weight == 1.0 for e in full) and all(e.weight == pytest.approx(0.2) for e in empty)
    assert all(not e.labels.any() for e in empty) and all(e.labels.any() for e in full)
    # slices are normalised as segment_volume normalises them: with the volume's limits
    from napari_clipsam.engine.volume import NormalizedVolume

    nv = NormalizedVolume(img)
    for e in exs:
        z = int(e.name.split("=")[1].rstrip("]"))
        assert np.array_equal(e.normalized(), nv[z])
    dim = img.astype(np.float32)
    dim[3] *= 0.25  # a dim slice: dim with the volume's limits, not stretched to its own
    nv = NormalizedVolume(dim)
    one = examples_from_arrays(dim[3], lab[3], "nucleus", limits=nv.limits)[0]  # a slice given as 2D
    assert np.array_equal(one.normalized(), nv[3]) and nv[3].max() < 0.5
    assert examples_from_arrays(dim[3], lab[3], "nucleus")[0].normalized().max() == 1.0
    assert full[0].name.startswith("vol[z=")
    validate_examples(exs)


def test_tiff_files_and_layers(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    img, lab = _scene()
    tifffile.imwrite(tmp_path / "img.tif", img)
    tifffile.imwrite(tmp_path / "lab.tif", lab)
    exs = examples_from_files(tmp_path / "img.tif", tmp_path / "lab.tif", "nucleus")
    assert exs[0].name == "img.tif" and np.array_equal(exs[0].labels, lab)
    with pytest.raises(FileNotFoundError):
        examples_from_files(tmp_path / "nope.tif", tmp_path / "lab.tif", "nucleus")

    class Layer:  # the attributes examples_from_layers reads from napari layers
        def __init__(self, data, name):
            self.data, self.name = data, name

    exs = examples_from_layers(Layer(img, "raw"), Layer(lab, "nucleus"))
    assert exs[0].text == "nucleus" and exs[0].name == "raw"
    exs = examples_from_layers(Layer(img, "raw"), {"cell": Layer(lab, "x")})
    assert exs[0].text == "cell"


@pytest.mark.parametrize("case, match", [
    ("zeros", "all zero"),
    ("shape", "does not match"),
    ("float", "float labels"),
    ("text", "text"),
])
def test_bad_examples_name_the_example(case, match):
    img, lab = _scene()
    good = TrainingExample(img, lab, "nucleus", name="good")
    bad = {
        "zeros": TrainingExample(img, np.zeros_like(lab), "nucleus", name="empty-one"),
        "shape": TrainingExample(img, lab[:40], "nucleus", name="cropped-one"),
        "float": TrainingExample(img, lab.astype(np.float32), "nucleus", name="float-one"),
        "text": TrainingExample(img, lab, "  ", name="no-text"),
    }[case]
    with pytest.raises(ValueError, match=match) as err:
        validate_examples([good, bad])
    assert "example 1" in str(err.value) and bad.name in str(err.value)
    # the builders name the image and the class
    if case in ("zeros", "float"):
        with pytest.raises(ValueError, match=r"'scan7'.*nucleus|nucleus.*'scan7'"):
            examples_from_arrays(img, bad.labels, "nucleus", name="scan7")


def test_examples_arguments_and_images_the_model_cannot_read_are_refused():
    img, lab = _scene()
    vol, vlab = np.stack([img] * 3), np.stack([lab] * 3)
    for kw, match in [(dict(max_slices=0), "max_slices"), (dict(max_slices=-1), "max_slices"),
                      (dict(max_empty_fraction=-1), "max_empty_fraction"),
                      (dict(empty_slice_weight=float("nan")), "empty_slice_weight")]:
        with pytest.raises(ValueError, match=match):
            examples_from_arrays(vol, vlab, "nucleus", **kw)
    with pytest.raises(ValueError, match="empty dict"):
        examples_from_arrays(img, {})
    for image, kw, match in [(img.astype(np.complex64), {}, "real number"),
                             (np.full(img.shape, np.nan, np.float32), {}, "all NaN"),
                             (img, dict(channel_axis=0), "channel_axis=0"),
                             (np.stack([img, img], -1), dict(channel_axis=3), "channel_axis=3")]:
        with pytest.raises(ValueError, match=match):
            examples_from_arrays(image, lab, "nucleus", name="odd", **kw)

    class Layer:
        def __init__(self, data, name):
            self.data, self.name = data, name

    layers = [Layer(lab, "a"), Layer(lab, "b"), Layer(lab, "c")]
    with pytest.raises(ValueError, match="3 label sets need as many texts"):  # not split into 'c', 'a', 't'
        examples_from_layers(Layer(img, "raw"), layers, "cat")
    assert [e.text for e in examples_from_layers(Layer(img, "raw"), layers[:1], "cat")] == ["cat"]
