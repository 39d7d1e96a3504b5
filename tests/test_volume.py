"""Volumes: propagation through z stops where the object ends; text-only 3D ids are consistent."""

import numpy as np
import pytest
import torch
from engine_helpers import iou

from napari_clipsam.data.synthetic import make_volume
from napari_clipsam.engine.segmenter import Segmenter
from napari_clipsam.engine.volume import NormalizedVolume, ZLinker, mask_prompts, propagate
from napari_clipsam.evaluation import interior_point
from napari_clipsam.models.clipsam import ClipSam, tiny_config


def test_volume_inputs_normalisation_and_errors():
    vol = np.zeros((4, 20, 20), np.uint16)
    vol[0] = 1000
    vol[1, 5:10, 5:10] = 1000
    nv = NormalizedVolume(vol)
    assert nv[0].shape == (20, 20, 3) and nv[0].max() == 1.0
    assert nv[2].max() == 0.0  # a dark slice stays dark: limits are the volume's, not the slice's
    torch.manual_seed(0)
    seg = Segmenter(ClipSam(tiny_config("pseudo")))
    for kw, msg in [(dict(volume=np.zeros((2, 3, 8, 8)), text="x"), "channel_axis"),
                    (dict(volume=np.zeros((8, 8)), text="x"), "volume"),
                    (dict(volume=np.zeros((0, 8, 8)), text="x"), "empty"),
                    (dict(volume=np.full((2, 8, 8), np.nan), text="x"), "NaN"),
                    (dict(volume=vol, points=[[3, 3]]), "give z"),
                    (dict(volume=vol, z=9, points=[[3, 3]]), "outside"),
                    (dict(volume=vol), "needs points")]:
        with pytest.raises(ValueError, match=msg):
            seg.segment_volume(**kw)
    padded = np.concatenate([np.full((1, 20, 20), np.nan), vol.astype(np.float32)])  # a NaN padding plane
    assert NormalizedVolume(padded)[0].max() == 0.0 and np.array_equal(NormalizedVolume(padded)[2], nv[1])
    res = seg.segment_volume(padded, text="x", min_score=0.0)
    assert res.labels.shape == padded.shape and not res.labels[0].any()
    multi = np.random.default_rng(0).random((3, 16, 16, 2))
    res = seg.segment_volume(multi, text="x", channel_axis=3, min_score=0.0)
    assert res.labels.shape == (3, 16, 16) and res.labels.dtype == np.uint32
    point, box = mask_prompts(vol[1] > 0)
    assert point.tolist() == [[7, 7]] and box[0] <= 5 and box[2] >= 10


@pytest.fixture(scope="module")
def demo():
    from napari_clipsam.models.registry import load_model, model_status

    if model_status("demo") == "not built":
        pytest.skip("demo model file not built")
    return load_model("demo")


@pytest.mark.parametrize("seed", [0, 2])
def test_propagation_recovers_the_object_and_stops_where_it_ends(demo, seed):
    """With the demo model: text + one click on a nucleus in its widest slice follows it up and
    down through z, and stops where it ends (and the slice embeddings are cached)."""
    sample = make_volume(seed, shape=(16, 256, 256), concepts=("nucleus",), counts={"nucleus": (3, 5)}, p_absent=0.0)
    gt = sample.labels
    k = max(np.unique(gt[gt > 0]), key=lambda i: np.count_nonzero(gt == i))  # the largest nucleus
    area = np.array([np.count_nonzero(gt[z] == k) for z in range(len(gt))])
    z0 = int(area.argmax())
    calls = []
    hook = demo.sam.image_encoder.blocks[0].register_forward_hook(lambda *a: calls.append(1))
    try:
        seg = Segmenter(demo, progress=lambda *a: None)
        res = seg.segment_volume(sample.image, z=z0, points=[interior_point(gt[z0] == k)], text="nucleus")
        got = [z for z in range(len(gt)) if res.labels[z].any()]
        present = np.flatnonzero(area)
        assert set(res.labels.ravel()) == {0, 1}
        assert got == list(range(got[0], got[-1] + 1))
        # It stops at the ends: the stack's axial blur spreads a nucleus' light into the slice
        # beyond its labelled end, which may be taken; nothing further (the ends are >= 2 slices
        # from the stack's edges in these volumes: seeds 0 and 2 are the first two where they are).
        assert present[0] - 1 <= got[0] and got[-1] <= present[-1] + 1, (got, present)
        assert present[0] >= 1 and present[-1] <= len(gt) - 3
        core = [z for z in present if area[z] >= 0.5 * area.max()]  # all but the end caps
        assert set(core) <= set(got), (core, got)
        per_slice = [iou(res.labels[z] > 0, gt[z] == k) for z in core]
        # measured (seeds 0 / 2; fp32, bf16 and without the fast path alike): mean 0.92 / 0.95, min
        # 0.84 / 0.93. The next volume with such margins (seed 7) has a fainter nucleus: mean 0.60
        # (seed 7)
        # has a fainter nucleus: mean 0.60. Random weights: ~0.
        assert min(per_slice) >= 0.6 and np.mean(per_slice) >= 0.75, per_slice
        assert np.isnan(res.slice_scores[[z for z in range(len(gt)) if z not in got]]).all()
        n = len(calls)
        assert len(got) <= n <= len(got) + 2  # one embedding per slice visited: those kept, and where it stopped
        seg.segment_volume(sample.image, z=z0, points=[interior_point(gt[z0] == k)], text="nucleus")
        assert len(calls) == n  # slice embeddings are cached
    finally:
        hook.remove()


def test_text_only_volume_has_consistent_ids_across_z(demo):
    """With the demo model: a nucleus found in several slices keeps one id through them (across a
    slice where it was missed, too), and different nuclei get different ids."""
    sample = make_volume(1_000_123, shape=(10, 256, 256), concepts=("nucleus",), counts={"nucleus": (5, 8)})
    res = Segmenter(demo).segment_volume(sample.image, text="nucleus")
    gt = sample.labels
    owner: dict[int, set[int]] = {}  # 3D id → the ground-truth nuclei it is the main id of
    kept = []  # per run of detections: the share of its slices with its main id
    for k in np.unique(gt[gt > 0]):
        slices = [z for z in range(len(gt)) if (gt[z] == k).sum() >= 100]
        per_slice = [int(np.bincount(res.labels[z][gt[z] == k]).argmax()) for z in slices]
        # runs of detections; the linker bridges one missed slice (max_gap=1), not more
        runs, cur, missed = [], [], 0
        for i in per_slice:
            if not i:
                missed += 1
                continue
            if missed > 1 and cur:
                runs.append(cur)
                cur = []
            cur.append(i)
            missed = 0
        runs += [cur] if cur else []
        for run in runs:
            if len(run) < 3:
                continue
            main = max(set(run), key=run.count)
            assert run.count(main) >= 0.5 * len(run), per_slice  # one id for most of it, not fragments
            kept.append(run.count(main) / len(run))
            owner.setdefault(main, set()).add(int(k))
    checked = len(kept)
    # measured 0.89: 3 of 5 nuclei keep one id in every slice, one changes id once (4 + 6 slices),
    # one has another id in its first slice (over 6 such volumes: 0.92; the demo before the stem skip 0.96)
    assert np.mean(kept) >= 0.85, kept
    assert checked >= 3, checked
    assert all(len(v) == 1 for v in owner.values()), owner  # different nuclei, different ids


def test_linker_keeps_an_id_across_a_missed_slice_only_up_to_max_gap():
    a = np.zeros((3, 20, 20), np.int32)
    a[:, 2:8, 2:8] = 1  # object A in every slice
    b = a.copy()
    b[:, 10:16, 10:16] = 2  # object B, missed in slice 1 (and 2, 3 below)
    scores = lambda lab: {int(i): 0.9 for i in np.unique(lab) if i}  # noqa: E731
    slices = [b[0], a[1], b[2]]
    for gap, expect_same in ((1, True), (0, False)):
        linker = ZLinker(max_gap=gap)
        ids = [linker.link(s, scores(s))[s] for s in slices]
        assert ids[0][3, 3] == ids[1][3, 3] == ids[2][3, 3]  # A keeps its id
        assert (ids[0][12, 12] == ids[2][12, 12]) == expect_same, gap
    linker = ZLinker(max_gap=1)  # missed in two slices: a new object
    ids = [linker.link(s, scores(s))[s] for s in (b[0], a[1], a[2], b[2])]
    assert ids[3][12, 12] not in (0, ids[0][12, 12])
    with pytest.raises(ValueError, match="max_gap"):
        ZLinker(max_gap=-1)


def test_interior_point_counts_the_image_border_as_outside():
    """A half-disc cut by the top border is clicked in its middle, not on the border row; the
    volume's mask prompts use the same point."""
    yy, xx = np.mgrid[:40, :40]
    half = yy**2 + (xx - 20) ** 2 <= 15**2
    x, y = interior_point(half)
    assert 5 <= y <= 9 and abs(x - 20) <= 3  # the border-free maximum is at depth ~7.5 (was (20, 0))
    assert mask_prompts(half)[0].tolist() == [[x, y]]
    for bad in (np.zeros((5, 5), bool), np.ones((2, 5, 5), bool)):
        with pytest.raises(ValueError, match="non-empty 2D mask"):
            interior_point(bad)


class _Recorder:
    """A lazy array (like zarr) that records what is read."""

    def __init__(self, data):
        self.data, self.reads = data, []
        self.shape, self.ndim, self.size, self.dtype = data.shape, data.ndim, data.size, data.dtype

    def __getitem__(self, key):
        self.reads.append(key)
        return self.data[key]


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_a_lazy_multichannel_volume_is_read_slice_by_slice_with_channels_anywhere(axis):
    rng = np.random.default_rng(1)
    last = (rng.random((5, 12, 14, 2)) * 1000).astype(np.uint16)  # (Z, Y, X, C)
    stored = np.moveaxis(last, -1, axis)
    lazy = _Recorder(stored)
    nv, ref = NormalizedVolume(lazy, channel_axis=axis), NormalizedVolume(last, channel_axis=-1)
    assert nv.shape == ref.shape == (5, 12, 14) and len(nv) == 5
    assert np.array_equal(nv.limits, ref.limits)
    lazy.reads.clear()
    assert all(np.array_equal(nv[z], ref[z]) for z in range(5))
    assert len(lazy.reads) == 5 and all(np.asarray(lazy[k]).shape in ((12, 14, 2), (2, 12, 14), (12, 2, 14))
                                        for k in lazy.reads[:5])  # one slice per read, never the whole volume
    with pytest.raises(ValueError, match="outside the volume's 4 axes"):
        NormalizedVolume(stored, channel_axis=5)


def test_volume_arguments_are_checked_and_progress_completes():
    vol = np.zeros((4, 20, 20), np.uint16)
    vol[:, 5:12, 5:12] = 1000
    torch.manual_seed(0)
    seg = Segmenter(ClipSam(tiny_config()))
    for kw, msg in [(dict(z=1.5), "slice index"), (dict(z="2"), "slice index"), (dict(z=True), "slice index"),
                    (dict(z=1, min_score=5.0), "min_score"), (dict(z=1, min_iou=-3), "min_iou"),
                    (dict(z=1, min_area=-1), "min_area")]:
        with pytest.raises(ValueError, match=msg):
            propagate(seg, vol, points=[[8, 8]], labels=[1], **kw)
    with pytest.raises(ValueError, match="drop z"):
        seg.segment_volume(vol, z=1, text="nucleus")
    calls = []
    propagate(seg, vol, np.int64(1), points=[[8, 8]], labels=[1], min_score=0.99, progress=lambda *a: calls.append(a))
    assert calls[-1][:2] == (4, 4)  # ends at the total even where the object stopped early
    with pytest.raises(ValueError, match="ids 1..K with a score"):
        ZLinker().link(np.array([[0, 1], [5, 5]]), {1: 0.9, 2: 0.8})
    with pytest.raises(ValueError, match="ids 1..K with a score"):
        ZLinker().link(np.array([[0, 1], [2, 2]]), {1: 0.9})
    with pytest.raises(ValueError, match="negative"):
        ZLinker().link(np.array([[0, -1], [1, 1]]), {1: 0.9})


def test_a_constant_slice_of_a_volume_is_blank_like_a_constant_image():
    vol = make_volume(4, shape=(3, 64, 64), concepts=("nucleus",), counts={"nucleus": 3}, p_absent=0.0).image
    vol = vol.astype(np.float32)
    vol[1] = np.percentile(vol, 60)  # flat grey with the volume's limits
    torch.manual_seed(0)
    seg = Segmenter(ClipSam(tiny_config()))
    res = seg.segment_volume(vol, text="nucleus", min_score=0.0, min_area=1)
    assert not res.labels[1].any() and res.slice_scores[1] == 0
    seg.set_image(vol[1])  # the same as a 2D image: normalised to zeros, nothing found
    assert not seg.segment_text("nucleus", min_score=0.0, min_area=1).labels.any()
