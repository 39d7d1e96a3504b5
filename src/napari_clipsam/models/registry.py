"""Named base models: where they come from, where they are cached, how they are fetched.

The registry maps a name (``"vit_b"``, ``"vit_b_lm"``, ``"clip_vit_b16_openai"``, ``"demo"``...)
to a :class:`ModelEntry` (URL, published hash, size, licence, architecture) and turns names into
local files; :mod:`napari_clipsam.models.checkpoints` loads files. Wherever a name is accepted,
a path to a local file works too.

Cache directory: ``$NAPARI_CLIPSAM_CACHE`` if set, else ``pooch.os_cache("napari-clipsam")``
(``~/.cache/napari-clipsam`` on Linux). Other environment variables:

- ``NAPARI_CLIPSAM_OFFLINE=1``: never download; a missing file raises :class:`ModelDownloadError`
  that says where to put it.
- ``NAPARI_CLIPSAM_MIRROR=<base URL>``: download ``<base URL>/<file name>`` instead of the
  official URL (an institute mirror behind a firewall).

Downloads go through ``pooch`` with hash verification. A cached file is re-verified against its
published hash once (a small ``<file>.verified`` note records size and mtime); a file that fails
is deleted and :class:`HashMismatchError` raised, so the next call downloads it again.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Union

if TYPE_CHECKING:
    import torch
    from segment_anything.modeling import Sam

    from .sam_parts import SamConfig

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]
#: A progress sink: ``True`` (tqdm on stderr), ``False``, or ``callback(done_bytes, total_bytes)``.
Progress = Union[bool, Callable[[int, int], None]]

CACHE_ENV = "NAPARI_CLIPSAM_CACHE"
OFFLINE_ENV = "NAPARI_CLIPSAM_OFFLINE"
MIRROR_ENV = "NAPARI_CLIPSAM_MIRROR"

_SAM_LICENCE = "Apache-2.0 (facebookresearch/segment-anything)"
_MICROSAM_LICENCE = "CC-BY-4.0 (micro-sam, Archit et al. 2025, Nature Methods; cite when used)"
_HF = "https://huggingface.co/{repo}/resolve/main/{file}"
_OPENCLIP_WEIGHTS = "open_clip_pytorch_model.bin"


class ModelDownloadError(RuntimeError, OSError):
    """A model file is not cached and could not be downloaded (offline, firewall, server error)."""


class CheckpointError(RuntimeError):
    """A weights file cannot be used: unreadable, truncated, unsafe or of the wrong architecture."""


class HashMismatchError(CheckpointError):
    """A downloaded or cached file does not have its published hash; the file has been deleted."""


@dataclass(frozen=True)
class ModelEntry:
    """One named base model.

    ``known_hash`` is pooch-style (``"sha256:..."``, ``"md5:..."``, ``"xxh128:..."``) or ``None``
    when the publisher gives none. ``size_bytes`` is exact where published, else ``None`` and
    ``approx_mb`` is an estimate. ``extra_files`` are ``(file name, url)`` pairs downloaded into
    the same folder (open_clip configs).
    """

    name: str
    kind: str  # "sam" | "clip" | "clipsam"
    url: str | None
    filename: str
    known_hash: str | None
    size_bytes: int | None
    approx_mb: float
    licence: str
    description: str = ""
    sam_arch: str | None = None
    open_clip_model: str | None = None
    open_clip_pretrained: str | None = None
    quick_gelu: bool = False
    extra_files: tuple[tuple[str, str], ...] = ()
    bundled: str | None = None  # path inside the package for files shipped in the wheel

    @property
    def size_mb(self) -> float:
        """Size in MB (10^6 bytes), exact when ``size_bytes`` is known."""
        return self.size_bytes / 1e6 if self.size_bytes else self.approx_mb

    @property
    def subdir(self) -> str:
        """Folder below the cache directory."""
        return "sam" if self.kind == "sam" else f"{self.kind}/{self.name}"


MODELS: dict[str, ModelEntry] = {}


def register_model(entry: ModelEntry, overwrite: bool = False) -> ModelEntry:
    """Add a named model to :data:`MODELS` (other packages and tests can add their own)."""
    if entry.kind not in ("sam", "clip", "clipsam"):
        raise ValueError(f"model kind must be 'sam', 'clip' or 'clipsam', not {entry.kind!r}")
    if entry.name in MODELS and not overwrite:
        raise ValueError(f"a model named {entry.name!r} is already registered; pass overwrite=True")
    MODELS[entry.name] = entry
    return entry


for _e in (
    # Official SAM (segment-anything README); sha256 as published in micro-sam's registry.
    ModelEntry(
        "vit_b", "sam", "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
        "sam_vit_b_01ec64.pth", "sha256:ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
        375042383, 375.0, _SAM_LICENCE, "SAM ViT-B (official)", sam_arch="vit_b",
    ),
    ModelEntry(
        "vit_l", "sam", "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth",
        "sam_vit_l_0b3195.pth", "sha256:3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
        1249524607, 1249.5, _SAM_LICENCE, "SAM ViT-L (official)", sam_arch="vit_l",
    ),
    ModelEntry(
        "vit_h", "sam", "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth",
        "sam_vit_h_4b8939.pth", "sha256:a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
        2564550879, 2564.6, _SAM_LICENCE, "SAM ViT-H (official)", sam_arch="vit_h",
    ),
    # micro-sam light-microscopy generalists v1.2 (bioimage.io "diplomatic-bug", "idealistic-rat");
    # micro-sam publishes xxh128 hashes for them (needs the `xxhash` package, a dependency).
    ModelEntry(
        "vit_b_lm", "sam",
        "https://uk1s3.embassy.ebi.ac.uk/public-datasets/bioimage.io/diplomatic-bug/1.2/files/vit_b.pt",
        "micro_sam_vit_b_lm_v1.2.pt", "xxh128:fe9252a29f3f4ea53c15a06de471e186",
        None, 375.0, _MICROSAM_LICENCE, "micro-sam ViT-B, light microscopy", sam_arch="vit_b",
    ),
    ModelEntry(
        "vit_l_lm", "sam",
        "https://uk1s3.embassy.ebi.ac.uk/public-datasets/bioimage.io/idealistic-rat/1.2/files/vit_l.pt",
        "micro_sam_vit_l_lm_v1.2.pt", "xxh128:017f20677997d628426dec80a8018f9d",
        None, 1250.0, _MICROSAM_LICENCE, "micro-sam ViT-L, light microscopy", sam_arch="vit_l",
    ),
    # CLIP through open_clip. The Hugging Face repos publish no file hash we can pin (files are
    # served by content, but the URLs follow the `main` branch), so these are not hash-checked.
    ModelEntry(
        "clip_vit_b16_openai", "clip",
        _HF.format(repo="timm/vit_base_patch16_clip_224.openai", file=_OPENCLIP_WEIGHTS),
        _OPENCLIP_WEIGHTS, None, None, 599.0, "MIT (openai/CLIP)",
        "CLIP ViT-B/16, OpenAI weights (open_clip 'ViT-B-16', 'openai')",
        open_clip_model="ViT-B-16", open_clip_pretrained="openai", quick_gelu=True,
    ),
    ModelEntry(
        "clip_vit_b16_laion2b", "clip",
        _HF.format(repo="laion/CLIP-ViT-B-16-laion2B-s34B-b88K", file=_OPENCLIP_WEIGHTS),
        _OPENCLIP_WEIGHTS, None, None, 599.0, "MIT (LAION / open_clip)",
        "CLIP ViT-B/16, LAION-2B weights (open_clip 'ViT-B-16', 'laion2b_s34b_b88k')",
        open_clip_model="ViT-B-16", open_clip_pretrained="laion2b_s34b_b88k",
    ),
    ModelEntry(
        "biomedclip", "clip",
        _HF.format(repo="microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224", file=_OPENCLIP_WEIGHTS),
        _OPENCLIP_WEIGHTS, None, None, 784.0,
        "MIT (microsoft/BiomedCLIP; model card: research use only)",
        "BiomedCLIP (PubMedBERT + ViT-B/16); its text tower also fetches the PubMedBERT "
        "config/tokenizer through Hugging Face",
        open_clip_model="hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224",
        extra_files=(
            ("open_clip_config.json",
             _HF.format(repo="microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224",
                        file="open_clip_config.json")),
        ),
    ),
    # The small demo ClipSam shipped inside the wheel (built by scripts/, see DESIGN.md).
    ModelEntry(
        "demo", "clipsam", None, "demo.safetensors", None, None, 5.8,
        "BSD-3-Clause (this project)", "tiny demo ClipSam trained on synthetic data (bundled)",
        bundled="weights/demo.safetensors",
    ),
):
    register_model(_e)


# --------------------------------------------------------------------------------------
# cache
# --------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """The model cache folder: ``$NAPARI_CLIPSAM_CACHE`` or ``pooch.os_cache("napari-clipsam")``."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    import pooch

    return Path(pooch.os_cache("napari-clipsam"))


def get_entry(name: str) -> ModelEntry:
    """The registered :class:`ModelEntry` called ``name``; ``ValueError`` listing the names otherwise."""
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(
            f"unknown model {name!r}; registered models: {', '.join(MODELS)} (or give a path to a local file)"
        ) from None


def list_models(kind: str | None = None) -> list[ModelEntry]:
    """All registered entries, optionally only one ``kind`` (``"sam"``, ``"clip"``, ``"clipsam"``)."""
    return [e for e in MODELS.values() if kind is None or e.kind == kind]


def model_path(name: str) -> Path:
    """Where the model's file lives (cached or bundled) or will be downloaded to."""
    e = get_entry(name)
    if e.bundled:
        return Path(__file__).resolve().parent.parent / e.bundled
    return cache_dir() / e.subdir / e.filename


def is_cached(name: str) -> bool:
    """Whether every file of the model is present locally (not checked against the hash)."""
    e = get_entry(name)
    folder = model_path(name).parent
    return model_path(name).is_file() and all((folder / f).is_file() for f, _ in e.extra_files)


def model_status(name: str) -> str:
    """``"cached"``, ``"not cached"``, ``"bundled"`` or ``"not built"`` (bundled file missing)."""
    e = get_entry(name)
    if e.bundled:
        return "bundled" if model_path(name).is_file() else "not built"
    return "cached" if is_cached(name) else "not cached"


# --------------------------------------------------------------------------------------
# fetching
# --------------------------------------------------------------------------------------


def _download_url(url: str, target: Path) -> str:
    """``url``, or with a mirror set, the file's place in the mirror: laid out like the cache folder
    (``<mirror>/sam/sam_vit_b_01ec64.pth``, ``<mirror>/clip/<model>/open_clip_pytorch_model.bin``),
    so a copy of a filled cache folder serves as one, and files of the same name stay apart."""
    mirror = os.environ.get(MIRROR_ENV)
    if not mirror:
        return url
    try:
        where = target.relative_to(cache_dir()).as_posix()
    except ValueError:
        where = target.name
    return f"{mirror.rstrip('/')}/{where}"


def _offline() -> bool:
    return os.environ.get(OFFLINE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _download_error(name: str, url: str, target: Path, reason: str) -> ModelDownloadError:
    return ModelDownloadError(
        f"could not download model {name!r} ({reason}). Download {url} by hand and save it as "
        f"{target} (file name {target.name}), or pass the path of a local copy instead of the "
        f"name '{name}'."
    )


class _CallbackProgress:
    """Adapts ``callback(done, total)`` to the tqdm-like object pooch drives."""

    def __init__(self, callback: Callable[[int, int], None]):
        self.callback, self.total, self.n = callback, 0, 0

    def update(self, k: int) -> None:
        self.n = min(self.n + k, self.total) if self.total else self.n + k
        self.callback(self.n, self.total)

    def reset(self) -> None:
        self.n = 0

    def close(self) -> None:
        pass


def _progressbar(progress: Progress) -> Any:
    if progress is True or progress is False:
        return progress
    return _CallbackProgress(progress)


def _hash_of(path: Path, known_hash: str) -> str:
    import pooch

    alg = known_hash.split(":", 1)[0] if ":" in known_hash else "sha256"
    return f"{alg}:{pooch.file_hash(str(path), alg=alg)}"


def verify_file(path: PathLike, known_hash: str | None, *, delete: bool = True) -> None:
    """Check ``path`` against ``known_hash`` (pooch style); on mismatch delete it (if ``delete``)
    and raise :class:`HashMismatchError`. A successful check is remembered next to the file
    (``<file>.verified``: size, mtime, hash) so large files are hashed once."""
    if not known_hash:
        return
    path = Path(path)
    note = path.with_name(path.name + ".verified")
    st = path.stat()
    stamp = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "hash": known_hash.lower()}
    try:
        if json.loads(note.read_text()) == stamp:
            return
    except (OSError, ValueError):
        pass
    actual = _hash_of(path, known_hash)
    if actual.lower() != known_hash.lower():
        if delete:
            path.unlink(missing_ok=True)
            note.unlink(missing_ok=True)
        raise HashMismatchError(
            f"{path} is corrupt or not the published file: its hash is {actual}, expected {known_hash}. "
            + ("The file has been deleted; run again to download it afresh." if delete else "")
        )
    try:
        note.write_text(json.dumps(stamp))
    except OSError:  # read-only cache: verify again next time
        pass


def _retrieve(name: str, url: str, target: Path, known_hash: str | None, progress: Progress) -> None:
    """Download one file with pooch to ``target``; errors become our two exception types."""
    import pooch

    url = _download_url(url, target)
    if _offline():
        raise _download_error(name, url, target, f"{OFFLINE_ENV} is set")
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("downloading %s from %s to %s", name, url, target)
    pooch_logger = pooch.get_logger()
    level = pooch_logger.level
    pooch_logger.setLevel(logging.WARNING)  # we log the download ourselves
    try:
        pooch.retrieve(
            url, known_hash=known_hash, fname=target.name, path=target.parent,
            progressbar=_progressbar(progress),
        )
    except ValueError as e:
        if "hash" in str(e).lower():  # pooch removes the bad download itself
            target.unlink(missing_ok=True)
            raise HashMismatchError(
                f"the download of {name!r} from {url} does not have the published hash {known_hash} "
                "(corrupted transfer or a changed file on the server); nothing was kept. Try again."
            ) from None
        raise _download_error(name, url, target, _reason(e)) from None
    except Exception as e:  # requests' ConnectionError, HTTPError, timeouts, OSError...
        target.unlink(missing_ok=True)
        raise _download_error(name, url, target, _reason(e)) from None
    finally:
        pooch_logger.setLevel(level)


def _reason(e: Exception) -> str:
    """One short line saying why a download failed."""
    from urllib.parse import urlparse

    import requests

    if isinstance(e, requests.exceptions.HTTPError) and e.response is not None:
        return f"HTTP {e.response.status_code} {e.response.reason}"
    if isinstance(e, requests.exceptions.Timeout):
        return "the server did not answer in time"
    if isinstance(e, requests.exceptions.ConnectionError):
        host = urlparse(e.request.url).netloc if e.request is not None else "the server"
        return f"cannot connect to {host}: offline, blocked by a firewall or a DNS failure"
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    text = text if len(text) <= 200 else text[:197] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def fetch(name_or_path: PathLike, progress: Progress = False) -> Path:
    """Return a local file for a model name or path, downloading it if needed.

    - An existing path (file or folder) is returned as is.
    - A registered name is looked up in the cache, verified against its published hash, and
      downloaded (with ``progress``) when missing. Offline or failed downloads raise
      :class:`ModelDownloadError` naming the URL and the exact path to place the file at; hash
      failures raise :class:`HashMismatchError` after deleting the bad file.
    """
    name = os.fspath(name_or_path)
    if name not in MODELS or os.sep in name or "/" in name:
        p = Path(name).expanduser()
        if p.exists():
            return p
        if os.sep in name or "/" in name or p.suffix:
            raise FileNotFoundError(f"model file not found: {p}")
        get_entry(name)  # raises the "unknown model" ValueError
    e = MODELS[name]
    target = model_path(name)
    if e.bundled:
        if not target.is_file():
            raise ModelDownloadError(
                f"the bundled model {name!r} is not built: {target} is missing "
                "(build it with the demo training script in scripts/, or reinstall the package)"
            )
        return target
    assert e.url is not None
    for extra, url in e.extra_files:
        if not (target.parent / extra).is_file():
            _retrieve(name, url, target.parent / extra, None, progress)
    if target.is_file():
        verify_file(target, e.known_hash)
        return target
    _retrieve(name, e.url, target, e.known_hash, progress)
    verify_file(target, e.known_hash)  # pooch checked it already; this writes the .verified note
    return target


def download(name: str, progress: Progress = True) -> Path:
    """Download (or verify the cached copy of) a registered model; returns its path."""
    get_entry(name)
    return fetch(name, progress=progress)


# --------------------------------------------------------------------------------------
# loading by name or path
# --------------------------------------------------------------------------------------


def load_sam_checkpoint(
    path_or_name: PathLike, arch: "str | SamConfig | None" = None, progress: Progress = False
) -> "Sam":
    """Load a SAM checkpoint (registered name or local file) into segment-anything's ``Sam`` on CPU.

    ``arch`` (``"vit_b"``, ``"vit_l"``, ``"vit_h"``, ``"tiny"`` or a ``SamConfig``) defaults to the
    registry's architecture for names and to the one inferred from the tensor shapes for files.
    Loading is ``weights_only=True`` and strict; see :func:`checkpoints.load_sam_file`.
    """
    from .checkpoints import load_sam_file

    name = os.fspath(path_or_name)
    if name in MODELS:
        e = MODELS[name]
        if e.kind != "sam":
            raise ValueError(f"model {name!r} is a {e.kind} model, not a SAM checkpoint")
        return load_sam_file(fetch(name, progress), arch or e.sam_arch, what=f"SAM checkpoint {name!r}")
    return load_sam_file(fetch(path_or_name, progress), arch)


def load_clip(
    name: Any = "clip_vit_b16_openai",
    pretrained: PathLike | None = None,
    progress: Progress = False,
) -> "tuple[torch.nn.Module, Callable]":
    """Load a CLIP model and its tokenizer: ``(model, tokenizer)``, eval mode, CPU.

    - ``load_clip("biomedclip")`` / ``load_clip("clip_vit_b16_openai")``: a registered CLIP entry
      (downloaded into the cache, ``pretrained`` must be ``None``).
    - ``load_clip("ViT-B-16", "openai")``: open_clip name + pretrained tag. Registered pairs use our
      cache (and its offline message); other tags go through open_clip's own download.
    - ``load_clip("ViT-B-16", "/path/weights.bin")``: name + local weights file (or a folder
      with ``open_clip_config.json`` + weights for ``hf-hub:`` models).
    - ``load_clip(clip_config, "/path/weights.pt")``: a ``ClipConfig`` (custom shapes too)
      + local state-dict file; ``pretrained=None`` gives random weights.
    """
    from .checkpoints import load_clip_file

    if isinstance(name, str):
        entry = MODELS.get(name)
        if entry is None and pretrained is not None and not Path(os.fspath(pretrained)).exists():
            entry = next(
                (e for e in list_models("clip")
                 if e.open_clip_model == name and e.open_clip_pretrained == pretrained),
                None,
            )
            if entry is None:
                return _load_clip_open_clip_tag(name, str(pretrained))
        elif entry is None and name.startswith("hf-hub:") and pretrained is None:
            entry = next((e for e in list_models("clip") if e.open_clip_model == name), None)
        if entry is not None:
            if entry.kind != "clip":
                raise ValueError(f"model {entry.name!r} is a {entry.kind} model, not a CLIP model")
            path = fetch(entry.name, progress)
            if entry.extra_files:  # open_clip config + weights in one folder
                return load_clip_file(entry.open_clip_model, path.parent)
            return load_clip_file(entry.open_clip_model, path, quick_gelu=entry.quick_gelu)
    weights = fetch(pretrained, progress) if pretrained is not None else None
    return load_clip_file(name, weights)


def _load_clip_open_clip_tag(model_name: str, tag: str) -> "tuple[torch.nn.Module, Callable]":
    """Unregistered open_clip pretrained tag: open_clip downloads into our cache folder."""
    import open_clip

    folder = cache_dir() / "clip" / "open_clip"
    if _offline():
        raise ModelDownloadError(
            f"open_clip weights {model_name}/{tag} are not registered and {OFFLINE_ENV} is set; "
            "download them by hand and pass the file as pretrained=<path>"
        )
    try:
        model, _, _ = open_clip.create_model_and_transforms(
            model_name, pretrained=tag, cache_dir=str(folder), weights_only=True
        )
    except Exception as e:
        raise ModelDownloadError(
            f"could not get open_clip weights {model_name!r} / {tag!r} into {folder} ({str(e)[:200]}); "
            "download them by hand and pass the file as pretrained=<path>"
        ) from None
    return model.eval(), open_clip.get_tokenizer(model_name)


def load_model(name_or_path: PathLike, **kwargs: Any) -> Any:
    """Load any model by name or path.

    Registered names dispatch on their kind: ``sam`` -> segment-anything ``Sam``,
    ``clip`` -> ``(model, tokenizer)``, ``clipsam`` (the bundled ``demo``) -> ``ClipSam``.
    A path to a ``.safetensors`` file written by ``ClipSam.save`` gives a ``ClipSam``; any other
    path is read as a SAM checkpoint. A pair ``(sam, clip)`` such as
    ``("vit_b_lm", "clip_vit_b16_openai")`` builds a ClipSam from real weights
    (:func:`build_clipsam`). ``kwargs`` go to the loader.
    """
    if isinstance(name_or_path, (tuple, list)):
        return build_clipsam(*name_or_path, **kwargs)
    name = os.fspath(name_or_path)
    entry = MODELS.get(name)
    if entry is None:
        path = fetch(name_or_path)
        kind = _safetensors_format(path) if path.suffix == ".safetensors" else None
        if kind == "napari-clipsam/model":
            return _load_clipsam(path, **kwargs)
        if kind == "napari-clipsam/adapter":
            raise CheckpointError(f"{path} is a fine-tuned adapter, not a model: load its base model, then the "
                                  "adapter onto it (load_adapter, or --model BASE --adapter FILE)")
        return load_sam_checkpoint(path, **kwargs)
    if entry.kind == "sam":
        return load_sam_checkpoint(name, **kwargs)
    if entry.kind == "clip":
        return load_clip(name, **kwargs)
    return _load_clipsam(fetch(name), **kwargs)


def build_clipsam(sam: PathLike = "vit_b_lm", clip: str = "clip_vit_b16_openai", strategy: str = "adapter",
                  strategy_options: dict | None = None, progress: Any = False) -> Any:
    """A ``ClipSam`` from real weights: a SAM checkpoint (registry name or file) and a registered
    CLIP, joined by a fresh conditioning ``strategy`` (adapters start as the identity, so text
    becomes useful after fine-tuning or with a shared adapter file)."""
    from .clip_parts import ClipConfig
    from .clipsam import ClipSam, ClipSamConfig
    from .sam_parts import SamConfig, sam_config_of

    clip_entry = get_entry(clip)
    if clip_entry.kind != "clip":
        raise ValueError(f"{clip!r} is a {clip_entry.kind} model, not a CLIP: see `napari-clipsam models list`")
    sam_model = load_sam_checkpoint(sam, progress=progress)
    sam_entry = MODELS.get(os.fspath(sam))
    if sam_entry is not None:
        sam_config: SamConfig = sam_config_of(sam_entry.sam_arch)
    else:
        from .checkpoints import infer_sam_config

        sam_config = infer_sam_config(sam_model.state_dict())
    # OpenAI's CLIP uses QuickGELU: name it so a saved model rebuilds with the same activation.
    model_name = clip_entry.open_clip_model + ("-quickgelu" if clip_entry.quick_gelu else "")
    config = ClipSamConfig(sam=sam_config, clip=ClipConfig(model_name=model_name), strategy=strategy,
                           strategy_options=dict(strategy_options or {}))
    return ClipSam(config, sam=sam_model, clip=load_clip(clip, progress=progress))


def _safetensors_format(path: Path) -> str | None:
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format")
    except Exception:
        return None


def _load_clipsam(path: Path, **kwargs: Any) -> Any:
    from .clipsam import ClipSam

    try:
        return ClipSam.load(path, **kwargs)
    except ValueError as e:
        raise CheckpointError(str(e)) from None


__all__ = [
    "CACHE_ENV",
    "OFFLINE_ENV",
    "MIRROR_ENV",
    "MODELS",
    "ModelEntry",
    "ModelDownloadError",
    "CheckpointError",
    "HashMismatchError",
    "register_model",
    "cache_dir",
    "get_entry",
    "list_models",
    "model_path",
    "is_cached",
    "model_status",
    "verify_file",
    "fetch",
    "download",
    "load_sam_checkpoint",
    "load_clip",
    "load_model",
]
