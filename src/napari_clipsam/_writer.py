"""npe2 writer: Labels → TIFF that keeps what napari's built-in labels writer drops.

napari's built-in writer (``napari.write_labels``) saves the label array only (as ``uint32``): the
layer's scale (pixel / voxel size, e.g. the z spacing of a stack) and the id → class names this
plugin records in ``metadata["classes"]`` are lost. This writer keeps both:

- the smallest unsigned dtype holding the ids, zlib-compressed;
- the scale as TIFF resolution (pixels per unit along x and y) and ``spacing`` (z), and, with the class map, in the JSON
  description (``tifffile.TiffFile(path).shaped_metadata[0]``);
- the class map also as a sidecar ``<file>.classes.json`` any tool can read (a sidecar left
  by an earlier save of the same file is removed when the labels have no class map now).

A name without .tif/.tiff gets ``.tif``; if that file exists, nothing is written (napari's
dialog asked about the name as given, not that file).

Files are written atomically (temp file + rename). napari is not imported.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np


def _smallest_uint(data: np.ndarray) -> np.ndarray:
    if data.dtype == bool:
        data = data.astype(np.uint8)
    elif not np.issubdtype(data.dtype, np.integer):
        if not np.issubdtype(data.dtype, np.floating) or not np.isfinite(data).all() \
                or not np.array_equal(data, np.round(data)):
            raise ValueError(f"labels of dtype {data.dtype} with non-integer values cannot be written as label ids")
    top = int(data.max()) if data.size else 0
    if int(data.min(initial=0)) < 0:
        raise ValueError("labels contain negative ids: cannot write them as an unsigned TIFF")
    for dt in (np.uint8, np.uint16, np.uint32, np.uint64):
        if top <= np.iinfo(dt).max:
            return data.astype(dt, copy=False)
    raise ValueError(f"label id {top} is too large")


def write_labels(path: str, data: Any, meta: dict) -> list[str]:
    """Write a Labels layer's ``data`` (2D or 3D) to ``path`` (.tif/.tiff) + the class sidecar.

    ``meta``: the layer attributes napari passes (``scale``, ``metadata``, ``name``). Returns the
    written paths.
    """
    import tifffile

    if isinstance(data, (list, tuple)):  # multiscale: the full resolution level
        data = data[0]
    arr = _smallest_uint(np.asarray(data))
    p = Path(path)
    if p.suffix.lower() not in (".tif", ".tiff"):
        p = p.with_name(p.name + ".tif")
        if p.exists():  # napari asked about overwriting the name given, not this one
            raise FileExistsError(f"{p} exists: save as {p.name} explicitly to replace it, or choose another name")
    scale = meta.get("scale")
    scale = [float(s) for s in (scale if scale is not None else [1.0] * arr.ndim)]
    classes = {str(int(k)): str(v) for k, v in ((meta.get("metadata") or {}).get("classes") or {}).items()}
    description = {"name": meta.get("name", ""), "scale": scale, "classes": classes,
                   "writer": "napari-clipsam"}
    if arr.ndim >= 3:
        description["spacing"] = scale[-3]
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    try:
        tifffile.imwrite(tmp, arr, compression="zlib", resolution=(1.0 / scale[-1], 1.0 / scale[-2]),  # (x, y)
                         metadata=description)
        os.replace(tmp, p)
    finally:
        tmp.unlink(missing_ok=True)
    written = [str(p)]
    side = p.with_name(p.name + ".classes.json")
    if not classes:
        side.unlink(missing_ok=True)  # it described the labels this file held before
    else:
        tmp = side.with_name(f".{side.name}.tmp")
        tmp.write_text(json.dumps({"classes": classes, "scale": scale}, indent=1))
        os.replace(tmp, side)
        written.append(str(side))
    return written
