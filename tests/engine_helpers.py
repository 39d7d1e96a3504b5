"""Shared by the engine tests: bright-blob images/volumes and a tiny ClipSam trained on them.

The trained model (``blob_model()``) learns, in a few hundred steps on one CPU thread, the ways
the engine decodes: the text "blob" → the union of blobs (semantic map), a click inside a blob →
that blob (segment_text's grid seeds), a point + region mask → that blob (its region seeds), a
box → that blob (manual), and a point + box + the neighbouring
slice's mask → that blob, or nothing where the blob has ended (propagation). Only the decoder and
the semantic head train (the encoders stay random and frozen). Built once per test process
(~30-60 s on one loaded CPU thread), so the tests using it are marked ``slow``.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

from napari_clipsam.models.clip_parts import tiny_clip_config
from napari_clipsam.models.clipsam import ClipSam, ClipSamConfig, Prompts
from napari_clipsam.models.sam_parts import SamConfig

SIZE = 64
TEXT = "blob"

TINY8 = SamConfig(encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=2, encoder_global_attn_indexes=(1,),
                  img_size=SIZE, patch_size=8, window_size=4, prompt_embed_dim=32, mask_in_chans=4, decoder_depth=1,
                  decoder_mlp_dim=64, decoder_num_heads=2, iou_head_hidden_dim=32)


def disk(shape, cy, cx, r) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2


def render(masks, rng, shape, noise: float = 0.08) -> np.ndarray:
    """Bright blobs (one per mask) on a dark noisy background, float in [0, 1]."""
    img = 0.1 + noise * rng.standard_normal(shape)
    for m in masks:
        img[m] += rng.uniform(0.6, 0.9)
    return np.clip(img, 0, 1).astype(np.float32)


def blob_scene(rng, shape=(SIZE, SIZE), n=(1, 3), r=(6, 12)) -> tuple[np.ndarray, list[np.ndarray]]:
    """An image with n non-touching blobs and their masks."""
    masks = []
    count = int(rng.integers(n[0], n[1] + 1))
    for _ in range(50):
        if len(masks) >= count:
            break
        rad = rng.uniform(*r)
        cy, cx = rng.uniform(rad, shape[0] - rad), rng.uniform(rad, shape[1] - rad)
        m = disk(shape, cy, cx, rad)
        if not any((disk(shape, cy, cx, rad + 3) & o).any() for o in masks):
            masks.append(m)
    return render(masks, rng, shape), masks


def _down(mask: np.ndarray, m: int) -> torch.Tensor:
    return F.adaptive_avg_pool2d(torch.from_numpy(mask.astype(np.float32))[None, None], (m, m))[0]


def _deepest(mask: np.ndarray) -> tuple[float, float]:
    from scipy import ndimage

    d = ndimage.distance_transform_edt(mask)
    y, x = np.unravel_index(int(np.argmax(d)), d.shape)
    return float(x), float(y)


def _loss(logits, target):
    bce = F.binary_cross_entropy_with_logits(logits, target)
    p = torch.sigmoid(logits)
    dice = 1 - (2 * (p * target).sum((-1, -2)) + 1) / (p.sum((-1, -2)) + target.sum((-1, -2)) + 1)
    return bce + dice.mean()


def _pool(rng, n: int):
    """n scenes: (image, masks, image without blob 0, deepest point of each blob)."""
    out = []
    while len(out) < n:
        img, masks = blob_scene(rng, n=(2, 4))  # several blobs: prompts must pick one
        if masks:
            out.append((img, masks, render(masks[1:], rng, img.shape), [_deepest(mk) for mk in masks]))
    return out


def _prompts(rng, scene, k, kind, m):
    """Prompt kwargs for blob ``k`` of one scene."""
    from scipy import ndimage

    target = scene[1][k]
    x, y = scene[3][k]
    ys, xs = np.nonzero(target)
    if kind == "pseudo":  # the blob's region (sometimes grown) + its deepest point (seeds="regions")
        region = ndimage.binary_dilation(target, iterations=int(rng.integers(1, 3))) if rng.random() < 0.5 else target
        return {"points": [[[x, y]]], "labels": [[1]], "masks": ((_down(region, m) * 2 - 1) * 8)[None]}
    if kind == "seed":  # a click anywhere but the rim, as segment_text's grid seeds land
        dist = ndimage.distance_transform_edt(np.pad(target, 1))[1:-1, 1:-1]
        sy, sx = np.nonzero(dist >= max(1.0, 0.3 * dist.max()))
        i = int(rng.integers(len(sy)))
        return {"points": [[[sx[i] + 0.5, sy[i] + 0.5]]], "labels": [[1]]}
    if kind == "box":
        box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32) + rng.normal(0, 1, 4)
        return {"boxes": [box.tolist()]}
    # "prop": a neighbouring slice's mask (shifted / resized) as mask + deepest point + box
    cy, cx, rad = ys.mean(), xs.mean(), np.sqrt(target.sum() / np.pi)
    prev = disk(target.shape, cy + rng.normal(0, 1), cx + rng.normal(0, 1), max(2.0, rad * rng.uniform(0.75, 1.3)))
    pys, pxs = np.nonzero(prev)
    px, py = float(pxs.mean()), float(pys.mean())
    box = [pxs.min() - 1, pys.min() - 1, pxs.max() + 2, pys.max() + 2]
    return {"points": [[[px, py]]], "labels": [[1]], "boxes": [box], "masks": ((_down(prev, m) * 2 - 1) * 8)[None]}


def train_blob_model(steps: int = 800, batch: int = 16, pool: int = 192, seed: int = 0) -> ClipSam:
    """Train the decoder and the semantic head (the encoders stay random and frozen, so image
    features are computed once for the pool) on blob scenes."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    cfg = ClipSamConfig(sam=TINY8, clip=tiny_clip_config(patch_size=8), strategy="pseudo", templates=("{}",),
                        surgery=False)
    model = ClipSam(cfg)
    model.freeze_base()
    model.sam.prompt_encoder.requires_grad_(True)
    model.sam.mask_decoder.requires_grad_(True)
    scenes = _pool(rng, pool)
    with torch.no_grad():
        def embed(imgs):
            return model.embed_image(torch.stack([torch.from_numpy(i)[None].expand(3, -1, -1) for i in imgs]))

        feats = embed([s[0] for s in scenes])
        gone = embed([s[2] for s in scenes])
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=1e-4)
    m = model.mask_size
    for _ in range(steps):
        idx = rng.integers(len(scenes), size=batch)
        without = rng.random(batch) < 0.25  # "prop" rows where blob 0 has ended
        loss = 0.0
        rows = [int(i) for i in idx]
        f, g = feats.index(rows), gone.index(rows)
        sel = torch.as_tensor(without)[:, None, None, None]
        g.embeddings = torch.where(sel, g.embeddings, f.embeddings)
        g.patches = torch.where(sel, g.patches, f.patches)
        enc_all = model.condition(f, [TEXT] * batch)
        enc_gone = model.condition(g, [TEXT] * batch)
        for kind in ("sem", "seed", "pseudo", "box", "prop"):
            use_gone = kind == "prop"
            enc = enc_gone if use_gone else enc_all
            if kind == "sem":
                union = [np.any(scenes[i][1], 0) for i in rows]
                loss = loss + _loss(model.semantic_logits(enc), torch.stack([_down(u, m) for u in union]))
                continue
            ks = [0 if use_gone else int(rng.integers(len(scenes[i][1]))) for i in rows]
            kws = [_prompts(rng, scenes[i], k, kind, m) for i, k in zip(rows, ks)]
            kw = {key: torch.cat([torch.as_tensor(np.asarray(p[key], np.float32)) for p in kws]) for key in kws[0]}
            target = torch.stack([_down(scenes[i][1][k] & ~(use_gone and w), m)
                                  for i, k, w in zip(rows, ks, without)])
            logits, iou = model.decode(enc, Prompts(torch.arange(batch), **kw))
            inter = ((logits > 0) & (target > 0.5)).flatten(1).sum(1).float()
            union = ((logits > 0) | (target > 0.5)).flatten(1).sum(1).float()
            actual = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
            loss = loss + _loss(logits, target) + F.mse_loss(iou[:, 0], actual)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    model.eval()
    return model


@functools.lru_cache(maxsize=1)
def blob_model() -> ClipSam:
    """The trained blob model (trained once per process; callers must not modify it)."""
    return train_blob_model()


def iou(a: np.ndarray, b: np.ndarray) -> float:
    u = np.count_nonzero(a | b)
    return float(np.count_nonzero(a & b) / u) if u else 1.0


def ball_volume(rng, nz: int = 12, size: int = SIZE, balls=((6, 32, 30, 10.0, 3.5),)):
    """(Z, Y, X) float volume with balls given as (zc, yc, xc, radius in xy, half-height in z)
    and their (Z, Y, X) uint32 labels (ids 1..)."""
    labels = np.zeros((nz, size, size), np.uint32)
    for i, (zc, yc, xc, r, hz) in enumerate(balls, start=1):
        for z in range(nz):
            t = 1 - ((z - zc) / hz) ** 2
            if t > 0.15:
                labels[z][disk((size, size), yc, xc, r * np.sqrt(t))] = i
    vol = np.stack([render([labels[z] == i for i in range(1, len(balls) + 1)], rng, (size, size)) for z in range(nz)])
    return vol, labels
