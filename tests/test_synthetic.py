"""Procedural microscopy data: determinism, label consistency, class statistics, domain shift, errors."""


import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage.measure import regionprops

from napari_clipsam.data import (
    CONCEPTS,
    SIZE_RANGES,
    SYNONYMS,
    SyntheticSample,
    make_dataset,
    make_image,
    make_volume,
)


@pytest.fixture(scope="module")
def images():
    return make_dataset(range(24))


@pytest.fixture(scope="module")
def volumes():
    return make_dataset(range(4), volume=True)


def _same(a: SyntheticSample, b: SyntheticSample) -> bool:
    return np.array_equal(a.image, b.image) and np.array_equal(a.labels, b.labels) and a.classes == b.classes


def test_deterministic_given_seed():
    assert _same(make_image(3), make_image(3))
    assert _same(make_image(3, domain_shift=0.7), make_image(3, domain_shift=0.7))
    assert _same(make_volume(2, (8, 64, 64)), make_volume(2, (8, 64, 64)))
    assert not np.array_equal(make_image(3).image, make_image(4).image)


def test_dtypes_shapes_and_label_consistency(images, volumes):
    for s in images[:6] + [make_image(1, (96, 160))]:
        assert s.image.dtype == np.uint16 and s.labels.dtype == np.uint32
        assert s.image.shape == s.labels.shape and s.image.ndim == 2
        ids = set(np.unique(s.labels).tolist()) - {0}
        assert ids == set(s.classes) == set(range(1, len(s.classes) + 1))
        assert set(s.classes.values()) <= set(CONCEPTS)
    assert images[-1].image.shape == (256, 256)
    assert make_image(1, (96, 160)).image.shape == (96, 160)
    v = volumes[0]
    assert v.image.shape == v.labels.shape == (16, 128, 128)
    assert v.image.dtype == np.uint16 and v.labels.dtype == np.uint32
    assert set(np.unique(v.labels).tolist()) - {0} == set(v.classes)


def test_each_instance_is_one_visible_piece(images, volumes):
    for s in images + volumes:
        for i, win in enumerate(ndi.find_objects(s.labels), start=1):
            assert win is not None
            assert ndi.label(s.labels[win] == i)[1] == 1, (s.info["seed"], i, s.classes[i])


def test_semantic_mask_and_instance_labels(images):
    s = next(x for x in images if len(x.concepts_present) == 3)
    union = np.zeros(s.labels.shape, bool)
    for c in CONCEPTS:
        m = s.semantic_mask(c)
        assert m.dtype == bool and m.shape == s.labels.shape
        assert not (m & union).any()
        union |= m
        inst = s.instance_labels(c)
        assert inst.dtype == np.uint32
        n = len(s.ids_of(c))
        assert set(np.unique(inst).tolist()) == set(range(n + 1))
        np.testing.assert_array_equal(inst > 0, m)
    np.testing.assert_array_equal(union, s.labels > 0)
    absent = make_image(0, counts={"nucleus": 0})
    assert not absent.semantic_mask("nucleus").any() and not absent.instance_labels("nucleus").any()
    with pytest.raises(ValueError, match="cytoplasm"):
        s.semantic_mask("cytoplasm")


def test_classes_present_and_absent(images):
    present = [set(s.concepts_present) for s in images]
    assert all(p for p in present), "every image keeps at least one concept by default"
    for c in CONCEPTS:  # each concept is sometimes present and sometimes absent (p_absent=0.2, 24 images)
        assert any(c in p for p in present) and any(c not in p for p in present), c
    only = make_image(5, concepts=("vesicle",))
    assert only.concepts_present == ("vesicle",)
    full = make_dataset(range(6), p_absent=0.0)
    assert all(s.concepts_present == CONCEPTS for s in full)
    fixed = make_image(5, counts={"nucleus": 3, "mitochondrion": 0, "vesicle": (4, 6)})
    assert 1 <= len(fixed.ids_of("nucleus")) <= 3
    assert fixed.ids_of("mitochondrion") == []
    assert 1 <= len(fixed.ids_of("vesicle")) <= 6
    assert make_image(5, p_absent=1.0).classes == {}


def _size_stats(samples, shift=0.0):
    """Per-concept shape measurements of instances not cut by the image border."""
    out = {c: [] for c in CONCEPTS}
    for s in samples:
        h, w = s.labels.shape
        for rp in regionprops(s.labels):
            r0, c0, r1, c1 = rp.bbox
            if r0 == 0 or c0 == 0 or r1 == h or c1 == w:
                continue
            c = s.classes[rp.label]
            if c == "mitochondrion":
                thick = 2 * ndi.distance_transform_edt(np.pad(rp.image, 1)).max() - 1  # pixels across
                out[c].append((thick, rp.feret_diameter_max))
            else:
                out[c].append(np.sqrt(rp.area / np.pi))
    return {c: np.asarray(v) for c, v in out.items()}


def test_concept_sizes_within_documented_ranges(images):
    st = _size_stats(images)
    lo, hi = SIZE_RANGES["nucleus"]["radius"]
    assert len(st["nucleus"]) >= 20
    assert lo - 1.5 <= st["nucleus"].min() and st["nucleus"].max() <= hi + 1
    lo, hi = SIZE_RANGES["vesicle"]["radius"]
    assert len(st["vesicle"]) >= 20
    assert lo - 0.5 <= st["vesicle"].min() and st["vesicle"].max() <= hi + 0.5
    m = st["mitochondrion"]
    assert len(m) >= 20
    wlo, whi = SIZE_RANGES["mitochondrion"]["width"]
    llo, lhi = SIZE_RANGES["mitochondrion"]["length"]
    assert wlo - 1.0 <= m[:, 0].min() and m[:, 0].max() <= whi + 0.5  # pixelised thickness (curved rods lose ~1 px)
    # Feret diameter = centreline chord + width (occlusion can only shorten)
    assert llo <= m[:, 1].min() and m[:, 1].max() <= lhi + whi + 1
    # sizes separate the classes: smallest nucleus > largest vesicle; rods are thin but long
    assert st["nucleus"].min() > st["vesicle"].max()
    assert np.median(m[:, 1]) > 2 * 2 * np.median(st["vesicle"])


def test_brightness_overlaps_between_classes(images):
    mean = {c: [] for c in CONCEPTS}
    for s in images:
        idx = np.arange(1, len(s.classes) + 1)
        vals = ndi.mean(s.image.astype(np.float64), s.labels, idx)
        for i, v in zip(idx.tolist(), vals):
            mean[s.classes[i]].append(v)
    med = {c: np.median(v) for c, v in mean.items()}
    for a in CONCEPTS:
        for b in CONCEPTS:
            if a != b:  # a good share of class a is brighter than the median of class b
                frac = np.mean(np.asarray(mean[a]) > med[b])
                assert 0.15 < frac < 0.85, (a, b, frac)


def test_domain_shift_changes_statistics():
    seeds = range(8)
    base = make_dataset(seeds, counts={"nucleus": 6, "mitochondrion": 10, "vesicle": 10})
    shifted = make_dataset(seeds, counts={"nucleus": 6, "mitochondrion": 10, "vesicle": 10}, domain_shift="strong")
    assert _same(make_image(1, domain_shift="strong"), make_image(1, domain_shift=1.0))

    def bg(ss):
        return np.median([np.median(s.image[s.labels == 0]) for s in ss])

    def nuc_contrast(ss):  # nucleus signal over background
        return np.median([np.mean(s.image[s.semantic_mask("nucleus")]) - np.median(s.image[s.labels == 0])
                          for s in ss])

    def nuc_radius(ss):
        return np.median(_size_stats(ss)["nucleus"])

    assert bg(shifted) > bg(base) + 20
    assert nuc_contrast(shifted) < 0.75 * nuc_contrast(base)
    assert nuc_radius(shifted) > 1.15 * nuc_radius(base)
    mild = make_dataset(seeds, counts={"nucleus": 6, "mitochondrion": 10, "vesicle": 10}, domain_shift=0.5)
    assert bg(base) < bg(mild) < bg(shifted)


def test_volume_labels_are_3d_objects(volumes):
    spans = {c: [] for c in CONCEPTS}
    for v in volumes:
        for i, win in enumerate(ndi.find_objects(v.labels), start=1):
            zs = np.flatnonzero((v.labels[win] == i).any(axis=(1, 2))) + win[0].start
            assert np.array_equal(zs, np.arange(zs[0], zs[-1] + 1)), "an object occupies contiguous slices"
            spans[v.classes[i]].append(len(zs))
    assert len(spans["nucleus"]) >= 3
    assert np.median(spans["nucleus"]) >= 4  # one id across several slices, not one id per slice
    assert min(spans["nucleus"]) >= 2
    assert np.median(spans["vesicle"]) >= 2
    assert len(spans["mitochondrion"]) >= 3 and np.median(spans["mitochondrion"]) >= 2
    # the volume is not a stack of independent 2D images: each slice's labels continue into the next
    v = volumes[0]
    z = v.image.shape[0] // 2
    shared = set(np.unique(v.labels[z]).tolist()) & set(np.unique(v.labels[z + 1]).tolist()) - {0}
    assert shared


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="'cytoplasm'"):
        make_image(0, concepts=("nucleus", "cytoplasm"))
    with pytest.raises(ValueError, match="'golgi'"):
        make_image(0, counts={"golgi": 3})
    with pytest.raises(ValueError, match="not in concepts"):
        make_image(0, concepts=("nucleus",), counts={"vesicle": 3})
    with pytest.raises(ValueError, match="counts"):
        make_image(0, counts={"nucleus": -1})
    for bad in (0, -5, 8, (256,), (256, 256, 3), (256.0, 256), "256"):
        with pytest.raises(ValueError, match="size"):
            make_image(0, size=bad)
    for bad in ((128, 128), (0, 64, 64), (8, 16, 64)):
        with pytest.raises(ValueError, match="shape"):
            make_volume(0, shape=bad)
    for bad in (-1, 1.5, "x"):
        with pytest.raises(ValueError, match="seed"):
            make_image(bad)
    for bad in (1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match="domain_shift"):
            make_image(0, domain_shift=bad)
    with pytest.raises(ValueError, match="'extreme'"):
        make_image(0, domain_shift="extreme")
    with pytest.raises(ValueError, match="p_absent"):
        make_image(0, p_absent=2.0)


def test_synonyms_cover_concepts():
    assert set(SYNONYMS) == set(CONCEPTS)
    for c, names in SYNONYMS.items():
        assert names[0] == c and len(set(names)) == len(names) >= 3


def test_sample_data_layers():
    from napari_clipsam._sample_data import sample_2d, sample_3d

    for fn, ndim in ((sample_2d, 2), (sample_3d, 3)):
        layers = fn()
        (img, img_kw, img_t), (lab, lab_kw, lab_t) = layers
        assert (img_t, lab_t) == ("image", "labels")
        assert img.ndim == lab.ndim == ndim and img.shape == lab.shape
        assert img.dtype == np.uint16 and lab.dtype == np.uint32
        assert img_kw["name"] and lab_kw["name"] and img_kw["name"] != lab_kw["name"]
        classes = lab_kw["metadata"]["classes"]
        assert set(classes.values()) == set(CONCEPTS)
        assert set(np.unique(lab).tolist()) - {0} == set(classes)
        assert np.array_equal(fn()[0][0], img)
