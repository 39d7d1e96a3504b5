"""What the padding of non-square inputs does to the demo model: SAM's pixel mean (the default,
neutral once normalised, as segment-anything pads) against black (what napari-clipsam did
before). Prints a table and writes ``bench/padding.json``.

Rows: instances found on object-free synthetic backgrounds (every one a false positive) per
shape, and instance F1@0.5 per concept on non-square images with objects (square images are
not padded: the same either way).

    python bench/padding.py [--images 4] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import numpy as np
import torch

import napari_clipsam.engine.segmenter as segmenter_module
from napari_clipsam.data.synthetic import CONCEPTS, make_image
from napari_clipsam.engine.preprocess import to_model_input
from napari_clipsam.evaluation import f1_score, match_instances
from napari_clipsam.models.registry import load_model

SHAPES = [(256, 256), (200, 256), (256, 200), (128, 256)]


def run(fill: str, n: int) -> dict:
    """Scores with ``fill`` padding ("mean": the model's pad_fill, "black": zeros)."""
    original = segmenter_module.to_model_input
    if fill == "black":
        segmenter_module.to_model_input = lambda image, size, _fill=None: original(image, size, (0.0, 0.0, 0.0))
    try:
        seg = segmenter_module.Segmenter(load_model("demo"))
        blank = {}
        for shape in SHAPES:
            found = 0
            for i in range(n):
                seg.set_image(make_image(6_000_000 + i, size=shape, counts={c: 0 for c in CONCEPTS}).image)
                found += sum(len(seg.segment_text(c)) for c in CONCEPTS)
            blank[f"{shape[0]}x{shape[1]}"] = found
        counts = {c: np.zeros(3, int) for c in CONCEPTS}
        for i in range(3 * n):
            sample = make_image(5_000_000 + i, size=(200, 256) if i % 2 else (256, 180))
            seg.set_image(sample.image)
            for c in CONCEPTS:
                counts[c] += match_instances(seg.segment_text(c).labels, sample.instance_labels(c))
        return {"false_instances_on_backgrounds": blank,
                "non_square_f1": {c: round(f1_score(*v), 3) for c, v in counts.items()}}
    finally:
        segmenter_module.to_model_input = original


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=4, help="backgrounds per shape (3× as many images for F1)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("padding.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = {fill: run(fill, args.images) for fill in ("black", "mean")}
    print(f"{'padding':<8}" + "".join(f"{'bg ' + s:>14}" for s in rows["mean"]["false_instances_on_backgrounds"])
          + "".join(f"{'F1 ' + c:>18}" for c in CONCEPTS))
    for fill, r in rows.items():
        print(f"{fill:<8}" + "".join(f"{v:>14}" for v in r["false_instances_on_backgrounds"].values())
              + "".join(f"{v:>18.3f}" for v in r["non_square_f1"].values()))
    args.out.write_text(json.dumps({"images_per_shape": args.images, "rows": rows,
                                    "machine": {"cpu": platform.processor() or platform.machine(),
                                                "threads": torch.get_num_threads(), "torch": torch.__version__}},
                                   indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
