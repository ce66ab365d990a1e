"""XGBoost on CNN descriptors: rows are augmented images, classes are the three diagnostic groups.

A small scikit-learn-style estimator (`fit` / `predict_proba`, numpy in and out) over XGBoost's native
API, which (unlike `xgboost.XGBClassifier`) keeps three classes even when the training data lacks one
(BreakHis has no in-situ images), and saves the model in XGBoost's portable JSON/UBJ format.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .config import ClassifierConfig

N_CLASSES = 3


class BoostedTrees:
    """XGBoost `multi:softprob` with the `hist` tree method, on CPU or CUDA."""

    def __init__(self, config: ClassifierConfig | None = None, seed: int = 0, device: str = "cpu",
                 n_threads: int | None = None):
        self.config = config or ClassifierConfig()
        self.seed = seed
        self.device = device
        self.n_threads = n_threads or os.cpu_count() or 1
        self.booster = None
        self.best_iteration: int | None = None

    def params(self) -> dict:
        c = self.config
        return {
            "objective": "multi:softprob", "num_class": N_CLASSES, "eval_metric": "mlogloss",
            "tree_method": "hist", "device": self.device, "nthread": self.n_threads, "seed": self.seed,
            "eta": c.learning_rate, "max_depth": c.max_depth, "subsample": c.subsample,
            "colsample_bytree": c.colsample_bytree, "max_bin": c.max_bin, "verbosity": 0,
        }

    def fit(self, X: np.ndarray, y: np.ndarray, groups: np.ndarray | None = None) -> BoostedTrees:
        """Train on rows `X` (n, d) with groups `y` in {0, 1, 2}.

        With `early_stopping_rounds` set, `groups` (the split unit of each row, e.g. its image or
        patient) must be given: an inner validation part is split off by whole groups, never rows.
        """
        import xgboost as xgb

        X, y = _check_xy(X, y)
        weights = class_weights(y) if self.config.class_weight == "balanced" else None
        rounds = self.config.n_estimators
        if self.config.early_stopping_rounds:
            if groups is None:
                raise ValueError("early stopping needs the groups of the rows, so that validation is grouped")
            train, valid = inner_split(y, np.asarray(groups), self.seed)
            dtrain = xgb.DMatrix(X[train], y[train], weight=None if weights is None else weights[train])
            dvalid = xgb.DMatrix(X[valid], y[valid])
            self.booster = xgb.train(self.params(), dtrain, rounds, evals=[(dvalid, "valid")],
                                     early_stopping_rounds=self.config.early_stopping_rounds, verbose_eval=False)
            self.best_iteration = int(self.booster.best_iteration)
        else:
            self.booster = xgb.train(self.params(), xgb.DMatrix(X, y, weight=weights), rounds)
            self.best_iteration = rounds - 1
        return self

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Class probabilities (n, 3)."""
        import xgboost as xgb

        if self.booster is None:
            raise RuntimeError("fit the classifier first")
        X = np.asarray(X, dtype=np.float32)
        out = self.booster.predict(xgb.DMatrix(X), iteration_range=(0, (self.best_iteration or 0) + 1))
        return np.asarray(out, dtype=np.float64).reshape(len(X), N_CLASSES)

    def save_model(self, path: str | Path) -> None:
        """XGBoost's native format (`.json` or `.ubj` by suffix): portable, no pickle."""
        self.booster.save_model(str(path))

    @classmethod
    def load_model(cls, path: str | Path, config: ClassifierConfig | None = None, best_iteration: int | None = None,
                   device: str = "cpu") -> BoostedTrees:
        import xgboost as xgb

        model = cls(config, device=device)
        model.booster = xgb.Booster()
        model.booster.load_model(str(path))
        model.best_iteration = best_iteration if best_iteration is not None else model.booster.num_boosted_rounds() - 1
        return model


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


def _check_xy(X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    X = np.asarray(X, dtype=np.float32)
    y = np.asarray(y)
    if X.ndim != 2 or len(X) != len(y):
        raise ValueError(f"X must be (rows, features) with one label per row; got {X.shape} and {y.shape}")
    if not np.isin(y, [0, 1, 2]).all():
        raise ValueError("labels must be the groups 0, 1, 2")
    if not np.isfinite(X).all():
        raise ValueError("features contain NaN or infinity")
    return X, y.astype(np.int64)
