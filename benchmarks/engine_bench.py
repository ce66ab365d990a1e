"""The Dask engine's cost, in one run: the same extraction with `--engine local` and `--engine dask`, the
LocalCluster's start, the scheduler's overhead per task, and a projection to more workers.

The images are the first N of the shared BACH set (real 2048x1536 JPEGs) at the `paper` preset (the seed
study's protocol: scale 0.5, 40 colour augmentations of 20 crops of 750 px, shared feature map), with
EfficientNet-Lite0 and its offline ImageNet weights. Each extraction writes into an empty store of its own:

- local: this process, torch on all cores (the default);
- local-1: this process, torch on 1 thread (one Dask worker's share of this machine: the per-worker rate);
- dask: a LocalCluster of one worker process per core, 1 thread each (`--engine dask` with no scheduler),
  features written by the workers; cluster start and close timed apart.

Task overhead: the mean time per no-op task for 2,000 tasks through the same scheduler (submit to result).
Projection: W workers, each with its own core(s) or GPU (not sharing this VM's two), extract at
W x (per-worker rate), until the scheduler saturates at (images per task) / (overhead per task); the shared
store's bandwidth is not modelled. Timings on this machine: docs/performance.md and docs/scale.md.

Usage: python benchmarks/engine_bench.py [--images 24] [--out benchmarks/results/DATE-engine-MACHINE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "bach_iciar2018"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    import torch
    from extract_bench import _cpu_name  # this folder's shared helper (a script's folder is on sys.path)

    from histoboost.backbones import create_backbone
    from histoboost.config import preset
    from histoboost.data import Manifest, load_manifest
    from histoboost.engine import EngineSpec, open_engine
    from histoboost.features import extract_features
    from histoboost.runtime import Runtime

    config = preset("paper").merged({"features.backbones": ["efficientnet_lite0"]})
    full, _ = load_manifest(args.data / "manifest.csv", config.preprocess, config.augment.crop_size, progress=False)
    manifest = Manifest(full.records[: args.images], full.root, full.layout)
    backbone = create_backbone("efficientnet_lite0")
    cores = os.cpu_count() or 1
    results: dict = {
        "machine": f"{_cpu_name()}, {cores} cores",
        "torch": torch.__version__,
        "images": len(manifest),
        "preset": "paper",
        "backbone": "efficientnet_lite0",
        "date": time.strftime("%Y-%m-%d"),
    }
    stores = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name, threads in (("local", cores), ("local-1", 1)):
            torch.set_num_threads(threads)
            with open_engine(EngineSpec("local", threads=threads)) as engine:
                run = extract_features(
                    manifest, config, backbone, Runtime(cache_dir=Path(scratch) / name, engine=engine)
                )
            stores[name] = run.store.root
            results[name] = {
                "threads": threads,
                "seconds": round(run.seconds, 2),
                "images_per_second": round(run.images_per_second, 3),
            }
            print(name, results[name], flush=True)
        torch.set_num_threads(cores)
        started = time.perf_counter()
        with open_engine(EngineSpec("dask", threads=1)) as engine:
            start_s = time.perf_counter() - started
            run = extract_features(manifest, config, backbone, Runtime(cache_dir=Path(scratch) / "dask", engine=engine))
            overhead = task_overhead(engine.client)
            workers = engine.workers
            closing = time.perf_counter()
        close_s = time.perf_counter() - closing
        stores["dask"] = run.store.root
        results["dask"] = {
            "workers": workers,
            "threads_per_worker": 1,
            "cluster_start_seconds": round(start_s, 2),
            "cluster_close_seconds": round(close_s, 2),
            "seconds": round(run.seconds, 2),
            "images_per_second": round(run.images_per_second, 3),
            "task_overhead_ms": round(overhead * 1000, 3),
        }
        print("dask", results["dask"], flush=True)
        results["dask_bytes_equal_local_1_thread"] = same_files(stores["dask"], stores["local-1"])
        results["local_bytes_equal_local_1_thread"] = same_files(stores["local"], stores["local-1"])
    per_worker = results["local-1"]["images_per_second"]
    images_per_task = 16  # the most extract puts in one task; fewer when there are few images per worker
    ceiling = images_per_task / overhead
    results["projection"] = [
        {"workers": w, "images_per_second": round(min(w * per_worker, ceiling), 2)} for w in (1, 2, 4, 8, 16, 32, 64)
    ]
    results["projection_model"] = (
        f"min(W x {per_worker} img/s per worker (local-1, this CPU), "
        f"{images_per_task} images per task / {overhead * 1000:.2f} ms per task)"
    )
    text = json.dumps(results, indent=2) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


def task_overhead(client, n: int = 2000) -> float:
    """Mean seconds per no-op task, submitted all at once and gathered (the scheduler's cost per task)."""
    client.gather(client.map(_noop, range(100), pure=False))  # warm
    start = time.perf_counter()
    client.gather(client.map(_noop, range(n), pure=False))
    return (time.perf_counter() - start) / n


def _noop(i: int) -> int:
    return i


def same_files(a: Path, b: Path) -> bool:
    files = sorted(p.name for p in Path(a).glob("[!.]*.npz"))
    return files == sorted(p.name for p in Path(b).glob("[!.]*.npz")) and all(
        (Path(a) / f).read_bytes() == (Path(b) / f).read_bytes() for f in files
    )


if __name__ == "__main__":
    main()
