"""Batch segmentation on Dask: same labels as the engine, worker loss, resume, lazy inputs, CLI."""

import os
import re
from pathlib import Path

import numpy as np
import pytest
import tifffile
from distributed import WorkerPlugin

from napari_clipsam.batch import segment_files, segment_lazy
from napari_clipsam.batch.io import SliceStore, expand_inputs, file_kind, lazy_array, open_lazy, write_labels
from napari_clipsam.data.synthetic import make_image, make_volume
from napari_clipsam.evaluation import match_instances

TEXT = "nucleus"


def assert_same_instances(a: np.ndarray, b: np.ndarray) -> None:
    """Equal label images up to relabelling (a one-to-one map between ids, same background)."""
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape
    assert np.array_equal(a > 0, b > 0)
    fg = a > 0
    pairs = np.unique(np.stack([a[fg], b[fg]]), axis=1)
    n = len(np.unique(a[fg]))
    assert pairs.shape[1] == n == len(np.unique(b[fg]))
    assert match_instances(a, b, iou_threshold=1.0) == (n, 0, 0)


@pytest.fixture(scope="module")
def seg():
    from napari_clipsam.engine.segmenter import Segmenter

    return Segmenter.from_pretrained("demo", device="cpu")


def engine_labels(seg, image: np.ndarray) -> np.ndarray:
    """The single-process engine's result for a 2D image or (Z, Y, X) volume."""
    if image.ndim == 3:
        return seg.segment_volume(image, text=TEXT).labels
    seg.set_image(image)
    return seg.segment_text(TEXT).labels


@pytest.fixture(scope="module")
def cluster():
    """A LocalCluster of 2 worker processes on loopback (as the issue's acceptance test asks)."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as lc, Client(lc) as client:
        yield client


def write_inputs(folder: Path, images: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    for name, im in images.items():
        tifffile.imwrite(folder / f"{name}.tif", im, photometric="minisblack")
    return images


# ---- acceptance 1: a 2-process LocalCluster gives the engine's labels ----------------------------
def test_local_cluster_matches_engine(tmp_path, cluster, seg):
    images = write_inputs(tmp_path / "in", {
        **{f"img{i}": make_image(20 + i, 128, p_absent=0.0).image for i in range(3)},
        "vol": make_volume(7, (4, 400, 400), p_absent=0.0).image,  # 400 > 1.5 × 256: 4 tiles per slice
    })
    report = segment_files(tmp_path / "in", tmp_path / "out", TEXT, volume=True, scheduler=cluster)
    assert report.ok and len(report.done) == 4, report.summary()
    vol = next(r for r in report.results if r.input.name == "vol.tif")
    assert vol.slices_computed == 4 and vol.objects > 3
    for name, im in images.items():
        out = tifffile.imread(tmp_path / "out" / f"{name}_labels.tif")
        ref = engine_labels(seg, im)
        if name == "vol":
            assert len(seg.tiles) == 4  # the volume was tiled, and stitched the engine's way
        assert ref.max() > 0
        assert_same_instances(out, ref)
    assert not list((tmp_path / "out").glob(".*"))  # no temp files or partial stores left
    from napari_clipsam.batch.worker import loaded_models

    per_worker = cluster.run(loaded_models)
    assert all(len(keys) == 1 for keys in per_worker.values())  # each process loaded the model once


# ---- acceptance 2: a worker killed mid-run; resume only what is missing ----------------------------
class KillOnce(WorkerPlugin):
    """Worker plugin: the first slice task to start kills its worker process (once, via a marker file)."""

    name = "kill-once"

    def __init__(self, marker: str):
        self.marker = marker

    def setup(self, worker):
        pass

    def transition(self, key, start, finish, **kwargs):
        if finish == "executing" and "clipsam-slice" in str(key) and not os.path.exists(self.marker):
            Path(self.marker).write_text(str(os.getpid()))
            os._exit(1)


def test_worker_killed_mid_run_still_completes(tmp_path, cluster, seg):
    images = write_inputs(tmp_path / "in", {"a": make_image(31, 96, p_absent=0.0).image,
                                            "vol": make_volume(8, (6, 96, 96), p_absent=0.0).image})
    marker = tmp_path / "killed"
    cluster.register_plugin(KillOnce(str(marker)), name=KillOnce.name)
    try:
        report = segment_files(tmp_path / "in", tmp_path / "out", TEXT, volume=True, scheduler=cluster, retries=1)
    finally:
        cluster.unregister_worker_plugin(KillOnce.name)
    assert marker.exists()  # a worker did die, mid-batch
    assert report.ok and len(report.done) == 2, report.summary()
    for name, im in images.items():
        assert_same_instances(tifffile.imread(tmp_path / "out" / f"{name}_labels.tif"), engine_labels(seg, im))


def test_rerun_after_interruption_processes_only_what_is_missing(tmp_path, seg):
    images = write_inputs(tmp_path / "in", {**{f"img{i}": make_image(40 + i, 96, p_absent=0.0).image for i in range(3)},
                                            "vol": make_volume(9, (6, 96, 96), p_absent=0.0).image})
    finished = []
    report = segment_files(tmp_path / "in", tmp_path / "out", TEXT, volume=True, scheduler="threads", n_workers=1,
                           progress=lambda done, total, msg: finished.append(done),
                           should_stop=lambda: len(finished) >= 4)
    assert report.cancelled and not report.failed
    outs = {n: tmp_path / "out" / f"{n}_labels.tif" for n in images}
    missing = {n for n, o in outs.items() if not o.exists()}
    store = SliceStore(outs["vol"])
    slices_before = store.done()
    assert "vol" in missing and missing != set(images)
    assert not any(p.name.endswith(".tmp") for p in (tmp_path / "out").iterdir())  # only whole outputs appear

    again = segment_files(tmp_path / "in", tmp_path / "out", TEXT, volume=True, scheduler="threads", n_workers=1)
    assert again.ok
    assert {r.input.stem for r in again.done} == missing
    assert {r.input.stem for r in again.skipped} == set(images) - missing
    vol = next(r for r in again.results if r.input.stem == "vol")
    assert vol.slices_reused == len(slices_before) and vol.slices_computed == 6 - len(slices_before)
    assert not store.root.exists()
    for name, im in images.items():
        assert_same_instances(tifffile.imread(outs[name]), engine_labels(seg, im))
    assert len(segment_files(tmp_path / "in", tmp_path / "out", TEXT, volume=True, scheduler="threads").skipped) == 4


def test_failed_file_is_reported_and_the_rest_continue(tmp_path, seg):
    write_inputs(tmp_path / "in", {"good": make_image(50, 64, p_absent=0.0).image,
                                   "stack": np.zeros((3, 40, 40), np.uint16)})  # 3D without volume=True
    (tmp_path / "in" / "broken.tif").write_bytes(b"not a tiff")
    report = segment_files(tmp_path / "in", tmp_path / "out", TEXT, scheduler="threads", n_workers=1)
    status = {r.input.stem: r.status for r in report.results}
    assert status == {"broken": "failed", "good": "done", "stack": "failed"}
    msgs = {r.input.stem: r.message for r in report.failed}
    assert "cannot read" in msgs["broken"] and "volume=True" in msgs["stack"]
    assert (tmp_path / "out" / "good_labels.tif").exists()
    with pytest.raises(ValueError, match="concept"):
        segment_files(tmp_path / "in", tmp_path / "out", " ")
    with pytest.raises(ValueError, match="scheduler"):
        segment_files(tmp_path / "in" / "good.tif", tmp_path / "o2", TEXT, scheduler="nonsense")
    with pytest.raises(ValueError, match="neither a registered name"):
        segment_files(tmp_path / "in", tmp_path / "out", TEXT, model=tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="seeds must be"):
        segment_files(tmp_path / "in" / "good.tif", tmp_path / "o3", TEXT, seeds="kmeans")


# ---- lazy inputs (napari "Segment all" on a dask-backed layer) -------------------------------------
def test_segment_lazy_dask_and_zarr_volume_match_engine(tmp_path, seg):
    import dask.array as da
    import zarr

    vol = make_volume(11, (4, 96, 96), p_absent=0.0).image
    ref = engine_labels(seg, vol)
    reads = []

    def load(block_info=None):  # a dask array whose reads are counted: never loaded whole
        reads.append(block_info[None]["array-location"][0])
        return vol[block_info[None]["array-location"][0][0]][None]

    lazy = da.map_blocks(load, chunks=((1,) * 4, (96,), (96,)), dtype=vol.dtype)
    steps = []
    res = segment_lazy(lazy, TEXT, segmenter=seg, progress=lambda d, t, m: steps.append((d, t)))
    assert res.complete and res.labels.shape == vol.shape and steps[-1] == (4, 4)
    assert_same_instances(res.labels[...], ref)
    assert res.n_objects == len(np.unique(ref)) - 1
    assert all(stop - start == 1 for start, stop in reads)  # slice by slice

    zpath = tmp_path / "vol.zarr"
    zarr.create_array(str(zpath), data=vol, chunks=(1, 96, 96))
    out = segment_lazy(zpath, TEXT, segmenter=seg, out=tmp_path / "labels.zarr")
    assert_same_instances(zarr.open_array(str(tmp_path / "labels.zarr"))[...], ref)
    assert_same_instances(out.labels[...], ref)
    done = []
    part = segment_lazy(lazy, TEXT, segmenter=seg, progress=lambda d, t, m: done.append(d),
                        should_stop=lambda: len(done) >= 2)
    assert not part.complete and done == [1, 2] and part.labels[3].max() == 0

    img = make_image(12, 96, p_absent=0.0).image
    res2d = segment_lazy(da.from_array(img, chunks=48), TEXT, scheduler="threads", n_workers=1)
    assert_same_instances(res2d.labels[...], engine_labels(seg, img))
    rgb = np.repeat(img[..., None], 3, axis=-1)  # (H, W, 3): an RGB image, not 96 slices of 96 × 3
    res_rgb = segment_lazy(da.from_array(rgb, chunks=48), TEXT, segmenter=seg)
    assert res_rgb.labels.shape == img.shape
    seg.set_image(rgb)
    assert_same_instances(res_rgb.labels[...], seg.segment_text(TEXT).labels)


def test_segment_lazy_on_threads_scheduler_reads_dask_slices_on_workers(seg):
    import dask.array as da

    vol = make_volume(13, (3, 80, 80), p_absent=0.0).image
    res = segment_lazy(da.from_array(vol, chunks=(1, 80, 80)), TEXT, scheduler="threads", n_workers=2)
    assert_same_instances(res.labels[...], engine_labels(seg, vol))


# ---- io ----------------------------------------------------------------------------------------
def test_io_lazy_readers_and_atomic_incremental_writers(tmp_path):
    import zarr

    vol = np.random.default_rng(0).integers(0, 9, (3, 300, 270)).astype(np.uint32)
    for name in ("a.tif", "b.tif"):
        tifffile.imwrite(tmp_path / name, vol[0].astype(np.uint16))
    tifffile.imwrite(tmp_path / "b_labels.tif", vol[0])  # an output: skipped in folders
    zarr.create_array(str(tmp_path / "c.zarr"), data=vol)
    ome = zarr.open_group(str(tmp_path / "d.ome.zarr"), mode="w")
    ome.create_array("0", data=vol)
    ome.attrs["multiscales"] = [{"datasets": [{"path": "0"}]}]
    found = expand_inputs(tmp_path)
    assert [p.name for p in found] == ["a.tif", "b.tif", "c.zarr", "d.ome.zarr"]
    assert np.array_equal(open_lazy(tmp_path / "d.ome.zarr")[1], vol[1])
    with lazy_array(tmp_path / "a.tif") as a:
        assert np.array_equal(a[...], vol[0])
    with pytest.raises(ValueError, match="not found"):
        expand_inputs(tmp_path / "nope.tif")

    for suffix in (".tif", ".zarr"):
        out = tmp_path / f"labels{suffix}"
        seen = []

        def slices():
            for z in range(3):
                assert not out.exists()  # nothing visible until complete
                seen.append(z)
                yield vol[z]

        write_labels(out, slices(), vol.shape, np.dtype(np.uint16))
        with lazy_array(out) as arr:
            back = np.asarray(arr[...])
        assert back.dtype == np.uint16 and np.array_equal(back, vol) and seen == [0, 1, 2]
        with pytest.raises(FileExistsError):
            write_labels(out, iter(vol), vol.shape, np.dtype(np.uint16))
        write_labels(out, iter(vol[:, :10, :10] * 0), (3, 10, 10), np.dtype(np.uint16), overwrite=True)
        with lazy_array(out) as arr:
            assert arr.shape == (3, 10, 10)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


# ---- CLI ---------------------------------------------------------------------------------------
def test_cli_segment_with_scheduler_threads(tmp_path, seg, capsys):
    from napari_clipsam.cli import main

    images = write_inputs(tmp_path / "in", {"x": make_image(60, 64, p_absent=0.0).image,
                                            "y": make_image(61, 64, p_absent=0.0).image})
    argv = ["segment", str(tmp_path / "in"), "--text", TEXT, "-o", str(tmp_path / "out"),
            "--scheduler", "threads", "--workers", "1"]
    assert main(argv) == 0
    assert "2 done, 0 skipped, 0 failed" in capsys.readouterr().out
    for name, im in images.items():
        assert_same_instances(tifffile.imread(tmp_path / "out" / f"{name}_labels.tif"), engine_labels(seg, im))
    assert main(argv) == 1  # outputs exist: the CLI's rule (--overwrite / --skip-existing) applies
    assert "exists" in capsys.readouterr().err
    assert main(argv + ["--skip-existing", "-q"]) == 0
    assert main(argv[:-4] + ["--points", "3,3", "--scheduler", "threads"]) == 1
    assert "text segmentation only" in capsys.readouterr().err


def test_model_file_shipped_as_bytes_once_per_worker(tmp_path, seg):
    from napari_clipsam.batch import worker
    from napari_clipsam.models.registry import model_path

    weights = tmp_path / "my_model.safetensors"
    weights.write_bytes(Path(model_path("demo")).read_bytes())
    im = write_inputs(tmp_path / "in", {"s": make_image(70, 64, p_absent=0.0).image})["s"]
    report = segment_files(tmp_path / "in", tmp_path / "out", TEXT, model=weights, scheduler="threads",
                           n_workers=1, ship="bytes")
    assert report.ok, report.summary()
    digest = worker.file_hash(weights)
    shipped = Path(worker._SHIPPED[digest])  # the worker's copy (its folder is gone with the cluster)
    assert shipped != weights and shipped.parent.name == "napari-clipsam" and shipped.stem == digest
    assert any(k.startswith(digest) for k in worker.loaded_models())
    assert_same_instances(tifffile.imread(tmp_path / "out" / "s_labels.tif"), engine_labels(seg, im))


# ---- audit regressions -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny random ClipSam saved as a model file: fast to load on a worker."""
    import torch

    from napari_clipsam.models.clipsam import ClipSam, tiny_config

    torch.manual_seed(0)
    return ClipSam(tiny_config()).save(tmp_path_factory.mktemp("models") / "tiny.safetensors")


def test_cli_scheduler_names_failed_files_even_when_quiet(tmp_path, tiny_model, capsys):
    from napari_clipsam.cli import main

    write_inputs(tmp_path / "in", {"good": make_image(80, 64, p_absent=0.0).image,
                                   "nan": np.full((64, 64), np.nan, np.float32)})
    argv = ["segment", str(tmp_path / "in"), "--text", TEXT, "-o", str(tmp_path / "out"), "--model", str(tiny_model),
            "--scheduler", "threads", "--workers", "1", "-q"]
    assert main(argv) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert "napari-clipsam: error: " in err and "nan.tif: ValueError: image is all NaN" in err, err
    assert "1 done, 0 skipped, 1 failed: " in err and err.strip().endswith("nan.tif"), err
    assert (tmp_path / "out" / "good_labels.tif").exists()


def test_cli_scheduler_rejects_fewer_than_one_worker(tmp_path, tiny_model, capsys):
    from napari_clipsam.cli import main

    write_inputs(tmp_path / "in", {"good": make_image(81, 64, p_absent=0.0).image})
    assert main(["segment", str(tmp_path / "in"), "--text", TEXT, "-o", str(tmp_path / "out"), "--model",
                 str(tiny_model), "--scheduler", "threads", "--workers", "0", "-q"]) == 1
    assert "--workers 0: need at least 1" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("shape, volume, axis, expect", [
    ((32, 32), False, None, "2d"), ((32, 32), True, None, "2d"), ((32, 32, 3), False, None, "2d"),
    ((4, 32, 32), True, None, "3d"), ((2, 32, 32), False, 0, "2d"), ((4, 2, 32, 32), True, 1, "3d"),
    ((4, 32, 32), False, None, "add --3d"), ((32, 32, 3), True, None, "is RGB, not a volume"),
    ((32, 32), False, 2, "channel axis 2 is outside"), ((32, 32), False, -3, "channel axis -3 is outside"),
    ((2, 4, 32, 32), False, None, "expected (H, W)"), ((32,), False, None, "expected (H, W)"),
])
def test_file_kind_decides_2d_3d_or_says_what_to_pass(shape, volume, axis, expect):
    if expect in ("2d", "3d"):
        assert file_kind(shape, volume, axis) == expect
    else:
        with pytest.raises(ValueError, match=re.escape(expect)):
            file_kind(shape, volume, axis)


def test_rgb_image_as_volume_fails_alone(tmp_path):
    write_inputs(tmp_path / "in", {"rgb": np.zeros((32, 32, 3), np.uint8)})
    report = segment_files(tmp_path / "in", tmp_path / "out", TEXT, volume=True, scheduler="threads", n_workers=1)
    assert [r.status for r in report.results] == ["failed"]
    assert "is RGB, not a volume" in report.failed[0].message
    assert not (tmp_path / "out").exists()
