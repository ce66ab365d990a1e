"""Whole-slide speed and memory: histoboost's slide path against a naive tile loop, in one run.

Slides are mosaics of the shared BACH images (written at run time, never kept: the data's licence forbids
modified copies), N x N images with a block of white glass between them, as pyramidal TIFFs from 0.42 µm/px
down to a thumbnail level, as scanners write them. By default the images are the 9 per class whose own stain
vectors are closest to the reference H&E, so the mosaic is stained like one slide; `--stains all` takes every
image, whose mixed staining fails the slide's stain fit (each tile is then fitted on its own, the fallback).
Each timed path runs in its own child process:

- slide: `predict_slide` end to end (thumbnail, tissue mask, grid, one stain fit per slide, tiles read from
  the pyramid level nearest the bundle's working µm/px by background threads, batched forwards, every
  output file written), with an empty tile cache;
- naive: the same tiles and the same stain fit, each tile read with `read_region` at level 0, resized with
  Lanczos, normalised and classified with one forward of its own, no threads; only the loop is timed
  (the grid and stain fit are made before the clock starts).

Peak RSS (ru_maxrss) of the slide path is measured on the N x N slide and on one twice as wide (4x the
tiles and pixels): memory must not grow with the slide. The bundle: the `accurate` recipe (EfficientNet-Lite0
with its offline ImageNet weights, 1.68 µm/px, logistic regression) with 2 augmentations per training image
for time (the map scores one un-augmented view per tile, so this does not change its speed), trained on
the 144 shared images. Timings on this machine: docs/performance.md.

Usage: python benchmarks/slide_bench.py [--grid 8] [--data ../shared/data/bach_iciar2018]
           [--out benchmarks/results/DATE-slides-MACHINE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "bach_iciar2018"
GROUPS = ("Normal", "Benign", "InSitu", "Invasive")


def consistent_stains(data: Path, per_class: int = 9) -> dict[str, list[Path]]:
    """Per class, the `per_class` images whose own Macenko stain vectors lie closest to the reference H&E: a
    slide is stained in one batch, so its one stain fit holds; a mosaic of every image mixes staining batches
    and its slide fit fails the quality check (then each tile is fitted on its own: `--stains all`)."""
    import numpy as np
    from PIL import Image

    from histoboost.config import Config
    from histoboost.stain import Normalizer, StainError, fit_macenko, macenko_normalize, quality_check

    normaliser = Normalizer(Config().preprocess.stain)
    chosen = {}
    for group in GROUPS:
        angles = []
        for path in sorted((data / group).glob("*.jpeg")):
            with Image.open(path) as image:
                rgb = np.asarray(image.convert("RGB").reduce(4))
            try:
                fit = fit_macenko(rgb)
            except StainError:
                continue
            qc = quality_check(
                rgb, macenko_normalize(rgb, normaliser.he_ref, normaliser.max_c_ref, fit), fit, normaliser.he_ref
            )
            angles.append((qc.he_angle, path))
        chosen[group] = [path for _, path in sorted(angles)[:per_class]]
    return chosen


def mosaic_images(pool: dict[str, list[Path]], side: int) -> list[list[Path]]:
    """`side` x `side` images, classes in turn along each row, each class's images reused cyclically."""
    return [
        [pool[GROUPS[(r + c) % 4]][(r * side + c) // 4 % len(pool[GROUPS[(r + c) % 4]])] for c in range(side)]
        for r in range(side)
    ]


def train(data: Path, folder: Path) -> Path:
    from histoboost.config import preset
    from histoboost.data import load_manifest
    from histoboost.runtime import Runtime
    from histoboost.training import train_bundle

    manifest, _ = load_manifest(data)
    config = preset("accurate").merged({"augment.n_augment": 2})
    bundle = train_bundle(manifest, config, Runtime(cache_dir=folder / "cache"), image_mpp=0.42)
    bundle.save(folder / "model")
    return folder / "model"


def child(kind: str, model: Path, slide_path: Path, work: Path) -> dict:
    """One measured path in this process: tiles, seconds and peak RSS."""
    from histoboost.bundle import Bundle
    from histoboost.runtime import Runtime
    from histoboost.slides import SlideSettings, predict_slide

    predictor = Bundle.load(model, Runtime(cache_dir=work / "cache")).predictor
    settings = SlideSettings(confirm_top=0)
    if kind == "slide":
        started = time.perf_counter()
        result = predict_slide(predictor, slide_path, work / "out", settings)
        seconds, tiles, stain = time.perf_counter() - started, len(result.grid), result.summary["stain"]
    else:
        measure = naive if kind == "naive" else scoring
        seconds, tiles, stain = measure(predictor, *tiles_of(predictor, slide_path, settings))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "path": kind,
        "tiles": tiles,
        "seconds": round(seconds, 2),
        "tiles_per_second": round(tiles / seconds, 3),
        "peak_rss_mib": round(peak, 1),
        "stain": stain,
    }


def tiles_of(predictor, slide_path: Path, settings):
    """The open slide, its kept tiles and their geometry, as `predict_slide` makes them (not timed)."""
    from histoboost.slides.reader import open_slide
    from histoboost.slides.run import slide_geometry, tissue_tiles

    slide = open_slide(slide_path)
    geometry = slide_geometry(predictor, settings)
    return slide, tissue_tiles(slide, geometry, settings).kept, geometry


def scoring(predictor, slide, grid, geometry) -> tuple[float, int, str]:
    """histoboost's tile scoring alone (`score_tiles`: its stain fit, threaded reads, batched forwards)."""
    from histoboost.slides.score import score_tiles

    started = time.perf_counter()
    scores = score_tiles(predictor, slide, grid, geometry)
    return time.perf_counter() - started, len(grid), scores.stain


def naive(predictor, slide, grid, geometry) -> tuple[float, int, str]:
    """The straightforward loop over the same tiles with the same stain fit (made before the clock starts; the
    same Predictor, one tile per forward pass, so that only reading, threading and batching differ)."""
    import numpy as np
    from PIL import Image

    from histoboost.runtime import Runtime
    from histoboost.slides.reader import _on_white
    from histoboost.slides.score import slide_normaliser, tile_key

    one_at_a_time = predictor.using(Runtime(batch_size=1))
    normalise, stain, _ = slide_normaliser(slide, grid, geometry, predictor.config.preprocess.stain, "slide")
    size = geometry.tile_size()
    started = time.perf_counter()
    for box in grid.boxes:
        x0, y0, x1, y1 = (int(v) for v in box)
        region = _on_white(slide.handle.read_region((x0, y0), 0, (x1 - x0, y1 - y0)))
        rgb, _ = normalise(np.asarray(region.resize((size, size), Image.Resampling.LANCZOS)))
        one_at_a_time.score_tiles([rgb], [tile_key(slide, box)], 0)
    return time.perf_counter() - started, len(grid), stain


def run_child(kind: str, model: Path, slide_path: Path, work: Path) -> dict:
    proc = subprocess.run(
        [
            sys.executable,
            __file__,
            "--child",
            kind,
            "--model",
            str(model),
            "--slide",
            str(slide_path),
            "--work",
            str(work),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode:
        raise SystemExit(f"{kind} on {slide_path.name} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grid", type=int, default=8, help="images per side of the smaller mosaic (at least 8)")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--out", type=Path)
    parser.add_argument(
        "--stains",
        choices=("consistent", "all"),
        default="consistent",
        help="mosaic of the images with consistent staining (default), or of all images",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        help="keep the bundle and mosaics here and reuse them on a rerun (default: a temporary folder, removed)",
    )
    parser.add_argument("--child", choices=("slide", "score", "naive"), help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--slide", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.model, args.slide, args.work)))
        return
    sys.path.insert(0, str(ROOT / "tests"))
    from mosaic import write_mosaic

    with tempfile.TemporaryDirectory(prefix="slide-bench-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if not (work / "model").exists():
            started = time.perf_counter()
            train(args.data, work)
            print(f"bundle trained in {time.perf_counter() - started:.0f} s", file=sys.stderr)
        slides = {}
        pool = (
            consistent_stains(args.data)
            if args.stains == "consistent"
            else {g: sorted((args.data / g).glob("*.jpeg")) for g in GROUPS}
        )
        for side in (args.grid, 2 * args.grid):
            path = work / f"mosaic-{args.stains}-{side}x{side}.tiff"
            if not path.exists():
                write_mosaic(path, mosaic_images(pool, side))
            slides[f"{side}x{side}"] = {
                "images": side * side,
                "pixels": list(_size(path)),
                "file_mib": round(path.stat().st_size / 2**20),
            }
        runs = []
        for kind, side in (("naive", args.grid), ("score", args.grid), ("slide", args.grid), ("slide", 2 * args.grid)):
            row = {
                "slide": f"{side}x{side}",
                **run_child(
                    kind,
                    work / "model",
                    work / f"mosaic-{args.stains}-{side}x{side}.tiff",
                    Path(tempfile.mkdtemp(dir=tmp)),
                ),
            }
            print(json.dumps(row), file=sys.stderr)
            runs.append(row)
    naive_row, scored, small, large = runs
    result = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "bundle": "accurate recipe (efficientnet_lite0 offline ImageNet weights, 1.68 µm/px), 2 augmentations, "
        "144 shared BACH images",
        "stains": args.stains,
        "slides": slides,
        "runs": runs,
        "speedup_scoring": round(scored["tiles_per_second"] / naive_row["tiles_per_second"], 2),
        "speedup_end_to_end": round(small["tiles_per_second"] / naive_row["tiles_per_second"], 2),
        "peak_rss_growth": round(large["peak_rss_mib"] / small["peak_rss_mib"], 3),
    }
    text = json.dumps(result, indent=2, ensure_ascii=False)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


def _size(path: Path) -> tuple[int, int]:
    import openslide

    with openslide.OpenSlide(str(path)) as slide:
        return slide.dimensions


if __name__ == "__main__":
    main()
