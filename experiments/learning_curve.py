"""How much more training data is worth on new patients: the same id_block-grouped test folds, with each fold's
model trained on nested shares (about a quarter, half and all) of that fold's training images, taken by whole
id blocks.

BACH's 268 patient-aware training images fall in only 18 id blocks (in situ: 4), so subsets of the data set
cannot be cross-validated on their own (a 70-image subset has one in-situ block). Instead the outer folds are
fixed on all 268 images (4 folds grouped by id_block) and only the training part shrinks: per class, the
fold's training blocks in one seeded order, taken until the class has its share of that fold's training
images, at least 2 blocks (the operating point's inner folds need 2 units per class). A training share s on
201 training images corresponds to a data set of about 268 s images under the same 4-fold protocol.

Features: the `quick` preset's EfficientNet-Lite0 descriptors (docs/accuracy.md's best frozen recipe),
extracted once into the feature store. Per share and classifier: the majority vote, and the operating point
for 95% carcinoma sensitivity fitted on inner folds of the (shrunk) training part
(`classifier.fit_decision_rule`). Intervals: 95% bootstrap over id blocks of the test images. Several block
orders (draws) for the smaller shares show how much the blocks drawn move the result.

Usage: python experiments/learning_curve.py ../shared/data/bach_iciar2018_train.csv
           --out experiments/results/learning_curve.json [--markdown]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np

from histoboost.classifier import fit_decision_rule, majority_vote, make_classifier
from histoboost.evaluate import make_folds
from histoboost.features import describe_dataset

from generalise import begin, record_row, summarise  # the experiments folder's shared helpers

SHARES = (0.25, 0.5, 1.0)
DRAWS = 3  # block orders for the smaller shares (the whole training part has one)
MIN_BLOCKS = 2
OPERATING_POINT = {
    "classifier.target_sensitivity": 0.95,
    "classifier.calibrate": True,
    "classifier.refer_below_agreement": 0.75,
}
CLASSIFIERS = {
    "logistic C=0.001": {"classifier.kind": "logistic", "classifier.C": 0.001},
    "xgboost (quick: 200 rounds)": {"classifier.kind": "xgboost"},
}


def training_subset(
    train: np.ndarray, groups: np.ndarray, blocks: np.ndarray, share: float, draw: int, fold: int
) -> np.ndarray:
    """Of the training images `train`, whole id blocks per class in a seeded order, until the class has `share`
    of its training images (at least MIN_BLOCKS blocks). Nested: a larger share extends a smaller one."""
    rng = np.random.default_rng([1000 + draw, fold])
    keep = []
    for g in np.unique(groups[train]):
        members = train[groups[train] == g]
        order = sorted(set(blocks[members]))
        rng.shuffle(order)
        taken = []
        for used, block in enumerate(order):
            if len(taken) >= share * len(members) and used >= MIN_BLOCKS:
                break
            taken += list(members[blocks[members] == block])
        keep += taken
    return np.array(sorted(keep))


def image_subset(train: np.ndarray, groups: np.ndarray, share: float, draw: int, fold: int) -> np.ndarray:
    """Of the training images `train`, a seeded random `share` of each class's images, from all its blocks:
    fewer images of the same patients, where `training_subset` takes fewer patients."""
    rng = np.random.default_rng([2000 + draw, fold])
    keep = []
    for g in np.unique(groups[train]):
        members = train[groups[train] == g]
        keep += list(rng.choice(members, size=max(2, round(share * len(members))), replace=False))
    return np.array(sorted(keep))


def run(X, owners, truth, units, blocks, plan, config, share, draw, seed, by="blocks"):
    """Outer folds fixed; each trained on its share of the training images (whole blocks, or images from every
    block). Returns the row's results."""
    n_aug = np.bincount(owners)[0]
    majority = np.zeros(len(truth), dtype=np.int64)
    decision = np.zeros(len(truth), dtype=np.int64)
    refer = np.zeros(len(truth), dtype=bool)
    rules, trained = [], []
    for k in range(plan.n_folds):
        train = np.flatnonzero(plan.folds != k)
        train = (
            training_subset(train, truth, blocks, share, draw, k)
            if by == "blocks"
            else image_subset(train, truth, share, draw, k)
        )
        trained.append(len(train))
        rows = np.isin(owners, train)
        model = make_classifier(config.classifier, seed).fit(X[rows], truth[owners[rows]], groups=units[owners[rows]])
        rule = fit_decision_rule(
            X[rows], truth[owners[rows]], owners[rows], units[owners[rows]], config.classifier, seed
        )
        rules.append(rule)
        test = np.flatnonzero(plan.folds == k)
        probs = np.stack([model.predict_proba(X[owners == i]) for i in test]).reshape(-1, n_aug, 3)
        majority[test] = majority_vote(probs)
        decision[test], agreement = rule.decide(probs)
        refer[test] = rule.refer(agreement)
    return {
        "training_images_per_fold": trained,
        "mean_training_images": float(np.mean(trained)),
        "majority_vote": summarise(truth, majority, plan, seed),
        "operating_point": summarise(truth, decision, plan, seed, refer, rules),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    args, base, manifest = begin(parser, markdown)
    seed = base.seed
    start = time.perf_counter()
    (described,) = describe_dataset(manifest, base)
    plan = make_folds(manifest, "id_block", 6, seed)
    blocks = np.array(manifest.column("id_block"), dtype=object)
    results = {
        "machine": platform.processor() or platform.machine(),
        "data": args.data,
        "images": len(manifest),
        "folds": plan.n_folds,
        "blocks": len(set(blocks)),
        "features": described.provenance,
        "extraction_seconds": round(time.perf_counter() - start),
        "rows": {},
    }
    if os.path.exists(args.out):  # resume: rows already measured are kept
        with open(args.out) as f:
            results["rows"] = json.load(f)["rows"]
    for by, share in [("blocks", s) for s in SHARES] + [("images", s) for s in SHARES if s < 1]:
        for draw in range(DRAWS if share < 1 else 1):
            for name, settings in CLASSIFIERS.items():
                key = f"share {share}, draw {draw}: {name}" + (" (images from every block)" if by == "images" else "")
                config = base.merged({**settings, **OPERATING_POINT})
                record_row(
                    results,
                    args.out,
                    key,
                    lambda share=share, by=by, draw=draw, name=name, config=config: {
                        "share": share,
                        "by": by,
                        "draw": draw,
                        "classifier": name,
                        **run(
                            described.X,
                            described.owners,
                            manifest.groups,
                            plan.units,
                            blocks,
                            plan,
                            config,
                            share,
                            draw,
                            seed,
                            by,
                        ),
                    },
                )


def markdown(results: dict) -> str:
    """The docs/accuracy.md table: per training share, classifier and draw."""
    pct = lambda v: f"{100 * v:.1f}"  # noqa: E731
    ci = lambda v: f"[{pct(v[0])}, {pct(v[1])}]"  # noqa: E731
    lines = [
        "| training images per fold (share, taken by) | classifier | draw | 3-class accuracy, majority [95% CI] | "
        "carcinoma sens. at the majority | at the 95% operating point: sensitivity [95% CI] | "
        "specificity [95% CI] |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    rows = sorted(
        results["rows"].values(), key=lambda r: (r.get("by", "blocks"), r["share"], r["classifier"], r["draw"])
    )
    for row in rows:
        mv, op = row["majority_vote"], row["operating_point"]
        lines.append(
            f"| {row['mean_training_images']:.0f} ({row['share']:g}, {row.get('by', 'blocks')}) | "
            f"{row['classifier']} | {row['draw']} | "
            f"{pct(mv['accuracy'])} {ci(mv['accuracy_ci'])} | {pct(mv['carcinoma_sensitivity'])} | "
            f"{pct(op['carcinoma_sensitivity'])} {ci(op['carcinoma_sensitivity_ci'])} | "
            f"{pct(op['carcinoma_specificity'])} {ci(op['carcinoma_specificity_ci'])} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
