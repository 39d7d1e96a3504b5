"""Packaging: import without Qt/napari, npe2 manifest, wheel contents, CI = README test command
(issue 2, acceptance 1 and 2)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _readme_test_command() -> str:
    """First non-empty line of the first ```bash block under '## Running the tests' in README.md."""
    lines = (ROOT / "README.md").read_text().splitlines()
    start = lines.index("## Running the tests")
    in_block = False
    for line in lines[start + 1:]:
        if line.startswith("## "):
            break
        if line.strip() == "```bash":
            in_block = True
        elif in_block and line.startswith("```"):
            break
        elif in_block and line.strip():
            return line
    raise AssertionError("README.md has no test command under '## Running the tests'")


def test_import_does_not_pull_in_napari_or_qt():
    code = (
        "import sys, napari_clipsam, napari_clipsam.models.registry, napari_clipsam.cli; "
        "bad = [m for m in ('napari', 'qtpy', 'PyQt5', 'PyQt6', 'PySide2', 'PySide6', 'vispy') "
        "if m in sys.modules]; "
        "assert not bad, bad"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr


def test_ci_runs_exactly_the_readme_test_command():
    run = ROOT / ".ci" / "run"
    assert run.stat().st_mode & 0o111, ".ci/run must be executable"
    assert subprocess.run(["bash", "-n", str(run)]).returncode == 0
    res = subprocess.run(["bash", str(run), "--print-test-command"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    readme = _readme_test_command()
    assert res.stdout.strip() == readme
    assert "pytest" in readme


def test_manifest_is_packaged_and_reachable_from_the_package():
    from importlib.resources import files

    root_manifest = (ROOT / "napari.yaml").read_text()
    assert (files("napari_clipsam") / "napari.yaml").read_text() == root_manifest
    import yaml

    data = yaml.safe_load(root_manifest)
    assert data["name"] == "napari-clipsam"


def test_npe2_validate_with_imports():
    pytest.importorskip("npe2")
    from importlib.metadata import entry_points

    eps = [ep for ep in entry_points(group="napari.manifest") if ep.name == "napari-clipsam"]
    if not eps:
        pytest.skip("napari-clipsam is not installed (pip install -e .)")
    assert eps[0].value == "napari_clipsam:napari.yaml"
    code = "import sys; from npe2.cli import main; sys.argv = ['npe2', 'validate', 'napari-clipsam', '--imports']; main()"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "valid" in res.stdout


def test_wheel_contains_the_manifest_once(tmp_path):
    pytest.importorskip("build")
    pytest.importorskip("hatchling")
    res = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, timeout=600,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    (wheel,) = tmp_path.glob("napari_clipsam-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        assert names.count("napari_clipsam/napari.yaml") == 1
        assert z.read("napari_clipsam/napari.yaml").decode() == (ROOT / "napari.yaml").read_text()
        assert "napari_clipsam/models/registry.py" in names and "napari_clipsam/cli.py" in names
        assert "napari_clipsam/weights/demo.safetensors" in names
        licence = [n for n in names if n.endswith(".dist-info/licenses/LICENSE")]  # BSD-3 ships its notice
        assert licence and "BSD 3-Clause" in z.read(licence[0]).decode()
        eps = z.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    assert "[napari.manifest]\nnapari-clipsam = napari_clipsam:napari.yaml" in eps
    assert "napari-clipsam = napari_clipsam.__main__:run" in eps
