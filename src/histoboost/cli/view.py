"""The `view` command: a local web viewer for slide results and image predictions (presentation only)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .options import Parents, count


def add_commands(commands, p: Parents) -> None:
    view = commands.add_parser(
        "view",
        parents=[p.common],
        help="look at slide results and predictions in the browser (local, read-only)",
        description="Serve the given results on this machine: each slide with its heat map in a deep-zoom viewer, "
        "predictions as a gallery. Read-only; it serves only the files those results are made of. Ctrl-C stops it.",
    )
    view.add_argument(
        "results",
        type=Path,
        nargs="+",
        metavar="RESULT",
        help="a `histoboost slide` output folder (OUT or OUT/<slide>), or a `predict` CSV/JSON or its folder",
    )
    view.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 exposes the results to the "
        "network, then give --allow-host the name others reach it by)",
    )
    view.add_argument("--port", type=count(0, 65535), default=0, help="port (default 0: a free one)")
    view.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="NAME",
        help="also answer requests addressed to this host name (repeatable; by default only the "
        "address it listens on, localhost, 127.0.0.1 and [::1]: other names are refused, so that no "
        "web page can reach the viewer by DNS rebinding)",
    )
    view.add_argument("--open", action="store_true", help="open the page in the default browser")
    view.set_defaults(run=_view)


def _view(args: argparse.Namespace) -> int:
    from ..viewer import serve

    serve(
        args.results,
        args.host,
        args.port,
        args.open,
        announce=lambda line: print(line, flush=True),
        allow_hosts=args.allow_host,
    )
    return 0
