"""Fine-tuning cost: seconds per epoch of `histoboost finetune` (quick preset: EfficientNet-Lite0, 384 px
crops, 8 crops per image, batch 16), all stages trained vs the stem and first two stages frozen, in one run.

Usage: MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736 \\
       python benchmarks/finetune_bench.py ../shared/data/bach_iciar2018 [--device cpu] [--out FILE.json]
An epoch covers the training part of all images given (the validation part is split off by id_block
where the manifest has it). The time includes the validation pass that ends each epoch.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from histoboost.config import build_config
from histoboost.data import load_manifest
from histoboost.evaluate import split_units
from histoboost.finetune import finetune, prepare_training_images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--freeze", type=int, nargs="+", default=[0, 2], help="freeze_stages variants")
    parser.add_argument(
        "--out", type=Path, default=Path("benchmarks/results") / time.strftime("%Y-%m-%d-finetune-cpu.json")
    )
    args = parser.parse_args()
    base = build_config("quick", None, {"finetune.epochs": 1})
    manifest, _ = load_manifest(args.data, base.preprocess, base.finetune_crop_size, progress=False)
    split_by, units = split_units(manifest, "id_block" if "id_block" in manifest.records[0].extra else None)
    start = time.perf_counter()
    images = prepare_training_images(manifest, base, units, progress=False)
    prepare_s = time.perf_counter() - start
    result = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "device": args.device,
            "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
        },
        "data": str(args.data),
        "images": len(images),
        "split_by": split_by,
        "prepare_seconds": round(prepare_s, 1),
        "settings": base.stage_settings("finetune")["finetune"],
        "variants": {},
    }
    for freeze in args.freeze:
        config = base.merged({"finetune.freeze_stages": freeze})
        with tempfile.TemporaryDirectory() as tmp:
            card = finetune(
                images, config, "efficientnet_lite0", Path(tmp) / "w.safetensors", device=args.device, progress=False
            ).card
        epoch = card["history"][0]
        crops = len(card["data"]["train_images"]) * config.finetune.crops_per_image
        result["variants"][f"freeze_{freeze}"] = {
            "epoch_seconds": epoch["seconds"],
            "train_images": len(card["data"]["train_images"]),
            "validation_images": len(card["data"]["validation_images"]),
            "training_crops": crops,
            "crops_per_second": round(crops / epoch["seconds"], 2),
            "val_accuracy_after_1_epoch": epoch["val_accuracy"],
        }
        print(
            f"freeze {freeze}: {epoch['seconds']:.1f} s per epoch ({crops} crops, {crops / epoch['seconds']:.2f} "
            "crops/s including validation)",
            flush=True,
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
