"""napari sample data (npe2 ``sample_data`` contribution): synthetic fluorescence images with ground-truth labels.

Each function returns a list of napari LayerData tuples ``(data, kwargs, layer_type)``; napari is not imported here.
"""

from __future__ import annotations

from napari_clipsam.data.synthetic import CONCEPTS, SyntheticSample, make_image, make_volume

SAMPLE_2D_SEED = 5  # an image with all three concepts and a cluster of touching nuclei
SAMPLE_3D_SEED = 6  # a stack with all three concepts


def _layers(sample: SyntheticSample, name: str, scale: tuple[float, ...]) -> list[tuple]:
    classes = {int(k): v for k, v in sample.classes.items()}
    return [
        (sample.image, {"name": name, "scale": scale, "colormap": "gray"}, "image"),
        (
            sample.labels,
            {"name": f"{name} labels", "scale": scale, "metadata": {"classes": classes, "concepts": CONCEPTS}},
            "labels",
        ),
    ]


def sample_2d() -> list[tuple]:
    """A 256×256 synthetic fluorescence image (``uint16``) with nuclei, mitochondria and vesicles + its labels."""
    return _layers(make_image(SAMPLE_2D_SEED, 256, p_absent=0.0), "synthetic cells 2D", (1.0, 1.0))


def sample_3d() -> list[tuple]:
    """A 16×256×256 synthetic stack (``uint16``, z spacing 2.5× the pixel size) + its 3D labels."""
    sample = make_volume(SAMPLE_3D_SEED, (16, 256, 256), p_absent=0.0)
    return _layers(sample, "synthetic cells 3D", tuple(float(s) for s in sample.info["spacing"]))
