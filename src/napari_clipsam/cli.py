"""The ``napari-clipsam`` command.

One function per subcommand: ``add_<name>_command(subparsers)`` builds its parser and sets
``func`` to a handler ``(args) -> int``. To add a subcommand, write such a function and append it
to :data:`COMMANDS`. Handlers import heavy modules (torch, napari) lazily, so ``--help`` and
``models list`` start fast and work offline.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from . import __version__
from .batch import io as _io
from .batch.io import LABELS_SUFFIX, TIFF_SUFFIXES, file_kind
from .engine.instances import MIN_SUPPORT, SEED_MODES, TEXT_THRESHOLD

log = logging.getLogger(__name__)

Handler = Callable[[argparse.Namespace], int]


class CliError(Exception):
    """An error to report as one line on stderr with exit status 1."""


class OneLineErrorParser(argparse.ArgumentParser):
    """Usage errors as one line (``napari-clipsam segment: error: ... (see --help)``), exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


class _Once(argparse.Action):
    """An option that may be given once: a second one is a usage error, not a silent replacement."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, self.dest, None) is not None:
            parser.error(f"{option_string} given twice ({getattr(namespace, self.dest)!r}, {values!r}): "
                         "fine-tuning learns one class per run")
        setattr(namespace, self.dest, values)


def _wrap(text: str) -> str:
    import textwrap

    return textwrap.fill(text, width=100)


# --------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------


def add_models_command(subparsers: argparse._SubParsersAction) -> None:
    """``models list`` and ``models download NAME``."""
    p = subparsers.add_parser("models", help="list and download base models", description=(
        "Named base models (SAM, micro-sam, CLIP) and where they are cached "
        "($NAPARI_CLIPSAM_CACHE or the per-user cache folder)."))
    sub = p.add_subparsers(dest="models_command", metavar="{list,download}", required=True)

    pl = sub.add_parser("list", help="show registered models: name, kind, size, cached or not, path")
    pl.add_argument("-v", "--verbose", action="store_true", help="also show URL, hash and licence")
    pl.add_argument("--kind", choices=["sam", "clip", "clipsam"], help="only this kind")
    pl.set_defaults(func=_models_list)

    pd = sub.add_parser("download", help="download a model into the cache and verify its hash")
    pd.add_argument("names", nargs="+", metavar="NAME", help="registered model name(s), see 'models list'")
    pd.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    pd.set_defaults(func=_models_download)


def _fmt_size(entry) -> str:
    mb = entry.size_mb
    text = f"{mb / 1000:.2f} GB" if mb >= 1000 else f"{mb:.0f} MB"
    return text if entry.size_bytes else f"~{text}"


def _models_list(args: argparse.Namespace) -> int:
    from .models import registry

    rows = [("NAME", "KIND", "SIZE", "STATUS", "PATH")]
    for e in registry.list_models(args.kind):
        rows.append((e.name, e.kind, _fmt_size(e), registry.model_status(e.name), str(registry.model_path(e.name))))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4])
    if args.verbose:
        print()
        for e in registry.list_models(args.kind):
            print(f"{e.name}: {e.description}")
            print(f"    url:     {e.url or '(bundled with the package)'}")
            print(f"    hash:    {e.known_hash or '(none published)'}")
            print(f"    licence: {e.licence}")
    print(f"\ncache: {registry.cache_dir()}")
    return 0


def _models_download(args: argparse.Namespace) -> int:
    from .models import registry

    for name in args.names:
        registry.get_entry(name)  # unknown names fail before anything is downloaded
    for name in args.names:
        path = registry.download(name, progress=not args.quiet)
        print(f"{name}: {path}")
    return 0


# --------------------------------------------------------------------------------------
# shared helpers: inputs, outputs, models
# --------------------------------------------------------------------------------------

def _is_tiff(path: Path) -> bool:
    return path.suffix.lower() in TIFF_SUFFIXES


def expand_inputs(items: Sequence[str], what: str = "input") -> list[Path]:
    """Files, folders (their ``*.tif``/``*.tiff``, not recursive) and glob patterns → sorted unique
    TIFF paths (see :func:`napari_clipsam.batch.io.expand_inputs`; outputs ``*_labels.tif`` are
    skipped inside folders and globs). Raises :class:`CliError` for a missing path or no match."""
    try:
        return _io.expand_inputs(items, what, zarr=False)
    except ValueError as e:
        raise CliError(str(e)) from None


def plan_outputs(inputs: Sequence[Path], out: str | None) -> list[Path]:
    """Where each input's labels go.

    No ``out``: ``<input stem>_labels.tif`` beside each input. ``out`` ending in .tif/.tiff: that
    file (one input only). Otherwise ``out`` is a folder (created) holding
    ``<input stem>_labels.tif`` per input; a name with another suffix (``out.png``) must be an
    existing folder or end in "/". Raises :class:`CliError` for clashes."""
    if out is not None and _is_tiff(Path(out)) and not Path(out).is_dir():
        if len(inputs) > 1:
            raise CliError(f"-o {out} names one file but there are {len(inputs)} inputs: give a folder instead")
        outputs = [Path(out).expanduser()]
    else:
        folder = Path(out).expanduser() if out is not None else None
        if folder is not None and folder.exists() and not folder.is_dir():
            raise CliError(f"-o {folder} exists and is not a folder: give a folder or a .tif file name")
        if folder is not None and folder.suffix and not folder.is_dir() and not out.endswith(("/", os.sep)):
            raise CliError(f"-o {out}: labels are written as TIFF: give a .tif file (one input) or a folder "
                           f"(for a new folder named {folder.name}, write -o {out}/)")
        outputs = [(folder or p.parent) / f"{p.stem}{LABELS_SUFFIX}.tif" for p in inputs]
    seen: dict[Path, Path] = {}
    for inp, o in zip(inputs, outputs):
        key = o.resolve()
        if key in seen:
            raise CliError(f"{seen[key]} and {inp} would both be written to {o}: give them different names "
                           "or segment them into different folders")
        if key == inp.resolve():
            raise CliError(f"output {o} is the input itself: choose another -o")
        seen[key] = inp
    return outputs


def check_writable(outputs: Sequence[Path], overwrite: bool, skip_existing: bool = False,
                   can_skip: bool = True) -> list[bool]:
    """Which outputs to write; :class:`CliError` if one exists and neither flag allows it
    (``can_skip``: the command has ``--skip-existing``, and the message offers it)."""
    todo = []
    for o in outputs:
        if o.exists() and not overwrite:
            if skip_existing:
                todo.append(False)
                continue
            more = sum(1 for x in outputs if x.exists())
            extra = f" (and {more - 1} more outputs)" if more > 1 else ""
            keep = ", --skip-existing to keep it," if can_skip else ""
            raise CliError(f"output {o} exists{extra}: pass --overwrite to replace it{keep} or choose another -o")
        todo.append(True)
    return todo


def check_folder_writable(folder: Path, what: str) -> None:
    """:class:`CliError` unless new files can be made in ``folder`` (created if missing): checked
    before any work, so that hours of training are not lost to a read-only output folder."""
    import tempfile

    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".napari-clipsam-probe-"):
            pass
    except OSError as err:
        raise CliError(f"cannot write {what} in {folder}: {err.strerror or err}") from None


def read_tiff(path: Path) -> np.ndarray:
    """The first image series of a TIFF file; :class:`CliError` if it cannot be read."""
    import tifffile

    try:
        return tifffile.imread(str(path))
    except Exception as err:  # tifffile raises many types for non-TIFF or damaged files
        raise CliError(f"cannot read {path} as a TIFF image: {str(err) or type(err).__name__}") from err


def tiff_shape(path: Path) -> tuple[int, ...]:
    """Shape of the first image series, read from the header only."""
    import tifffile

    try:
        with tifffile.TiffFile(str(path)) as tif:
            return tuple(int(s) for s in tif.series[0].shape)
    except Exception as err:
        raise CliError(f"cannot read {path} as a TIFF image: {str(err) or type(err).__name__}") from err


def labels_dtype(labels: np.ndarray) -> np.dtype:
    """uint16 when every id fits, else uint32 (the batch writer's rule)."""
    from .batch.io import labels_dtype as dtype_for_max_id

    return dtype_for_max_id(int(labels.max(initial=0)))


def write_tiff(path: Path, data: np.ndarray, overwrite: bool = False, compress: bool = True) -> None:
    """Write ``data`` to ``path`` atomically: a temp file in the same folder, then a rename.

    Without ``overwrite`` an existing file is never replaced, even one that appeared while writing
    (the temp file is hard-linked into place where the file system allows it)."""
    import tifffile

    if path.exists() and not overwrite:
        raise CliError(f"output {path} exists: pass --overwrite to replace it or choose another name")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tifffile.imwrite(str(tmp), data, compression="zlib" if compress else None)
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise CliError(f"output {path} appeared while writing: not overwritten (pass --overwrite)") from None
            except OSError:  # no hard links here (some network/FAT file systems)
                if path.exists():
                    raise CliError(f"output {path} exists: pass --overwrite to replace it") from None
                os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _numbers(text: str, n: int, what: str, example: str) -> list[float]:
    try:
        vals = [float(v) for v in text.replace(" ", "").split(",")]
    except ValueError:
        vals = []
    if len(vals) != n or not all(np.isfinite(vals)):
        raise CliError(f"{what} {text!r}: expected {n} comma-separated numbers, e.g. {example!r}")
    return vals


def parse_points(text: str | None, what: str = "--points") -> np.ndarray | None:
    """``"x,y;x,y"`` (image pixels, x = column, y = row) → (N, 2) float32."""
    if text is None:
        return None
    parts = [p for p in text.split(";") if p.strip()]
    if not parts:
        raise CliError(f"{what} {text!r}: give at least one point as 'x,y' (several: 'x,y;x,y')")
    return np.array([_numbers(p, 2, what, "120,80;40,35") for p in parts], np.float32)


def parse_box(text: str | None) -> np.ndarray | None:
    """``"x0,y0,x1,y1"`` → (4,) float32."""
    if text is None:
        return None
    box = np.array(_numbers(text, 4, "--box", "10,20,60,80"), np.float32)
    if box[2] <= box[0] or box[3] <= box[1]:
        raise CliError(f"--box {text!r}: need x1 > x0 and y1 > y0 (x0,y0,x1,y1 in pixels)")
    return box


def check_text(text: str | None, required: bool) -> str | None:
    if text is None:
        if required:
            raise CliError("give --text (all objects of a concept, e.g. --text nucleus) or --points/--box (one object)")
        return None
    if not text.strip():
        raise CliError("--text is empty: name a concept, e.g. --text nucleus")
    return text.strip()


def add_model_arguments(p: argparse.ArgumentParser, adapter: bool = True) -> None:
    p.add_argument("--model", default="demo", metavar="NAME|PATH",
                   help="napari-clipsam model: a registered name or a .safetensors file (default: the bundled 'demo')")
    if adapter:
        p.add_argument("--adapter", metavar="FILE", help="fine-tuned adapter (.safetensors) to apply")
    p.add_argument("--device", help="torch device: cpu, cuda, cuda:1, mps (default: CUDA, then MPS, then CPU)")


def check_model_files(model: str, adapter: str | None = None) -> None:
    """Fail fast (before torch loads) on a missing model or adapter file."""
    if adapter is not None and not Path(adapter).expanduser().is_file():
        raise CliError(f"adapter file not found: {adapter}")
    if Path(model).suffix and not Path(model).expanduser().exists():
        raise CliError(f"model file not found: {model}")


def load_clipsam(model: str, adapter: str | None = None):
    """Load a ClipSam by name or path, with an adapter applied; clear errors for anything else."""
    check_model_files(model, adapter)
    from .models.clipsam import ClipSam
    from .models.registry import load_model, model_status

    try:
        if model_status(model) == "not built":
            raise CliError(f"the bundled model {model!r} is missing from this installation: reinstall "
                           "napari-clipsam, or pass --model PATH to a napari-clipsam .safetensors model")
    except ValueError:
        pass  # not a registered name: a path, checked by load_model
    net = load_model(model)
    if not isinstance(net, ClipSam):
        raise CliError(f"--model {model} is a {type(net).__name__}, not a napari-clipsam model: give 'demo' "
                       "or a .safetensors file written by ClipSam.save")
    if adapter is not None:
        from .training.adapter_file import load_adapter

        load_adapter(Path(adapter).expanduser(), net)
    return net


def check_device(name: str | None):
    """``--device`` as a ``torch.device`` (None: CUDA, then MPS, then CPU); :class:`CliError` for
    a name torch does not know or a device this machine lacks, before any model loads."""
    from .engine.segmenter import resolve_device

    try:
        return resolve_device(name)
    except ValueError as err:
        raise CliError(f"--device {name}: {err}") from None


def make_segmenter(args: argparse.Namespace):
    device = check_device(args.device)
    model = load_clipsam(args.model, getattr(args, "adapter", None))
    from .engine.cache import EmbeddingCache
    from .engine.segmenter import Segmenter

    cache = EmbeddingCache(directory=Path(args.cache).expanduser()) if getattr(args, "cache", None) else None
    tile = getattr(args, "tile_size", None)
    return Segmenter(model, device=device, cache=cache, tile_size=tile)


class _Bar:
    """A tqdm bar fed by the engine's ``progress(done, total, message)`` callbacks (on a TTY only)."""

    def __init__(self, quiet: bool, desc: str = "", position: int = 0):
        from tqdm.auto import tqdm

        self._tqdm = tqdm
        self.disable = True if quiet else None  # None: only on a terminal
        self.desc = desc
        self.position = position
        self.bar = None

    def __call__(self, done: int, total: int, message: str) -> None:
        if self.bar is None or self.bar.total != total or done < self.bar.n:
            self.close()
            self.bar = self._tqdm(total=total, desc=f"{self.desc} {message}".strip(), disable=self.disable,
                                  leave=False, position=self.position, unit="step")
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


# --------------------------------------------------------------------------------------
# segment
# --------------------------------------------------------------------------------------


def add_segment_command(subparsers: argparse._SubParsersAction) -> None:
    """``segment INPUT... --text T | --points ... | --box ... [-o OUT]``."""
    p = subparsers.add_parser(
        "segment", help="segment TIFF images or volumes by text or clicks into instance-label TIFFs",
        description=_wrap(
            "Segment 2D images (H, W) / RGB (H, W, 3) or, with --3d, volumes (Z, Y, X) into instance labels "
            "(uint16, or uint32 past 65535 objects) of the same shape. --text finds every object of a "
            "concept; --points/--box (optionally with --text) segments one object (labels 0/1). Inputs: files, "
            "folders (their .tif/.tiff files) or quoted glob patterns; one output per input. Outputs are "
            "never overwritten unless --overwrite."),
        epilog=("examples:\n"
                "  napari-clipsam segment cells.tif --text nucleus -o cells_nuclei.tif\n"
                "  napari-clipsam segment images/ --text mitochondrion -o results/\n"
                "  napari-clipsam segment cells.tif --points '120,80' --negative '130,90' -o one_cell.tif\n"
                "  napari-clipsam segment stack.tif --3d --text nucleus -o stack_labels.tif\n"
                "  napari-clipsam segment stack.tif --3d --z 8 --box 40,40,80,90 -o one_nucleus.tif"),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="TIFF file(s), folder(s) or glob pattern(s)")
    p.add_argument("-o", "--output", metavar="OUT",
                   help="output .tif (one input) or folder (default: <input>_labels.tif beside each input)")
    p.add_argument("-t", "--text", help="concept to segment, e.g. nucleus, mitochondrion, vesicle")
    p.add_argument("--points", metavar="'x,y;x,y'", help="positive clicks in pixels (x = column, y = row)")
    p.add_argument("--negative", metavar="'x,y;x,y'", help="negative clicks (background) in pixels")
    p.add_argument("--box", metavar="x0,y0,x1,y1", help="a box around the object, in pixels")
    p.add_argument("--3d", dest="volume", action="store_true",
                   help="inputs are volumes (Z, Y, X): text → 3D instances linked across z; clicks → one "
                        "object propagated through z")
    p.add_argument("--z", type=int, help="with --3d and --points/--box: the slice the clicks/box are on")
    p.add_argument("--channel-axis", type=int, metavar="AXIS",
                   help="axis holding channels in multichannel inputs (up to 3 are used)")
    add_model_arguments(p)
    p.add_argument("--cache", metavar="DIR", help="embedding cache folder (see 'napari-clipsam embed')")
    p.add_argument("--threshold", type=float, default=TEXT_THRESHOLD,
                   help=f"text mode: probability threshold (default {TEXT_THRESHOLD})")
    p.add_argument("--min-area", type=int, default=16, help="text mode: smallest object in pixels (default 16)")
    p.add_argument("--min-score", type=float, default=0.25,
                   help="text mode: lowest predicted IoU of a kept object (default 0.25)")
    p.add_argument("--min-support", type=float, default=MIN_SUPPORT,
                   help="text mode: least mean text probability inside a kept object, 0 keeps all "
                        f"(default {MIN_SUPPORT})")
    p.add_argument("--seeds", choices=SEED_MODES, default="grid",
                   help="text mode: click a grid of seeds in the text's regions (default; touching objects "
                        "come out separately) or one prompt per region (faster, for decoders trained with "
                        "mask prompts)")
    p.add_argument("--tile-size", type=int,
                   help="tile side for large images (default: automatic; 0 never tiles)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--skip-existing", action="store_true", help="leave existing outputs alone (resume a batch)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars, no per-file lines")
    add_batch_arguments(p)
    p.set_defaults(func=_segment)


def add_batch_arguments(p: argparse.ArgumentParser) -> None:
    """``--scheduler`` once :mod:`napari_clipsam.batch` exists (Dask batch processing)."""
    import importlib.util

    if importlib.util.find_spec(f"{__package__}.batch") is not None:
        p.add_argument("--scheduler", metavar="ADDRESS|local|threads",
                       help="run the batch with Dask: a scheduler address, 'local' (a local cluster) or "
                            "'threads' (default: one file after another in this process)")
        p.add_argument("--workers", type=int, default=2, metavar="N",
                       help="with --scheduler local: worker processes; threads: worker threads (default 2)")


def _input_kind(path: Path, shape: tuple[int, ...], args: argparse.Namespace) -> str:
    """'2d' or '3d' for a TIFF of ``shape``, or :class:`CliError` explaining what to pass."""
    try:
        return file_kind(shape, args.volume, args.channel_axis)
    except ValueError as e:
        raise CliError(f"{path}: {e}") from None


def _segment(args: argparse.Namespace) -> int:
    text = check_text(args.text, required=args.points is None and args.box is None)
    points = parse_points(args.points)
    negative = parse_points(args.negative, "--negative")
    box = parse_box(args.box)
    if negative is not None and points is None and box is None:
        raise CliError("--negative needs --points or --box: negative clicks only refine an object")
    manual = points is not None or box is not None
    if args.volume and manual and args.z is None:
        raise CliError("with --3d, --points/--box need --z SLICE: the slice they are on")
    if args.overwrite and args.skip_existing:
        raise CliError("--overwrite and --skip-existing contradict each other: choose one")
    if getattr(args, "scheduler", None):
        from . import batch  # noqa: F401  (wired by the batch module)

        run = getattr(batch, "run_segment_cli", None)
        if run is None:
            raise CliError("--scheduler is not available in this version")
        return int(run(args) or 0)
    if points is not None or negative is not None:
        pts = np.concatenate([x for x in (points, negative) if x is not None])
        lab = np.array([1] * (0 if points is None else len(points)) + [0] * (0 if negative is None else len(negative)))
    else:
        pts, lab = None, None

    check_model_files(args.model, args.adapter)
    inputs = expand_inputs(args.inputs)
    outputs = plan_outputs(inputs, args.output)
    kinds = [_input_kind(p, tiff_shape(p), args) for p in inputs]  # every header before the model loads
    todo = check_writable(outputs, args.overwrite, args.skip_existing)
    for inp, out, do in zip(inputs, outputs, todo):
        if not do and not args.quiet:
            print(f"{inp} -> {out}: exists, skipped")
    work = [(i, o, k) for i, o, k, do in zip(inputs, outputs, kinds, todo) if do]
    if not work:
        return 0
    seg = make_segmenter(args)
    from tqdm.auto import tqdm

    files = tqdm(work, desc="files", unit="file", disable=True if (args.quiet or len(work) < 2) else None)
    inner = _Bar(args.quiet, position=1 if len(work) > 1 else 0)
    failed: list[Path] = []
    try:
        for inp, out, kind in files:
            try:
                labels, n = _segment_one(seg, read_tiff(inp), kind, inp, args, text, pts, lab, box, inner)
                labels = labels.astype(labels_dtype(labels), copy=False)
                write_tiff(out, labels, overwrite=args.overwrite)
            except Exception as err:  # one bad file must not stop the batch (as with --scheduler)
                inner.close()
                log.debug("%s failed", inp, exc_info=True)
                failed.append(inp)
                files.write(f"napari-clipsam: error: {file_error(inp, err)}", file=sys.stderr)
                continue
            if not args.quiet:
                what = "object" if manual else (f"'{text}' object" if text else "object")
                shape = "×".join(str(s) for s in labels.shape)
                files.write(f"{inp} -> {out}: {n} {what}{'s' if n != 1 else ''} ({shape} {labels.dtype})")
    finally:
        inner.close()
    if len(inputs) > 1:
        print_summary(len(work) - len(failed), todo.count(False), failed, args.quiet)
    return 1 if failed else 0


def file_error(path: Path, err: BaseException) -> str:
    """One line for an error in one input file, naming the file."""
    if isinstance(err, CliError):  # already names the file
        text = str(err)
    elif isinstance(err, (ValueError, OSError)):
        text = f"{path}: {str(err) or type(err).__name__}"
    else:
        text = f"{path}: {type(err).__name__}: {err}"
    return " ".join(text.split())


def print_summary(done: int, skipped: int, failed: Sequence[Path], quiet: bool) -> None:
    """A batch's last line: counts, and the failed files by name. On stderr when any failed (even
    with --quiet), else on stdout unless quiet."""
    line = f"{done} done, {skipped} skipped, {len(failed)} failed"
    if failed:
        print(f"napari-clipsam: {line}: {', '.join(str(p) for p in failed)}", file=sys.stderr)
    elif not quiet:
        print(line)


def _segment_one(seg, image: np.ndarray, kind: str, path: Path, args, text, pts, lab, box, progress):
    """→ (labels, number of objects) for one input."""
    try:
        if kind == "3d":
            res = seg.segment_volume(image, z=args.z, points=pts, labels=lab, box=box, text=text,
                                     channel_axis=args.channel_axis, progress=progress,
                                     **({} if pts is not None or box is not None else
                                        {"threshold": args.threshold, "min_area": args.min_area,
                                         "min_score": args.min_score, "seeds": args.seeds,
                                         "min_support": args.min_support}))
            return res.labels, len(np.unique(res.labels)) - (1 if (res.labels == 0).any() else 0)
        seg.set_image(image, channel_axis=args.channel_axis, progress=progress)
        if pts is not None or box is not None:
            mask, _ = seg.predict(points=pts, labels=lab, box=box, text=text)
            return mask.astype(np.uint16), int(mask.any())
        res = seg.segment_text(text, threshold=args.threshold, min_area=args.min_area, min_score=args.min_score,
                               seeds=args.seeds, min_support=args.min_support, progress=progress)
        return res.labels, len(res.scores)
    except ValueError as err:
        raise CliError(f"{path}: {err}") from err


# --------------------------------------------------------------------------------------
# embed
# --------------------------------------------------------------------------------------


def add_embed_command(subparsers: argparse._SubParsersAction) -> None:
    """``embed INPUT... --cache DIR``."""
    p = subparsers.add_parser(
        "embed", help="precompute image embeddings into a cache folder (e.g. on a GPU machine)",
        description=_wrap(
            "Compute the image embeddings of TIFF images (or, with --3d, of every volume slice) into an "
            "on-disk cache. Copy the folder anywhere and pass it to 'segment --cache DIR' (or the napari "
            "widget) with the same model and adapter: segmentation then runs only the fast decoder. "
            "With --text, the text-conditioned embeddings of those concepts are cached too (needed for "
            "models whose encoder depends on the text, such as the demo)."),
        epilog="example:\n  napari-clipsam embed images/ --cache emb/ --text nucleus --device cuda",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="TIFF file(s), folder(s) or glob pattern(s)")
    p.add_argument("--cache", required=True, metavar="DIR", help="cache folder (created if missing)")
    p.add_argument("-t", "--text", action="append", default=[], metavar="T",
                   help="also cache the embedding conditioned on this concept (repeatable)")
    p.add_argument("--3d", dest="volume", action="store_true", help="inputs are volumes (Z, Y, X)")
    p.add_argument("--channel-axis", type=int, metavar="AXIS", help="axis holding channels")
    add_model_arguments(p)
    p.add_argument("--tile-size", type=int, help="as for segment (must match it to reuse the cache)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_embed)


def _embed(args: argparse.Namespace) -> int:
    texts = [check_text(t, required=True) for t in args.text]
    check_folder_writable(Path(args.cache).expanduser(), "cache entries")
    inputs = expand_inputs(args.inputs)
    kinds = [_input_kind(p, tiff_shape(p), args) for p in inputs]
    seg = make_segmenter(args)
    from tqdm.auto import tqdm

    from .engine.volume import NormalizedVolume

    before = _cache_files(Path(args.cache).expanduser())
    bar = tqdm(total=len(inputs), desc="embedding", unit="file", disable=True if args.quiet else None)
    try:
        for path, kind in zip(inputs, kinds):
            image = read_tiff(path)
            try:
                if kind == "3d":  # normalised exactly as segment_volume does (volume-wide limits)
                    vol = NormalizedVolume(image, args.channel_axis)
                    slices = [vol[z] for z in range(len(vol))]
                else:
                    from .engine.preprocess import normalize_image

                    slices = [normalize_image(image, args.channel_axis)]
                for im in slices:
                    seg.set_normalized(im, embed=True)
                    for t in texts:
                        seg.segment_text(t)  # caches the text-conditioned embedding (decoding is cheap)
            except ValueError as err:
                raise CliError(f"{path}: {err}") from err
            bar.update(1)
    finally:
        bar.close()
    after = _cache_files(Path(args.cache).expanduser())
    print(f"{len(inputs)} input(s) embedded: {after - before} new cache entries, {after} in {args.cache}")
    return 0


def _cache_files(folder: Path) -> int:
    from .engine.cache import EmbeddingCache

    return len(EmbeddingCache(directory=folder).disk_entries()) if folder.is_dir() else 0


# --------------------------------------------------------------------------------------
# finetune
# --------------------------------------------------------------------------------------


def add_finetune_command(subparsers: argparse._SubParsersAction) -> None:
    """``finetune --images ... --labels ... --text T -o adapter.safetensors``."""
    p = subparsers.add_parser(
        "finetune", help="fine-tune on a few labelled images; writes a small adapter file",
        description=_wrap(
            "Fine-tune the model (LoRA + text conditioning + mask decoder) on images with instance labels of "
            "one concept, and save only the trained weights as an adapter (.safetensors, a few MB). "
            "--images and --labels are paired in order (folders in file-name order); 3D stacks give one "
            "example per labelled slice. Part of the data is held out for validation: from 4 labelled "
            "images on, whole images, and the run stops early and keeps its best weights; with 1-3 images, "
            "a strip of each, and the run takes all its steps and keeps the last weights. Use the adapter "
            "with 'segment --adapter FILE' or in the napari widget."),
        epilog=("example:\n  napari-clipsam finetune --images img1.tif img2.tif --labels lab1.tif lab2.tif "
                "--text nucleus --steps 200 -o nuclei.safetensors"),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", nargs="+", required=True, metavar="IMAGE", help="TIFF files, folders or globs")
    p.add_argument("--labels", nargs="+", required=True, metavar="LABELS",
                   help="instance-label TIFFs (0 = background), one per image, same shape")
    p.add_argument("-t", "--text", required=True, action=_Once,
                   help="the concept the labels show, e.g. nucleus (one per run: one class per adapter run)")
    p.add_argument("-o", "--output", required=True, metavar="ADAPTER.safetensors", help="adapter file to write")
    p.add_argument("--mode", choices=["manual", "text", "both"], default="both",
                   help="how you will segment: manual (clicks/boxes + text), text (text only) or both (default)")
    p.add_argument("--steps", type=int, default=200, help="training steps (default 200)")
    p.add_argument("--lr", type=float, default=3e-4, help="learning rate (default 3e-4)")
    p.add_argument("--lora-rank", type=int, default=8, help="LoRA rank; 0 trains no LoRA (default 8)")
    p.add_argument("--batch-size", type=int, default=2, help="examples per step (default 2)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--patience", type=int, default=5,
                   help="stop after this many validations without improvement (0: never; default 5)")
    p.add_argument("--fp32", action="store_true",
                   help="fp32 forward passes (default: bf16 autocast where the CPU or GPU computes bf16 natively)")
    add_model_arguments(p, adapter=False)
    p.add_argument("--overwrite", action="store_true", help="replace an existing adapter file")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_finetune)


def _finetune(args: argparse.Namespace) -> int:
    text = check_text(args.text, required=True)
    out = Path(args.output).expanduser()
    if out.suffix != ".safetensors":
        raise CliError(f"-o {args.output}: adapter files end in .safetensors, e.g. -o {out.stem}.safetensors")
    if out.exists() and not args.overwrite:
        raise CliError(f"adapter {out} exists: pass --overwrite to replace it or choose another -o")
    if out.is_dir():
        raise CliError(f"-o {out} is a folder: give a file name ending in .safetensors")
    check_folder_writable(out.parent, "the adapter")
    if args.steps < 1:
        raise CliError(f"--steps {args.steps}: need at least 1")
    if args.lora_rank < 0:
        raise CliError(f"--lora-rank {args.lora_rank}: need 0 (no LoRA) or more")
    device = check_device(args.device)
    images = expand_inputs(args.images, "image")
    labels = expand_inputs(args.labels, "labels")
    if len(images) != len(labels):
        raise CliError(f"{len(images)} image(s) but {len(labels)} label file(s): give one label file per image")
    for im, lb in zip(images, labels):
        si, sl = tiff_shape(im), tiff_shape(lb)
        if si != sl and si[:-1] != sl:
            raise CliError(f"{lb.name} {sl} does not match {im.name} {si}: label files pair with images in order")

    from .training import FineTuneConfig, examples_from_files, finetune, save_adapter

    examples = []
    for im, lb in zip(images, labels):
        try:
            examples += examples_from_files(im, lb, text)
        except ValueError as err:
            raise CliError(f"{im.name} + {lb.name}: {err}") from err
    model = load_clipsam(args.model)
    model.to(device)
    config = FineTuneConfig(mode=args.mode, steps=args.steps, lr=args.lr, lora_rank=args.lora_rank,
                            batch_size=args.batch_size, seed=args.seed, patience=args.patience,
                            autocast=False if args.fp32 else None)
    if not args.quiet:
        print(f"fine-tuning {args.model} on {len(examples)} example(s) of {text!r} from {len(images)} image(s), "
              f"mode {args.mode}, {args.steps} steps")
    from tqdm.auto import tqdm

    bar = tqdm(total=args.steps, desc="fine-tuning", unit="step", disable=True if args.quiet else None)

    def callback(p) -> None:
        if p.phase in ("train", "validate"):
            bar.update(p.step - bar.n)
            post = {}
            if p.loss is not None:
                post["loss"] = f"{p.loss:.3f}"
            if p.val_score is not None:
                post["val score"] = f"{p.val_score:.3f}"
            bar.set_postfix(post, refresh=False)
        if p.phase == "validate" and not args.quiet:
            best = "" if p.best_val_score is None else f" (best {p.best_val_score:.3f})"
            loss = "" if p.loss is None else f" loss {p.loss:.4f}"
            bar.write(f"step {p.step:>4}/{p.total}{loss} validation score {p.val_score:.3f}{best}")

    try:
        result = finetune(model, examples, config, callback=callback)
    finally:
        bar.close()
    meta = {"cli": {"images": [str(p) for p in images], "labels": [str(p) for p in labels], "text": text}}
    save_adapter(out, model, metadata=meta, overwrite=args.overwrite)
    if not args.quiet:
        keys = ("iou_points", "iou_box", "iou_text", "f1_text", "val_score")

        def fmt(m: dict) -> str:
            return "  ".join(f"{k} {m[k]:.3f}" for k in keys if k in m and m[k] == m[k])

        print(f"validation ({result.split.get('kind', '?')}) before: {fmt(result.start_metrics)}")
        print(f"validation after (step {result.best_step}): {fmt(result.best_metrics)}")
        print(f"{result.steps} steps in {result.seconds:.1f} s; adapter written to {out}")
    return 0


# --------------------------------------------------------------------------------------
# sample
# --------------------------------------------------------------------------------------


def add_sample_command(subparsers: argparse._SubParsersAction) -> None:
    """``sample -o sample.tif [--3d] [--labels LABELS.tif]``."""
    p = subparsers.add_parser(
        "sample", help="write a synthetic fluorescence image (or volume) to try the other commands",
        description=("Write a procedural fluorescence-like image (uint16) with nuclei, mitochondria and vesicles "
                     "- the same kind the demo model was trained on - and optionally its ground-truth labels."))
    p.add_argument("-o", "--output", required=True, metavar="FILE.tif", help="image file to write")
    p.add_argument("--labels", metavar="FILE.tif", help="also write the ground-truth instance labels here")
    p.add_argument("--concept", choices=["nucleus", "mitochondrion", "vesicle"],
                   help="with --labels: only this concept's instances (default: all)")
    p.add_argument("--3d", dest="volume", action="store_true", help="a (16, 256, 256) volume instead")
    p.add_argument("--seed", type=int, help="random seed (default: the napari sample's)")
    p.add_argument("--size", type=int, default=256, help="2D image side in pixels (default 256)")
    p.add_argument("--overwrite", action="store_true", help="replace existing files")
    p.set_defaults(func=_sample)


def _sample(args: argparse.Namespace) -> int:
    targets = [Path(args.output).expanduser()] + ([Path(args.labels).expanduser()] if args.labels else [])
    for t in targets:
        if not _is_tiff(t):
            raise CliError(f"{t}: give a file name ending in .tif")
    if len(targets) == 2 and targets[0].resolve() == targets[1].resolve():
        raise CliError(f"-o and --labels are the same file {targets[0]}: give the labels another name")
    if args.volume and args.size != 256:
        raise CliError("--size sets a 2D image's side; the --3d volume is (16, 256, 256)")
    check_writable(targets, args.overwrite, can_skip=False)
    for t in targets:  # both before writing either: no image left behind without its labels
        check_folder_writable(t.parent, t.name)
    from ._sample_data import SAMPLE_2D_SEED, SAMPLE_3D_SEED
    from .data.synthetic import make_image, make_volume

    if args.volume:
        s = make_volume(SAMPLE_3D_SEED if args.seed is None else args.seed, (16, 256, 256), p_absent=0.0)
    else:
        s = make_image(SAMPLE_2D_SEED if args.seed is None else args.seed, args.size, p_absent=0.0)
    write_tiff(targets[0], s.image, overwrite=args.overwrite)
    counts = {c: len(s.ids_of(c)) for c in s.concepts_present}
    print(f"{targets[0]}: {'×'.join(map(str, s.image.shape))} {s.image.dtype}, "
          + ", ".join(f"{n} {c}" for c, n in counts.items()))
    if args.labels:
        lab = s.instance_labels(args.concept) if args.concept else s.labels
        write_tiff(targets[1], lab.astype(labels_dtype(lab)), overwrite=args.overwrite)
        print(f"{targets[1]}: ground truth ({args.concept or 'all concepts'})")
    return 0


# --------------------------------------------------------------------------------------
# parser and entry point
# --------------------------------------------------------------------------------------

#: Subcommand builders, in the order shown by ``--help``.
COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    add_segment_command, add_finetune_command, add_embed_command, add_sample_command, add_models_command]


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="napari-clipsam",
        description="Segment microscopy by text and clicks with a CLIP-conditioned SAM.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--log-level", default="WARNING", type=str.upper,
                        choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
                        help="logging level (default: WARNING)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in COMMANDS:
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 1 error, 2 usage error). Ctrl-C raises
    ``KeyboardInterrupt``: the ``napari-clipsam`` command (:func:`napari_clipsam.__main__.run`)
    reports it with status 130, also while this module is still being imported."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s")
    from .models.registry import CheckpointError, ModelDownloadError

    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:  # the reader stopped early (`| head`): nothing more to say to it
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (CliError, ModelDownloadError, CheckpointError, ValueError, OSError) as e:
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"napari-clipsam: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover  (python -m napari_clipsam.cli: as the command)
    from napari_clipsam.__main__ import run

    sys.exit(run())
