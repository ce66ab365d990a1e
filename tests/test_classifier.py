import numpy as np
import pytest

from histoboost.classifier import (
    BoostedTrees,
    DecisionRule,
    LogisticModel,
    class_weights,
    fit_decision_rule,
    fit_temperature,
    inner_split,
    load_classifier,
    make_classifier,
)
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


def test_native_model_round_trip():
    X, y = _blobs()
    model = BoostedTrees(ClassifierConfig(n_estimators=15)).fit(X, y)
    data = model.to_bytes()
    assert data[:1] == b"{" and b"pickle" not in data  # UBJ: a binary JSON object
    loaded = BoostedTrees.from_bytes(data)
    assert np.array_equal(loaded.predict_proba(X), model.predict_proba(X))


def test_foreign_or_damaged_models_are_value_errors():
    X, y = _blobs()
    trees = BoostedTrees(ClassifierConfig(n_estimators=5)).fit(X, y).to_bytes()
    for junk in (b"", b"junk", trees[: len(trees) // 2]):
        with pytest.raises(ValueError, match="not an XGBoost model"):
            BoostedTrees.from_bytes(junk)
    with pytest.raises(ValueError, match="outside the model"):
        BoostedTrees.from_bytes(trees, best_iteration=99)
    logistic = LogisticModel(ClassifierConfig(C=1.0)).fit(X, y).to_bytes()
    for junk in (
        b"junk",
        b"[]",
        logistic.replace(b'"coef": [[', b'"coef": [[[', 1),
        b'{"mean": [1], "scale": [0], "coef": [[1], [1], [1]], "intercept": [0, 0, 0]}',
    ):
        with pytest.raises(ValueError, match="not a logistic model"):
            LogisticModel.from_bytes(junk)


def test_early_stopping_uses_a_grouped_inner_split():
    X, y = _blobs(60)
    groups = np.arange(len(y)) // 3  # three rows (augmentations) per image
    train, valid = inner_split(y, groups, seed=0)
    assert not set(groups[train]) & set(groups[valid])
    model = BoostedTrees(ClassifierConfig(n_estimators=400, early_stopping_rounds=10), seed=0).fit(X, y, groups)
    assert model.best_iteration < 399
    few_bins = BoostedTrees(ClassifierConfig(n_estimators=400, early_stopping_rounds=10, max_bin=32)).fit(X, y, groups)
    assert few_bins.best_iteration < 399  # the validation matrix is binned like the training one
    with pytest.raises(ValueError, match="groups"):
        BoostedTrees(ClassifierConfig(early_stopping_rounds=10)).fit(X, y)


def test_balanced_class_weights():
    w = class_weights(np.array([0, 0, 0, 1]))
    assert w.tolist() == pytest.approx([2 / 3, 2 / 3, 2 / 3, 2.0])


def test_bad_input():
    with pytest.raises(ValueError, match="class indices 0 .. 2"):
        BoostedTrees().fit(np.zeros((2, 3)), np.array([0, 5]))
    with pytest.raises(ValueError, match="NaN"):
        BoostedTrees().fit(np.array([[np.nan]]), np.array([0]))


def test_logistic_learns_keeps_three_columns_and_round_trips_as_json(tmp_path):
    X, y = _blobs()
    model = make_classifier(ClassifierConfig(kind="logistic", C=1.0), seed=0)
    assert isinstance(model, LogisticModel)
    p = model.fit(X, y).predict_proba(X)
    assert p.shape == (120, 3) and np.allclose(p.sum(axis=1), 1) and (p.argmax(1) == y).mean() > 0.9
    loaded = load_classifier(model.to_bytes(), ClassifierConfig(kind="logistic"))
    assert np.allclose(loaded.predict_proba(X), p)
    X2, y2 = _blobs(classes=(0, 2))
    p2 = LogisticModel(ClassifierConfig(C=1.0)).fit(X2, y2).predict_proba(X2)
    assert p2.shape == (80, 3) and p2[:, 1].max() == 0 and (p2.argmax(1) == y2).mean() > 0.9


def test_decision_rule_threshold_and_agreement():
    # Two images, two augmentations each: p(carcinoma) = 0.3 and 0.5 -> mean 0.4.
    aug = np.array([[[0.7, 0.2, 0.1], [0.5, 0.1, 0.4]], [[0.9, 0.05, 0.05], [0.8, 0.1, 0.1]]])
    majority, agree = DecisionRule().decide(aug)
    assert majority.tolist() == [0, 0] and agree.tolist() == [1.0, 1.0]
    decision, agree = DecisionRule(threshold=0.35).decide(aug)
    assert decision.tolist() == [2, 0]  # mean p2 0.25 > p1 0.15 -> invasive
    assert agree.tolist() == [0.5, 1.0]  # one of the first image's augmentations is below the threshold
    assert DecisionRule(threshold=0.35, refer_below_agreement=0.75).refer(agree).tolist() == [True, False]


def test_temperature_is_recovered_from_overconfident_probabilities():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 1.5, size=(400, 1, 3))
    true_p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    y = np.array([rng.choice(3, p=row[0]) for row in true_p])
    sharp = np.exp(logits * 3) / np.exp(logits * 3).sum(-1, keepdims=True)  # three times too confident
    assert fit_temperature(sharp, y) == pytest.approx(3.0, rel=0.25)
    assert DecisionRule(temperature=3.0).calibrated(sharp) == pytest.approx(true_p, abs=1e-6)


def test_threshold_is_chosen_on_inner_folds_to_reach_the_target_sensitivity():
    rng = np.random.default_rng(0)
    n_images, n_aug = 60, 3
    image_y = np.repeat([0, 1, 2], n_images // 3)
    centres = np.array([0.0, 1.0, 1.5])[image_y] + rng.normal(0, 0.8, n_images)  # overlapping classes
    X = np.repeat(centres, n_aug)[:, None] + rng.normal(0, 0.1, (n_images * n_aug, 1))
    owners = np.repeat(np.arange(n_images), n_aug)
    units = (owners // 2).astype(str)  # two images per patient
    config = ClassifierConfig(kind="logistic", C=1.0, target_sensitivity=0.95, inner_folds=3)
    rule = fit_decision_rule(X.astype(np.float32), image_y[owners], owners, units, config)
    assert rule.threshold is not None and rule.temperature == 1.0
    model = LogisticModel(config).fit(X, image_y[owners])
    p = model.predict_proba(X).reshape(n_images, n_aug, 3)
    decision, _ = rule.decide(p)
    carcinoma = image_y > 0
    sensitivity = (decision[carcinoma] > 0).mean()
    assert sensitivity >= 0.85  # chosen out of fold, applied in sample: near the 0.95 target
    assert sensitivity > (DecisionRule().decide(p)[0][carcinoma] > 0).mean()  # above the majority vote's
    argmax = ClassifierConfig(target_sensitivity=None)  # `--decision argmax`: nothing to fit
    assert fit_decision_rule(X, image_y[owners], owners, units, argmax) == DecisionRule()
    assert ClassifierConfig().target_sensitivity == 0.95  # the default decision: the carcinoma operating point
    with pytest.raises(ValueError, match="2 split units"):
        fit_decision_rule(X, image_y[owners], owners, np.zeros(len(owners)).astype(str), config)


def test_four_class_decisions_are_taken_group_first_so_the_groups_never_disagree():
    """Normal 0.3, benign 0.3, invasive 0.4: by class the invasive is most probable, but normal/benign (0.6) is the
    more probable group; the decision is benign or normal, never invasive, and equals the 3-group decision."""
    from histoboost.classifier import augmentation_votes, group_probs, majority_vote, mean_decision

    groups = (0, 0, 1, 2)
    p = np.array([[[0.3, 0.31, 0.0, 0.39]] * 3])
    assert majority_vote(p, groups).tolist() == [1] and mean_decision(p, groups).tolist() == [1]
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(4) * 0.7, size=(200, 5))
    to_group = np.asarray(groups)
    assert np.array_equal(to_group[majority_vote(probs, groups)], majority_vote(group_probs(probs, groups)))
    assert np.array_equal(to_group[mean_decision(probs, groups)], mean_decision(group_probs(probs, groups)))
    assert np.array_equal(to_group[augmentation_votes(probs, groups)], group_probs(probs, groups).argmax(-1))
    rule = DecisionRule(threshold=0.5, groups=groups)
    decision, _ = rule.decide(probs)
    grouped, _ = DecisionRule(threshold=0.5).decide(group_probs(probs, groups))
    assert np.array_equal(to_group[decision], grouped)
    assert set(decision) == {0, 1, 2, 3}  # normal and benign both decided: no class merged


def test_four_class_models_answer_four_columns_and_round_trip():
    X, y = _blobs(classes=(0, 1, 2, 3))
    config = ClassifierConfig(classes="bach4", n_estimators=20, C=1.0)
    for kind in ("xgboost", "logistic"):
        c = ClassifierConfig(**{**config.__dict__, "kind": kind})
        model = make_classifier(c).fit(X, y)
        p = model.predict_proba(X)
        assert p.shape == (160, 4) and (p.argmax(1) == y).mean() > 0.9
        again = load_classifier(model.to_bytes(), c, model.best_iteration)
        assert np.allclose(again.predict_proba(X), p)
        with pytest.raises(ValueError):  # a 4-class model is not a 3-class one
            load_classifier(model.to_bytes(), ClassifierConfig(kind=kind), model.best_iteration)
