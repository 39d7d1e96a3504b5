#!/usr/bin/env python
"""Train the bundled ``demo`` model from scratch on procedural fluorescence images.

The demo is a small text-conditioned SAM (CLIP-guided adapters in every encoder block) built
from segment-anything's modules and a small open_clip model with a character tokenizer. It is
trained on :mod:`napari_clipsam.data.synthetic` images for the three concepts, with the synonym
lists of that module and with absent-concept prompts (empty targets), in the three ways the
product decodes:

- text only → the union mask of the concept (the semantic map of ``segment_text``);
- pseudo prompt → a point in one instance + the thresholded region around it as mask prompt →
  that instance (the instance step of ``segment_text``);
- clicks / box → one instance (manual mode).

Deterministic given ``--seed`` (single process; same torch build). The shipped demo was made in
two stages (recorded in its metadata under ``stages``)::

    python scripts/train_demo.py --steps 2000 --seed 0 --threads 1 --out stage1.safetensors
    python scripts/train_demo.py --steps 1200 --seed 1 --lr 5e-4 --threads 1 --init stage1.safetensors \
        --out src/napari_clipsam/weights/demo.safetensors
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from napari_clipsam.data.synthetic import CONCEPTS, SYNONYMS, make_image
from napari_clipsam.models.clip_parts import tiny_clip_config
from napari_clipsam.models.clipsam import ClipSam, ClipSamConfig, Prompts
from napari_clipsam.models.sam_parts import SamConfig
from napari_clipsam.engine.preprocess import normalize_image
from napari_clipsam.training.losses import LossWeights, mask_loss

log = logging.getLogger("train_demo")

DEMO_SAM = SamConfig(
    encoder_embed_dim=128, encoder_depth=4, encoder_num_heads=4, encoder_global_attn_indexes=(1, 3),
    img_size=256, patch_size=16, window_size=8, prompt_embed_dim=128, mask_in_chans=16,
    decoder_depth=2, decoder_mlp_dim=512, decoder_num_heads=4, iou_head_hidden_dim=128,
)
TRAIN_SEEDS = range(0, 100_000)  # held-out evaluation uses seeds >= 1_000_000


def demo_config() -> ClipSamConfig:
    clip = tiny_clip_config(width=128, layers=2, embed_dim=128, image_size=256, patch_size=16, context_length=24)
    # A from-scratch character-level CLIP gains nothing from prompt templates: plain text only.
    return ClipSamConfig(sam=DEMO_SAM, clip=clip, strategy="adapter",
                         strategy_options={"blocks": "all", "bottleneck": 32}, templates=("{}",), surgery=False)


def _pool(n: int, seed: int) -> list[tuple[np.ndarray, object]]:
    rng = np.random.default_rng(seed)
    seeds = rng.choice(len(TRAIN_SEEDS), size=n, replace=False)
    out = []
    for s in seeds:
        sample = make_image(int(TRAIN_SEEDS[int(s)]), size=256, domain_shift=float(rng.random() < 0.15) * rng.random() * 0.5)
        out.append((normalize_image(sample.image), sample))
    return out


def _down(mask: np.ndarray, m: int) -> torch.Tensor:
    t = torch.from_numpy(mask.astype(np.float32))[None, None]
    return torch.nn.functional.adaptive_avg_pool2d(t, (m, m))[0]


def _interior_point(mask: np.ndarray, rng: np.random.Generator, jitter: bool) -> tuple[float, float]:
    dist = ndimage.distance_transform_edt(mask)
    if jitter:
        ys, xs = np.nonzero(dist >= max(1.0, 0.5 * dist.max()))
        i = rng.integers(len(ys))
        return float(xs[i]) + 0.5, float(ys[i]) + 0.5
    y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return float(x) + 0.5, float(y) + 0.5


def make_task(sample, kind: str, npos: int, rng: np.random.Generator, m: int, size: int):
    """One (text, Prompts kwargs, target (1, m, m)) training task of ``kind`` for a sample.

    ``text``: a concept (present or absent) → its union mask. ``pseudo``: a point in one instance +
    the region around it as mask prompt → that instance. ``box`` / ``points`` (``npos`` positive
    clicks, sometimes one negative replaced in) → that instance.
    """
    present = sample.concepts_present
    if kind == "text" or not present:
        concept = CONCEPTS[rng.integers(len(CONCEPTS))]
        text = SYNONYMS[concept][rng.integers(len(SYNONYMS[concept]))]
        return text, {}, _down(sample.semantic_mask(concept), m)
    concept = present[rng.integers(len(present))]
    text = SYNONYMS[concept][rng.integers(len(SYNONYMS[concept]))]
    inst = sample.instance_labels(concept)
    k = int(rng.integers(1, inst.max() + 1))
    target = inst == k
    if kind == "pseudo":
        # The region the thresholded semantic map would give: the connected component of the
        # concept's union mask around this instance, sometimes slightly grown.
        comp, _ = ndimage.label(sample.semantic_mask(concept))
        region = comp == comp[target][0]
        if rng.random() < 0.5:
            region = ndimage.binary_dilation(region, iterations=int(rng.integers(1, 3)))
        x, y = _interior_point(target, rng, jitter=True)
        low = _down(region, m)
        return text, {"points": [[[x, y]]], "labels": [[1]], "masks": ((low * 2 - 1) * 8)[None]}, _down(target, m)
    if kind == "box":
        ys, xs = np.nonzero(target)
        box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)
        box += rng.normal(0, 0.05 * max(box[2] - box[0], box[3] - box[1]), 4).astype(np.float32)
        return text, {"boxes": [np.clip(box, 0, size).tolist()]}, _down(target, m)
    pts = [_interior_point(target, rng, jitter=True) for _ in range(npos)]
    labels = [1] * npos
    if npos > 1 and rng.random() < 0.5:
        ys, xs = np.nonzero(~target & ndimage.binary_dilation(target, iterations=6))
        if len(ys):
            i = rng.integers(len(ys))
            pts[-1] = (float(xs[i]) + 0.5, float(ys[i]) + 0.5)
            labels[-1] = 0
    return text, {"points": [pts], "labels": [labels]}, _down(target, m)


# From scratch, thin and small objects need recall: unbalanced focal + dice rather than SAM's 20:1.
LOSS = LossWeights(focal=5.0, dice=1.0, focal_alpha=None)
KINDS = ("text", "pseudo", "box", "points")
KIND_P = (0.4, 0.25, 0.1, 0.25)


def _augment(img: np.ndarray, sample, rng):
    k = int(rng.integers(4))
    flip = bool(rng.random() < 0.5)

    def tf(a):
        a = np.rot90(a, k, axes=(0, 1))
        return np.ascontiguousarray(a[:, ::-1] if flip else a)

    gamma = float(np.exp(rng.normal(0, 0.2)))
    return np.clip(tf(img), 0, 1) ** gamma, tf


class _View:
    """A sample seen through an augmentation (labels transformed like the image)."""

    def __init__(self, sample, tf):
        self.classes = sample.classes
        self.concepts_present = sample.concepts_present
        self._s = sample
        self._tf = tf

    def semantic_mask(self, c):
        return self._tf(self._s.semantic_mask(c))

    def instance_labels(self, c):
        return self._tf(self._s.instance_labels(c))


def train(steps: int, batch: int, seed: int, pool_size: int, lr: float, out: Path | None, log_every: int = 50,
          init: Path | None = None) -> ClipSam:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = ClipSam(demo_config()) if init is None else ClipSam.load(init)
    stages = list(model.file_metadata.get("stages", [])) if init is not None else []
    model.semantics.clip.requires_grad_(True)  # from scratch: the text tower learns the words
    model.train()
    m, size = model.mask_size, model.img_size
    t0 = time.time()
    pool = _pool(pool_size, seed)
    log.info("generated %d training images in %.1fs", len(pool), time.time() - t0)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + np.cos(np.pi * min(1.0, s / steps))))
    t0 = time.time()
    for step in range(steps):
        # One kind of prompt per step, so the whole batch decodes in one call.
        kind = KINDS[rng.choice(len(KINDS), p=KIND_P)]
        npos = int(rng.integers(1, 4))
        imgs, texts, prompts, targets = [], [], [], []
        for b in range(batch):
            img, sample = pool[int(rng.integers(len(pool)))]
            img, tf = _augment(img, sample, rng)
            text, kw, target = make_task(_View(sample, tf), kind, npos, rng, m, size)
            imgs.append(torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32)).permute(2, 0, 1))
            texts.append(text)
            prompts.append({k: torch.as_tensor(np.asarray(v, dtype=np.float32)) for k, v in kw.items()})
            targets.append(target)
        kw = {k: torch.cat([p[k] for p in prompts]) for k in prompts[0]} if prompts[0] else {}
        if all(p.keys() == prompts[0].keys() for p in prompts):
            batch_prompts = Prompts(torch.arange(batch), **kw)
        else:  # a sample without the concept fell back to text only: decode per sample
            batch_prompts = [Prompts([b], **p) for b, p in enumerate(prompts)]
        logits, iou = model(torch.stack(imgs), texts, batch_prompts)
        loss, parts = mask_loss(logits, torch.stack(targets), iou, LOSS)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps - 1:
            el = time.time() - t0
            log.info("step %d/%d loss %.4f %s  %.1fs (eta %.0fs)", step + 1, steps, loss.item(),
                     {k: round(float(v), 4) for k, v in parts.items()}, el, el / (step + 1) * (steps - step - 1))
    model.eval()
    model.semantics.clip.requires_grad_(False)
    model.semantics.clear_cache()
    train_s = time.time() - t0
    if out is not None:
        stages.append({"seed": seed, "steps": steps, "batch": batch, "pool_size": pool_size, "lr": lr,
                       "train_seconds": round(train_s, 1), "init": "previous stage" if init is not None else "random"})
        meta = {"name": "demo", "trained_by": "scripts/train_demo.py", "seed": seed, "steps": steps, "batch": batch,
                "pool_size": pool_size, "lr": lr, "train_seconds": round(sum(st["train_seconds"] for st in stages), 1),
                "stages": stages, "concepts": list(CONCEPTS),
                "synonyms": {k: list(v) for k, v in SYNONYMS.items()}, "torch": torch.__version__,
                "threads": torch.get_num_threads(), "data": "napari_clipsam.data.synthetic.make_image seeds < 100000"}
        out.parent.mkdir(parents=True, exist_ok=True)
        model.save(out, metadata=meta, half=True)
        log.info("saved %s (%.1f MB) after %.0fs of training", out, out.stat().st_size / 1e6, train_s)
        print(json.dumps(meta))
    return model


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pool", type=int, default=600, help="number of distinct training images")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--init", type=Path, default=None,
                    help="continue from a model written by an earlier stage (new seed, new schedule)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "src/napari_clipsam/weights/demo.safetensors")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    train(args.steps, args.batch, args.seed, args.pool, args.lr, args.out, init=args.init)


if __name__ == "__main__":
    main()
