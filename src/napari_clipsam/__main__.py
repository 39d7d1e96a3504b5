"""The ``napari-clipsam`` command and ``python -m napari_clipsam``: runs :func:`napari_clipsam.cli.main`.

This module imports nothing heavy, so that Ctrl-C while the command's modules load (about
0.3 s) ends the same way as Ctrl-C later on: one line on stderr and exit status 130, without a
traceback.
"""

from __future__ import annotations

import sys
from typing import Sequence

#: Exit status after Ctrl-C (128 + SIGINT, as shells report it).
INTERRUPTED = 130


def run(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    try:
        from .cli import main

        return main(argv)
    except KeyboardInterrupt:
        print("napari-clipsam: interrupted", file=sys.stderr)
        return INTERRUPTED


if __name__ == "__main__":
    sys.exit(run())
