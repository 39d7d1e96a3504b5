"""On/off switches read from the environment (``NAPARI_CLIPSAM_FAST``, ``_BF16``, ``_MALLOC``,
``_ONEDNN``; see :mod:`~napari_clipsam.models.fast`), parsed one way for all of them."""

from __future__ import annotations

import os


def env_flag(name: str) -> bool | None:
    """``1/true/on/yes`` → True, ``0/false/off/no`` → False, unset/empty → None; anything else
    raises ValueError."""
    v = os.environ.get(name, "").strip().lower()
    if not v:
        return None
    if v in ("1", "true", "on", "yes"):
        return True
    if v in ("0", "false", "off", "no"):
        return False
    raise ValueError(f"{name}={v!r}: use 1 or 0")
