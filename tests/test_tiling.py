"""Tiles with a halo: coverage, routing, stitching; an object across a tile border gets one label."""

import numpy as np
import pytest
import torch
from engine_helpers import disk, iou

from napari_clipsam.engine.instances import Instances
from napari_clipsam.engine.segmenter import Segmenter
from napari_clipsam.engine.tiling import make_tiles, paste_cores, route, stitch
from napari_clipsam.models.clipsam import ClipSam, tiny_config


@pytest.mark.parametrize("shape", [(192, 192), (100, 250), (64, 65), (40, 30)])
def test_cores_partition_the_image_and_keep_a_halo(shape):
    tiles = make_tiles(shape, 64, 8)
    owner = np.zeros(shape, int)
    for t in tiles:
        y0, x0, y1, x1 = t.window
        assert y1 - y0 == min(64, shape[0]) and x1 - x0 == min(64, shape[1]) and y0 >= 0 and x0 >= 0
        cy0, cx0, cy1, cx1 = t.core
        owner[cy0:cy1, cx0:cx1] += 1
        # every inner core edge has >= halo pixels of context inside the window
        assert (cy0 == 0 or cy0 - y0 >= 8) and (cy1 == shape[0] or y1 - cy1 >= 8)
        assert (cx0 == 0 or cx0 - x0 >= 8) and (cx1 == shape[1] or x1 - cx1 >= 8)
    assert (owner == 1).all()
    parts = [np.full(t.shape, i, np.float32) for i, t in enumerate(tiles)]
    pasted = paste_cores(tiles, parts, shape)
    for i, t in enumerate(tiles):
        assert (pasted[t.core[0]:t.core[2], t.core[1]:t.core[3]] == i).all()
    with pytest.raises(ValueError, match="halo"):
        make_tiles(shape, 16, 8)


def test_route_picks_a_window_containing_the_prompt():
    tiles = make_tiles((192, 192), 64, 8)
    i = route(tiles, (90, 50, 100, 60))  # near a core border
    y0, x0, y1, x1 = tiles[i].window
    assert y0 <= 90 and y1 >= 100 and x0 <= 50 and x1 >= 60
    assert route(tiles, (0, 0, 100, 100)) is None  # larger than a tile


def test_stitch_merges_an_object_seen_by_two_tiles_and_keeps_neighbours_apart():
    shape = (64, 112)
    tiles = make_tiles(shape, 64, 8)  # two tiles: windows x [0, 64) and [48, 112), cores meet at x = 56
    assert [t.core[3] for t in tiles] == [56, 112]
    obj = disk(shape, 32, 56, 12)  # crosses the seam, wider than the overlap
    left_only = disk(shape, 10, 20, 6)
    touching = disk(shape, 50, 75, 6) & ~obj  # a different object next to it, seen by tile 1 only
    pieces = []
    for s, t in enumerate(tiles):
        y0, x0, y1, x1 = t.window
        view = np.zeros(shape, bool)
        view[y0:y1, x0:x1] = True
        masks = [m & view for m in (obj, left_only, touching) if (m & view).any()]
        pieces.append(Instances.from_dense(np.stack(masks), np.full(len(masks), 0.9), source=s))
    out = stitch(Instances.cat(pieces), tiles)
    dense = [out.dense(i, shape) for i in range(len(out))]
    assert len(out) == 3
    assert max(iou(d, obj) for d in dense) == 1.0  # one instance, the whole object
    assert max(iou(d, touching) for d in dense) == 1.0 and max(iou(d, left_only) for d in dense) == 1.0


def _tiled_segmenter():
    """A tiny model's segmenter on a 192² image in 16 tiles, nothing embedded yet; and the list
    its image encoder appends to on each run."""
    torch.manual_seed(0)
    model = ClipSam(tiny_config("pseudo"))
    calls = []
    model.sam.image_encoder.patch_embed.register_forward_hook(lambda *a: calls.append(1))
    seg = Segmenter(model)
    seg.set_image(np.random.default_rng(0).random((192, 192)), embed=False)
    assert len(seg.tiles) == 16 and not calls
    return seg, calls


def test_box_prompt_is_routed_to_one_tile():
    seg, calls = _tiled_segmenter()
    mask, _ = seg.predict(box=[86, 50, 106, 70])
    assert len(calls) == 1  # only the tile holding the box was embedded
    ys, xs = np.nonzero(mask)
    t = next(t for t in seg.tiles if t.window[1] <= 86 and t.window[3] >= 106 and t.window[0] <= 50 <= 70 <= t.window[2])
    assert ys.min() >= t.window[0] and xs.max() < t.window[3]
    mask, _ = seg.predict(box=[80, 50, 110, 70])  # in no tile's window: a window centred on it
    assert len(calls) == 2 and not mask[:, :30].any() and not mask[:, 160:].any()
    seg.predict(box=[0, 0, 150, 150])  # larger than a tile: the whole image at reduced resolution
    assert len(calls) == 3


def test_embed_tiles_embeds_the_region_first_nearest_its_centre():
    seg, calls = _tiled_segmenter()
    order = []
    features = seg._features
    seg._features = lambda view: order.append(seg._views.index(view)) or features(view)  # record, then embed
    region = (150, 150, 192, 192)  # the bottom-right corner on screen
    n = seg.embed_tiles(region)
    hit = [i for i, t in enumerate(seg.tiles) if t.window[2] > 150 and t.window[3] > 150]
    assert n == len(hit) == len(calls) and sorted(order) == hit
    assert order[0] == 15  # the tile whose centre is nearest the region's comes first
    assert seg.embed_tiles(region) == n and len(calls) == n  # cached: nothing recomputed
    assert seg.embed_tiles() == 16 and len(calls) == 16  # then the rest, each once
    with pytest.raises(ValueError, match="region"):
        seg.embed_tiles((10, 10, 5, 20))


@pytest.mark.slow
def test_objects_across_tile_borders_get_exactly_one_label():
    """Demo model on a 768² image (3× its input): 16 tiles; every nucleus straddling a core border
    that is found is one label (no second label on a quarter of it), and a box on one gives it."""
    from napari_clipsam.data.synthetic import make_image
    from napari_clipsam.models.registry import load_model, model_status

    if model_status("demo") == "not built":
        pytest.skip("demo model file not built")
    seg = Segmenter(load_model("demo"))
    sample = make_image(1_000_900, size=768, concepts=("nucleus",), counts={"nucleus": 45})
    seg.set_image(sample.image)
    assert len(seg.tiles) == 16
    borders_y = {t.core[0] for t in seg.tiles} - {0}
    borders_x = {t.core[1] for t in seg.tiles} - {0}
    gt = sample.instance_labels("nucleus")
    res = seg.segment_text("nucleus")
    straddling, found = [], 0
    for k in range(1, int(gt.max()) + 1):
        obj = gt == k
        ys, xs = np.nonzero(obj)
        if not any(ys.min() < b <= ys.max() for b in borders_y) and not any(xs.min() < b <= xs.max() for b in borders_x):
            continue
        straddling.append(obj)
        ids, counts = np.unique(res.labels[obj], return_counts=True)
        ids, counts = ids[ids > 0], counts[ids > 0]
        if not len(ids) or iou(res.labels == ids[np.argmax(counts)], obj) < 0.5:
            continue
        found += 1
        assert np.sort(counts)[::-1][1:2].sum() < 0.25 * obj.sum(), (k, ids, counts)  # one label, not pieces
    assert len(straddling) >= 8 and found >= 0.7 * len(straddling), (found, len(straddling))  # measured 10 of 12
    ys, xs = np.nonzero(straddling[0])
    # with its text: the demo learnt every prompt together with a text (a bare box is outside what it saw)
    mask, _ = seg.predict(box=[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], text="nucleus")
    assert iou(mask, straddling[0]) >= 0.5


def test_a_halo_near_half_the_tile_warns_how_often_the_image_is_embedded():
    import warnings

    with pytest.warns(UserWarning, match=r"cover the \(100, 5000\) image 384\.3 times over.*stride of 2 px"):
        tiles = make_tiles((100, 5000), 64, 31)
    assert len(tiles) == 46_911
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for halo in (8, 16):  # the default (tile // 8) and the largest halo the warning suggests
            for shape in ((100, 5000), (65, 65), (1000, 1000), (64, 5000)):
                make_tiles(shape, 64, halo)
