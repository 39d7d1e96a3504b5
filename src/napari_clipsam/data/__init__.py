"""Data: procedural fluorescence-microscopy images and volumes with instance labels (:mod:`.synthetic`)."""

from napari_clipsam.data.synthetic import (
    CONCEPTS,
    DOMAIN_SHIFT_PRESETS,
    SIZE_RANGES,
    SYNONYMS,
    SyntheticSample,
    make_dataset,
    make_image,
    make_volume,
)

__all__ = [
    "CONCEPTS",
    "DOMAIN_SHIFT_PRESETS",
    "SIZE_RANGES",
    "SYNONYMS",
    "SyntheticSample",
    "make_dataset",
    "make_image",
    "make_volume",
]
