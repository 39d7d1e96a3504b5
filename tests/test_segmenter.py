"""Segmenter on tiny untrained models: embed once, invalidation, disk cache, inputs and errors."""

import numpy as np
import pytest
import torch

from napari_clipsam.engine.cache import EmbeddingCache
from napari_clipsam.engine.segmenter import Segmenter, TextSegmentation, resolve_device
from napari_clipsam.models.clipsam import ClipSam, tiny_config

STRATEGIES = ["adapter", "ssp", "pseudo"]


def _model(strategy="ssp", seed=0):
    torch.manual_seed(seed)
    return ClipSam(tiny_config(strategy))


def _calls(module):
    calls = []
    module.register_forward_hook(lambda *a: calls.append(1))
    return calls


def _image(seed=0, shape=(48, 56)):
    return np.random.default_rng(seed).integers(0, 4000, shape).astype(np.uint16)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_predict_twice_runs_the_image_encoder_once(strategy):
    model = _model(strategy)
    enc_calls = _calls(model.sam.image_encoder.patch_embed)
    last_block = _calls(model.sam.image_encoder.blocks[-1])
    seg = Segmenter(model)
    seg.set_image(_image())
    assert len(enc_calls) == 1
    m1, s1 = seg.predict(points=[[10, 20]], labels=[1])
    m2, s2 = seg.predict(points=[[10, 20], [40, 5]], labels=[1, 0], box=[2, 3, 30, 40])
    t1 = seg.predict(points=[[10, 20]], text="nucleus")
    blocks_after_text = len(last_block)
    seg.predict(box=[2, 3, 30, 40], text="nucleus")
    assert len(enc_calls) == 1  # decoder only from here on
    assert len(last_block) == blocks_after_text  # the (image, text) conditioning is cached too
    assert m1.shape == (48, 56) and m1.dtype == bool and 0.0 <= s1 <= 1.0
    assert np.array_equal(seg.predict(points=[[10, 20]], labels=[1])[0], m1)
    assert np.array_equal(seg.predict(points=[[10, 20]], text="nucleus")[0], t1[0])
    seg.set_image(_image(1))  # a new image is embedded
    assert len(enc_calls) == 2
    seg.set_image(_image(0))  # the first one again comes from the cache
    assert len(enc_calls) == 2
    assert np.array_equal(seg.predict(points=[[10, 20]], labels=[1])[0], m1)


def test_set_normalized_keeps_its_own_copy_of_the_pixels():
    """A caller reusing its buffer after set_normalized(embed=False) must not get the new pixels'
    embedding stored, and later returned, under the first image's key."""
    from napari_clipsam.engine.preprocess import normalize_image

    a, b = normalize_image(_image(0)), normalize_image(_image(1))
    ref = Segmenter(_model())
    ref.set_normalized(a)
    want = ref.predict_torch(points=[[10, 20]])[0]
    seg = Segmenter(_model(), cache=EmbeddingCache())
    buf = a.copy()
    seg.set_normalized(buf, embed=False)
    buf[:] = b  # the caller reuses its buffer before the (lazy) embedding runs
    assert torch.equal(seg.predict_torch(points=[[10, 20]])[0], want)
    seg.set_normalized(a.copy())
    assert torch.equal(seg.predict_torch(points=[[10, 20]])[0], want)


def _fresh_prediction(model, image, **prompts):
    """Logits from a copy of ``model`` in a new segmenter with an empty cache."""
    clone = ClipSam(model.config)
    clone.load_state_dict(model.state_dict())
    seg = Segmenter(clone)
    seg.set_image(image)
    return seg.predict_torch(**prompts)[0]


@pytest.mark.parametrize("strategy", ["adapter", "pseudo"])
def test_changed_weights_never_give_stale_embeddings(strategy):
    model = _model(strategy)
    cache = EmbeddingCache()
    seg = Segmenter(model, cache=cache)
    img = _image()
    seg.set_image(img)
    before = seg.predict_torch(box=[5, 5, 40, 40], text="nucleus")[0]
    # A fine-tuning step changes the strategy's weights in place (an adapter being trained).
    params = [p for p in model.conditioning.parameters()] + list(model.sam.image_encoder.neck.parameters())
    opt = torch.optim.SGD(params, lr=0.5)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    after = seg.predict_torch(box=[5, 5, 40, 40], text="nucleus")[0]
    torch.testing.assert_close(after, _fresh_prediction(model, img, box=[5, 5, 40, 40], text="nucleus"))
    assert (after - before).abs().max() > 1e-3

    # set_adapter (a state dict or file of weights) invalidates as well.
    enc_calls = _calls(model.sam.image_encoder.patch_embed)
    state = {k: v + 0.05 for k, v in model.state_dict().items() if k.startswith("sam.image_encoder.patch_embed")}
    seg.set_adapter(state)
    got = seg.predict_torch(points=[[10, 20]])[0]
    assert len(enc_calls) == 1
    torch.testing.assert_close(got, _fresh_prediction(model, img, points=[[10, 20]]))
    with pytest.raises(ValueError, match="does not fit"):
        seg.set_adapter({"nope.weight": torch.zeros(1)})


def test_disk_cache_survives_new_segmenter_and_is_ignored_after_model_change(tmp_path):
    img = _image()
    model = _model("ssp")
    Segmenter(model, cache=EmbeddingCache(directory=tmp_path)).set_image(img)
    assert list(tmp_path.glob("*/*.pt"))

    # The same weights loaded from a file, a new segmenter and a new cache object: no encoding.
    same = ClipSam.load(model.save(tmp_path / "m.safetensors"))
    calls = _calls(same.sam.image_encoder.patch_embed)
    seg = Segmenter(same, cache=EmbeddingCache(directory=tmp_path / ""))
    seg.set_image(img)
    logits, _ = seg.predict_torch(points=[[10, 20]])
    assert len(calls) == 0
    torch.testing.assert_close(logits, _fresh_prediction(model, img, points=[[10, 20]]))

    other = _model("ssp", seed=1)
    calls = _calls(other.sam.image_encoder.patch_embed)
    seg = Segmenter(other, cache=EmbeddingCache(directory=tmp_path))
    seg.set_image(img)
    assert len(calls) == 1
    torch.testing.assert_close(seg.predict_torch(points=[[10, 20]])[0], _fresh_prediction(other, img, points=[[10, 20]]))


def test_inputs_rgb_multichannel_and_coordinates():
    seg = Segmenter(_model("pseudo"), tile_size=0)
    rgb = np.random.default_rng(0).integers(0, 255, (30, 70, 3), dtype=np.uint8)
    seg.set_image(rgb)
    assert seg.predict(points=[[69, 29]])[0].shape == (30, 70)  # (x, y) = (col, row): last pixel is valid
    with pytest.raises(ValueError, match="outside the image"):
        seg.predict(points=[[29, 69]])  # swapped (row, col) is outside
    multi = np.random.default_rng(1).random((5, 40, 40)).astype(np.float32)
    seg.set_image(multi, channel_axis=0, channels=[0, 3])
    res = seg.segment_text("nucleus", min_score=0.0)
    assert isinstance(res, TextSegmentation)
    assert res.labels.shape == res.prob.shape == (40, 40) and res.labels.dtype == np.uint32
    assert set(np.unique(res.labels)) - {0} == set(res.scores)
    assert 0 <= res.prob.min() and res.prob.max() <= 1


def test_bad_inputs_raise_clear_errors():
    seg = Segmenter(_model())
    with pytest.raises(RuntimeError, match="set_image"):
        seg.predict(points=[[1, 1]])
    with pytest.raises(RuntimeError, match="set_image"):
        seg.segment_text("nucleus")
    for bad, msg in [(np.zeros((2, 3, 8, 8)), "2D image"), (np.zeros((0, 5)), "empty"),
                     (np.full((8, 8), np.nan), "NaN"), (np.zeros((5, 8, 8)), "channel_axis")]:
        with pytest.raises(ValueError, match=msg):
            seg.set_image(bad)
    seg.set_image(_image())
    cases = [
        (dict(points=[[1, 1], [2, 2]], labels=[1]), "labels must have shape"),
        (dict(points=[[1, 1]], labels=[[1]]), "labels must have shape"),
        (dict(points=[[1, 1]], labels=[2]), "positive"),
        (dict(points=[1, 2, 3]), "points must be"),
        (dict(box=[10, 10, 5, 20]), "box must be"),
        (dict(box=[100, 100, 120, 120]), "outside"),
        (dict(), "needs points"),
        (dict(points=[[1, 1]], text=""), "non-empty"),
        (dict(mask_input=np.zeros((3, 3), bool)), "mask_input"),
        (dict(mask_input=np.zeros((48, 56), bool)), "mask_input is empty"),
    ]
    for kw, msg in cases:
        with pytest.raises(ValueError, match=msg):
            seg.predict(**kw)
    with pytest.raises(ValueError, match="non-empty"):
        seg.segment_text("  ")
    with pytest.raises(ValueError, match="seeds must be"):
        seg.segment_text("nucleus", seeds="kmeans")
    for kw, msg in [(dict(min_support=1.5), "min_support must be a number in \\[0.0, 1.0\\]"), (dict(threshold=-0.1), "threshold"),
                    (dict(min_score="high"), "min_score must be a number")]:
        with pytest.raises(ValueError, match=msg):
            seg.segment_text("nucleus", **kw)


def test_constant_image_gives_empty_results_without_running_the_model():
    model = _model("pseudo")
    calls = _calls(model.sam.image_encoder.patch_embed)
    seg = Segmenter(model)
    seg.set_image(np.full((40, 50), 7, np.uint16))
    res = seg.segment_text("nucleus", min_score=0.0)
    assert res.labels.shape == (40, 50) and not res.labels.any() and res.scores == {} and not res.prob.any()
    mask, score = seg.predict(points=[[3, 4]])
    assert not mask.any() and score == 0.0 and len(calls) == 0


def test_device_progress_and_text_only_predict():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else ("mps" if torch.backends.mps.is_available() else "cpu")
    assert resolve_device().type == expected
    seen = []
    seg = Segmenter(_model("pseudo"), device="cpu", progress=lambda d, t, m: seen.append((d, t, m)))
    seg.set_image(np.random.default_rng(0).random((150, 100)))  # > 1.5x the 64 px input: tiled
    assert len(seg.tiles) > 1 and seen[-1][:2] == (len(seg.tiles), len(seg.tiles))
    mask, score = seg.predict(text="nucleus")
    logits, iou = seg.predict_torch(text="nucleus")
    assert mask.shape == (150, 100) and np.array_equal(mask, (logits[0] > 0).numpy())
    seen.clear()
    seg.segment_text("nucleus")
    assert [s[0] for s in seen] == list(range(1, len(seg.tiles) + 1))


def test_from_pretrained_loads_a_clipsam_file(tmp_path):
    model = _model("pseudo")
    path = model.save(tmp_path / "m.safetensors")
    seg = Segmenter.from_pretrained(path, device="cpu")
    seg.set_image(_image())
    torch.testing.assert_close(seg.predict_torch(points=[[10, 20]])[0], _fresh_prediction(model, _image(), points=[[10, 20]]))


def test_set_adapter_file_matches_finetuned_model(tmp_path, fp32):
    """An adapter file from fine-tuning, applied through Segmenter.set_adapter to a fresh copy of
    the base, gives the fine-tuned model's masks; embeddings of the base are not reused."""
    import copy

    from napari_clipsam.models.clipsam import ClipSam, tiny_config
    from napari_clipsam.training.adapter_file import save_adapter
    from napari_clipsam.training.examples import examples_from_arrays
    from napari_clipsam.training.finetune import FineTuneConfig, finetune

    torch.manual_seed(0)
    base = ClipSam(tiny_config("ssp"))
    fresh = copy.deepcopy(base)
    rng = np.random.default_rng(0)
    image = rng.random((64, 64)).astype(np.float32)
    labels = np.zeros((64, 64), np.uint16)
    labels[10:30, 10:30] = 1
    labels[40:55, 35:60] = 2
    image[labels > 0] += 2
    tuned = copy.deepcopy(base)
    finetune(tuned, examples_from_arrays(image, labels, text="nucleus"),
             FineTuneConfig(steps=3, val_every=3, lora_rank=2, lora_blocks="all"))
    path = save_adapter(tmp_path / "a.safetensors", tuned)

    ref = Segmenter(tuned)
    ref.set_image(image)
    want, _ = ref.predict(points=[[20, 20]], text="nucleus")
    seg = Segmenter(fresh)
    seg.set_image(image)
    before = seg.predict_torch(points=[[20, 20]], text="nucleus")[0]
    meta = seg.set_adapter(path)
    assert meta["strategy"] == "ssp" and meta["lora"]["rank"] == 2
    got = seg.predict_torch(points=[[20, 20]], text="nucleus")[0]
    assert not torch.equal(before, got)
    assert np.array_equal(got[0].numpy() > 0, want)


def test_resolve_device_refuses_unknown_and_absent_devices(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name, msg in [("bogus", "not a torch device"), ("cuda", "no cuda device"), ("cuda:1", "no cuda device")]:
        with pytest.raises(ValueError, match=msg):
            resolve_device(name)
        with pytest.raises(ValueError, match=msg):
            Segmenter(_model(), device=name)
    assert resolve_device("cpu") == torch.device("cpu")


def test_argument_types_ranges_and_a_refused_image_keep_the_segmenter_usable(tmp_path):
    from napari_clipsam.engine.cache import EmbeddingCache

    for kw, msg in [(dict(cache="emb/"), "EmbeddingCache"), (dict(tile_size=100.5), "tile_size"),
                    (dict(tile_size="256"), "tile_size"), (dict(halo=-1), "halo")]:
        with pytest.raises(ValueError, match=msg):
            Segmenter(_model(), **kw)
    seg = Segmenter(_model(), tile_size=0)
    image = _image()
    seg.set_image(image)
    shape = seg.image_shape
    for bad in (np.full((10, 12, 3), 255.0, np.float32), np.full((10, 12, 3), np.nan, np.float32)):
        with pytest.raises(ValueError, match=r"values in \[0, 1\]"):
            seg.set_normalized(bad)
        assert seg.image_shape == shape  # the image set before is still there
    mask, _ = seg.predict(points=[[10, 10]])
    assert mask.shape == shape
    h, w = shape
    assert seg.predict(points=[[w - 0.5, h - 0.5]])[0].shape == shape  # the far edge of the last pixel
    for kw, msg in [(dict(points=[[w - 0.4, 1]]), "outside"), (dict(points=[[-0.6, 1]]), "outside"),
                    (dict(points="ab"), "points must be"), (dict(points=[[1, 2], [3]]), "points must be"),
                    (dict(points=[[5, 5]], mask_input=np.full(shape, 0.2)), "boolean"),
                    (dict(points=[[5, 5]], mask_input=np.where(mask, 9.0, -9.0)), "logits > 0")]:
        with pytest.raises(ValueError, match=msg):
            seg.predict(**kw)
    assert seg.predict(points=[[5, 5]], mask_input=np.ones(shape, np.uint8))[0].shape == shape  # 0/1 is a mask
    for kw, msg in [(dict(nms_iou=2), "nms_iou"), (dict(merge_iou=5), "merge_iou"), (dict(region_margin=-1), "region_margin"),
                    (dict(min_area=-5), "min_area"), (dict(min_area=None), "min_area"), (dict(threshold="0.5"), "threshold")]:
        with pytest.raises(ValueError, match=msg):
            seg.segment_text("nucleus", **kw)
    (tmp_path / "emb").write_text("not a folder")
    with pytest.raises(ValueError, match="is a file"):
        EmbeddingCache(directory=tmp_path / "emb")


def test_texts_differing_in_case_share_the_cache_and_long_texts_warn():
    seg = Segmenter(_model(), tile_size=0)
    seg.set_image(_image())
    first = seg.segment_text("nucleus", min_score=0.0)
    misses = seg.cache.misses
    again = seg.segment_text("  NUCLEUS ", min_score=0.0)
    assert seg.cache.misses == misses and np.array_equal(first.labels, again.labels)
    with pytest.warns(UserWarning, match="context: its end is cut off"):
        seg.segment_text("the very long description of a round nucleus " * 2, min_score=0.0)
