#!/usr/bin/env python
"""micro-sam's automatic mask generation on one image, timed; run by ``bench/run.py`` (row 4).

micro-sam pins its own fork of segment-anything (``segment-anything-py``, the same ``segment_anything``
module), so it lives in a Python environment of its own::

    python -m venv ../msam-venv && ../msam-venv/bin/pip install micro-sam torch torchvision
    python bench/run.py --rows 4 --micro-sam-python ../msam-venv/bin/python

This script imports only micro-sam, NumPy and torch::

    python bench/microsam_amg.py CHECKPOINT IMAGE.npy POINTS_PER_SIDE THREADS

CHECKPOINT: an official-format SAM vit_b state dict (``torch.save(sam.state_dict())``; micro-sam
loads it through ``micro_sam.util.get_sam_model(checkpoint_path=...)``, nothing is downloaded);
IMAGE.npy: (H, W, 3) uint8. Prints one JSON line: seconds for the embedding
(``precompute_image_embeddings``) and for ``AutomaticMaskGenerator.initialize`` + ``generate`` on
that embedding, the number of objects, micro-sam's version.
"""

from __future__ import annotations

import json
import sys
import time


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        print(__doc__, file=sys.stderr)
        return 2
    import numpy as np
    import torch
    import micro_sam
    from micro_sam import util
    from micro_sam.instance_segmentation import AutomaticMaskGenerator

    checkpoint, image_path, side, threads = argv[0], argv[1], int(argv[2]), int(argv[3])
    torch.set_num_threads(threads)
    image = np.load(image_path)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise SystemExit(f"{image_path}: expected a (H, W, 3) uint8 image, got {image.shape} {image.dtype}")
    predictor = util.get_sam_model(model_type="vit_b", checkpoint_path=checkpoint, device="cpu")
    t0 = time.perf_counter()
    emb = util.precompute_image_embeddings(predictor, image, ndim=2, verbose=False)
    t1 = time.perf_counter()
    amg = AutomaticMaskGenerator(predictor, points_per_side=side)
    amg.initialize(image, image_embeddings=emb)
    seg = amg.generate()
    t2 = time.perf_counter()
    print(json.dumps({"embedding_s": t1 - t0, "amg_s": t2 - t1, "objects": int(len(np.unique(seg)) - (seg == 0).any()),
                      "micro_sam": micro_sam.__version__, "torch": torch.__version__}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
