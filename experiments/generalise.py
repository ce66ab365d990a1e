"""Accuracy on new patients: each classifier and decision choice measured with id_block-split CV.

Features: the `quick` preset's EfficientNet-Lite0 descriptors of the shared BACH images (extracted
once into the feature store; crops and whole-image descriptors are both stored). Outer folds: 4, split
by id_block (a proxy for patients; in situ has 4 blocks), the folds `histoboost cv --split-by id_block`
uses. Every number is measured on outer test folds. Choices are made without them:

- fixed rows use settings fixed in advance;
- the "nested" row chooses the descriptor and the logistic regularisation per outer fold by
  inner cross-validation on that fold's training images (grouped by id_block), then is scored on the
  outer fold;
- operating points (threshold for a target carcinoma sensitivity, temperature) are fitted on inner
  folds of each outer fold's training images (`classifier.fit_decision_rule`).

Intervals: 95% bootstrap over id_block units. Runs outside CI (minutes on 2 cores).

Usage: python experiments/generalise.py ../shared/data/bach_iciar2018 --out experiments/results/generalise.json
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import time

import numpy as np

from histoboost.backbones import create_backbone
from histoboost.classifier import fit_decision_rule, majority_vote, make_classifier
from histoboost.config import preset
from histoboost.data import load_manifest
from histoboost.evaluate import cross_validate_features, decision_metrics, make_folds
from histoboost.features import FeatureStore, default_cache_dir, load_matrix

SPLIT = "id_block"
DESCRIPTORS = ("crops", "whole", "crops+whole")
LOGISTIC_C = (0.001, 0.01, 0.1)


def summarise(truth, decision, plan, seed, refer=None, rules=None) -> dict:
    m = decision_metrics(truth, decision, plan.folds, plan.units, seed)
    c = m["binary"]["carcinoma"]
    row = {
        "accuracy": m["accuracy"],
        "accuracy_ci": m["accuracy_ci"],
        "carcinoma_sensitivity": c["sensitivity"],
        "carcinoma_sensitivity_ci": c["sensitivity_ci"],
        "carcinoma_specificity": c["specificity"],
        "carcinoma_specificity_ci": c["specificity_ci"],
        "missed_carcinomas": c["fn"],
        "confusion": m["confusion"],
    }
    if refer is not None:
        kept = ~refer
        row["refer_rate"] = float(refer.mean())
        row["accuracy_not_referred"] = float((decision[kept] == truth[kept]).mean())
        row["carcinoma_sensitivity_not_referred"] = float((decision[kept & (truth > 0)] > 0).mean())
    if rules is not None:
        row["thresholds"] = [r.threshold for r in rules]
        row["temperatures"] = [r.temperature for r in rules]
    return row


def fixed(X, owners, manifest, plan, config, name, seed) -> dict:
    """One configuration's outer-fold results, at the majority vote and at its operating point."""
    start = time.perf_counter()
    result = cross_validate_features(X, owners, manifest, plan, config, name)
    out = {
        "seconds": round(time.perf_counter() - start, 1),
        "majority_vote": summarise(result.truth, result.majority, plan, seed),
    }
    if result.rules is not None:
        out["operating_point"] = summarise(result.truth, result.decision, plan, seed, result.referred, result.rules)
    return out


def nested(matrices, owners, manifest, plan, base, seed, inner_folds=3) -> dict:
    """Per outer fold: choose (descriptor, C) of the logistic model by inner grouped CV on the training
    images (the descriptors are the keys of `matrices`), refit on all of them, fit the operating point on inner
    folds, score the outer fold."""
    from sklearn.model_selection import StratifiedGroupKFold

    truth, units = manifest.groups, plan.units
    n_aug = np.bincount(owners)[0]
    majority = np.zeros(len(truth), dtype=np.int64)
    decision = np.zeros(len(truth), dtype=np.int64)
    refer = np.zeros(len(truth), dtype=bool)
    chosen, rules = [], []
    for k in range(plan.n_folds):
        train_images = np.flatnonzero(plan.folds != k)
        test_images = np.flatnonzero(plan.folds == k)
        inner = StratifiedGroupKFold(n_splits=inner_folds, shuffle=True, random_state=seed)
        splits = list(inner.split(train_images, truth[train_images], units[train_images]))
        scores = {}
        for descriptor, X in matrices.items():
            for C in LOGISTIC_C:
                config = base.merged({"classifier.kind": "logistic", "classifier.C": C})
                correct = 0
                for tr, va in splits:
                    rows_tr = np.isin(owners, train_images[tr])
                    model = make_classifier(config.classifier, seed).fit(X[rows_tr], truth[owners[rows_tr]])
                    for i in train_images[va]:
                        correct += int(majority_vote(model.predict_proba(X[owners == i])[None])[0] == truth[i])
                scores[descriptor, C] = correct / len(train_images)
        descriptor, C = max(scores, key=scores.get)
        chosen.append({"fold": k, "descriptor": descriptor, "C": C, "inner_accuracy": scores[descriptor, C]})
        X = matrices[descriptor]
        config = base.merged(
            {
                "classifier.kind": "logistic",
                "classifier.C": C,
                "classifier.target_sensitivity": 0.95,
                "classifier.calibrate": True,
                "classifier.refer_below_agreement": 0.75,
            }
        )
        rows_tr = np.isin(owners, train_images)
        model = make_classifier(config.classifier, seed).fit(X[rows_tr], truth[owners[rows_tr]])
        rule = fit_decision_rule(
            X[rows_tr], truth[owners[rows_tr]], owners[rows_tr], units[owners[rows_tr]], config.classifier, seed
        )
        rules.append(rule)
        probs = np.stack([model.predict_proba(X[owners == i]) for i in test_images]).reshape(-1, n_aug, 3)
        majority[test_images] = majority_vote(probs)
        decision[test_images], agreement = rule.decide(probs)
        refer[test_images] = rule.refer(agreement)
        print(f"  fold {k + 1}: chose {descriptor}, C={C} (inner accuracy {scores[descriptor, C]:.3f})", flush=True)
    return {
        "chosen": chosen,
        "majority_vote": summarise(truth, majority, plan, seed),
        "operating_point": summarise(truth, decision, plan, seed, refer, rules),
    }


def begin(parser: argparse.ArgumentParser, table=None) -> tuple[argparse.Namespace, object, object]:
    """What every experiment here starts with: its arguments (the data, --out and --markdown beside its own); with
    --markdown, the table of the existing --out file printed (by `table`, default `markdown`) and exit; else the
    `quick` preset and the validated manifest."""
    parser.add_argument("data")
    parser.add_argument("--out", required=True)
    parser.add_argument("--markdown", action="store_true", help="print the table of an existing --out file and stop")
    args = parser.parse_args()
    if args.markdown:
        with open(args.out) as f:
            print((table or markdown)(json.load(f)))
        raise SystemExit(0)
    manifest, _ = load_manifest(args.data)
    return args, preset("quick"), manifest


def record_row(results: dict, out: str, name: str, compute) -> None:
    """Measure one row unless `results` (resumed from `out`) has it; print it and save everything at once, so
    an interrupted run keeps every finished row."""
    if name in results["rows"]:
        return
    start = time.perf_counter()
    row = compute()
    row.setdefault("seconds", round(time.perf_counter() - start, 1))
    results["rows"][name] = row
    mv = row["majority_vote"]
    text = (
        f"{name:<62} acc {mv['accuracy']:.3f} {np.round(mv['accuracy_ci'], 3).tolist()} "
        f"sens {mv['carcinoma_sensitivity']:.3f}"
    )
    if "operating_point" in row:
        op = row["operating_point"]
        text += (
            f" | op acc {op['accuracy']:.3f} sens {op['carcinoma_sensitivity']:.3f} "
            f"spec {op['carcinoma_specificity']:.3f} refer {op['refer_rate']:.3f}"
        )
    print(text, flush=True)
    with open(out, "w") as handle:
        json.dump(results, handle, indent=2)


def markdown(results: dict) -> str:
    """The docs/accuracy.md table: majority vote, then the operating point, per row."""
    pct = lambda v: f"{100 * v:.1f}"  # noqa: E731
    ci = lambda v: f"[{pct(v[0])}, {pct(v[1])}]" if v else ""  # noqa: E731
    lines = [
        "| choice | accuracy, majority [95% CI] | carcinoma sens. | at the operating point: accuracy | "
        "sensitivity [95% CI] | specificity [95% CI] | referred |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, row in results["rows"].items():
        mv, op = row["majority_vote"], row.get("operating_point")
        cells = [name, f"{pct(mv['accuracy'])} {ci(mv['accuracy_ci'])}", pct(mv["carcinoma_sensitivity"])]
        if op:
            cells += [
                pct(op["accuracy"]),
                f"{pct(op['carcinoma_sensitivity'])} {ci(op['carcinoma_sensitivity_ci'])}",
                f"{pct(op['carcinoma_specificity'])} {ci(op['carcinoma_specificity_ci'])}",
                pct(op["refer_rate"]),
            ]
        lines.append("| " + " | ".join(cells + [""] * (7 - len(cells))) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-xgboost", action="store_true")
    parser.add_argument(
        "--stages",
        type=int,
        default=1,
        help="also measure descriptors from this many network stages (extracts them if missing)",
    )
    args, base, manifest = begin(parser)
    seed = base.seed
    plan = make_folds(manifest, SPLIT, 6, seed)
    results = {
        "machine": platform.processor() or platform.machine(),
        "data": args.data,
        "split_by": SPLIT,
        "folds": plan.n_folds,
        "images": len(manifest),
        "rows": {},
    }

    @functools.cache
    def features() -> tuple[dict, np.ndarray]:
        """The quick store's descriptors, loaded when a row needs them."""
        store = FeatureStore.open(default_cache_dir(), base, create_backbone("efficientnet_lite0"))
        results["features"] = store.key
        found = {d: load_matrix(manifest, store, d) for d in DESCRIPTORS}
        return {d: X for d, (X, _) in found.items()}, found["crops"][1]

    if os.path.exists(args.out):  # resume: rows already measured are kept
        with open(args.out) as f:
            results["rows"] = json.load(f)["rows"]

    record = functools.partial(record_row, results, args.out)

    op = {"classifier.target_sensitivity": 0.95, "classifier.calibrate": True, "classifier.refer_below_agreement": 0.75}
    for descriptor in DESCRIPTORS:
        for C in LOGISTIC_C:
            config = base.merged({"classifier.kind": "logistic", "classifier.C": C, **op})
            record(
                f"logistic C={C}, {descriptor}",
                lambda d=descriptor, config=config: fixed(
                    features()[0][d], features()[1], manifest, plan, config, "logistic", seed
                ),
            )
    record(
        "nested: logistic, descriptor and C chosen on inner folds",
        lambda: nested(*features(), manifest, plan, base, seed),
    )
    config = base.merged(
        {
            "classifier.kind": "logistic",
            "classifier.target_sensitivity": 0.9,
            "classifier.calibrate": True,
            "classifier.refer_below_agreement": 0.75,
        }
    )
    record(
        "logistic C=0.001, crops, target sensitivity 0.90",
        lambda: fixed(features()[0]["crops"], features()[1], manifest, plan, config, "logistic", seed),
    )
    if args.stages > 1:
        from histoboost.features import describe_dataset

        staged = base.merged({"features.stages": args.stages})
        (described,) = describe_dataset(manifest, staged)
        config = staged.merged({"classifier.kind": "logistic", **op})
        record(
            f"logistic C=0.001, crops, {args.stages} network stages (final + blocks.4)",
            lambda: fixed(described.X, described.owners, manifest, plan, config, "logistic", seed),
        )
    if not args.skip_xgboost:
        for descriptor in ("crops", "crops+whole"):
            config = base.merged(op)
            record(
                f"xgboost (quick preset: 200 rounds, 64 bins, colsample 0.25), {descriptor}",
                lambda d=descriptor, config=config: fixed(
                    features()[0][d], features()[1], manifest, plan, config, "xgboost", seed
                ),
            )


if __name__ == "__main__":
    main()
