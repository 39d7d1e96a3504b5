"""Training examples: (2D image, instance labels, text) from NumPy arrays, volumes, TIFF files or napari layers.

One :class:`TrainingExample` is one 2D image, the instance labels of *one* class in it and the
text naming that class. Several classes in the same image give several examples (one per text)
sharing the image. Volumes give one example per sampled Z slice; slices without labels are kept
at a lower weight (they teach "nothing of this class here") unless none is wanted.

Images are kept raw; :func:`napari_clipsam.engine.preprocess.normalize_image` is applied when
training starts, exactly as at inference: a volume's slices with the volume's intensity limits
(:func:`napari_clipsam.engine.volume.volume_limits`), as ``segment_volume`` normalises them.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..checks import check_number
from ..engine.preprocess import normalize_image

log = logging.getLogger(__name__)


@dataclass
class TrainingExample:
    """One training example.

    image: (H, W) grayscale or (H, W, 3|4) RGB(A) array of any numeric dtype (raw intensities);
    labels: (H, W) integer instance labels, 0 = background; text: the class name used as the
    text prompt; weight: relative sampling/loss weight; name: how errors refer to it;
    allow_empty: labels may be all zero (a negative example, e.g. an empty volume slice);
    group: examples with the same group share an image (kept together by the validation split);
    channel_axis: passed to ``normalize_image`` for multichannel images; limits: (C, 2)
    intensity limits to normalise with (a volume slice's: the volume's, as at inference), None
    for the image's own percentiles.
    """

    image: np.ndarray
    labels: np.ndarray
    text: str
    weight: float = 1.0
    name: str = ""
    allow_empty: bool = False
    group: str = ""
    channel_axis: int | None = None
    limits: np.ndarray | None = None
    meta: dict = field(default_factory=dict)

    def describe(self, index: int | None = None) -> str:
        where = f"example {index}" if index is not None else "example"
        return f"{where} ({self.name!r}, text {self.text!r})" if self.name else f"{where} (text {self.text!r})"

    def validate(self, index: int | None = None) -> None:
        """Raise ``ValueError`` naming this example if it cannot be trained on."""
        who = self.describe(index)
        img = np.asarray(self.image)
        lab = np.asarray(self.labels)
        if not isinstance(self.text, str) or not self.text.strip():
            raise ValueError(f"{who}: the text must be a non-empty string naming the class, got {self.text!r}")
        if not (np.issubdtype(img.dtype, np.integer) or np.issubdtype(img.dtype, np.floating) or img.dtype == bool):
            raise ValueError(f"{who}: image dtype {img.dtype} is not a real number type")
        if self.channel_axis is not None and (img.ndim != 3 or not -3 <= self.channel_axis < 3):
            raise ValueError(f"{who}: channel_axis={self.channel_axis} needs a (Y, X, C) image with that axis, "
                             f"got shape {img.shape}")
        if self.limits is None and np.issubdtype(img.dtype, np.floating) and np.isnan(img).all():
            raise ValueError(f"{who}: the image is all NaN")
        if self.channel_axis is not None:
            spatial = tuple(np.delete(np.array(img.shape), self.channel_axis % 3))
        elif img.ndim == 2:
            spatial = img.shape
        elif img.ndim == 3 and self.channel_axis is None and img.shape[-1] in (3, 4):
            spatial = img.shape[:2]
        else:
            raise ValueError(f"{who}: image must be 2D (H, W) or RGB (H, W, 3), got shape {img.shape}; "
                             "use examples_from_arrays for volumes, or pass channel_axis for multichannel images")
        if lab.dtype == bool or not np.issubdtype(lab.dtype, np.integer):
            fix = ("a mask, not instance labels: give each object its own id, e.g. scipy.ndimage.label(mask)[0]"
                   if lab.dtype == bool else "float labels are not accepted: convert with labels.astype(np.uint32) if they are ids")
            raise ValueError(f"{who}: labels must be an integer instance label image, got dtype {lab.dtype} ({fix})")
        if lab.shape != tuple(spatial):
            raise ValueError(f"{who}: labels shape {lab.shape} does not match the image shape {tuple(spatial)}")
        if min(lab.shape) < 8:
            raise ValueError(f"{who}: image {lab.shape} is too small (need at least 8×8 pixels)")
        if (lab < 0).any():
            raise ValueError(f"{who}: labels contain negative values; instance ids must be >= 0 (0 = background)")
        if not self.allow_empty and not lab.any():
            raise ValueError(f"{who}: labels are all zero: paint at least one object of {self.text!r}")
        if not np.isfinite(self.weight) or self.weight < 0:
            raise ValueError(f"{who}: weight must be a finite number >= 0, got {self.weight}")

    def normalized(self) -> np.ndarray:
        """The image as the model sees it: (H, W, 3) float32 in [0, 1], normalised as at inference."""
        return normalize_image(self.image, channel_axis=self.channel_axis, limits=self.limits)

    @property
    def num_instances(self) -> int:
        ids = np.unique(np.asarray(self.labels))
        return int((ids != 0).sum())


def validate_examples(examples: Sequence[TrainingExample]) -> list[TrainingExample]:
    """Check every example (``ValueError`` naming the first bad one); returns them as a list."""
    examples = list(examples)
    if not examples:
        raise ValueError("no training examples given")
    for i, ex in enumerate(examples):
        if not isinstance(ex, TrainingExample):
            raise ValueError(f"example {i}: expected a TrainingExample, got {type(ex).__name__}")
        ex.validate(i)
    if not any(np.asarray(ex.labels).any() for ex in examples):
        raise ValueError("all training examples have empty labels: paint at least one object")
    return examples


def _label_sets(labels: Any, text: str | Sequence[str] | None) -> list[tuple[str, Any]]:
    """Normalise the (labels, text) arguments to [(text, labels)]: a dict {text: labels}, a list of
    label arrays with a list of texts, or one array with one text."""
    if isinstance(labels, Mapping):
        if text is not None:
            raise ValueError("give either labels as a {text: labels} dict or labels + text, not both")
        return [(str(t), lab) for t, lab in labels.items()]
    if isinstance(labels, (list, tuple)):
        if not isinstance(text, (list, tuple)) or len(text) != len(labels):
            raise ValueError(f"{len(labels)} label sets need as many texts, got {text!r}")
        return [(str(t), lab) for t, lab in zip(text, labels)]
    if not isinstance(text, str):
        raise ValueError(f"one label image needs one text (str), got {text!r}")
    return [(text, labels)]


def _pixel_digest(img: np.ndarray) -> str:
    """A short digest of an array's shape, dtype and values (which examples share an image)."""
    h = hashlib.blake2b(f"{img.shape}{img.dtype.str}".encode(), digest_size=8)
    if img.size:
        h.update(memoryview(np.ascontiguousarray(img)).cast("B"))
    return h.hexdigest()


def examples_from_arrays(
    image: np.ndarray,
    labels: np.ndarray | Mapping[str, np.ndarray] | Sequence[np.ndarray],
    text: str | Sequence[str] | None = None,
    name: str = "image",
    weight: float = 1.0,
    max_slices: int | None = 16,
    empty_slice_weight: float = 0.2,
    max_empty_fraction: float = 0.25,
    seed: int = 0,
    channel_axis: int | None = None,
    group: str | None = None,
    limits: np.ndarray | None = None,
) -> list[TrainingExample]:
    """Examples from a 2D image or a 3D (Z, Y, X) volume and one or more label images.

    Parameters
    ----------
    image : (H, W), (H, W, 3) or (Z, Y, X) array.
    labels : (H, W) / (Z, Y, X) integer labels with ``text``; or ``{text: labels}``; or a list of
        label images with a list of texts (several classes).
    max_slices : volumes: at most this many labelled slices per class are sampled (evenly, in Z
        order; None = all).
    empty_slice_weight, max_empty_fraction : volumes: slices without labels of the class are
        added with this weight, at most this fraction of the labelled slices (0 disables).
    seed : slice sampling seed.
    group : examples of one group are one image to the validation split (held out together).
        Default: ``name`` plus a digest of the image's pixels, so that the same image given
        twice (e.g. once per class) is one group, and different images are different groups
        even under the same name (the default ``"image"``, or files named alike in different
        folders). A volume's slices are groups of their own (``group[z=…]``).
    limits : (C, 2) intensity limits to normalise a 2D image with, e.g. the volume's for a slice
        taken from one (:func:`~napari_clipsam.engine.volume.volume_limits`); default: its own
        percentiles. A volume's slices always use the volume's limits (computed here).

    Raises ``ValueError`` naming the image/class when shapes or dtypes do not fit.
    """
    if max_slices is not None:
        check_number(max_slices, "max_slices", 1, integer=True)
    check_number(empty_slice_weight, "empty_slice_weight", 0)
    check_number(max_empty_fraction, "max_empty_fraction", 0)
    if isinstance(labels, Mapping) and not labels:
        raise ValueError("labels is an empty dict: give {text: labels} for at least one class")
    img = np.asarray(image)
    group = f"{name}#{_pixel_digest(img)}" if group is None else str(group)
    vol_limits = None
    out: list[TrainingExample] = []
    for t, lab in _label_sets(labels, text):
        lab = np.asarray(lab)
        who = f"{name!r}, text {t!r}"
        is_volume = lab.ndim == 3 and img.ndim == 3 and channel_axis is None and not (
            img.shape[-1] in (3, 4) and lab.shape != img.shape)
        if lab.ndim == 3 and not is_volume:
            raise ValueError(f"example ({who}): labels are 3D {lab.shape} but the image is {img.shape}")
        if not is_volume:
            ex = TrainingExample(img, lab, t, weight=weight, name=name, group=group, channel_axis=channel_axis,
                                 limits=limits)
            ex.validate()
            out.append(ex)
            continue
        if lab.shape != img.shape:
            raise ValueError(f"example ({who}): labels shape {lab.shape} does not match the volume shape {img.shape}")
        if vol_limits is None:
            from ..engine.volume import volume_limits

            vol_limits = volume_limits(img)
        if lab.dtype == bool or not np.issubdtype(lab.dtype, np.integer):
            raise ValueError(f"example ({who}): labels must be integer instance labels, got dtype {lab.dtype}")
        filled = [z for z in range(lab.shape[0]) if lab[z].any()]
        if not filled:
            raise ValueError(f"example ({who}): labels are all zero in every slice: paint at least one object")
        empty = [z for z in range(lab.shape[0]) if z not in set(filled)]
        if max_slices is not None and len(filled) > max_slices:
            idx = np.linspace(0, len(filled) - 1, max_slices).round().astype(int)
            filled = [filled[i] for i in idx]
        n_empty = int(np.floor(max_empty_fraction * len(filled))) if empty_slice_weight > 0 else 0
        rng = np.random.default_rng(seed)
        picked_empty = sorted(rng.choice(empty, size=min(n_empty, len(empty)), replace=False).tolist()) if empty else []
        for z in sorted(filled + picked_empty):
            has = z in filled
            ex = TrainingExample(img[z], lab[z], t, weight=weight * (1.0 if has else empty_slice_weight),
                                 name=f"{name}[z={z}]", allow_empty=not has, group=f"{group}[z={z}]",
                                 limits=vol_limits)
            ex.validate()
            out.append(ex)
    return out


def examples_from_files(
    image_path: str | Path,
    labels_path: str | Path | Mapping[str, str | Path],
    text: str | None = None,
    **kwargs,
) -> list[TrainingExample]:
    """Examples from TIFF files (``tifffile``): an image and its label image(s).

    ``labels_path`` is one file with ``text``, or ``{text: file}`` for several classes. Other
    arguments as in :func:`examples_from_arrays`.
    """
    import tifffile

    def read(p):
        p = Path(p)
        if not p.is_file():
            raise FileNotFoundError(f"training file not found: {p}")
        try:
            return tifffile.imread(str(p))
        except Exception as err:
            raise ValueError(f"cannot read {p} as a TIFF image: {err}") from err

    image = read(image_path)
    if isinstance(labels_path, Mapping):
        labels = {t: read(p) for t, p in labels_path.items()}
    else:
        labels = read(labels_path)
    kwargs.setdefault("name", Path(image_path).name)
    return examples_from_arrays(image, labels, text, **kwargs)


def _layer_data(layer: Any, what: str) -> np.ndarray:
    data = getattr(layer, "data", layer)
    if getattr(layer, "multiscale", False) or (isinstance(data, (list, tuple)) and len(data) and hasattr(data[0], "shape")):
        data = data[0]  # full resolution of a multiscale layer
    return np.asarray(data)


def examples_from_layers(
    image_layer: Any,
    labels_layers: Any | Mapping[str, Any] | Sequence[Any],
    text: str | Sequence[str] | None = None,
    **kwargs,
) -> list[TrainingExample]:
    """Examples from napari layers: an Image layer and one Labels layer per class (with its text).

    ``labels_layers`` is a Labels layer with ``text``, ``{text: layer}``, or a list of layers with
    a list of texts; without a text, a layer's name is used. Only ``layer.data`` is read (napari
    is not imported). RGB image layers are used as RGB.
    """
    image = _layer_data(image_layer, "image")
    if isinstance(labels_layers, Mapping):
        labels = {t: _layer_data(lay, "labels") for t, lay in labels_layers.items()}
        texts = None
    elif isinstance(labels_layers, (list, tuple)):
        labels = [_layer_data(lay, "labels") for lay in labels_layers]
        texts = ([text] if isinstance(text, str) else list(text)) if text is not None else \
            [str(getattr(lay, "name", "")) for lay in labels_layers]
    else:
        labels = _layer_data(labels_layers, "labels")
        texts = text if text is not None else str(getattr(labels_layers, "name", ""))
    kwargs.setdefault("name", str(getattr(image_layer, "name", "image")))
    return examples_from_arrays(image, labels, texts, **kwargs)


__all__ = ["TrainingExample", "examples_from_arrays", "examples_from_files", "examples_from_layers",
           "validate_examples"]
