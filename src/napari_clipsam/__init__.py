"""napari-clipsam: segment microscopy by text and clicks with a CLIP-conditioned SAM.

The library part imports without napari or Qt; the napari widgets live in
:mod:`napari_clipsam.widgets` and are loaded by napari through ``napari.yaml``.
"""

from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "ClipSam": "napari_clipsam.models.clipsam",
    "ClipSamConfig": "napari_clipsam.models.clipsam",
    "Segmenter": "napari_clipsam.engine.segmenter",
    "load_model": "napari_clipsam.models.registry",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'napari_clipsam' has no attribute {name!r}")


__all__ = ["__version__", *_LAZY]
