"""Volumes: propagation through z stops where the object ends; text-only 3D ids are consistent."""

import numpy as np
import pytest
import torch
from engine_helpers import ball_volume, blob_model, iou

from napari_clipsam.engine.segmenter import Segmenter
from napari_clipsam.engine.volume import NormalizedVolume, ZLinker, mask_prompts
from napari_clipsam.models.clipsam import ClipSam, tiny_config

BALLS = ((6, 32, 30, 12.0, 3.5), (3, 12, 52, 7.0, 2.5))  # ball 1: slices 3..9, ball 2: slices 1..5


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
    multi = np.random.default_rng(0).random((3, 16, 16, 2))
    res = seg.segment_volume(multi, text="x", channel_axis=3, min_score=0.0)
    assert res.labels.shape == (3, 16, 16) and res.labels.dtype == np.uint32
    point, box = mask_prompts(vol[1] > 0)
    assert point.tolist() == [[7, 7]] and box[0] <= 5 and box[2] >= 10


@pytest.mark.slow
def test_propagation_recovers_the_object_and_stops_where_it_ends():
    model = blob_model()
    calls = []
    hook = model.sam.image_encoder.patch_embed.register_forward_hook(lambda *a: calls.append(1))
    try:
        seg = Segmenter(model, progress=lambda *a: None)
        vol, labels = ball_volume(np.random.default_rng(3), balls=BALLS)
        res = seg.segment_volume(vol, z=6, points=[[30, 32]])
        present = [z for z in range(len(vol)) if (labels[z] == 1).any()]
        got = [z for z in range(len(vol)) if res.labels[z].any()]
        assert set(res.labels.ravel()) <= {0, 1}
        # Nothing beyond its ends; found in the slices where it exists (the two end caps, at 15 %
        # of the largest section, may be missed by this tiny model).
        assert set(got) <= set(present) and len(got) >= len(present) - 2, (got, present)
        assert got == list(range(got[0], got[-1] + 1))
        per_slice = [iou(res.labels[z] > 0, labels[z] == 1) for z in got]
        # The in-test model is small and trained here. After 375 steps its per-slice IoU moved with
        # floating-point summation order (means 0.44-0.66 across CPUs, threads and kernels; 500 /
        # 600 steps 0.57 / 0.48). After 800 (Intel Xeon with AMX): 1 thread 0.768 (min 0.70), 2
        # threads 0.775 (min 0.58), fp32 inference 0.735 (min 0.50). Random weights give ~0.
        assert min(per_slice) >= 0.35 and np.mean(per_slice) >= 0.55, per_slice
        assert np.isnan(res.slice_scores[[z for z in range(len(vol)) if z not in got]]).all()
        n = len(calls)
        seg.segment_volume(vol, z=6, points=[[30, 32]])  # slice embeddings are cached
        assert len(calls) == n
    finally:
        hook.remove()


def test_text_only_volume_has_consistent_ids_across_z():
    """With the demo model: a nucleus found in several slices keeps one id through them (across a
    slice where it was missed, too), and different nuclei get different ids."""
    from napari_clipsam.data.synthetic import make_volume
    from napari_clipsam.models.registry import load_model, model_status

    if model_status("demo") == "not built":
        pytest.skip("demo model file not built")
    sample = make_volume(1_000_123, shape=(10, 256, 256), concepts=("nucleus",), counts={"nucleus": (5, 8)})
    res = Segmenter(load_model("demo")).segment_volume(sample.image, text="nucleus")
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
