"""`datasets list` and `datasets fetch NAME`: public breast H&E data sets, downloaded, checked and laid out as
histoboost reads them (`histoboost.datasets`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .options import Parents, UsageError, progress_of, sha256


def add_commands(commands, p: Parents) -> None:
    datasets = commands.add_parser(
        "datasets",
        help="list and fetch public breast H&E data sets",
        description="Public breast H&E data sets histoboost can fetch: downloaded with resume, checked against the "
        "owners' published checksum, unpacked safely, with a manifest, the licence and the provenance beside the "
        "images. Read each licence: most of these data sets are for non-commercial research.",
    )
    actions = datasets.add_subparsers(title="actions", metavar="ACTION", required=True)
    listing = actions.add_parser("list", parents=[p.common], help="the data sets, their size, licence and source")
    listing.set_defaults(run=_list)
    fetch = actions.add_parser(
        "fetch",
        parents=[p.common],
        help="download, check and unpack one",
        description="Download NAME into DIR/NAME.part (run again to resume an interrupted transfer), check its size "
        "and checksums, unpack it into DIR/NAME/ with manifest.csv (and one CSV per published split), LICENCE.txt "
        "and SOURCE.json. A data set fetched before is left as it is.",
    )
    fetch.add_argument("name", metavar="NAME", help="a name from `histoboost datasets list`")
    fetch.add_argument("--to", type=Path, default=Path("data"), metavar="DIR", help="where to put it (default: data)")
    fetch.add_argument(
        "--sha256", type=sha256, metavar="HEX", help="also check the archive against this sha256 (one you trust)"
    )
    fetch.add_argument("--keep-archive", action="store_true", help="keep the downloaded archive after unpacking")
    fetch.set_defaults(run=_fetch)


def _list(args: argparse.Namespace) -> int:
    from ..datasets import MANUAL, SOURCES

    for source in SOURCES.values():
        checked = " and ".join(source.digests) or "nothing published (the sha256 is recorded)"
        print(f"{source.name}: {source.title}")
        print(f"    licence: {source.licence}\n    source:  {source.url} (checked: {checked})")
    for manual in MANUAL.values():
        print(f"{manual.name}: {manual.title}")
        print(f"    licence: {manual.licence}\n    by hand: {manual.page}: {manual.how}")
    return 0


def _fetch(args: argparse.Namespace) -> int:
    from ..datasets import MANUAL, SOURCES, fetch, licence_text

    if args.name in MANUAL:
        manual = MANUAL[args.name]
        raise UsageError(f"{manual.name} cannot be fetched: {manual.licence}; {manual.how} ({manual.page})")
    if args.name not in SOURCES:
        raise UsageError(f"no data set {args.name!r}: choose one of {', '.join(sorted(SOURCES))}")
    source = SOURCES[args.name]
    print(licence_text(source), end="")
    done = fetch(source, args.to, args.sha256, args.keep_archive, progress_of(args))
    counts = ", ".join(f"{name} {n}" for name, n in done.manifests.items())
    state = "already here" if done.already else f"sha256 {done.sha256}"
    print(f"{done.folder}: {counts} images ({state})")
    first = next((name for name in done.manifests if name == "train.csv"), "manifest.csv")
    print(f"next: histoboost cv {done.folder / first} --preset quick {source.cv_flags}".rstrip())
    return 0
