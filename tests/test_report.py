import csv
import json

import numpy as np

from histoboost.config import preset
from histoboost.evaluate import CVResult, CVRun, FoldPlan
from histoboost.report import accuracy_table, write_outputs


def _fake_run(tmp_path) -> CVRun:
    rng = np.random.default_rng(0)
    n, a = 12, 4
    truth = np.repeat([0, 1, 2], 4)
    probs = rng.dirichlet([1, 1, 1], size=(n, a))
    probs[np.arange(n), :, truth] += 1.0  # mostly right
    probs /= probs.sum(axis=2, keepdims=True)
    probs[0, :, :] = [0.1, 0.1, 0.8]  # one clear miss
    plan = FoldPlan(np.arange(n) % 3, np.array([f"u{i}" for i in range(n)], dtype=object), "patient", 3)
    image = tmp_path / "img.png"
    from PIL import Image

    Image.new("RGB", (50, 40), (200, 100, 180)).save(image)
    run = CVRun(
        preset("quick"),
        plan,
        [CVResult("m1", probs, truth, plan), CVResult("m2", probs[:, ::-1], truth, plan)],
        np.array([f"{i:064x}" for i in range(n)]),
        np.array([f"img{i}" for i in range(n)]),
        np.array([str(image)] * n),
        np.array([f"p{i // 2}" for i in range(n)]),
    )
    run.evaluate()
    return run


def test_outputs_are_written_and_rebuilt(tmp_path):
    run = _fake_run(tmp_path)
    report = write_outputs(run, tmp_path / "run", {"backbones": {}})
    out = tmp_path / "run"
    for name in (
        "config.json",
        "metrics.json",
        "predictions.csv",
        "cv_results.npz",
        "figures/confusion.png",
        "figures/roc.png",
        "figures/folds.png",
        "figures/reliability.png",
    ):
        assert (out / name).is_file(), name
    page = report.read_text()
    assert page.count("data:image/png;base64,") == 4 and "data:image/jpeg;base64," in page
    assert "Calibration" in page and "not calibrated (--calibrate)" in page
    assert "carcinoma (1+2) vs non-carcinoma (0)" in page and "swaps rows and columns" in page
    assert "estimates accuracy on new patients" in page and "not for diagnosis" in page
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert len(rows) == 24 and rows[0]["class"] == "invasive" and rows[0]["truth_name"] == "normal_benign"
    assert {"p_normal_benign", "p_in_situ", "p_invasive", "votes_invasive", "fold", "image_id"} <= set(rows[0])
    metrics = json.loads((out / "metrics.json").read_text())
    reloaded = CVRun.load(out / "cv_results.npz", run.config)
    reloaded.evaluate()
    assert reloaded.results[0].metrics == json.loads(json.dumps(metrics["models"]["m1"]))
    assert "m1" in accuracy_table(run) and "m2" in accuracy_table(run)


def test_damaged_results_are_one_clear_error(tmp_path):
    import pytest

    from histoboost.evaluate import EvaluationError

    (tmp_path / "cv_results.npz").write_bytes(b"not an npz")
    with pytest.raises(EvaluationError, match="rerun histoboost cv"):
        CVRun.load(tmp_path / "cv_results.npz", preset("quick"))


def test_side_by_side_splits_operating_point_and_stain_fallbacks_are_reported(tmp_path):
    from histoboost.classifier import DecisionRule
    from histoboost.evaluate import split_summary

    run = _fake_run(tmp_path)
    result = run.results[0]
    result.rules = [DecisionRule(temperature=2.0, threshold=0.3, refer_below_agreement=0.8)] * 3
    result.decision, result.agreement = result.rules[0].decide(result.aug_probs)
    run.stain_fallbacks = np.array(["none"] + [""] * 11)
    run.evaluate()
    image_plan = FoldPlan(run.plan.folds, run.image_ids.astype(object), "image", 3)
    by_image = CVResult("m1", result.aug_probs, result.truth, image_plan)
    run.split_comparison = [split_summary(r, 0) for r in run.results]
    from histoboost.evaluate import evaluate_result

    evaluate_result(by_image, 0)
    run.split_comparison.append(split_summary(by_image, 0))
    page = write_outputs(run, tmp_path / "run").read_text()
    assert "Split by image vs split by patient" in page and "estimates new patients" in page
    assert "Operating point" in page and "1 image(s) failed the stain quality check" in page
    calibration = result.metrics["calibration"]
    assert calibration["calibrated"]["ece"] != calibration["raw"]["ece"]  # the temperature moved the probabilities
    rows = list(csv.DictReader(open(tmp_path / "run" / "predictions.csv")))
    first = [r for r in rows if r["model"] == "m1"][0]
    assert "stain QC failed" in first["refer"] and first["stain_fallback"] == "none"
    assert first["operating_point_decision"] != ""
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert {r["split_by"] for r in metrics["split_comparison"]} == {"patient", "image"}
    assert "operating point" in accuracy_table(run) and "split by image" in accuracy_table(run)


def test_four_class_outputs_name_each_class_and_put_published_results_beside_with_their_protocol(tmp_path):
    from histoboost.data import CLASS_SCHEMES

    rng = np.random.default_rng(1)
    n, a = 16, 3
    truth = np.repeat([0, 1, 2, 3], 4)
    probs = rng.dirichlet([1, 1, 1, 1], size=(n, a))
    probs[np.arange(n), :, truth] += 2.0
    probs /= probs.sum(axis=2, keepdims=True)
    plan = FoldPlan(np.arange(n) % 2, np.array([f"u{i}" for i in range(n)], dtype=object), "id_block", 2)
    config = preset("quick").merged({"classifier.classes": "bach4"})
    run = CVRun(
        config,
        plan,
        [CVResult("m", probs, truth, plan, classes=CLASS_SCHEMES["bach4"])],
        np.array([f"{i:064x}" for i in range(n)]),
        np.array([f"img{i}" for i in range(n)]),
        np.array([str(tmp_path / "none.png")] * n),
        np.array([""] * n),
    )
    run.evaluate()
    report = write_outputs(run, tmp_path / "run").read_text()
    assert "4 classes (Normal, Benign, InSitu, Invasive)" in report and "Rakhlin" in report
    assert "split by image" in report and "not comparable" in report
    rows = list(csv.DictReader((tmp_path / "run" / "predictions.csv").open()))
    assert {"p_normal", "p_benign", "p_in_situ", "p_invasive", "votes_benign", "label"} <= set(rows[0])
    by_class = {r["truth_name"]: r for r in rows if r["class"] == r["truth_name"]}
    assert by_class["benign"]["label"] == "Benign" and by_class["benign"]["group"] == "0"
    assert by_class["invasive"]["group"] == "2"
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())["models"]["m"]
    assert (
        len(metrics["classes"]["majority_vote"]["confusion"]) == 4 and len(metrics["majority_vote"]["confusion"]) == 3
    )
    reloaded = CVRun.load(tmp_path / "run" / "cv_results.npz", config)
    reloaded.evaluate()
    assert reloaded.results[0].metrics == json.loads(json.dumps(metrics))
