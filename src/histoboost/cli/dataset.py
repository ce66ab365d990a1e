"""The data-set commands: `inspect` (validate and summarise), `extract` (features into the store) and
`cache` (list or prune stores)."""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

from .. import storage
from ..config import Config
from ..data import DataError
from ..outputs import check_output, staged_folder
from ..stain import check_images
from ..storage import write_text_atomic
from .options import (
    Parents,
    UsageError,
    config_from_args,
    engine_of,
    load_data,
    non_negative,
    print_problems,
    progress_of,
    read_data,
    runtime_of,
    shard,
)


def add_commands(commands, p: Parents) -> None:
    inspect = commands.add_parser(
        "inspect",
        parents=[p.common, p.protocol],
        help="check a data set and summarise it",
        description="Read and validate every image, then print counts per label, group and patient, image sizes, "
        "every problem (one line per file) and stain-normalisation warnings. Writes no file.",
    )
    inspect.add_argument("data", type=Path, help="data folder (class sub-folders, manifest.csv, BACH, BreakHis) or CSV")
    inspect.add_argument("--no-stain-check", action="store_true", help="skip normalising every image")
    inspect.add_argument("--json", action="store_true", help="print the summary as JSON")
    inspect.set_defaults(run=_inspect)

    extract = commands.add_parser(
        "extract",
        parents=[p.common, p.protocol, p.features, p.store, p.engine],
        help="compute and cache CNN features",
        description="Describe every image's augmented crops with each backbone and keep them in the feature store "
        "(one file per image; interrupted runs resume; nothing already computed is recomputed).",
    )
    extract.add_argument("data", type=Path, help="data folder or CSV manifest")
    extract.add_argument(
        "--out",
        type=Path,
        help="run folder for config.json, manifest.csv, extract.json (default: runs/extract-DATE-TIME)",
    )
    extract.add_argument("--force", action="store_true", help="replace --out if it exists")
    extract.add_argument("--keep-crops", action="store_true", help="also store per-crop descriptors (float16)")
    extract.add_argument(
        "--shard",
        type=shard,
        metavar="K/N",
        help="only share K of N of the images (by content), "
        "for job arrays: N jobs with K = 1..N together extract everything once",
    )
    extract.set_defaults(run=_extract)

    cache = commands.add_parser("cache", parents=[p.common], help="list or prune the feature store")
    cache.add_argument("action", choices=["list", "prune"])
    cache.add_argument(
        "--cache-dir",
        type=storage.location,
        help="feature store (default: $HISTOBOOST_CACHE or ~/.cache/histoboost); a folder: at a URL, "
        "use the object store's own tools",
    )
    cache.add_argument("--key", action="append", default=[], help="prune: this store (repeatable)")
    cache.add_argument("--older-than", type=non_negative, metavar="DAYS", help="prune: stores unused for DAYS days")
    cache.add_argument("--all", action="store_true", help="prune: every store")
    cache.set_defaults(run=_cache)


def _inspect(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    try:
        manifest, problems = read_data(args, config)
    except DataError as err:
        if not args.json:
            raise
        print(
            json.dumps(
                {
                    "root": str(args.data),
                    "usable": False,
                    "error": str(err),
                    "problems": [str(p) for p in err.problems],
                },
                indent=2,
            )
        )
        return 1
    summary = manifest.summary()
    if not args.no_stain_check and config.preprocess.stain.method != "none":
        qcs, stain_problems = check_images(manifest.records, config.preprocess, args.threads, progress_of(args))
        problems += stain_problems
        summary["stain"] = {
            "method": config.preprocess.stain.method,
            "checked": len(manifest),
            "flagged": sum(1 for qc in qcs.values() if not qc.ok),
            "failed": sum(1 for p in stain_problems if p.severity == "error"),
        }
    summary["usable"] = True
    summary["problems"] = [str(p) for p in problems]
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        _print_summary(summary, config)
        print_problems(problems)
    return 1 if any(p.severity == "error" for p in problems) else 0


def _extract(args: argparse.Namespace) -> int:
    from ..backbones import create_backbone
    from ..features import default_cache_dir, extract_features

    config = config_from_args(args)
    device = runtime_of(args).device  # checked before any work
    run = check_output(args.out or Path("runs") / time.strftime("extract-%Y%m%d-%H%M%S"), args.force)
    manifest = load_data(args, config)
    cache_dir = args.cache_dir or default_cache_dir()
    report: dict[str, Any] = {
        "data": str(args.data),
        "images": len(manifest),
        "cache_dir": str(cache_dir),
        "shard": "/".join(map(str, args.shard)) if args.shard else None,
        "backbones": {},
    }
    failed = False
    of_shard = f" (shard {args.shard[0]}/{args.shard[1]})" if args.shard else ""
    with engine_of(args) as engine:
        report["engine"] = engine.describe()
        for name in config.features.backbones:
            backbone = create_backbone(name, config.weights_for(name), device)
            result = extract_features(
                manifest,
                config,
                backbone,
                replace(runtime_of(args, engine), cache_dir=cache_dir),
                args.keep_crops,
                args.shard,
            )
            print_problems(result.problems)
            failed |= bool(result.problems)
            rate = f" at {result.images_per_second:.2f} img/s" if result.computed else ""
            done = result.computed + result.reused + len(result.problems)
            print(
                f"{name}: {done} images{of_shard}: {result.computed} extracted{rate}, {result.reused} reused, "
                f"{len(result.problems)} failed -> {result.store.root}"
            )
            report["backbones"][name] = {
                **backbone.identity,
                "store": str(result.store.root),
                "computed": result.computed,
                "reused": result.reused,
                "failed": [str(p) for p in result.problems],
                "seconds": round(result.seconds, 2),
                "stain_flagged": sum(1 for qc in result.stain_qc.values() if not qc.ok),
            }
    provenance = {
        "backbones": {
            n: {k: b[k] for k in ("weights_sha256", "weights_source", "store")} for n, b in report["backbones"].items()
        }
    }
    with staged_folder(run, args.force) as staging:
        write_text_atomic(staging / "config.json", config.to_json(provenance))
        manifest.to_csv(staging / "manifest.csv")
        write_text_atomic(staging / "extract.json", json.dumps(report, indent=2) + "\n")
    print(f"run folder: {run}")
    return 1 if failed else 0


def _cache(args: argparse.Namespace) -> int:
    from ..features import default_cache_dir, list_stores, prune_stores

    cache_dir = args.cache_dir or default_cache_dir()
    if args.action == "list":
        stores = list_stores(cache_dir)
        if not stores:
            print(f"no feature stores under {cache_dir}")
        for s in stores:
            aug = s["settings"].get("augment", {})
            print(
                f"{s['key']}  {s['backbone']:<20} {s['images']:>6} images  {s['bytes'] / 2**20:8.1f} MiB  "
                f"A={aug.get('n_augment')} C={aug.get('n_crops')} crop={aug.get('crop_size')}  "
                f"last used {s['last_used']}"
            )
        return 0
    if not (args.key or args.older_than is not None or args.all):
        raise UsageError("cache prune needs --key KEY, --older-than DAYS or --all")
    with warnings.catch_warnings(record=True) as kept:
        warnings.simplefilter("always")
        removed = prune_stores(cache_dir, args.key, args.older_than, args.all)
    for warning in kept:
        print(f"histoboost: warning: {warning.message}", file=sys.stderr)
    print(f"removed {len(removed)} feature store(s){': ' + ', '.join(removed) if removed else ''}")
    return 0


def _print_summary(summary: dict, config: Config) -> None:
    def counts(mapping: dict) -> str:
        return ", ".join(f"{k} {v}" for k, v in mapping.items())

    print(f"data:       {summary['root']} ({summary['layout']} layout, {summary['images']} usable images)")
    print(f"per label:  {counts(summary['per_label'])}")
    print(f"per group:  {counts(summary['per_group'])}")
    if summary["patients"]:
        print(f"patients:   {summary['patients']} ({summary['images_without_patient']} images without one)")
    else:
        print("patients:   none recorded: cross-validation split by image overstates accuracy on new patients")
    print(f"sizes:      {counts(summary['sizes'])}")
    pre = config.preprocess
    target = f"target {pre.target_mpp} µm/px where stated, else " if pre.target_mpp else ""
    print(f"resolution: µm/px {counts(summary['mpp'])}; working scale: {target}{pre.scale}")
    stain = summary.get("stain")
    if stain:
        print(
            f"stain:      {stain['method']}: {stain['checked']} images normalised, {stain['flagged']} flagged, "
            f"{stain['failed']} failed"
        )
    n_err = sum(1 for p in summary["problems"] if p.startswith("error"))
    print(f"problems:   {n_err} error(s), {len(summary['problems']) - n_err} warning(s)")
