"""Foundation-model throughput: tiles/s of ViT-S/16, ViT-B/16, ViT-L/16 (and the ViT-H/14 and ViT-g/14 of
Virchow and H-optimus) at 224 px, beside ResNet50, in one run on one machine.

Each network is built as histoboost builds it (`pretrained=False`, random weights: speed does not depend on
them) and timed through `Backbone.embed`, the call feature extraction makes per batch of tiles (normalise,
forward, CLS token), after `keep_freed_memory()` as every histoboost entry point does. fp32 on a CPU; fp32
and bf16 autocast on CUDA. With `--data`, one real image is also described end to end at the `foundation`
preset's geometry (A = 4 augmentations x C = 16 tiles of 224 px at 0.5 µm/px, plus the 4 whole views), for
the seconds per image a user will see.

Usage: python benchmarks/vit_bench.py [--device cpu|cuda] [--data ../shared/data/bach_iciar2018]
           [--out benchmarks/results/DATE-MACHINE-vit.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from histoboost.backbones import Backbone, keep_freed_memory

# (label, timm architecture, keywords as the foundation specs pass them)
NETWORKS = (
    ("ResNet50 (CNN baseline)", "resnet50", {}),
    ("ViT-S/16 (kaiko-vits16, lunit-vits16)", "vit_small_patch16_224", {}),
    ("ViT-B/16 (phikon, kaiko-vitb16)", "vit_base_patch16_224", {}),
    ("ViT-L/16 (uni, phikon-v2)", "vit_large_patch16_224", {"init_values": 1e-5}),
    ("ViT-H/14 (virchow, virchow2)", "virchow", None),
    ("ViT-g/14 (h-optimus-0/1)", "h-optimus-0", None),
)
MIN_SECONDS = 8.0


def backbone(arch: str, kwargs: dict | None, device: str) -> Backbone:
    """The network with random weights, wrapped as histoboost wraps it."""
    import timm

    from histoboost.backbones import _build_foundation
    from histoboost.specs import foundation_spec

    if kwargs is None:  # a registered foundation spec, built exactly as histoboost builds it
        spec = foundation_spec(arch)
        model = _build_foundation(spec)
        pooling, mean, std, size = spec.embedding, spec.mean, spec.std, spec.input_size
    else:
        model = timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)
        pooling, mean, std, size = ("" if arch == "resnet50" else "cls"), (0.5,) * 3, (0.5,) * 3, 224
    model.eval().requires_grad_(False)
    if not pooling:
        model.to(memory_format=torch.channels_last)
    return Backbone(
        arch,
        arch,
        model,
        torch.tensor(mean).view(1, 3, 1, 1),
        torch.tensor(std).view(1, 3, 1, 1),
        model.num_features,
        32,
        "",
        "random",
        token_pooling=pooling,
        input_size=size,
    ).to(device)


def tiles_per_second(net: Backbone, device: str, batch: int, bf16: bool) -> tuple[float, int]:
    x = torch.rand(batch, 3, 224, 224, device=device) * 255
    with torch.inference_mode(), torch.autocast(torch.device(device).type, torch.bfloat16, enabled=bf16):
        net.embed(x)  # warm-up
        _sync(device)
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < MIN_SECONDS or done < 2 * batch:
            net.embed(x)
            done += batch
        _sync(device)
    return done / (time.perf_counter() - start), done


def gflops(net: Backbone) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        net.embed(torch.zeros(1, 3, 224, 224, device=next(net.model.parameters()).device))
    return counter.get_total_flops() / 1e9


def seconds_per_image(net: Backbone, data: Path, device: str, batch: int) -> float:
    """One real image described at the foundation preset's geometry (its µm/px unknown: read at --scale 0.84,
    BACH's 0.42 µm/px brought to 0.5)."""
    from histoboost.config import preset
    from histoboost.features import describe_image, prepare_image

    config = preset("foundation").merged({"preprocess.scale": 0.42 / 0.5})
    image = sorted(data.rglob("*.jpeg"))[0]
    prepared = prepare_image(image, "0" * 64, None, config)  # any content key: it seeds the crops
    start = time.perf_counter()
    describe_image(prepared.rgb, prepared.plans, net, config, device, batch)
    _sync(device)
    return time.perf_counter() - start


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=8, help="tiles per forward (histoboost's CPU default: 8)")
    parser.add_argument("--data", type=Path, help="a folder of real images for the per-image figure")
    parser.add_argument("--out", type=Path, help="results JSON (default: print)")
    args = parser.parse_args()
    keep_freed_memory()
    dtypes = [False, True] if args.device.startswith("cuda") else [False]
    results = []
    for label, arch, kwargs in NETWORKS:
        net = backbone(arch, kwargs, args.device)
        row = {
            "network": label,
            "architecture": arch,
            "gflop_per_tile": round(gflops(net), 1),
            "parameters_m": round(sum(p.numel() for p in net.model.parameters()) / 1e6, 1),
        }
        for bf16 in dtypes:
            rate, tiles = tiles_per_second(net, args.device, args.batch, bf16)
            row["bf16" if bf16 else "fp32"] = {"tiles_per_s": round(rate, 2), "tiles_timed": tiles}
        if args.data is not None and arch != "resnet50":
            row["seconds_per_image_foundation_preset"] = round(
                seconds_per_image(net, args.data, args.device, args.batch), 1
            )
        print(json.dumps(row), flush=True)
        results.append(row)
        del net
    report = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "device": args.device,
            "cuda": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None,
        },
        "batch": args.batch,
        "input": "224x224",
        "results": results,
        "date": time.strftime("%Y-%m-%d"),
    }
    text = json.dumps(report, indent=2) + "\n"
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    else:
        print(text)


if __name__ == "__main__":
    main()
