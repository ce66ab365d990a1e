"""The `slide` command: score whole-slide images with a bundle (tiles.csv, heat maps, QuPath GeoJSON,
summary, report per slide; slides.csv for the call), and `qupath-script`: the same from inside QuPath."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from .. import storage
from ..slides.reader import MAX_PIXELS
from .options import (
    Parents,
    UsageError,
    bundle_weights,
    count,
    engine_of,
    positive,
    runtime_of,
    shard,
    share,
)


def add_commands(commands, p: Parents) -> None:
    slide = commands.add_parser(
        "slide",
        parents=[p.common, p.trust, p.engine],
        help="score whole-slide images (SVS, NDPI, MRXS, TIFF, ...) with a bundle",
        description="Find the tissue, tile it at the bundle's training field of view and µm/px, score every tile with "
        "the bundle's own features and decision rule, and write OUT/<slide>/ (tiles.csv, heatmap.png, heatmap.npz, "
        "mask.png, <slide>.geojson.gz for QuPath, summary.json, report.html) and OUT/slides.csv. A slide that fails "
        "is reported in one line and the others are still scored (exit status 1). Research use only.",
    )
    slide.add_argument("model", type=Path, metavar="MODEL", help="bundle folder or .zip from histoboost train")
    slide.add_argument("slides", type=Path, nargs="+", metavar="SLIDE_OR_DIR")
    slide.add_argument(
        "--out", type=Path, required=True, metavar="DIR", help="output folder (one sub-folder per slide)"
    )
    group = slide.add_argument_group("geometry")
    group.add_argument("--mpp", type=positive, help="the slides' µm/px, for files that state none (never guessed)")
    group.add_argument(
        "--train-mpp",
        type=positive,
        help="µm/px of the bundle's training images, for bundles that do not record it (default 0.42, BACH's)",
    )
    group.add_argument("--tile-um", type=positive, help="tile side in µm (default: the training images' field of view)")
    group.add_argument(
        "--stride-um",
        type=positive,
        help="distance between tiles in µm (default: the tile side; smaller gives a finer, overlapping grid)",
    )
    group.add_argument(
        "--min-tissue", type=share, default=0.5, help="score a tile when this share is tissue (default 0.5)"
    )
    group.add_argument(
        "--tissue-mask",
        type=Path,
        metavar="PNG",
        help="a tissue mask image (non-zero = tissue) "
        "covering the whole slide, instead of the automatic one (one slide only)",
    )
    group.add_argument(
        "--roi",
        type=Path,
        metavar="GEOJSON",
        help="only tissue inside these polygons (a QuPath annotation export; one slide only)",
    )
    group.add_argument(
        "--max-pixels",
        type=positive,
        default=MAX_PIXELS,
        metavar="N",
        help="refuse, from its header, a slide of more full-resolution pixels (default 2e10: 200,000 x "
        "100,000); a slide without a pyramid must also fit a thumbnail (docs/slides.md)",
    )
    group.add_argument(
        "--features",
        choices=["h5"],
        help="also write each tile's features (the classifier's rows of the map's view) as <slide>.h5 in TRIDENT's "
        "and CLAM's layout (features, coords, patch_size_level0), for slide-level models",
    )
    group = slide.add_argument_group("scoring")
    group.add_argument(
        "--slide-augmentations",
        type=count(0, 1000),
        default=0,
        metavar="A",
        help="augmented views per tile for the map (default 0: one un-augmented view)",
    )
    group.add_argument(
        "--confirm-top",
        type=count(0),
        default=20,
        metavar="K",
        help="re-score the K tiles most likely carcinoma with the bundle's full augmentation vote (default 20)",
    )
    group.add_argument(
        "--stain-fit",
        choices=["slide", "tile"],
        default="slide",
        help="fit the stain normalisation once per slide (default) or per tile, as predict does per image",
    )
    group.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    group.add_argument("--batch-size", type=count(1), help="tiles per network batch (default: 8 on CPU, 48 on CUDA)")
    group.add_argument("--readers", type=count(1, 64), default=2, help="tile-reading threads (default 2)")
    group.add_argument(
        "--shard",
        type=shard,
        metavar="K/N",
        help="only share K of N of the slides (by file name), for job arrays; writes OUT/slides-K-of-N.csv",
    )
    group.add_argument(
        "--cache-dir",
        type=storage.location,
        help="where finished tiles are kept so an interrupted slide resumes "
        "(default: $HISTOBOOST_CACHE or ~/.cache/histoboost)",
    )
    slide.set_defaults(run=_slide)

    script = commands.add_parser(
        "qupath-script",
        parents=[p.common],
        help="write a QuPath script that scores the open slide with a bundle",
        description="Write a Groovy script for QuPath 0.5 and 0.6 (Automate > Script editor) that runs `histoboost "
        "slide` on the image open in QuPath (inside the selected annotation, if any) with this bundle, checked by its "
        "sha256, and imports the tiles (p_<class> measurements for Measurement Maps) and carcinoma regions. It names "
        "only this bundle and this histoboost. docs/slides.md.",
    )
    script.add_argument("model", type=Path, metavar="MODEL", help="bundle folder or .zip from histoboost train")
    script.add_argument("--out", type=Path, metavar="FILE", help="write the script here (default: print it)")
    script.add_argument(
        "--slide-option",
        action="append",
        default=[],
        metavar="FLAG",
        help="a flag the script passes to histoboost slide, repeatable, e.g. --slide-option=--min-tissue=0.3",
    )
    script.set_defaults(run=_qupath_script)


def _slide(args: argparse.Namespace) -> int:
    from ..bundle import Bundle
    from ..slides import SlideSettings
    from ..slides.run import check_slides_out, find_slides, slide_geometry, table_name

    missing = [str(p) for p in args.slides if not p.exists()]
    if missing:
        raise UsageError(f"{missing[0]}: no such slide or folder")
    slides = find_slides(args.slides)
    if not slides:
        raise UsageError(f"no slide files in {', '.join(map(str, args.slides))}")
    if (args.tissue_mask or args.roi) and len(slides) > 1:
        raise UsageError("--tissue-mask and --roi describe one slide: give one slide with them")
    for name, path in (("--tissue-mask", args.tissue_mask), ("--roi", args.roi)):
        if path is not None and not path.is_file():
            raise UsageError(f"{name} {path}: no such file")
    if args.cache_dir is not None:
        storage.local_folder(args.cache_dir, "slide tile caches")
    if args.features and args.slide_augmentations:
        raise UsageError("--features keeps the map's single view: drop --slide-augmentations")
    check_slides_out(args.out, args.shard)  # before any work
    bundle = Bundle.load(args.model, runtime_of(args), args.expect_sha256, args.trusted_key, bundle_weights(args))
    settings = SlideSettings(
        args.mpp,
        args.train_mpp,
        args.tile_um,
        args.stride_um,
        args.min_tissue,
        args.slide_augmentations,
        args.confirm_top,
        args.stain_fit,
        str(args.tissue_mask) if args.tissue_mask else None,
        str(args.roi) if args.roi else None,
        args.max_pixels,
        args.features == "h5",
    )

    def report(row: dict) -> None:
        if row["status"] == "ok":
            refer = f"; refer: {row['refer']}" if row["refer"] else ""
            print(
                f"{row['slide']}: {row['call']} ({row['carcinoma_regions']} carcinoma region(s), tissue "
                f"{row['tissue_mm2']} mm²{refer}) -> {row['out']}"
            )
        else:
            print(f"histoboost: error: {row['error']}", file=sys.stderr)  # the message names the slide

    for note in slide_geometry(bundle.predictor, settings).notes:
        print(f"histoboost: warning: {note}", file=sys.stderr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the notes above, said once rather than per slide
        with engine_of(args) as engine:
            bundle.predictor = bundle.predictor.using(runtime_of(args, engine))
            rows = bundle.predict_slides(slides, args.out, settings, on_result=report, shard=args.shard)
    print(
        f"{sum(r['status'] == 'ok' for r in rows)} of {len(rows)} slide(s) scored -> "
        f"{args.out / table_name(args.shard)} (research use only)"
    )
    return 1 if any(r["status"] != "ok" for r in rows) else 0


def _qupath_script(args: argparse.Namespace) -> int:
    from ..container import META_FILE, identity, read_members
    from ..slides.qupath import qupath_script
    from ..storage import write_text_atomic

    model = args.model.absolute()
    if not model.exists():
        raise UsageError(f"{args.model}: no such bundle")
    sha256 = identity(read_members(model, [META_FILE])[META_FILE])  # a file that is no bundle is refused here
    text = qupath_script([sys.executable, "-m", "histoboost.cli"], str(model), sha256, args.slide_option)
    if args.out is None:
        print(text, end="")
        return 0
    write_text_atomic(args.out, text)
    print(f"QuPath script for bundle {sha256[:12]}…: {args.out} (QuPath: Automate > Script editor > File > Open)")
    return 0
