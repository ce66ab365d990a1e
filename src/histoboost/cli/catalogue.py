"""The `backbones` command: every backbone histoboost knows, whether it can be used here, and what a
weights file is (`--check FILE`)."""

from __future__ import annotations

import argparse
import json

from .options import Parents


def add_commands(commands, p: Parents) -> None:
    backbones = commands.add_parser(
        "backbones",
        parents=[p.common],
        help="list the backbones and whether their weights are here",
        description="List every registered backbone: ImageNet CNNs and pathology foundation models (architecture, "
        "parameters, input, µm/px, embedding size, licence, where the weights come from, whether they are found "
        "here). Foundation-model weights are gated or non-commercial: get them from the publisher and pass "
        "--weights NAME=PATH. docs/backbones.md has the details and the published BACH results.",
    )
    backbones.add_argument(
        "--check",
        type=str,
        metavar="FILE",
        help="say which model a weights file fits by its keys and shapes, and its sha256",
    )
    backbones.add_argument("--json", action="store_true", help="machine-readable output")
    backbones.set_defaults(run=_backbones)


def _backbones(args: argparse.Namespace) -> int:
    from ..backbones import catalogue, check_file

    if args.check is not None:
        found = check_file(args.check)
        if args.json:
            print(json.dumps(found, indent=2))
            return 0
        fits = " or ".join(found["fits"]) or "no registered foundation model"
        print(f"{found['path']}: {found['tensors']} tensors, sha256 {found['sha256']}")
        print(f"fits: {fits} (by its keys and shapes)")
        if found["published_checksum_of"]:
            print(f"this is the original file of {found['published_checksum_of'][0]} (its publisher's checksum)")
        else:
            print(
                "no publisher states a checksum for this file: a retrained or altered file of the same shape "
                "would look the same. Record this sha256; bundles and the feature store are keyed by it."
            )
        return 0 if found["fits"] else 1
    rows = catalogue()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    header = ("name", "kind", "architecture", "params", "input", "µm/px", "dim", "weights here")
    table = [header] + [
        (
            r["name"],
            r["kind"],
            r["architecture"],
            f"{r['parameters'] / 1e6:.0f}M",
            r["input"],
            "-" if r["mpp"] is None else f"{r['mpp']:g}",
            str(r["dim"]),
            "yes" if r["found"] else "no",
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    print()
    for r in rows:
        if not r["found"]:
            print(f"{r['name']}: {r['licence']}; get the weights: {r['weights_from']}")
    print("\nUse one: --weights NAME=PATH (foundation models), or --backbone NAME.")
    return 0
