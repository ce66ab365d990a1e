"""The `histoboost` command line: parses flags into a Config and calls the library; holds no logic.

One module per command group: `dataset` (inspect, extract, cache), `experiment` (finetune, cv, report,
demo), `model` (train, predict, evaluate, keygen), `slide` (whole slides, the QuPath script), `view` (the local
viewer), `catalogue` (backbones), `datasets` (public data sets); `options` holds what they share. torch, timm and the
feature code load only for the commands that need them, so that `--help`, `inspect` and bad-flag errors
answer at once.
"""

from __future__ import annotations

import argparse
import sys
import warnings

from PIL import Image

from ..data import DataError
from ..errors import HistoboostError
from ..version import __version__
from . import catalogue, dataset, datasets, experiment, model, slide, view
from .options import parents, print_problems

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if hasattr(sys.stdout, "reconfigure"):  # file names that are not UTF-8 are printed back as they are
        sys.stdout.reconfigure(errors="surrogateescape")
    # Oversized images are reported per file by validation; Pillow's own warning would only repeat it. Its
    # warnings about damaged metadata (EXIF, TIFF tags) name no file and change no pixel: images that do not
    # decode are reported per file anyway.
    warnings.simplefilter("ignore", category=Image.DecompressionBombWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="PIL")
    try:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        return args.run(args)
    except OSError as err:  # disk full, read-only folder, a file gone: one line; --debug shows where
        if args.debug:
            raise
        where = f"{err.filename}: " if err.filename else ""
        print(
            f"histoboost: error: {where}{err.strerror or err} (fix it and rerun: finished work is reused; --debug "
            "shows the traceback)",
            file=sys.stderr,
        )
        return 1
    except DataError as err:
        print_problems(err.problems)
        print(f"histoboost: error: {err}", file=sys.stderr)
        return 1
    except HistoboostError as err:
        print(f"histoboost: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("histoboost: interrupted", file=sys.stderr)
        return 130


class _Parser(argparse.ArgumentParser):
    """argparse, with a bad flag answered in one line (exit status 2) instead of the whole usage."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The `histoboost` parser with every command."""
    parser = _Parser(
        prog="histoboost",
        description="Classify H&E breast histology images (normal/benign, in-situ, invasive) with frozen CNN "
        "or pathology foundation-model features and XGBoost. Research use only; not for diagnosis.",
    )
    parser.add_argument("--version", action="version", version=f"histoboost {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    shared = parents()
    for group in (dataset, experiment, model, slide, view, catalogue, datasets):
        group.add_commands(commands, shared)
    return parser
