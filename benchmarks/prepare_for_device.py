"""Write a data set as it enters the CNN (scaled to the working resolution, stain-normalised) as
JPEG files with a manifest, small enough to travel to a lent GPU machine that cannot read
../shared. The GPU benchmark then runs with `--prepared` (no scaling, no stain normalisation).

Usage: python benchmarks/prepare_for_device.py ../shared/data/bach_iciar2018 .device/bach [--quality 92]
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from PIL import Image

from histoboost.config import preset
from histoboost.data import load_manifest, read_image, working_scale
from histoboost.stain import Normalizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--quality", type=int, default=92)
    args = parser.parse_args()
    config = preset("quick")
    manifest, _ = load_manifest(args.data)
    normalizer = Normalizer(config.preprocess.stain)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for record in manifest:
        rgb, _ = normalizer.normalize_with_qc(read_image(record.path, working_scale(record.mpp, config.preprocess)))
        name = f"{record.image_id[:16]}.jpg"
        Image.fromarray(rgb).save(args.out / name, quality=args.quality)
        rows.append({"path": name, "label": record.label, "id_block": record.extra.get("id_block", "")})
    with open(args.out / "manifest.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["path", "label", "id_block"])
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {len(rows)} images to {args.out}")


if __name__ == "__main__":
    main()
