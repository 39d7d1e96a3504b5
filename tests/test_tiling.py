"""Tiles with a halo: coverage, routing, stitching; an object across a tile border gets one label."""

import numpy as np
import pytest
import torch
from engine_helpers import blob_model, disk, iou, render

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
def test_object_across_a_tile_border_gets_exactly_one_label():
    """An image 3x the model input; a blob straddling a core border between tiles (x = 96)."""
    seg = Segmenter(blob_model())
    shape = (192, 192)
    objs = [disk(shape, 60, 96, 12), disk(shape, 150, 40, 9), disk(shape, 140, 150, 10)]
    seg.set_image(render(objs, np.random.default_rng(5), shape))
    assert len(seg.tiles) == 16 and any(t.core[3] == 96 for t in seg.tiles)
    res = seg.segment_text("blob")
    assert len(res) == 3
    for obj in objs:
        ids = np.unique(res.labels[obj])
        ids = ids[ids > 0]
        assert len(ids) == 1, ids  # exactly one label on the object
        assert iou(res.labels == ids[0], obj) >= 0.5
    # Without merging, the straddling blob keeps only one tile's truncated piece.
    unmerged = seg.segment_text("blob", merge_iou=1.01)
    k = np.bincount(unmerged.labels[objs[0]]).argmax()
    assert iou(unmerged.labels == k, objs[0]) < iou(res.labels == np.bincount(res.labels[objs[0]]).argmax(), objs[0])
    ys, xs = np.nonzero(objs[0])
    mask, score = seg.predict(box=[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    assert iou(mask, objs[0]) >= 0.3 and not mask[:, :60].any() and not mask[:, 130:].any()
