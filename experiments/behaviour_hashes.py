"""Fingerprints of what histoboost computes, to show a refactoring changed no result (issue "One inference seam").

Runs the four jobs the issue names through the command line into a scratch folder and records the sha256 of
every output that holds no time: `make demo`'s run (histoboost demo), `cv --preset quick
--split-by id_block` on the 144 shared BACH images, `train` on them then `predict` of the same images, and
`slide` on the CMU slide with that bundle (`--stride-um 161.25`, as the README shows it). Paths in the outputs are
the data's own, so compare runs made on the same data folder.
Run it before the first move and after the last, and compare the two files (`--compare OLD.json`).

Usage: python experiments/behaviour_hashes.py ../shared/data --out experiments/results/behaviour-0.7.0.json
           [--cache-dir DIR] [--compare experiments/results/behaviour-0.7.0.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

import histoboost

# Outputs that state a time or the machine (a run's config.json, report.html, summary.json's run time) are left out:
# they differ between two runs of the same code.
# slides.csv is left out too: it names the scratch output folder.
DETERMINISTIC = ("predictions.csv", "metrics.json", "tiles.csv", "heatmap.npz")


def digest(path: Path) -> str:
    """sha256 of a file; of a numpy archive, of its arrays (names, dtypes, shapes, bytes), since the zip
    container stamps each member with a time."""
    if path.suffix == ".npz":
        h = hashlib.sha256()
        with np.load(path, allow_pickle=False) as data:
            for name in sorted(data.files):
                a = data[name]
                h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
                h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()
    return hashlib.sha256(path.read_bytes()).hexdigest()


def bundle_digest(path: Path) -> dict[str, str]:
    """Each bundle member's sha256 (a bundle holds no time: two trainings give the same bytes)."""
    with zipfile.ZipFile(path) as archive:
        return {name: hashlib.sha256(archive.read(name)).hexdigest() for name in sorted(archive.namelist())}


def run(*args, cwd: Path | None = None) -> None:
    env = {**os.environ, "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "68719476736"}
    command = [sys.executable, "-m", "histoboost.cli", *map(str, args)]
    done = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:  # every job must succeed whole: a fingerprint of a failure proves nothing
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")


def outputs(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): digest(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name in DETERMINISTIC
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path, help="the shared data folder (bach_iciar2018/, wsi/)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cache-dir", type=Path, help="feature store to reuse (default: histoboost's)")
    parser.add_argument("--compare", type=Path, help="an earlier file of this script: report what differs")
    args = parser.parse_args()
    old = json.loads(args.compare.read_text(encoding="utf-8"))["jobs"] if args.compare else None  # before --out
    cache = ["--cache-dir", args.cache_dir] if args.cache_dir else []
    bach, slide = args.data / "bach_iciar2018", args.data / "wsi" / "CMU-1-Small-Region.svs"
    started = time.time()
    record: dict = {
        "histoboost": histoboost.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "jobs": {},
    }
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        run("demo", "--out", root / "demo", "--quiet")
        # the demo's predictions.csv names the images it made in this scratch folder: only its metrics compare
        record["jobs"]["demo"] = {k: v for k, v in outputs(root / "demo").items() if k.endswith("metrics.json")}
        run("cv", bach, "--preset", "quick", "--split-by", "id_block", "--out", root / "cv", "--quiet", *cache)
        record["jobs"]["cv"] = outputs(root / "cv")
        run(
            "train",
            bach,
            "--preset",
            "quick",
            "--split-by",
            "id_block",
            "--image-mpp",
            "0.42",  # BACH's µm/px
            "--out",
            root / "model.zip",
            "--quiet",
            *cache,
        )
        record["jobs"]["train"] = bundle_digest(root / "model.zip")
        run("predict", root / "model.zip", bach, "--out", root / "predict.csv", "--quiet")
        record["jobs"]["predict"] = {"predict.csv": digest(root / "predict.csv")}
        run("slide", root / "model.zip", slide, "--stride-um", "161.25", "--out", root / "slide", "--quiet", *cache)
        record["jobs"]["slide"] = outputs(root / "slide")
    record["seconds"] = round(time.time() - started)
    args.out.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(f"{sum(len(v) for v in record['jobs'].values())} fingerprints -> {args.out} ({record['seconds']} s)")
    if old is not None:
        differ = [
            f"{job}/{name}"
            for job, files in record["jobs"].items()
            for name, sha in files.items()
            if old.get(job, {}).get(name) != sha
        ]
        print("identical" if not differ else "differ: " + ", ".join(differ))


if __name__ == "__main__":
    main()
