"""No work done twice, and logs a person can read, in one run of whole `histoboost` processes (start-up included):

- a second `evaluate`: a `quick` bundle trained on the 124 BACH images of `bach_iciar2018_extra`, evaluated on
  the 144 of `bach_iciar2018` (no image in both) with `--no-cache` (every run describes every image: what 0.8.0
  did), then twice with a feature store (the first fills it, the second reads it); the three metrics.json must
  be equal;
- the log of an `inspect` of all 268 training images with stderr to a file: `--progress` (bars forced: tqdm's
  refreshes, what 0.8.0 wrote into every log) against the default (one line per stage off a terminal).

Usage: python benchmarks/rerun_bench.py [--out benchmarks/results/DATE-rerun-MACHINE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def histoboost(*args: object, stderr_to: Path | None = None) -> float:
    """Seconds one `histoboost ARGS` process took (it must succeed)."""
    started = time.perf_counter()
    with open(stderr_to or os.devnull, "w") as err:
        done = subprocess.run(
            [sys.executable, "-m", "histoboost.cli", *map(str, args)], stdout=subprocess.PIPE, stderr=err, text=True
        )
    if done.returncode != 0:
        raise SystemExit(f"histoboost {' '.join(map(str, args))} failed ({done.returncode}): {done.stdout[-2000:]}")
    return round(time.perf_counter() - started, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    from extract_bench import _cpu_name  # this folder's shared helper (a script's folder is on sys.path)

    results: dict = {"machine": f"{_cpu_name()}, {os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d")}
    with tempfile.TemporaryDirectory() as scratch:
        s = Path(scratch)
        model = s / "extra.zip"
        results["train_124_s"] = histoboost(
            "train", DATA / "bach_iciar2018_extra", "--preset", "quick", "--out", model, "--cache-dir", s / "train"
        )
        runs = {
            "evaluate_no_cache_s": ["--no-cache"],
            "evaluate_first_s": ["--cache-dir", s / "store"],
            "evaluate_second_s": ["--cache-dir", s / "store"],
        }
        metrics = []
        for name, flags in runs.items():
            out = s / name
            results[name] = histoboost("evaluate", model, DATA / "bach_iciar2018", "--out", out, *flags)
            metrics.append(json.loads((out / "metrics.json").read_text()))
            print(name, results[name], flush=True)
        results["same_metrics"] = all(
            json.dumps(m, sort_keys=True) == json.dumps(metrics[0], sort_keys=True) for m in metrics
        )
        for name, flags in {"inspect_log_bars_bytes": ["--progress"], "inspect_log_bytes": []}.items():
            log = s / f"{name}.log"
            histoboost("inspect", DATA / "bach_iciar2018_train.csv", *flags, stderr_to=log)
            results[name] = log.stat().st_size
            print(name, results[name], flush=True)
    results["second_evaluate_speed_up"] = round(results["evaluate_no_cache_s"] / results["evaluate_second_s"], 1)
    print(json.dumps(results, indent=2))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
