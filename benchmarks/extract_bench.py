"""Feature-extraction speed: the naive per-crop pipeline against histoboost's shared path, in one run.

Naive (a straightforward implementation, run in a child process with glibc's default allocator
settings): numpy colour augmentation on the CPU, then one fp32 NCHW forward per 750x750 crop.
histoboost: the image augmented as a tensor batch, one channels-last forward per augmented
768x1024 image, region-of-interest pooling of each crop's window (`features.describe_image`).
Both at the seed study's geometry (768x1024 working image, C = 20 crops of 750 px) with fewer
augmentations for time. Weights do not matter for timing: timm models are built without downloads.

Usage: python benchmarks/extract_bench.py [--augmentations 2] [--out benchmarks/results/DATE-MACHINE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

BACKBONES = {"resnet50": "resnet50", "legacy_xception": "legacy_xception", "efficientnet_lite0": "efficientnet_lite0"}
HEIGHT, WIDTH, CROP = 768, 1024, 750
ALLOCATOR_ENV = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_")


def build(name: str) -> torch.nn.Module:
    """The network with the weights histoboost uses where they are offline, else random (timing only)."""
    import timm

    if name == "efficientnet_lite0":
        from histoboost.backbones import create_backbone

        return create_backbone(name).model
    return timm.create_model(name, pretrained=False).eval()


def forward_flops(model: torch.nn.Module, height: int, width: int) -> float:
    """Floating-point operations of one forward_features pass (2 per multiply-add), counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model.forward_features(torch.zeros(1, 3, height, width))
    return float(counter.get_total_flops())


def naive_worker(name: str, n_augment: int, n_crops: int, seed: int) -> dict:
    """Per-crop fp32 NCHW forward after numpy augmentation; run in a child process."""
    model = build(name).to(memory_format=torch.contiguous_format)
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    mean, std = np.float32(0.5), np.float32(0.5)
    with torch.inference_mode():
        model.forward_features(torch.zeros(1, 3, CROP, CROP))  # warm-up
        start = time.perf_counter()
        for _ in range(n_augment):
            alpha, beta = rng.uniform(0.9, 1.1, 3), rng.uniform(-13, 13, 3)
            augmented = np.clip(image * alpha + beta, 0, 255).astype(np.uint8)
            for _ in range(n_crops):
                y, x = rng.integers(0, HEIGHT - CROP + 1), rng.integers(0, WIDTH - CROP + 1)
                crop = (augmented[y:y + CROP, x:x + CROP].astype(np.float32) / 255 - mean) / std
                model.forward_features(torch.from_numpy(crop.transpose(2, 0, 1).copy())[None]).mean(dim=(2, 3))
        seconds = time.perf_counter() - start
    return {"crops": n_augment * n_crops, "seconds": seconds}


def fast_path(name: str, n_augment: int, n_crops: int, seed: int) -> dict:
    from histoboost.augment import plan_augmentations
    from histoboost.backbones import Backbone
    from histoboost.config import preset
    from histoboost.features import describe_image

    config = preset("paper").merged({"augment.n_augment": n_augment, "augment.n_crops": n_crops,
                                     "augment.crop_size": CROP, "seed": seed})
    model = build(name).to(memory_format=torch.channels_last)
    backbone = Backbone(name, name, model, torch.full((1, 3, 1, 1), 0.5), torch.full((1, 3, 1, 1), 0.5),
                        model.num_features, 32, "", "benchmark")
    image = np.random.default_rng(seed).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    plans = plan_augmentations("0" * 64, HEIGHT, WIDTH, config.augment, seed)
    describe_image(image, plans[:1], backbone, config)  # warm-up
    start = time.perf_counter()
    describe_image(image, plans, backbone, config)
    return {"crops": n_augment * n_crops, "seconds": time.perf_counter() - start}


def gemm_gflops(size: int = 2048, repeats: int = 10) -> float:
    """Measured fp32 matrix-multiply throughput: the practical peak this CPU reaches."""
    a, b = torch.rand(size, size), torch.rand(size, size)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size ** 3 * repeats / (time.perf_counter() - start) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--augmentations", type=int, default=2)
    parser.add_argument("--crops", type=int, default=20)
    parser.add_argument("--backbones", nargs="+", default=list(BACKBONES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--naive-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.naive_worker:
        print(json.dumps(naive_worker(args.naive_worker, args.augmentations, args.crops, args.seed)))
        return
    default_env = {k: v for k, v in os.environ.items() if k not in ALLOCATOR_ENV}
    results = {"machine": {"platform": platform.platform(), "processor": _cpu_name(), "threads": torch.get_num_threads(),
                           "torch": torch.__version__, "allocator_env_fast_path": {k: os.environ.get(k) for k in ALLOCATOR_ENV}},
               "geometry": {"image": [HEIGHT, WIDTH], "crop": CROP, "augmentations": args.augmentations,
                            "crops_per_augmentation": args.crops},
               "gemm_fp32_gflops_measured": round(gemm_gflops(), 1), "backbones": {}}
    for name in args.backbones:
        child = subprocess.run([sys.executable, __file__, "--naive-worker", name, "--augmentations",
                                str(args.augmentations), "--crops", str(args.crops), "--seed", str(args.seed)],
                               capture_output=True, text=True, env=default_env, check=True)
        naive = json.loads(child.stdout.strip().splitlines()[-1])
        fast = fast_path(name, args.augmentations, args.crops, args.seed)
        model = build(name)
        crop_flops, image_flops = forward_flops(model, CROP, CROP), forward_flops(model, HEIGHT, WIDTH)
        row = {
            "naive_crops_per_s": naive["crops"] / naive["seconds"],
            "fast_crops_per_s": fast["crops"] / fast["seconds"],
            "naive_gflops_achieved": crop_flops * naive["crops"] / naive["seconds"] / 1e9,
            "fast_gflops_achieved": image_flops * args.augmentations / fast["seconds"] / 1e9,
            "gflop_per_crop": crop_flops / 1e9, "gflop_per_image": image_flops / 1e9,
        }
        row["speedup"] = row["fast_crops_per_s"] / row["naive_crops_per_s"]
        results["backbones"][name] = {k: round(v, 3) for k, v in row.items()}
        print(f"{name:<20} naive {row['naive_crops_per_s']:7.2f} crops/s   fast {row['fast_crops_per_s']:7.2f} crops/s"
              f"   x{row['speedup']:.1f}   fast {row['fast_gflops_achieved']:.0f} GFLOP/s "
              f"(fp32 GEMM here: {results['gemm_fp32_gflops_measured']:.0f})", flush=True)
    out = args.out or Path(__file__).parent / "results" / f"{time.strftime('%Y-%m-%d')}-{platform.node() or 'machine'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()
