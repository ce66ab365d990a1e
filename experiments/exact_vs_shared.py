"""Exact (CNN per crop) vs shared (one CNN pass per augmented image + region-of-interest pooling):
feature agreement and speed on real images, same plans, same machine, one run.

Usage: python experiments/exact_vs_shared.py ../shared/data/bach_iciar2018 --per-class 6 \
           --out experiments/results/exact_vs_shared.json
"""

import argparse
import json
import platform
import time

import numpy as np
import torch

from histoboost.augment import plan_augmentations
from histoboost.backbones import create_backbone
from histoboost.config import preset
from histoboost.data import load_manifest, read_record
from histoboost.features import describe_image
from histoboost.stain import Normalizer


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("data")
    parser.add_argument("--preset", default="quick")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--per-class", type=int, default=6)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    config = preset(args.preset)
    manifest, _ = load_manifest(args.data)
    picked = [
        r
        for label in sorted({r.label for r in manifest})
        for r in [r for r in manifest if r.label == label][: args.per_class]
    ]
    backbone = create_backbone(args.backbone)
    normalizer = Normalizer(config.preprocess.stain)
    seconds = {"shared": 0.0, "exact": 0.0}
    crop_cos, pooled_cos, whole_cos = [], [], []
    for record in picked:
        rgb = normalizer(read_record(record, config.preprocess))
        plans = plan_augmentations(record.image_id, *rgb.shape[:2], config.augment, config.seed)
        out = {}
        for mode in ("shared", "exact"):
            start = time.perf_counter()
            out[mode] = describe_image(rgb, plans, backbone, config.merged({"features.mode": mode}), keep_crops=True)
            seconds[mode] += time.perf_counter() - start
        crop_cos.append(cosine(out["shared"].crops, out["exact"].crops).mean())
        pooled_cos.append(cosine(out["shared"].pooled, out["exact"].pooled).mean())
        whole_cos.append(cosine(out["shared"].whole, out["exact"].whole).mean())
        print(f"{record.name}: crop cosine {crop_cos[-1]:.3f}, pooled {pooled_cos[-1]:.3f}")
    n = len(picked)
    result = {
        "machine": {
            "cpu_count": torch.get_num_threads(),
            "platform": platform.platform(),
            "processor": platform.processor(),
        },
        "data": args.data,
        "images": n,
        "backbone": args.backbone,
        "preset": args.preset,
        "geometry": {
            "scale": config.preprocess.scale,
            "A": config.augment.n_augment,
            "C": config.augment.n_crops,
            "crop": config.augment.crop_size,
        },
        "crop_cosine_mean": float(np.mean(crop_cos)),
        "pooled_cosine_mean": float(np.mean(pooled_cos)),
        "pooled_cosine_min": float(np.min(pooled_cos)),
        "whole_cosine_mean": float(np.mean(whole_cos)),
        "images_per_second": {m: n / s for m, s in seconds.items()},
        "crops_per_second": {m: n * config.augment.n_augment * config.augment.n_crops / s for m, s in seconds.items()},
        "note": "CNN time only (decode and stain normalisation excluded); fp32, channels-last, batch 8",
    }
    with open(args.out, "w") as handle:
        json.dump(result, handle, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
