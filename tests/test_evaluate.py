import numpy as np
import pytest

from histoboost.data import CLASS_SCHEMES, DataError, Manifest, load_manifest
from histoboost.evaluate import (
    EvaluationError,
    binary_aucs,
    binary_metrics,
    confusion_matrix,
    decision_metrics,
    majority_vote,
    make_folds,
    vote_counts,
)
from histoboost.runtime import Runtime

from conftest import write_png

PAPER_RESNET50 = [[142, 4, 6], [9, 50, 11], [12, 9, 85]]


def test_binary_metrics_on_the_papers_resnet50_matrix():
    b = binary_metrics(PAPER_RESNET50)
    assert np.trace(PAPER_RESNET50) / np.sum(PAPER_RESNET50) == pytest.approx(0.8445, abs=1e-4)
    carcinoma = b["carcinoma"]
    assert carcinoma["sensitivity"] == pytest.approx(155 / 176)  # 88.07%
    assert carcinoma["specificity"] == pytest.approx(142 / 152)  # 93.42%
    assert carcinoma["precision"] == pytest.approx(155 / 165)  # 93.94%
    assert carcinoma["accuracy"] == pytest.approx(297 / 328)
    # Pairs use their 2x2 sub-matrix: 0v1 -> [[142, 4], [9, 50]].
    assert b["0v1"]["sensitivity"] == pytest.approx(50 / 59) and b["0v1"]["specificity"] == pytest.approx(142 / 146)
    assert b["1v2"]["sensitivity"] == pytest.approx(85 / 94) and b["1v2"]["precision"] == pytest.approx(85 / 96)


def test_binary_metrics_with_an_empty_class_gives_none():
    b = binary_metrics([[5, 0, 1], [0, 0, 0], [1, 0, 4]])
    assert b["0v1"]["sensitivity"] is None and b["0v2"]["sensitivity"] == pytest.approx(0.8)


def test_voting_majority_with_ties_broken_by_mean_probability():
    probs = np.array([[[0.6, 0.3, 0.1], [0.6, 0.3, 0.1], [0.1, 0.2, 0.7]]])  # 2 votes for 0, 1 for 2
    assert vote_counts(probs).tolist() == [[2, 0, 1]] and majority_vote(probs).tolist() == [0]
    tie = np.array([[[0.55, 0.45, 0.0], [0.0, 0.9, 0.1]]])  # one vote each for 0 and 1; mean favours 1
    assert majority_vote(tie).tolist() == [1]


def test_decision_metrics_and_bootstrap_interval():
    truth = np.array([0, 0, 1, 1, 2, 2, 0, 2])
    decision = np.array([0, 1, 1, 1, 2, 0, 0, 2])
    folds = np.array([0, 1, 0, 1, 0, 1, 0, 1])
    m = decision_metrics(truth, decision, folds, np.arange(8).astype(str), seed=0)
    assert m["accuracy"] == 6 / 8 and m["per_fold_accuracy"] == [1.0, 0.5]
    assert m["confusion"] == confusion_matrix(truth, decision).tolist()
    low, high = m["accuracy_ci"]
    assert low < 0.75 < high
    assert m["binary"]["carcinoma"]["sensitivity_ci"] is not None


def test_aucs():
    truth = np.array([0, 0, 1, 2])
    probs = np.array([[0.8, 0.1, 0.1], [0.6, 0.2, 0.2], [0.3, 0.6, 0.1], [0.2, 0.1, 0.7]])
    aucs = binary_aucs(truth, probs)
    assert aucs["carcinoma"] == 1.0 and aucs["0v1"] == 1.0


def _manifest(
    tmp_path, patients_per_class=(4, 4, 4), images_per_patient=2, patients=True, labels=("0", "1", "2")
) -> Manifest:
    lines = ["path,label,patient"]
    seed = 0
    for group, (count, label) in enumerate(zip(patients_per_class, labels)):
        for p in range(count):
            for k in range(images_per_patient):
                seed += 1
                name = f"g{group}/p{group}{p}_{k}.png"
                write_png(tmp_path / name, (64, 64), seed=seed)
                lines.append(f"{name},{label},{f'pt{group}{p}' if patients else ''}")
    (tmp_path / "manifest.csv").write_text("\n".join(lines) + "\n")
    return load_manifest(tmp_path)[0]


def test_folds_by_patient_never_leak(tmp_path):
    manifest = _manifest(tmp_path)
    plan = make_folds(manifest, None, 4, seed=0)
    assert plan.split_by == "patient" and plan.n_folds == 4 and not plan.warnings
    for k in range(4):
        assert not set(plan.units[plan.folds == k]) & set(plan.units[plan.folds != k])
        assert set(manifest.groups[plan.folds == k]) == {0, 1, 2}  # stratified
    again = make_folds(manifest, None, 4, seed=0)
    assert np.array_equal(plan.folds, again.folds)
    assert not np.array_equal(plan.folds, make_folds(manifest, None, 4, seed=1).folds)


def test_folds_by_image_warn_and_scarce_classes_reduce_folds(tmp_path):
    manifest = _manifest(tmp_path, patients=False)
    plan = make_folds(manifest, None, 6, seed=0)
    assert plan.split_by == "image" and "overstates" in plan.warnings[0]
    scarce = _manifest(tmp_path / "b", patients_per_class=(6, 3, 6))
    plan = make_folds(scarce, "patient", 6, seed=0)
    assert plan.n_folds == 3 and "using 3 folds" in plan.warnings[0]
    with pytest.raises(EvaluationError, match="at least 2"):
        make_folds(_manifest(tmp_path / "c", patients_per_class=(2, 1, 2)), "patient", 6, seed=0)


def test_folds_by_a_manifest_column(bach):
    manifest, _ = load_manifest(bach)
    plan = make_folds(manifest, "id_block", 6, seed=0)
    assert plan.n_folds == 4 and "InSitu" not in plan.warnings[0]  # in_situ has 4 blocks
    blocks = np.array(manifest.column("id_block"))
    for k in range(plan.n_folds):
        assert not set(blocks[plan.folds == k]) & set(blocks[plan.folds != k])


def test_operating_point_is_chosen_inside_each_fold_and_survives_save_and_load(tmp_path):
    from histoboost.config import preset
    from histoboost.evaluate import CVRun, cross_validate_features

    manifest = _manifest(tmp_path, patients_per_class=(6, 6, 6), images_per_patient=2)
    rng = np.random.default_rng(0)
    n_aug = 3
    owners = np.repeat(np.arange(len(manifest)), n_aug)
    centres = np.array([0.0, 1.0, 1.6])[manifest.groups] + rng.normal(0, 0.7, len(manifest))
    X = (centres[owners][:, None] + rng.normal(0, 0.1, (len(owners), 4))).astype(np.float32)
    plan = make_folds(manifest, "patient", 3, seed=0)
    config = preset("quick").merged(
        {
            "classifier.kind": "logistic",
            "classifier.C": 1.0,
            "classifier.inner_folds": 3,
            "classifier.target_sensitivity": 0.95,
            "classifier.refer_below_agreement": 0.9,
        }
    )
    argmax = preset("quick").merged({"classifier.kind": "logistic", "classifier.target_sensitivity": None})
    plain = cross_validate_features(X, owners, manifest, plan, argmax, "plain")
    assert plain.rules is None  # `--decision argmax`: the seed study's vote, no rule fitted
    result = cross_validate_features(X, owners, manifest, plan, config, "op")
    assert len(result.rules) == 3 and all(r.threshold is not None for r in result.rules)
    carcinoma = result.truth > 0
    assert (result.decision[carcinoma] > 0).mean() >= (result.majority[carcinoma] > 0).mean()
    run = CVRun(
        config,
        plan,
        [result],
        np.array([r.image_id for r in manifest]),
        np.array([r.name for r in manifest]),
        np.array([str(r.path) for r in manifest]),
        np.array([r.patient for r in manifest]),
    )
    run.evaluate()
    op = result.metrics["operating_point"]
    assert (
        len(op["thresholds"]) == 3
        and 0 <= op["refer_rate"] <= 1
        and op["accuracy"] == pytest.approx((result.decision == result.truth).mean())
    )
    run.save(tmp_path / "cv.npz")
    loaded = CVRun.load(tmp_path / "cv.npz", config)
    assert loaded.results[0].rules == result.rules
    assert np.array_equal(loaded.results[0].decision, result.decision)


FINETUNE_TINY = {
    "preprocess.scale": 0.125,
    "augment.n_augment": 2,
    "augment.n_crops": 2,
    "augment.crop_size": 64,
    "evaluate.folds": 3,
    "classifier.kind": "logistic",
    "classifier.target_sensitivity": 0.9,
    "finetune.enabled": True,
    "finetune.epochs": 1,
    "finetune.crops_per_image": 1,
    "finetune.batch_size": 8,
    "finetune.validation_crops": 1,
}


@pytest.mark.heavy
def test_cv_finetune_never_lets_a_test_image_reach_finetuning(demo_data, tmp_path, monkeypatch):
    import histoboost.finetune as ft
    from histoboost.config import preset
    from histoboost.evaluate import cross_validate

    config = preset("quick").merged(FINETUNE_TINY)
    manifest, _ = load_manifest(demo_data, config.preprocess, 64, progress=False)
    given, real = [], ft.finetune

    def spy(images, *args, **kwargs):  # every image that reaches fine-tuning, per call
        given.append({im.image_id for im in images})
        return real(images, *args, **kwargs)

    monkeypatch.setattr(ft, "finetune", spy)
    run = cross_validate(manifest, config, Runtime(cache_dir=tmp_path / "cache"), compare_split="auto")
    ids = np.array([r.image_id for r in manifest])
    assert len(given) == run.plan.n_folds == 3
    for k, images in enumerate(given):
        assert images == set(ids[run.plan.folds != k])  # exactly the fold's training images, no test image
        assert not images & set(ids[run.plan.folds == k])
    assert [r["test_images_in_finetuning"] for r in run.finetuned] == [0, 0, 0]
    assert len({r["weights_sha256"] for r in run.finetuned}) == 3  # each fold has its own weights
    assert [r["split_by"] for r in run.split_comparison] == ["patient"]  # no second split: it would re-tune
    op = run.results[0].metrics["operating_point"]
    assert len(op["thresholds"]) == 3


@pytest.mark.heavy
def test_cv_finetune_stops_when_a_card_lists_a_test_image(demo_data, tmp_path, monkeypatch):
    import histoboost.finetune as ft
    from histoboost.config import preset
    from histoboost.evaluate import cross_validate

    config = preset("quick").merged(FINETUNE_TINY)
    manifest, _ = load_manifest(demo_data, config.preprocess, 64, progress=False)
    real = ft.finetune_cached
    everything = [r.image_id for r in manifest]

    def leaky(*args, **kwargs):  # a card that claims every image, test images included
        result = real(*args, **kwargs)
        card = {**result.card, "data": {**result.card["data"], "train_images": everything}}
        return ft.FinetuneResult(result.weights, card)

    monkeypatch.setattr(ft, "finetune_cached", leaky)
    with pytest.raises(EvaluationError, match="fold 1: 16 test image"):
        cross_validate(manifest, config, Runtime(cache_dir=tmp_path / "cache"))


def test_expected_calibration_error_counts_the_gap_per_bin():
    from histoboost.evaluate import calibration

    truth = np.array([0, 0, 1, 1])
    confident = np.array([[0.95, 0.025, 0.025]] * 4)  # 95% sure of group 0, right half the time
    found = calibration(truth, confident)
    assert found["ece"] == pytest.approx(0.45) and len(found["bins"]) == 1
    (only,) = found["bins"]
    assert only["lower"] == pytest.approx(0.9) and only["count"] == 4 and only["accuracy"] == 0.5
    honest = np.array([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.5, 0.5, 0.0]])
    assert calibration(truth, honest)["ece"] == pytest.approx(0.0)  # 50% sure, right half the time


BACH4 = ("Normal", "Benign", "InSitu", "Invasive")


def test_four_classes_stay_apart_and_the_three_groups_come_from_the_same_predictions(tmp_path):
    """With --classes bach4 the classifier tells normal from benign: on features that separate all four classes the
    4-class accuracy is 1 (merging normal and benign would cap it at 0.75), and every 3-group number is the
    4-class confusion matrix collapsed (normal + benign), not a second model."""
    from histoboost.config import preset
    from histoboost.evaluate import CVRun, cross_validate_features

    manifest = _manifest(tmp_path, patients_per_class=(4, 4, 4, 4), labels=BACH4)
    assert manifest.groups.tolist().count(0) == 16  # normal and benign are both group 0
    config = preset("quick").merged(
        {
            "classifier.kind": "logistic",
            "classifier.C": 1.0,
            "classifier.classes": "bach4",
            "classifier.target_sensitivity": 0.9,
            "classifier.inner_folds": 3,
        }
    )
    plan = make_folds(manifest, "patient", 4, seed=0, classes=CLASS_SCHEMES["bach4"])
    targets = CLASS_SCHEMES["bach4"].targets(manifest)
    for k in range(4):
        assert set(targets[plan.folds == k]) == {0, 1, 2, 3}  # stratified by the 4 classes
    rng = np.random.default_rng(0)
    owners = np.repeat(np.arange(len(manifest)), 3)
    X = (np.eye(4)[targets][owners] * 4 + rng.normal(0, 0.3, (len(owners), 4))).astype(np.float32)
    result = cross_validate_features(X, owners, manifest, plan, config, "lite")
    assert result.aug_probs.shape == (32, 3, 4) and result.truth.tolist() == targets.tolist()
    run = CVRun(
        config,
        plan,
        [result],
        np.array([r.image_id for r in manifest]),
        np.array([r.name for r in manifest]),
        np.array([str(r.path) for r in manifest]),
        np.array([r.patient for r in manifest]),
    )
    run.evaluate()
    m = result.metrics
    four = np.array(m["classes"]["majority_vote"]["confusion"])
    assert m["classes"]["names"] == ["normal", "benign", "in_situ", "invasive"]
    assert (
        m["classes"]["majority_vote"]["accuracy"] == 1.0 and m["classes"]["majority_vote"]["balanced_accuracy"] == 1.0
    )
    assert np.trace(four) == 32 and four[0, 0] == four[1, 1] == 8
    collapse = np.array([[1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]])
    for decision in ("majority_vote", "operating_point"):
        cm = np.array(m["classes"][decision]["confusion"])
        assert (collapse.T @ cm @ collapse).tolist() == m[decision]["confusion"]
    assert m["auc"]["carcinoma"] == 1.0
    assert result.grouped().mean_probs.sum(axis=1) == pytest.approx(1.0)


def test_four_classes_need_the_four_labels(tmp_path):
    from histoboost.config import preset
    from histoboost.evaluate import cross_validate_features

    manifest = _manifest(tmp_path, patients_per_class=(3, 3, 3, 3), labels=("Normal", "Adenosis", "InSitu", "Invasive"))
    with pytest.raises(
        EvaluationError,
        match="needs the labels Normal, Benign, InSitu, Invasive: 6 image.s. have others, e.g. 'Adenosis'",
    ):
        make_folds(manifest, "patient", 3, seed=0, classes=CLASS_SCHEMES["bach4"])
    with pytest.raises(DataError, match="bach4 needs the labels"):
        CLASS_SCHEMES["bach4"].targets(_manifest(tmp_path / "b", labels=("0", "1", "2")))
    owners = np.repeat(np.arange(len(manifest)), 2)
    plan = make_folds(manifest, "patient", 3, seed=0)
    with pytest.raises(EvaluationError, match="bach4 needs"):
        cross_validate_features(
            np.zeros((len(owners), 2), np.float32),
            owners,
            manifest,
            plan,
            preset("quick").merged({"classifier.classes": "bach4"}),
            "x",
        )
