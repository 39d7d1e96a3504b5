"""Model registry, downloads and safe checkpoint loading (issue 2, acceptance 3 and 4)."""

from __future__ import annotations

import functools
import hashlib
import http.server
import threading
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from segment_anything import sam_model_registry

from napari_clipsam.models import registry
from napari_clipsam.models.checkpoints import infer_sam_config, load_clip_file, sam_arch_name
from napari_clipsam.models.clip_parts import build_clip, tiny_clip_config
from napari_clipsam.models.registry import (
    CheckpointError,
    HashMismatchError,
    ModelDownloadError,
    ModelEntry,
    fetch,
    load_clip,
    load_sam_checkpoint,
)
from napari_clipsam.models.sam_parts import SAM_CONFIGS, build_sam

# --------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def official_vit_b(tmp_path_factory):
    """segment-anything's own vit_b, random weights, saved like the official files
    (``torch.save(sam.state_dict())``)."""
    torch.manual_seed(0)
    sam = sam_model_registry["vit_b"]()
    sam.eval()
    path = tmp_path_factory.mktemp("sam") / "sam_vit_b_random.pth"
    torch.save(sam.state_dict(), path)
    return sam, path


@pytest.fixture
def tiny_sam_file(tmp_path):
    torch.manual_seed(1)
    sam = build_sam("tiny")
    path = tmp_path / "tiny_sam.pth"
    torch.save(sam.state_dict(), path)
    return sam, path


@pytest.fixture
def http_server(tmp_path):
    """A local HTTP server over a folder; yields (folder, base_url)."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _register(monkeypatch, entry: ModelEntry) -> ModelEntry:
    monkeypatch.setitem(registry.MODELS, entry.name, entry)
    return entry


def _sha256(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------------------
# registry contents and cache
# --------------------------------------------------------------------------------------


def test_registry_has_the_required_models():
    names = set(registry.MODELS)
    assert {"vit_b", "vit_l", "vit_h", "vit_b_lm", "vit_l_lm", "demo"} <= names
    clip = {(e.open_clip_model, e.open_clip_pretrained) for e in registry.list_models("clip")}
    assert ("ViT-B-16", "openai") in clip and ("ViT-B-16", "laion2b_s34b_b88k") in clip
    assert ("hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224", None) in clip
    for e in registry.list_models():
        assert e.licence and e.approx_mb > 0 and e.filename
        if e.kind == "sam":
            assert e.url.startswith("https://") and e.sam_arch in SAM_CONFIGS
            assert e.known_hash.split(":")[0] in ("sha256", "xxh128", "md5")
        if e.bundled and registry.model_path(e.name).is_file():  # the size `models list` shows is the file's
            assert abs(registry.model_path(e.name).stat().st_size / 1e6 - e.approx_mb) <= 0.1 * e.approx_mb
    assert registry.get_entry("vit_b").known_hash == (
        "sha256:ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912"
    )
    assert registry.get_entry("vit_b").size_bytes == 375042383


def test_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv(registry.CACHE_ENV, str(tmp_path / "c"))
    assert registry.cache_dir() == tmp_path / "c"
    assert registry.model_path("vit_b") == tmp_path / "c" / "sam" / "sam_vit_b_01ec64.pth"
    assert registry.model_status("vit_b") == "not cached"
    monkeypatch.delenv(registry.CACHE_ENV)
    assert "napari-clipsam" in str(registry.cache_dir())


def test_demo_entry_is_bundled_or_reported_not_built():
    status = registry.model_status("demo")
    path = registry.model_path("demo")
    assert path.parts[-3:] == ("napari_clipsam", "weights", "demo.safetensors")
    assert status == ("bundled" if path.is_file() else "not built")
    if status == "not built":
        with pytest.raises(ModelDownloadError, match="not built"):
            fetch("demo")


def test_unknown_name_and_missing_path_errors():
    with pytest.raises(ValueError, match="unknown model 'vit_x'.*vit_b"):
        fetch("vit_x")
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        fetch("/nowhere.pth")


# --------------------------------------------------------------------------------------
# downloads: offline, hash mismatch, corrupt cache
# --------------------------------------------------------------------------------------


def test_offline_download_error_names_url_file_and_path(monkeypatch):
    monkeypatch.setenv(registry.MIRROR_ENV, "http://127.0.0.1:9")  # nothing listens on port 9
    target = registry.model_path("vit_b")
    with pytest.raises(ModelDownloadError) as info:
        fetch("vit_b")
    msg = str(info.value)
    assert "http://127.0.0.1:9/sam/sam_vit_b_01ec64.pth" in msg
    assert str(target) in msg and "sam_vit_b_01ec64.pth" in msg
    assert info.value.__cause__ is None  # one clear error, no chained traceback
    assert isinstance(info.value, OSError) and not target.exists()

    monkeypatch.delenv(registry.MIRROR_ENV)
    monkeypatch.setenv(registry.OFFLINE_ENV, "1")
    with pytest.raises(ModelDownloadError, match="dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth"):
        fetch("vit_b")


def test_mirror_is_laid_out_like_the_cache_so_same_named_files_stay_apart(monkeypatch, http_server):
    """The CLIP entries share the file name open_clip_pytorch_model.bin: each is fetched from its
    own place in the mirror (a flat mirror gave every CLIP model the same file)."""
    root, base = http_server
    monkeypatch.setenv(registry.MIRROR_ENV, base)
    for name in ("clip_vit_b16_openai", "clip_vit_b16_laion2b"):
        where = root / registry.model_path(name).relative_to(registry.cache_dir())
        where.parent.mkdir(parents=True)
        where.write_bytes(f"weights of {name}".encode())
    for name in ("clip_vit_b16_openai", "clip_vit_b16_laion2b"):
        assert fetch(name).read_bytes() == f"weights of {name}".encode()


def test_corrupt_cached_file_is_removed_and_redownloaded(monkeypatch, tiny_sam_file, http_server):
    _, src = tiny_sam_file
    root, base = http_server
    (root / "tiny.pth").write_bytes(src.read_bytes())
    entry = _register(monkeypatch, ModelEntry(
        "tiny_test", "sam", f"{base}/tiny.pth", "tiny.pth", _sha256(src), src.stat().st_size,
        0.1, "test", sam_arch="tiny"))
    cached = registry.model_path(entry.name)
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_bytes(b"not the published file")

    with pytest.raises(HashMismatchError, match="deleted") as info:
        fetch(entry.name)
    assert str(cached) in str(info.value) and entry.known_hash in str(info.value)
    assert not cached.exists()

    seen = []
    path = fetch(entry.name, progress=lambda done, total: seen.append((done, total)))  # downloads again
    assert path == cached and path.read_bytes() == src.read_bytes()
    assert seen and seen[-1][1] == src.stat().st_size
    assert registry.model_status(entry.name) == "cached"
    sam = load_sam_checkpoint(entry.name)
    assert torch.equal(sam.image_encoder.pos_embed, tiny_sam_file[0].image_encoder.pos_embed)


def test_download_with_wrong_hash_keeps_nothing(monkeypatch, tiny_sam_file, http_server):
    _, src = tiny_sam_file
    root, base = http_server
    (root / "tiny.pth").write_bytes(src.read_bytes())
    entry = _register(monkeypatch, ModelEntry(
        "tiny_bad", "sam", f"{base}/tiny.pth", "tiny.pth", "sha256:" + "0" * 64, None, 0.1, "test",
        sam_arch="tiny"))
    with pytest.raises(HashMismatchError, match="published hash"):
        fetch(entry.name)
    assert not registry.model_path(entry.name).exists()
    assert list(registry.model_path(entry.name).parent.iterdir()) == []


def test_http_404_is_a_download_error(monkeypatch, http_server):
    _, base = http_server
    _register(monkeypatch, replace(registry.get_entry("vit_b"), name="gone", url=f"{base}/gone.pth"))
    with pytest.raises(ModelDownloadError, match="HTTP 404"):
        fetch("gone")


# --------------------------------------------------------------------------------------
# SAM loading (acceptance 3)
# --------------------------------------------------------------------------------------


def test_official_format_vit_b_loads_by_path_with_identical_weights(official_vit_b):
    sam, path = official_vit_b
    loaded = load_sam_checkpoint(path)  # architecture inferred from the shapes
    ref, got = sam.state_dict(), loaded.state_dict()
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    # cheap exact checks of the parts (the full 1024 px encoder pass is the slow test below)
    x = torch.randn(1, 3, 1024, 1024)
    with torch.inference_mode():
        assert torch.equal(sam.image_encoder.patch_embed(x), loaded.image_encoder.patch_embed(x))
        emb = torch.randn(1, 256, 64, 64)
        pts = (torch.tensor([[[500.0, 300.0]]]), torch.tensor([[1]]))
        outs = []
        for m in (sam, loaded):
            sparse, dense = m.prompt_encoder(points=pts, boxes=None, masks=None)
            outs.append(m.mask_decoder(emb, m.prompt_encoder.get_dense_pe(), sparse, dense, True))
    assert all(torch.equal(a, b) for a, b in zip(*outs))
    assert sam_arch_name(infer_sam_config(torch.load(path, weights_only=True))) == "vit_b"


@pytest.mark.slow
def test_official_format_vit_b_identical_image_encoder_output(official_vit_b):
    """Same weights are not enough: every stage must be built alike (window sizes, which blocks are
    global, relative positions, neck). Each stage runs on a 20×20 token grid instead of 64×64
    (windowed blocks pad it, global blocks resize their relative-position tables the same way), so
    the check costs seconds instead of two full 1024² forwards."""
    sam, path = official_vit_b
    loaded = load_sam_checkpoint(path, arch="vit_b")
    a, b = sam.image_encoder, loaded.image_encoder
    g = torch.Generator().manual_seed(3)
    with torch.inference_mode():
        x = torch.randn(1, 3, 320, 320, generator=g)
        ta, tb = a.patch_embed(x), b.patch_embed(x)
        assert ta.shape[1:3] == (20, 20) and torch.equal(ta, tb)
        t = ta + torch.randn(ta.shape, generator=g)
        for i, (block_a, block_b) in enumerate(zip(a.blocks, b.blocks, strict=True)):
            out = block_a(t)
            assert torch.equal(out, block_b(t)), f"block {i}"
            t = out
        assert torch.equal(a.neck(t.permute(0, 3, 1, 2)), b.neck(t.permute(0, 3, 1, 2)))


def test_truncated_checkpoint_gives_clear_error(official_vit_b, tmp_path):
    _, path = official_vit_b
    bad = tmp_path / "truncated.pth"
    with open(path, "rb") as f:
        bad.write_bytes(f.read(8_000_000))
    with pytest.raises(CheckpointError, match="truncated or corrupt") as info:
        load_sam_checkpoint(bad)
    assert str(bad) in str(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_garbage_and_empty_files_give_clear_errors(tmp_path):
    for content in (b"", b"\x80\x04garbage" * 10):
        bad = tmp_path / "bad.pth"
        bad.write_bytes(content)
        with pytest.raises(CheckpointError, match="bad.pth"):
            load_sam_checkpoint(bad)


class _NotAWeight:
    pass


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"state": _NotAWeight()}, path)
    with pytest.raises(CheckpointError, match="refusing to load .*evil.pth"):
        load_sam_checkpoint(path)


def test_wrong_architecture_gives_readable_key_summary(tiny_sam_file):
    _, path = tiny_sam_file
    with pytest.raises(CheckpointError) as info:
        load_sam_checkpoint(path, arch="vit_b")
    msg = str(info.value)
    assert "does not fit SAM architecture 'vit_b'" in msg
    assert "missing keys (image_encoder.blocks.2." in msg
    assert "shape mismatches (image_encoder.pos_embed: file (1, 4, 4, 32) vs model (1, 64, 64, 768)" in msg
    assert "looks like 'tiny'" in msg and "arch='tiny'" in msg
    assert len(msg) < 2000  # a summary, not thousands of keys


def test_tiny_checkpoint_architecture_is_inferred_and_wrappers_unwrapped(tiny_sam_file, tmp_path):
    sam, path = tiny_sam_file
    loaded = load_sam_checkpoint(path)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in sam.state_dict().items())
    # micro-sam / torch_em training checkpoints: {"model_state": {"sam.<key>": ...}}
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"model_state": {f"sam.{k}": v for k, v in sam.state_dict().items()}, "epoch": 3}, wrapped)
    assert torch.equal(load_sam_checkpoint(wrapped).mask_decoder.iou_token.weight,
                       sam.mask_decoder.iou_token.weight)


@pytest.mark.parametrize("arch", sorted(SAM_CONFIGS))
def test_infer_sam_config_for_every_known_architecture(arch):
    with torch.device("meta"):  # shapes only, no memory
        sd = build_sam(arch).state_dict()
    assert sam_arch_name(infer_sam_config(sd)) == arch


def test_sam_file_missing_a_key_its_architecture_is_read_from_names_the_key(tiny_sam_file, tmp_path):
    sam, _ = tiny_sam_file
    key = "mask_decoder.iou_prediction_head.layers.0.weight"
    path = tmp_path / "incomplete.pth"
    torch.save({k: v for k, v in sam.state_dict().items() if k != key}, path)
    with pytest.raises(CheckpointError, match=rf"incomplete or damaged SAM checkpoint.*'tiny'.*1 missing keys \({key}\)"):
        load_sam_checkpoint(path)


def test_non_sam_file_is_rejected(tmp_path):
    path = tmp_path / "linear.pth"
    torch.save(torch.nn.Linear(3, 4).state_dict(), path)
    with pytest.raises(CheckpointError, match="not a SAM state dict"):
        load_sam_checkpoint(path)


def test_load_sam_checkpoint_by_name_offline_raises_download_error(monkeypatch):
    monkeypatch.setenv(registry.OFFLINE_ENV, "1")
    with pytest.raises(ModelDownloadError, match=str(registry.model_path("vit_l_lm")).replace("\\", "\\\\")):
        load_sam_checkpoint("vit_l_lm")
    with pytest.raises(ValueError, match="is a clip model"):
        load_sam_checkpoint("biomedclip")


# --------------------------------------------------------------------------------------
# CLIP loading (acceptance 4)
# --------------------------------------------------------------------------------------


def test_tiny_custom_open_clip_roundtrip_by_path(tmp_path):
    torch.manual_seed(2)
    config = tiny_clip_config()
    model, tokenizer = build_clip(config)
    path = tmp_path / "tiny_clip.pt"
    torch.save(model.state_dict(), path)

    loaded, tok2 = load_clip(config, pretrained=path)
    images = torch.randn(2, 3, config.image_size, config.image_size)
    texts = tokenizer(["nucleus", "a mitochondrion"])
    assert torch.equal(texts, tok2(["nucleus", "a mitochondrion"]))
    with torch.inference_mode():
        assert torch.equal(model.encode_image(images), loaded.encode_image(images))
        assert torch.equal(model.encode_text(texts), loaded.encode_text(texts))
    assert not loaded.training

    # safetensors works the same way
    from safetensors.torch import save_file

    st = tmp_path / "tiny_clip.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(st))
    again, _ = load_clip_file(config, st)
    with torch.inference_mode():
        assert torch.equal(model.encode_text(texts), again.encode_text(texts))


def test_clip_weights_of_another_shape_give_key_summary(tmp_path):
    model, _ = build_clip(tiny_clip_config(width=32))
    path = tmp_path / "w32.pt"
    torch.save(model.state_dict(), path)
    with pytest.raises(CheckpointError, match="do not fit .*shape mismatches"):
        load_clip(tiny_clip_config(width=48), pretrained=path)
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="trunc.pt.*truncated or corrupt"):
        load_clip(tiny_clip_config(), pretrained=trunc)


def test_registered_clip_offline_raises_download_error(monkeypatch):
    monkeypatch.setenv(registry.OFFLINE_ENV, "1")
    for args in (("clip_vit_b16_openai",), ("ViT-B-16", "laion2b_s34b_b88k"), ("biomedclip",)):
        with pytest.raises(ModelDownloadError, match="huggingface.co/.*by hand and save it as"):
            load_clip(*args)


# --------------------------------------------------------------------------------------
# load_model: one entry point for every kind
# --------------------------------------------------------------------------------------


def test_load_model_dispatches_on_kind_and_file_format(tiny_sam_file, tmp_path):
    from napari_clipsam.models.clipsam import ClipSam, tiny_config

    from napari_clipsam import load_model

    sam, path = tiny_sam_file
    assert torch.equal(load_model(path).image_encoder.pos_embed, sam.image_encoder.pos_embed)

    torch.manual_seed(4)
    model = ClipSam(tiny_config())
    saved = model.save(tmp_path / "tiny_clipsam.safetensors")
    loaded = load_model(saved)
    assert isinstance(loaded, ClipSam)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())

    if registry.model_status("demo") == "not built":
        with pytest.raises(ModelDownloadError, match="demo.*not built"):
            load_model("demo")


def test_named_open_clip_model_with_local_weights_file(tmp_path):
    """open_clip name + local weights file (the way downloaded CLIP weights are loaded)."""
    import open_clip

    torch.manual_seed(5)
    ref = open_clip.create_model("ViT-S-32").eval()
    path = tmp_path / "vit_s_32.bin"
    torch.save(ref.state_dict(), path)
    loaded, tokenizer = load_clip("ViT-S-32", pretrained=path)
    texts = tokenizer(["a nucleus"])
    with torch.inference_mode():
        assert torch.equal(ref.encode_text(texts), loaded.encode_text(texts))
    with pytest.raises(CheckpointError, match="do not fit 'ViT-S-32'|do not fit ViT-S-32"):
        load_clip("ViT-S-32", pretrained=_small_linear_file(tmp_path))


def _small_linear_file(tmp_path: Path) -> Path:
    p = tmp_path / "linear.bin"
    torch.save(torch.nn.Linear(2, 2).state_dict(), p)
    return p


def test_build_clipsam_from_sam_file_and_clip(tmp_path, monkeypatch):
    """load_model((sam, clip)) joins a SAM checkpoint file and a registered CLIP into a ClipSam whose
    SAM weights are the file's."""
    import torch

    from napari_clipsam.models import registry
    from napari_clipsam.models.clip_parts import build_clip, tiny_clip_config
    from napari_clipsam.models.clipsam import ClipSam
    from napari_clipsam.models.sam_parts import build_sam

    torch.manual_seed(0)
    sam = build_sam("tiny")
    path = tmp_path / "sam_tiny.pth"
    torch.save(sam.state_dict(), path)
    clip = build_clip(tiny_clip_config())
    monkeypatch.setattr(registry, "load_clip", lambda name, progress=False: clip)
    model = registry.load_model((str(path), "clip_vit_b16_openai"), strategy="ssp")
    assert isinstance(model, ClipSam) and model.config.strategy == "ssp"
    assert model.config.sam.encoder_embed_dim == 32
    for k, v in sam.state_dict().items():
        assert torch.equal(model.sam.state_dict()[k], v)
    with pytest.raises(ValueError, match="not a CLIP"):
        registry.build_clipsam(str(path), "vit_b")
