"""ClipSam on tiny configs: the three strategies, both modes, batching, identity at init, caching."""

import numpy as np
import pytest
import torch
from scipy import ndimage

from napari_clipsam.models.clipsam import ClipSam, Prompts, tiny_config
from napari_clipsam.models.conditioning import grid_seeds, pseudo_prompts
from napari_clipsam.models.conditioning.base import Context
from napari_clipsam.models.semantics import similarity_map

STRATEGIES = ["adapter", "ssp", "pseudo"]


def _model(strategy, **opts):
    torch.manual_seed(0)
    m = ClipSam(tiny_config(strategy, **opts))
    # Give zero-initialised outputs some weight so the conditioning is actually exercised.
    with torch.no_grad():
        for name, p in m.conditioning.named_parameters():
            if name.endswith(("fc2.weight", "refine.2.weight")):
                p.normal_(0, 0.2)
    return m


def _prompts_for(sample):
    """Prompts of different shapes per sample: 1 point, 2 points + box, text only."""
    i = torch.tensor([sample])
    if sample == 0:
        return Prompts(i, points=torch.tensor([[[20.0, 30.0]]]), labels=torch.tensor([[1]]))
    if sample == 1:
        return Prompts(i, points=torch.tensor([[[10.0, 12.0], [40.0, 44.0]]]), labels=torch.tensor([[1, 0]]),
                       boxes=torch.tensor([[5.0, 5.0, 50.0, 50.0]]))
    return Prompts(i)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_batch_equals_single_samples(strategy):
    m = _model(strategy)
    torch.manual_seed(1)
    images = torch.rand(3, 3, 64, 64)
    texts = ["nucleus", "mitochondrion", "vesicle"]
    with torch.no_grad():
        enc = m.encode(images, texts)
        masks, iou = m.decode(enc, [_prompts_for(i) for i in range(3)])
        assert masks.shape == (3, 1, 16, 16) and masks.dtype == torch.float32
        assert iou.shape == (3, 1)
        for i in range(3):
            alone = m.encode(images[i : i + 1], texts[i : i + 1])
            p = _prompts_for(i)
            p.image_index = torch.tensor([0])
            mi, ii = m.decode(alone, p)
            torch.testing.assert_close(masks[i : i + 1], mi, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(iou[i : i + 1], ii, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_many_prompts_per_image_not_squared(strategy):
    """B images with several prompts each give exactly N outputs, each from its own image."""
    m = _model(strategy)
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        enc = m.encode(images, ["nucleus", "vesicle"])
        idx = torch.tensor([0, 0, 1, 1, 1])
        pts = torch.rand(5, 1, 2) * 64
        masks, iou = m.decode(enc, Prompts(idx, points=pts, labels=torch.ones(5, 1)), multimask=True)
        assert masks.shape == (5, 3, 16, 16) and iou.shape == (5, 3)
        # Prompt 3 alone against image 1 gives the same mask.
        m3, _ = m.decode(enc, Prompts([1], points=pts[3:4], labels=torch.ones(1, 1)), multimask=True)
        torch.testing.assert_close(masks[3:4], m3, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_text_only_and_manual_modes(strategy):
    m = _model(strategy)
    img = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        enc = m.encode(img, ["nucleus"])
        text_only, _ = m.decode(enc, Prompts([0]))
        manual, _ = m.decode(enc, Prompts([0], points=torch.tensor([[[32.0, 32.0]]]), labels=torch.tensor([[1]])))
        sem = m.semantic_logits(enc)
    assert text_only.shape == manual.shape == sem.shape == (1, 1, 16, 16)
    assert not torch.allclose(text_only, manual)


def test_adapter_identity_at_init():
    """Zero-initialised adapters reproduce plain SAM's image encoder exactly, for any text."""
    torch.manual_seed(0)
    m = ClipSam(tiny_config("adapter"))
    img = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        x = (img * 255 - m.sam.pixel_mean) / m.sam.pixel_std
        ref = m.sam.image_encoder(x)
        for texts in (["nucleus", "vesicle"], ["anything at all", "x"]):
            emb = m.encode(img, texts).embeddings
            rel = (emb - ref).norm() / ref.norm()
            assert rel <= 1e-6


def _count_calls(module):
    calls = []
    module.register_forward_hook(lambda *a: calls.append(1))
    return calls


def test_ssp_new_text_does_not_rerun_image_encoder():
    m = _model("ssp")
    calls = _count_calls(m.sam.image_encoder.patch_embed)
    block_calls = _count_calls(m.sam.image_encoder.blocks[-1])
    img = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        feats = m.embed_image(img)
        a = m.condition(feats, ["nucleus"])
        b = m.condition(feats, ["vesicle"])
    assert len(calls) == 1 and len(block_calls) == 1
    assert torch.equal(a.embeddings, b.embeddings)
    assert not torch.allclose(a.prompt_tokens, b.prompt_tokens)


def _reference_adapted(m, img, text):
    """The adapter strategy's embedding computed block by block from the image, nothing cached."""
    enc = m.sam.image_encoder
    patches, feats = m.semantics.patch_features(img), m.text_features([text])
    ctx = Context(text=feats, patches=patches, similarity=similarity_map(patches, feats.embedding))
    state = m.conditioning.prepare(ctx, m.embed_size)
    x = m.patch_tokens(img)[0]
    for i, blk in enumerate(enc.blocks):
        x = blk(x)
        if i in m.conditioning.adapted_blocks:
            x = m.conditioning.adapt(i, x, state)
    return enc.neck(x.permute(0, 3, 1, 2))


@pytest.mark.parametrize("blocks", [1, 2, [0]], ids=["last-1", "last-2", "first"])
def test_adapter_new_text_reruns_only_blocks_after_the_first_adapted_one(blocks):
    """The first adapted block's input and output are text-independent (its adapter follows it):
    it runs once per image with the prefix; a new text re-runs its adapter and the later blocks
    only, and the embedding equals the block-by-block computation exactly."""
    m = _model("adapter", blocks=blocks)
    depth = len(m.sam.image_encoder.blocks)
    first = min(m.conditioning.adapted_blocks)
    calls = [_count_calls(b) for b in m.sam.image_encoder.blocks]
    img = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        feats = m.embed_image(img)
        a = m.condition(feats, ["nucleus"])
        b = m.condition(feats, ["vesicle"])
        ref_a, ref_b = _reference_adapted(m, img, "nucleus"), _reference_adapted(m, img, "vesicle")
    assert m.prefix_blocks == first + 1 and m.text_dependent_encoder
    assert [len(c) for c in calls] == [3 if i <= first else 4 for i in range(depth)]  # refs: 2 more each
    assert torch.equal(a.embeddings, ref_a) and torch.equal(b.embeddings, ref_b)
    assert not torch.equal(a.embeddings, b.embeddings)


def test_pseudo_prompts_three_blobs():
    yy, xx = np.mgrid[:64, :64]
    centres = [(12, 15), (40, 20), (30, 50)]
    prob = np.zeros((64, 64), np.float32)
    for cy, cx in centres:
        prob = np.maximum(prob, np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 4.0**2)))
    pp = pseudo_prompts(prob, threshold=0.5)
    assert len(pp) == 3 and pp.masks.shape == (3, 64, 64)
    got = sorted((int(y), int(x)) for x, y in pp.points)
    assert got == sorted(centres)
    for mask, (x, y) in zip(pp.masks, pp.points):
        assert mask[int(y), int(x)]
    assert not (pp.masks.sum(0) > 1).any()

    # The three regions decode in one batch to three masks.
    m = _model("pseudo")
    with torch.no_grad():
        enc = m.encode(torch.rand(1, 3, 64, 64), ["nucleus"])
        low = torch.nn.functional.interpolate(torch.from_numpy(pp.masks[:, None].astype(np.float32)), size=(16, 16))
        masks, iou = m.decode(enc, Prompts(torch.zeros(3), points=torch.from_numpy(pp.points)[:, None],
                                           labels=torch.ones(3, 1), masks=(low * 2 - 1) * 8))
    assert masks.shape == (3, 1, 16, 16)


def test_pseudo_prompts_splits_touching_blobs_and_rejects_bad_input():
    prob = np.zeros((40, 80), np.float32)
    prob[10:30, 5:25] = 1.0
    prob[10:30, 40:75] = 1.0  # a long region ~1.75x: not split
    prob[10:30, 25:40] = 0.0
    assert len(pseudo_prompts(prob)) == 2
    wide = np.zeros((70, 100), np.float32)
    wide[5:25, 5:25] = wide[5:25, 35:55] = wide[5:25, 65:85] = 1.0  # three typical objects
    wide[40:60, 5:65] = 1.0  # three touching ones: 3x the typical area → split into 3
    pp = pseudo_prompts(wide)
    assert len(pp) == 6
    split = [int(m.sum()) for m in pp.masks[pp.points[:, 1] > 40]]
    assert len(split) == 3 and all(abs(a - 400) <= 40 for a in split)
    below = pp.points[:, 1] > 40  # split parts keep their whole component; the others are their own
    assert all(int(a.sum()) == 1200 and (a >= m).all() for a, m in zip(pp.areas[below], pp.masks[below]))
    assert np.array_equal(pp.areas[~below], pp.masks[~below])
    assert len(pseudo_prompts(wide, max_regions=2)) == 2  # over all regions, not per region
    assert len(pseudo_prompts(wide, max_regions=4)) == 4
    with pytest.raises(ValueError, match="H, W"):
        pseudo_prompts(np.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match="neck_depth must be > 0"):
        pseudo_prompts(wide, neck_depth=0)
    with pytest.raises(ValueError, match="NaN"):
        pseudo_prompts(np.full((4, 4), np.nan))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_training_changes_only_strategy_and_text_matters(strategy):
    m = _model(strategy)
    m.freeze_base()
    m.train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    torch.manual_seed(0)
    img = torch.rand(2, 3, 64, 64)
    target = torch.zeros(2, 1, 16, 16)
    target[0, :, :8] = 1  # "nucleus" → top half, "vesicle" → bottom half
    target[1, :, 8:] = 1
    img = torch.cat([img[:1], img[:1]])
    for _ in range(100):
        masks, _ = m(img, ["nucleus", "vesicle"], Prompts([0, 1]))
        loss = torch.nn.functional.binary_cross_entropy_with_logits(masks, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    after = m.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("conditioning.") for k in changed), changed
    with torch.no_grad():
        enc = m.encode(img, ["nucleus", "vesicle"])
        masks, _ = m.decode(enc, Prompts([0, 1]))
    a, b = masks[0, 0] > 0, masks[1, 0] > 0
    assert (a != b).float().mean() > 0.3


def test_bad_inputs():
    m = _model("adapter")
    for bad in (torch.rand(1, 3, 32, 32), torch.rand(0, 3, 64, 64)):
        with pytest.raises(ValueError, match=r"\(B ≥ 1, 3, 64, 64\)"):
            m.encode(bad, ["x"])
    for bad in ((torch.rand(1, 3, 64, 64) * 255).to(torch.uint8), torch.rand(1, 3, 64, 64) * 255):
        with pytest.raises(ValueError, match=r"floats in \[0, 1\].*normalise them first"):
            m.encode(bad, ["x"])
    img = torch.rand(1, 3, 64, 64)
    with torch.no_grad():  # float64 input is fine (cast)
        assert torch.equal(m.encode(img.double(), ["x"]).embeddings, m.encode(img, ["x"]).embeddings)
    with pytest.raises(TypeError, match="single string"):  # not split into the texts 'a', 'b', 'c'
        m.encode(torch.rand(3, 3, 64, 64), "abc")
    with pytest.raises(TypeError, match="single string"):
        m.text_features("nucleus")
    with pytest.raises(ValueError, match="one text per image"):
        m.encode(torch.rand(2, 3, 64, 64), ["x"])
    with pytest.raises(ValueError, match="every image"):
        m.encode(torch.rand(2, 3, 64, 64), ["x", None])
    with pytest.raises(ValueError, match="non-empty"):
        m.encode(torch.rand(1, 3, 64, 64), [""])
    enc = m.encode(torch.rand(1, 3, 64, 64), ["x"])
    with pytest.raises(ValueError, match="out of range"):
        m.decode(enc, Prompts([3]))
    with pytest.raises(ValueError, match="points must be"):
        Prompts([0], points=torch.rand(2, 2), labels=torch.ones(2))
    with pytest.raises(ValueError, match="x1 >= x0"):
        Prompts([0], boxes=[[30.0, 5.0, 10.0, 20.0]])
    with pytest.raises(ValueError, match=r"mask prompts must be \(N, 1, 16, 16\)"):
        m.decode(enc, Prompts([0], masks=np.zeros((1, 1, 64, 64), bool)))
    with torch.no_grad():
        logits, iou = m.decode(enc, Prompts(torch.zeros(0)), multimask=True)  # no prompts: empty results
    assert logits.shape == (0, 3, 16, 16) and iou.shape == (0, 3)
    with pytest.raises(ValueError, match="fp32 weights"):
        _model("adapter").double().encode(torch.rand(1, 3, 64, 64), ["x"])
    with pytest.raises(ValueError, match="unknown conditioning"):
        ClipSam(tiny_config("nope"))
    for blocks in ("last", True):
        with pytest.raises(ValueError, match="use 'all', an int k"):
            ClipSam(tiny_config("adapter", blocks=blocks))


def test_save_load_roundtrip_and_corrupt(tmp_path):
    m = _model("ssp")
    path = m.save(tmp_path / "m.safetensors", metadata={"trained": "test"})
    import os

    from napari_clipsam.models.checkpoints import NEW_FILE_MODE

    assert os.stat(path).st_mode & 0o777 == NEW_FILE_MODE  # shareable, as any new file (not owner-only)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        _model("adapter").save(path)
    m2 = ClipSam.load(path)
    assert m2.file_metadata == {"trained": "test"} and m2.config == m.config
    img = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        a = m.decode(m.encode(img, ["nucleus"]), Prompts([0]))[0]
        b = m2.decode(m2.encode(img, ["nucleus"]), Prompts([0]))[0]
    assert torch.equal(a, b)
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        ClipSam.load(tmp_path / "cut.safetensors")
    with pytest.raises(FileNotFoundError):
        ClipSam.load(tmp_path / "missing.safetensors")
    import json

    from safetensors.torch import save_file

    from napari_clipsam.models.checkpoints import CheckpointError
    from napari_clipsam.models.registry import load_model

    tensors = {k: v.contiguous() for k, v in m.state_dict().items()}
    config = m.config.to_dict()
    bad_option = json.dumps({**config, "strategy_options": {"no_such_option": 1}})
    smaller = {**tensors, "sam.mask_decoder.iou_token.weight": torch.zeros(1, 8)}
    for name, data, meta, msg in [
            ("noconfig", tensors, {"format": "napari-clipsam/model"}, "no usable model config"),
            ("option", tensors, {"format": "napari-clipsam/model", "config": bad_option}, "no usable model config"),
            ("shape", smaller, {"format": "napari-clipsam/model", "config": json.dumps(config)}, "1 shape mismatches")]:
        save_file(data, str(tmp_path / f"{name}.safetensors"), metadata=meta)
        with pytest.raises(ValueError, match=msg):
            ClipSam.load(tmp_path / f"{name}.safetensors")
        with pytest.raises(CheckpointError, match=msg):  # the CLI shows these as one line
            load_model(str(tmp_path / f"{name}.safetensors"))
    save_file({"x": torch.zeros(1)}, str(tmp_path / "adapter.safetensors"), metadata={"format": "napari-clipsam/adapter"})
    with pytest.raises(CheckpointError, match="is a fine-tuned adapter, not a model"):
        load_model(str(tmp_path / "adapter.safetensors"))


def test_conv_stem_keeps_the_grid_and_survives_save_load(tmp_path):
    import dataclasses

    from napari_clipsam.models.sam_parts import conv_stem

    base = tiny_config("adapter")
    cfg = dataclasses.replace(base, sam=dataclasses.replace(base.sam, patch_stem=(8, 16)))
    m = ClipSam(cfg).eval()
    proj = m.sam.image_encoder.patch_embed.proj
    assert isinstance(proj, torch.nn.Sequential) and len(proj) == 7  # 2 × (conv, norm, GELU) + conv
    img = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        enc = m.encode(img, ["nucleus", "vesicle"])
        stock = ClipSam(base).eval().encode(img, ["nucleus", "vesicle"])
    assert enc.embeddings.shape == stock.embeddings.shape  # same token grid as SAM's patch conv
    m2 = ClipSam.load(m.save(tmp_path / "stem.safetensors"))
    assert m2.config.sam.patch_stem == (8, 16)
    with torch.no_grad():
        assert torch.equal(m2.encode(img, ["nucleus", "vesicle"]).embeddings, enc.embeddings)
    # an official-format model (no stem) has SAM's single convolution
    assert isinstance(ClipSam(base).sam.image_encoder.patch_embed.proj, torch.nn.Conv2d)
    for bad in ((), (8, 8, 8, 8, 8), (8, 8, 8)):  # patch 8: at most 3 stride-2 layers, at least 1
        with pytest.raises(ValueError, match="patch_stem"):
            conv_stem(bad, 32, 8 if len(bad) != 3 else 12)


def test_text_features_match_open_clip_encode_text():
    """Our single truncated pass (templates averaged, empty text subtracted) equals open_clip's
    full-length ``encode_text`` computation."""
    import torch.nn.functional as F

    m = _model("adapter")
    sem, clip, tok = m.semantics, m.semantics.clip, m.semantics.tokenizer
    texts = ["nucleus", "a much longer mitochondrial network"]
    with torch.no_grad():
        got = sem.text_features(texts)
        for i, x in enumerate(texts):
            e = F.normalize(clip.encode_text(tok([t.format(x) for t in sem.templates])), dim=-1).mean(0)
            e = e - F.normalize(clip.encode_text(tok([t.format("").strip() for t in sem.templates])), dim=-1).mean(0)
            torch.testing.assert_close(got.embedding[i], F.normalize(e, dim=-1), rtol=1e-5, atol=1e-6)
    assert got.token_mask[0].sum() == len("nucleus") + 2  # start + characters + end


def test_text_tower_runs_in_fp32_under_autocast():
    """The caller's bf16 autocast does not reach the text tower: the same features (and memo)."""
    sem = _model("adapter").semantics
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            under = sem.text_features(["nucleus"]).embedding
        sem.clear_cache()
        fp32 = sem.text_features(["nucleus"]).embedding
    assert under.dtype == torch.float32 and torch.equal(under, fp32)


def test_grid_seeds_reach_touching_objects_and_thin_ones():
    prob = np.zeros((40, 60), np.float32)
    yy, xx = np.mgrid[:40, :60]
    prob[(yy - 12) ** 2 + (xx - 10) ** 2 <= 64] = 1.0  # two touching disks, one region, no neck test
    prob[(yy - 12) ** 2 + (xx - 25) ** 2 <= 64] = 1.0
    prob[30:32, 5:55] = 0.9  # a thin rod, 2 cells wide: depth 1 everywhere
    prob[36, 58] = 0.8  # one cell: below min_area
    gs = grid_seeds(prob, threshold=0.5, stride=2, min_area=2)
    assert set(np.unique(gs.regions).tolist()) == {0, 1, 2} and not gs.regions[36, 58]
    in_disk = lambda cy, cx: ((gs.points[:, 1] - 0.5 - cy) ** 2 + (gs.points[:, 0] - 0.5 - cx) ** 2 <= 64)  # noqa: E731
    assert in_disk(12, 10).sum() >= 3 and in_disk(12, 25).sum() >= 3  # both objects seeded
    rod = gs.points[(gs.points[:, 1] > 29) & (gs.points[:, 1] < 33)]
    assert len(rod) >= 10  # the thin rod keeps its midline
    inner = gs.points[gs.region == gs.regions[12, 10]]
    assert all(prob[int(y), int(x)] == 1.0 for x, y in inner)
    # Rims are left out: every disk seed lies ≥ 1.5 cells from the edge.
    depth = ndimage.distance_transform_edt(np.pad(prob > 0.5, 1))[1:-1, 1:-1]
    assert all(depth[int(y), int(x)] >= 1.5 for x, y in inner)
    # A region too small for the grid still gets its deepest cell.
    dot = np.zeros((10, 10), np.float32)
    dot[3, 3] = 1.0
    one = grid_seeds(dot, stride=4)
    assert one.points.tolist() == [[3.5, 3.5]] and one.region.tolist() == [1]
    assert len(grid_seeds(np.zeros((8, 8)))) == 0
    with pytest.raises(ValueError, match="H, W"):
        grid_seeds(np.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match="NaN"):
        grid_seeds(np.full((4, 4), np.nan))
    with pytest.raises(ValueError, match="stride"):
        grid_seeds(dot, stride=0)


def test_prompts_slice_in_chunks():
    p = Prompts(torch.arange(5), points=torch.rand(5, 2, 2), labels=torch.ones(5, 2), boxes=torch.rand(5, 4).cumsum(1))
    part = p[1:3]
    assert len(part) == 2 and part.image_index.tolist() == [1, 2]
    assert torch.equal(part.points, p.points[1:3]) and torch.equal(part.boxes, p.boxes[1:3]) and part.masks is None
    with pytest.raises(TypeError, match="slice"):
        p[0]


def test_loading_weights_refreshes_the_cached_text_features():
    torch.manual_seed(0)
    a = ClipSam(tiny_config("ssp"))
    torch.manual_seed(3)
    b = ClipSam(tiny_config("ssp"))
    img = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        before = a.semantic_logits(a.encode(img, ["nucleus"]))  # fills a's text cache
        a.load_state_dict(b.state_dict())
        after, want = a.semantic_logits(a.encode(img, ["nucleus"])), b.semantic_logits(b.encode(img, ["nucleus"]))
    assert not torch.equal(before, want) and torch.equal(after, want)
