"""Lazy inputs and incremental, atomic outputs for batch segmentation.

Inputs are opened without reading pixels: a TIFF as a zarr view of its first series
(``tifffile.imread(aszarr=True)``: pages/tiles are decoded on indexing), a zarr array directory,
or an OME-Zarr group (its first multiscale level). Any object with ``shape``, ``dtype`` and numpy
indexing (zarr, dask, numpy) works as an in-memory source.

Outputs are written next to their final name and renamed into place when complete, so an output
that exists is complete: a TIFF written slice by slice from an iterator (memory: one slice), or a
zarr array directory. Partial volume work lives in a hidden ``.<output name>.parts`` folder
beside the output (per-slice labels + one marker file per finished slice) and is removed once the
output exists.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

log = logging.getLogger(__name__)

TIFF_SUFFIXES = (".tif", ".tiff")
ZARR_SUFFIXES = (".zarr", ".ome.zarr")
#: Appended to an input's stem to name its output; folder/glob inputs skip names ending in it.
LABELS_SUFFIX = "_labels"
#: Side of the compressed tiles of TIFF outputs (a multiple of 16, as TIFF requires).
TIFF_TILE = 256


def looks_rgb(shape: Sequence[int], channel_axis: int | None = None) -> bool:
    """(H, W, 3|4) with no channel axis given: an RGB(A) image, never a (Z, Y, X) volume."""
    return channel_axis is None and len(shape) == 3 and shape[-1] in (3, 4)


def file_kind(shape: Sequence[int], volume: bool, channel_axis: int | None = None) -> str:
    """``"2d"`` or ``"3d"`` for an image of ``shape``, or ValueError saying what to pass.

    volume: a 3D array (without its channel axis) is (Z, Y, X), not an error; an (H, W, 3|4)
    image stays RGB either way when no ``channel_axis`` is given.
    """
    shape = tuple(int(s) for s in shape)
    nd = len(shape)
    if channel_axis is not None and not -nd <= channel_axis < nd:
        raise ValueError(f"channel axis {channel_axis} is outside the {nd} axes of shape {shape}")
    spatial = nd - (1 if channel_axis is not None else 0)
    if volume and looks_rgb(shape, channel_axis):
        raise ValueError(f"shape {shape}: a (Y, X, 3|4) image is RGB, not a volume: drop --3d (volume=True)")
    if volume and spatial == 3:
        return "3d"
    if spatial == 2 or looks_rgb(shape, channel_axis):
        return "2d"
    if spatial == 3:
        raise ValueError(f"a {nd}D stack {shape}: add --3d (volume=True) to segment it as a volume (Z, Y, X), "
                         "or give a channel axis (--channel-axis) for a multichannel 2D image")
    raise ValueError(f"shape {shape}: expected (H, W), (H, W, 3) or, as a volume (--3d), (Z, Y, X); "
                     "give a channel axis (--channel-axis) for channels")


def is_zarr_dir(path: Path) -> bool:
    """A zarr v2/v3 array or group directory (or a folder named ``*.zarr``)."""
    return path.is_dir() and (path.name.endswith(".zarr") or any(
        (path / m).exists() for m in ("zarr.json", ".zarray", ".zgroup")))


def _stem(path: Path) -> str:
    name = path.name
    for suf in (".ome.zarr", ".ome.tiff", ".ome.tif") + ZARR_SUFFIXES + TIFF_SUFFIXES:
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    return path.stem


def _is_input(path: Path, zarr: bool = True) -> bool:
    if _stem(path).endswith(LABELS_SUFFIX) or path.name.startswith("."):
        return False
    return (path.is_file() and path.suffix.lower() in TIFF_SUFFIXES) or (zarr and is_zarr_dir(path))


def expand_inputs(items: Sequence[str | os.PathLike] | str | os.PathLike, what: str = "input",
                  zarr: bool = True) -> list[Path]:
    """Files, folders (their TIFFs and, with ``zarr``, ``*.zarr`` folders; not recursive), zarr
    directories and glob patterns → sorted unique paths. Inside folders and globs, ``*_labels.*``
    (outputs) and hidden names are skipped. Raises ``ValueError`` naming the ``what`` for a
    missing path or an empty match."""
    if isinstance(items, (str, os.PathLike)):
        items = [items]
    kinds = ".tif/.tiff files" + (" or .zarr folders" if zarr else "")
    out: list[Path] = []
    for item in items:
        p = Path(item).expanduser()
        if (zarr and is_zarr_dir(p)) or p.is_file():
            out.append(p)
        elif p.is_dir():
            found = sorted(f for f in p.iterdir() if _is_input(f, zarr))
            if not found:
                raise ValueError(f"{what} folder {p} contains no {kinds}")
            out += found
        elif any(c in str(item) for c in "*?["):
            found = sorted(f for f in map(Path, glob.glob(os.path.expanduser(str(item)))) if _is_input(f, zarr))
            if not found:
                raise ValueError(f"{what} pattern {item!r} matches no {kinds}")
            out += found
        else:
            raise ValueError(f"{what} not found: {p}")
    return list(dict.fromkeys(p.resolve() for p in out))


def output_for(path: Path, output_dir: Path | None, fmt: str = "tif") -> Path:
    """``<output_dir or input folder>/<input stem>_labels.<fmt>``."""
    if fmt not in ("tif", "zarr"):
        raise ValueError(f"output format {fmt!r}: choose 'tif' or 'zarr'")
    return (output_dir or path.parent) / f"{_stem(path)}{LABELS_SUFFIX}.{fmt}"


def _ome_level0(group) -> Any:
    ms = group.attrs.get("multiscales") or group.attrs.get("ome", {}).get("multiscales")
    if ms:
        return group[ms[0]["datasets"][0]["path"]]
    arrays = sorted(group.array_keys())
    if not arrays:
        raise ValueError("zarr group holds no arrays")
    return group[arrays[0]]


def open_lazy(source: Any) -> Any:
    """An array-like (``shape``, ``dtype``, numpy indexing) reading pixels only when indexed.

    source: a TIFF path (first series), a zarr array/OME-Zarr directory, or an array-like, which
    is returned as is. Raises ``ValueError`` if a path cannot be opened as an image.
    """
    if not isinstance(source, (str, os.PathLike)):
        if not all(hasattr(source, a) for a in ("shape", "dtype", "__getitem__")):
            raise ValueError(f"cannot read {type(source).__name__}: give a path or an array with shape and dtype")
        return source
    import zarr

    path = Path(source).expanduser()
    try:
        if path.is_dir():
            node = zarr.open(str(path), mode="r")
            return node if hasattr(node, "shape") else _ome_level0(node)
        import tifffile

        store = tifffile.imread(str(path), aszarr=True)
        node = zarr.open(store, mode="r")
        return node if hasattr(node, "shape") else _ome_level0(node)
    except Exception as err:  # tifffile/zarr raise many types for unreadable files
        raise ValueError(f"cannot read {path} as a TIFF or zarr image: {str(err) or type(err).__name__}") from err


@contextlib.contextmanager
def lazy_array(source: Any) -> Iterator[Any]:
    """:func:`open_lazy` as a context: a file opened here is closed on exit."""
    arr = open_lazy(source)
    try:
        yield arr
    finally:
        if isinstance(source, (str, os.PathLike)):
            close = getattr(getattr(arr, "store", None), "close", None)
            if close is not None:
                close()


def labels_dtype(max_id: int) -> np.dtype:
    """uint16 when every id fits, else uint32 (the one rule for label files the CLI and batch write)."""
    return np.dtype(np.uint16) if max_id <= np.iinfo(np.uint16).max else np.dtype(np.uint32)


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _publish(tmp: Path, path: Path, overwrite: bool) -> None:
    if path.exists():
        if not overwrite:
            raise FileExistsError(f"output {path} appeared while writing: not overwritten (pass overwrite=True)")
        if path.is_dir():
            shutil.rmtree(path)
    os.replace(tmp, path)


def write_labels(path: Path, slices: Iterable[np.ndarray], shape: tuple[int, ...], dtype: np.dtype,
                 overwrite: bool = False) -> None:
    """Write labels of ``shape`` from an iterator of (Y, X) slices (one for a 2D image) to
    ``path`` (.tif: zlib-compressed tiled TIFF pages; .zarr: an array chunked by slice), atomically:
    into a hidden temp name, renamed when complete. Memory: one slice at a time."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"output {path} exists: pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        if path.suffix == ".zarr":
            import zarr

            arr = zarr.create_array(str(tmp), shape=shape, dtype=dtype, chunks=(1,) * (len(shape) - 2) + shape[-2:],
                                    fill_value=0, overwrite=True)
            if len(shape) == 2:
                arr[...] = next(iter(slices)).astype(dtype, copy=False)
            else:
                for z, sl in enumerate(slices):
                    arr[z] = sl.astype(dtype, copy=False)
        else:
            import tifffile

            with tifffile.TiffWriter(str(tmp), bigtiff=np.prod(shape) * dtype.itemsize > 2**31) as tif:
                tif.write(_tiles(slices, dtype), shape=shape, dtype=dtype, tile=(TIFF_TILE, TIFF_TILE),
                          compression="zlib", photometric="minisblack")
        _publish(tmp, path, overwrite)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()


def _tiles(slices: Iterable[np.ndarray], dtype: np.dtype) -> Iterable[np.ndarray]:
    """(Y, X) slices → zero-padded TIFF tiles, row-major per slice (tifffile's iterator format)."""
    t = TIFF_TILE
    for sl in slices:
        for y in range(0, sl.shape[0], t):
            for x in range(0, sl.shape[1], t):
                tile = np.zeros((t, t), dtype)
                part = sl[y : y + t, x : x + t]
                tile[: part.shape[0], : part.shape[1]] = part
                yield tile


class SliceStore:
    """Per-slice raw labels of one volume in progress: ``<output>.parts/`` beside the output.

    ``raw.zarr`` (Z, Y, X) uint32, one chunk per slice, written by workers; ``done/<z>.json`` the
    slice's scores, written (atomically) after its chunk: a slice is done iff its marker exists.
    ``meta.json`` records what the parts were computed for; parts computed for anything else are
    discarded on open.
    """

    def __init__(self, output: Path):
        self.output = Path(output)
        self.root = self.output.with_name(f".{self.output.name}.parts")

    @property
    def raw_path(self) -> Path:
        return self.root / "raw.zarr"

    def open(self, shape: tuple[int, int, int], meta: dict) -> None:
        """Create the store, or keep an existing one made for the same ``meta`` (resume)."""
        meta_file = self.root / "meta.json"
        if meta_file.exists():
            try:
                same = json.loads(meta_file.read_text()) == json.loads(json.dumps(meta))
            except (OSError, ValueError):
                same = False
            if same:
                return
            log.info("%s: discarding partial results made with other settings", self.output)
        if self.root.exists():
            shutil.rmtree(self.root)
        import zarr

        (self.root / "done").mkdir(parents=True)
        zarr.create_array(str(self.raw_path), shape=shape, dtype=np.uint32, chunks=(1,) + tuple(shape[1:]),
                          fill_value=0)
        _atomic_text(meta_file, json.dumps(meta))

    def done(self) -> set[int]:
        folder = self.root / "done"
        if not folder.is_dir():
            return set()
        return {int(f.stem) for f in folder.glob("*.json") if f.stem.isdigit()}

    def write(self, z: int, labels: np.ndarray, scores: dict[int, float]) -> None:
        """Store slice ``z`` (called on a worker; slices are separate chunks: no locking)."""
        import zarr

        zarr.open_array(str(self.raw_path), mode="r+")[z] = labels.astype(np.uint32, copy=False)
        _atomic_text(self.root / "done" / f"{z}.json", json.dumps({str(k): v for k, v in scores.items()}))

    def read(self, z: int, raw=None) -> tuple[np.ndarray, dict[int, float]]:
        import zarr

        raw = raw if raw is not None else zarr.open_array(str(self.raw_path), mode="r")
        scores = json.loads((self.root / "done" / f"{z}.json").read_text())
        return np.asarray(raw[z]), {int(k): float(v) for k, v in scores.items()}

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def _atomic_text(path: Path, text: str) -> None:
    tmp = _tmp_name(path)
    tmp.write_text(text)
    os.replace(tmp, path)


__all__ = ["LABELS_SUFFIX", "SliceStore", "expand_inputs", "is_zarr_dir", "labels_dtype", "lazy_array", "open_lazy",
           "output_for", "write_labels"]
