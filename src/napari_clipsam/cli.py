"""The ``napari-clipsam`` command.

One function per subcommand: ``add_<name>_command(subparsers)`` builds its parser and sets
``func`` to a handler ``(args) -> int``. To add a subcommand, write such a function and append it
to :data:`COMMANDS`. Handlers import heavy modules (torch, napari) lazily, so ``--help`` and
``models list`` start fast and work offline.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, Sequence

from . import __version__

Handler = Callable[[argparse.Namespace], int]


class CliError(Exception):
    """An error to report as one line on stderr with exit status 1."""


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
# parser and entry point
# --------------------------------------------------------------------------------------

#: Subcommand builders, in the order shown by ``--help``.
COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [add_models_command]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="napari-clipsam",
        description="Segment microscopy by text and clicks with a CLIP-conditioned SAM.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--log-level", default="WARNING", help="logging level (default: WARNING)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in COMMANDS:
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 1 error, 2 usage error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    from .models.registry import CheckpointError, ModelDownloadError

    try:
        return int(args.func(args) or 0)
    except (CliError, ModelDownloadError, CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"napari-clipsam: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("napari-clipsam: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
