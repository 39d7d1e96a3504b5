"""Fine-tuning: learning on held-out data, text use, mode consistency, cancel, determinism, prefix caching."""

import threading

import numpy as np
import pytest
import torch

from napari_clipsam.models.clip_parts import tiny_clip_config
from napari_clipsam.models.clipsam import ClipSam, ClipSamConfig
from napari_clipsam.models.sam_parts import SamConfig
from napari_clipsam.training import FineTuneConfig, LossWeights, evaluate, examples_from_arrays, finetune
from napari_clipsam.models.fast import cpu_has_fast_bf16
from napari_clipsam.training.finetune import cache_point, train_autocast_dtype

# A small SAM with an 8×8 embedding grid (32×32 masks) on 64 px images: vesicles of 5–7 px need it.
SAM8 = SamConfig(encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=2, encoder_global_attn_indexes=(1,),
                 img_size=64, patch_size=8, window_size=4, prompt_embed_dim=32, mask_in_chans=4, decoder_depth=1,
                 decoder_mlp_dim=64, decoder_num_heads=2, iou_head_hidden_dim=32)
SWAP = {"nucleus": "vesicle", "vesicle": "nucleus"}


def _model(strategy="ssp", seed=0):
    torch.manual_seed(seed)
    return ClipSam(ClipSamConfig(sam=SAM8, clip=tiny_clip_config(), strategy=strategy, templates=("{}",)))


def _scene(seed, size=64):
    """Noise + 2 bright disks ("nucleus", r 6–9) + 5 bright dots ("vesicle", r 2.5–3.5)."""
    rng = np.random.default_rng(seed)
    img = rng.normal(0.1, 0.03, (size, size)).astype(np.float32)
    labels = {"nucleus": np.zeros((size, size), np.uint16), "vesicle": np.zeros((size, size), np.uint16)}
    yy, xx = np.mgrid[:size, :size]
    for cls, n, (rlo, rhi), gain in (("nucleus", 2, (6, 9), 0.6), ("vesicle", 5, (2.5, 3.5), 0.8)):
        for k in range(1, n + 1):
            for _ in range(50):
                cy, cx = rng.integers(4 if cls == "vesicle" else 10, size - (4 if cls == "vesicle" else 10), 2)
                d = (yy - cy) ** 2 + (xx - cx) ** 2 <= rng.uniform(rlo, rhi) ** 2
                if not (d & ((labels["nucleus"] > 0) | (labels["vesicle"] > 0))).any():
                    labels[cls][d] = k
                    img[d] += gain
                    break
    return img, labels


def _data(seeds, swap=False, classes=("nucleus", "vesicle")):
    out = []
    for s in seeds:
        img, labels = _scene(s)
        out += examples_from_arrays(img, {(SWAP[c] if swap else c): labels[c] for c in classes}, name=f"img{s}")
    return out


TRAIN, TEST = range(4), range(100, 104)
LOSS = LossWeights(focal=2.0, dice=1.0, focal_alpha=None)


def _cfg(**kw):
    base = dict(steps=150, lr=3e-3, batch_size=4, patience=0, seed=0, loss=LOSS)
    base.update(kw)
    return FineTuneConfig(**base)


@pytest.fixture(scope="module")
def text_runs():
    """The same model trained in text mode with the right texts and with swapped texts."""
    test = _data(TEST)
    base = _model()
    start = evaluate(base, test, "text")
    good, swapped = _model(), _model()
    res = finetune(good, _data(TRAIN), _cfg(mode="text"))
    finetune(swapped, _data(TRAIN, swap=True), _cfg(mode="text"))
    return {"start": start, "good": evaluate(good, test, "text"), "swapped": evaluate(swapped, test, "text"),
            "result": res, "test": test, "good_model": good}


@pytest.mark.slow
def test_text_finetune_improves_held_out_and_uses_text(text_runs):
    start, good, swapped = text_runs["start"], text_runs["good"], text_runs["swapped"]
    res = text_runs["result"]
    assert res.split["kind"] == "examples" and res.split["val"]
    assert res.best_val_score > res.start_val_score + 0.1
    # held-out images never seen in training
    assert good["val_score"] > start["val_score"] + 0.1, (start, good)
    assert good["iou_text"] > start["iou_text"] + 0.15, (start, good)
    # with the texts swapped the same steps give much worse results for the right texts
    assert good["iou_text"] > swapped["iou_text"] + 0.05, (good, swapped)
    assert res.trainable["percent"] < 100 and res.losses[-1] < res.losses[0]


@pytest.mark.slow
def test_manual_mode_improves_points_and_boxes(text_runs):
    # nuclei only: the 5–7 px vesicles are beyond what this random-init model learns from clicks in 150 steps
    test = _data(TEST, classes=("nucleus",))
    start = evaluate(_model(), test, "manual")
    model = _model()
    finetune(model, _data(TRAIN, classes=("nucleus",)), _cfg(mode="manual"))
    after = evaluate(model, test, "manual")
    assert after["iou_points"] > start["iou_points"] + 0.1, (start, after)
    assert after["iou_box"] > start["iou_box"] + 0.1, (start, after)
    # and the text-mode model improved the seed clicks segment_text decodes (mode consistency)
    assert text_runs["good"]["iou_points"] > text_runs["start"]["iou_points"]


def _snapshot(m):
    return ({k: v.clone() for k, v in m.state_dict().items()}, [p.requires_grad for p in m.parameters()],
            [(type(mod), mod.training) for mod in m.modules()])


def _identical(m, snap):
    sd, rg, tr = snap
    now = m.state_dict()
    return (now.keys() == sd.keys() and all(torch.equal(now[k], sd[k]) for k in sd)
            and [p.requires_grad for p in m.parameters()] == rg
            and [(type(mod), mod.training) for mod in m.modules()] == tr)


@pytest.mark.parametrize("how", ["callback", "event"])
def test_cancel_restores_model_bit_identical(tmp_path, monkeypatch, how):
    monkeypatch.chdir(tmp_path)
    m = _model("adapter")
    snap = _snapshot(m)
    rng_state = torch.get_rng_state()
    seen = []
    event = threading.Event()

    def cb(p):
        seen.append(p)
        if p.step >= 3:
            if how == "event":
                event.set()
                return None
            return False
        return None

    res = finetune(m, _data(range(2)), _cfg(steps=20, mode="both"), callback=cb, cancel=event)
    assert res.cancelled and seen[-1].step == 3
    assert _identical(m, snap)
    assert not hasattr(m, "clipsam_adapter") and "peft_config" not in m.__dict__
    assert list(tmp_path.iterdir()) == []
    assert torch.equal(torch.get_rng_state(), rng_state)
    assert {p.phase for p in seen} >= {"prepare", "validate", "train"}
    assert all(p.total == 20 for p in seen) and seen[-1].eta_s is not None and seen[-1].loss is not None


def test_deterministic_and_cache_prefix_equivalent():
    """Same seed, same run; the frozen-prefix cache runs the same operations as recomputing the
    prefix, so in fp32 the losses agree to rounding. Under the default autocast (bf16 on CPUs
    with native bf16) both stay as close to the fp32 run as bf16 allows."""
    runs = {}
    for cache, autocast in ((True, None), (True, None), (False, None), (True, False), (False, False)):
        m = _model("ssp")
        res = finetune(m, _data(range(2)), _cfg(steps=4, mode="both", cache_prefix=cache, val_every=2,
                                                 autocast=autocast))
        assert cache_point(m) == 1  # LoRA on the last block: block 0 is cached
        runs.setdefault((cache, autocast), []).append(res)
    (a, b), (c,) = runs[True, None], runs[False, None]
    assert a.losses == b.losses and a.history == b.history
    np.testing.assert_allclose(runs[True, False][0].losses, runs[False, False][0].losses, rtol=1e-6)
    for r in (a, c):
        np.testing.assert_allclose(r.losses, runs[False, False][0].losses, rtol=2e-3)
    assert a.best_step == c.best_step


def test_few_images_hold_out_strips_and_keep_the_last_weights():
    """1–3 images: a strip of each is held out, every image trains, and the run takes all its steps
    and keeps the last weights (patience and keep_best apply to held-out whole images only)."""
    cfg = _cfg(steps=6, mode="text", lr=1e-6, val_every=1, patience=2, min_delta=0.5)
    m = _model("ssp")
    res = finetune(m, _data([0]), cfg)
    assert res.split["kind"] == "crop" and res.steps == 6 and res.best_step == 6
    assert res.best_metrics == {k: v for k, v in res.history[-1].items() if k not in ("step", "loss")}
    assert hasattr(m, "clipsam_adapter") and m.clipsam_adapter["texts"] == ["nucleus", "vesicle"]
    res = finetune(_model("ssp"), _data(range(3)), cfg)
    assert res.split["kind"] == "crop" and res.steps == 6 and res.best_step == 6
    assert {n[:4] for n in res.split["train"]} == {n[:4] for n in res.split["val"]} == {"img0", "img1", "img2"}
    # 4 images: one held out whole, 3 train; no check improves by 0.5, so it stops after 2 and keeps the start
    res = finetune(_model("ssp"), _data(range(4)), cfg)
    assert res.split["kind"] == "examples" and len(res.split["val"]) == 2  # one image, two concepts
    assert res.steps == 2 and res.best_step == 0 and res.best_metrics == res.start_metrics


def test_autocast_choice_and_bf16_steps_track_fp32(monkeypatch):
    m = _model()
    assert train_autocast_dtype(m, False) is None and train_autocast_dtype(m, True) is torch.bfloat16
    assert train_autocast_dtype(m) is (torch.bfloat16 if cpu_has_fast_bf16() else None)  # default: native bf16 only
    monkeypatch.setenv("NAPARI_CLIPSAM_FAST", "0")  # the fast-path switch turns it off too
    assert train_autocast_dtype(m) is None
    monkeypatch.delenv("NAPARI_CLIPSAM_FAST")
    runs = {ac: finetune(_model("ssp"), _data(range(2)), _cfg(steps=4, mode="both", autocast=ac, val_every=2))
            for ac in (False, True)}
    assert runs[False].autocast is None and runs[True].autocast == "bfloat16"
    assert runs[False].losses != runs[True].losses  # the bf16 run did run in bf16
    np.testing.assert_allclose(runs[True].losses, runs[False].losses, rtol=5e-3)  # same training, bf16 rounding


def test_training_runs_on_the_fast_path_and_hands_the_model_back_as_given(monkeypatch):
    """A model with no fast-path decision (load_model in a notebook, the CLI) trains with the fast
    path's attention and MLP modules and comes back with segment-anything's; one that has a
    decision keeps it; NAPARI_CLIPSAM_FAST=0 trains on stock modules."""
    from segment_anything.modeling.common import MLPBlock
    from segment_anything.modeling.image_encoder import Attention

    from napari_clipsam.models.fast import FastEncoderAttention, enable_fast_path, fast_path_info

    def run(m):
        seen = set()

        def cb(p):
            if p.phase in ("train", "validate") and p.step > 0:
                seen.update(type(mod) for mod in m.sam.image_encoder.modules())

        finetune(m, _data(range(2)), _cfg(steps=2, mode="both"), callback=cb)
        return seen

    m = _model("adapter")
    seen = run(m)
    assert FastEncoderAttention in seen and Attention not in seen
    after = {type(mod) for mod in m.modules()}
    assert fast_path_info(m) is None and Attention in after and MLPBlock in after
    assert not [t for t in after if t.__module__ == "napari_clipsam.models.fast"]

    m = _model("adapter")
    enable_fast_path(m)
    assert FastEncoderAttention in run(m) and fast_path_info(m) is not None
    assert FastEncoderAttention in {type(mod) for mod in m.modules()}

    monkeypatch.setenv("NAPARI_CLIPSAM_FAST", "0")
    m = _model("adapter")
    seen = run(m)
    assert Attention in seen and FastEncoderAttention not in seen


@pytest.mark.parametrize("change, match", [
    (dict(steps=2.5), "steps must be an integer"), (dict(batch_size=0), "batch_size"),
    (dict(lr=float("inf")), "lr"), (dict(lr=0), "lr"), (dict(grad_clip=0), "grad_clip"),
    (dict(grad_clip=float("nan")), "grad_clip"), (dict(lora_rank=-1), "lora_rank"), (dict(lora_alpha=0), "lora_alpha"),
    (dict(lora_dropout=1.0), "lora_dropout"), (dict(lora_dropout=-0.1), "lora_dropout"), (dict(warmup=-0.5), "warmup"),
    (dict(warmup=float("nan")), "warmup"), (dict(seed=-1), "seed"), (dict(seed=None), "seed"),
    (dict(crop_size=4), "crop_size"), (dict(weight_decay=-1), "weight_decay"), (dict(patience=-1), "patience"),
    (dict(min_delta=-1), "min_delta"), (dict(val_every=-1), "val_every"), (dict(intensity_jitter=float("nan")), "intensity_jitter"),
    (dict(autocast="yes"), "autocast"), (dict(val_fraction=1), "val_fraction"),
    (dict(loss=LossWeights(focal=0, dice=0, iou=0)), "all 0"), (dict(loss=LossWeights(focal_gamma=float("nan"))), "focal_gamma"),
    (dict(loss=LossWeights(dice=-1)), "loss.dice"),
])
def test_every_setting_out_of_range_is_refused_before_training(change, match):
    with pytest.raises(ValueError, match=match):
        FineTuneConfig(**change).check()


def test_prompt_settings_and_bad_calls_are_refused_before_training():
    from dataclasses import replace

    from napari_clipsam.training.prompts import PromptSettings

    for change, match in [(dict(max_points=0), "max_points"), (dict(seed_depth=2), "seed_depth"),
                          (dict(seed_weight=-1), "seed_weight"), (dict(p_box=1.5), "p_box")]:
        with pytest.raises(ValueError, match=match):
            FineTuneConfig(prompts=replace(PromptSettings(), **change)).check()
    from napari_clipsam.training.lora import resolve_lora_blocks

    with pytest.raises(ValueError, match="lora_blocks=1.5"):
        resolve_lora_blocks(1.5, 12)
    model = _model()
    img = np.zeros((64, 64), np.float32)
    lab = np.zeros((64, 64), np.uint16)
    img[20:30, 20:30], lab[20:30, 20:30] = 1, 1
    ex = examples_from_arrays(img, lab, "nucleus")
    with pytest.raises(TypeError, match="threading.Event"):
        finetune(model, ex, FineTuneConfig(steps=1), cancel=True)
    with pytest.raises(ValueError, match="mode='bogus'"):
        evaluate(model, ex, "bogus")
