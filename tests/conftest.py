"""Shared fixtures. Tests run on 1 thread: the CI machine has 2 cores and tests run side by side with helpers."""

import os

if not os.environ.get("DISPLAY"):  # under xvfb-run (CI) Qt uses the X server and renders OpenGL
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test gets its own model cache directory: nothing is read from or written to the user's cache."""
    cache = tmp_path_factory.mktemp("clipsam-cache")
    monkeypatch.setenv("NAPARI_CLIPSAM_CACHE", str(cache))
    yield cache


@pytest.fixture
def fp32(monkeypatch):
    """Inference in fp32 even on CPUs with native bf16 (where the fast path autocasts): for tests that
    compare two computations exactly or rest on a tiny model's fine numerics. The bf16 path's own
    tolerances are tested in test_fast.py."""
    monkeypatch.setenv("NAPARI_CLIPSAM_BF16", "0")
