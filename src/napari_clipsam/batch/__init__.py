"""Batch segmentation at scale on Dask (``dask.distributed``).

- :func:`segment_files`: many TIFF/zarr files and volumes → one labels file each, on a local
  cluster (default), in threads, or on any cluster by scheduler address; resumable, fault tolerant.
- :func:`segment_lazy`: one lazy (dask/zarr) image or volume → a zarr labels array, slice by slice
  (what napari's "Segment all" uses for dask-backed layers).

Submodules: :mod:`.io` (lazy readers, atomic incremental writers, per-slice stores),
:mod:`.worker` (worker-local model cache, tasks), :mod:`.run` (scheduling), :mod:`.lazy`,
:mod:`.cli` (the ``segment --scheduler`` branch of the command line).
"""

from .lazy import LazyResult, segment_lazy
from .run import BatchReport, FileResult, dask_client, segment_files


def run_segment_cli(args) -> int:
    """``napari-clipsam segment ... --scheduler S``: see :mod:`.cli`."""
    from .cli import run_segment_cli as run

    return run(args)


__all__ = ["BatchReport", "FileResult", "LazyResult", "dask_client", "run_segment_cli", "segment_files",
           "segment_lazy"]
