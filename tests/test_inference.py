"""The inference seam: arrays and files give the same probabilities as `histoboost predict`, p(carcinoma) and the
refer text come from one place, bad arrays are one clear error, and a Runtime is checked where it is made."""

from __future__ import annotations

import csv
import io

import numpy as np
import pytest
from PIL import Image
from test_cli import run_cli

from histoboost.classifier import DecisionRule
from histoboost.errors import DataError, HistoboostError, StainError
from histoboost.inference import p_carcinoma, refer_text
from histoboost.runtime import Runtime


def test_an_array_gives_the_probabilities_predict_writes(model, trained, tmp_path):
    """`model.predict_proba(np.asarray(Image.open(f)))` equals the p_<class> columns `histoboost predict f` writes,
    for a JPEG and a PNG; a grayscale array (2-D) meets the same refusal as its file under stain normalisation."""
    bundle, path = model
    jpeg = trained[1].records[0].path
    png = tmp_path / "part.png"
    Image.open(trained[1].records[5].path).crop((100, 50, 1100, 950)).save(png)
    result = run_cli("predict", path, jpeg, png, "--quiet")
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    classes = bundle.classes.classes
    for row, file in zip(rows, (jpeg, png), strict=True):
        written = np.array([float(row[f"p_{c}"]) for c in classes])
        from_array = bundle.predict_proba(np.asarray(Image.open(file)))
        assert from_array.shape == (len(classes),)
        assert np.abs(from_array - written).max() <= 1e-6
        assert np.abs(bundle.predict_proba(file) - written).max() <= 1e-6
    both = bundle.predict_proba([jpeg, np.asarray(Image.open(png))])
    assert both.shape == (2, len(classes)) and np.abs(both[1] - bundle.predict_proba(png)).max() == 0
    gray = tmp_path / "gray.png"
    Image.open(jpeg).convert("L").save(gray)
    with pytest.raises(StainError, match="cannot be told apart") as from_array:
        bundle.predict_proba(np.asarray(Image.open(gray)))
    assert "cannot be told apart" in run_cli("predict", path, gray, "--quiet").stderr


def test_a_bad_array_or_file_is_one_clear_error(model, tmp_path):
    bundle, _ = model
    with pytest.raises(DataError, match="must be uint8"):
        bundle.predict_proba(np.zeros((600, 600, 3), dtype=np.float32))
    with pytest.raises(DataError, match="drop an alpha channel"):
        bundle.predict_proba(np.zeros((600, 600, 4), dtype=np.uint8))
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(HistoboostError, match="empty.png: empty file"):
        bundle.predict_proba(tmp_path / "empty.png")


def test_p_carcinoma_sums_the_carcinoma_groups_of_any_scheme():
    probs = np.array([[0.1, 0.2, 0.3, 0.4], [0.5, 0.3, 0.1, 0.1]])
    assert p_carcinoma(probs, (0, 0, 1, 2)) == pytest.approx([0.7, 0.2])  # BACH's 4 classes
    assert p_carcinoma(probs[:, :3] / probs[:, :3].sum(1, keepdims=True), (0, 1, 2)) == pytest.approx([5 / 6, 4 / 9])


def test_decide_refers_split_votes_and_failed_stain_in_one_text(model):
    bundle, _ = model
    predictor = bundle.predictor.using(Runtime())
    predictor.rule = DecisionRule(refer_below_agreement=2 / 3)  # the majority vote, refer below 2 of 3 agreeing
    raw = np.array([[[0.9, 0.05, 0.05]] * 3, [[0.9, 0.05, 0.05], [0.1, 0.1, 0.8], [0.1, 0.8, 0.1]]])
    decided = predictor.decide(raw, ["", "un-normalised"])
    assert decided.refer[0] == ""
    assert decided.refer[1] == "votes split; stain QC failed (un-normalised)"
    assert refer_text("", "a", "", "b") == "a; b"


def test_a_runtime_is_checked_where_it_is_made():
    assert Runtime().batch == 8 and Runtime(device="cuda").batch == 48 and Runtime(batch_size=3).batch == 3
    for bad in ({"device": "gpu"}, {"batch_size": 0}, {"readers": 0}):
        with pytest.raises(HistoboostError):
            Runtime(**bad)
