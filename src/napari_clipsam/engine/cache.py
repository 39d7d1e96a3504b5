"""Embedding cache: memory LRU bounded in bytes, optionally backed by a directory on disk.

Entries are dicts of tensors under a string key. Keys are content hashes built by the caller
from everything the entry depends on (:func:`digest`): the normalised model input, the model's
weights fingerprint (:class:`WeightsFingerprint`) and, where the embedding depends on it, the
text. A changed image, model or adapter therefore gives a different key and can never hit a
stale entry; old entries simply age out.

Disk entries are ``<dir>/<key[:2]>/<key>.pt`` written atomically (temp file + rename) and read
with ``torch.load(weights_only=True)``. Each file records its key and a checksum of its tensors;
an entry that fails to load, has another key or a wrong checksum is ignored and removed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import torch
from torch import nn

from ..models.checkpoints import NEW_FILE_MODE

log = logging.getLogger(__name__)

#: An entry file's name: the key (a 40-digit hex digest, :func:`digest`) + ".pt".
_ENTRY_NAME = re.compile(r"[0-9a-f]{40}\.pt")

Entry = dict[str, torch.Tensor]
FORMAT = "napari-clipsam/embedding-v1"


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy())


def digest(*parts: object) -> str:
    """Hex blake2b of ``parts``: strings, bytes, numbers, None, tensors or NumPy arrays."""
    h = hashlib.blake2b(digest_size=20)
    for p in parts:
        if isinstance(p, torch.Tensor):
            h.update(f"T{p.dtype}{tuple(p.shape)}".encode())
            h.update(_tensor_bytes(p))
        elif hasattr(p, "__array__") and hasattr(p, "dtype"):  # NumPy arrays
            import numpy as np

            a = np.ascontiguousarray(p)
            h.update(f"A{a.dtype}{a.shape}".encode())
            h.update(memoryview(a).cast("B"))
        elif isinstance(p, bytes):
            h.update(b"B" + p)
        else:
            h.update(f"S{p!r}".encode())
        h.update(b"|")
    return h.hexdigest()


def entry_checksum(entry: Mapping[str, torch.Tensor]) -> str:
    return digest(*[x for k in sorted(entry) for x in (k, entry[k])])


def entry_nbytes(entry: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in entry.values())


class PartFingerprints:
    """Content hashes of several parts of one module's parameters and buffers, from one pass.

    ``parts`` maps a part name to ``(include, extra)``: the tensor names the part covers and a
    string mixed into its hash. Hashing all weights is linear in model size, so :meth:`values`
    rehashes a part only when its cheap signature changes: the tensors' names, identities,
    storage pointers, in-place version counters (bumped by optimiser steps, ``load_state_dict``
    and in-place edits), shapes, dtypes and a strided sample of 8 of their values. An in-place
    edit through ``.data`` (or under ``no_grad`` on a detached view) bumps no version counter
    and is caught only where it changes a sampled value: after such an edit call
    ``Segmenter.model_changed()``. Equal weights give equal fingerprints across processes, so a
    disk cache is shared by identical models.
    """

    def __init__(self, module: nn.Module, parts: Mapping[str, tuple[Callable[[str], bool], str]]):
        self.module = module
        self.parts = dict(parts)
        self._signatures: dict[str, tuple] = {}
        self._values: dict[str, str] = {}
        self._probes: dict[int, tuple] = {}  # id(tensor) → (storage pointer, its probe)
        self._listed: tuple | None = None

    def _named(self) -> tuple[list[tuple[str, torch.Tensor]], dict[str, list[int]]]:
        """The module's tensors sorted by name and, per part, the indices it covers: listed again
        only after some module registered a parameter, buffer or submodule (walking the module
        tree costs more than the rest of a check)."""
        if self._listed is None or self._listed[0] != _registrations[0]:
            named = list(self.module.named_parameters()) + list(self.module.named_buffers())
            named.sort(key=lambda nt: nt[0])
            chosen = {part: [i for i, (n, _) in enumerate(named) if include(n)]
                      for part, (include, _) in self.parts.items()}
            self._listed = (_registrations[0], named, chosen)
        return self._listed[1], self._listed[2]

    def values(self) -> dict[str, str]:
        """{part: current fingerprint (hex)}."""
        named, chosen_of = self._named()
        probes, self._probes = self._probes, {}
        entries = []
        for name, t in named:
            try:
                version = t._version
            except RuntimeError:  # inference tensors have no version counter
                version = -1
            n = t.numel()
            ptr = t.data_ptr() if n else 0
            probe = probes.get(id(t))
            if probe is None or probe[0] != ptr:
                probe = (ptr, _probe_view(t))
            self._probes[id(t)] = probe
            sample = probe[1].tobytes() if isinstance(probe[1], np.ndarray) else probe[1]()
            entries.append((name, id(t), ptr, version, t.shape, t.dtype, t.device, sample))
        for part, (_, extra) in self.parts.items():
            chosen = chosen_of[part]
            sig = tuple(entries[i] for i in chosen)
            if sig != self._signatures.get(part) or part not in self._values:
                self._values[part] = digest(extra, *[x for i in chosen for x in named[i]])
                self._signatures[part] = sig
                log.debug("weights fingerprint of %s recomputed: %s", part, self._values[part][:12])
        return dict(self._values)

    def invalidate(self) -> None:
        """Force a full recomputation at the next :meth:`values`."""
        self._signatures.clear()
        self._values.clear()
        self._listed = None


#: Bumped whenever any module registers a parameter, buffer or submodule (torch's global
#: registration hooks): a module's list of tensors can only have changed then.
_registrations = [0]


def _registered(*_args):
    _registrations[0] += 1


for _register in (nn.modules.module.register_module_parameter_registration_hook,
                  nn.modules.module.register_module_buffer_registration_hook,
                  nn.modules.module.register_module_module_registration_hook):
    _register(_registered)


def _probe_view(t: torch.Tensor):
    """8 strided values of ``t``: a NumPy view of them (CPU; read anew at each call, no torch
    op) or a function reading them."""
    n = t.numel()
    step = max(1, n // 8)
    if t.device.type == "cpu" and t.dtype != torch.bfloat16 and t.is_contiguous():
        return t.detach().numpy().reshape(-1)[::step][:8]
    return lambda: t.detach().reshape(-1)[::step][:8].float().cpu().numpy().tobytes()


class WeightsFingerprint(PartFingerprints):
    """Content hash of a module's parameters and buffers (those whose names pass ``include``);
    see :class:`PartFingerprints`."""

    def __init__(self, module: nn.Module, include: Callable[[str], bool] = lambda name: True, extra: str = ""):
        super().__init__(module, {"weights": (include, extra)})

    def value(self) -> str:
        """The current fingerprint (hex)."""
        return self.values()["weights"]


class EmbeddingCache:
    """Memory LRU of tensor dicts bounded by ``max_bytes``, plus an optional ``directory`` on disk.

    ``max_bytes`` (default 1 GiB) bounds the memory part; an entry larger than that is kept on
    disk only. ``max_disk_bytes`` (default: unbounded) prunes the least recently written disk
    entries beyond it. Tensors are stored on CPU on disk and returned as stored in memory.
    """

    def __init__(self, max_bytes: int = 1 << 30, directory: str | os.PathLike | None = None,
                 max_disk_bytes: int | None = None):
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self.directory = Path(directory) if directory is not None else None
        self.max_disk_bytes = max_disk_bytes
        self._mem: OrderedDict[str, tuple[Entry, int]] = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.misses = 0
        if self.directory is not None:
            if self.directory.exists() and not self.directory.is_dir():
                raise ValueError(f"cache directory {self.directory} is a file: choose a folder")
            self.directory.mkdir(parents=True, exist_ok=True)

    # ---- memory -------------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Bytes held in memory."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._mem)

    def __contains__(self, key: str) -> bool:
        return key in self._mem or (self._path(key) is not None and self._path(key).is_file())

    def _remember(self, key: str, entry: Entry) -> None:
        n = entry_nbytes(entry)
        if key in self._mem:
            self._bytes -= self._mem.pop(key)[1]
        if n > self.max_bytes:
            return
        self._mem[key] = (entry, n)
        self._bytes += n
        while self._bytes > self.max_bytes:
            _, (_, old) = self._mem.popitem(last=False)
            self._bytes -= old

    def clear(self, disk: bool = False) -> None:
        """Empty the memory part (and the disk directory's entries with ``disk=True``)."""
        self._mem.clear()
        self._bytes = 0
        if disk and self.directory is not None:
            for f in self.disk_entries():
                f.unlink(missing_ok=True)

    # ---- public -------------------------------------------------------------------------------
    def get(self, key: str) -> Entry | None:
        """The entry under ``key`` or None (memory first, then disk)."""
        if key in self._mem:
            self._mem.move_to_end(key)
            self.hits += 1
            return self._mem[key][0]
        entry = self._read(key)
        if entry is None:
            self.misses += 1
            return None
        self.hits += 1
        self._remember(key, entry)
        return entry

    def put(self, key: str, entry: Mapping[str, torch.Tensor]) -> None:
        """Store ``entry`` (a dict of tensors) under ``key`` in memory and, if set, on disk."""
        entry = {k: v.detach() for k, v in entry.items()}
        self._remember(key, entry)
        if self.directory is not None:
            self._write(key, entry)

    # ---- disk ---------------------------------------------------------------------------------
    def _path(self, key: str) -> Path | None:
        if self.directory is None:
            return None
        if not key or any(c not in "0123456789abcdef" for c in key):
            raise ValueError(f"cache keys are lowercase hex digests, got {key!r}")
        return self.directory / key[:2] / f"{key}.pt"

    def disk_entries(self) -> list[Path]:
        """The entry files in the directory: ``<2 hex>/<40 hex>.pt`` whose folder is their name's
        start. Anything else there (a user's own ``.pt`` files) is never read, pruned or cleared."""
        if self.directory is None:
            return []
        return [f for f in self.directory.glob("??/*.pt") if _ENTRY_NAME.fullmatch(f.name) and f.name[:2] == f.parent.name]

    def _write(self, key: str, entry: Entry) -> None:
        path = self._path(key)
        cpu = {k: v.to("cpu").contiguous() for k, v in entry.items()}
        payload = {"format": FORMAT, "key": key, "checksum": entry_checksum(cpu), "tensors": cpu}
        tmp = None
        try:  # a read-only or full cache folder costs the entry, never the result
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{key[:8]}", suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                torch.save(payload, f)
            os.chmod(tmp, NEW_FILE_MODE)  # mkstemp's files are owner-only; a cache folder may be shared
            os.replace(tmp, path)
        except OSError as err:
            log.warning("could not write embedding cache entry %s: %s", path, err)
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
            return
        if self.max_disk_bytes is not None:
            self._prune_disk()

    def _read(self, key: str) -> Entry | None:
        path = self._path(key)
        if path is None or not path.is_file():
            return None
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
            ok = (isinstance(payload, dict) and payload.get("format") == FORMAT and payload.get("key") == key
                  and isinstance(payload.get("tensors"), dict)
                  and all(isinstance(v, torch.Tensor) for v in payload["tensors"].values())
                  and payload.get("checksum") == entry_checksum(payload["tensors"]))
        except Exception as err:  # truncated / corrupt / foreign files raise many error types
            log.warning("ignoring unreadable embedding cache entry %s: %s", path, err)
            ok = False
        if not ok:
            log.warning("removing invalid embedding cache entry %s", path)
            try:
                path.unlink(missing_ok=True)
            except OSError as err:  # a read-only cache folder: ignored, recomputed each time
                log.warning("could not remove %s: %s", path, err)
            return None
        try:
            os.utime(path)  # recently used: pruned last
        except OSError:  # a read-only cache folder
            pass
        return payload["tensors"]

    def _prune_disk(self) -> None:
        files = []
        for f in self.disk_entries():
            try:
                st = f.stat()
            except OSError:
                continue
            files.append((st.st_mtime, st.st_size, f))
        total = sum(s for _, s, _ in files)
        for _, size, f in sorted(files):
            if total <= self.max_disk_bytes:
                break
            try:
                f.unlink(missing_ok=True)
            except OSError:
                break  # read-only: nothing can be pruned
            total -= size


__all__ = ["EmbeddingCache", "PartFingerprints", "WeightsFingerprint", "digest", "entry_checksum", "entry_nbytes"]
