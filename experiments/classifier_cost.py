"""The classifier's cost against its accuracy: XGBoost settings on the same features, folds and machine.

Features: the `quick` preset's EfficientNet-Lite0 descriptors of the shared BACH images (extracted
once into the feature store). Each variant runs the full cross-validation (id_block split, the honest
one; image split too with --both-splits) and records wall time and majority-vote accuracy with its
bootstrap interval.

Usage: python experiments/classifier_cost.py ../shared/data/bach_iciar2018 \
--out experiments/results/classifier_cost.json
"""

import argparse
import json
import os
import platform
import time

from histoboost.config import preset
from histoboost.data import load_manifest
from histoboost.evaluate import cross_validate_features, evaluate_result, make_folds
from histoboost.features import describe_dataset

VARIANTS = {
    "before: 200 rounds, 256 bins, colsample 0.5": {},
    "early stopping (20 rounds, grouped inner split)": {"classifier.early_stopping_rounds": 20},
    "64 bins, colsample 0.25, 200 rounds": {"classifier.max_bin": 64, "classifier.colsample_bytree": 0.25},
    "64 bins, colsample 0.25, 100 rounds at eta 0.1": {
        "classifier.max_bin": 64,
        "classifier.colsample_bytree": 0.25,
        "classifier.n_estimators": 100,
        "classifier.learning_rate": 0.1,
    },
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data")
    parser.add_argument("--both-splits", action="store_true")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    base = preset("quick")
    manifest, _ = load_manifest(args.data)
    (features,) = describe_dataset(manifest, base)
    results = {
        "machine": {"processor": platform.processor() or platform.machine(), "cpus": os.cpu_count()},
        "features": {
            "backbone": features.backbone.name,
            "rows": int(features.X.shape[0]),
            "dims": int(features.X.shape[1]),
        },
        "variants": {},
    }
    if os.path.exists(args.out):  # resume: variants already measured are kept
        with open(args.out) as f:
            results["variants"] = json.load(f)["variants"]
    for name, overrides in VARIANTS.items():
        if name in results["variants"]:
            continue
        config = base.merged(overrides)
        row = {"overrides": overrides}
        for split in ["id_block", "image"] if args.both_splits else ["id_block"]:
            plan = make_folds(manifest, split, config.evaluate.folds, config.seed)
            start = time.perf_counter()
            result = cross_validate_features(features.X, features.owners, manifest, plan, config, name)
            seconds = time.perf_counter() - start
            votes = evaluate_result(result, config.seed)["majority_vote"]
            row[split] = {
                "folds": plan.n_folds,
                "seconds": round(seconds, 1),
                "accuracy": round(votes["accuracy"], 3),
                "accuracy_ci": [round(v, 3) for v in votes["accuracy_ci"]],
                "carcinoma_sensitivity": round(votes["binary"]["carcinoma"]["sensitivity"], 3),
            }
            print(
                f"{name:<55} {split:<8} {seconds:6.1f} s  accuracy {votes['accuracy']:.3f} {row[split]['accuracy_ci']}",
                flush=True,
            )
        results["variants"][name] = row
        with open(args.out, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
