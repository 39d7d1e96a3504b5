"""``ClipSam``: segment-anything's parts + an open_clip model + one conditioning strategy.

Flow (embed once, prompt many)::

    feats = model.embed_image(images)        # text-independent: SAM encoder prefix + CLIP patches
    enc = model.condition(feats, texts)      # text-dependent: adapted blocks / prompt tokens / map
    masks, iou = model.decode(enc, prompts)  # mask decoder only

Images enter as (B, 3, S, S) float RGB in [0, 1], S = ``config.sam.img_size`` (the engine
normalises, resizes and pads). Prompts are in input pixel coordinates of that S×S frame.
Masks come out as low-resolution logits (N, M, 4h, 4w) where h = S / patch size.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from segment_anything.modeling import Sam
from torch import nn

from .clip_parts import ClipConfig, build_clip, clip_embed_dim, clip_text_width
from .conditioning import Context, build_conditioning
from .decoding import check_windows, image_side, two_way, upscale_masks
from .sam_parts import SamConfig, build_sam
from .semantics import DEFAULT_TEMPLATES, ClipSemantics, TextFeatures, resize_to_grid, similarity_map
from .stem_skip import run_stem, stem_tap


@dataclass
class ClipSamConfig:
    """Everything needed to rebuild a ClipSam exactly (saved with checkpoints and adapters)."""

    sam: SamConfig = field(default_factory=SamConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    strategy: str = "adapter"
    strategy_options: dict = field(default_factory=dict)
    templates: tuple[str, ...] = DEFAULT_TEMPLATES
    surgery: bool = True

    def to_dict(self) -> dict:
        d = asdict(self)
        d["sam"] = self.sam.to_dict()
        d["clip"] = self.clip.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ClipSamConfig":
        return cls(
            sam=SamConfig.from_dict(d["sam"]),
            clip=ClipConfig.from_dict(d["clip"]),
            strategy=d.get("strategy", "adapter"),
            strategy_options=dict(d.get("strategy_options", {})),
            templates=tuple(d.get("templates", DEFAULT_TEMPLATES)),
            surgery=bool(d.get("surgery", True)),
        )


@dataclass
class ImageFeatures:
    """Text-independent features of B images.

    tokens: (B, h, w, C) encoder tokens after the text-independent prefix of blocks, or None when
    the whole encoder is text-independent; embeddings: (B, P, h, w) final SAM embeddings in that
    case, else None; patches: (B, D, g, g) CLIP patch features; stem: (B, Cs, 4h, 4w) patch-stem
    features for the mask head's skip (models with ``SamConfig.stem_skip``), else None.
    """

    tokens: torch.Tensor | None
    embeddings: torch.Tensor | None
    patches: torch.Tensor
    stem: torch.Tensor | None = None

    def index(self, idx: Sequence[int] | torch.Tensor) -> "ImageFeatures":
        idx = torch.as_tensor(idx, dtype=torch.long, device=self.patches.device)
        pick = lambda t: None if t is None else t[idx]  # noqa: E731
        return ImageFeatures(pick(self.tokens), pick(self.embeddings), self.patches[idx], pick(self.stem))


@dataclass
class Encoded:
    """B (image, text) rows ready for decoding.

    embeddings: (B, P, h, w); prompt_tokens: (B, K, P) extra sparse tokens or None; semantic:
    (B, 1, 4h, 4w) strategy semantic logits or None; similarity: (B, 1, h, w) CLIP similarity
    on SAM's grid or None without text; texts: the row texts (None rows without text); sides:
    the decoder's prompt-independent image side per row, filled by :meth:`ClipSam.decode` in
    inference (hand the same dict to a later Encoded of the same rows to reuse it; see
    :mod:`~napari_clipsam.models.decoding`); stem: (B, Cs, 4h, 4w) patch-stem features for the
    mask head's skip, or None (models without ``SamConfig.stem_skip``).
    """

    embeddings: torch.Tensor
    prompt_tokens: torch.Tensor | None = None
    semantic: torch.Tensor | None = None
    similarity: torch.Tensor | None = None
    texts: tuple[str | None, ...] = ()
    sides: dict = field(default_factory=dict, repr=False, compare=False)
    stem: torch.Tensor | None = None


@dataclass
class Prompts:
    """N prompts, each for one row of an :class:`Encoded`, all with the same number of points.

    image_index: (N,) row of each prompt; points: (N, P, 2) (x, y) input pixels or None;
    labels: (N, P) 1 positive / 0 negative / -1 padding; boxes: (N, 4) x0, y0, x1, y1 or None;
    masks: (N, 1, 4h, 4w) mask-prompt logits or None.
    """

    image_index: torch.Tensor
    points: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    boxes: torch.Tensor | None = None
    masks: torch.Tensor | None = None

    def __post_init__(self):
        self.image_index = torch.as_tensor(self.image_index, dtype=torch.long).reshape(-1)
        n = len(self.image_index)
        if (self.points is None) != (self.labels is None):
            raise ValueError("points and labels must be given together")
        if self.points is not None:
            self.points = torch.as_tensor(self.points, dtype=torch.float32)
            self.labels = torch.as_tensor(self.labels, dtype=torch.long)
            if self.points.ndim != 3 or self.points.shape[0] != n or self.points.shape[-1] != 2:
                raise ValueError(f"points must be (N={n}, P, 2), got {tuple(self.points.shape)}")
            if self.labels.shape != self.points.shape[:2]:
                raise ValueError(f"labels must be (N, P)={tuple(self.points.shape[:2])}, got {tuple(self.labels.shape)}")
        if self.boxes is not None:
            self.boxes = torch.as_tensor(self.boxes, dtype=torch.float32)
            if self.boxes.shape != (n, 4):
                raise ValueError(f"boxes must be (N={n}, 4), got {tuple(self.boxes.shape)}")
            if n and bool((self.boxes[:, 2:] < self.boxes[:, :2]).any()):
                raise ValueError("boxes must be (x0, y0, x1, y1) with x1 >= x0 and y1 >= y0")
        if self.masks is not None:
            self.masks = torch.as_tensor(self.masks, dtype=torch.float32)
            if self.masks.ndim != 4 or self.masks.shape[:2] != (n, 1):
                raise ValueError(f"masks must be (N={n}, 1, H, W), got {tuple(self.masks.shape)}")

    def __len__(self) -> int:
        return len(self.image_index)

    def to(self, device: torch.device | str) -> "Prompts":
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Prompts(self.image_index.to(device), mv(self.points), mv(self.labels), mv(self.boxes), mv(self.masks))

    def __getitem__(self, rows: slice) -> "Prompts":
        """The prompts of ``rows`` (a slice), e.g. to decode many prompts in chunks."""
        if not isinstance(rows, slice):
            raise TypeError(f"Prompts can be indexed by a slice only, got {type(rows).__name__}")
        cut = lambda t: None if t is None else t[rows]  # noqa: E731
        return Prompts(self.image_index[rows], cut(self.points), cut(self.labels), cut(self.boxes), cut(self.masks))


class ClipSam(nn.Module):
    """A text-conditioned SAM. See the module docstring for the flow.

    ``sam`` and ``clip`` may be given (e.g. loaded from official checkpoints); otherwise they are
    built with random weights from ``config``.
    """

    def __init__(self, config: ClipSamConfig, sam: Sam | None = None,
                 clip: tuple[nn.Module, object] | None = None):
        super().__init__()
        self.config = config
        self.sam = sam if sam is not None else build_sam(config.sam)
        clip_model, tokenizer = clip if clip is not None else build_clip(config.clip)
        self.semantics = ClipSemantics(clip_model, tokenizer, config.clip.image_size, config.clip.mean,
                                       config.clip.std, config.templates, config.surgery)
        patch = clip_model.visual.patch_size
        patch = patch[0] if isinstance(patch, (tuple, list)) else patch
        self.conditioning = build_conditioning(
            config.strategy, sam=config.sam, clip_dim=clip_embed_dim(clip_model),
            text_width=clip_text_width(clip_model), clip_grid=config.clip.image_size // patch,
            **config.strategy_options,
        )
        # Text-independent encoder blocks: every block up to and including the first adapted one
        # (its adapter follows it), so a new text re-runs only the blocks after that one.
        adapted = self.conditioning.adapted_blocks
        self.prefix_blocks = min(adapted) + 1 if adapted else config.sam.encoder_depth
        self.file_metadata: dict = {}
        #: The file this model was loaded from (set by :meth:`load`; "" when built in memory).
        self.source: str = ""
        self.eval()

    # ---- helpers ------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.sam.pixel_mean.device

    @property
    def img_size(self) -> int:
        return self.config.sam.img_size

    @property
    def pad_fill(self) -> tuple[float, float, float]:
        """The [0, 1] value padding a non-square input: SAM's pixel mean (0 once normalised)."""
        return tuple(v / 255.0 for v in self.config.sam.pixel_mean)

    @property
    def embed_size(self) -> int:
        return self.config.sam.embed_size

    @property
    def mask_size(self) -> int:
        """Side of the low-resolution mask logits (4× the embedding grid)."""
        return 4 * self.embed_size

    @property
    def text_dependent_encoder(self) -> bool:
        """True when the strategy adapts encoder blocks: the embedding then depends on the text."""
        return bool(self.conditioning.adapted_blocks)

    def _check_weights(self) -> None:
        dtype = self.sam.mask_decoder.iou_token.weight.dtype
        if dtype != torch.float32:
            raise ValueError(f"ClipSam runs with fp32 weights, this one has {dtype}: move it back with .float(); "
                             "for bf16/fp16 speed use autocast (napari_clipsam.models.fast.fast_inference)")

    def _check_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) images with values in [0, 1] (any float dtype) → fp32; ValueError otherwise."""
        s = self.img_size
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3 \
                or images.shape[2:] != (s, s) or images.shape[0] == 0:
            got = tuple(images.shape) if hasattr(images, "shape") else type(images).__name__
            raise ValueError(f"images must be a (B ≥ 1, 3, {s}, {s}) tensor of floats in [0, 1], got {got}")
        if not images.is_floating_point():
            raise ValueError(f"images must be floats in [0, 1], got dtype {images.dtype}: normalise them first "
                             "(napari_clipsam.engine.preprocess.normalize_image, to_model_input)")
        lo, hi = float(images.min()), float(images.max())
        if not (-1e-3 <= lo and hi <= 1 + 1e-3):
            raise ValueError(f"images must be floats in [0, 1], got values from {lo:g} to {hi:g}: normalise them "
                             "first (napari_clipsam.engine.preprocess.normalize_image, to_model_input)")
        self._check_weights()
        return images.float()

    # ---- encoder ------------------------------------------------------------------------------
    def embed_image(self, images: torch.Tensor) -> ImageFeatures:
        """Text-independent features of (B, 3, S, S) images in [0, 1]."""
        images = self._check_images(images)
        x, stem = self.patch_tokens(images)
        return self.finish_features(self.encoder_tokens(None, tokens=x), self.semantics.patch_features(images), stem)

    def patch_tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, h, w, C) tokens entering the first encoder block (patch embedding + position) and
        the (B, Cs, 4h, 4w) patch-stem features the mask head's skip reads (None without one,
        ``SamConfig.stem_skip``), from one pass through the stem."""
        enc, c = self.sam.image_encoder, self.config.sam
        x = (images * 255.0 - self.sam.pixel_mean) / self.sam.pixel_std
        if c.stem_skip:
            x, stem = run_stem(enc.patch_embed.proj, x, stem_tap(c.patch_stem, c.patch_size))
            x = x.permute(0, 2, 3, 1)  # (B, C, h, w) → (B, h, w, C), as segment-anything's PatchEmbed
        else:
            x, stem = enc.patch_embed(x), None
        x = x.contiguous()  # a strided view slows every element-wise op after it (fast.FastPatchEmbed)
        if enc.pos_embed is not None:
            x = x + enc.pos_embed
        return x, stem

    def encoder_tokens(self, images: torch.Tensor, start: int = 0, stop: int | None = None,
                       tokens: torch.Tensor | None = None) -> torch.Tensor:
        """(B, h, w, C) encoder tokens after blocks ``[start, stop)`` (default: the text-independent
        prefix), starting from ``tokens`` (the input of block ``start``) or, without them and with
        ``start == 0``, from ``images`` (patch embedding + position)."""
        enc = self.sam.image_encoder
        stop = self.prefix_blocks if stop is None else stop
        if tokens is not None:
            x = tokens
        elif start == 0:
            x = self.patch_tokens(images)[0]
        else:
            raise ValueError(f"encoder_tokens from block {start} needs the tokens of block {start - 1}")
        for blk in list(enc.blocks)[start:stop]:
            x = blk(x)
        return x

    def finish_features(self, tokens: torch.Tensor, patches: torch.Tensor,
                        stem: torch.Tensor | None = None) -> ImageFeatures:
        """:class:`ImageFeatures` from the tokens after the text-independent prefix."""
        if self.text_dependent_encoder:
            return ImageFeatures(tokens=tokens, embeddings=None, patches=patches, stem=stem)
        return ImageFeatures(tokens=None, embeddings=self.sam.image_encoder.neck(tokens.permute(0, 3, 1, 2)),
                             patches=patches, stem=stem)

    def text_features(self, texts: Sequence[str]) -> TextFeatures:
        if isinstance(texts, str):
            raise TypeError(f"texts must be a list of strings, got the single string {texts!r}: pass [{texts!r}]")
        return self.semantics.text_features(list(texts))

    def condition(self, feats: ImageFeatures, texts: Sequence[str | None] | None) -> Encoded:
        """Apply texts (one per row, or None for plain SAM) to image features."""
        b = feats.patches.shape[0]
        if isinstance(texts, str):
            raise TypeError(f"texts must give one text per image (a list), got the single string {texts!r}: "
                            f"pass [{texts!r}] * {b}")
        texts = tuple(texts) if texts is not None else (None,) * b
        if len(texts) != b:
            raise ValueError(f"got {len(texts)} texts for {b} images: give one text per image (or None)")
        has_text = [t is not None for t in texts]
        if any(has_text) and not all(has_text):
            raise ValueError("either every image in a batch has a text or none has: split the batch")
        enc = self.sam.image_encoder
        if not any(has_text):
            emb = feats.embeddings
            if emb is None:
                x = feats.tokens
                for blk in list(enc.blocks)[self.prefix_blocks:]:
                    x = blk(x)
                emb = enc.neck(x.permute(0, 3, 1, 2))
            return Encoded(embeddings=emb, texts=texts, stem=feats.stem)
        text = self.text_features(texts)
        sim = similarity_map(feats.patches, text.embedding)
        ctx = Context(text=text, patches=feats.patches, similarity=sim)
        emb = feats.embeddings
        if emb is None:
            state = self.conditioning.prepare(ctx, self.embed_size)
            adapted = set(self.conditioning.adapted_blocks)
            x = feats.tokens  # after block prefix_blocks - 1, the first adapted one
            for i in range(self.prefix_blocks - 1, len(enc.blocks)):
                if i >= self.prefix_blocks:
                    x = enc.blocks[i](x)
                if i in adapted:
                    x = self.conditioning.adapt(i, x, state)
            emb = enc.neck(x.permute(0, 3, 1, 2))
        return Encoded(
            embeddings=emb,
            prompt_tokens=self.conditioning.prompt_tokens(ctx),
            semantic=self.conditioning.semantic_logits(ctx, self.mask_size),
            similarity=resize_to_grid(sim, self.embed_size),
            texts=texts,
            stem=feats.stem,
        )

    def encode(self, images: torch.Tensor, texts: Sequence[str | None] | None = None) -> Encoded:
        """(B, 3, S, S) images in [0, 1] and one text per image → :class:`Encoded`."""
        return self.condition(self.embed_image(images), texts)

    # ---- decoder ------------------------------------------------------------------------------
    def decode(self, enc: Encoded, prompts: Prompts | Sequence[Prompts], multimask: bool = False,
               windows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Masks for prompts → (low-res logits (N, M, 4h, 4w), predicted IoU (N, M)).

        M = 3 with ``multimask`` else 1. Each prompt is decoded against its own row's embedding
        (unlike segment-anything's ``predict_masks``, which repeats every embedding per prompt).
        A list of :class:`Prompts` (different point counts) is decoded group by group and
        concatenated in order.

        ``windows`` (N, 4) integer boxes (y0, x0, y1, x1), end exclusive, in low-res mask pixels:
        where only part of each mask is wanted (``segment_text`` keeps each instance near its
        region). A prompt's logits are then exact inside its box rounded out to the 4-pixel
        token grid and :data:`~napari_clipsam.models.decoding.OUTSIDE` elsewhere; the mask head
        runs on those tokens only (segment-anything's stock head; see
        :func:`~napari_clipsam.models.decoding.upscale_masks`). The predicted IoU is unchanged.
        """
        if not isinstance(prompts, Prompts):
            sizes = [len(p) for p in prompts]
            if windows is not None and len(windows) != sum(sizes):
                raise ValueError(f"windows: {len(windows)} boxes for {sum(sizes)} prompts")
            parts = [None] * len(sizes) if windows is None else torch.split(windows, sizes)
            outs = [self.decode(enc, p, multimask, w) for p, w in zip(prompts, parts)]
            return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])
        p = prompts.to(self.device)
        n = len(p)
        self._check_weights()
        m = self.sam.mask_decoder.num_mask_tokens - 1 if multimask else 1
        if n == 0:
            size = self.mask_size
            return torch.zeros(0, m, size, size, device=self.device), torch.zeros(0, m, device=self.device)
        if p.masks is not None and p.masks.shape[2:] != (self.mask_size, self.mask_size):
            raise ValueError(f"mask prompts must be (N, 1, {self.mask_size}, {self.mask_size}) low-resolution logits "
                             f"(mask_size), got {tuple(p.masks.shape)}")
        tokens_box = None if windows is None else self._token_windows(windows, n)
        b = enc.embeddings.shape[0]
        if n and (int(p.image_index.min()) < 0 or int(p.image_index.max()) >= b):
            raise ValueError(f"prompt image_index out of range for {b} encoded images")
        pe = self.sam.prompt_encoder
        masks, dense_of = p.masks, "prompt"  # what the dense input depends on
        if masks is None:
            dense_of = "none"
            if p.points is None and p.boxes is None and enc.semantic is not None:
                masks, dense_of = enc.semantic.index_select(0, p.image_index), "semantic"  # text only: the text's map
        points = (p.points, p.labels) if p.points is not None else None
        sparse, dense = pe(points=points, boxes=p.boxes, masks=masks)
        if sparse.shape[0] != n:
            sparse = sparse.expand(n, -1, -1)
        if enc.prompt_tokens is not None:
            sparse = torch.cat([sparse, enc.prompt_tokens.index_select(0, p.image_index).to(sparse.dtype)], dim=1)
        md = self.sam.mask_decoder
        skip = getattr(md, "stem_skip", None)
        if skip is not None and enc.stem is None:
            raise ValueError("this model's mask head reads patch-stem features (SamConfig.stem_skip): "
                             "encode with embed_image/encode, which fill Encoded.stem")
        stem = None if skip is None else (enc.stem, p.image_index)
        out_tokens = torch.cat([md.iou_token.weight, md.mask_tokens.weight], dim=0)
        tokens = torch.cat([out_tokens[None].expand(n, -1, -1).to(sparse.dtype), sparse], dim=1)
        # _masks_from reads only the IoU token and the mask tokens it returns: all of them for
        # multimask, else the first (the final attention's rows are independent)
        keep = len(out_tokens) if multimask else 2
        dev = self.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else torch.float32
        if dense.shape[0] != n:
            dense = dense.expand(n, -1, -1, -1)
        with torch.autocast(dev, enabled=False):  # the decoding module picks dtypes per side
            if dense_of == "prompt" or torch.is_grad_enabled() or n == 0:  # one image side per prompt
                # index_select rather than [ ]: its backward is an index_add, where indexing's
                # accumulating index_put took ~26 ms of a vit_b training step
                rows = enc.embeddings.index_select(0, p.image_index)
                side = image_side(md.transformer, rows + dense, pe.get_dense_pe(), dtype)
                hs, src = two_way(md.transformer, side, tokens[:, None], keep)
                return self._masks_from(hs, src, multimask, stem, tokens_box)
            # The dense input is the same for every prompt of a row: its image side is computed
            # once per row (and kept in enc.sides), then all prompts of the row run on it together.
            hs = torch.empty(n, keep, tokens.shape[2], device=tokens.device)
            src, order = [], []
            for row in torch.unique(p.image_index).tolist():
                at = torch.nonzero(p.image_index == row).flatten()
                key = (dense_of, row, dtype)
                side = enc.sides.get(key)
                if side is None:
                    side = enc.sides[key] = image_side(md.transformer, enc.embeddings[row : row + 1] + dense[at[:1]],
                                                       pe.get_dense_pe(), dtype)
                h_row, s_row = two_way(md.transformer, side, tokens[at][None], keep)
                hs[at] = h_row
                src.append(s_row)
                order.append(at)
            src = torch.cat(src)
            if len(order) > 1:
                src = src[torch.argsort(torch.cat(order))]
            return self._masks_from(hs, src, multimask, stem, tokens_box)

    def _token_windows(self, windows: torch.Tensor, n: int) -> torch.Tensor:
        """``decode``'s mask-pixel windows (n, 4) → token boxes rounded outwards."""
        m, f = self.mask_size, self.mask_size // self.embed_size
        check_windows(windows, n, m, m, "mask-pixel")
        y0, x0, y1, x1 = torch.as_tensor(windows).long().unbind(1)
        return torch.stack([y0 // f, x0 // f, -(-y1 // f), -(-x1 // f)], 1)

    def _masks_from(self, hs: torch.Tensor, src: torch.Tensor, multimask: bool,
                    stem: tuple[torch.Tensor, torch.Tensor] | None = None,
                    windows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoder tokens (N, T, C), image tokens (N, HW, C) and, with a stem skip, (stem features
        (B, Cs, 4h, 4w), each prompt's row of them (N,)) → (mask logits, predicted IoU); with
        ``windows`` (N, 4) token boxes, logits only inside them (see ``upscale_masks``)."""
        md = self.sam.mask_decoder
        mask_out = hs[:, 1 : 1 + md.num_mask_tokens]
        sel = slice(1, None) if multimask else slice(0, 1)
        idx = range(md.num_mask_tokens)[sel]
        hyper = torch.stack([md.output_hypernetworks_mlps[i](mask_out[:, i]) for i in idx], dim=1)
        skip, (stem, index) = getattr(md, "stem_skip", None), stem or (None, None)
        masks = upscale_masks(md.output_upscaling, src, hyper, self.embed_size, self.embed_size, skip, stem, index,
                              windows)
        iou = md.iou_prediction_head(hs[:, 0])[:, sel]
        return masks.float(), iou.float()  # fp32 whatever autocast computed in (NumPy has no bf16)

    def semantic_logits(self, enc: Encoded) -> torch.Tensor:
        """Text → pixel map (B, 1, 4h, 4w) logits: the strategy's own map, or text-only decoding."""
        if enc.semantic is not None:
            return enc.semantic.float()
        b = enc.embeddings.shape[0]
        masks, _ = self.decode(enc, Prompts(torch.arange(b)))
        return masks

    def forward(self, images: torch.Tensor, texts: Sequence[str | None] | None,
                prompts: Prompts | Sequence[Prompts], multimask: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Training entry: encode a batch with per-sample texts and decode its prompts."""
        return self.decode(self.encode(images, texts), prompts, multimask)

    # ---- introspection ------------------------------------------------------------------------
    def describe(self) -> dict[str, dict[str, int]]:
        """Parameter counts per part: {part: {"total": n, "trainable": n}}, plus "all"."""
        parts = {
            "image_encoder": self.sam.image_encoder,
            "prompt_encoder": self.sam.prompt_encoder,
            "mask_decoder": self.sam.mask_decoder,
            "clip": self.semantics.clip,
            "conditioning": self.conditioning,
        }
        out = {}
        for name, mod in parts.items():
            ps = list(mod.parameters())
            out[name] = {"total": sum(p.numel() for p in ps),
                         "trainable": sum(p.numel() for p in ps if p.requires_grad)}
        allp = list(self.parameters())
        out["all"] = {"total": sum(p.numel() for p in allp),
                      "trainable": sum(p.numel() for p in allp if p.requires_grad)}
        return out

    # ---- files --------------------------------------------------------------------------------
    def save(self, path: str | Path, metadata: dict | None = None, half: bool = False, overwrite: bool = False) -> Path:
        """Write the whole model as ``.safetensors`` with its config (and ``metadata``) as JSON,
        atomically (temp file + rename). ``half`` stores floating weights as fp16.
        FileExistsError if ``path`` exists and ``overwrite`` is False."""
        from .checkpoints import write_safetensors

        path = Path(path)
        tensors = {}
        for k, v in self.state_dict().items():
            v = v.detach().cpu()
            tensors[k] = (v.half() if half and v.is_floating_point() else v).contiguous()
        meta = {"format": "napari-clipsam/model", "config": json.dumps(self.config.to_dict()),
                "metadata": json.dumps(metadata or {})}
        return write_safetensors(path, tensors, meta, overwrite=overwrite)

    @classmethod
    def load(cls, path: str | Path, map_location: str | torch.device = "cpu") -> "ClipSam":
        """Rebuild a model written by :meth:`save` (strict: every weight must match)."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"model file not found: {path}")
        try:
            with safe_open(str(path), framework="pt", device=str(map_location)) as f:
                meta = f.metadata() or {}
                state = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as err:  # safetensors raises several error types for damaged files
            raise ValueError(f"{path} is not a readable napari-clipsam model file (truncated or corrupt?): {err}") from err
        if meta.get("format") != "napari-clipsam/model":
            raise ValueError(f"{path} is not a napari-clipsam model file (an adapter file? use load_adapter)")
        try:
            model = cls(ClipSamConfig.from_dict(json.loads(meta["config"])))
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path} has no usable model config ({type(err).__name__}: {err}): it was not written by "
                             "ClipSam.save, or by a version that wrote another config") from None
        ref = model.state_dict()
        state = {k: v.to(ref[k].dtype) if k in ref else v for k, v in state.items()}
        from .checkpoints import mismatch_summary

        problem = mismatch_summary(ref, state)
        if problem:
            raise ValueError(f"{path} does not match its own config: {problem}")
        model.load_state_dict(state)
        model.file_metadata = json.loads(meta.get("metadata", "{}"))
        model.source = str(path)
        return model.to(map_location).eval()

    def freeze_base(self) -> None:
        """Freeze SAM and CLIP; leave only the strategy's parameters trainable."""
        self.sam.requires_grad_(False)
        self.semantics.clip.requires_grad_(False)
        self.conditioning.requires_grad_(True)


def tiny_config(strategy: str = "adapter", **options) -> ClipSamConfig:
    """A tiny ClipSam (64 px input) for tests: builds in milliseconds."""
    from .clip_parts import tiny_clip_config
    from .sam_parts import SAM_CONFIGS

    return ClipSamConfig(sam=SAM_CONFIGS["tiny"], clip=tiny_clip_config(), strategy=strategy,
                         strategy_options=options)


__all__ = ["ClipSam", "ClipSamConfig", "Encoded", "ImageFeatures", "Prompts", "tiny_config"]
