"""``Segmenter``: embed an image once, then answer clicks, boxes and texts with the decoder only.

From a notebook::

    seg = Segmenter.from_pretrained("demo")
    seg.set_image(image)                                   # (H, W), (H, W, 3) or channel_axis=...
    mask, score = seg.predict(points=[[120, 80]], labels=[1])        # (x, y) = (col, row)
    res = seg.segment_text("nucleus")                       # res.labels (H, W) uint32, res.scores, res.prob
    vol = seg.segment_volume(stack, text="nucleus")         # (Z, Y, X) → 3D labels

Embeddings are cached (see :mod:`.cache`) under the content hash of the normalised model input
and a fingerprint of the weights they depend on, so a new image, another model or a changed
adapter never gets a stale embedding. Images larger than the model input are tiled (see
:mod:`.tiling`): by default when the longest side exceeds 1.5× the model input, with tiles of
the model input size (native resolution) and a halo of 1/8 of that.
"""

from __future__ import annotations

import json
import logging
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from os import PathLike
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from ..checks import check_number
from ..models.clipsam import ClipSam, Encoded, ImageFeatures, Prompts
from ..models.fast import enable_fast_path, fast_inference
from ..models.semantics import text_key
from .cache import EmbeddingCache, PartFingerprints, digest
from .instances import (MIN_AREA, MIN_SCORE, MIN_SUPPORT, NMS_IOU, REGION_MARGIN, TEXT_THRESHOLD, Instances,
                        check_fraction, check_seeds)
from .preprocess import (Frame, frame_for, mask_to_prompt, normalize_image, postprocess_logits,
                         to_model_input)
from .text_instances import to_labels, view_instances
from .tiling import Tile, covering, make_tiles, paste_cores, route, stitch

log = logging.getLogger(__name__)

#: ``progress(done, total, message)``: called on long operations (tiles, slices).
Progress = Callable[[int, int, str], None]

_DECODER_PARTS = ("sam.prompt_encoder.", "sam.mask_decoder.")
_SIDES_KEPT = 4  # views whose decoder image sides are kept (each ~10 MB at vit_b size)


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` if given, else CUDA, then Apple MPS, then CPU. ValueError for a name torch does
    not know or a device this machine lacks (``cuda`` without a GPU, ``cuda:3`` with two)."""
    if device is not None:
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError):  # "Expected one of cpu, cuda, ... device type at start of device string"
            raise ValueError(f"device {device!r} is not a torch device: give cpu, cuda, cuda:N or mps, "
                             "or None to pick the best available") from None
        if dev.type == "cpu":
            return dev
        if dev.type == "mps":
            mps = getattr(torch.backends, "mps", None)
            count = int(mps is not None and mps.is_available())
        else:
            backend = getattr(torch, dev.type, None)
            available = backend is not None and hasattr(backend, "is_available") and backend.is_available()
            count = backend.device_count() if available and hasattr(backend, "device_count") else int(available)
        if (dev.index or 0) >= count:
            have = f"no {dev.type} device" if count == 0 else f"{count} {dev.type} device(s), 0 to {count - 1}"
            raise ValueError(f"device {device!r}: this machine has {have}: use cpu, or None to pick the best available")
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


@dataclass
class TextSegmentation:
    """Result of :meth:`Segmenter.segment_text`.

    labels: (H, W) uint32 instance ids, 0 = background, no overlaps, ids 1..K by decreasing
    score (with grid seeds: by votes, then score); scores: {id: score in [0, 1]} (the decoder's
    predicted IoU); prob: (H, W) float32 semantic probability of the text.
    """

    labels: np.ndarray
    scores: dict[int, float] = field(default_factory=dict)
    prob: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.scores)


@dataclass
class _View:
    """One model input: the whole image, or one tile. ``key`` hashes its normalised pixels."""

    tile: Tile
    frame: Frame
    key: str

    @property
    def offset(self) -> np.ndarray:
        return np.array([self.tile.window[1], self.tile.window[0]], np.float32)  # (x, y)


def _as_entry(obj: ImageFeatures | Encoded) -> dict[str, torch.Tensor]:
    names = ("tokens", "embeddings", "patches", "prompt_tokens", "semantic", "similarity", "stem")
    return {n: getattr(obj, n) for n in names if getattr(obj, n, None) is not None}


class Segmenter:
    """Prompted and text-driven segmentation with one :class:`ClipSam`.

    Args:
        model: the model (moved to ``device`` and put in eval mode).
        device: torch device; default CUDA, then MPS, then CPU.
        cache: an :class:`EmbeddingCache` (shared between segmenters, or with a disk directory);
            default a private 1 GiB memory cache.
        tile_size: tile side in image pixels. None: tiles of the model input size when the
            longest image side exceeds 1.5× the model input (smaller images are resized to the
            input); 0: never tile; an int: tile whenever a side exceeds it.
        halo: overlap margin per tile side (default ``tile_size // 8``).
        progress: default ``progress(done, total, message)`` callback.
        fast: use the inference fast path (:mod:`napari_clipsam.models.fast`); None: on unless
            ``NAPARI_CLIPSAM_FAST=0``. It modifies ``model`` in place (same weights and keys).
    """

    def __init__(self, model: ClipSam, device: str | torch.device | None = None,
                 cache: EmbeddingCache | None = None, tile_size: int | None = None,
                 halo: int | None = None, progress: Progress | None = None, fast: bool | None = None):
        if not isinstance(model, ClipSam):
            raise ValueError(f"Segmenter needs a ClipSam model, got {type(model).__name__}")
        if cache is not None and not isinstance(cache, EmbeddingCache):
            raise ValueError(f"cache must be an EmbeddingCache (e.g. EmbeddingCache(directory='emb/')), "
                             f"got {type(cache).__name__}")
        for name, value in (("tile_size", tile_size), ("halo", halo)):
            if value is not None:
                check_number(value, name, 0, integer=True)
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        # SDPA attention (+ bf16/fp16 autocast where the hardware runs it natively); exact to
        # ~1e-6 in fp32. fast=False or NAPARI_CLIPSAM_FAST=0 keeps segment-anything's modules.
        self.fast_path = enable_fast_path(self.model, enabled=fast)
        self.cache = cache if cache is not None else EmbeddingCache()
        if tile_size is not None and tile_size != 0 and tile_size < 16:
            raise ValueError(f"tile_size={tile_size} is too small: use 0 (no tiling), None (auto) or >= 16")
        self.tile_size = tile_size
        self.halo = halo
        self.progress = progress
        # the input's padding is part of what an embedding depends on (entries made with black padding are not reused)
        cfg = json.dumps(model.config.to_dict(), sort_keys=True, default=str) + f"|pad={model.pad_fill}"
        self._fingerprints = PartFingerprints(model, {
            "features": (lambda n: not n.startswith(_DECODER_PARTS + ("conditioning.",)),
                         f"{cfg}|prefix={model.prefix_blocks}"),
            "encoded": (lambda n: not n.startswith(_DECODER_PARTS), cfg),
            "decoder": (lambda n: n.startswith(_DECODER_PARTS), ""),
        })
        self._seen_fp: str | None = None
        self.reset_image()

    @classmethod
    def from_pretrained(cls, name_or_path: str | PathLike, adapter: str | PathLike | Mapping | None = None,
                        device: str | torch.device | None = None, **kwargs) -> "Segmenter":
        """A segmenter for a registered model name (``"demo"``) or a ClipSam ``.safetensors`` path;
        ``adapter`` (a file or a state dict) is applied on top; ``kwargs`` go to the constructor."""
        from ..models.registry import load_model

        model = load_model(name_or_path)
        if not isinstance(model, ClipSam):
            raise ValueError(f"{name_or_path!r} loads a {type(model).__name__}, not a napari-clipsam model: "
                             "give a ClipSam model name or file")
        seg = cls(model, device=device, **kwargs)
        if adapter is not None:
            seg.set_adapter(adapter)
        return seg

    # ---- model state --------------------------------------------------------------------------
    def model_changed(self) -> None:
        """Declare that the model's weights changed (also detected automatically): embeddings
        are recomputed under a new fingerprint; nothing stale is returned."""
        self._fingerprints.invalidate()
        self._sides.clear()
        self._check_fingerprint()

    def set_adapter(self, adapter: str | PathLike | Mapping[str, torch.Tensor]) -> dict:
        """Apply a fine-tuned adapter: a ``.safetensors`` file written by
        :func:`~napari_clipsam.training.adapter_file.save_adapter` (compatibility checked, LoRA
        attached) or a state dict of weights that exist in the model. Returns the adapter's
        metadata (empty for a state dict). Embeddings are recomputed afterwards."""
        if not isinstance(adapter, Mapping):
            from ..training.adapter_file import load_adapter

            meta = load_adapter(adapter, self.model)
            self.model.to(self.device).eval()
            self.model_changed()
            return meta
        state = dict(adapter)
        own = self.model.state_dict()
        unknown = [k for k in state if k not in own]
        wrong = [k for k in state if k in own and tuple(state[k].shape) != tuple(own[k].shape)]
        if unknown or wrong:
            raise ValueError(f"adapter does not fit this model: unknown weights {unknown[:5]}, "
                             f"wrong shapes {wrong[:5]}; was it trained on another base model?")
        self.model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=False)
        self.model_changed()
        log.info("applied %d adapter tensors", len(state))
        return {}

    def _check_fingerprint(self) -> tuple[str, str, str]:
        """Fingerprints of what the features, the encoded rows and the decoder depend on (one
        pass over the weights; a click pays it once)."""
        fp = self._fingerprints.values()
        f, e, d = fp["features"], fp["encoded"], fp["decoder"]
        if e != self._seen_fp:
            clear = getattr(self.model.semantics, "clear_cache", None)
            if clear is not None and self._seen_fp is not None:
                clear()
            self._seen_fp = e
        return f, e, d

    # ---- image --------------------------------------------------------------------------------
    def reset_image(self) -> None:
        """Forget the current image."""
        self._image: np.ndarray | None = None
        self._views: list[_View] = []
        self._global: _View | None = None
        self._extra: dict[tuple[int, int, int, int], _View] = {}
        self._blank = False
        self._hash = ""
        self._sides: OrderedDict[str, dict] = OrderedDict()  # decoder image sides of recent views

    @property
    def image_shape(self) -> tuple[int, int] | None:
        """(H, W) of the current image, or None."""
        return None if self._image is None else self._image.shape[:2]

    @property
    def tiles(self) -> list[Tile]:
        return [v.tile for v in self._views]

    def set_image(self, image: np.ndarray, channel_axis: int | None = None, channels: Sequence[int] | None = None,
                  embed: bool = True, progress: Progress | None = None) -> None:
        """Set the image to segment: (H, W) grayscale of any dtype, (H, W, 3) RGB, or
        multichannel with ``channel_axis`` (``channels`` picks up to 3, else all are merged).

        Percentile-normalised (see :func:`normalize_image`). With ``embed`` the image features of
        every tile are computed now (cached); otherwise on first use (or by :meth:`embed_tiles`).
        A constant image is allowed: every result on it is empty. Raises ``ValueError`` for bad images.
        """
        self._adopt(normalize_image(image, channel_axis, channels), embed, progress)

    def embed_tiles(self, region: Sequence[float] | None = None, progress: Progress | None = None) -> int:
        """Compute (and cache) the image features of the tiles overlapping ``region``
        ``(y0, x0, y1, x1)`` in image pixels — e.g. the part of a large image on screen — nearest
        the region's centre first; all tiles when ``region`` is None. Tiles already cached cost
        nothing. Returns how many tiles the region covers."""
        self._require_image()
        h, w = self._image.shape[:2]
        if region is None:
            region = (0, 0, h, w)
        r = np.asarray(region, np.float64).reshape(-1)
        if r.shape != (4,) or not np.isfinite(r).all() or r[2] <= r[0] or r[3] <= r[1]:
            raise ValueError(f"region must be (y0, x0, y1, x1) with y1 > y0 and x1 > x0, got {list(region)}")
        order = covering(self.tiles, np.clip(r, 0, [h, w, h, w]))
        if self._blank:
            return len(order)
        report = progress or self.progress
        for done, i in enumerate(order, start=1):
            self._features(self._views[i])
            if report:
                report(done, len(order), "embedding")
        return len(order)

    def set_normalized(self, image01: np.ndarray, embed: bool = True, progress: Progress | None = None) -> None:
        """Like :meth:`set_image` for an already normalised (H, W, 3) float image in [0, 1]. The
        segmenter keeps a copy: changing the caller's array afterwards changes nothing here."""
        arr = np.asarray(image01, np.float32)
        if isinstance(image01, np.ndarray) and np.shares_memory(arr, image01):
            arr = arr.copy()  # the embedding (lazy for tiles) must be of the pixels hashed now
        self._adopt(arr, embed, progress)

    def _adopt(self, image01: np.ndarray, embed: bool, progress: Progress | None) -> None:
        """Set a normalised (H, W, 3) float32 image that nothing else holds."""
        if image01.ndim != 3 or image01.shape[-1] != 3 or min(image01.shape[:2]) < 2:
            raise ValueError(f"normalised image must be (H, W, 3) with H, W >= 2, got {image01.shape}")
        lo, hi = float(image01.min()), float(image01.max())  # NaN propagates into both
        if not (0.0 <= lo <= hi <= 1.0):
            raise ValueError(f"a normalised image has values in [0, 1], got {lo:g} to {hi:g}: give raw data to "
                             "set_image, which normalises it")
        self.reset_image()  # only now: a refused image leaves the current one in place
        self._image = image01
        self._blank = lo == hi  # constant (e.g. flat grey with a volume's limits): nothing to find
        self._hash = digest(image01)
        s = self.model.img_size
        self._views = [_View(t, frame_for(t.shape, s), digest(self._hash, t.window, s))
                       for t in self._tiles_for(image01.shape[:2])]
        if len(self._views) > 1:
            log.info("image %s split into %d tiles", image01.shape[:2], len(self._views))
        if embed:
            self.embed_tiles(progress=progress)

    def _tiles_for(self, shape: tuple[int, int]) -> list[Tile]:
        h, w = int(shape[0]), int(shape[1])
        s = self.model.img_size
        size = self.tile_size
        if size is None:
            tiled, size = max(h, w) > 1.5 * s, s
        else:
            tiled = size > 0 and max(h, w) > size
        if not tiled:
            return [Tile((0, 0, h, w), (0, 0, h, w))]
        halo = self.halo if self.halo is not None else size // 8
        return make_tiles((h, w), size, halo)

    def _global_view(self) -> _View:
        """The whole image resized to the model input (for prompts larger than a tile)."""
        if self._global is None:
            h, w = self._image.shape[:2]
            t = Tile((0, 0, h, w), (0, 0, h, w))
            s = self.model.img_size
            self._global = _View(t, frame_for((h, w), s), digest(self._hash, t.window, s, "global"))
        return self._global

    def _require_image(self) -> None:
        if self._image is None:
            raise RuntimeError("no image set: call set_image(image) before predict/segment_text")

    # ---- embeddings ---------------------------------------------------------------------------
    def _input(self, view: _View) -> torch.Tensor:
        y0, x0, y1, x1 = view.tile.window
        t, _ = to_model_input(self._image[y0:y1, x0:x1], self.model.img_size, self.model.pad_fill)
        return t[None].to(self.device)

    def _cached(self, key: str, compute: Callable[[], ImageFeatures | Encoded]) -> dict[str, torch.Tensor]:
        entry = self.cache.get(key)
        if entry is None:
            with fast_inference(self.model):
                entry = _as_entry(compute())
            self.cache.put(key, entry)
        return {k: v.to(self.device) for k, v in entry.items()}

    def _features(self, view: _View, fp: str | None = None) -> ImageFeatures:
        fp = self._check_fingerprint()[0] if fp is None else fp
        e = self._cached(digest("features", fp, view.key), lambda: self.model.embed_image(self._input(view)))
        return ImageFeatures(e.get("tokens"), e.get("embeddings"), e["patches"], e.get("stem"))

    def _encoded(self, view: _View, text: str | None) -> Encoded:
        f, fp, dec = self._check_fingerprint()
        if text is None and not self.model.text_dependent_encoder:
            feats = self._features(view, f)
            return Encoded(embeddings=feats.embeddings, texts=(None,), stem=feats.stem,
                           sides=self._sides_of(digest("features", f, view.key, dec)))
        key = digest("encoded", fp, view.key, text)
        e = self._cached(key, lambda: self.model.condition(self._features(view, f), [text]))
        return Encoded(e["embeddings"], e.get("prompt_tokens"), e.get("semantic"), e.get("similarity"), (text,),
                       sides=self._sides_of(digest(key, dec)), stem=e.get("stem"))

    def _sides_of(self, key: str) -> dict:
        """The decoder's image sides of an encoded view (kept for the last few views, so clicks on
        one image and text reuse them; ``key`` includes the decoder's weights)."""
        sides = self._sides.pop(key, None)
        sides = {} if sides is None else sides
        self._sides[key] = sides
        while len(self._sides) > _SIDES_KEPT:
            self._sides.popitem(last=False)
        return sides

    # ---- prompts ------------------------------------------------------------------------------
    def _check_prompts(self, points, labels, box, mask_input):
        h, w = self._image.shape[:2]
        if points is not None:
            try:
                points = np.asarray(points, np.float32)
            except (TypeError, ValueError) as err:
                raise ValueError(f"points must be (N, 2) numbers as (x, y) = (col, row): {err}") from None
            if points.ndim == 1 and points.shape == (2,):
                points = points[None]
            if points.ndim != 2 or points.shape[1] != 2 or not len(points):
                raise ValueError(f"points must be (N, 2) as (x, y) = (col, row), got shape {points.shape}")
            if not np.isfinite(points).all():
                raise ValueError("points contain NaN or inf")
            # pixel i spans [i - 0.5, i + 0.5] (napari's convention): anywhere on a pixel is on it
            if (points < -0.5).any() or (points[:, 0] > w - 0.5).any() or (points[:, 1] > h - 0.5).any():
                raise ValueError(f"points {points.tolist()} lie outside the image (-0.5 <= x <= {w - 0.5}, "
                                 f"-0.5 <= y <= {h - 0.5})")
            points = np.clip(points, 0, [w - 1, h - 1]).astype(np.float32)
            labels = np.ones(len(points), np.int64) if labels is None else np.asarray(labels)
            if labels.shape != (len(points),):
                raise ValueError(f"labels must have shape ({len(points)},), one per point, got {labels.shape}")
            if not np.isin(labels, (0, 1)).all():
                raise ValueError(f"labels must be 1 (positive) or 0 (negative), got {np.unique(labels).tolist()}")
            labels = labels.astype(np.int64)
        elif labels is not None:
            raise ValueError("labels given without points")
        if box is not None:
            box = np.asarray(box, np.float32).reshape(-1)
            if box.shape != (4,) or not np.isfinite(box).all() or box[2] <= box[0] or box[3] <= box[1]:
                raise ValueError(f"box must be (x0, y0, x1, y1) with x1 > x0 and y1 > y0, got {box.tolist()}")
            box = np.clip(box, 0, [w, h, w, h]).astype(np.float32)
            if box[2] <= box[0] or box[3] <= box[1]:
                raise ValueError(f"box lies outside the image ({w} × {h})")
        if mask_input is not None:
            mask_input = np.asarray(mask_input)
            if mask_input.dtype != bool:
                if not (np.issubdtype(mask_input.dtype, np.number) and np.isin(mask_input, (0, 1)).all()):
                    raise ValueError("mask_input must be a boolean (H, W) mask (or 0/1): from the logits of "
                                     "predict_torch, pass logits > 0")
                mask_input = mask_input.astype(bool)
            if mask_input.shape != (h, w):
                raise ValueError(f"mask_input must be a (H, W) = {(h, w)} boolean mask, got {mask_input.shape}")
            if not mask_input.any():
                raise ValueError("mask_input is empty (all False): give a mask with the object in it, or leave it out")
        return points, labels, box, mask_input

    def _route(self, points, box, mask_input) -> _View:
        ys, xs = [], []
        if points is not None:
            xs += [points[:, 0].min(), points[:, 0].max() + 1]
            ys += [points[:, 1].min(), points[:, 1].max() + 1]
        if box is not None:
            xs += [box[0], box[2]]
            ys += [box[1], box[3]]
        if mask_input is not None:
            rows, cols = np.flatnonzero(mask_input.any(1)), np.flatnonzero(mask_input.any(0))
            xs += [cols[0], cols[-1] + 1]
            ys += [rows[0], rows[-1] + 1]
        if len(self._views) == 1:
            return self._views[0]
        bbox = (min(ys), min(xs), max(ys), max(xs))
        i = route([v.tile for v in self._views], bbox)
        if i is not None:
            return self._views[i]
        return self._centred_view(bbox)

    def _centred_view(self, bbox) -> _View:
        """A tile-sized window centred on a prompt that no tile contains (an object across a
        seam); the whole image at reduced resolution if the prompt is larger than a tile."""
        h, w = self._image.shape[:2]
        th, tw = self._views[0].tile.shape
        y0, x0, y1, x1 = bbox
        if y1 - y0 > th or x1 - x0 > tw:
            log.warning("prompt larger than a tile: predicting on the whole image at reduced resolution")
            return self._global_view()
        cy = int(min(max(0, round((y0 + y1 - th) / 2)), h - th))
        cx = int(min(max(0, round((x0 + x1 - tw) / 2)), w - tw))
        window = (cy, cx, cy + th, cx + tw)
        if window not in self._extra:
            s = self.model.img_size
            self._extra[window] = _View(Tile(window, window), frame_for((th, tw), s), digest(self._hash, window, s))
        return self._extra[window]

    def _decode_view(self, view: _View, text, points, labels, box, mask_input, multimask):
        """→ (logits (M, h, w) over the view's window, predicted IoU (M,))."""
        enc = self._encoded(view, text)
        y0, x0, y1, x1 = view.tile.window
        kw = {}
        if points is not None:
            kw["points"] = torch.from_numpy(view.frame.to_input(points - view.offset))[None]
            kw["labels"] = torch.from_numpy(labels)[None]
        if box is not None:
            kw["boxes"] = torch.from_numpy(view.frame.to_input((box.reshape(2, 2) - view.offset)).reshape(1, 4))
        if mask_input is not None:
            kw["masks"] = mask_to_prompt(mask_input[y0:y1, x0:x1], view.frame, self.model.mask_size)
        with fast_inference(self.model):
            low, iou = self.model.decode(enc, Prompts(torch.zeros(1), **kw), multimask)
            logits = postprocess_logits(low, view.frame)[0]
        return logits, iou[0]

    def predict_torch(self, points: np.ndarray | None = None, labels: np.ndarray | None = None,
                      box: np.ndarray | None = None, text: str | None = None, multimask: bool = False,
                      mask_input: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The torch twin of :meth:`predict`: (logits (M, H, W) at image size, predicted IoU (M,)),
        M = 3 with ``multimask`` else 1; pixels outside the routed tile get -inf."""
        self._require_image()
        text = self._check_text(text, required=False)
        points, labels, box, mask_input = self._check_prompts(points, labels, box, mask_input)
        if points is None and box is None and mask_input is None:
            if text is None:
                raise ValueError("predict needs points, a box, a mask_input or a text")
            return self._predict_text_only(text, multimask)
        view = self._route(points, box, mask_input)
        logits, iou = self._decode_view(view, text, points, labels, box, mask_input, multimask)
        h, w = self._image.shape[:2]
        y0, x0, y1, x1 = view.tile.window
        if (y0, x0, y1, x1) == (0, 0, h, w):  # the view is the whole image
            return logits.cpu(), iou.cpu()
        full = torch.full((logits.shape[0], h, w), -math.inf)
        full[:, y0:y1, x0:x1] = logits.cpu()
        return full, iou.cpu()

    def _predict_text_only(self, text: str, multimask: bool) -> tuple[torch.Tensor, torch.Tensor]:
        parts, ious, areas = [], [], []
        for view in self._views:
            logits, iou = self._decode_view(view, text, None, None, None, None, multimask)
            parts.append(logits.cpu())
            ious.append(iou.cpu())
            areas.append((logits > 0).flatten(1).sum(1).float().cpu())
        h, w = self._image.shape[:2]
        full = torch.stack([torch.from_numpy(paste_cores([v.tile for v in self._views], [p[m].numpy() for p in parts],
                                                         (h, w))) for m in range(parts[0].shape[0])])
        weights = torch.stack(areas) + 1e-6
        return full, (torch.stack(ious) * weights).sum(0) / weights.sum(0)

    def predict(self, points: np.ndarray | Sequence | None = None, labels: np.ndarray | Sequence | None = None,
                box: np.ndarray | Sequence | None = None, text: str | None = None, multimask: bool = False,
                mask_input: np.ndarray | None = None) -> tuple[np.ndarray, float]:
        """One object from prompts → (mask (H, W) bool, score in [0, 1]).

        points: (N, 2) (x, y) = (col, row) image pixels; labels: (N,) 1 positive / 0 negative
        (default all positive); box: (x0, y0, x1, y1); text: a concept (conditions the decoder;
        alone it asks for the text's mask); mask_input: (H, W) bool prior mask (e.g. the
        neighbouring slice's). With ``multimask`` the best of SAM's three masks is returned
        (SAM's pretrained decoder; the bundled demo was trained for single masks only, its three
        are poor). Only the decoder runs once the image (and text) is embedded.
        """
        self._require_image()
        h, w = self._image.shape[:2]
        if self._blank:
            self._check_text(text, required=False)
            self._check_prompts(points, labels, box, mask_input)
            return np.zeros((h, w), bool), 0.0
        logits, iou = self.predict_torch(points, labels, box, text, multimask, mask_input)
        best = int(torch.argmax(iou))
        return (logits[best] > 0).numpy(), float(iou[best].clamp(0, 1))

    @staticmethod
    def _check_text(text, required: bool = True) -> str | None:
        if text is None and not required:
            return None
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"text must be a non-empty string (a concept such as 'nucleus'), got {text!r}")
        return text_key(text)

    # ---- text → instances ---------------------------------------------------------------------
    def segment_text(self, text: str, threshold: float = TEXT_THRESHOLD, min_area: int = MIN_AREA,
                     min_score: float = MIN_SCORE, nms_iou: float = NMS_IOU, merge_iou: float = 0.5,
                     region_margin: float = REGION_MARGIN,
                     seeds: str = "grid", min_support: float = MIN_SUPPORT,
                     progress: Progress | None = None) -> TextSegmentation:
        """All instances of ``text`` in the current image.

        The text's semantic map (``prob``) is thresholded at ``threshold`` into regions, and the
        regions are turned into prompts by ``seeds``:

        - ``"grid"`` (default): points on a grid inside the regions (see :func:`~napari_clipsam.models.conditioning.grid_seeds`), each
          decoded like a click; masks many points agree on are kept first, masks overlapping a
          kept one by IoU > ``nms_iou`` are dropped (:func:`~napari_clipsam.engine.instances.consensus_nms`). Touching objects
          merged into one region still get one mask each.
        - ``"regions"``: one prompt per region (large or necked regions split, see
          :func:`~napari_clipsam.models.conditioning.pseudo_prompts`): its best point with the connected area around it as mask
          prompt. One decode per region — faster, but touching objects may merge; needs a
          decoder trained with mask prompts (SAM's pretrained one, the demo's).

        Each mask is confined to its connected area grown by ``region_margin`` × its equivalent
        diameter (at least two low-resolution cells); masks under ``min_area`` pixels or
        ``min_score`` predicted IoU are dropped, and so are masks whose mean text probability
        (``prob`` inside the mask) is under ``min_support`` — a seed on a faint spot of the map
        whose mask lands on an object of another kind; on tiled images instances from neighbouring
        tiles agreeing (IoU ≥ ``merge_iou``) in their overlap are merged into one.
        """
        self._require_image()
        text = self._check_text(text)
        check_seeds(seeds)
        threshold, min_score, min_support, nms_iou, merge_iou = (
            check_fraction(v, name) for v, name in ((threshold, "threshold"), (min_score, "min_score"),
                                                    (min_support, "min_support"), (nms_iou, "nms_iou"),
                                                    (merge_iou, "merge_iou")))
        min_area = check_number(min_area, "min_area", 0, integer=True)
        region_margin = check_number(region_margin, "region_margin", 0)
        h, w = self._image.shape[:2]
        if self._blank:
            return TextSegmentation(np.zeros((h, w), np.uint32), {}, np.zeros((h, w), np.float32))
        report = progress or self.progress
        parts, probs = [], []
        single = len(self._views) == 1  # one view: report its decode chunks instead
        for i, view in enumerate(self._views):
            inst, prob = view_instances(self.model, self._encoded(view, text), view.frame, threshold, min_area,
                                        region_margin, seeds, nms_iou, min_support, offset=view.tile.window[:2],
                                        source=i, report=report if single else None)
            parts.append(inst)
            probs.append(prob)
            if report and not single:
                report(i + 1, len(self._views), "segment_text")
        inst = Instances.cat(parts)
        tiles = [v.tile for v in self._views]
        if len(tiles) > 1:
            inst = stitch(inst, tiles, merge_iou)
        labels, scores = to_labels(inst, (h, w), min_area, min_score, nms_iou)
        return TextSegmentation(labels, scores, paste_cores(tiles, probs, (h, w)))

    # ---- volumes ------------------------------------------------------------------------------
    def segment_volume(self, volume: np.ndarray, z: int | None = None, points=None, labels=None, box=None,
                       text: str | None = None, **kwargs):
        """(Z, Y, X) volume → :class:`~napari_clipsam.engine.volume.VolumeSegmentation`.

        With points/box on slice ``z``: propagate that object up and down through z. With only
        ``text``: instances per slice linked across z into 3D labels. See :mod:`.volume` for the
        options (thresholds, ``channel_axis``, ``progress``). The last slice processed stays set.
        """
        from .volume import segment_volume

        return segment_volume(self, volume, z=z, points=points, labels=labels, box=box, text=text, **kwargs)


__all__ = ["Segmenter", "TextSegmentation", "resolve_device"]
