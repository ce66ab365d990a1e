"""Feature-extraction speed: the naive per-crop pipeline against histoboost's shared path, in one run.

Every timed path runs in its own child process, started without the allocator variables, so the
paths differ only in what they do:

- naive: a straightforward implementation: numpy colour augmentation on the CPU, then one fp32 NCHW
  forward per 750x750 crop, glibc's default allocator.
- fast, default allocator: histoboost's path (`features.describe_image`: the image augmented as a
  tensor batch on the device, one channels-last forward per augmented 768x1024 image, each crop's
  window pooled from the feature map), with glibc's defaults left alone.
- fast: the same after `backbones.keep_freed_memory()`, which `create_backbone` calls: what users get.
- fast bf16: the same under bf16 autocast, where the device has bf16 arithmetic (AVX-512 BF16 or AMX
  on a CPU; CUDA).

Geometry of the seed study (768x1024 working image, C = 20 crops of 750 px), fewer augmentations for
time (crops/s does not depend on A). Weights do not matter for timing: timm models are built without
downloads; EfficientNet-Lite0 uses its offline ImageNet weights. `--accuracy DATA` adds, with the
offline backbone on real images, the feature cosine and cross-validated accuracy of the exact and fast
paths (and of bf16 where supported).

Usage: python benchmarks/extract_bench.py [--device cpu|cuda] [--augmentations 2]
           [--accuracy ../shared/data/bach_iciar2018] [--out benchmarks/results/DATE-MACHINE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

BACKBONES = ("resnet50", "legacy_xception", "efficientnet_lite0")
HEIGHT, WIDTH, CROP = 768, 1024, 750
ALLOCATOR_ENV = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_")
SEED_PROTOCOL = {"images": 328, "augmentations": 40, "crops": 20, "folds": 6}
MIN_SECONDS = 5.0


def build(name: str, device: str) -> torch.nn.Module:
    """The network with the weights histoboost uses where they are offline, else random (timing only)."""
    import timm

    if name == "efficientnet_lite0":
        # The offline weights, loaded without create_backbone, which would also tune the allocator.
        from histoboost.backbones import _package_weights, load_weights, read_weights
        from histoboost.specs import REGISTRY

        spec = REGISTRY[name]
        model = timm.create_model(spec.architecture, pretrained=False)
        load_weights(model, read_weights(_package_weights(spec)).state, name)
        return model.eval().to(device)
    return timm.create_model(name, pretrained=False).eval().to(device)


def forward_flops(model: torch.nn.Module, height: int, width: int) -> float:
    """Floating-point operations of one forward_features pass (2 per multiply-add), counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    device = next(model.parameters()).device
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model.forward_features(torch.zeros(1, 3, height, width, device=device))
    return float(counter.get_total_flops())


def bf16_supported(device: str) -> bool:
    """Whether the device does bf16 arithmetic in hardware (else autocast emulates it, slowly)."""
    if device.startswith("cuda"):
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def naive_worker(name: str, n_augment: int, n_crops: int, seed: int, device: str) -> dict:
    """Per-crop fp32 NCHW forward after numpy augmentation."""
    model = build(name, device).to(memory_format=torch.contiguous_format)
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    mean, std = np.float32(0.5), np.float32(0.5)
    with torch.inference_mode():
        for _ in range(2):  # warm-up (cuDNN picks its algorithms on the first calls)
            model.forward_features(torch.zeros(1, 3, CROP, CROP, device=device))
        _sync(device)
        start = time.perf_counter()
        for _ in range(n_augment):
            alpha, beta = rng.uniform(0.9, 1.1, 3), rng.uniform(-13, 13, 3)
            augmented = np.clip(image * alpha + beta, 0, 255).astype(np.uint8)
            for _ in range(n_crops):
                y, x = rng.integers(0, HEIGHT - CROP + 1), rng.integers(0, WIDTH - CROP + 1)
                crop = (augmented[y : y + CROP, x : x + CROP].astype(np.float32) / 255 - mean) / std
                tensor = torch.from_numpy(crop.transpose(2, 0, 1).copy())[None].to(device)
                model.forward_features(tensor).mean(dim=(2, 3)).cpu()
        seconds = time.perf_counter() - start
    return {"crops": n_augment * n_crops, "seconds": seconds}


def fast_worker(name: str, n_augment: int, n_crops: int, seed: int, device: str, dtype: str, tune: bool) -> dict:
    """histoboost's shared path on one synthetic image; `tune` = keep_freed_memory() first."""
    from histoboost.augment import plan_augmentations
    from histoboost.backbones import Backbone, keep_freed_memory
    from histoboost.config import preset
    from histoboost.features import describe_image

    allocator = keep_freed_memory() if tune else "glibc defaults"
    config = preset("paper").merged(
        {
            "augment.n_augment": n_augment,
            "augment.n_crops": n_crops,
            "augment.crop_size": CROP,
            "features.dtype": dtype,
            "seed": seed,
        }
    )
    model = build(name, device).to(memory_format=torch.channels_last)
    half = torch.full((1, 3, 1, 1), 0.5, device=device)
    backbone = Backbone(name, name, model, half, half, model.num_features, 32, "", "benchmark")
    image = np.random.default_rng(seed).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    plans = plan_augmentations("0" * 64, HEIGHT, WIDTH, config.augment, seed)
    batch = 8 if device == "cpu" else 40
    for _ in range(2):  # warm-up
        describe_image(image, plans[:batch], backbone, config, device, batch)
    start, repeats = time.perf_counter(), 0
    while repeats == 0 or time.perf_counter() - start < MIN_SECONDS:  # long enough to time a fast network
        describe_image(image, plans, backbone, config, device, batch)
        repeats += 1
    return {"crops": repeats * n_augment * n_crops, "seconds": time.perf_counter() - start, "allocator": allocator}


def run_child(args: argparse.Namespace, path: str, name: str, dtype: str = "float32", tune: bool = True) -> dict:
    """One timed path in a fresh process without the allocator variables."""
    env = {k: v for k, v in os.environ.items() if k not in ALLOCATOR_ENV}
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        path,
        "--backbones",
        name,
        "--augmentations",
        str(args.augmentations),
        "--crops",
        str(args.crops),
        "--seed",
        str(args.seed),
        "--device",
        args.device,
        "--dtype",
        dtype,
    ] + ([] if tune else ["--no-tune"])
    child = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if child.returncode:
        raise SystemExit(f"{path} {name} failed:\n{child.stderr[-3000:]}")
    return json.loads(child.stdout.strip().splitlines()[-1])


def gemm_gflops(device: str, dtype: torch.dtype = torch.float32, size: int = 2048, repeats: int = 10) -> float:
    """Measured matrix-multiply throughput: the practical peak this device reaches."""
    if device.startswith("cuda"):
        size, repeats = 8192, 20
    a, b = torch.rand(size, size, device=device, dtype=dtype), torch.rand(size, size, device=device, dtype=dtype)
    a @ b
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync(device)
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


def speed(args: argparse.Namespace, results: dict) -> None:
    """Crops/s of each path per backbone, achieved GFLOP/s, and the seed protocol's projected time."""
    cuda = args.device.startswith("cuda")
    bf16 = bf16_supported(args.device)
    results["bf16_hardware"] = bf16
    for name in args.backbones:
        rows = {"naive": run_child(args, "naive", name)}
        if not cuda:
            rows["fast_default_allocator"] = run_child(args, "fast", name, tune=False)
        rows["fast"] = run_child(args, "fast", name)
        if bf16:
            rows["fast_bf16"] = run_child(args, "fast", name, dtype="bfloat16")
        model = build(name, args.device)
        crop_flops, image_flops = forward_flops(model, CROP, CROP), forward_flops(model, HEIGHT, WIDTH)
        out: dict = {"gflop_per_crop": round(crop_flops / 1e9, 2), "gflop_per_image": round(image_flops / 1e9, 2)}
        for path, r in rows.items():
            # FLOPs per crop: one crop's forward (naive), or a share of one forward of the whole image (fast)
            per_crop = crop_flops if path == "naive" else image_flops / args.crops
            out[f"{path}_crops_per_s"] = round(r["crops"] / r["seconds"], 2)
            out[f"{path}_gflops_achieved"] = round(per_crop * r["crops"] / r["seconds"] / 1e9, 1)
        best = max((p for p in rows if p != "naive"), key=lambda p: out[f"{p}_crops_per_s"])
        out["speedup_fast_vs_naive"] = round(out["fast_crops_per_s"] / out["naive_crops_per_s"], 1)
        out["speedup_best_vs_naive"] = round(out[f"{best}_crops_per_s"] / out["naive_crops_per_s"], 1)
        if not cuda:
            out["allocator_gain"] = round(out["fast_crops_per_s"] / out["fast_default_allocator_crops_per_s"], 2)
        seed = SEED_PROTOCOL
        crops = seed["images"] * seed["augmentations"] * seed["crops"]
        out["best_path"] = best
        out["seed_protocol_extraction_minutes"] = round(crops / out[f"{best}_crops_per_s"] / 60, 1)
        out["seed_protocol_naive_extraction_hours"] = round(crops / out["naive_crops_per_s"] / 3600, 1)
        results["backbones"][name] = out
        print(
            f"{name:<18} naive {out['naive_crops_per_s']:7.2f}  fast {out['fast_crops_per_s']:7.2f} crops/s"
            f"  x{out['speedup_fast_vs_naive']:<5} best={best} {out[f'{best}_gflops_achieved']:.0f} GFLOP/s  "
            f"seed protocol extraction {out['seed_protocol_extraction_minutes']} min",
            flush=True,
        )


def classifier_cost(args: argparse.Namespace, results: dict) -> None:
    """XGBoost's time per boosting round at the seed protocol's size (rows = 328 x 40 augmented
    images, D = 2048 ResNet50 features), on random features: the histogram work per round depends on
    rows, columns and bins, not on the values. Projected with the settings of the paper preset."""
    import xgboost as xgb

    from histoboost.classifier import BoostedTrees
    from histoboost.config import preset

    config = preset("paper").classifier
    rng = np.random.default_rng(args.seed)
    n = (
        SEED_PROTOCOL["images"]
        * SEED_PROTOCOL["augmentations"]
        * (SEED_PROTOCOL["folds"] - 1)
        // SEED_PROTOCOL["folds"]
    )
    X = rng.standard_normal((n, 2048), dtype=np.float32)
    y = rng.integers(0, 3, n)
    rounds = 20
    params = BoostedTrees(config, device="cuda" if args.device.startswith("cuda") else "cpu").params()
    start = time.perf_counter()
    data = xgb.QuantileDMatrix(X, y, max_bin=config.max_bin)
    build_s = time.perf_counter() - start
    start = time.perf_counter()
    xgb.train(params, data, rounds)
    per_round = (time.perf_counter() - start) / rounds
    total = SEED_PROTOCOL["folds"] * (build_s + per_round * config.n_estimators)
    results["classifier"] = {
        "rows_per_fold": n,
        "features": 2048,
        "threads": os.cpu_count(),
        "seconds_per_round": round(per_round, 3),
        "matrix_seconds": round(build_s, 2),
        "rounds": config.n_estimators,
        "seed_protocol_cv_minutes": round(total / 60, 1),
    }
    print(
        f"classifier: {per_round:.3f} s/round on {n} x 2048; 6-fold CV at {config.n_estimators} rounds "
        f"{total / 60:.1f} min",
        flush=True,
    )


def accuracy(args: argparse.Namespace, results: dict) -> None:
    """Exact vs fast (and fp32 vs bf16) with the offline backbone on real images: pooled-feature
    cosine per augmented image and cross-validated accuracy, split by image and by id_block."""
    from histoboost.backbones import create_backbone
    from histoboost.config import preset
    from histoboost.data import load_manifest
    from histoboost.evaluate import EvaluationError, cross_validate_features, evaluate_result, make_folds
    from histoboost.features import extract_features, load_matrix
    from histoboost.runtime import Runtime

    manifest, _ = load_manifest(args.accuracy)
    base = preset("quick").merged(
        {
            "augment.n_augment": args.accuracy_augmentations,
            "seed": args.seed,
            **({"preprocess.stain.method": "none", "preprocess.scale": 1.0} if args.prepared else {}),
        }
    )
    variants = [("exact", "float32"), ("shared", "float32")]
    if bf16_supported(args.device):
        variants += [("exact", "bfloat16"), ("shared", "bfloat16")]
    if args.accuracy_variants:
        variants = [tuple(v.split("_")) for v in args.accuracy_variants]
    cache = args.cache_dir or Path(tempfile.mkdtemp(prefix="histoboost-bench-"))
    matrices, out = (
        {},
        {
            "data": str(args.accuracy),
            "images": len(manifest),
            "geometry": base.augment.__dict__,
            "prepared_images": args.prepared,
            "variants": {},
        },
    )
    for mode, dtype in variants:
        config = base.merged({"features.mode": mode, "features.dtype": dtype})
        backbone = create_backbone("efficientnet_lite0", device=args.device)
        extracted = extract_features(manifest, config, backbone, Runtime(args.device, cache_dir=cache, progress=True))
        X, owners = load_matrix(manifest, extracted.store, "crops")
        matrices[mode, dtype] = X
        row: dict = {"extract_seconds": round(extracted.seconds, 1), "images_computed": extracted.computed}
        reference = matrices.get(("exact", "float32"))
        if reference is not None and (mode, dtype) != ("exact", "float32"):
            cosine = (X * reference).sum(1) / np.linalg.norm(X, axis=1) / np.linalg.norm(reference, axis=1)
            row["cosine_vs_exact_fp32"] = {"mean": round(float(cosine.mean()), 4), "min": round(float(cosine.min()), 4)}
        if dtype == "bfloat16" and (mode, "float32") in matrices:
            fp32 = matrices[mode, "float32"]
            cosine = (X * fp32).sum(1) / np.linalg.norm(X, axis=1) / np.linalg.norm(fp32, axis=1)
            row["cosine_vs_fp32_same_path"] = {
                "mean": round(float(cosine.mean()), 5),
                "min": round(float(cosine.min()), 5),
            }
        for split in ("image", "id_block"):
            try:
                plan = make_folds(manifest, split, 6, config.seed)
            except EvaluationError as err:
                row[f"cv_{split}"] = {"error": str(err)}
                continue
            metrics = evaluate_result(cross_validate_features(X, owners, manifest, plan, config, mode), config.seed)
            votes = metrics["majority_vote"]
            row[f"cv_{split}"] = {
                "folds": plan.n_folds,
                "accuracy": round(votes["accuracy"], 3),
                "accuracy_ci": [round(v, 3) for v in votes["accuracy_ci"]],
                "mean_probability_accuracy": round(metrics["mean_probability"]["accuracy"], 3),
                "carcinoma_sensitivity": round(votes["binary"]["carcinoma"]["sensitivity"], 3),
                "carcinoma_specificity": round(votes["binary"]["carcinoma"]["specificity"], 3),
            }
        out["variants"][f"{mode}_{dtype}"] = row
        print(
            f"{mode:>6} {dtype:<8} "
            + "  ".join(
                f"{s}: {row[f'cv_{s}'].get('accuracy')} {row[f'cv_{s}'].get('accuracy_ci')}"
                for s in ("image", "id_block")
            )
            + (f"  cosine {row['cosine_vs_exact_fp32']}" if "cosine_vs_exact_fp32" in row else ""),
            flush=True,
        )
    results["accuracy"] = out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--augmentations", type=int, default=2)
    parser.add_argument("--crops", type=int, default=20)
    parser.add_argument("--backbones", nargs="+", default=list(BACKBONES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--accuracy", type=Path, metavar="DATA", help="also compare exact/fast on these real images")
    parser.add_argument("--accuracy-augmentations", type=int, default=4)
    parser.add_argument(
        "--accuracy-variants",
        nargs="+",
        metavar="MODE_DTYPE",
        help="e.g. shared_float32 shared_bfloat16 (default: exact and shared, fp32 and bf16 where supported)",
    )
    parser.add_argument(
        "--prepared",
        action="store_true",
        help="the --accuracy images are already stain-normalised at the working scale",
    )
    parser.add_argument("--cache-dir", type=Path, help="feature store for --accuracy (default: a temporary one)")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--worker", choices=["naive", "fast"], help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    parser.add_argument("--no-tune", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        name = args.backbones[0]
        result = (
            naive_worker(name, args.augmentations, args.crops, args.seed, args.device)
            if args.worker == "naive"
            else fast_worker(name, args.augmentations, args.crops, args.seed, args.device, args.dtype, not args.no_tune)
        )
        print(json.dumps(result))
        return
    cuda = args.device.startswith("cuda")
    results = {
        "machine": {
            "platform": platform.platform(),
            "processor": _cpu_name(),
            "threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name() if cuda else "cpu",
            "torch": torch.__version__,
        },
        "geometry": {
            "image": [HEIGHT, WIDTH],
            "crop": CROP,
            "augmentations": args.augmentations,
            "crops_per_augmentation": args.crops,
        },
        "gemm_fp32_gflops_measured": round(gemm_gflops(args.device), 1),
        "backbones": {},
    }
    if cuda or bf16_supported(args.device):
        results["gemm_bf16_gflops_measured"] = round(gemm_gflops(args.device, torch.bfloat16), 1)
    name = f"{time.strftime('%Y-%m-%d')}-{platform.node() or 'machine'}{'-cuda' if cuda else ''}.json"
    out = args.out or Path(__file__).parent / "results" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    sections = ([] if args.skip_speed else [speed, classifier_cost]) + ([accuracy] if args.accuracy else [])
    for section in sections:
        section(args, results)
        out.write_text(json.dumps(results, indent=2) + "\n")  # after each part, so a cut-off run keeps the rest
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
