"""``napari-clipsam segment ... --scheduler ADDRESS|local|threads [--workers N]``.

The same inputs, outputs and overwrite rules as the single-process ``segment`` (the CLI's own
helpers decide them), run by :func:`~napari_clipsam.batch.segment_files`. Text mode only.
"""

from __future__ import annotations

import argparse
import logging
import sys

log = logging.getLogger(__name__)


def run_segment_cli(args: argparse.Namespace) -> int:
    """Run the batch; prints one line per finished file (unless ``--quiet``), and each failed file
    and a summary on stderr (even with ``--quiet``). Exit status 1 if any file failed."""
    from ..cli import (CliError, check_device, check_model_files, check_text, check_writable, expand_inputs,
                       plan_outputs, print_summary)

    if args.points is not None or args.box is not None or args.negative is not None:
        raise CliError("--scheduler runs text segmentation only: drop --points/--box, or drop --scheduler")
    workers = getattr(args, "workers", 2)
    if workers < 1:
        raise CliError(f"--workers {workers}: need at least 1")
    check_device(args.device)
    if getattr(args, "cache", None):
        log.warning("--cache is not used with --scheduler: each worker computes its own embeddings")
    text = check_text(args.text, required=True)
    check_model_files(args.model, args.adapter)
    inputs = expand_inputs(args.inputs)
    outputs = plan_outputs(inputs, args.output)
    todo = check_writable(outputs, args.overwrite, args.skip_existing)
    if not args.quiet:
        for inp, out, do in zip(inputs, outputs, todo):
            if not do:
                print(f"{inp} -> {out}: exists, skipped")
    work = [(i, o) for i, o, do in zip(inputs, outputs, todo) if do]
    if not work:
        return 0
    import distributed  # configures its loggers on import (INFO): they follow --log-level instead

    from . import segment_files

    logging.getLogger(distributed.__name__).setLevel(logging.getLogger().getEffectiveLevel())
    bar = None
    if not args.quiet:
        from tqdm.auto import tqdm

        bar = tqdm(desc="tasks", unit="task", disable=None)

    def progress(done: int, total: int, message: str) -> None:
        if bar is not None:
            bar.total = total
            bar.update(done - bar.n)

    try:
        report = segment_files([i for i, _ in work], outputs=[o for _, o in work], text=text, model=args.model,
                               adapter=args.adapter, volume=args.volume, scheduler=args.scheduler,
                               n_workers=workers, overwrite=args.overwrite, channel_axis=args.channel_axis,
                               threshold=args.threshold, min_area=args.min_area, min_score=args.min_score,
                               seeds=args.seeds, min_support=args.min_support, tile_size=args.tile_size, device=args.device, progress=progress)
    except ValueError as err:
        raise CliError(str(err)) from err
    finally:
        if bar is not None:
            bar.close()
    failed = []
    for r in report.results:
        if r.status == "done" and not args.quiet:
            print(f"{r.input} -> {r.output}: {r.objects} '{text}' object{'s' if r.objects != 1 else ''}")
        elif r.status in ("failed", "cancelled"):
            failed.append(r.input)
            print(f"napari-clipsam: error: {r.input}: {' '.join(r.message.split())}", file=sys.stderr)
    print_summary(len(report.done), todo.count(False) + len(report.skipped), failed, args.quiet)
    return 0 if report.ok else 1


__all__ = ["run_segment_cli"]
