"""The recipe levers that need no new extraction, measured on BACH's 268 patient-aware training images against
the same folds, and the nested selection among them (the honest number). `--scales` adds the working scale:
Lite0 extracted at another scale, alone and concatenated with the 0.5 one (multi-scale context).

Features: the `quick` preset's EfficientNet-Lite0 store (crops and whole-image descriptors are both stored),
optionally concatenated with other offline backbones' stores (`--backbones efficientnet_lite1 ...`, extracted
where missing). Outer folds: 4, grouped by id_block, fixed for every row. Each fixed row is descriptive: its
setting was fixed in advance and the operating point (95% carcinoma sensitivity) is fitted on inner folds of
each outer training part. The nested row chooses descriptor and logistic C inside each outer fold by inner
cross-validation grouped by block (`generalise.nested`), so its number is what the selection procedure itself
achieves on new patients; the best fixed row is not.

Usage: python experiments/levers.py ../shared/data/bach_iciar2018_train.csv --out experiments/results/levers.json
           [--backbones efficientnet_lite1 efficientnet_lite2] [--scales 0.25] [--markdown]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform

import numpy as np

from histoboost.evaluate import cross_validate_features, make_folds
from histoboost.features import describe_dataset, load_matrix

from generalise import DESCRIPTORS, LOGISTIC_C, begin, fixed, nested, record_row, summarise

OPERATING_POINT = {
    "classifier.target_sensitivity": 0.95,
    "classifier.calibrate": False,
    "classifier.refer_below_agreement": 0.75,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", nargs="*", default=[], help="offline backbones to concatenate with Lite0")
    parser.add_argument(
        "--scales",
        nargs="*",
        type=float,
        default=[],
        help="other working scales to extract Lite0 at (0.25 = 1.68 µm/px), alone and with 0.5",
    )
    args, base, manifest = begin(parser)
    seed = base.seed
    plan = make_folds(manifest, "id_block", 6, seed)
    described = describe_dataset(manifest, base.merged({"features.backbones": ["efficientnet_lite0", *args.backbones]}))
    store = described[0].extraction.store  # Lite0's: every descriptor is stored
    matrices = {d: load_matrix(manifest, store, d)[0] for d in DESCRIPTORS}
    owners = described[0].owners
    results = {
        "machine": platform.processor() or platform.machine(),
        "data": args.data,
        "split_by": "id_block",
        "folds": plan.n_folds,
        "images": len(manifest),
        "rows": {},
    }
    if os.path.exists(args.out):  # resume: rows already measured are kept
        with open(args.out) as f:
            results["rows"] = json.load(f)["rows"]

    record = functools.partial(record_row, results, args.out)

    logistic = base.merged({"classifier.kind": "logistic", **OPERATING_POINT})
    for descriptor in DESCRIPTORS:
        for C in LOGISTIC_C:
            config = logistic.merged({"classifier.C": C})
            record(
                f"logistic C={C}, {descriptor}",
                lambda d=descriptor, config=config: fixed(
                    matrices[d], owners, manifest, plan, config, "logistic", seed
                ),
            )
    xgboost = base.merged(OPERATING_POINT)
    for descriptor in ("crops", "crops+whole"):
        record(
            f"xgboost (quick: 200 rounds), {descriptor}",
            lambda d=descriptor: fixed(matrices[d], owners, manifest, plan, xgboost, "xgboost", seed),
        )

    def ensemble() -> dict:
        """Mean of the logistic (C=0.001) and XGBoost augmentation probabilities, majority vote."""
        first = cross_validate_features(
            matrices["crops"], owners, manifest, plan, base.merged({"classifier.kind": "logistic"}), "logistic"
        )
        second = cross_validate_features(matrices["crops"], owners, manifest, plan, base, "xgboost")
        probs = (first.aug_probs + second.aug_probs) / 2
        from histoboost.classifier import majority_vote

        return {"majority_vote": summarise(first.truth, majority_vote(probs), plan, seed)}

    record("ensemble: mean of logistic C=0.001 and xgboost probabilities, crops", ensemble)
    if args.backbones:
        concat = np.concatenate([x.X for x in described], axis=1)
        names = " + ".join(x.backbone.name for x in described)
        record(
            f"logistic C=0.001, crops, {names}",
            lambda: fixed(concat, owners, manifest, plan, logistic.merged({"classifier.C": 0.001}), "logistic", seed),
        )
    record(
        "nested: logistic, descriptor and C chosen on inner folds",
        lambda: nested(matrices, owners, manifest, plan, base, seed),
    )
    scaled = dict(matrices)
    for scale in args.scales:  # working scale: the same crops in pixels see 0.5 / scale times the field
        mpp = f"{0.42 / scale:.2f} µm/px"
        other = describe_dataset(manifest, base.merged({"preprocess.scale": scale}))[0]
        if not np.array_equal(other.owners, owners):
            raise SystemExit("scales disagree on the rows")
        both = np.concatenate([matrices["crops"], other.X], axis=1)
        for C in LOGISTIC_C[:2]:
            config = logistic.merged({"classifier.C": C})
            record(
                f"logistic C={C}, crops, {mpp}",
                lambda X=other.X, config=config: fixed(X, owners, manifest, plan, config, "logistic", seed),
            )
            record(
                f"logistic C={C}, crops, 0.84 + {mpp} concatenated",
                lambda X=both, config=config: fixed(X, owners, manifest, plan, config, "logistic", seed),
            )
        scaled.update({f"crops {mpp}": other.X, f"crops 0.84 + {mpp}": both})
    if args.scales:
        record(
            "nested: logistic, descriptor, scale and C chosen on inner folds",
            lambda: nested(scaled, owners, manifest, plan, base, seed),
        )


if __name__ == "__main__":
    main()
