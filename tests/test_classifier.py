import numpy as np
import pytest

from histoboost.classifier import BoostedTrees, class_weights, inner_split
from histoboost.config import ClassifierConfig


def _blobs(n_per_class=40, classes=(0, 1, 2), seed=0):
    rng = np.random.default_rng(seed)
    X = np.concatenate([rng.normal(c * 2.0, 1.0, size=(n_per_class, 5)) for c in classes])
    y = np.repeat(classes, n_per_class)
    return X.astype(np.float32), y


def test_fit_predict_proba_learns_and_is_reproducible():
    X, y = _blobs()
    config = ClassifierConfig(n_estimators=30)
    p1 = BoostedTrees(config, seed=1).fit(X, y).predict_proba(X)
    p2 = BoostedTrees(config, seed=1).fit(X, y).predict_proba(X)
    assert p1.shape == (120, 3) and np.allclose(p1.sum(axis=1), 1)
    assert np.array_equal(p1, p2)
    assert (p1.argmax(1) == y).mean() > 0.9


def test_a_missing_class_keeps_three_columns():
    X, y = _blobs(classes=(0, 2))  # BreakHis has no in-situ group
    p = BoostedTrees(ClassifierConfig(n_estimators=20)).fit(X, y).predict_proba(X)
    assert p.shape == (80, 3) and p[:, 1].max() < 0.5


def test_native_model_round_trip(tmp_path):
    X, y = _blobs()
    model = BoostedTrees(ClassifierConfig(n_estimators=15)).fit(X, y)
    for name in ("model.json", "model.ubj"):
        model.save_model(tmp_path / name)
        loaded = BoostedTrees.load_model(tmp_path / name)
        assert np.array_equal(loaded.predict_proba(X), model.predict_proba(X))
    assert b"pickle" not in (tmp_path / "model.json").read_bytes()


def test_early_stopping_uses_a_grouped_inner_split():
    X, y = _blobs(60)
    groups = np.arange(len(y)) // 3  # three rows (augmentations) per image
    train, valid = inner_split(y, groups, seed=0)
    assert not set(groups[train]) & set(groups[valid])
    model = BoostedTrees(ClassifierConfig(n_estimators=400, early_stopping_rounds=10), seed=0).fit(X, y, groups)
    assert model.best_iteration < 399
    with pytest.raises(ValueError, match="groups"):
        BoostedTrees(ClassifierConfig(early_stopping_rounds=10)).fit(X, y)


def test_balanced_class_weights():
    w = class_weights(np.array([0, 0, 0, 1]))
    assert w.tolist() == pytest.approx([2 / 3, 2 / 3, 2 / 3, 2.0])


def test_bad_input():
    with pytest.raises(ValueError, match="groups 0, 1, 2"):
        BoostedTrees().fit(np.zeros((2, 3)), np.array([0, 5]))
    with pytest.raises(ValueError, match="NaN"):
        BoostedTrees().fit(np.array([[np.nan]]), np.array([0]))
