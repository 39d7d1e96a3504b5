"""The bundled demo model keeps its measured quality on held-out synthetic images (a smaller set than
``bench/quality.py``, with some tolerance). Random weights fail these.

Issue 6's bars minus a tolerance for the smaller set.
"""

import numpy as np
import pytest
import torch

from napari_clipsam.data.synthetic import CONCEPTS, make_image
from napari_clipsam.engine.segmenter import Segmenter
from napari_clipsam.evaluation import evaluate, instance_f1, interior_point, mask_iou, match_instances
from napari_clipsam.models.clipsam import ClipSam
from napari_clipsam.models.registry import load_model, model_status

pytestmark = pytest.mark.skipif(model_status("demo") == "not built", reason="demo model file not built")

HELD_OUT = 1_000_000  # training used seeds < 100_000


@pytest.fixture(scope="module")
def demo():
    return load_model("demo")


@pytest.fixture(scope="module")
def scores(demo):
    samples = [make_image(HELD_OUT + 500 + i) for i in range(10)]
    return evaluate(Segmenter(demo), samples, points_per_image=2)


def test_demo_loads_offline_by_name(demo):
    assert isinstance(demo, ClipSam)
    assert demo.file_metadata.get("trained_by") == "scripts/train_demo.py"
    seg = Segmenter.from_pretrained("demo")
    assert seg.model.config == demo.config


def test_demo_was_trained_within_30_minutes(demo):
    meta = demo.file_metadata
    assert meta["train_seconds"] == pytest.approx(sum(st["train_seconds"] for st in meta["stages"]), abs=0.5)
    # measured 1786 s: 1409 s + 311 s (decoder with the stem skip) + 67 s (decoder, object-free backgrounds)
    assert meta["train_seconds"] <= 30 * 60
    assert demo.config.sam.stem_skip and [st.get("added") for st in meta["stages"]][1] == "sam.mask_decoder.stem_skip"
    assert meta["stages"][-1]["p_empty"] > 0


def test_text_only_iou(scores):
    assert scores["nucleus"]["text_iou"] >= 0.82  # measured 0.92 (50 images; this set 0.91)
    for concept in ("mitochondrion", "vesicle"):  # measured 0.77, 0.74 (this set: 0.78, 0.66)
        assert scores[concept]["text_iou"] >= 0.55, (concept, scores[concept])


def test_point_instance_iou_and_f1(scores):
    assert scores["nucleus"]["point_iou"] >= 0.6  # measured 0.80 (50 images; this set, 14 clicks: 0.69)
    assert scores["vesicle"]["point_iou"] >= 0.65  # measured 0.81 (this set: 0.75)
    assert scores["nucleus"]["instance_f1"] >= 0.75  # measured 0.87 (50 images; this set 0.84)
    for concept in ("mitochondrion", "vesicle"):  # measured 0.80, 0.91 (this set: 0.78, 0.88)
        assert scores[concept]["instance_f1"] >= 0.65, (concept, scores[concept])


def test_a_click_on_a_crowded_nucleus_returns_that_nucleus(demo):
    """Text + one click at the deepest point of a nucleus among 6–10 (many touching): the mask
    head's stem skip is what lets the demo tell touching nuclei apart."""
    seg = Segmenter(demo)
    ious = []
    for i in range(20):
        sample = make_image(HELD_OUT + 500 + i, counts={"nucleus": (6, 10)})
        seg.set_image(sample.image)
        gt = sample.instance_labels("nucleus")
        for k in np.unique(gt[gt > 0])[:4]:
            target = gt == k
            mask, _ = seg.predict(points=[interior_point(target)], labels=[1], text="nucleus")
            ious.append(mask_iou(mask, target))
    assert len(ious) == 80 and np.mean(ious) >= 0.72, np.mean(ious)  # measured 0.762 (two-stage demo: 0.752; before the skip: 0.702)


def test_no_objects_on_object_free_backgrounds(demo):
    """An image with no object at all (normalised, its noise and haze fill the whole range) gives
    no instance for any text: the demo's last training stage showed it such backgrounds."""
    seg = Segmenter(demo)
    found = {}
    for i in range(4):
        seg.set_image(make_image(HELD_OUT + 900 + i, counts={c: 0 for c in CONCEPTS}, domain_shift=0.5 * (i % 2)).image)
        for c in CONCEPTS:
            found[(i, c)] = len(seg.segment_text(c))
    assert sum(found.values()) <= 2, found  # measured 0 (before the third stage: 73)


def test_leakage_and_absent(scores):
    for concept, row in scores.items():
        assert row["leakage"] <= 0.05, (concept, row)  # measured <= 0.009 (this set <= 0.010)
        assert row["absent_empty_rate"] >= 0.9, (concept, row)  # measured 100 % (this set: 6 of 6)


def test_random_weights_fail_the_bar(demo):
    """The same evaluation with the demo architecture but random weights is far below the bar."""
    torch.manual_seed(0)
    rnd = ClipSam(demo.config)
    sample = make_image(HELD_OUT + 7, counts={"nucleus": (4, 8)})
    seg = Segmenter(rnd)
    seg.set_image(sample.image)
    res = seg.segment_text("nucleus")
    assert mask_iou(res.prob > 0.5, sample.semantic_mask("nucleus")) < 0.5
    assert instance_f1(res.labels, sample.instance_labels("nucleus")) < 0.5


def test_synonyms_agree(demo):
    sample = make_image(HELD_OUT + 3, counts={"nucleus": (5, 8)})
    seg = Segmenter(demo)
    seg.set_image(sample.image)
    a = seg.segment_text("nucleus").prob > 0.5
    b = seg.segment_text("nuclei").prob > 0.5
    assert mask_iou(a, b) >= 0.8
    tp, fp, fn = match_instances(seg.segment_text("nuclei").labels, sample.instance_labels("nucleus"))
    assert tp >= 0.7 * (tp + fn)


def test_touching_nuclei_come_out_one_label_each(demo):
    """Nuclei touching another one (within 2 px) share a region of the semantic map; the grid of
    seeds still finds most of them as their own instance (IoU ≥ 0.5)."""
    from scipy import ndimage

    seg = Segmenter(demo)
    found = touching = 0
    for i in range(10):
        sample = make_image(HELD_OUT + 500 + i, counts={"nucleus": (8, 12)})
        gt = sample.instance_labels("nucleus")
        seg.set_image(sample.image)
        labels = seg.segment_text("nucleus").labels
        for k in range(1, int(gt.max()) + 1):
            obj = gt == k
            if not (gt[ndimage.binary_dilation(obj, iterations=2) & ~obj] > 0).any():
                continue
            touching += 1
            ids, counts = np.unique(labels[obj], return_counts=True)
            ids, counts = ids[ids > 0], counts[ids > 0]
            found += bool(len(ids)) and mask_iou(labels == ids[np.argmax(counts)], obj) >= 0.5
    assert touching >= 50 and found >= 0.55 * touching, (found, touching)  # measured 58 of 84


def test_segment_text_reports_its_decode_chunks_on_one_view(demo):
    sample = make_image(HELD_OUT + 11, counts={"nucleus": (8, 12)})
    seen = []
    seg = Segmenter(demo, progress=lambda done, total, msg: seen.append((done, total, msg)))
    seg.set_image(sample.image)
    seen.clear()
    seg.segment_text("nucleus")
    done = [d for d, _, _ in seen]
    total = seen[-1][1]
    assert len(seen) >= 2 and done == sorted(done) and done[-1] == total  # the grid: many seeds, chunk by chunk
    assert all(t == total and m == "segment_text" for _, t, m in seen)


def test_decode_chunk_keeps_a_calls_image_tokens_under_the_heap_limit():
    """vit_b's 8 prompts a call are 16 MiB of image tokens in bf16 but 32 MiB in fp32, above the
    largest block glibc's heap serves: in fp32 fewer prompts go in a call."""
    from napari_clipsam.engine.text_instances import DECODE_CHUNK, decode_chunk

    vit_b = 256 * 64 * 64
    assert decode_chunk(vit_b, torch.bfloat16) == 8
    assert decode_chunk(vit_b, torch.float32) == 6
    assert decode_chunk(vit_b, torch.float32) * vit_b * 4 < 32 << 20
    assert decode_chunk(32 * 16 * 16, torch.float32) == DECODE_CHUNK
    assert decode_chunk(10**9, torch.float32) == 1
    with pytest.raises(ValueError, match="at least one element"):
        decode_chunk(0, torch.float32)


def test_segment_text_decodes_in_chunks_of_the_byte_budget(demo, monkeypatch):
    """The byte budget is counted in the image side's dtype (bf16 where the fast path autocasts)."""
    from napari_clipsam.engine import text_instances
    from napari_clipsam.models.fast import inference_autocast

    sample = make_image(HELD_OUT + 11, counts={"nucleus": (8, 12)})
    seg = Segmenter(demo)
    seg.set_image(sample.image)
    emb = seg._encoded(seg._views[0], "nucleus").embeddings
    per_prompt = emb.shape[1] * emb.shape[2] * emb.shape[3]
    side = inference_autocast(demo) or torch.float32
    monkeypatch.setattr(text_instances, "DECODE_BYTES", 3 * per_prompt * side.itemsize)
    seen = []
    seg.progress = lambda done, total, msg: seen.append(done)
    seg.segment_text("nucleus")
    assert len(seen) >= 3 and seen[0] == 3 and all(b - a == 3 for a, b in zip(seen[:-2], seen[1:-1]))


def test_instances_lie_where_the_text_map_is(demo):
    """A grid seed on a faint spot of the map can be decoded onto an object of another kind;
    ``min_support`` drops such masks: far fewer false positives, better F1."""
    from napari_clipsam.evaluation import f1_score

    seg = Segmenter(demo)
    counts = {0.0: np.zeros(3, int), 0.5: np.zeros(3, int)}
    for i in range(8):
        sample = make_image(HELD_OUT + 600 + i)
        if "vesicle" not in sample.concepts_present:
            continue
        seg.set_image(sample.image)
        gt = sample.instance_labels("vesicle")
        for support in counts:
            counts[support] += match_instances(seg.segment_text("vesicle", min_support=support).labels, gt)
    (_, fp0, _), (_, fp, _) = counts[0.0], counts[0.5]
    assert fp <= fp0 / 2, counts  # measured FP 26 -> 3 (TP 67 -> 65)
    assert f1_score(*counts[0.5]) >= f1_score(*counts[0.0]) + 0.05, counts  # measured 0.78 -> 0.89


def test_fine_tuning_validation_scores_the_instances_segment_text_returns():
    """Validation's ``f1_text`` is exactly the instance F1 of ``segment_text`` on the same images
    (same model, fp32 on both sides), and ``val_score`` averages the measures of the mode."""
    demo = load_model("demo")  # its own copy: no fast path from the other tests
    from napari_clipsam.evaluation import f1_score
    from napari_clipsam.training import evaluate as evaluate_examples, examples_from_arrays

    samples = [make_image(HELD_OUT + 900 + i, counts={"nucleus": (3, 8)}) for i in range(3)]
    examples = []
    for i, s in enumerate(samples):
        examples += examples_from_arrays(s.image, s.instance_labels("nucleus"), text="nucleus", name=f"img{i}")
    both = evaluate_examples(demo, examples, mode="both")
    seg = Segmenter(demo, fast=False)
    counts = np.zeros(3, int)
    for s in samples:
        seg.set_image(s.image)
        counts += match_instances(seg.segment_text("nucleus").labels, s.instance_labels("nucleus"))
    assert both["f1_text"] == f1_score(*counts) and counts[0] >= 10
    assert both["val_score"] == pytest.approx(np.mean([both[k] for k in ("iou_points", "iou_box", "iou_text", "f1_text")]))
    text = evaluate_examples(demo, examples, mode="text")
    assert text["val_score"] == pytest.approx(np.mean([text[k] for k in ("iou_text", "iou_points", "f1_text")]))
    manual = evaluate_examples(demo, examples, mode="manual")
    assert "f1_text" not in manual and manual["val_score"] == pytest.approx((manual["iou_points"] + manual["iou_box"]) / 2)


@pytest.mark.slow
def test_fine_tuning_on_three_shifted_images_raises_nucleus_f1():
    """Issue 6's few-label bar on a smaller test set: default fine-tuning on 3 labelled images of
    the shifted domain (bench/quality.py's training draw) raises held-out nucleus F1@0.5 (bench,
    20 images: 0.533 → 0.729; bar +0.15 less a tolerance of 0.05). One run's result moves with
    rounding: on 1 thread, seeds 0 / 1 / 2 gave 0.736 / 0.806 / 0.756, and 0.624 / 0.731 / 0.787
    once the decoder's final attention ran 2 of its 5 rows (the same math), from 0.556 before. So
    the bar is on the mean of three seeds, and each must still gain. The untouched model, or the
    earlier rule that held one image out, fails it."""
    from napari_clipsam.evaluation import f1_score
    from napari_clipsam.training import FineTuneConfig, examples_from_arrays, finetune

    def shifted(seed):
        return make_image(seed, domain_shift=1.0, counts={"nucleus": (4, 11)})

    def f1(model, samples):
        seg, counts = Segmenter(model), np.zeros(3, int)
        for s in samples:
            seg.set_image(s.image)
            counts += match_instances(seg.segment_text("nucleus").labels, s.instance_labels("nucleus"))
        return f1_score(*counts)

    test = [shifted(3_000_000 + i) for i in range(8)]
    before = f1(load_model("demo"), test)
    examples = []
    for i in range(3):
        s = shifted(2_000_000 + i)
        examples += examples_from_arrays(s.image, s.instance_labels("nucleus"), text="nucleus", name=f"shifted-{i}")
    after = []
    for seed in range(3):
        model = load_model("demo")
        result = finetune(model, examples, FineTuneConfig(seed=seed))
        assert result.split["kind"] == "crop" and result.best_step == result.steps == 200
        after.append(f1(model, test))
    assert np.mean(after) >= before + 0.10 and min(after) >= before + 0.05, (before, after)
