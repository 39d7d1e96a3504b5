"""``napari-clipsam segment / finetune / embed / sample`` (issue 8, acceptance 1).

The quality tests run the installed command as a subprocess on synthetic TIFFs with the bundled
demo model (skipped only while its file is not built). Mechanics (outputs, overwrite rules,
errors, caching, adapters) use a tiny random model saved to a file, so they run everywhere.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from napari_clipsam import cli
from napari_clipsam.data.synthetic import make_image, make_volume
from napari_clipsam.evaluation import instance_f1, interior_point, mask_iou
from napari_clipsam.models.fast import cpu_has_fast_bf16
from napari_clipsam.models.registry import model_status
from napari_clipsam.training import read_adapter
from test_cli_models import _cli_argv  # the installed console script, else python -m

HELD_OUT = 4_000_000  # the demo was trained on seeds < 100_000
needs_demo = pytest.mark.skipif(model_status("demo") == "not built", reason="demo model file not built")


def cli_env() -> dict[str, str]:
    """The environment of a command run by these tests: one thread, no downloads."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "NAPARI_CLIPSAM_OFFLINE": "1"}


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*_cli_argv(), *map(str, args)], capture_output=True, text=True, env=cli_env(), cwd=cwd,
                          timeout=600)


def error_line(res: subprocess.CompletedProcess) -> str:
    """The single stderr line of a failed run."""
    assert res.returncode != 0, res.stdout
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("napari-clipsam: error: "), lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny random ClipSam (64 px input) saved as a model file."""
    from napari_clipsam.models.clipsam import ClipSam, tiny_config

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("models") / "tiny.safetensors"
    ClipSam(tiny_config()).save(path)
    return path


def _write(path: Path, data: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, data)
    return path


# ---------------------------------------------------------------------------------------------- quality (demo)
@needs_demo
def test_segment_2d_folder_by_text_subprocess(tmp_path):
    """A folder of 2D TIFFs → one uint16 label TIFF per input, same shape, nuclei found (instance F1)."""
    truth = {}
    for i in range(6):
        s = make_image(HELD_OUT + i, counts={"nucleus": (4, 8)})
        _write(tmp_path / "images" / f"cell{i}.tif", s.image)
        truth[f"cell{i}"] = s.instance_labels("nucleus")
    res = run_cli("segment", tmp_path / "images", "--text", "nucleus", "-o", tmp_path / "out")
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [f"cell{i}_labels.tif" for i in range(6)]
    f1s = []
    for stem, gt in truth.items():
        pred = tifffile.imread(tmp_path / "out" / f"{stem}_labels.tif")
        assert pred.shape == gt.shape and pred.dtype == np.uint16
        f1s.append(instance_f1(pred, gt))
    assert np.mean(f1s) >= 0.6, f1s  # the demo's measured level: 0.77 here (0.72 on 50 held-out images)
    assert res.stdout.count("->") == 6


@needs_demo
def test_segment_2d_clicks_give_one_object_subprocess(tmp_path):
    s = make_image(HELD_OUT + 5, counts={"nucleus": (3, 6)})
    gt = s.instance_labels("nucleus") == 1
    x, y = interior_point(gt)
    img = _write(tmp_path / "img.tif", s.image)
    res = run_cli("segment", img, "--points", f"{x:.0f},{y:.0f}", "--text", "nucleus", "-o", tmp_path / "one.tif")
    assert res.returncode == 0, res.stderr
    pred = tifffile.imread(tmp_path / "one.tif")
    assert pred.shape == gt.shape and pred.dtype == np.uint16
    assert set(np.unique(pred)) <= {0, 1}
    assert mask_iou(pred == 1, gt) >= 0.5  # the demo's measured level here: 0.74


@needs_demo
def test_seeds_option_reaches_segment_text(tmp_path):
    """``--seeds`` gives exactly what ``Segmenter.segment_text(seeds=...)`` gives, and the two differ."""
    from napari_clipsam.engine.segmenter import Segmenter

    s = make_image(HELD_OUT + 9, counts={"nucleus": (6, 10)})
    img = _write(tmp_path / "img.tif", s.image)
    seg = Segmenter.from_pretrained("demo")
    seg.set_image(s.image)
    got = {}
    for seeds in ("grid", "regions"):
        out = tmp_path / f"{seeds}.tif"
        assert cli.main(["segment", str(img), "--text", "nucleus", "--seeds", seeds, "-o", str(out), "-q"]) == 0
        got[seeds] = tifffile.imread(out)
        np.testing.assert_array_equal(got[seeds], seg.segment_text("nucleus", seeds=seeds).labels)
    assert got["grid"].any() and not np.array_equal(got["grid"], got["regions"])
    out = tmp_path / "strict.tif"  # --min-support 0.9 drops the masks the text map backs less
    assert cli.main(["segment", str(img), "--text", "nucleus", "--min-support", "0.9", "-o", str(out), "-q"]) == 0
    np.testing.assert_array_equal(tifffile.imread(out), seg.segment_text("nucleus", min_support=0.9).labels)
    assert len(np.unique(tifffile.imread(out))) < len(np.unique(got["grid"]))  # measured 4 vs 8 objects


@needs_demo
def test_segment_3d_volume_by_text_subprocess(tmp_path):
    s = make_volume(HELD_OUT + 7, (12, 256, 256), counts={"nucleus": (3, 5)})
    gt = s.instance_labels("nucleus")
    vol = _write(tmp_path / "stack.tif", s.image)
    res = run_cli("segment", vol, "--3d", "--text", "nucleus", "-o", tmp_path / "stack_nuclei.tif")
    assert res.returncode == 0, res.stderr
    pred = tifffile.imread(tmp_path / "stack_nuclei.tif")
    assert pred.shape == s.image.shape and pred.dtype == np.uint16
    # Measured on this volume: 3D instance F1 0.62 and voxel IoU 0.78 (the previous demo, with
    # one prompt per region, gave 0.13 and 0.35: touching nuclei merged in some slices split 3D objects).
    assert instance_f1(pred, gt) >= 0.4
    assert mask_iou(pred > 0, gt > 0) >= 0.6


# ---------------------------------------------------------------------------------------------- errors
@pytest.fixture
def inputs(tmp_path) -> dict[str, Path]:
    s = make_image(HELD_OUT + 20, size=64)
    v = make_volume(HELD_OUT + 21, (4, 64, 64))
    return {"img": _write(tmp_path / "img.tif", s.image), "vol": _write(tmp_path / "vol.tif", v.image),
            "existing": _write(tmp_path / "done.tif", np.ones((64, 64), np.uint16)),
            "junk": tmp_path / "junk.tif"}


@pytest.mark.parametrize("case, args, expect", [
    ("missing input", ["segment", "{tmp}/nope.tif", "--text", "nucleus"], "input not found"),
    ("empty glob", ["segment", "{tmp}/*.tiff", "--text", "nucleus"], "matches no .tif"),
    ("empty text", ["segment", "{img}", "--text", "  "], "--text is empty"),
    ("no prompt", ["segment", "{img}"], "give --text"),
    ("existing output", ["segment", "{img}", "--text", "nucleus", "-o", "{existing}"], "exists"),
    ("3D without --3d", ["segment", "{vol}", "--text", "nucleus", "-o", "{tmp}/o.tif"], "add --3d"),
    ("no such channel axis", ["segment", "{img}", "--text", "nucleus", "--channel-axis", "2", "-o", "{tmp}/o.tif"],
     "channel axis 2 is outside the 2 axes"),
    ("not a TIFF", ["segment", "{junk}", "--text", "nucleus", "-o", "{tmp}/o.tif"], "cannot read"),
    ("bad points", ["segment", "{img}", "--points", "1;2", "-o", "{tmp}/o.tif"], "--points"),
    ("3D clicks without z", ["segment", "{vol}", "--3d", "--points", "5,5", "-o", "{tmp}/o.tif"], "--z"),
    ("missing model", ["segment", "{img}", "--text", "x", "--model", "{tmp}/m.safetensors"], "model file not found"),
    ("missing adapter", ["segment", "{img}", "--text", "x", "--adapter", "{tmp}/a.safetensors"], "adapter file not found"),
    ("adapter name", ["finetune", "--images", "{img}", "--labels", "{img}", "--text", "x", "-o", "{existing}"],
     "end in .safetensors"),
    ("adapter folder not writable", ["finetune", "--images", "{img}", "--labels", "{img}", "--text", "x", "-o",
                                     "{existing}/a.safetensors"], "cannot write the adapter"),
    ("same sample files", ["sample", "-o", "{tmp}/o.tif", "--labels", "{tmp}/o.tif"], "the same file"),
    ("3D sample size", ["sample", "--3d", "--size", "64", "-o", "{tmp}/o.tif"], "--size"),
    ("embed cache not writable", ["embed", "{img}", "--cache", "{existing}/emb"], "cannot write cache entries"),
    ("unpaired labels", ["finetune", "--images", "{img}", "--labels", "{img}", "{vol}", "--text", "x", "-o",
                         "{tmp}/a.safetensors"], "one label file per image"),
])
def test_errors_exit_nonzero_with_one_clear_line(inputs, tmp_path, case, args, expect):
    inputs["junk"].write_text("not an image")
    fmt = {k: str(v) for k, v in inputs.items()} | {"tmp": str(tmp_path)}
    before = inputs["existing"].read_bytes()
    res = run_cli(*[a.format(**fmt) for a in args])
    assert expect in error_line(res), (case, res.stderr)
    assert inputs["existing"].read_bytes() == before
    assert not (tmp_path / "o.tif").exists()


# ---------------------------------------------------------------------------------------------- mechanics (tiny model)
def test_overwrite_rules_and_atomic_writes(tmp_path, tiny_model, capsys):
    img = _write(tmp_path / "a.tif", make_image(HELD_OUT + 30, size=64).image)
    out = _write(tmp_path / "a_labels.tif", np.full((64, 64), 7, np.uint16))
    base = ["segment", str(img), "--text", "nucleus", "--model", str(tiny_model), "-q"]
    assert cli.main(base) == 1
    assert "exists" in capsys.readouterr().err
    assert (tifffile.imread(out) == 7).all()
    assert cli.main(base + ["--skip-existing"]) == 0
    assert (tifffile.imread(out) == 7).all()
    assert cli.main(base + ["--overwrite"]) == 0
    lab = tifffile.imread(out)
    assert lab.shape == (64, 64) and lab.dtype == np.uint16 and not (lab == 7).all()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tif", "a_labels.tif"]  # no temp files left


def test_manual_mode_2d_and_3d_write_one_object(tmp_path, tiny_model):
    img = _write(tmp_path / "img.tif", make_image(HELD_OUT + 31, size=64).image)
    vol = _write(tmp_path / "vol.tif", make_volume(HELD_OUT + 32, (3, 64, 64)).image)
    model = ["--model", str(tiny_model), "-q"]
    assert cli.main(["segment", str(img), "--points", "30,30", "--negative", "5,5", "-o", str(tmp_path / "m2.tif"),
                     *model]) == 0
    assert cli.main(["segment", str(vol), "--3d", "--z", "1", "--box", "20,20,44,44", "-o", str(tmp_path / "m3.tif"),
                     *model]) == 0
    m2, m3 = tifffile.imread(tmp_path / "m2.tif"), tifffile.imread(tmp_path / "m3.tif")
    assert m2.shape == (64, 64) and m3.shape == (3, 64, 64)
    for m in (m2, m3):
        assert m.dtype == np.uint16 and set(np.unique(m)) <= {0, 1}


def test_batch_outputs_names_and_clashes(tmp_path):
    a, b = Path("x/a.tif"), Path("y/b.tif")
    assert cli.plan_outputs([a], None) == [Path("x/a_labels.tif")]
    assert cli.plan_outputs([a], "out.tif") == [Path("out.tif")]
    assert cli.plan_outputs([a, b], str(tmp_path / "res")) == [tmp_path / "res/a_labels.tif", tmp_path / "res/b_labels.tif"]
    with pytest.raises(cli.CliError, match="names one file"):
        cli.plan_outputs([a, b], "out.tif")
    with pytest.raises(cli.CliError, match="both be written"):
        cli.plan_outputs([a, Path("z/a.tif")], str(tmp_path / "res"))
    folder = tmp_path / "imgs"
    for name in ("c.tif", "d.tiff", "c_labels.tif", "notes.txt"):
        _write(folder / name, np.zeros((8, 8), np.uint8)) if name != "notes.txt" else (folder / name).write_text("x")
    assert [p.name for p in cli.expand_inputs([str(folder)])] == ["c.tif", "d.tiff"]
    assert [p.name for p in cli.expand_inputs([str(folder / "*.tif*"), str(folder / "c.tif")])] == ["c.tif", "d.tiff"]


def test_labels_dtype_uint16_until_ids_overflow(tmp_path):
    small = np.array([[0, 65535]], np.uint32)
    big = np.array([[0, 65536]], np.uint32)
    assert cli.labels_dtype(small) == np.uint16 and cli.labels_dtype(big) == np.uint32
    cli.write_tiff(tmp_path / "big.tif", big.astype(cli.labels_dtype(big)))
    assert tifffile.imread(tmp_path / "big.tif").dtype == np.uint32
    with pytest.raises(cli.CliError, match="exists"):
        cli.write_tiff(tmp_path / "big.tif", small)
    assert tifffile.imread(tmp_path / "big.tif").max() == 65536


def test_embed_then_segment_reuses_the_cache(tmp_path, tiny_model, capsys):
    img = _write(tmp_path / "in" / "a.tif", make_image(HELD_OUT + 33, size=64).image)
    cache = tmp_path / "cache"
    model = ["--model", str(tiny_model), "-q"]
    assert cli.main(["embed", str(img), "--cache", str(cache), "--text", "nucleus", *model]) == 0
    files = sorted(cache.rglob("*.pt"))
    assert len(files) >= 2  # image features + the text-conditioned embedding
    assert cli.main(["segment", str(img), "--text", "nucleus", "--cache", str(cache), "-o", str(tmp_path / "c.tif"),
                     *model]) == 0
    assert sorted(cache.rglob("*.pt")) == files  # nothing recomputed
    assert cli.main(["segment", str(img), "--text", "nucleus", "-o", str(tmp_path / "n.tif"), *model]) == 0
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "c.tif"), tifffile.imread(tmp_path / "n.tif"))


def test_finetune_writes_an_adapter_that_segment_accepts(tmp_path, tiny_model, capsys):
    """Subprocess: a 3-step fine-tune prints validation metrics and writes an adapter; segment
    --adapter uses it; an adapter for another base gives one clear line."""
    args = []
    for i in range(2):
        s = make_image(HELD_OUT + 40 + i, size=64, counts={"nucleus": (1, 3)})
        args += [_write(tmp_path / f"img{i}.tif", s.image), _write(tmp_path / f"lab{i}.tif", s.instance_labels("nucleus"))]
    adapter = tmp_path / "nuclei.safetensors"
    res = run_cli("finetune", "--images", args[0], args[2], "--labels", args[1], args[3], "--text", "nucleus",
                  "--steps", "3", "--model", tiny_model, "-o", adapter)
    assert res.returncode == 0, res.stderr
    assert "validation" in res.stdout and "val_score" in res.stdout and adapter.is_file()
    native = "bfloat16" if cpu_has_fast_bf16() else None  # default precision: bf16 where the CPU has it
    assert read_adapter(adapter)[0]["training"]["summary"]["autocast"] == native
    fp32 = tmp_path / "fp32.safetensors"
    assert cli.main(["finetune", "--images", str(args[0]), "--labels", str(args[1]), "--text", "nucleus",
                     "--steps", "2", "--model", str(tiny_model), "-o", str(fp32), "--fp32", "-q"]) == 0
    assert read_adapter(fp32)[0]["training"]["summary"]["autocast"] is None
    out = tmp_path / "seg.tif"
    assert cli.main(["segment", str(args[0]), "--text", "nucleus", "--model", str(tiny_model), "--adapter",
                     str(adapter), "-o", str(out), "-q"]) == 0
    assert tifffile.imread(out).shape == (64, 64)

    from napari_clipsam.models.clipsam import ClipSam, tiny_config

    torch.manual_seed(1)
    other = ClipSam(tiny_config()).save(tmp_path / "other.safetensors")
    capsys.readouterr()
    assert cli.main(["segment", str(args[0]), "--text", "nucleus", "--model", str(other), "--adapter", str(adapter),
                     "-o", str(tmp_path / "x.tif")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "was trained on" in err, err
    assert not (tmp_path / "x.tif").exists()


def test_sample_and_help(tmp_path, capsys):
    assert cli.main(["sample", "-o", str(tmp_path / "s.tif"), "--labels", str(tmp_path / "gt.tif"),
                     "--concept", "nucleus"]) == 0
    img, gt = tifffile.imread(tmp_path / "s.tif"), tifffile.imread(tmp_path / "gt.tif")
    assert img.shape == gt.shape == (256, 256) and img.dtype == np.uint16 and gt.max() >= 3
    assert cli.main(["sample", "-o", str(tmp_path / "s.tif")]) == 1  # never overwritten
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    for name in ("segment", "finetune", "embed", "sample", "models"):
        assert name in out


def test_usage_errors_are_one_line_too(tmp_path):
    res = run_cli("segment")
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        "napari-clipsam segment: error: the following arguments are required: INPUT "
        "(see napari-clipsam segment --help)"]


# ---------------------------------------------------------------------------------------------- audit regressions
def _corrupt_data(path: Path, image: np.ndarray) -> Path:
    """A TIFF whose header reads but whose compressed pixel data does not decode."""
    tifffile.imwrite(path, image, compression="zlib")
    with tifffile.TiffFile(path) as tif:
        offset, count = tif.pages[0].dataoffsets[0], tif.pages[0].databytecounts[0]
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(b"\0" * count)
    return path


def test_one_bad_file_does_not_stop_the_batch(tmp_path, tiny_model, capsys):
    """An all-NaN and a corrupt TIFF are reported by name; the other files are still segmented;
    exit status 1 at the end. A --skip-existing rerun goes past them too."""
    im = make_image(HELD_OUT + 50, size=64).image
    _write(tmp_path / "in" / "a.tif", im)
    _write(tmp_path / "in" / "b_nan.tif", np.full((64, 64), np.nan, np.float32))
    _corrupt_data(tmp_path / "in" / "c_corrupt.tif", im)
    _write(tmp_path / "in" / "d.tif", im)
    out = tmp_path / "out"
    argv = ["segment", str(tmp_path / "in"), "--text", "nucleus", "--model", str(tiny_model), "-o", str(out), "-q"]
    assert cli.main(argv) == 1
    assert sorted(p.name for p in out.iterdir()) == ["a_labels.tif", "d_labels.tif"]
    err = capsys.readouterr().err
    assert "b_nan.tif: image is all NaN" in err and "cannot read" in err and "c_corrupt.tif" in err, err
    summary = err.strip().splitlines()[-1]
    assert "2 done, 0 skipped, 2 failed" in summary and "b_nan.tif" in summary and "c_corrupt.tif" in summary
    assert cli.main(argv + ["--skip-existing"]) == 1
    assert "0 done, 2 skipped, 2 failed" in capsys.readouterr().err


def test_bad_device_is_one_line_before_the_model_loads(tmp_path, tiny_model, capsys, monkeypatch):
    img = _write(tmp_path / "a.tif", make_image(HELD_OUT + 51, size=64).image)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    seg = ["segment", str(img), "--text", "nucleus", "--model", str(tiny_model), "-o", str(tmp_path / "o.tif")]
    ft = ["finetune", "--images", str(img), "--labels", str(img), "--text", "nucleus", "--steps", "1",
          "--model", str(tiny_model), "-o", str(tmp_path / "a.safetensors"), "-q"]
    for argv, device, expect in [(seg, "bogus", "not a torch device"), (seg, "cuda", "no cuda device"),
                                 (ft, "bogus", "not a torch device")]:
        assert cli.main([*argv, "--device", device]) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"--device {device}:" in err and expect in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tif"]


def test_rgb_image_with_3d_is_rejected_not_read_as_slices(tmp_path, tiny_model, capsys):
    rgb = tmp_path / "rgb.tif"
    tifffile.imwrite(rgb, np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8), photometric="rgb")
    base = ["segment", str(rgb), "--3d", "--text", "nucleus", "--model", str(tiny_model), "-q"]
    assert cli.main([*base, "-o", str(tmp_path / "o.tif")]) == 1
    err = capsys.readouterr().err
    assert "is RGB, not a volume: drop --3d" in err, err
    assert not (tmp_path / "o.tif").exists()
    assert cli.main([*base, "--channel-axis", "2", "-o", str(tmp_path / "c.tif")]) == 0  # channels named: 2D
    assert tifffile.imread(tmp_path / "c.tif").shape == (64, 64)


def test_output_with_another_suffix_is_not_made_a_folder(tmp_path, tiny_model, capsys):
    a = Path("x/a.tif")
    with pytest.raises(cli.CliError, match=r"-o out.png: labels are written as TIFF.*-o out.png/"):
        cli.plan_outputs([a], "out.png")
    assert cli.plan_outputs([a], "res.v2/") == [Path("res.v2/a_labels.tif")]  # a trailing / asks for a folder
    (tmp_path / "run.1").mkdir()
    assert cli.plan_outputs([a], str(tmp_path / "run.1")) == [tmp_path / "run.1" / "a_labels.tif"]  # existing
    img = _write(tmp_path / "a.tif", make_image(HELD_OUT + 52, size=64).image)
    assert cli.main(["segment", str(img), "--text", "nucleus", "--model", str(tiny_model),
                     "-o", str(tmp_path / "out.png")]) == 1
    assert "labels are written as TIFF" in capsys.readouterr().err
    assert not (tmp_path / "out.png").exists()


def test_finetune_rejects_a_negative_lora_rank(tmp_path, tiny_model, capsys):
    s = make_image(HELD_OUT + 53, size=64, counts={"nucleus": (1, 3)})
    img, lab = _write(tmp_path / "img.tif", s.image), _write(tmp_path / "lab.tif", s.instance_labels("nucleus"))
    out = tmp_path / "a.safetensors"
    assert cli.main(["finetune", "--images", str(img), "--labels", str(lab), "--text", "nucleus", "--steps", "1",
                     "--lora-rank", "-1", "--model", str(tiny_model), "-o", str(out), "-q"]) == 1
    assert "--lora-rank -1: need 0 (no LoRA) or more" in capsys.readouterr().err
    assert not out.exists()


def test_quiet_scheduler_run_prints_nothing_and_log_level_shows_dask(tmp_path, tiny_model):
    """-q with --scheduler: no output at all on success (Dask's INFO logs followed its own level);
    --log-level info brings them back."""
    img = _write(tmp_path / "in" / "a.tif", make_image(HELD_OUT + 40, size=64).image)
    base = ["segment", img, "--text", "nucleus", "--model", tiny_model, "--scheduler", "threads", "--workers", "1"]
    res = run_cli(*base, "-o", tmp_path / "a.tif", "-q")
    assert res.returncode == 0 and res.stdout == "" and res.stderr == "", res.stderr
    assert (tmp_path / "a.tif").is_file()
    res = run_cli("--log-level", "info", *base, "-o", tmp_path / "b.tif", "-q")
    assert res.returncode == 0 and "INFO distributed" in res.stderr


def test_bad_log_level_is_a_usage_error_and_a_closed_pipe_is_not_an_error():
    res = run_cli("--log-level", "verbose", "models", "list")
    assert res.returncode == 2 and "invalid choice: 'VERBOSE'" in res.stderr and "Traceback" not in res.stderr
    proc = subprocess.Popen([*_cli_argv(), "models", "list", "-v"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=cli_env())
    proc.stdout.close()  # like `| head -c 0`: the reader is gone before the table is printed
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 0 and err == "", err


#: A child that runs the command as ``napari-clipsam`` does, but stops in the import of one module
#: (printing "held") until the parent's Ctrl-C (a real SIGINT) arrives. It first takes Python's own
#: SIGINT handler, as a command started from a terminal has it: a test run started in the
#: background (``cmd &``) passes SIGINT on ignored, and Python then leaves it ignored.
_HELD_IMPORT = """
import importlib.abc, signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)
held = sys.argv[1]

class Hold(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == held:
            print("held", flush=True)
            time.sleep(120)
        return None

sys.meta_path.insert(0, Hold())
from napari_clipsam.__main__ import run
sys.exit(run(sys.argv[2:]))
"""


@pytest.mark.parametrize("held", ["napari_clipsam.cli",  # while the command's own modules load
                                  "napari_clipsam.models.registry",  # main's first lazy import
                                  "napari_clipsam.data.synthetic"])  # inside the sample command
def test_ctrl_c_ends_with_one_line_and_status_130_whenever_it_comes(tmp_path, held):
    out = tmp_path / "sample.tif"
    proc = subprocess.Popen([sys.executable, "-c", _HELD_IMPORT, held, "sample", "-o", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env())
    try:
        assert proc.stdout.readline() == "held\n"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130 and err == "napari-clipsam: interrupted\n", err
    assert not out.exists()


def test_python_m_napari_clipsam_is_the_command():
    from napari_clipsam import __version__

    res = subprocess.run([sys.executable, "-m", "napari_clipsam", "--version"], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0 and res.stdout == f"napari-clipsam {__version__}\n", res.stderr


def test_finetune_takes_one_text(tmp_path):
    img = _write(tmp_path / "img.tif", make_image(HELD_OUT + 41, size=64).image)
    res = run_cli("finetune", "--images", img, "--labels", img, "--text", "nucleus", "--text", "vesicle",
                  "-o", tmp_path / "a.safetensors")
    assert res.returncode == 2 and "--text given twice ('nucleus', 'vesicle')" in res.stderr
    assert not (tmp_path / "a.safetensors").exists()
