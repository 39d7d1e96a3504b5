#!/usr/bin/env python
"""Quality of the bundled demo model on held-out synthetic images, and a few-label learning curve.

Prints a table and writes ``bench/quality.json`` (and ``bench/few_label_curve.png``)::

    python bench/quality.py              # 50 held-out images + the learning curve (≈ 10 min on 2 CPU cores)
    python bench/quality.py --quick      # 12 images, shorter curve

Held-out images use seeds from 1_000_000 on; the demo was trained on seeds below 100_000.
Two more rows: instances found on object-free backgrounds (every one a false positive; half of
them with ``domain_shift=0.5``), and the IoU of the best of SAM's three masks
(``predict(multimask=True)``) beside the single mask for a click at an object's interior point.
The learning curve fine-tunes the demo with default settings on 0, 1, 2, 3 and 5 labelled
images of the shifted domain (``domain_shift``) and scores nucleus instance F1@0.5 of
``segment_text("nucleus")`` on held-out shifted images.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from napari_clipsam.data.synthetic import CONCEPTS, make_image
from napari_clipsam.engine.segmenter import Segmenter
from napari_clipsam.evaluation import evaluate, f1_score, interior_point, mask_iou, match_instances
from napari_clipsam.models.registry import load_model
from napari_clipsam.training.examples import examples_from_arrays
from napari_clipsam.training.finetune import FineTuneConfig, finetune

HELD_OUT = 1_000_000
SHIFT_TRAIN = 2_000_000
SHIFT_TEST = 3_000_000
BACKGROUNDS = 4_000_000


def quality_table(seg: Segmenter, n: int) -> dict:
    samples = [make_image(HELD_OUT + i) for i in range(n)]
    return evaluate(seg, samples)


def background_instances(seg: Segmenter, n: int) -> dict[str, int]:
    """Instances each text finds on ``n`` object-free backgrounds (every one a false positive)."""
    found = dict.fromkeys(CONCEPTS, 0)
    for i in range(n):
        seg.set_image(make_image(BACKGROUNDS + i, counts=dict.fromkeys(CONCEPTS, 0), domain_shift=0.5 * (i % 2)).image)
        for c in CONCEPTS:
            found[c] += len(seg.segment_text(c))
    return found


def click_masks(seg: Segmenter, n: int, per_concept: int = 3) -> dict:
    """Mean IoU of the single mask and of the best of three for text + one click at an object's
    interior point (up to ``per_concept`` objects per concept on each of ``n`` held-out images)."""
    single, best = [], []
    for i in range(n):
        sample = make_image(HELD_OUT + i)
        seg.set_image(sample.image)
        for c in CONCEPTS:
            gt = sample.instance_labels(c)
            for k in np.unique(gt[gt > 0])[:per_concept]:
                target = gt == k
                click = [interior_point(target)]
                single.append(mask_iou(seg.predict(points=click, labels=[1], text=c)[0], target))
                best.append(mask_iou(seg.predict(points=click, labels=[1], text=c, multimask=True)[0], target))
    return {"clicks": len(single), "single_iou": round(float(np.mean(single)), 3),
            "best_of_three_iou": round(float(np.mean(best)), 3)}


def shifted_f1(model, n_test: int, shift: float, text: str = "nucleus") -> float:
    seg = Segmenter(model)
    counts = np.zeros(3, int)
    for i in range(n_test):
        s = make_image(SHIFT_TEST + i, domain_shift=shift, counts={"nucleus": (4, 11)})
        seg.set_image(s.image)
        counts += match_instances(seg.segment_text(text).labels, s.instance_labels("nucleus"))
    return f1_score(*counts)


def learning_curve(model_name: str, sizes: list[int], n_test: int, shift: float, steps: int) -> list[dict]:
    rows = []
    for k in sizes:
        model = load_model(model_name)
        t0 = time.time()
        if k:
            examples = []
            for i in range(k):
                s = make_image(SHIFT_TRAIN + i, domain_shift=shift, counts={"nucleus": (4, 11)})
                examples += examples_from_arrays(s.image, s.instance_labels("nucleus"), text="nucleus", name=f"shifted-{i}")
            finetune(model, examples, FineTuneConfig(steps=steps))
        rows.append({"labelled_images": k, "nucleus_f1": shifted_f1(model, n_test, shift),
                     "finetune_seconds": round(time.time() - t0, 1)})
        logging.info("curve: %s", rows[-1])
    return rows


def plot_curve(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 3), dpi=120)
    ax.plot([r["labelled_images"] for r in rows], [r["nucleus_f1"] for r in rows], "o-")
    ax.set_xlabel("labelled images (shifted domain)")
    ax.set_ylabel("nucleus instance F1@0.5")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--images", type=int, default=50)
    ap.add_argument("--quick", action="store_true", help="12 images, curve on 0/1/3 images")
    ap.add_argument("--shift", type=float, default=1.0, help="domain_shift of the learning curve (1.0: the \"strong\" preset)")
    ap.add_argument("--curve-test", type=int, default=20)
    ap.add_argument("--curve-steps", type=int, default=None, help="fine-tuning steps (default: FineTuneConfig's)")
    ap.add_argument("--no-curve", action="store_true")
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("quality.json"))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    n = 12 if args.quick else args.images
    t0 = time.time()
    seg = Segmenter(load_model(args.model))
    table = quality_table(seg, n)
    eval_s = time.time() - t0
    print(f"\nHeld-out quality of '{args.model}' on {n} synthetic images ({eval_s:.0f} s)")
    cols = ["text_iou", "point_iou", "leakage", "absent_empty_rate", "instance_f1", "n_present", "n_absent"]
    print(f"{'concept':<15}" + "".join(f"{c:>18}" for c in cols))
    for concept, row in table.items():
        print(f"{concept:<15}" + "".join(f"{row[c]:>18.3f}" if isinstance(row[c], float) else f"{row[c]:>18}" for c in cols))
    nb = 4 if args.quick else 8
    backgrounds = background_instances(seg, nb)
    print(f"\ninstances on {nb} object-free backgrounds (false positives): {backgrounds}")
    clicks = click_masks(seg, 4 if args.quick else 12)
    print(f"text + 1 click, {clicks['clicks']} clicks: single mask IoU {clicks['single_iou']:.3f}, "
          f"best of three {clicks['best_of_three_iou']:.3f}")
    result = {"model": args.model, "images": n, "seeds": f"{HELD_OUT}..{HELD_OUT + n - 1}", "quality": table,
              "object_free_backgrounds": {"images": nb, "seeds": f"{BACKGROUNDS}..{BACKGROUNDS + nb - 1}",
                                          "instances": backgrounds},
              "click_masks": clicks,
              "eval_seconds": round(eval_s, 1),
              "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                          "torch": torch.__version__, "python": sys.version.split()[0]}}
    if not args.no_curve:
        sizes = [0, 1, 3] if args.quick else [0, 1, 2, 3, 5]
        steps = args.curve_steps or FineTuneConfig().steps
        rows = learning_curve(args.model, sizes, 8 if args.quick else args.curve_test, args.shift, steps)
        result["few_label_curve"] = {"domain_shift": args.shift, "steps": steps, "rows": rows}
        print(f"\nFew-label curve (domain_shift={args.shift}, {steps} fine-tuning steps)")
        for r in rows:
            print(f"  {r['labelled_images']} images: nucleus F1@0.5 = {r['nucleus_f1']:.3f}  ({r['finetune_seconds']} s)")
        plot_curve(rows, args.out.with_name("few_label_curve.png"))
    result["total_seconds"] = round(time.time() - t0, 1)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
