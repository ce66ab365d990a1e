"""Classifiers on CNN descriptors: rows are augmented images, classes those of the configured class scheme
(the three diagnostic groups, or BACH's four classes).

Small scikit-learn-style estimators (`fit` / `predict_proba`, numpy in and out) that always answer every
class of the scheme, even when the training data lacks one (BreakHis has no in-situ images), and save
themselves without pickle:

- `BoostedTrees`: XGBoost's native API (the seed study's classifier), saved in XGBoost's UBJ format.
- `LogisticModel`: standardised features and a multinomial logistic regression (scikit-learn fits it);
  its few arrays are saved as JSON and applied with numpy.

`make_classifier` picks one from the config.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .config import ClassifierConfig
from .data import GROUPS, class_scheme


def n_classes(config: ClassifierConfig) -> int:
    """How many classes the configured scheme tells apart."""
    return len(class_scheme(config.classes).classes)


class BoostedTrees:
    """XGBoost `multi:softprob` with the `hist` tree method, on CPU or CUDA."""

    def __init__(
        self, config: ClassifierConfig | None = None, seed: int = 0, device: str = "cpu", n_threads: int | None = None
    ):
        self.config = config or ClassifierConfig()
        self.seed = seed
        self.device = device
        self.n_threads = n_threads or os.cpu_count() or 1
        self.booster: Any = None  # an xgboost.Booster once fitted (xgboost is imported only where it is used)
        self.best_iteration: int | None = None

    def params(self) -> dict:
        c = self.config
        return {
            "objective": "multi:softprob",
            "num_class": n_classes(c),
            "eval_metric": "mlogloss",
            "tree_method": "hist",
            "device": self.device,
            "nthread": self.n_threads,
            "seed": self.seed,
            "eta": c.learning_rate,
            "max_depth": c.max_depth,
            "subsample": c.subsample,
            "colsample_bytree": c.colsample_bytree,
            "max_bin": c.max_bin,
            "verbosity": 0,
        }

    def fit(self, X: np.ndarray, y: np.ndarray, groups: np.ndarray | None = None) -> BoostedTrees:
        """Train on rows `X` (n, d) with class indices `y` (0 .. K-1).

        With `early_stopping_rounds` set, `groups` (the split unit of each row, e.g. its image or
        patient) must be given: an inner validation part is split off by whole groups, never rows.
        """
        import xgboost as xgb

        X, y = _check_xy(X, y, n_classes(self.config))
        weights = class_weights(y) if self.config.class_weight == "balanced" else None
        rounds = self.config.n_estimators
        if self.config.early_stopping_rounds:
            if groups is None:
                raise ValueError("early stopping needs the groups of the rows, so that validation is grouped")
            train, valid = inner_split(y, np.asarray(groups), self.seed)
            dtrain = self._matrix(X[train], y[train], None if weights is None else weights[train])
            dvalid = xgb.QuantileDMatrix(X[valid], y[valid], ref=dtrain, max_bin=self.config.max_bin)
            self.booster = xgb.train(
                self.params(),
                dtrain,
                rounds,
                evals=[(dvalid, "valid")],
                early_stopping_rounds=self.config.early_stopping_rounds,
                verbose_eval=False,
            )
            self.best_iteration = int(self.booster.best_iteration)
        else:
            self.booster = xgb.train(self.params(), self._matrix(X, y, weights), rounds)
            self.best_iteration = rounds - 1
        return self

    def _matrix(self, X: np.ndarray, y: np.ndarray, weights: np.ndarray | None):
        """Training data quantised once into `max_bin` bins (what `hist` trains on), without the
        float copy a plain DMatrix would also keep."""
        import xgboost as xgb

        return xgb.QuantileDMatrix(X, y, weight=weights, max_bin=self.config.max_bin, nthread=self.n_threads)

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Class probabilities (n, K)."""
        import xgboost as xgb

        if self.booster is None:
            raise RuntimeError("fit the classifier first")
        X = np.asarray(X, dtype=np.float32)
        out = self.booster.predict(xgb.DMatrix(X), iteration_range=(0, (self.best_iteration or 0) + 1))
        return np.asarray(out, dtype=np.float64).reshape(len(X), n_classes(self.config))

    @property
    def n_features(self) -> int:
        return self.booster.num_features()

    def to_bytes(self) -> bytes:
        """XGBoost's native UBJ format: portable, no pickle."""
        return bytes(self.booster.save_raw(raw_format="ubj"))

    @classmethod
    def from_bytes(
        cls, data: bytes, config: ClassifierConfig | None = None, best_iteration: int | None = None, device: str = "cpu"
    ) -> BoostedTrees:
        """A model written by `to_bytes`; ValueError when the bytes are not an XGBoost model of the configured
        number of classes."""
        import xgboost as xgb

        if not data:  # XGBoost aborts the whole process on an empty buffer
            raise ValueError("not an XGBoost model (empty)")
        model = cls(config, device=device)
        model.booster = xgb.Booster()
        try:
            model.booster.load_model(bytearray(data))
            rounds = model.booster.num_boosted_rounds()
            classes = int(json.loads(model.booster.save_config())["learner"]["learner_model_param"]["num_class"])
        except (xgb.core.XGBoostError, KeyError, ValueError) as err:
            raise ValueError(f"not an XGBoost model ({str(err).splitlines()[0][:120]})") from None
        if classes != n_classes(model.config):
            raise ValueError(f"an XGBoost model of {classes} classes, not {n_classes(model.config)}")
        if best_iteration is not None and not 0 <= best_iteration < rounds:
            raise ValueError(f"best iteration {best_iteration} is outside the model's {rounds} rounds")
        model.best_iteration = best_iteration if best_iteration is not None else rounds - 1
        return model


class LogisticModel:
    """Each feature standardised on the training rows, then L2-regularised multinomial logistic
    regression (lbfgs). Linear on standardised features: robust where trees overfit few patients."""

    def __init__(self, config: ClassifierConfig | None = None, seed: int = 0):
        self.config = config or ClassifierConfig()
        self.seed = seed
        # The fitted arrays: None until `fit` or `from_bytes` sets them.
        self.mean: Any = None
        self.scale: Any = None
        self.coef: Any = None
        self.intercept: Any = None
        self.best_iteration = None  # no rounds; kept so callers treat both classifiers alike

    def fit(self, X: np.ndarray, y: np.ndarray, groups: np.ndarray | None = None) -> LogisticModel:
        from sklearn.linear_model import LogisticRegression

        k = n_classes(self.config)
        X, y = _check_xy(X, y, k)
        self.mean, std = X.mean(axis=0), X.std(axis=0)
        self.scale = np.where(std > 1e-6, std, 1.0).astype(np.float32)
        present = np.unique(y)
        self.coef = np.zeros((k, X.shape[1]), dtype=np.float64)
        self.intercept = np.full(k, -np.inf)  # an absent class gets probability 0
        if len(present) == 1:
            self.intercept[present[0]] = 0.0
            return self
        model = LogisticRegression(
            C=self.config.C,
            max_iter=3000,
            random_state=self.seed,
            class_weight="balanced" if self.config.class_weight == "balanced" else None,
        )
        model.fit((X - self.mean) / self.scale, y)
        if len(present) == 2:  # scikit-learn's binary form: one row for the second class
            self.coef[present[1]], self.intercept[present] = model.coef_[0], [0.0, model.intercept_[0]]
        else:
            self.coef[present], self.intercept[present] = model.coef_, model.intercept_
        return self

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        if self.coef is None:
            raise RuntimeError("fit the classifier first")
        z = ((np.asarray(X, dtype=np.float32) - self.mean) / self.scale) @ self.coef.T + self.intercept
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z)
        return p / p.sum(axis=1, keepdims=True)

    @property
    def n_features(self) -> int:
        return self.coef.shape[1]

    def to_bytes(self) -> bytes:
        """Plain JSON arrays: readable anywhere, no pickle."""
        arrays = {
            "mean": self.mean,
            "scale": self.scale,
            "coef": self.coef,
            "intercept": np.where(np.isfinite(self.intercept), self.intercept, -1e30),
        }
        return json.dumps({"type": "logistic", **{k: np.asarray(v).tolist() for k, v in arrays.items()}}).encode()

    @classmethod
    def from_bytes(cls, data: bytes, config: ClassifierConfig | None = None) -> LogisticModel:
        """A model written by `to_bytes`; ValueError when the arrays are missing, mis-shaped or not finite."""
        try:
            found = json.loads(data)
            model = cls(config)
            model.mean, model.scale = np.array(found["mean"], np.float32), np.array(found["scale"], np.float32)
            model.coef, model.intercept = np.array(found["coef"], np.float64), np.array(found["intercept"], np.float64)
        except (ValueError, TypeError, KeyError, UnicodeDecodeError, RecursionError) as err:
            raise ValueError(f"not a logistic model ({type(err).__name__}: {str(err)[:80]})") from None
        d, k = (model.mean.shape[0] if model.mean.ndim == 1 else -1), n_classes(model.config)
        shapes_ok = d > 0 and model.scale.shape == (d,) and model.coef.shape == (k, d) and model.intercept.shape == (k,)
        if not shapes_ok or not all(
            np.isfinite(a).all() for a in (model.mean, model.scale, model.coef, model.intercept)
        ):
            raise ValueError("not a logistic model (arrays of the wrong shape or not finite)")
        if (model.scale <= 0).any():
            raise ValueError("not a logistic model (a feature scale is not positive)")
        return model


def make_classifier(
    config: ClassifierConfig, seed: int = 0, device: str = "cpu", threads: int | None = None
) -> BoostedTrees | LogisticModel:
    """The configured classifier, unfitted; XGBoost on `threads` threads (default: all cores)."""
    if config.kind == "logistic":
        return LogisticModel(config, seed)
    return BoostedTrees(config, seed, device, threads)


def load_classifier(
    data: bytes, config: ClassifierConfig, best_iteration: int | None = None, device: str = "cpu"
) -> BoostedTrees | LogisticModel:
    """A classifier of the configured kind from the bytes `to_bytes` wrote; ValueError when they are not one."""
    if config.kind == "logistic":
        return LogisticModel.from_bytes(data, config)
    return BoostedTrees.from_bytes(data, config, best_iteration, device)


# -- from augmentation probabilities to one decision per image ------------------------------------
# Every decision is taken group first (on the class probabilities summed per diagnostic group), then the most
# probable class within that group: with the 3 groups as classes this is the plain rule; with 4 classes the
# 3-group answer is the group of the class answer, never another.


def group_probs(p: np.ndarray, groups: tuple[int, ...] = GROUPS) -> np.ndarray:
    """Class probabilities (..., K) summed per diagnostic group (..., 3)."""
    if tuple(groups) == GROUPS:
        return p
    g = np.asarray(groups)
    return np.stack([p[..., g == k].sum(axis=-1) for k in range(3)], axis=-1)


def within_group(p: np.ndarray, group: np.ndarray, groups: tuple[int, ...] = GROUPS) -> np.ndarray:
    """The most probable class (...) of each row's chosen group, from class probabilities (..., K)."""
    member = np.asarray(groups) == np.asarray(group)[..., None]
    return np.where(member, p, -np.inf).argmax(axis=-1)


def augmentation_votes(aug_probs: np.ndarray, groups: tuple[int, ...] = GROUPS) -> np.ndarray:
    """The class each augmentation votes for (N, A): its most probable group, then class within it."""
    return within_group(aug_probs, group_probs(aug_probs, groups).argmax(axis=-1), groups)


def vote_counts(aug_probs: np.ndarray, groups: tuple[int, ...] = GROUPS) -> np.ndarray:
    """Votes per class (N, K)."""
    winners = augmentation_votes(aug_probs, groups)
    return np.stack([(winners == c).sum(axis=1) for c in range(aug_probs.shape[2])], axis=1)


def majority_vote(aug_probs: np.ndarray, groups: tuple[int, ...] = GROUPS) -> np.ndarray:
    """The group with most votes (a tie goes to the tied group with the highest mean probability), then the
    class of that group with the highest mean probability."""
    per_group = group_probs(aug_probs, groups)
    votes = np.stack([(per_group.argmax(axis=2) == g).sum(axis=1) for g in range(3)], axis=1)
    tied = votes == votes.max(axis=1, keepdims=True)
    group = np.where(tied, per_group.mean(axis=1), -np.inf).argmax(axis=1)
    return within_group(aug_probs.mean(axis=1), group, groups)


def mean_decision(aug_probs: np.ndarray, groups: tuple[int, ...] = GROUPS) -> np.ndarray:
    """The group of highest mean probability, then its class of highest mean probability (N,)."""
    mean = aug_probs.mean(axis=1)
    return within_group(mean, group_probs(mean, groups).argmax(axis=-1), groups)


@dataclass(frozen=True)
class DecisionRule:
    """How an image's augmentation probabilities (A, K) become its decision, fitted on training data:
    temperature scaling, then majority vote, or a threshold on the mean p(carcinoma) = p(in situ) +
    p(invasive) (carcinoma above it, in situ or invasive by the larger mean probability). `groups` maps each
    class to its diagnostic group."""

    temperature: float = 1.0
    threshold: float | None = None
    refer_below_agreement: float = 0.0
    groups: tuple[int, ...] = GROUPS

    def __post_init__(self) -> None:  # JSON gives lists back
        object.__setattr__(self, "groups", tuple(int(g) for g in self.groups))

    def calibrated(self, aug_probs: np.ndarray) -> np.ndarray:
        if self.temperature == 1.0:
            return aug_probs
        z = np.log(np.clip(aug_probs, 1e-12, 1.0)) / self.temperature
        z -= z.max(axis=-1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=-1, keepdims=True)

    def decide(self, aug_probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Decisions (N,) of images (N, A, K), and the share of augmentations that agree with each."""
        p = self.calibrated(np.asarray(aug_probs, dtype=np.float64))
        if self.threshold is None:
            decision, per_aug = majority_vote(p, self.groups), augmentation_votes(p, self.groups)
        else:
            decision = self._thresholded(p.mean(axis=1))
            per_aug = self._thresholded(p)
        return decision, (per_aug == decision[:, None]).mean(axis=1)

    def describe(self, target_sensitivity: float | None = None, chosen_on: str = "inner folds") -> str:
        """The rule in words, as `train`, `predict` output and reports state it; `chosen_on`: where the threshold
        was set (inner folds, or the images a fine-tuned backbone never trained on)."""
        if self.threshold is None:
            text = "argmax (majority vote over augmentations)"
        else:
            text = f"operating point: carcinoma when mean p(carcinoma) >= {self.threshold:.4f}"
            if target_sensitivity is not None:
                text += f" (chosen for {target_sensitivity:.0%} sensitivity on {chosen_on})"
        if self.temperature != 1.0:
            text += f", temperature {self.temperature:.3f}"
        if self.refer_below_agreement > 0:
            text += f"; refer below {self.refer_below_agreement:.0%} agreement"
        return text

    def _thresholded(self, p: np.ndarray) -> np.ndarray:
        """Carcinoma when p(in situ) + p(invasive) >= threshold, then the larger of the two; else normal/benign;
        then the most probable class of that group."""
        g = group_probs(p, self.groups)
        group = np.where(g[..., 1:].sum(axis=-1) >= self.threshold, 1 + (g[..., 2] > g[..., 1]), 0)
        return within_group(p, group, self.groups)

    def refer(self, agreement: np.ndarray) -> np.ndarray:
        """Images whose augmentations disagree too much to be trusted without a pathologist."""
        return np.asarray(agreement) < self.refer_below_agreement

    def to_dict(self) -> dict:
        return asdict(self)


def fit_decision_rule(
    X: np.ndarray,
    y: np.ndarray,
    owners: np.ndarray,
    units: np.ndarray,
    config: ClassifierConfig,
    seed: int = 0,
    device: str = "cpu",
    held_out: np.ndarray | None = None,
    threads: int | None = None,
) -> DecisionRule:
    """Choose the temperature and threshold from out-of-fold predictions on the training rows only.

    Rows `X` (n, d) with class indices `y`, their image `owners` and split `units` (per row). Inner folds
    group images by unit, as the outer cross-validation does, so the threshold is set on images of
    units the inner model never saw. The threshold is the largest that keeps at least
    `target_sensitivity` of the inner carcinomas at or above it.

    `held_out` (per row) replaces the inner folds by one split: fit on the other rows, choose on these.
    With a fine-tuned backbone these are the images its fine-tuning never trained on: the others'
    features are memorised, so probabilities on them are overconfident and a threshold set there fails
    on new images (measured: docs/accuracy.md).
    """
    from sklearn.model_selection import StratifiedGroupKFold

    groups = class_scheme(config.classes).groups
    rule = DecisionRule(refer_below_agreement=config.refer_below_agreement, groups=groups)
    if config.target_sensitivity is None and not config.calibrate:
        return rule
    images, first = np.unique(owners, return_index=True)
    image_y, image_units = y[first], units[first]
    if held_out is not None:
        chosen = held_out[first]
        if len(np.unique(image_y[chosen])) < 2 or len(np.unique(image_y[~chosen])) < 2:
            raise ValueError(
                "choosing a threshold or calibrating needs images of at least 2 classes on both sides "
                "of the fine-tuning validation split"
            )
        splits = [(np.flatnonzero(~chosen), np.flatnonzero(chosen))]
    else:
        per_class = [len(set(image_units[image_y == c])) for c in np.unique(image_y)]
        n_splits = min(config.inner_folds, *per_class)
        if n_splits < 2 or len(per_class) < 2:
            raise ValueError(
                "choosing the carcinoma operating point (or calibrating) needs at least 2 split units "
                "of each class in the training data: give more images, or pass --decision argmax"
            )
        splits = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed).split(
            images, image_y, image_units
        )
    oof = np.zeros((len(images), np.bincount(owners)[images[0]], n_classes(config)))
    scored = np.zeros(len(images), dtype=bool)
    for train, valid in splits:
        rows = np.isin(owners, images[train])
        model = make_classifier(config, seed, device, threads).fit(X[rows], y[rows], groups=units[rows])
        for i in valid:
            oof[i] = model.predict_proba(X[owners == images[i]])
        scored[valid] = True
    oof, image_y = oof[scored], image_y[scored]
    temperature = fit_temperature(oof, image_y) if config.calibrate else 1.0
    threshold = None
    carcinoma = np.asarray(groups)[image_y] > 0
    if config.target_sensitivity is not None and carcinoma.any():
        scores = group_probs(DecisionRule(temperature).calibrated(oof).mean(axis=1), groups)[:, 1:].sum(axis=1)
        positives = np.sort(scores[carcinoma])
        keep_below = int(np.floor((1 - config.target_sensitivity) * len(positives) + 1e-9))
        threshold = float(positives[min(keep_below, len(positives) - 1)])
    return DecisionRule(temperature, threshold, config.refer_below_agreement, groups)


def fit_temperature(aug_probs: np.ndarray, image_y: np.ndarray) -> float:
    """The temperature T minimising the log loss of every augmentation's softmax(log p / T)."""
    from scipy.optimize import minimize_scalar

    logp = np.log(np.clip(aug_probs, 1e-12, 1.0))
    labels = np.repeat(image_y, aug_probs.shape[1])
    flat = logp.reshape(-1, aug_probs.shape[-1])

    def loss(log_t: float) -> float:
        z = flat / np.exp(log_t)
        z = z - z.max(axis=1, keepdims=True)
        return float(-(z[np.arange(len(z)), labels] - np.log(np.exp(z).sum(axis=1))).mean())

    return float(np.exp(minimize_scalar(loss, bounds=(np.log(0.05), np.log(20.0)), method="bounded").x))


def class_weights(y: np.ndarray) -> np.ndarray:
    """Per-row weights n / (k * count(class)), so each present class weighs the same."""
    classes, counts = np.unique(y, return_counts=True)
    per_class = dict(zip(classes, len(y) / (len(classes) * counts)))
    return np.array([per_class[v] for v in y], dtype=np.float32)


def inner_split(y: np.ndarray, groups: np.ndarray, seed: int, n_splits: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """One stratified, grouped train/validation split of the training rows (about 1/n_splits held out)."""
    from sklearn.model_selection import StratifiedGroupKFold

    n_groups = len(np.unique(groups))
    splitter = StratifiedGroupKFold(n_splits=min(n_splits, n_groups), shuffle=True, random_state=seed)
    train, valid = next(splitter.split(np.zeros(len(y)), y, groups))
    return train, valid


def _check_xy(X: np.ndarray, y: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    X = np.asarray(X, dtype=np.float32)
    y = np.asarray(y)
    if X.ndim != 2 or len(X) != len(y):
        raise ValueError(f"X must be (rows, features) with one label per row; got {X.shape} and {y.shape}")
    if not np.isin(y, np.arange(k)).all():
        raise ValueError(f"labels must be the class indices 0 .. {k - 1}")
    if not np.isfinite(X).all():
        raise ValueError("features contain NaN or infinity")
    return X, y.astype(np.int64)
