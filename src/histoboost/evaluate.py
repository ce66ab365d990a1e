"""Cross-validation grouped by image, patient or any manifest column; voting over augmentations;
the seed study's metrics with standard definitions, and bootstrap intervals.

Folds: scikit-learn's StratifiedGroupKFold over split units, so every augmentation of an image (and
every image of a patient) is in one fold. Rows of the classifier are augmented images; each image's
decision is the majority vote over its A augmentations (ties broken by mean probability) or, side by
side, the argmax of the mean probability.
"""

from __future__ import annotations

import json
import warnings
import zipfile
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple, cast

import numpy as np

from .classifier import (
    DecisionRule,
    fit_decision_rule,
    group_probs,
    majority_vote,
    make_classifier,
    mean_decision,
    n_classes,
    vote_counts,
)
from .config import Config
from .data import CLASS_SCHEMES, GROUPS, ClassScheme, DataError, Manifest, class_scheme
from .errors import EvaluationError, HistoboostError
from .inference import Predictor
from .progress import Progress
from .runtime import Runtime
from .storage import local_folder

BINARY_TASKS = {  # name -> (negative groups, positive groups)
    "carcinoma": ((0,), (1, 2)),
    "0v1": ((0,), (1,)),
    "0v2": ((0,), (2,)),
    "1v2": ((1,), (2,)),
}
BOOTSTRAP_SAMPLES = 1000


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
    """Per-augmentation probabilities of one model (a backbone or a combination) on every image, in the classes
    of its scheme (`grouped` gives the 3 diagnostic groups derived from them)."""

    model: str
    aug_probs: np.ndarray  # (N, A, K), each image predicted by the fold that held it out
    truth: np.ndarray  # (N,) class indices
    plan: FoldPlan
    metrics: dict[str, Any] = field(default_factory=dict)
    # The operating point, where one was chosen: each fold's rule (fitted on its training images) and
    # the decision and augmentation agreement it gives each held-out image.
    rules: list[DecisionRule] | None = None
    decision: np.ndarray | None = None
    agreement: np.ndarray | None = None
    classes: ClassScheme = CLASS_SCHEMES["groups"]
    source: CVResult | None = None  # for a `grouped` view: the class-level result it was derived from

    @property
    def mean_probs(self) -> np.ndarray:
        return self.aug_probs.mean(axis=1)

    @property
    def votes(self) -> np.ndarray:
        return vote_counts(self.aug_probs, self.classes.groups)

    @property
    def majority(self) -> np.ndarray:
        return majority_vote(self.aug_probs, self.classes.groups)

    @property
    def mean_decision(self) -> np.ndarray:
        return mean_decision(self.aug_probs, self.classes.groups)

    def grouped(self) -> CVResult:
        """The same predictions in the 3 diagnostic groups: probabilities summed per group, decisions mapped to
        their group (decisions are taken group first, so these equal the decisions on the summed probabilities)."""
        if self.classes.is_groups:
            return self
        to_group = np.asarray(self.classes.groups)
        rules = None if self.rules is None else [replace(r, groups=GROUPS) for r in self.rules]
        return CVResult(
            self.model,
            group_probs(self.aug_probs, self.classes.groups),
            to_group[self.truth],
            self.plan,
            self.metrics,
            rules,
            None if self.decision is None else to_group[self.decision],
            self.agreement,
            source=self,
        )

    @property
    def referred(self) -> np.ndarray:
        """Images whose augmentations disagree too much with the decision, by their fold's rule (N,)."""
        refer = np.zeros(len(self.truth), dtype=bool)
        agreement = cast(np.ndarray, self.agreement)  # set wherever rules are
        for k, rule in enumerate(self.rules or []):
            fold = self.plan.folds == k
            refer[fold] = rule.refer(agreement[fold])
        return refer


# -- folds ---------------------------------------------------------------------------------------


def make_folds(
    manifest: Manifest, split_by: str | None, n_folds: int, seed: int, classes: ClassScheme = CLASS_SCHEMES["groups"]
) -> FoldPlan:
    """Assign images to folds, grouping by `split_by` (image, patient or a manifest column), stratified by the
    scheme's classes.

    None means patient where the manifest has patient ids, else image (with a warning). Images
    without a value of the grouping column form units of their own. When a class has fewer units than
    folds, as many folds as that class allows are used (with a warning).
    """
    from sklearn.model_selection import StratifiedGroupKFold

    notes = []
    if split_by is None and not manifest.has_patients:
        notes.append(
            "no patient ids: folds are split by image, which overstates accuracy on new patients "
            "(use --split-by patient or a proxy column such as id_block where one exists)"
        )
    split_by, units = split_units(manifest, split_by)
    try:
        groups = classes.targets(manifest)
    except DataError as err:
        raise EvaluationError(str(err)) from None
    per_class = {g: len(set(units[groups == g])) for g in np.unique(groups)}
    usable = min(n_folds, *per_class.values())
    if usable < 2:
        raise EvaluationError(
            f"split by {split_by}: a class has only {min(per_class.values())} unit(s); "
            "cross-validation needs at least 2 per class"
        )
    if usable < n_folds:
        scarce = ", ".join(f"{classes.classes[g]} {n}" for g, n in per_class.items() if n < n_folds)
        notes.append(
            f"split by {split_by}: too few units per class for {n_folds} folds ({scarce}); using {usable} folds"
        )
    splitter = StratifiedGroupKFold(n_splits=usable, shuffle=True, random_state=seed)
    folds = np.full(len(manifest), -1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # scikit-learn's note on scarce classes, said above
        for k, (_, test) in enumerate(splitter.split(np.zeros(len(groups)), groups, units)):
            folds[test] = k
    for k in range(usable):
        assert not set(units[folds == k]) & set(units[folds != k]), "a split unit is in training and test"
    return FoldPlan(folds, units, split_by, usable, tuple(notes))


def check_split(manifest: Manifest, config: Config) -> None:
    """The config's split unit is one the data has, and every label is one of its classes: checked before any
    extraction, whoever calls (cross-validation, training, the command line)."""
    try:
        split_units(manifest, config.evaluate.split_by)
    except DataError as err:
        raise EvaluationError(f"--split-by {config.evaluate.split_by}: {err}") from None
    try:
        class_scheme(config.classifier.classes).targets(manifest)
    except DataError as err:
        raise EvaluationError(f"{manifest.root}: {err}") from None


def split_units(manifest: Manifest, split_by: str | None) -> tuple[str, np.ndarray]:
    """The split unit of each image, and the unit's name: `split_by` (None = patient where the
    manifest has patient ids, else image); an image without a value is a unit of its own."""
    if split_by is None:
        split_by = "patient" if manifest.has_patients else "image"
    values = manifest.column(split_by)
    return split_by, np.array([v if v else f"image:{r.image_id}" for v, r in zip(values, manifest)], dtype=object)


# -- cross-validation ----------------------------------------------------------------------------


def cross_validate_features(
    X: np.ndarray | list[np.ndarray],
    owners: np.ndarray,
    manifest: Manifest,
    plan: FoldPlan,
    config: Config,
    model: str,
    device: str = "cpu",
    progress: Progress = False,
    unseen: list[np.ndarray] | None = None,
    engine=None,
) -> CVResult:
    """Train on the training folds' augmented images, predict each held-out image's augmentations.
    `X` is one matrix for all folds, or one per fold (features of a backbone fine-tuned in that fold);
    `unseen` then marks, per fold, the training images its fine-tuning did not train on (per image), on
    which the decision rule is chosen. Each fold is one `fit_fold` task of `engine` (default: this process):
    the same call with the same threads wherever it runs, so local and Dask folds are byte-identical."""
    from .engine import LocalEngine, TaskLost
    from .progress import meter

    engine = engine or LocalEngine()
    scheme = class_scheme(config.classifier.classes)
    try:
        truth = scheme.targets(manifest)
    except DataError as err:
        raise EvaluationError(str(err)) from None
    n_aug = np.bincount(owners, minlength=len(manifest))
    if len(set(n_aug)) != 1:
        raise EvaluationError("every image needs the same number of augmentations")
    probs = np.zeros((len(manifest), n_aug[0], n_classes(config.classifier)))
    decision, agreement = np.zeros(len(manifest), dtype=np.int64), np.zeros(len(manifest))
    rules: list = [None] * plan.n_folds
    row_fold = plan.folds[owners]
    row_units = plan.units[owners]
    row_y = truth[owners]
    shared: dict[int, Any] = {}
    for x in X if isinstance(X, list) else [X]:
        if id(x) not in shared:
            shared[id(x)] = engine.share(x)
    matrices = [shared[id(x)] for x in X] if isinstance(X, list) else [shared[id(X)]] * plan.n_folds
    tasks = [
        FoldTask(
            matrices[k],
            owners,
            row_y,
            row_fold,
            row_units,
            k,
            config,
            device,
            None if unseen is None else unseen[k][owners],
            engine.threads,
        )
        for k in range(plan.n_folds)
    ]
    bar = meter(f"{model} folds", plan.n_folds, "fold", progress, leave=False)
    for task, outcome in engine.map(fit_fold, tasks):
        k = task.k
        if isinstance(outcome, TaskLost):
            raise EvaluationError(
                f"fold {k + 1}: {outcome.reason}: give the workers more memory (--memory-limit) "
                "and rerun (stored features are reused)"
            )
        rule, p = outcome
        test_images = np.flatnonzero(plan.folds == k)
        order = owners[row_fold == k]
        for i in test_images:
            probs[i] = p[order == i]
        decision[test_images], agreement[test_images] = rule.decide(probs[test_images])
        rules[k] = rule
        bar.update(1)
    bar.close()
    if not config.classifier.decides_by_rule:
        return CVResult(model, probs, truth, plan, classes=scheme)  # the seed study's majority vote only
    return CVResult(model, probs, truth, plan, rules=rules, decision=decision, agreement=agreement, classes=scheme)


class FoldTask(NamedTuple):
    """One engine task: outer fold `k`'s rows (the matrix X shared with the workers, each row's image, class, fold and
    split unit), the config, and the device and threads to fit with. A NamedTuple, not a dataclass: Dask puts the
    shared matrix in place of its Future only inside tuples, lists, dicts and named tuples."""

    X: Any
    owners: np.ndarray
    y: np.ndarray
    row_fold: np.ndarray
    row_units: np.ndarray
    k: int
    config: Config
    device: str
    unseen: np.ndarray | None
    threads: int | None


def fit_fold(task: FoldTask):
    """Outer fold `k` (pure): fit the classifier and the decision rule on the other folds' rows with XGBoost on
    `threads` threads, and return (rule, probabilities of fold k's rows in row order)."""
    X, owners, y, row_fold, row_units, k = task.X, task.owners, task.y, task.row_fold, task.row_units, task.k
    config, device, unseen, threads = task.config, task.device, task.unseen, task.threads
    train, test = row_fold != k, row_fold == k
    clf = make_classifier(config.classifier, seed=config.seed, device=device, threads=threads)
    clf.fit(X[train], y[train], groups=row_units[train])
    try:
        rule = fit_decision_rule(
            X[train],
            y[train],
            owners[train],
            row_units[train],
            config.classifier,
            config.seed,
            device,
            None if unseen is None else unseen[train],
            threads,
        )
    except ValueError as err:
        raise EvaluationError(
            f"fold {k + 1}: {err}; use fewer --folds or --inner-folds, or split by a finer unit"
        ) from None
    return rule, clf.predict_proba(X[test])


def evaluate_predictor(predictor: Predictor, manifest: Manifest) -> CVRun:
    """Predict a labelled set held out from training and compute the cross-validation metrics on it (one "fold":
    the whole set), with the predictor's own decision rule where it decides by one."""
    from .progress import track

    seen = [r for r in manifest if r.image_id in predictor.identity.training_image_ids]
    if seen:
        raise EvaluationError(
            f"{len(seen)} of the {len(manifest)} images were in the bundle's training set (e.g. "
            f"{seen[0].path}): evaluating on them overstates accuracy; remove them and evaluate on "
            "images the model never saw"
        )
    try:
        truth = predictor.classes.targets(manifest)
    except HistoboostError as err:
        raise EvaluationError(str(err)) from None
    lost = predictor.describe_on_engine(manifest.records)  # on Dask workers first, when the runtime has them
    if lost:
        raise DataError(f"{len(lost)} image(s) could not be described", tuple(lost.values()))
    predictions = [
        predictor.predict_image(r.path, r.image_id, r.mpp, r.mode)[0]
        for r in track(manifest.records, "predicting", progress=predictor.runtime.progress)
    ]
    n = len(manifest)
    plan = FoldPlan(
        np.zeros(n, dtype=np.int64),
        np.array([r.patient or r.image_id for r in manifest], dtype=object),
        "held-out set",
        1,
    )
    result = CVResult("bundle", np.stack([p.aug_probs for p in predictions]), truth, plan, classes=predictor.classes)
    if predictor.config.classifier.decides_by_rule:  # the model's operating point, as cross-validation reports it
        result.rules = [predictor.rule]
        result.decision = np.array([p.decision for p in predictions])
        result.agreement = np.array([p.agreement for p in predictions])
    run = CVRun(
        predictor.config,
        plan,
        [result],
        np.array([r.image_id for r in manifest]),
        np.array([r.name for r in manifest]),
        np.array([str(r.path) for r in manifest]),
        np.array([r.patient or "" for r in manifest]),
    )
    run.evaluate()
    return run


def combine_mean(results: list[CVResult], name: str) -> CVResult:
    """A combination that averages the models' per-augmentation probabilities."""
    return CVResult(
        name,
        np.mean([r.aug_probs for r in results], axis=0),
        results[0].truth,
        results[0].plan,
        classes=results[0].classes,
    )


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
    # Per image: "" or what replaced a failed normalisation. None (none known: no image fell back) is replaced by
    # all "" in __post_init__, so the field is an array once the run exists.
    stain_fallbacks: np.ndarray = None  # type: ignore[assignment]
    # The same models cross-validated under another split, summarised (e.g. image split beside patient
    # split), so the report can show how much grouping by image overstates accuracy.
    split_comparison: list[dict[str, Any]] = field(default_factory=list)
    # With fine-tuning: per outer fold and backbone, the weights, what they were trained on and how.
    finetuned: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.stain_fallbacks is None:  # none known: no image fell back
            self.stain_fallbacks = np.full(len(self.image_ids), "")

    @property
    def truth(self) -> np.ndarray:
        return self.results[0].truth

    @property
    def classes(self) -> ClassScheme:
        return self.results[0].classes

    def save(self, path: str | Path) -> None:
        """Everything `histoboost report` needs to rebuild metrics and report, as one .npz (atomic)."""
        from .storage import write_npz

        arrays = {f"probs__{r.model}": r.aug_probs for r in self.results}
        for r in self.results:
            if r.rules is not None:
                # decision and agreement are set wherever rules are
                arrays.update(
                    {
                        f"decision__{r.model}": cast(np.ndarray, r.decision),
                        f"agreement__{r.model}": cast(np.ndarray, r.agreement),
                        f"rules__{r.model}": np.array(json.dumps([rule.to_dict() for rule in r.rules])),
                    }
                )
        write_npz(
            Path(path),
            dict(
                image_ids=self.image_ids.astype(str),
                names=self.names.astype(str),
                paths=self.paths.astype(str),
                patients=self.patients.astype(str),
                truth=self.truth,
                folds=self.plan.folds,
                units=self.plan.units.astype(str),
                split_by=np.array(self.plan.split_by),
                stain_fallbacks=self.stain_fallbacks.astype(str),
                split_comparison=np.array(json.dumps(self.split_comparison)),
                finetuned=np.array(json.dumps(self.finetuned)),
                warnings=np.array(self.plan.warnings, dtype=str),
                models=np.array([r.model for r in self.results]),
                **arrays,
            ),
            compressed=True,
        )

    @classmethod
    def load(cls, path: str | Path, config: Config) -> CVRun:
        try:
            with np.load(path, allow_pickle=False) as data:
                folds = data["folds"]
                plan = FoldPlan(
                    folds,
                    data["units"].astype(object),
                    str(data["split_by"]),
                    int(folds.max()) + 1,
                    tuple(str(w) for w in data["warnings"]),
                )
                results, scheme = [], class_scheme(config.classifier.classes)
                for m in map(str, data["models"]):
                    result = CVResult(m, data[f"probs__{m}"], data["truth"], plan, classes=scheme)
                    if result.aug_probs.shape[-1] != len(scheme.classes):
                        raise ValueError(
                            f"{result.aug_probs.shape[-1]} classes, not the {len(scheme.classes)} of its config"
                        )
                    if f"rules__{m}" in data:
                        result.rules = [DecisionRule(**r) for r in json.loads(str(data[f"rules__{m}"]))]
                        result.decision, result.agreement = data[f"decision__{m}"], data[f"agreement__{m}"]
                    results.append(result)
                run = cls(config, plan, results, data["image_ids"], data["names"], data["paths"], data["patients"])
                if "stain_fallbacks" in data:
                    run.stain_fallbacks = data["stain_fallbacks"]
                if "split_comparison" in data:
                    run.split_comparison = json.loads(str(data["split_comparison"]))
                if "finetuned" in data:
                    run.finetuned = json.loads(str(data["finetuned"]))
                return run
        except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as err:
            reason = str(err).splitlines()[0][:120] if str(err) else type(err).__name__
            raise EvaluationError(
                f"{path}: damaged or not written by histoboost cv ({reason}); rerun histoboost cv"
            ) from None

    def evaluate(self) -> None:
        """Compute every model's metrics (stored on each result)."""
        for result in self.results:
            evaluate_result(result, self.config.seed, self.patients)

    def metrics(self, model: str | None = None) -> Metrics:
        """One model's metrics (default: the first, the run's own backbone or combination) at the decision its
        config makes: the operating point where it decides by one, else the majority vote."""
        names = [r.model for r in self.results]
        if model is not None and model not in names:
            raise EvaluationError(f"no model {model!r} in this run: it has {', '.join(names)}")
        result = self.results[names.index(model) if model else 0]
        if not result.metrics:
            evaluate_result(result, self.config.seed, self.patients)
        return Metrics.of(result.metrics)


@dataclass(frozen=True)
class Metrics:
    """A model's held-out metrics at one decision, typed (the full set stays in `CVResult.metrics` and
    metrics.json): accuracy with its 95% bootstrap interval over split units, balanced accuracy, carcinoma
    sensitivity and specificity (in situ or invasive vs normal/benign), the carcinoma ROC AUC of the mean
    probabilities, the share referred, and the 3-group confusion matrix (rows: truth)."""

    model: str
    decision: str  # "operating_point" or "majority_vote"
    images: int
    split_by: str
    folds: int
    accuracy: float
    accuracy_ci: tuple[float, float] | None
    balanced_accuracy: float
    carcinoma_sensitivity: float | None
    carcinoma_specificity: float | None
    carcinoma_auc: float | None
    refer_rate: float | None
    confusion: np.ndarray

    @classmethod
    def of(cls, metrics: dict[str, Any]) -> Metrics:
        """From one result's metrics dict (`evaluate_result`)."""
        decision = "operating_point" if "operating_point" in metrics else "majority_vote"
        chosen = metrics[decision]
        carcinoma = chosen["binary"]["carcinoma"]
        interval = chosen.get("accuracy_ci")
        return cls(
            metrics["model"],
            decision,
            metrics["images"],
            metrics["split_by"],
            metrics["folds"],
            chosen["accuracy"],
            tuple(interval) if interval else None,
            chosen["balanced_accuracy"],
            carcinoma["sensitivity"],
            carcinoma["specificity"],
            metrics["auc"].get("carcinoma"),
            chosen.get("refer_rate"),
            np.array(chosen["confusion"]),
        )


def cross_validate(
    manifest: Manifest, config: Config, runtime: Runtime | None = None, compare_split: str | None = None
) -> CVRun:
    """The seed study's protocol end to end: extract what the feature store lacks, split, train and
    predict each fold for each backbone and their combinations (concatenated features; averaged
    probabilities), all on the same folds, then compute the metrics. With `compare_split` (a unit, or
    "auto": see `default_comparison_split`), each backbone is also cross-validated split by that unit,
    for the report's side-by-side table. With `config.finetune.enabled`, each backbone is fine-tuned inside
    every outer fold on that fold's training images only (`finetuned_features`). Extraction and folds run on
    the runtime's engine (default: this process)."""
    from .features import describe_dataset

    check_split(manifest, config)
    runtime = runtime or Runtime()
    device, progress, engine = runtime.device, runtime.progress, runtime.engine

    scheme = class_scheme(config.classifier.classes)
    plan = make_folds(manifest, config.evaluate.split_by, config.evaluate.folds, config.seed, scheme)
    if compare_split == "auto":
        compare_split = default_comparison_split(manifest, plan.split_by)
    # Both splits are made before any work, so a bad split unit stops the run before it computes anything.
    # With fine-tuning the other split would fine-tune again in each of its folds: not done.
    other = (
        make_folds(manifest, compare_split, config.evaluate.folds, config.seed, scheme)
        if compare_split and compare_split not in ("none", plan.split_by) and not config.finetune.enabled
        else None
    )
    finetuned: list[dict[str, Any]] = []
    unseen = None
    if config.finetune.enabled:
        per_fold, unseen = finetuned_features(manifest, config, plan, runtime, finetuned)
    else:
        per_fold = [describe_dataset(manifest, config, runtime)] * plan.n_folds
    described = per_fold[0]
    names = [d.backbone.name for d in described]
    results = [
        cross_validate_features(
            [fold[b].X for fold in per_fold],
            d.owners,
            manifest,
            plan,
            config,
            d.backbone.name,
            device,
            progress,
            unseen,
            engine,
        )
        for b, d in enumerate(described)
    ]
    if len(described) > 1:
        joined = {id(fold): np.concatenate([d.X for d in fold], axis=1) for fold in per_fold}  # once per distinct fold
        X = [joined[id(fold)] for fold in per_fold]
        results.append(
            cross_validate_features(
                X,
                described[0].owners,
                manifest,
                plan,
                config,
                f"{' + '.join(names)} (concat)",
                device,
                progress,
                unseen,
                engine,
            )
        )
        results.append(combine_mean(results[: len(described)], f"{' + '.join(names)} (mean prob)"))
    extraction = (
        {d.backbone.name: d.provenance for d in described}
        if not finetuned
        else {name: [fold[b].provenance for fold in per_fold] for b, name in enumerate(names)}
    )
    run = CVRun(
        config,
        plan,
        results,
        np.array([r.image_id for r in manifest]),
        np.array([r.name for r in manifest]),
        np.array([str(r.path) for r in manifest]),
        np.array([r.patient or "" for r in manifest]),
        extraction,
        np.array(described[0].stain_fallbacks, dtype=str),
        finetuned=finetuned,
    )
    run.evaluate()
    run.split_comparison = [split_summary(r, config.seed) for r in results[: len(described)]]
    if other is not None:
        for d in described:
            result = cross_validate_features(
                d.X, d.owners, manifest, other, config, d.backbone.name, device, progress, engine=engine
            )
            evaluate_result(result, config.seed)
            run.split_comparison.append(split_summary(result, config.seed))
    return run


def finetuned_features(
    manifest: Manifest, config: Config, plan: FoldPlan, runtime: Runtime, records: list[dict[str, Any]]
) -> tuple[list[list], list[np.ndarray]]:
    """Per outer fold: each backbone fine-tuned on that fold's training images only (its own validation
    part split off from them by unit), then every image described with it. Returns each fold's
    descriptions and which images no fine-tuning of the fold trained on (per image: its test images and
    the validation part). Appends one record per fold and backbone to `records`, and stops if a test
    image is found in a fine-tuning card (a bug)."""
    from .features import default_cache_dir, describe_dataset
    from .finetune import finetune_cached, prepare_training_images

    cache_dir = local_folder(runtime.cache_dir or default_cache_dir(), "fine-tuned weights")
    runtime = replace(runtime, cache_dir=cache_dir)
    device, progress = runtime.device, runtime.progress
    images = prepare_training_images(manifest, config, plan.units, progress=progress)
    ids = np.array([r.image_id for r in manifest])
    per_fold, unseen = [], []
    for k in range(plan.n_folds):
        training = [images[i] for i in np.flatnonzero(plan.folds != k)]
        weights, trained_on = [], set()
        for name in config.features.backbones:
            result = finetune_cached(training, config, name, cache_dir, config.weights_for(name), device, progress)
            data = result.card["data"]
            seen = set(data["train_images"]) | set(data["validation_images"])
            trained_on |= set(data["train_images"])
            leaked = seen & set(ids[plan.folds == k])
            if leaked:
                raise EvaluationError(
                    f"fold {k + 1}: {len(leaked)} test image(s) in the fine-tuning data of "
                    f"{result.weights}: remove that folder and report this bug"
                )
            weights.append(f"{name}={result.weights}")
            records.append(
                {
                    "fold": k,
                    "backbone": name,
                    "weights": str(result.weights),
                    "weights_sha256": result.card["weights_sha256"],
                    "reused": result.reused,
                    "train_images": len(data["train_images"]),
                    "validation_images": len(data["validation_images"]),
                    "test_images": int((plan.folds == k).sum()),
                    "test_images_in_finetuning": len(leaked),
                    "best_epoch": result.card["best_epoch"],
                    "epochs_run": result.card["epochs_run"],
                    "best_val_accuracy": max(
                        (h["val_accuracy"] for h in result.card["history"] if h["epoch"] == result.card["best_epoch"]),
                        default=None,
                    ),
                    "seconds": round(sum(h["seconds"] for h in result.card["history"]), 1),
                }
            )
        fold_config = config.merged({"features.weights": weights})
        per_fold.append(describe_dataset(manifest, fold_config, runtime))
        unseen.append(~np.isin(ids, list(trained_on)))
    return per_fold, unseen


def default_comparison_split(manifest: Manifest, split_by: str) -> str | None:
    """The split to show beside the chosen one: image beside patient (or any column), and patient
    beside image where patients are known; None when there is nothing honest to compare with."""
    if split_by != "image":
        return "image"
    return "patient" if manifest.has_patients else None


def split_summary(result: CVResult, seed: int) -> dict[str, Any]:
    """One row of the split comparison: accuracy and carcinoma sensitivity/specificity (majority vote,
    and at the operating point where one is set)."""
    votes = result.metrics["majority_vote"]
    carcinoma = votes["binary"]["carcinoma"]
    row = {
        "model": result.model,
        "split_by": result.plan.split_by,
        "folds": result.plan.n_folds,
        "new_patients": result.plan.split_by != "image",
        "accuracy": votes["accuracy"],
        "accuracy_ci": votes["accuracy_ci"],
        "carcinoma_sensitivity": carcinoma["sensitivity"],
        "carcinoma_specificity": carcinoma["specificity"],
    }
    if "operating_point" in result.metrics:
        op = result.metrics["operating_point"]
        row["operating_point"] = {
            "accuracy": op["accuracy"],
            "carcinoma_sensitivity": op["binary"]["carcinoma"]["sensitivity"],
            "carcinoma_specificity": op["binary"]["carcinoma"]["specificity"],
            "refer_rate": op["refer_rate"],
        }
    return row


# -- metrics -------------------------------------------------------------------------------------


def confusion_matrix(truth: np.ndarray, predicted: np.ndarray, k: int = 3) -> np.ndarray:
    """k x k counts (3 groups by default), rows = truth, columns = prediction."""
    cm = np.zeros((k, k), dtype=np.int64)
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
        out[name] = {
            "sensitivity": _ratio(tp, tp + fn),
            "specificity": _ratio(tn, tn + fp),
            "precision": _ratio(tp, tp + fp),
            "accuracy": _ratio(tp + tn, tp + tn + fp + fn),
            "tp": int(tp),
            "fn": int(fn),
            "fp": int(fp),
            "tn": int(tn),
        }
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


def decision_metrics(
    truth: np.ndarray, decision: np.ndarray, folds: np.ndarray, units: np.ndarray, seed: int, k: int = 3
) -> dict[str, Any]:
    """Pooled accuracy (the seed study's headline) with per-fold accuracy, a bootstrap 95% interval
    over split units, the k x k confusion matrix and balanced accuracy; with the 3 groups (k = 3) the
    binary tasks with intervals, with other classes the balanced accuracy's interval."""
    cm = confusion_matrix(truth, decision, k)
    per_fold = [float((decision[folds == f] == truth[folds == f]).mean()) for f in np.unique(folds)]
    boot = _bootstrap(truth, decision, units, seed, k)
    out = {
        "accuracy": float((decision == truth).mean()),
        "accuracy_ci": _interval(boot["accuracy"]),
        "per_fold_accuracy": per_fold,
        "fold_mean": float(np.mean(per_fold)),
        "fold_std": float(np.std(per_fold, ddof=1)) if len(per_fold) > 1 else 0.0,
        "balanced_accuracy": _balanced_accuracy(cm),
        "confusion": cm.tolist(),
    }
    if k != 3:
        out["balanced_accuracy_ci"] = _interval(boot["balanced_accuracy"])
        return out
    binary: dict[str, dict[str, Any]] = binary_metrics(cm)  # gains a list per interval below
    for task, values in binary.items():
        for metric in ("sensitivity", "specificity", "precision", "accuracy"):
            samples = [b[task][metric] for b in boot["binary"] if b[task][metric] is not None]
            values[f"{metric}_ci"] = _interval(samples)
    out["binary"] = binary
    return out


def evaluate_result(result: CVResult, seed: int, patients: np.ndarray | None = None) -> dict[str, Any]:
    """All metrics of a model, for both decisions; stored on the result and returned. The 3-group metrics come
    from the `grouped` predictions; a scheme of other classes adds its own under "classes"."""
    source, result = result, result.grouped()
    plan = result.plan
    metrics: dict[str, Any] = {
        "model": result.model,
        "split_by": plan.split_by,
        "folds": plan.n_folds,
        "images": len(result.truth),
        "augmentations": int(result.aug_probs.shape[1]),
        "majority_vote": decision_metrics(result.truth, result.majority, plan.folds, plan.units, seed),
        "mean_probability": decision_metrics(result.truth, result.mean_decision, plan.folds, plan.units, seed),
        "per_augmentation_accuracy": float((result.aug_probs.argmax(2) == result.truth[:, None]).mean()),
        "auc": binary_aucs(result.truth, result.mean_probs),
    }
    metrics["calibration"] = {"raw": calibration(result.truth, result.mean_probs)}
    if result.rules is not None:
        metrics["operating_point"] = operating_point_metrics(result, seed)
        if any(rule.temperature != 1.0 for rule in result.rules):
            metrics["calibration"]["calibrated"] = calibration(result.truth, calibrated_probs(result).mean(axis=1))
    if patients is not None and any(patients):
        metrics["per_patient"] = _per_patient(patients, result)
    if source is not result:
        metrics["classes"] = class_metrics(source, seed)
    source.metrics = metrics
    return metrics


def class_metrics(result: CVResult, seed: int) -> dict[str, Any]:
    """Metrics in the scheme's own classes (e.g. BACH's 4): accuracy and balanced accuracy with bootstrap
    intervals over split units, per-fold accuracy and the K x K confusion matrix, for each decision."""
    plan, k = result.plan, len(result.classes.classes)
    decisions = {"majority_vote": result.majority, "mean_probability": result.mean_decision}
    if result.decision is not None:
        decisions["operating_point"] = result.decision
    out: dict[str, Any] = {"scheme": result.classes.name, "names": list(result.classes.classes)}
    for name, decision in decisions.items():
        out[name] = decision_metrics(result.truth, decision, plan.folds, plan.units, seed, k)
    return out


def operating_point_metrics(result: CVResult, seed: int) -> dict[str, Any]:
    """The chosen operating point on the held-out images: the usual metrics of its decisions, each
    fold's threshold and temperature, the refer rate and the accuracy on the images not referred, and
    the log loss of the mean probabilities before and after calibration."""
    # Only called for a result with an operating point: its rules and decision are set.
    plan, rules, decision = result.plan, cast(list[DecisionRule], result.rules), cast(np.ndarray, result.decision)
    metrics = decision_metrics(result.truth, decision, plan.folds, plan.units, seed)
    refer = result.referred
    calibrated = calibrated_probs(result)
    kept = ~refer
    kept_cm = confusion_matrix(result.truth[kept], decision[kept])
    metrics.update(
        {
            "thresholds": [r.threshold for r in rules],
            "temperatures": [r.temperature for r in rules],
            "refer_rate": float(refer.mean()),
            "accuracy_not_referred": _ratio(int(np.trace(kept_cm)), int(kept.sum())),
            "carcinoma_sensitivity_not_referred": binary_metrics(kept_cm)["carcinoma"]["sensitivity"],
            "log_loss": _log_loss(result.truth, result.mean_probs),
            "log_loss_calibrated": _log_loss(result.truth, calibrated.mean(axis=1)),
        }
    )
    return metrics


def calibrated_probs(result: CVResult) -> np.ndarray:
    """Each image's augmentation probabilities after its own fold's temperature (N, A, K); of a `grouped` view,
    its source's calibrated probabilities summed per group."""
    if result.source is not None:
        return group_probs(calibrated_probs(result.source), result.source.classes.groups)
    calibrated = np.zeros_like(result.aug_probs)
    for k, rule in enumerate(result.rules or []):
        calibrated[result.plan.folds == k] = rule.calibrated(result.aug_probs[result.plan.folds == k])
    return calibrated


def calibration(truth: np.ndarray, probs: np.ndarray, bins: int = 10) -> dict[str, Any]:
    """Expected calibration error of image-level probabilities (N, K): the confidence of the predicted class
    against how often it is right, in `bins` equal-width confidence bins weighted by their images; with each
    bin's count, mean confidence and accuracy for the reliability diagram."""
    confidence, correct = probs.max(axis=1), probs.argmax(axis=1) == truth
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    rows, ece = [], 0.0
    for b in range(bins):
        members = which == b
        if not members.any():
            continue
        conf, acc = float(confidence[members].mean()), float(correct[members].mean())
        ece += members.mean() * abs(acc - conf)
        rows.append(
            {
                "lower": float(edges[b]),
                "upper": float(edges[b + 1]),
                "count": int(members.sum()),
                "confidence": conf,
                "accuracy": acc,
            }
        )
    return {"ece": float(ece), "bins": rows}


def _log_loss(truth: np.ndarray, probs: np.ndarray) -> float:
    return float(-np.log(np.clip(probs[np.arange(len(truth)), truth], 1e-12, 1.0)).mean())


def _per_patient(patients: np.ndarray, result: CVResult) -> list[dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    for patient, truth, decision in zip(patients, result.truth, result.majority):
        patient = patient or "(unknown)"
        row = rows.setdefault(patient, {"patient": patient, "images": 0, "correct": 0, "missed_carcinoma": 0})
        row["images"] += 1
        row["correct"] += int(truth == decision)
        row["missed_carcinoma"] += int(truth > 0 and decision == 0)
    return sorted(rows.values(), key=lambda r: r["patient"])


def _bootstrap(truth: np.ndarray, decision: np.ndarray, units: np.ndarray, seed: int, k: int = 3) -> dict[str, list]:
    """Resample split units (not images: images of one unit are not independent) with replacement. With the 3
    groups (k = 3), the binary tasks too; with other classes, the balanced accuracy."""
    rng = np.random.default_rng([seed, 20220101])
    unique, index = np.unique(units.astype(str), return_inverse=True)
    members = [np.flatnonzero(index == u) for u in range(len(unique))]
    accuracy, binary, balanced = [], [], []
    for _ in range(BOOTSTRAP_SAMPLES):
        pick = np.concatenate([members[u] for u in rng.integers(0, len(unique), len(unique))])
        accuracy.append(float((truth[pick] == decision[pick]).mean()))
        cm = confusion_matrix(truth[pick], decision[pick], k)
        if k == 3:
            binary.append(binary_metrics(cm))
        else:
            balanced.append(_balanced_accuracy(cm))
    return {"accuracy": accuracy, "binary": binary, "balanced_accuracy": balanced}


def _interval(samples: list[float]) -> list[float] | None:
    if not samples:
        return None
    low, high = np.percentile(samples, [2.5, 97.5])
    return [float(low), float(high)]


def _balanced_accuracy(cm: np.ndarray) -> float:
    recalls = [cm[c, c] / cm[c].sum() for c in range(len(cm)) if cm[c].sum()]
    return float(np.mean(recalls))


def _ratio(a: int, b: int) -> float | None:
    return float(a / b) if b else None
