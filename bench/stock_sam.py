#!/usr/bin/env python
"""Stock segment-anything as a user runs it, timed in a process of its own; run by ``bench/run.py``
(rows 1, 2 and 4, the "own process" rows).

``bench/run.py`` times stock in its own process too, after it has enabled napari-clipsam's fast
path, and that sets glibc's allocator for the whole process (``models/fast.py``,
``tune_malloc``), which speeds stock up as well. This script imports nothing of napari-clipsam:
stock runs with glibc's defaults, as in a user's own script::

    python bench/stock_sam.py CHECKPOINT IMAGE.npy POINTS_PER_SIDE THREADS REPEAT

CHECKPOINT: an official-format SAM vit_b state dict, loaded through
``segment_anything.sam_model_registry["vit_b"](checkpoint=...)``; IMAGE.npy: (H, W, 3) uint8.
Prints one JSON line: ``SamPredictor.set_image`` seconds (REPEAT runs after one warm-up, or none
with REPEAT 1), ``predict`` milliseconds (one point, 3 masks, as bench/run.py's row 2: 30 runs
after 3 warm-ups), ``SamAutomaticMaskGenerator.generate`` seconds (the least of
``GENERATE_RUNS`` runs, or one with REPEAT 1; POINTS_PER_SIDE, its defaults otherwise) and the
masks it kept.
"""

from __future__ import annotations

import json
import statistics
import sys
import time


#: Runs of ``generate`` (the least time counts): its first run in a process is slower (115.5 s,
#: then 108.7 and 109.7 s, vit_b 1024², 2 threads), so one run would favour the comparison.
GENERATE_RUNS = 2


def timeit(fn, repeat: int = 3, warmup: int = 1) -> dict:
    """Run ``fn`` warmup + repeat times → {"min", "median", "n"} seconds (bench/run.py's too)."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return summary(ts)


def summary(ts: list[float]) -> dict:
    return {"min": min(ts), "median": statistics.median(ts), "n": len(ts)}


def main(argv: list[str]) -> int:
    if len(argv) != 5:
        print(__doc__, file=sys.stderr)
        return 2
    import numpy as np
    import torch
    from segment_anything import SamAutomaticMaskGenerator, SamPredictor, sam_model_registry

    checkpoint, image_path, side, threads, repeat = argv[0], argv[1], int(argv[2]), int(argv[3]), int(argv[4])
    torch.set_num_threads(threads)
    image = np.load(image_path)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise SystemExit(f"{image_path}: expected a (H, W, 3) uint8 image, got {image.shape} {image.dtype}")
    sam = sam_model_registry["vit_b"](checkpoint=checkpoint).eval()
    pred = SamPredictor(sam)
    set_image = timeit(lambda: pred.set_image(image), repeat, 0 if repeat == 1 else 1)
    h, w = image.shape[:2]
    pt, lab = np.array([[w * 0.4, h * 0.55]], np.float32), np.array([1])
    predict = timeit(lambda: pred.predict(point_coords=pt, point_labels=lab, multimask_output=True), 30, 3)
    amg = SamAutomaticMaskGenerator(sam, points_per_side=side)
    out = {}
    generate = timeit(lambda: out.__setitem__("masks", amg.generate(image)), min(repeat, GENERATE_RUNS), 0)
    print(json.dumps({"set_image_s": set_image, "predict_s": predict, "generate_s": generate["min"],
                      "generate_runs_s": generate, "masks": len(out["masks"]), "torch": torch.__version__}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
