#!/usr/bin/env python
"""Train the bundled ``demo`` model from scratch on procedural fluorescence images.

The demo is a small text-conditioned SAM (CLIP-guided adapters in every encoder block) built
from segment-anything's modules — with a convolutional stem in place of SAM's single patch
convolution (``SamConfig.patch_stem``: a from-scratch ViT tells rods from dots inside a 16-px
patch much sooner with early convolutions) — and a small open_clip model with a character
tokenizer. It is trained on fresh :mod:`napari_clipsam.data.synthetic` images (never the same
twice; 10 % are z-slices of volumes) for the three concepts, with the synonym lists of that
module. Each batch row is one (image, text) pair, encoded once and decoded several ways — the
ways the product decodes:

- text only → the union mask of the concept, with a thin gap where objects of the concept
  touch (the semantic map of ``segment_text``); a text naming a concept absent from the image →
  an empty mask;
- one click (also the instance step of ``segment_text``, which clicks the text's regions), several
  clicks (sometimes one negative), a box, or what 3D propagation passes on to the next slice (a
  perturbed copy of the object as mask prompt + its deepest point + its grown box) → one
  instance (manual mode). Objects touching another of their concept are prompted more often.

The mask head also reads the stem's features on its 64² mask grid (``SamConfig.stem_skip``,
:mod:`napari_clipsam.models.stem_skip`): from the 16² tokens alone the decoder could not tell
where one of two touching nuclei ends.

On CPUs with native bf16 matmuls the forward pass runs under bf16 autocast (fp32 weights and
loss; ~1.2× faster, so more steps fit). Deterministic given ``--seed`` on the same CPU and torch
build (one worker process makes the data). The shipped demo was made in three stages:

1. the model without the skip;
2. the skip added (at zero) and the mask decoder alone trained on (the rest frozen: cheaper
   steps), the skip ``NEW_LR_FACTOR``× faster than the rest of the decoder;
3. the mask decoder alone again, a quarter of its rows on object-free backgrounds (``--p-empty``:
   once normalised, their noise and haze fill the whole range, and the model of stage 2 found
   ~30 objects per such image, over the three texts).

``--multimask`` also trains SAM's three masks per click (the lowest loss of the three, as SAM
trains them). It was measured for the third stage (best of three IoU 0.36 → 0.70) but is not in
the shipped demo: with it, 90 steps took 72–86 s, at or over what the 30 minutes left, and 70
steps failed the crowded-nuclei click bar (``bench/README.md``).

Its metadata records the runs, the CPU of each and their training times (together under 30
minutes; stages 1 and 2 ran on an AMD EPYC with bf16, stage 3 on an Intel Xeon in fp32)::

    python scripts/train_demo.py --steps 2400 --seed 0 --no-stem-skip --out stage1.safetensors
    python scripts/train_demo.py --init stage1.safetensors --decoder-only --steps 480 --lr 2e-4 --seed 1 --out stage2.safetensors
    python scripts/train_demo.py --init stage2.safetensors --decoder-only --steps 90 --lr 3e-4 --seed 2 --p-empty 0.25

Training the whole model in the second stage gained about as much but cost twice as much per step.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from napari_clipsam.data.synthetic import CONCEPTS, SYNONYMS, make_image, make_volume
from napari_clipsam.models.clip_parts import tiny_clip_config
from napari_clipsam.models.clipsam import ClipSam, ClipSamConfig, Prompts
from napari_clipsam.models.fast import cpu_has_fast_bf16, cpu_model
from napari_clipsam.models.sam_parts import SamConfig
from napari_clipsam.engine.preprocess import fraction_to_logits, normalize_image
from napari_clipsam.engine.volume import mask_prompts
from napari_clipsam.training.losses import LossWeights, dice_loss, focal_loss, mask_iou, mask_loss

log = logging.getLogger("train_demo")

DEMO_SAM = SamConfig(
    encoder_embed_dim=128, encoder_depth=4, encoder_num_heads=4, encoder_global_attn_indexes=(1, 3),
    img_size=256, patch_size=16, window_size=8, prompt_embed_dim=128, mask_in_chans=16,
    decoder_depth=2, decoder_mlp_dim=512, decoder_num_heads=4, iou_head_hidden_dim=128,
    patch_stem=(16, 32, 64),  # early convolutions: rods vs dots inside a 16-px patch (sam_parts.conv_stem)
    stem_skip=True,  # the stem's 64² features into the mask head: boundaries of touching objects (models.stem_skip)
)
NEW_LR_FACTOR = 3.0  # continuing from an earlier stage: parameters it did not have learn this much faster
TRAIN_SEEDS = range(0, 100_000)  # held-out evaluation uses seeds >= 1_000_000


def demo_config(stem_skip: bool = True) -> ClipSamConfig:
    clip = tiny_clip_config(width=128, layers=2, embed_dim=128, image_size=256, patch_size=16, context_length=24)
    # A from-scratch character-level CLIP gains nothing from prompt templates: plain text only.
    return ClipSamConfig(sam=replace(DEMO_SAM, stem_skip=stem_skip), clip=clip, strategy="adapter",
                         strategy_options={"blocks": "all", "bottleneck": 32}, templates=("{}",), surgery=False)


@dataclass
class _Item:
    """One training image (already rotated/flipped) with what the tasks need, precomputed once.

    ``image``: (H, W) float16 normalised intensities; ``labels``: (H, W) instance ids;
    ``ids``: concept → its instance ids; ``gaps``: concept → (H, W) bool, the pixels of its
    objects within ``TOUCH_GAP`` px of another object of the same concept (left out of the
    text-only target, so touching objects stay apart in the semantic map); ``deep``: instance id →
    (n, 2) (x, y) pixel centres at least 0.3× as deep as its deepest (where clicks land: users,
    and ``segment_text``'s grid of seeds, do not always click the centre); ``touching``: concept →
    for each of its ids, whether the object touches another of the concept (has gap pixels).
    """

    image: np.ndarray
    labels: np.ndarray
    ids: dict[str, list[int]]
    gaps: dict[str, np.ndarray]
    deep: dict[int, np.ndarray]
    touching: dict[str, np.ndarray]

    @property
    def present(self) -> list[str]:
        return [c for c in CONCEPTS if self.ids.get(c)]


TOUCH_GAP = 2  # px (Chebyshev) kept free between touching objects of one concept in the text target


def _touch_gap(labels: np.ndarray, ids: list[int], gap: int) -> np.ndarray:
    """Pixels of the objects ``ids`` lying within ``gap`` px of a different one of them."""
    own = np.where(np.isin(labels, ids), labels, 0)
    size = 2 * gap + 1
    top = int(own.max()) + 1
    highest = ndimage.maximum_filter(own, size=size)
    lowest = top - ndimage.maximum_filter(np.where(own > 0, top - own, 0), size=size)
    return (own > 0) & ((highest != own) | (lowest != own))


def _item(image: np.ndarray, labels: np.ndarray, classes: dict[int, str]) -> _Item:
    present_ids = set(np.unique(labels[labels > 0]).tolist())
    ids = {c: sorted(i for i, k in classes.items() if k == c and i in present_ids) for c in CONCEPTS}
    labels = labels.astype(np.int32)
    gaps = {c: _touch_gap(labels, v, TOUCH_GAP) for c, v in ids.items() if v}
    deep = {}
    for i, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None or i not in present_ids:
            continue
        dist = ndimage.distance_transform_edt(np.pad(labels[sl] == i, 1))[1:-1, 1:-1]
        ys, xs = np.nonzero(dist >= max(1.0, 0.3 * dist.max()))
        deep[i] = np.stack([xs + sl[1].start, ys + sl[0].start], 1).astype(np.float32) + 0.5
    touching = {c: np.isin(ids[c], np.unique(labels[g])) for c, g in gaps.items()}
    return _Item(normalize_image(image)[..., 0].astype(np.float16), labels, ids, gaps, deep, touching)


def _fresh_item(rng: np.random.Generator, volume_fraction: float = 0.1, p_empty: float = 0.0) -> _Item:
    """A new training image: a 2D image (15 % of them domain-shifted), a z-slice of a volume, or
    (a ``p_empty`` share) an object-free background, in a random one of the 8 rotations/flips,
    with a random training seed."""
    seed = int(TRAIN_SEEDS[int(rng.integers(len(TRAIN_SEEDS)))])
    shift = float(rng.random() < 0.15) * rng.random() * 0.5
    if p_empty and rng.random() < p_empty:  # normalised, its noise and haze fill the whole range: no object anywhere
        sample = make_image(seed, size=256, counts={c: 0 for c in CONCEPTS}, domain_shift=shift)
        image, labels, classes = sample.image, sample.labels, sample.classes
    elif rng.random() < volume_fraction:
        vol = make_volume(seed, shape=(8, 256, 256), domain_shift=shift, p_absent=0.35)
        z = int(rng.integers(vol.image.shape[0]))
        image, labels, classes = vol.image[z], vol.labels[z], vol.classes
    else:
        sample = make_image(seed, size=256, domain_shift=shift, p_absent=0.35)
        image, labels, classes = sample.image, sample.labels, sample.classes
    k, flip = int(rng.integers(4)), bool(rng.random() < 0.5)

    def tf(a):
        a = np.rot90(a, k)
        return np.ascontiguousarray(a[:, ::-1] if flip else a)

    return _item(tf(image), tf(labels), classes)


def _down(mask: np.ndarray, m: int) -> np.ndarray:
    """(S, S) boolean → (m, m) float32 area fractions (S a multiple of m)."""
    f = mask.shape[0] // m
    return mask.reshape(m, f, m, f).mean((1, 3), dtype=np.float32)


INSTANCE_KINDS = ("point", "points", "box", "propagate")
INSTANCE_P = (0.45, 0.2, 0.15, 0.2)
TOUCHING_WEIGHT = 3.0  # an object touching another of its concept is this much likelier to be prompted


def _prior(target: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``target`` as the neighbouring slice might show it: grown or shrunk by up to 3 px and
    shifted by up to 3 px (what :func:`~napari_clipsam.engine.volume.propagate` passes as mask prompt)."""
    r = int(rng.integers(-3, 4))
    prior = target
    if r > 0:
        prior = ndimage.binary_dilation(target, iterations=r)
    elif r < 0:
        shrunk = ndimage.binary_erosion(target, iterations=-r)
        prior = shrunk if shrunk.sum() >= 8 else target
    out = ndimage.shift(prior, rng.integers(-3, 4, size=2), order=0, cval=False)  # (dy, dx), zero fill
    return out if out.any() else target


def instance_task(item: _Item, concept: str, kind: str, npos: int, rng: np.random.Generator, m: int,
                  size: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """One instance of ``concept`` (objects touching another of the concept ``TOUCHING_WEIGHT``×
    likelier: telling them apart is the hard part) and a prompt of ``kind`` for it → (prompt
    arrays, (m, m) target).

    ``point``: one click; ``points``: ``npos`` clicks, the last sometimes a negative one just
    outside; ``box``: its bounding box with jitter; ``propagate``: what 3D propagation gives the
    next slice — a perturbed copy of the object as mask prompt with its deepest point and its box
    grown by 10 %.
    """
    ids = item.ids[concept]
    p = np.where(item.touching[concept], TOUCHING_WEIGHT, 1.0)
    k = ids[int(rng.choice(len(ids), p=p / p.sum()))]
    target = item.labels == k
    deep = item.deep[k]
    click = deep[int(rng.integers(len(deep)))]
    if kind == "point":
        return {"points": click[None], "labels": np.ones(1, np.float32)}, _down(target, m)
    if kind == "points":
        pts = deep[rng.integers(len(deep), size=npos)]
        labels = np.ones(npos, np.float32)
        if npos > 1 and rng.random() < 0.5:
            ring = ~target & ndimage.binary_dilation(target, iterations=6)
            ys, xs = np.nonzero(ring)
            if len(ys):
                i = int(rng.integers(len(ys)))
                pts[-1] = (xs[i] + 0.5, ys[i] + 0.5)
                labels[-1] = 0
        return {"points": pts, "labels": labels}, _down(target, m)
    if kind == "propagate":
        prior = _prior(target, rng)
        point, box = mask_prompts(prior)
        return {"points": point + 0.5, "labels": np.ones(1, np.float32), "boxes": box,
                "masks": fraction_to_logits(_down(prior, m))[None]}, _down(target, m)
    ys, xs = np.nonzero(target)
    box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)
    box += rng.normal(0, 0.05 * max(box[2] - box[0], box[3] - box[1]), 4).astype(np.float32)
    box = np.clip(box, 0, size)  # jitter can cross the corners of a box around a thin object: reorder them
    return {"boxes": np.concatenate([np.minimum(box[:2], box[2:]), np.maximum(box[:2], box[2:])])}, _down(target, m)


# From scratch, thin and small objects need recall: unbalanced focal + dice rather than SAM's 20:1.
LOSS = LossWeights(focal=5.0, dice=1.0, focal_alpha=None)
P_ABSENT_TEXT = 0.35  # a row's text names a concept absent from its image (target: empty)
INSTANCES_PER_ROW = 4  # instance prompts decoded per encoded (image, text) row
TEXT_WEIGHT, INSTANCE_WEIGHT = 1.5, 0.5  # loss weight of a text-only mask and of an instance mask


def make_batch(batch: int, rng: np.random.Generator, m: int, size: int, p_empty: float = 0.0):
    """A batch of ``batch`` fresh (image, text) rows, each decoded as text only (→ the concept's union
    mask less its touch gaps, empty when absent) and, when the concept is present, with ``INSTANCES_PER_ROW`` instance
    prompts → (images (B, 3, S, S), texts, kinds ("text" and ``INSTANCE_KINDS`` present, in order), [Prompts per
    kind], targets (N, 1, m, m), weights (N,)).
    ``p_empty``: the share of rows whose image has no object at all (text target: empty)."""
    images, texts = [], []
    groups: dict[str, list] = {"text": []}
    npos = int(rng.integers(2, 4))
    for b in range(batch):
        item = _fresh_item(rng, p_empty=p_empty)
        gamma = float(np.exp(rng.normal(0, 0.2)))
        img = np.clip(item.image.astype(np.float32), 0, 1) ** gamma
        images.append(torch.from_numpy(img)[None].expand(3, -1, -1))
        present = item.present
        absent = [c for c in CONCEPTS if c not in present]
        if absent and (not present or rng.random() < P_ABSENT_TEXT):
            concept = absent[int(rng.integers(len(absent)))]
        else:
            concept = present[int(rng.integers(len(present)))]
        texts.append(SYNONYMS[concept][int(rng.integers(len(SYNONYMS[concept])))])
        if item.ids[concept]:
            union = np.isin(item.labels, item.ids[concept]) & ~item.gaps[concept]
        else:
            union = np.zeros((size, size), bool)
        groups["text"].append((b, {}, _down(union, m), TEXT_WEIGHT))
        if concept in present:
            for _ in range(INSTANCES_PER_ROW):
                kind = INSTANCE_KINDS[rng.choice(len(INSTANCE_KINDS), p=INSTANCE_P)]
                kw, target = instance_task(item, concept, kind, npos, rng, m, size)
                groups.setdefault(kind, []).append((b, kw, target, INSTANCE_WEIGHT))
    prompts, targets, weights = [], [], []
    kinds = list(groups)
    for kind, rows in groups.items():
        kw = {k: torch.from_numpy(np.stack([r[1][k] for r in rows])) for k in rows[0][1]}
        prompts.append(Prompts(torch.tensor([r[0] for r in rows]), **kw))
        targets += [r[2] for r in rows]
        weights += [r[3] for r in rows]
    return (torch.stack(images), texts, kinds, prompts, torch.from_numpy(np.stack(targets))[:, None],
            torch.tensor(weights))


MULTIMASK_WEIGHT = 0.5  # of the single-click rows' multimask loss, beside the batch's loss


def multimask_loss(logits: torch.Tensor, targets: torch.Tensor, iou_pred: torch.Tensor) -> tuple[torch.Tensor, float]:
    """SAM's loss for its three masks per click: (N, 3, m, m) logits against (N, 1, m, m) targets →
    (the mean over clicks of the lowest of the three masks' losses, plus the IoU head's error on
    all three; that loss as a float). Only the best mask learns from each click, so the three
    can specialise (an ambiguous click: part, object, group)."""
    wide = targets.expand_as(logits)
    per = LOSS.focal * focal_loss(logits, wide, LOSS.focal_alpha, LOSS.focal_gamma) + LOSS.dice * dice_loss(logits, wide)
    iou_mse = ((iou_pred - mask_iou(logits.detach(), wide)) ** 2).mean()
    total = per.min(1).values.mean() + LOSS.iou * iou_mse
    return total, float(total.detach())


class _Batches(torch.utils.data.IterableDataset):
    """Endless training batches, made in a worker process while the main one trains."""

    def __init__(self, seed: int, batch: int, m: int, size: int, p_empty: float):
        self.seed, self.batch, self.m, self.size, self.p_empty = seed, batch, m, size, p_empty

    def __iter__(self):
        rng = np.random.default_rng(self.seed)
        while True:
            yield make_batch(self.batch, rng, self.m, self.size, self.p_empty)


def grown(model: ClipSam, stem_skip: bool) -> tuple[ClipSam, set[str]]:
    """An earlier stage's model, with the stem skip added where ``stem_skip`` asks for one and it
    has none (zero at first, so the masks start unchanged) → (model, names of the added parameters)."""
    if model.config.sam.stem_skip or not stem_skip:
        return model, set()
    config = replace(model.config, sam=replace(model.config.sam, stem_skip=True))
    out = ClipSam(config)
    missing, unexpected = out.load_state_dict(model.state_dict(), strict=False)
    if unexpected or not all(k.startswith("sam.mask_decoder.stem_skip.") for k in missing):
        raise ValueError(f"--init model does not match the demo's architecture: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    out.file_metadata = model.file_metadata
    return out, set(missing)


def train(steps: int, batch: int, seed: int, lr: float, out: Path | None, log_every: int = 50,
          init: Path | None = None, bf16: bool = False, stem_skip: bool = True, decoder_only: bool = False,
          p_empty: float = 0.0, multimask: bool = False) -> ClipSam:
    torch.manual_seed(seed)
    model, new = (ClipSam(demo_config(stem_skip)), set()) if init is None else grown(ClipSam.load(init), stem_skip)
    stages = [dict(st) for st in model.file_metadata.get("stages", [])] if init is not None else []
    for st in stages:  # files from before stages recorded their CPU: all their stages ran on the file's
        st.setdefault("cpu", model.file_metadata.get("cpu"))
    model.semantics.clip.requires_grad_(True)  # from scratch: the text tower learns the words
    if decoder_only:  # a later stage for the mask decoder alone (the rest runs without gradients)
        model.requires_grad_(False)
        model.sam.mask_decoder.requires_grad_(True)
    model.train()
    m, size = model.mask_size, model.img_size
    # One process generates fresh images (never the same twice) while this one trains on 1 thread:
    # on 2 cores that is faster than 2 training threads on a fixed pool.
    batches = iter(torch.utils.data.DataLoader(_Batches(seed, batch, m, size, p_empty), batch_size=None, num_workers=1,
                                               prefetch_factor=4))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    opt = torch.optim.AdamW([{"params": [p for n, p in named if n not in new], "lr": lr},
                             {"params": [p for n, p in named if n in new], "lr": lr * NEW_LR_FACTOR}],
                            lr=lr, weight_decay=1e-4)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + np.cos(np.pi * min(1.0, s / steps))))
    t0 = time.time()
    for step in range(steps):
        images, texts, kinds, prompts, targets, weights = next(batches)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):  # fp32 weights, bf16 matmuls
            enc = model.encode(images, texts)
            logits, iou = model.decode(enc, prompts)
        loss, parts = mask_loss(logits.float(), targets, iou.float(), LOSS, sample_weights=weights)
        if multimask and "point" in kinds:
            k = kinds.index("point")
            start = sum(len(p.image_index) for p in prompts[:k])
            rows = slice(start, start + len(prompts[k].image_index))
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                many, many_iou = model.decode(enc, prompts[k], multimask=True)
            extra, parts["multimask"] = multimask_loss(many.float(), targets[rows], many_iou.float())
            loss = loss + MULTIMASK_WEIGHT * extra
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
        autocast = "bfloat16" if bf16 else "none"
        stages.append({"seed": seed, "steps": steps, "batch": batch, "lr": lr, "autocast": autocast, "cpu": cpu_model(),
                       "trained": "mask decoder" if decoder_only else "all",
                       **({"p_empty": p_empty} if p_empty else {}),
                       **({"multimask": {"weight": MULTIMASK_WEIGHT, "prompts": "point"}} if multimask else {}),
                       "train_seconds": round(train_s, 1), "init": "previous stage" if init is not None else "random",
                       **({"added": "sam.mask_decoder.stem_skip", "added_lr_factor": NEW_LR_FACTOR} if new else {})})
        meta = {"name": "demo", "trained_by": "scripts/train_demo.py", "seed": seed, "steps": steps, "batch": batch, "lr": lr,
                "autocast": autocast, "cpu": cpu_model(),
                "instances_per_row": INSTANCES_PER_ROW, "instance_prompts": dict(zip(INSTANCE_KINDS, INSTANCE_P)),
                "touch_gap_px": TOUCH_GAP, "p_absent_text": P_ABSENT_TEXT, "train_seconds": round(sum(st["train_seconds"] for st in stages), 1),
                "stages": stages, "concepts": list(CONCEPTS),
                "synonyms": {k: list(v) for k, v in SYNONYMS.items()}, "torch": torch.__version__,
                "threads": torch.get_num_threads(), "data": "fresh napari_clipsam.data.synthetic images (make_image, 10 % make_volume slices; "
                                                              "a stage's p_empty share object-free), seeds < 100000"}
        out.parent.mkdir(parents=True, exist_ok=True)
        model.save(out, metadata=meta, half=True, overwrite=True)
        log.info("saved %s (%.1f MB) after %.0fs of training", out, out.stat().st_size / 1e6, train_s)
        print(json.dumps(meta))
    return model


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=1, help="training threads (a second process makes the data)")
    ap.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                    help="bf16 autocast (default: on where the CPU has native bf16 matmuls)")
    ap.add_argument("--init", type=Path, default=None,
                    help="continue from a model written by an earlier stage (new seed, new schedule)")
    ap.add_argument("--decoder-only", action="store_true",
                    help="train only the mask decoder (with --init: a cheap later stage)")
    ap.add_argument("--p-empty", type=float, default=0.0,
                    help="share of rows whose image has no object at all (its text target is empty)")
    ap.add_argument("--multimask", action="store_true",
                    help="also train SAM's three masks per single click (the lowest of their losses)")
    ap.add_argument("--stem-skip", action=argparse.BooleanOptionalAction, default=True,
                    help="the mask head's skip from the patch stem (models.stem_skip); added, at zero, to an "
                         "--init model that has none")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "src/napari_clipsam/weights/demo.safetensors")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # denormals from near-black images slow the CPU backward down
    bf16 = cpu_has_fast_bf16() if args.bf16 is None else args.bf16
    train(args.steps, args.batch, args.seed, args.lr, args.out, init=args.init, bf16=bf16, stem_skip=args.stem_skip,
          decoder_only=args.decoder_only, p_empty=args.p_empty, multimask=args.multimask)


if __name__ == "__main__":
    main()
