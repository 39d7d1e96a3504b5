"""EmbeddingCache (memory LRU by bytes, disk entries validated on read) and WeightsFingerprint."""

import pytest
import torch

from napari_clipsam.engine.cache import EmbeddingCache, WeightsFingerprint, digest


def _entry(n, fill=1.0):
    return {"embeddings": torch.full((n,), float(fill)), "patches": torch.zeros(2, 2)}


def test_memory_lru_is_bounded_by_bytes():
    cache = EmbeddingCache(max_bytes=1000)
    for i in range(5):
        cache.put(digest(i), _entry(50, i))  # 216 bytes each
    assert cache.nbytes <= 1000 and len(cache) == 4
    assert cache.get(digest(0)) is None  # oldest evicted
    cache.get(digest(1))  # touch: now most recent
    cache.put(digest(9), _entry(50))
    assert cache.get(digest(1)) is not None and cache.get(digest(2)) is None
    cache.put(digest("big"), _entry(1000))  # larger than the whole budget: not kept in memory
    assert cache.get(digest("big")) is None and cache.nbytes <= 1000


def test_disk_entries_survive_a_new_cache_and_bad_files_are_removed(tmp_path):
    a = EmbeddingCache(directory=tmp_path)
    key, other = digest("img", "model"), digest("img2", "model")
    a.put(key, _entry(10, 3.0))
    a.put(other, _entry(10, 4.0))
    b = EmbeddingCache(directory=tmp_path)  # a new process would see the same
    got = b.get(key)
    assert torch.equal(got["embeddings"], torch.full((10,), 3.0))
    assert not list(tmp_path.glob("*/*.tmp"))  # atomic writes leave no temp files

    path = tmp_path / other[:2] / f"{other}.pt"
    path.write_bytes(path.read_bytes()[:40])  # truncated
    assert EmbeddingCache(directory=tmp_path).get(other) is None and not path.exists()

    # An entry copied under another key (mismatch) is ignored and removed.
    wrong = digest("img3", "model")
    target = tmp_path / wrong[:2] / f"{wrong}.pt"
    target.parent.mkdir(exist_ok=True)
    target.write_bytes((tmp_path / key[:2] / f"{key}.pt").read_bytes())
    assert EmbeddingCache(directory=tmp_path).get(wrong) is None and not target.exists()
    with pytest.raises(ValueError, match="hex"):
        b.get("../../etc/passwd")


def test_disk_budget_prunes_oldest(tmp_path):
    cache = EmbeddingCache(directory=tmp_path, max_disk_bytes=3000)
    for i in range(6):
        cache.put(digest(i), _entry(200, i))
    files = list(tmp_path.glob("*/*.pt"))
    assert 0 < len(files) < 6 and sum(f.stat().st_size for f in files) <= 3000


def test_pruning_and_clearing_touch_only_cache_entries(tmp_path):
    """A user's own .pt files in the cache folder (even old ones, in hex-named subfolders) are
    never pruned or cleared, nor counted."""
    import os

    mine = [tmp_path / "models" / "my_finetuned.pt", tmp_path / "ab" / "notes.pt", tmp_path / "top.pt"]
    for f in mine:
        f.parent.mkdir(exist_ok=True)
        f.write_bytes(b"x" * 5000)
        os.utime(f, (1, 1))  # older than any entry: pruned first if it counted
    cache = EmbeddingCache(directory=tmp_path, max_disk_bytes=3000)
    for i in range(6):
        cache.put(digest(i), _entry(200, i))
    entries = cache.disk_entries()
    assert 0 < len(entries) < 6 and all(f.exists() for f in mine)
    cache.clear(disk=True)
    assert cache.disk_entries() == [] and all(f.exists() for f in mine)


def test_a_read_only_cache_folder_serves_its_entries_and_skips_writes(tmp_path, monkeypatch, caplog):
    """Copied onto read-only media: hits are used, misses are computed and not stored, a bad
    entry is ignored; writes and deletions fail with EROFS, as on such a file system."""
    import errno
    import os
    import tempfile

    key, bad = digest("img", "model"), digest("img2", "model")
    EmbeddingCache(directory=tmp_path).put(key, _entry(10, 3.0))
    (tmp_path / bad[:2]).mkdir(exist_ok=True)
    (tmp_path / bad[:2] / f"{bad}.pt").write_bytes(b"truncated")

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    for module, name in ((os, "utime"), (os, "unlink"), (tempfile, "mkstemp")):
        monkeypatch.setattr(module, name, read_only)
    cache = EmbeddingCache(directory=tmp_path)
    assert torch.equal(cache.get(key)["embeddings"], torch.full((10,), 3.0))
    assert cache.get(bad) is None
    cache.put(digest("new"), _entry(10))  # kept in memory, not on disk
    assert cache.get(digest("new")) is not None and "could not write" in caplog.text


def test_weights_fingerprint_follows_the_weights():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    fp = WeightsFingerprint(net)
    v0 = fp.value()
    assert fp.value() == v0  # cached, unchanged

    # An identical copy (e.g. the same file loaded again) has the same fingerprint.
    twin = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    twin.load_state_dict(net.state_dict())
    assert WeightsFingerprint(twin).value() == v0

    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    net(torch.ones(1, 4)).sum().backward()
    opt.step()  # an optimiser step
    v1 = fp.value()
    assert v1 != v0
    net.load_state_dict(twin.state_dict())  # load_state_dict back to the original weights
    assert fp.value() == v0
    net[0].weight.data[0, 0] += 1.0  # an edit through .data (no version bump)
    assert fp.value() != v0
    net[0].weight.data[0, 0] -= 1.0
    only_second = WeightsFingerprint(net, include=lambda n: n.startswith("1."))
    w = only_second.value()
    with torch.no_grad():
        net[0].bias.add_(1.0)  # a part outside the included names does not change it
    assert only_second.value() == w and fp.value() != v0


def test_weights_fingerprint_sees_new_and_replaced_tensors():
    """The tensor list is cached between checks; registering a parameter, buffer or submodule
    anywhere makes the next check list the module again."""
    from napari_clipsam.engine.cache import PartFingerprints

    net = torch.nn.Sequential(torch.nn.Linear(4, 4))
    fps = PartFingerprints(net, {"all": (lambda n: True, ""), "first": (lambda n: n.startswith("0."), "")})
    v0 = fps.values()
    net.append(torch.nn.Linear(4, 2))  # a new submodule (as peft does when it attaches LoRA)
    v1 = fps.values()
    assert v1["all"] != v0["all"] and v1["first"] == v0["first"]
    net[1].weight = torch.nn.Parameter(torch.zeros(2, 4))  # a parameter replaced
    v2 = fps.values()
    assert v2["all"] != v1["all"]
    net.register_buffer("scale", torch.ones(1))
    assert fps.values()["all"] != v2["all"]
    net[0].weight.data = torch.zeros(4, 4)  # new storage behind the same Parameter
    assert fps.values()["first"] != v0["first"]
