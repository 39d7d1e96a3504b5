"""A ``distributed`` worker plugin shipping model/adapter files as bytes (``ship="bytes"``).

Kept apart from :mod:`.worker` so that importing the batch library does not import ``distributed``.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from distributed import WorkerPlugin

from . import worker as _tasks


class ModelFiles(WorkerPlugin):
    """Model/adapter files as bytes, sent once to every worker (also to workers that join later)
    and written into the worker's local directory; :func:`~.worker.load_model` then reads them
    there (looked up by content hash)."""

    def __init__(self, files: dict[str, bytes]):
        self.files = files
        self.name = "napari-clipsam-files-" + hashlib.sha256("".join(sorted(files)).encode()).hexdigest()[:16]

    def setup(self, worker) -> None:
        folder = Path(getattr(worker, "local_directory", None) or os.getcwd()) / "napari-clipsam"
        folder.mkdir(parents=True, exist_ok=True)
        for digest, data in self.files.items():
            target = folder / f"{digest}.safetensors"
            if not target.exists():
                tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
                tmp.write_bytes(data)
                os.replace(tmp, target)
            _tasks._SHIPPED[digest] = str(target)


__all__ = ["ModelFiles"]
