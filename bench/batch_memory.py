#!/usr/bin/env python
"""Peak memory of batch segmentation: a volume 8× larger than one slice stack stays bounded.

A "slice stack" is a (Z, 1024, 1024) uint16 volume (synthetic cells, tiled 4×4 in y/x); the
large volume repeats it 8 times along z. Both are written to TIFF slice by slice, then segmented
("nucleus", demo model) in fresh processes, each reporting its peak RSS (``VmHWM``):

- ``engine``: the whole volume in memory, ``Segmenter.segment_volume`` (the reference);
- ``batch``: ``segment_files`` on a LocalCluster of 2 worker processes (per-slice tasks, slices
  read lazily by the workers, linked on the client, output written slice by slice);
- ``lazy``: ``segment_lazy`` on a dask array over the TIFF, in one process (its segmenter's
  embedding cache capped at 64 MB as on batch workers; by default it holds up to 1 GiB).

Slices are segmented untiled (``tile_size=0``, each slice resized to the model input) to keep
the run short on a few CPU cores; tiling changes per-slice compute, not how memory scales with z.
Prints a table and writes ``bench/batch_memory.json``::

    python bench/batch_memory.py            # stacks of 8 slices (≈ 5 min on 2 CPU cores)
    python bench/batch_memory.py --z 4      # smaller
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SIDE = 1024
TEXT = "nucleus"


def rss_mb() -> tuple[float, float]:
    """(current, peak) resident memory of this process in MB, from /proc/self/status."""
    vals = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                vals[line.split(":")[0]] = int(line.split()[1]) / 1024
    return vals.get("VmRSS", float("nan")), vals.get("VmHWM", float("nan"))


def write_volume(path: Path, stacks: int, z: int, seed: int = 0) -> tuple[int, int, int]:
    """One synthetic (z, 256, 256) stack tiled 4×4 to (z, 1024, 1024), repeated ``stacks`` times
    along z, written slice by slice as an uncompressed TIFF. Repeating the same stack keeps the
    per-slice work (number and size of objects) identical, so peaks differ only by how memory
    scales with the number of slices."""
    import tifffile

    from napari_clipsam.data.synthetic import make_volume

    stack = np.tile(make_volume(seed, (z, SIDE // 4, SIDE // 4), p_absent=0.0).image, (1, 4, 4))

    def slices():
        for _ in range(stacks):
            yield from stack

    shape = (stacks * z, SIDE, SIDE)
    with tifffile.TiffWriter(str(path)) as tif:
        tif.write(slices(), shape=shape, dtype=np.uint16, photometric="minisblack")
    return shape


def run_mode(mode: str, path: Path, out: Path) -> dict:
    """Segment ``path`` in this (fresh) process; returns timings and peak RSS."""
    import tifffile

    t0 = time.perf_counter()
    result: dict = {"mode": mode}
    if mode == "engine":
        from napari_clipsam.engine.segmenter import Segmenter

        seg = Segmenter.from_pretrained("demo", device="cpu", tile_size=0)
        result["rss_after_model_mb"] = rss_mb()[0]
        t0 = time.perf_counter()
        vol = tifffile.imread(str(path))
        labels = seg.segment_volume(vol, text=TEXT).labels
        result["objects"] = int(labels.max())
    elif mode == "lazy":
        import dask.array as da
        import zarr

        from napari_clipsam.batch import segment_lazy
        from napari_clipsam.engine.segmenter import Segmenter

        from napari_clipsam.batch.worker import CACHE_BYTES
        from napari_clipsam.engine.cache import EmbeddingCache

        # The embedding cache keeps every slice's embedding up to its cap (1 GiB by default, useful
        # for clicking later); capped here as on batch workers, so the table shows the pipeline.
        seg = Segmenter.from_pretrained("demo", device="cpu", tile_size=0, cache=EmbeddingCache(CACHE_BYTES))
        result["rss_after_model_mb"] = rss_mb()[0]
        t0 = time.perf_counter()
        arr = da.from_zarr(zarr.open(tifffile.imread(str(path), aszarr=True), mode="r"))
        res = segment_lazy(arr, TEXT, segmenter=seg, out=out.with_suffix(".zarr"))
        result["objects"] = res.n_objects
    elif mode == "batch":
        from distributed import Client, LocalCluster

        from napari_clipsam.batch import segment_files

        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                          dashboard_address=None) as lc, Client(lc) as client:
            report = segment_files([path], outputs=[out], text=TEXT, volume=True, scheduler=client, tile_size=0)
            assert report.ok, report.summary()
            result["objects"] = report.results[0].objects
            workers = client.run(rss_mb)
            result["worker_peak_rss_mb"] = [round(v[1], 1) for v in workers.values()]
    else:
        raise ValueError(mode)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    result["client_peak_rss_mb"] = round(rss_mb()[1], 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--z", type=int, default=8, help="slices per stack (default 8)")
    parser.add_argument("--modes", default="engine,batch,lazy")
    parser.add_argument("--run", nargs=3, metavar=("MODE", "INPUT", "OUTPUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:  # child process: one measurement
        print(json.dumps(run_mode(args.run[0], Path(args.run[1]), Path(args.run[2]))))
        return

    rows = []
    with tempfile.TemporaryDirectory(prefix="clipsam-batch-mem-") as tmp:
        tmp = Path(tmp)
        for stacks in (1, 8):
            inp = tmp / f"vol{stacks}.tif"
            shape = write_volume(inp, stacks, args.z)
            for mode in args.modes.split(","):
                out = tmp / f"vol{stacks}_{mode}_labels.tif"
                env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
                proc = subprocess.run([sys.executable, __file__, "--run", mode, str(inp), str(out)],
                                      capture_output=True, text=True, env=env)
                if proc.returncode != 0:
                    sys.stderr.write(proc.stderr[-3000:])
                    raise SystemExit(f"{mode} on {shape} failed")
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                r.update(stacks=stacks, shape=list(shape), image_mb=round(np.prod(shape) * 2 / 2**20, 1),
                         labels_uint32_mb=round(np.prod(shape) * 4 / 2**20, 1))
                rows.append(r)
                print(f"{mode:7s} {stacks}× stack {shape}: client peak {r['client_peak_rss_mb']:.0f} MB, "
                      f"workers {r.get('worker_peak_rss_mb', '-')}, {r['seconds']} s", flush=True)

    def peak(r):
        return max([r["client_peak_rss_mb"]] + r.get("worker_peak_rss_mb", []))

    print()
    head = f"{'mode':7s} {'volume':>18s} {'image MB':>9s} {'labels MB':>9s} {'client peak MB':>15s} " \
           f"{'worker peak MB':>16s} {'seconds':>8s}"
    print(head)
    print("-" * len(head))
    for r in rows:
        w = "/".join(f"{v:.0f}" for v in r.get("worker_peak_rss_mb", [])) or "-"
        print(f"{r['mode']:7s} {'×'.join(map(str, r['shape'])):>18s} {r['image_mb']:9.0f} {r['labels_uint32_mb']:9.0f} "
              f"{r['client_peak_rss_mb']:15.0f} {w:>16s} {r['seconds']:8.1f}")
    growth = {}
    for mode in {r["mode"] for r in rows}:
        small = next(r for r in rows if r["mode"] == mode and r["stacks"] == 1)
        big = next(r for r in rows if r["mode"] == mode and r["stacks"] == 8)
        growth[mode] = {"peak_small_mb": peak(small), "peak_8x_mb": peak(big),
                        "growth_mb": round(peak(big) - peak(small), 1),
                        "growth_vs_8x_image_mb": round(peak(big) - peak(small) - 7 * small["image_mb"], 1)}
    print()
    for mode, g in sorted(growth.items()):
        print(f"{mode:7s}: peak per process {g['peak_small_mb']:.0f} MB → {g['peak_8x_mb']:.0f} MB for 8× the volume "
              f"(+{g['growth_mb']:.0f} MB)")
    out = {"rows": rows, "growth": growth, "z_per_stack": args.z, "side": SIDE, "text": TEXT, "tile_size": 0,
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                       "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}}
    (HERE / "batch_memory.json").write_text(json.dumps(out, indent=2))
    print(f"\nwrote {HERE / 'batch_memory.json'}")


if __name__ == "__main__":
    main()
