"""``napari-clipsam models list`` / ``models download`` (issue 2, acceptance 5)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from napari_clipsam import cli
from napari_clipsam.models import registry


def _cli_argv() -> list[str]:
    """The installed console script when there is one, else ``python -m napari_clipsam``."""
    script = Path(sys.executable).with_name("napari-clipsam")
    if script.is_file():
        return [str(script)]
    found = shutil.which("napari-clipsam")
    return [found] if found else [sys.executable, "-m", "napari_clipsam"]


def _run(*args: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env}
    return subprocess.run([*_cli_argv(), *args], capture_output=True, text=True, env=full_env, timeout=120)


def test_models_list_offline_shows_every_registered_model(_isolated_cache):
    res = _run("models", "list", NAPARI_CLIPSAM_OFFLINE="1")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].split() == ["NAME", "KIND", "SIZE", "STATUS", "PATH"]
    for name, entry in registry.MODELS.items():
        row = next((ln for ln in lines if ln.split()[:1] == [name]), None)
        assert row is not None, f"{name} missing from:\n{res.stdout}"
        assert entry.kind in row.split()
        if entry.bundled:
            assert "bundled" in row or "not built" in row
        else:
            assert "not cached" in row and str(_isolated_cache) in row
    assert f"cache: {_isolated_cache}" in res.stdout


def test_models_list_marks_cached_files(_isolated_cache, capsys):
    path = registry.model_path("vit_b")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"x")
    assert cli.main(["models", "list", "--kind", "sam", "-v"]) == 0
    out = capsys.readouterr().out
    row = next(ln for ln in out.splitlines() if ln.startswith("vit_b "))
    assert " cached " in row and str(path) in row
    assert "clip_vit_b16_openai" not in out
    assert "sha256:ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912" in out
    assert "Apache-2.0" in out


@pytest.mark.parametrize("env", [
    {"NAPARI_CLIPSAM_MIRROR": "http://127.0.0.1:9"},  # a failing connection, like being offline
    {"NAPARI_CLIPSAM_OFFLINE": "1"},
])
def test_models_download_offline_fails_with_one_clear_message(_isolated_cache, env):
    res = _run("models", "download", "vit_b", **env)
    assert res.returncode == 1
    err = res.stderr.strip()
    assert len(err.splitlines()) == 1, err  # one line, no traceback
    assert err.startswith("napari-clipsam: error: could not download model 'vit_b'")
    target = _isolated_cache / "sam" / "sam_vit_b_01ec64.pth"
    assert f"save it as {target}" in err and "sam_vit_b_01ec64.pth" in err
    url = ("http://127.0.0.1:9/sam/sam_vit_b_01ec64.pth" if "NAPARI_CLIPSAM_MIRROR" in env
           else "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth")
    assert url in err
    assert not target.exists()


def test_models_download_unknown_name(capsys):
    assert cli.main(["models", "download", "vit_x"]) == 1
    assert "unknown model 'vit_x'" in capsys.readouterr().err


def test_models_download_verifies_a_cached_file(_isolated_cache, capsys, monkeypatch):
    """A file already in the cache with the right hash is not downloaded again."""
    from dataclasses import replace
    import hashlib

    data = b"pretend checkpoint"
    entry = replace(registry.get_entry("vit_b"), name="fake_b", filename="fake.pth",
                    known_hash="sha256:" + hashlib.sha256(data).hexdigest())
    monkeypatch.setitem(registry.MODELS, "fake_b", entry)
    monkeypatch.setenv("NAPARI_CLIPSAM_OFFLINE", "1")
    path = registry.model_path("fake_b")
    path.parent.mkdir(parents=True)
    path.write_bytes(data)
    assert cli.main(["models", "download", "fake_b", "-q"]) == 0
    assert f"fake_b: {path}" in capsys.readouterr().out


def test_help_lists_models_command(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    assert info.value.code == 0
    assert "models" in capsys.readouterr().out
