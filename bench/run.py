"""Side-by-side speed benchmark: stock segment-anything vs napari-clipsam, one process.

Usage::

    python bench/run.py            # full run at official sizes (tens of minutes on 2 cores)
    python bench/run.py --quick    # reduced set, a few minutes
    python bench/run.py --rows 1,2 --threads 2 --out bench/results.json

Models: SAM vit_b + CLIP ViT-B-16 with random weights (speed does not depend on the values; no
download). The relative-position tables, zero in a fresh SAM, are filled with N(0, 0.1) so the
bias path carries real numbers. Prints a table and writes ``bench/results.json`` (rows + machine
info: CPU model, cores, flags, torch version, threads, load average before/after).

Rows (see the issue "Fast path and benchmark suite"):

Stock runs twice: in this process (after napari-clipsam's fast path has set glibc's allocator for
the whole process, which speeds stock up too) and, with row 4, in a process of its own that
imports nothing of napari-clipsam (bench/stock_sam.py: ``set_image``, ``predict`` and the
automatic mask generator as a user's stock script runs them; rows 1, 2 and 4 "own process").

1. image embedding at 1024²: stock ``SamPredictor.set_image`` vs our SAM encoder on the fast
   path (SDPA fp32, and bf16 autocast where the CPU has native bf16; forced bf16 is measured too
   with its accuracy: embedding relative L2 and mask IoU vs fp32) vs our full ``encode`` per
   strategy. Where the CPU has native bf16: the floor, the encoder's FLOPs (counted by torch's
   ``FlopCounterMode``: 972 G for vit_b at 1024²) at this machine's 4096² bf16 matmul rate
   (computed, not timed); and the bf16 encoder once more with its attention as SDPA's flash
   kernel with an additive mask (``fast.explicit_scores`` off: what the explicit bf16 products
   give). Where the fast path runs the encoder's linear layers through oneDNN (models/onednn.py),
   the fp32 and bf16 encoder once more with torch's linear layers (``NAPARI_CLIPSAM_ONEDNN=0``). At 512²: stock ``set_image`` always resizes to 1024 (its only
   input size), so its 512² cost is its 1024² cost; ours runs a 512-input config of the same
   vit_b (32×32 grid).
2. click → mask: stock ``SamPredictor.predict`` (one point, defaults) vs our ``Segmenter.predict``
   (one point, mask at image size) and our bare ``ClipSam.decode`` (low-res logits).
3. new text on an embedded image: ``ClipSam.condition`` with a never-seen text, per strategy,
   relative to that strategy's full encode, timed alternately with it.
4. text → instance labels on an embedded 1024² image with ~100 nuclei: ``Segmenter.segment_text`` (both seeds modes)
   vs ``SamAutomaticMaskGenerator`` (32×32 points, defaults). Random weights give arbitrary
   semantic maps, so the text's semantic map is replaced by the image's ground-truth nucleus mask
   (what a trained model would give): the pipeline (thresholds, region splitting, one batched
   decode, NMS, painting) then decodes ~100 objects. AMG's time (the least of two runs, as its
   first run in a process is slower; ours: the least of three after a warm-up) is shown with and
   without its own embedding (``generate`` always embeds), and micro-sam's
   ``AutomaticMaskGenerator`` on the same weights (saved as an official checkpoint) and image,
   given its own embedding (one run; ``--micro-sam-python``; see bench/microsam_amg.py).
5. two-stage text pipeline peer, same image and same regions: CLIP similarity map → boxes →
   stock ``set_image`` + ``predict`` per box, vs ours: ``set_image`` + ``segment_text``.
6. fine-tuning step time and peak RSS (each variant in its own subprocess): LoRA on the last half
   (the default), 4 and 2 of the blocks, each with and without the frozen-prefix cache (fp32, and
   the default and the last 2 with bf16 autocast where the CPU has native bf16), and full fine-tuning of the
   image encoder.
7. 3D: per-slice cost of point propagation through a volume once its slices are embedded.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

sys.path.insert(0, str(HERE))

from napari_clipsam.models import fast  # noqa: E402
from napari_clipsam.models.clipsam import ClipSam, ClipSamConfig, Prompts  # noqa: E402
from napari_clipsam.models.sam_parts import SamConfig  # noqa: E402
from stock_sam import GENERATE_RUNS, summary, timeit  # noqa: E402  (beside this script; imports nothing of napari-clipsam)

TEXT = "nucleus"
SMOKE = bool(os.environ.get("BENCH_SMOKE"))  # tiny models: checks the code paths in seconds, numbers meaningless


def model_config(img_size: int, strategy: str, options: dict | None = None) -> ClipSamConfig:
    """vit_b + ViT-B-16 at ``img_size`` (or the tiny test config under BENCH_SMOKE)."""
    if SMOKE:
        from napari_clipsam.models.clipsam import tiny_config

        options = dict(options or {})
        if isinstance(options.get("blocks"), int):
            options["blocks"] = 1
        return tiny_config(strategy, **options)
    return ClipSamConfig(sam=SamConfig(img_size=img_size), strategy=strategy, strategy_options=options or {})


# ---------------------------------------------------------------------------------------------- helpers
def timeit_pair(fa, fb, repeat: int = 3, warmup: int = 1) -> tuple[dict, dict]:
    """Time ``fa`` and ``fb`` alternately (warmup + repeat times each) → two :func:`timeit` dicts."""
    for _ in range(warmup):
        fa()
        fb()
    ta, tb = [], []
    for _ in range(repeat):
        for fn, ts in ((fa, ta), (fb, tb)):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
    return summary(ta), summary(tb)


def full_encode(model: ClipSam, x: torch.Tensor):
    """A call that runs ``model.encode`` on ``x`` with the text ``TEXT`` on the fast path (to time)."""
    def run():
        with fast.fast_inference(model):
            model.encode(x, [TEXT])
    return run


def matmul_gflops(dtype: torch.dtype, n: int = 4096, repeat: int = 3) -> float:
    """GFLOP/s of one n × n matrix product in ``dtype`` (best of ``repeat`` after a warm-up), with
    the threads set: the machine's rate, so that runs on different machines can be compared."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    with torch.inference_mode():
        best = timeit(lambda: a @ b, repeat=repeat, warmup=1)["min"]
    return 2 * n**3 / best / 1e9


def machine_info(threads: int) -> dict:
    import psutil

    flags = fast.cpu_flags()
    try:
        commit = subprocess.run(["git", "-C", str(HERE.parent), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {
        "cpu": fast.cpu_model(),
        "cpu_id": fast.cpu_id(),
        "matmul_gflops": {"fp32": round(matmul_gflops(torch.float32)),
                          "bf16": round(matmul_gflops(torch.bfloat16)) if fast.cpu_has_fast_bf16() else None},
        "logical_cores": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "flags": sorted(f for f in flags if f.startswith(("avx", "amx", "fma", "f16c"))),
        "native_bf16": fast.cpu_has_fast_bf16(),  # the fast path chooses bf16 here (native and measured faster); key name kept
        "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": threads,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": commit,
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
    }


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a & b).sum()) / max(float((a | b).sum()), 1.0)


def give_rel_pos(sam) -> None:
    from segment_anything.modeling.image_encoder import Attention

    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in sam.modules():
            if isinstance(m, Attention) and m.use_rel_pos:
                m.rel_pos_h.copy_(torch.randn(m.rel_pos_h.shape, generator=g) * 0.1)
                m.rel_pos_w.copy_(torch.randn(m.rel_pos_w.shape, generator=g) * 0.1)


class Models:
    """Shared SAM + CLIP, one ClipSam per strategy (sharing them), a stock copy of SAM."""

    STRATEGIES = {
        "adapter-all": ("adapter", {"blocks": "all"}),
        "adapter-last-4": ("adapter", {"blocks": 4}),
        "ssp": ("ssp", {}),
        "pseudo": ("pseudo", {}),
    }

    def __init__(self, img_size: int = 1024, strategies: tuple[str, ...] | None = None):
        torch.manual_seed(0)
        base = ClipSam(model_config(img_size, "ssp"))
        give_rel_pos(base.sam)
        self.stock_sam = copy.deepcopy(base.sam).eval()  # never patched
        clip = (base.semantics.clip, base.semantics.tokenizer)
        self.by_strategy: dict[str, ClipSam] = {}
        for name in strategies or tuple(self.STRATEGIES):
            strat, opts = self.STRATEGIES[name]
            m = base if name == "ssp" else ClipSam(model_config(img_size, strat, opts), sam=base.sam, clip=clip)
            self.by_strategy[name] = m.eval()
        self.ssp = base
        # The fast path patches the shared SAM once; every strategy model sees it.
        self.info = fast.enable_fast_path(base)
        for m in self.by_strategy.values():
            setattr(m, fast._INFO_ATTR, self.info)


def test_image(size: int = 1024, seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """(H, W) uint16 synthetic fluorescence image with 160 nuclei (~70 touching groups at 1024²), and its nucleus mask."""
    from napari_clipsam.data import make_image

    s = make_image(seed, size, concepts=("nucleus",), counts={"nucleus": 160})
    return s.image, s.semantic_mask("nucleus")


def to_rgb_uint8(image01: np.ndarray) -> np.ndarray:
    return np.round(np.clip(image01, 0, 1) * 255).astype(np.uint8)


def forced_bf16() -> str:
    """Why row 1's bf16 case is forced on a CPU where the fast path does not choose bf16."""
    if fast.cpu_has_native_bf16():
        return f"forced; native here, but bf16 matmuls run {fast.bf16_matmul_speedup():.2f}× fp32's rate"
    return "forced; emulated on this CPU"


# ---------------------------------------------------------------------------------------------- rows
def row_embedding(models: Models, image01: np.ndarray, quick: bool, res: dict) -> None:
    from segment_anything import SamPredictor

    from napari_clipsam.engine.preprocess import to_model_input

    rows = res["rows"]
    rgb = to_rgb_uint8(image01)
    pred = SamPredictor(models.stock_sam)
    rep = 1 if quick else 3
    stock = timeit(lambda: pred.set_image(rgb), repeat=rep, warmup=0 if quick else 1)
    res["stock_set_image_s"] = stock["min"]
    rows.append({"row": 1, "case": "stock SamPredictor.set_image (fp32)", "size": "1024²", "s": stock, "vs_stock": 1.0})

    x = to_model_input(image01, models.ssp.img_size)[0][None]
    sam = models.ssp.sam
    ref = pred.features  # stock fp32 embedding of the same image (same preprocessing up to rounding)
    with torch.inference_mode():
        x255 = (x * 255.0).round() / 255.0  # stock sees uint8
        xin = (x255 * 255.0 - sam.pixel_mean) / sam.pixel_std
        t = timeit(lambda: sam.image_encoder(xin), repeat=rep, warmup=0 if quick else 1)
        ours = sam.image_encoder(xin)
        t_torch = time_with_torch_linear(lambda: sam.image_encoder(xin), rep, models.info)
    rows.append({"row": 1, "case": "ours: SAM encoder, SDPA fp32", "size": "1024²", "s": t,
                 "vs_stock": t["min"] / stock["min"],
                 "note": f"rel L2 vs stock {rel_l2(ours, ref):.1e}"})
    res["fp32_fast_rel_l2"] = rel_l2(ours, ref)
    res["fast_embedding"] = {"s": t["min"], "dtype": "fp32"}  # the fast path's own choice (bf16 below where native)
    if t_torch is not None:
        rows.append({"row": 1, "case": "ours: SAM encoder, SDPA fp32, torch's linear layers (NAPARI_CLIPSAM_ONEDNN=0)",
                     "size": "1024²", "s": t_torch, "vs_stock": t_torch["min"] / stock["min"]})

    # bf16: where the fast path chooses it, else forced (emulated, or native but slower) for the accuracy numbers.
    native = models.info.autocast_dtype is not None
    if native or not quick:
        fast.enable_fast_path(models.ssp, bf16=True)
        try:
            with fast.fast_inference(models.ssp):
                tb = timeit(lambda: sam.image_encoder(xin), repeat=rep if native else 1, warmup=1 if native and not quick else 0)
                emb_bf16 = sam.image_encoder(xin)
                tb_torch = time_with_torch_linear(lambda: sam.image_encoder(xin), rep, models.info) if native else None
                tb_flash = time_with_flash_attention(lambda: sam.image_encoder(xin), rep) if native else None
            acc = mask_agreement(sam, ref, emb_bf16)
        finally:
            models.info = fast.enable_fast_path(models.ssp)
        res["bf16_embedding_s"] = tb["min"]
        if native:
            res["fast_embedding"] = {"s": tb["min"], "dtype": "bf16"}
        res["bf16_rel_l2"] = rel_l2(emb_bf16, ref)
        res["bf16_mask_iou_min"] = acc["min"]
        rows.append({"row": 1, "case": "ours: SAM encoder, fast path, bf16 autocast" + ("" if native else f" ({forced_bf16()})"),
                     "size": "1024²", "s": tb, "vs_stock": tb["min"] / stock["min"],
                     "note": f"rel L2 {res['bf16_rel_l2']:.4f}, mask IoU min {acc['min']:.3f} / mean {acc['mean']:.3f} over {acc['n']} masks"})
        if tb_torch is not None:
            rows.append({"row": 1, "case": "ours: SAM encoder, fast path, bf16 autocast, torch's linear layers "
                         "(NAPARI_CLIPSAM_ONEDNN=0)", "size": "1024²", "s": tb_torch,
                         "vs_stock": tb_torch["min"] / stock["min"]})
        if tb_flash is not None:
            rows.append({"row": 1, "case": "ours: SAM encoder, bf16 autocast, attention as SDPA's flash kernel + mask",
                         "size": "1024²", "s": tb_flash, "vs_stock": tb_flash["min"] / stock["min"],
                         "note": "fast.explicit_scores off (the fast path before the explicit bf16 products)"})
        rate = res["machine"]["matmul_gflops"]["bf16"]
        if native and rate:
            flops = encoder_flops(sam.image_encoder)
            floor = flops / (rate * 1e9)
            res["bf16_flop_floor_s"] = floor
            rows.append({"row": 1, "case": "floor: the encoder's FLOPs at this machine's 4096² bf16 matmul rate",
                         "size": "1024²", "s": {"min": floor}, "vs_stock": floor / stock["min"],
                         "note": f"{flops / 1e9:.0f} GFLOP / {rate} GFLOP/s, computed; ours bf16 = {tb['min'] / floor:.2f} × floor"})

    full = {}
    for name, m in models.by_strategy.items():
        t = timeit(full_encode(m, x), repeat=1 if quick else 2, warmup=0 if quick else 1)
        full[name] = t["min"]
        rows.append({"row": 1, "case": f"ours: encode (SAM + CLIP + text), {name}", "size": "1024²", "s": t,
                     "vs_stock": t["min"] / stock["min"]})
    res["full_encode_s"] = full


def time_with_torch_linear(encode, repeat: int, info: fast.FastPathInfo) -> dict | None:
    """Time ``encode`` with the encoder's linear layers left to torch (``NAPARI_CLIPSAM_ONEDNN=0``),
    to show what oneDNN's fused linear gives; None where the fast path does not use it."""
    if not info.onednn_linear:
        return None
    with mock.patch.dict(os.environ, {"NAPARI_CLIPSAM_ONEDNN": "0"}):
        return timeit(encode, repeat=repeat, warmup=1)


def time_with_flash_attention(encode, repeat: int) -> dict:
    """Time ``encode`` with the encoder's bf16 attention left to SDPA's flash kernel and an
    additive mask (``fast.explicit_scores`` off), to show what the explicit products give."""
    with mock.patch.object(fast, "explicit_scores", lambda *args: False):
        return timeit(encode, repeat=repeat, warmup=1)


def encoder_flops(encoder: torch.nn.Module) -> int:
    """FLOPs of one forward of (a copy of) ``encoder`` on one image, counted by torch's
    ``FlopCounterMode`` on the meta device (no arithmetic runs)."""
    from torch.utils.flop_counter import FlopCounterMode

    meta = copy.deepcopy(encoder).to("meta")
    fast.disable_fast_path(meta)  # count stock's operations: SDPA and oneDNN ops count differently
    x = torch.empty(1, 3, encoder.img_size, encoder.img_size, device="meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        meta(x)
    return counter.get_total_flops()


def mask_agreement(sam, emb_ref: torch.Tensor, emb_new: torch.Tensor, n: int = 16) -> dict:
    """IoU of low-res masks decoded from two embeddings (fp32 decoder) at n random points."""
    g = torch.Generator().manual_seed(0)
    pts = torch.rand(n, 1, 2, generator=g) * sam.image_encoder.img_size
    lab = torch.ones(n, 1, dtype=torch.long)
    out = []
    with torch.inference_mode():
        for emb in (emb_ref, emb_new):
            sparse, dense = sam.prompt_encoder(points=(pts, lab), boxes=None, masks=None)
            low, _ = sam.mask_decoder(emb.float(), sam.prompt_encoder.get_dense_pe(), sparse, dense, multimask_output=True)
            out.append(low)
    ious = []
    for i in range(n):
        for j in range(out[0].shape[1]):
            ious.append(iou(out[0][i, j] > 0, out[1][i, j] > 0))
    return {"min": min(ious), "mean": float(np.mean(ious)), "n": len(ious)}


def row_embedding_512(quick: bool, res: dict) -> None:
    from napari_clipsam.engine.preprocess import to_model_input

    img, _ = test_image(512)
    from napari_clipsam.engine.preprocess import normalize_image

    image01 = normalize_image(img)
    m512 = Models(512, strategies=("ssp",) if quick else None)
    x = to_model_input(image01, m512.ssp.img_size)[0][None]
    sam = m512.ssp.sam
    stock_s = res.get("stock_set_image_s")
    rows = res["rows"]
    rows.append({"row": 1, "case": "stock SamPredictor.set_image (resizes to 1024)", "size": "512²",
                 "s": {"min": stock_s, "median": stock_s, "n": 0} if stock_s else None, "vs_stock": 1.0,
                 "note": "same work as at 1024²"})
    with torch.inference_mode():
        xin = (x * 255.0 - sam.pixel_mean) / sam.pixel_std
        t = timeit(lambda: sam.image_encoder(xin), repeat=2, warmup=1)
    rows.append({"row": 1, "case": "ours: SAM encoder (512-input vit_b), SDPA fp32", "size": "512²", "s": t,
                 "vs_stock": t["min"] / stock_s if stock_s else None})
    if quick and m512.info.autocast_dtype is None:
        fast.enable_fast_path(m512.ssp, bf16=True)
        with torch.inference_mode():
            ref = m512.stock_sam.image_encoder(xin)
        with fast.fast_inference(m512.ssp):
            tb = timeit(lambda: sam.image_encoder(xin), repeat=1, warmup=0)
            emb = sam.image_encoder(xin)
        acc = mask_agreement(m512.stock_sam, ref, emb)
        res["bf16_rel_l2_512"] = rel_l2(emb, ref)
        res["bf16_mask_iou_min_512"] = acc["min"]
        rows.append({"row": 1, "case": f"ours: SAM encoder (512), bf16 ({forced_bf16()})", "size": "512²",
                     "s": tb, "vs_stock": tb["min"] / stock_s if stock_s else None,
                     "note": f"rel L2 {rel_l2(emb, ref):.4f}, mask IoU min {acc['min']:.3f}"})
        fast.enable_fast_path(m512.ssp)
    for name, m in m512.by_strategy.items():
        t = timeit(full_encode(m, x), repeat=1 if quick else 2, warmup=1)
        rows.append({"row": 1, "case": f"ours: encode, {name}", "size": "512²", "s": t,
                     "vs_stock": t["min"] / stock_s if stock_s else None})


def row_click(models: Models, image01: np.ndarray, quick: bool, res: dict) -> None:
    from segment_anything import SamPredictor

    from napari_clipsam.engine.segmenter import Segmenter

    rows = res["rows"]
    h, w = image01.shape[:2]
    pred = SamPredictor(models.stock_sam)
    pred.set_image(to_rgb_uint8(image01))
    pt = np.array([[w * 0.4, h * 0.55]], np.float32)
    rep = 10 if quick else 30
    stock = timeit(lambda: pred.predict(point_coords=pt, point_labels=np.array([1]), multimask_output=True),
                   repeat=rep, warmup=3)
    res["stock_predict_s"] = stock["min"]
    rows.append({"row": 2, "case": "stock SamPredictor.predict (1 point, 3 masks, image size)", "size": "1024²",
                 "ms": stock, "vs_stock": 1.0})
    stock1 = timeit(lambda: pred.predict(point_coords=pt, point_labels=np.array([1]), multimask_output=False),
                    repeat=rep, warmup=3)
    rows.append({"row": 2, "case": "stock SamPredictor.predict (1 point, 1 mask)", "size": "1024²",
                 "ms": stock1, "vs_stock": stock1["min"] / stock["min"]})

    m = models.ssp
    seg = Segmenter(m, tile_size=0)
    seg.set_normalized(image01)
    ours = timeit(lambda: seg.predict(points=pt, labels=[1]), repeat=rep, warmup=3)
    rows.append({"row": 2, "case": "ours: Segmenter.predict (1 point, mask at image size)", "size": "1024²",
                 "ms": ours, "vs_stock": ours["min"] / stock["min"]})
    from napari_clipsam.engine.preprocess import to_model_input

    x = to_model_input(image01, m.img_size)[0][None]
    with fast.fast_inference(m):
        enc = m.condition(m.embed_image(x), None)
    p = Prompts(torch.zeros(1), points=torch.from_numpy(pt)[None], labels=torch.ones(1, 1))
    with fast.fast_inference(m):  # bf16 where the fast path chose it, as Segmenter.predict decodes
        dec = timeit(lambda: m.decode(enc, p), repeat=rep, warmup=3)
    res["decode_s"] = dec["min"]
    rows.append({"row": 2, "case": "ours: ClipSam.decode only (low-res logits)", "size": "1024²", "ms": dec,
                 "vs_stock": dec["min"] / stock["min"]})
    fast.disable_fast_path(m)
    with torch.inference_mode():
        dec_ref = timeit(lambda: m.decode(enc, p), repeat=rep, warmup=3)
    models.info = fast.enable_fast_path(m)
    rows.append({"row": 2, "case": "ours: ClipSam.decode, fast path off", "size": "1024²", "ms": dec_ref,
                 "vs_stock": dec_ref["min"] / stock["min"]})


def row_new_text(models: Models, image01: np.ndarray, quick: bool, res: dict) -> None:
    from napari_clipsam.engine.preprocess import to_model_input

    rows = res["rows"]
    full = res.get("full_encode_s", {})
    x = to_model_input(image01, models.ssp.img_size)[0][None]
    for name, m in models.by_strategy.items():
        with fast.fast_inference(m):
            feats = m.embed_image(x)
        counter = iter(range(10**6))

        def cond(m=m, feats=feats):
            with fast.fast_inference(m):
                m.condition(feats, [f"cell type {next(counter)}"])  # never-seen text: CLIP text tower runs

        # The reference full encode is timed here, alternating with the re-query: on a noisy
        # machine row 1's encode, minutes earlier, can run at another speed.
        t_full, t = timeit_pair(full_encode(m, x), cond, repeat=2 if quick else 3)
        rows.append({"row": 3, "case": f"new text on embedded image, {name}", "size": "1024²", "s": t,
                     "vs_full_embedding": t["min"] / t_full["min"],
                     "note": f"full encode timed alongside: {t_full['min']:.2f} s"
                             + (f" (row 1: {full[name]:.2f} s)" if name in full else "")})


def _controlled(model: ClipSam, mask: np.ndarray):
    """Replace the model's text → map with the ground-truth mask (logits ±8 at mask resolution)."""
    import torch.nn.functional as F

    m = model.mask_size
    t = torch.from_numpy(mask.astype(np.float32))[None, None]
    low = F.interpolate(t, size=(m, m), mode="area")
    logits = (low * 2 - 1) * 8.0

    def semantic_logits(enc, logits=logits):
        return logits.expand(enc.embeddings.shape[0], -1, -1, -1).to(enc.embeddings.device)

    model.semantic_logits = semantic_logits  # instance attribute: this bench only


def row_text_instances(models: Models, image01: np.ndarray, mask: np.ndarray, quick: bool, res: dict) -> None:
    from segment_anything import SamAutomaticMaskGenerator

    from napari_clipsam.engine.segmenter import Segmenter

    rows = res["rows"]
    m = copy.copy(models.ssp)  # shallow: same modules, own semantic_logits override
    _controlled(m, mask)
    seg = Segmenter(m, tile_size=0)
    seg.set_normalized(image01)
    counter = iter(range(10**6))
    from scipy import ndimage

    from napari_clipsam.engine.instances import TEXT_THRESHOLD
    from napari_clipsam.models.conditioning import grid_seeds, pseudo_prompts

    low = torch.sigmoid(m.semantic_logits(seg._encoded(seg._views[0], TEXT)))[0, 0].numpy()
    n_true = ndimage.label(mask)[1]
    n_prompts = {"grid": len(grid_seeds(low, threshold=TEXT_THRESHOLD)),  # as segment_text at 1024²
                 "regions": len(pseudo_prompts(low, threshold=TEXT_THRESHOLD, min_area=1))}
    for seeds in ("grid", "regions"):
        out = {}

        def run(seeds=seeds, out=out):
            with fast.fast_inference(m, autocast=False):
                out["r"] = seg.segment_text(f"nucleus {next(counter)}", min_score=0.0, min_support=0.0,
                                             seeds=seeds)  # random weights: keep any mask

        t = timeit(run, repeat=2 if quick else 3, warmup=1)
        n = len(out["r"])
        what = "grid points" if seeds == "grid" else "regions"
        rows.append({"row": 4, "case": f"ours: Segmenter.segment_text(seeds={seeds!r}) on embedded image (ssp, new text)",
                     "size": "1024²", "s": t,
                     "note": f"{n_prompts[seeds]} {what} decoded → {n} instances "
                             f"(ground truth: 160 nuclei in {n_true} connected groups)"})
        res[f"text_instances_{seeds}_s"] = t["min"]
        res[f"text_instances_{seeds}_n"] = n

    side = 16 if quick else 32
    amg = SamAutomaticMaskGenerator(models.stock_sam, points_per_side=side)
    rgb = to_rgb_uint8(image01)
    outa = {}
    ta = timeit(lambda: outa.__setitem__("m", amg.generate(rgb)), repeat=1 if quick else GENERATE_RUNS, warmup=0)
    emb = res.get("stock_set_image_s")
    if emb is None:  # row 1 not run: time stock's embedding here, once, so that it can be subtracted
        from segment_anything import SamPredictor

        emb = res["stock_set_image_s"] = timeit(lambda: SamPredictor(models.stock_sam).set_image(rgb), repeat=1, warmup=0)["min"]
    post = ta["min"] - emb
    rows.append({"row": 4, "case": f"stock SamAutomaticMaskGenerator.generate ({side}×{side} points)", "size": "1024²", "s": ta,
                 "note": f"{len(outa['m'])} masks kept (random weights: most fail its IoU/stability filters)"})
    rows.append({"row": 4, "case": "stock AMG without its embedding (generate − set_image)", "size": "1024²",
                 "s": {"min": post, "median": post, "n": 1},
                 "ours_speedup": ours_faster(post, res)})
    row_microsam(models, rgb, side, res)


def ours_faster(seconds: float, res: dict) -> dict:
    """How many times faster than ``seconds`` each ``segment_text`` seeds mode of row 4 was."""
    return {k: seconds / res[f"text_instances_{k}_s"] for k in ("grid", "regions")}


def row_microsam(models: Models, rgb: np.ndarray, side: int, res: dict) -> None:
    """micro-sam's ``AutomaticMaskGenerator`` on the same image and the same SAM weights (saved
    as an official checkpoint), in the Python given by ``--micro-sam-python`` (micro-sam pins its
    own segment-anything fork, so it gets an environment of its own; see bench/microsam_amg.py)."""
    import tempfile

    python = res.get("micro_sam_python")
    case = f"micro-sam AutomaticMaskGenerator ({side}×{side} points) without its embedding"
    if not python:
        res["rows"].append({"row": 4, "case": case, "size": "1024²", "s": None,
                            "note": "not run: pass --micro-sam-python (a Python with micro-sam installed)"})
        return
    with tempfile.TemporaryDirectory() as tmp:
        ckpt, img = Path(tmp) / "sam_vit_b_random.pth", Path(tmp) / "image.npy"
        torch.save(models.stock_sam.state_dict(), ckpt)
        np.save(img, rgb)  # (H, W, 3) uint8, as stock's generator gets it
        proc = subprocess.run([python, str(HERE / "microsam_amg.py"), str(ckpt), str(img), str(side),
                               str(torch.get_num_threads())], capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1][:200]
        res["rows"].append({"row": 4, "case": case, "size": "1024²", "s": None, "note": f"failed: {tail}"})
        return
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    t = out["amg_s"]
    res["rows"].append({"row": 4, "case": case, "size": "1024²", "s": {"min": t, "median": t, "n": 1},
                        "ours_speedup": ours_faster(t, res),
                        "note": f"micro-sam {out['micro_sam']}, its embedding {out['embedding_s']:.1f} s, "
                                f"{out['objects']} objects (random weights)"})


def row_stock_process(models: Models, image01: np.ndarray, quick: bool, res: dict) -> None:
    """Stock ``set_image``, ``predict`` and ``SamAutomaticMaskGenerator`` on the same weights (saved
    as an official checkpoint) and image in a process of their own (bench/stock_sam.py): glibc's
    allocator defaults, as a user's stock script runs, unlike the in-process stock rows, which
    share the allocator settings napari-clipsam's fast path makes for the whole process."""
    import tempfile

    if SMOKE:
        res["rows"].append({"row": 4, "case": "stock, own process", "size": "1024²", "s": None,
                            "note": "not run: tiny models (BENCH_SMOKE), not vit_b"})
        return
    side, repeat = (16, 1) if quick else (32, 3)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt, img = Path(tmp) / "sam_vit_b_random.pth", Path(tmp) / "image.npy"
        torch.save(models.stock_sam.state_dict(), ckpt)
        np.save(img, to_rgb_uint8(image01))
        proc = subprocess.run([sys.executable, str(HERE / "stock_sam.py"), str(ckpt), str(img), str(side),
                               str(torch.get_num_threads()), str(repeat)], capture_output=True, text=True,
                              env={**os.environ, "NAPARI_CLIPSAM_MALLOC": "0"})
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1][:200]
        res["rows"].append({"row": 4, "case": "stock, own process", "size": "1024²", "s": None, "note": f"failed: {tail}"})
        return
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    res["stock_own_process"] = out
    emb = out["set_image_s"]
    own = "own process, glibc allocator defaults"
    fe = res.get("fast_embedding")
    note = f"ours (SAM encoder, fast path: {fe['dtype']}) {fe['s'] / emb['min']:.2f}× of it" if fe else ""
    res["rows"].append({"row": 1, "case": f"stock SamPredictor.set_image (fp32), {own}", "size": "1024²", "s": emb,
                        "vs_stock": emb["min"] / res["stock_set_image_s"] if res.get("stock_set_image_s") else None,
                        "note": note})
    pred = out["predict_s"]
    note = f"ours (ClipSam.decode) {res['decode_s'] / pred['min']:.2f}× of it" if res.get("decode_s") else ""
    res["rows"].append({"row": 2, "case": f"stock SamPredictor.predict (1 point, 3 masks), {own}", "size": "1024²",
                        "ms": pred, "vs_stock": pred["min"] / res["stock_predict_s"] if res.get("stock_predict_s") else None,
                        "note": note})
    post = out["generate_s"] - emb["min"]
    row = {"row": 4, "case": f"stock AMG ({side}×{side} points) without its embedding, {own}", "size": "1024²",
           "s": {"min": post, "median": post, "n": 1},
           "note": f"generate {out['generate_s']:.1f} s (least of {out['generate_runs_s']['n']}), {out['masks']} masks kept"}
    if "text_instances_grid_s" in res:
        row["ours_speedup"] = ours_faster(post, res)
    res["rows"].append(row)


def row_two_stage(models: Models, image01: np.ndarray, mask: np.ndarray, quick: bool, res: dict) -> None:
    from scipy import ndimage
    from segment_anything import SamPredictor

    from napari_clipsam.engine.preprocess import to_model_input
    from napari_clipsam.engine.segmenter import Segmenter
    from napari_clipsam.models.semantics import similarity_map

    rows = res["rows"]
    m = models.ssp
    h, w = image01.shape[:2]
    rgb = to_rgb_uint8(image01)
    comp, n = ndimage.label(mask)
    boxes = [(sl[1].start, sl[0].start, sl[1].stop - 1, sl[0].stop - 1) for sl in ndimage.find_objects(comp)]
    pred = SamPredictor(models.stock_sam)

    def peer():
        x = to_model_input(image01, 224)[0][None]
        with torch.inference_mode():
            patches = m.semantics.patch_features(x)  # CLIP dense features → similarity map
            txt = m.semantics.text_features([TEXT])
            similarity_map(patches, txt.embedding)
        # boxes: from the same stand-in map as ours (see the module docstring)
        pred.set_image(rgb)
        labels = np.zeros((h, w), np.uint32)
        for i, b in enumerate(boxes):
            mk, sc, _ = pred.predict(box=np.array(b, np.float32), multimask_output=False)
            labels[mk[0]] = i + 1
        return labels

    tp = timeit(peer, repeat=1, warmup=0)
    rows.append({"row": 5, "case": "two-stage peer: CLIP map → boxes → stock set_image + predict per box",
                 "size": "1024²", "s": tp, "note": f"{len(boxes)} boxes"})
    mc = copy.copy(m)
    _controlled(mc, mask)
    seg = Segmenter(mc, tile_size=0)

    def ours():
        seg.cache.clear()  # nothing cached: embeds the image
        with fast.fast_inference(mc):
            seg.set_normalized(image01)
        with fast.fast_inference(mc, autocast=False):
            return seg.segment_text(TEXT, min_score=0.0)

    to = timeit(ours, repeat=1, warmup=0)
    rows.append({"row": 5, "case": "ours one-stage: set_image + segment_text (ssp)", "size": "1024²", "s": to,
                 "vs_peer": to["min"] / tp["min"]})


TRAIN_VARIANTS = {  # "blocks": LoRA's blocks (LoraSettings.blocks; "half" is the default)
    "lora+cache": {"lora": True, "cache": True, "blocks": "half"},
    "lora, no cache": {"lora": True, "cache": False, "blocks": "half"},
    "lora (last 4 blocks)+cache": {"lora": True, "cache": True, "blocks": 4},
    "lora (last 4 blocks), no cache": {"lora": True, "cache": False, "blocks": 4},
    # the cache saves the forward of the frozen blocks only: the fewer LoRA blocks, the larger its gain
    "lora (last 2 blocks)+cache": {"lora": True, "cache": True, "blocks": 2},
    "lora (last 2 blocks), no cache": {"lora": True, "cache": False, "blocks": 2},
    "full fine-tuning": {"lora": False, "cache": False, "blocks": None},
    # what FineTuneConfig(autocast=None) does on CPUs with native bf16 (run only there)
    "lora+cache, bf16 autocast": {"lora": True, "cache": True, "blocks": "half", "autocast": True},
    "lora, no cache, bf16 autocast": {"lora": True, "cache": False, "blocks": "half", "autocast": True},
    "lora (last 2 blocks)+cache, bf16 autocast": {"lora": True, "cache": True, "blocks": 2, "autocast": True},
    "lora (last 2 blocks), no cache, bf16 autocast": {"lora": True, "cache": False, "blocks": 2, "autocast": True},
    # segment-anything's own modules (fast path off): how fine-tuning ran from the CLI and
    # notebooks before the twenty-sixth session; "against": the same settings on the fast path
    "lora+cache, bf16 autocast, stock modules (fast path off)": {"lora": True, "cache": True, "blocks": "half",
                                                                "autocast": True, "fast": False,
                                                                "against": "lora+cache, bf16 autocast"},
}


def peak_rss_mib() -> float:
    """This process's peak resident set (VmHWM; unlike ``ru_maxrss`` it does not carry the
    parent's peak across ``exec``)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def train_child(spec: dict) -> dict:
    """One fine-tuning variant (run in its own process): step times and peak RSS."""
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    model = ClipSam(model_config(spec["size"], "ssp"))
    fast.enable_fast_path(model, bf16=False, enabled=spec.get("fast", True))
    rss0 = peak_rss_mib()
    enc = model.sam.image_encoder
    depth = len(enc.blocks)
    if spec["lora"]:
        try:
            from napari_clipsam.training.lora import LoraSettings, attach_lora
            blocks = attach_lora(model, LoraSettings(rank=8, blocks=spec.get("blocks", "half")))
            how = "training.lora.attach_lora"
        except ImportError:
            import peft
            blocks = tuple(range(depth // 2, depth))
            peft.inject_adapter_in_model(peft.LoraConfig(r=8, lora_alpha=16, target_modules=[
                f"sam.image_encoder.blocks.{i}.attn.qkv" for i in blocks]), model)
            how = "peft.inject_adapter_in_model"
        model.requires_grad_(False)
        for n_, p in model.named_parameters():
            if "lora_" in n_ or n_.startswith(("conditioning.", "sam.mask_decoder.")):
                p.requires_grad_(True)
        k = min(blocks)
    else:
        how = "all SAM + strategy parameters"
        model.requires_grad_(True)
        model.semantics.clip.requires_grad_(False)
        k = 0
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    g = torch.Generator().manual_seed(0)
    s = model.img_size
    x = torch.rand(spec["batch"], 3, s, s, generator=g)
    target = (torch.rand(spec["batch"] * 4, 1, model.mask_size, model.mask_size, generator=g) > 0.5).float()
    pts = torch.rand(spec["batch"] * 4, 1, 2, generator=g) * s
    prompts = Prompts(torch.arange(spec["batch"]).repeat_interleave(4), points=pts, labels=torch.ones(len(pts), 1))
    cache = {}

    def features():
        if not spec["cache"] or k == 0:
            return model.embed_image(x)
        from napari_clipsam.training.finetune import features_from_cache, frozen_features

        if "frozen" not in cache:  # frozen prefix: computed once per view, reused every step
            cache["frozen"] = frozen_features(model, x, k)
        return features_from_cache(model, [cache["frozen"]], k)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=spec.get("autocast", False)):
            feats = features()
            e = model.condition(feats, [TEXT] * spec["batch"])
            logits, _ = model.decode(e, prompts)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    model.train()
    step()  # warm-up (fills the cache)
    times = []
    for _ in range(spec["steps"]):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    rss = peak_rss_mib()
    return {"step_s": {"min": min(times), "median": statistics.median(times), "n": len(times)},
            "peak_rss_mib": rss, "rss_after_build_mib": rss0, "trainable": sum(p.numel() for p in params),
            "lora_via": how, "cached_blocks": k if spec["cache"] else 0}


def row_finetune(quick: bool, threads: int, res: dict) -> None:
    size = 512 if quick else 1024
    steps = 2 if quick else 3
    base: dict = {}  # (LoRA blocks, autocast) → step time of LoRA on them without the cache
    by_name: dict = {}  # variant → step time
    for name, v in TRAIN_VARIANTS.items():
        if v.get("autocast") and not fast.cpu_has_fast_bf16():
            res["rows"].append({"row": 6, "case": f"fine-tune step, {name}", "size": f"{size}²", "s": None,
                                "note": "not run: the fast path does not choose bf16 on this CPU (fine-tuning stays fp32 here)"})
            continue
        spec = {**v, "size": size, "steps": steps, "batch": 1, "threads": threads}
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--train-child", json.dumps(spec)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            res["rows"].append({"row": 6, "case": f"fine-tune step, {name}", "size": f"{size}²", "s": None,
                                "note": "failed: " + proc.stderr.strip().splitlines()[-1][:200]})
            continue
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        by_name[name] = out["step_s"]["min"]
        if v["lora"] and not v["cache"]:
            base[v["blocks"], bool(v.get("autocast"))] = out["step_s"]["min"]
        res["rows"].append({"row": 6, "case": f"fine-tune step, {name}", "size": f"{size}²", "s": out["step_s"],
                            "blocks": v["blocks"], "autocast": bool(v.get("autocast")), "fast": v.get("fast", True),
                            "against": v.get("against"),
                            "peak_rss_mib": round(out["peak_rss_mib"]),
                            "note": f"{out['trainable'] / 1e6:.2f}M trainable, peak RSS {out['peak_rss_mib']:.0f} MiB "
                                    f"(after build {out['rss_after_build_mib']:.0f}), LoRA via {out['lora_via']}, "
                                    f"{out['cached_blocks']} cached blocks"})
    for r in res["rows"]:  # against LoRA on the same blocks and precision without the cache (full: the default LoRA)
        ref = base.get((r.get("blocks") or "half", bool(r.get("autocast"))))
        if r["row"] != 6 or not r.get("s"):
            continue
        if r.get("against"):  # stock modules: against the fast path's step, same settings
            if by_name.get(r["against"]):
                r["vs_fast_path"] = r["s"]["min"] / by_name[r["against"]]
        elif ref:
            r["vs_lora_no_cache"] = r["s"]["min"] / ref


def row_volume(models: Models, quick: bool, res: dict) -> None:
    from napari_clipsam.data import make_volume
    from napari_clipsam.engine.segmenter import Segmenter

    nz = 3 if quick else 6
    vol = make_volume(5, (nz, 256, 256), concepts=("nucleus",), counts={"nucleus": 8})
    m = models.ssp
    seg = Segmenter(m, tile_size=0)
    z = nz // 2
    ys, xs = np.nonzero(vol.labels[z])
    pt = [[float(xs[len(xs) // 2]), float(ys[len(ys) // 2])]] if len(xs) else [[128.0, 128.0]]
    kw = dict(z=z, points=pt, labels=[1], min_iou=0.0, min_score=0.0, min_area=0)
    t0 = time.perf_counter()
    with fast.fast_inference(m):
        first = seg.segment_volume(vol.image, **kw)
    cold = time.perf_counter() - t0
    with fast.fast_inference(m, autocast=False):
        t = timeit(lambda: seg.segment_volume(vol.image, **kw), repeat=2, warmup=0)
    done = int(np.isfinite(first.slice_scores).sum()) if hasattr(first, "slice_scores") else nz
    per = {k: v / max(done, 1) for k, v in t.items() if k != "n"}
    per["n"] = t["n"]
    res["rows"].append({"row": 7, "case": "3D propagation per slice, embeddings cached", "size": f"{nz}×256² (1024 input)",
                        "ms": per, "note": f"{done} slices; cold (embedding each slice) {cold / max(done, 1):.1f} s/slice"})


# ---------------------------------------------------------------------------------------------- output
def fmt_time(r: dict) -> str:
    if r.get("s"):
        return f"{r['s']['min']:.2f} s"
    if r.get("ms"):
        return f"{r['ms']['min'] * 1e3:.1f} ms"
    return "—"


def fmt_ratio(r: dict) -> str:
    for key, label in (("vs_stock", "× stock"), ("vs_full_embedding", "× full emb."), ("ours_speedup", "ours faster ×"),
                       ("vs_peer", "× peer"), ("vs_lora_no_cache", "× LoRA w/o cache"), ("vs_fast_path", "× fast path")):
        if r.get(key) is None:
            continue
        if key == "ours_speedup":  # {seeds mode: speed-up}
            return ", ".join(f"{k} {label}{v:.1f}" for k, v in r[key].items())
        return f"{r[key]:.2f} {label}"
    return ""


def print_table(res: dict) -> str:
    lines = [f"{'#':<2} {'case':<78} {'size':<16} {'time (min)':>11}  {'ratio':<22} note",
             "-" * 150]
    for r in sorted(res["rows"], key=lambda r: r["row"]):  # stable: each row's cases in the order run
        lines.append(f"{r['row']:<2} {r['case']:<78} {r.get('size', ''):<16} {fmt_time(r):>11}  {fmt_ratio(r):<22} {r.get('note', '')}")
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="reduced set (a few minutes)")
    ap.add_argument("--rows", default="1,2,3,4,5,6,7", help="comma-separated row numbers")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(HERE / "results.json"))
    ap.add_argument("--micro-sam-python", default=os.environ.get("MICRO_SAM_PYTHON"),
                    help="a Python with micro-sam installed, for row 4 (default: $MICRO_SAM_PYTHON; else not run)")
    ap.add_argument("--train-child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.train_child:
        print(json.dumps(train_child(json.loads(args.train_child))))
        return 0
    torch.set_num_threads(args.threads)
    rows = {int(r) for r in args.rows.split(",") if r.strip()}
    res = {"machine": machine_info(args.threads), "quick": args.quick, "load_before": os.getloadavg(), "rows": [],
           "micro_sam_python": args.micro_sam_python}
    t_all = time.perf_counter()
    from napari_clipsam.engine.preprocess import normalize_image

    img, mask = test_image(1024)
    image01 = normalize_image(img)
    models = Models(1024, strategies=("ssp", "adapter-last-4") if args.quick else None)
    res["fast_path"] = models.info.as_dict()
    def save(complete: bool) -> None:
        Path(args.out).write_text(json.dumps({**res, "complete": complete}, indent=1, default=str))

    steps = [
        (1, lambda: row_embedding(models, image01, args.quick, res)),
        (1, lambda: row_embedding_512(args.quick, res)),
        (2, lambda: row_click(models, image01, args.quick, res)),
        (3, lambda: row_new_text(models, image01, args.quick, res)),
        (4, lambda: row_text_instances(models, image01, mask, args.quick, res)),
        (4, lambda: row_stock_process(models, image01, args.quick, res)),
        (5, lambda: row_two_stage(models, image01, mask, args.quick, res)),
        (6, lambda: row_finetune(args.quick, args.threads, res)),
        (7, lambda: row_volume(models, args.quick, res)),
    ]
    for row, fn in steps:
        if row in rows:
            t = time.perf_counter()
            fn()
            print(f"[row {row} done in {time.perf_counter() - t:.0f} s, load {os.getloadavg()[0]:.1f}]", file=sys.stderr, flush=True)
            save(complete=False)  # after every step: a run cut short still leaves its finished rows
    res["load_after"] = os.getloadavg()
    res["total_s"] = time.perf_counter() - t_all
    res["table"] = print_table(res)
    m = res["machine"]
    rates = ", ".join(f"{k} {v} GFLOP/s" for k, v in m["matmul_gflops"].items() if v)
    print(f"\n{m['cpu']} ({m['cpu_id']}), {m['physical_cores']} cores, torch {m['torch']}, {m['threads']} threads, "
          f"bf16 chosen: {m['native_bf16']}, 4096² matmul {rates}; load avg before {res['load_before'][0]:.1f}, after {res['load_after'][0]:.1f}; "
          f"total {res['total_s']:.0f} s")
    save(complete=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
