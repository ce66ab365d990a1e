"""Cross-validation grouped by image, patient or any manifest column; voting over augmentations;
the seed study's metrics with standard definitions, and bootstrap intervals.

Folds: scikit-learn's StratifiedGroupKFold over split units, so every augmentation of an image (and
every image of a patient) is in one fold. Rows of the classifier are augmented images; each image's
decision is the majority vote over its A augmentations (ties broken by mean probability) or, side by
side, the argmax of the mean probability.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .classifier import BoostedTrees
from .config import Config, HistoboostError
from .data import GROUP_NAMES, Manifest

BINARY_TASKS = {  # name -> (negative groups, positive groups)
    "carcinoma": ((0,), (1, 2)),
    "0v1": ((0,), (1,)),
    "0v2": ((0,), (2,)),
    "1v2": ((1,), (2,)),
}
BOOTSTRAP_SAMPLES = 1000


class EvaluationError(HistoboostError):
    """Cross-validation cannot be run as asked; the message says why and what to change."""


@dataclass(frozen=True)
class FoldPlan:
    """The test fold of each image and the unit it was split by."""

    folds: np.ndarray  # (N,) fold index per image
    units: np.ndarray  # (N,) split unit per image (image id, patient id or column value)
    split_by: str
    n_folds: int
    warnings: tuple[str, ...] = ()


@dataclass
class CVResult:
    """Per-augmentation probabilities of one model (a backbone or a combination) on every image."""

    model: str
    aug_probs: np.ndarray  # (N, A, 3), each image predicted by the fold that held it out
    truth: np.ndarray  # (N,)
    plan: FoldPlan
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def mean_probs(self) -> np.ndarray:
        return self.aug_probs.mean(axis=1)

    @property
    def votes(self) -> np.ndarray:
        return vote_counts(self.aug_probs)

    @property
    def majority(self) -> np.ndarray:
        return majority_vote(self.aug_probs)

    @property
    def mean_decision(self) -> np.ndarray:
        return self.mean_probs.argmax(axis=1)


# -- folds ---------------------------------------------------------------------------------------


def make_folds(manifest: Manifest, split_by: str | None, n_folds: int, seed: int) -> FoldPlan:
    """Assign images to folds, grouping by `split_by` (image, patient or a manifest column).

    None means patient where the manifest has patient ids, else image (with a warning). Images
    without a value of the grouping column form units of their own. When a class has fewer units than
    folds, as many folds as that class allows are used (with a warning).
    """
    from sklearn.model_selection import StratifiedGroupKFold

    notes = []
    if split_by is None:
        split_by = "patient" if manifest.has_patients else "image"
        if split_by == "image":
            notes.append("no patient ids: folds are split by image, which overstates accuracy on new patients "
                         "(use --split-by patient or a proxy column such as id_block where one exists)")
    values = manifest.column(split_by)
    units = np.array([v if v else f"image:{r.image_id}" for v, r in zip(values, manifest)], dtype=object)
    groups = manifest.groups
    per_class = {g: len(set(units[groups == g])) for g in np.unique(groups)}
    usable = min(n_folds, *per_class.values())
    if usable < 2:
        raise EvaluationError(f"split by {split_by}: a class has only {min(per_class.values())} unit(s); "
                              "cross-validation needs at least 2 per class")
    if usable < n_folds:
        scarce = ", ".join(f"{GROUP_NAMES[g]} {n}" for g, n in per_class.items() if n < n_folds)
        notes.append(f"split by {split_by}: too few units per class for {n_folds} folds ({scarce}); "
                     f"using {usable} folds")
    splitter = StratifiedGroupKFold(n_splits=usable, shuffle=True, random_state=seed)
    folds = np.full(len(manifest), -1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # scikit-learn's note on scarce classes, said above
        for k, (_, test) in enumerate(splitter.split(np.zeros(len(groups)), groups, units)):
            folds[test] = k
    for k in range(usable):
        assert not set(units[folds == k]) & set(units[folds != k]), "a split unit is in training and test"
    return FoldPlan(folds, units, split_by, usable, tuple(notes))


# -- cross-validation ----------------------------------------------------------------------------


def cross_validate_features(X: np.ndarray, owners: np.ndarray, manifest: Manifest, plan: FoldPlan, config: Config,
                            model: str, device: str = "cpu", progress: bool = False) -> CVResult:
    """Train on the training folds' augmented images, predict each held-out image's augmentations."""
    from tqdm.auto import tqdm

    truth = manifest.groups
    n_aug = np.bincount(owners, minlength=len(manifest))
    if len(set(n_aug)) != 1:
        raise EvaluationError("every image needs the same number of augmentations")
    probs = np.zeros((len(manifest), n_aug[0], 3))
    row_fold = plan.folds[owners]
    for k in tqdm(range(plan.n_folds), desc=f"{model} folds", disable=not progress, leave=False):
        train, test = row_fold != k, row_fold == k
        clf = BoostedTrees(config.classifier, seed=config.seed, device=device)
        clf.fit(X[train], truth[owners[train]], groups=plan.units[owners[train]])
        test_images = np.flatnonzero(plan.folds == k)
        p = clf.predict_proba(X[test])
        order = owners[test]
        for i in test_images:
            probs[i] = p[order == i]
    return CVResult(model, probs, truth, plan)


def combine_mean(results: list[CVResult], name: str) -> CVResult:
    """A combination that averages the models' per-augmentation probabilities."""
    return CVResult(name, np.mean([r.aug_probs for r in results], axis=0), results[0].truth, results[0].plan)


@dataclass
class CVRun:
    """A whole cross-validation: the images, their folds, and each model's results."""

    config: Config
    plan: FoldPlan
    results: list[CVResult]
    image_ids: np.ndarray
    names: np.ndarray
    paths: np.ndarray
    patients: np.ndarray
    extraction: dict[str, Any] = field(default_factory=dict)

    @property
    def truth(self) -> np.ndarray:
        return self.results[0].truth

    def save(self, path: str | Path) -> None:
        """Everything `histoboost report` needs to rebuild metrics and report, as one .npz (atomic)."""
        import os

        path = Path(path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
        arrays = {f"probs__{r.model}": r.aug_probs for r in self.results}
        np.savez_compressed(
            tmp, image_ids=self.image_ids.astype(str), names=self.names.astype(str), paths=self.paths.astype(str),
            patients=self.patients.astype(str), truth=self.truth, folds=self.plan.folds,
            units=self.plan.units.astype(str), split_by=np.array(self.plan.split_by),
            warnings=np.array(self.plan.warnings, dtype=str), models=np.array([r.model for r in self.results]),
            **arrays)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path, config: Config) -> CVRun:
        try:
            with np.load(path, allow_pickle=False) as data:
                folds = data["folds"]
                plan = FoldPlan(folds, data["units"].astype(object), str(data["split_by"]), int(folds.max()) + 1,
                                tuple(str(w) for w in data["warnings"]))
                results = [CVResult(str(m), data[f"probs__{m}"], data["truth"], plan) for m in data["models"]]
                return cls(config, plan, results, data["image_ids"], data["names"], data["paths"], data["patients"])
        except (OSError, KeyError, ValueError, EOFError) as err:
            raise EvaluationError(f"{path}: damaged or not written by histoboost cv ({err}); rerun histoboost cv") \
                from None

    def evaluate(self) -> None:
        """Compute every model's metrics (stored on each result)."""
        for result in self.results:
            evaluate_result(result, self.config.seed, self.patients)


def cross_validate(manifest: Manifest, config: Config, cache_dir: str | Path | None = None, device: str = "cpu",
                   batch_size: int = 8, progress: bool = True) -> CVRun:
    """The seed study's protocol end to end: extract what the feature store lacks, split, train and
    predict each fold for each backbone and their combinations (concatenated features; averaged
    probabilities), all on the same folds, then compute the metrics."""
    from .features import describe_dataset

    plan = make_folds(manifest, config.evaluate.split_by, config.evaluate.folds, config.seed)
    described = describe_dataset(manifest, config, cache_dir, device, batch_size, progress)
    results = [cross_validate_features(d.X, d.owners, manifest, plan, config, d.backbone.name, device, progress)
               for d in described]
    if len(described) > 1:
        names = " + ".join(d.backbone.name for d in described)
        X = np.concatenate([d.X for d in described], axis=1)
        results.append(cross_validate_features(X, described[0].owners, manifest, plan, config, f"{names} (concat)",
                                               device, progress))
        results.append(combine_mean(results[:len(described)], f"{names} (mean prob)"))
    extraction = {d.backbone.name: d.provenance for d in described}
    run = CVRun(config, plan, results, np.array([r.image_id for r in manifest]), np.array([r.name for r in manifest]),
                np.array([str(r.path) for r in manifest]), np.array([r.patient or "" for r in manifest]), extraction)
    run.evaluate()
    return run


# -- voting --------------------------------------------------------------------------------------


def vote_counts(aug_probs: np.ndarray) -> np.ndarray:
    """Votes per class (N, 3): each augmentation votes for its most probable class."""
    winners = aug_probs.argmax(axis=2)
    return np.stack([(winners == c).sum(axis=1) for c in range(aug_probs.shape[2])], axis=1)


def majority_vote(aug_probs: np.ndarray) -> np.ndarray:
    """The class with most votes; a tie goes to the tied class with the highest mean probability."""
    votes = vote_counts(aug_probs)
    tied = votes == votes.max(axis=1, keepdims=True)
    return np.where(tied, aug_probs.mean(axis=1), -np.inf).argmax(axis=1)


# -- metrics -------------------------------------------------------------------------------------


def confusion_matrix(truth: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """3x3 counts, rows = truth, columns = prediction."""
    cm = np.zeros((3, 3), dtype=np.int64)
    np.add.at(cm, (np.asarray(truth), np.asarray(predicted)), 1)
    return cm


def binary_metrics(confusion: np.ndarray | list) -> dict[str, dict[str, float | None]]:
    """Sensitivity, specificity, precision and accuracy of each binary task of a 3x3 confusion matrix
    (rows = truth), with the standard definitions: positive = carcinoma, or the higher group of a pair.

    `carcinoma` collapses the matrix (1 + 2 vs 0); the pairs use their 2x2 sub-matrix, as the seed
    study does. (Its Table 1 swaps rows and columns; these are the textbook definitions.)
    """
    cm = np.asarray(confusion, dtype=np.int64)
    out = {}
    for name, (neg, pos) in BINARY_TASKS.items():
        tp = cm[np.ix_(pos, pos)].sum()
        fn = cm[np.ix_(pos, neg)].sum()
        fp = cm[np.ix_(neg, pos)].sum()
        tn = cm[np.ix_(neg, neg)].sum()
        out[name] = {"sensitivity": _ratio(tp, tp + fn), "specificity": _ratio(tn, tn + fp),
                     "precision": _ratio(tp, tp + fp), "accuracy": _ratio(tp + tn, tp + tn + fp + fn),
                     "tp": int(tp), "fn": int(fn), "fp": int(fp), "tn": int(tn)}
    return out


def binary_aucs(truth: np.ndarray, probs: np.ndarray) -> dict[str, float | None]:
    """ROC AUC of each binary task from mean probabilities (positive score: p(pos) / p(neg or pos))."""
    from sklearn.metrics import roc_auc_score

    out: dict[str, float | None] = {}
    for name, (neg, pos) in BINARY_TASKS.items():
        keep = np.isin(truth, neg + pos)
        positive = np.isin(truth[keep], pos)
        if positive.all() or not positive.any():
            out[name] = None
            continue
        p_pos = probs[keep][:, list(pos)].sum(axis=1)
        p_neg = probs[keep][:, list(neg)].sum(axis=1)
        out[name] = float(roc_auc_score(positive, p_pos / np.maximum(p_pos + p_neg, 1e-12)))
    return out


def carcinoma_roc(truth: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """ROC curve points (false-positive rate, sensitivity) of carcinoma vs not, scored by p1 + p2."""
    from sklearn.metrics import roc_curve

    positive = truth > 0
    if positive.all() or not positive.any():
        return None
    fpr, tpr, _ = roc_curve(positive, probs[:, 1:].sum(axis=1))
    return fpr, tpr


def decision_metrics(truth: np.ndarray, decision: np.ndarray, folds: np.ndarray, units: np.ndarray,
                     seed: int) -> dict[str, Any]:
    """Pooled accuracy (the seed study's headline) with per-fold accuracy, a bootstrap 95% interval
    over split units, the confusion matrix, balanced accuracy and the binary tasks with intervals."""
    cm = confusion_matrix(truth, decision)
    per_fold = [float((decision[folds == k] == truth[folds == k]).mean()) for k in np.unique(folds)]
    boot = _bootstrap(truth, decision, units, seed)
    binary = binary_metrics(cm)
    for task, values in binary.items():
        for metric in ("sensitivity", "specificity", "precision", "accuracy"):
            samples = [b[task][metric] for b in boot["binary"] if b[task][metric] is not None]
            values[f"{metric}_ci"] = _interval(samples)
    return {
        "accuracy": float((decision == truth).mean()),
        "accuracy_ci": _interval(boot["accuracy"]),
        "per_fold_accuracy": per_fold,
        "fold_mean": float(np.mean(per_fold)), "fold_std": float(np.std(per_fold, ddof=1)) if len(per_fold) > 1 else 0.0,
        "balanced_accuracy": _balanced_accuracy(cm),
        "confusion": cm.tolist(),
        "binary": binary,
    }


def evaluate_result(result: CVResult, seed: int, patients: np.ndarray | None = None) -> dict[str, Any]:
    """All metrics of a model, for both decisions; stored on the result and returned."""
    plan = result.plan
    metrics: dict[str, Any] = {
        "model": result.model, "split_by": plan.split_by, "folds": plan.n_folds, "images": len(result.truth),
        "augmentations": int(result.aug_probs.shape[1]),
        "majority_vote": decision_metrics(result.truth, result.majority, plan.folds, plan.units, seed),
        "mean_probability": decision_metrics(result.truth, result.mean_decision, plan.folds, plan.units, seed),
        "per_augmentation_accuracy": float((result.aug_probs.argmax(2) == result.truth[:, None]).mean()),
        "auc": binary_aucs(result.truth, result.mean_probs),
    }
    if patients is not None and any(patients):
        metrics["per_patient"] = _per_patient(patients, result)
    result.metrics = metrics
    return metrics


def _per_patient(patients: np.ndarray, result: CVResult) -> list[dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    for patient, truth, decision in zip(patients, result.truth, result.majority):
        patient = patient or "(unknown)"
        row = rows.setdefault(patient, {"patient": patient, "images": 0, "correct": 0, "missed_carcinoma": 0})
        row["images"] += 1
        row["correct"] += int(truth == decision)
        row["missed_carcinoma"] += int(truth > 0 and decision == 0)
    return sorted(rows.values(), key=lambda r: r["patient"])


def _bootstrap(truth: np.ndarray, decision: np.ndarray, units: np.ndarray, seed: int) -> dict[str, list]:
    """Resample split units (not images: images of one unit are not independent) with replacement."""
    rng = np.random.default_rng([seed, 20220101])
    unique, index = np.unique(units.astype(str), return_inverse=True)
    members = [np.flatnonzero(index == u) for u in range(len(unique))]
    accuracy, binary = [], []
    for _ in range(BOOTSTRAP_SAMPLES):
        pick = np.concatenate([members[u] for u in rng.integers(0, len(unique), len(unique))])
        accuracy.append(float((truth[pick] == decision[pick]).mean()))
        binary.append(binary_metrics(confusion_matrix(truth[pick], decision[pick])))
    return {"accuracy": accuracy, "binary": binary}


def _interval(samples: list[float]) -> list[float] | None:
    if not samples:
        return None
    low, high = np.percentile(samples, [2.5, 97.5])
    return [float(low), float(high)]


def _balanced_accuracy(cm: np.ndarray) -> float:
    recalls = [cm[c, c] / cm[c].sum() for c in range(3) if cm[c].sum()]
    return float(np.mean(recalls))


def _ratio(a: int, b: int) -> float | None:
    return float(a / b) if b else None
