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
    bundle = bundle.using(Runtime(feature_cache=False))  # computed here, never read back from a store
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


def _unseen(bach, n=2):
    return [bach / f"{name}.jpeg" for name in ("Normal/n005", "InSitu/is005", "Invasive/iv005")[:n]]


def test_a_second_prediction_reads_the_feature_store_and_no_cache_writes_none(model, bach, tmp_path, monkeypatch):
    import histoboost.features

    bundle, _ = model
    files = _unseen(bach)
    cached = bundle.using(Runtime(cache_dir=tmp_path / "cache"))
    first = cached.predict(files)
    assert first.problems == [] and len(list((tmp_path / "cache" / "features").glob("*/*.npz"))) == len(files)
    plain = bundle.using(Runtime(cache_dir=tmp_path / "none", feature_cache=False)).predict(files)
    assert plain.records == first.records and not (tmp_path / "none").exists()
    monkeypatch.setattr(histoboost.features, "describe_image", lambda *a, **k: pytest.fail("described again"))
    again = cached.predict(files)
    assert again.records == first.records
    assert np.array_equal(cached.predict_proba(np.asarray(Image.open(files[0]))), cached.predict_proba(files[0]))


def test_predict_reads_what_extract_stored_under_the_same_keys(model, bach, tmp_path, monkeypatch):
    import histoboost.features
    from histoboost.data import load_manifest

    bundle, _ = model
    runtime = Runtime(cache_dir=tmp_path / "cache")
    manifest, _ = load_manifest(bach / "manifest.csv")
    wanted = {str(f) for f in _unseen(bach, 3)}
    subset = manifest.__class__(tuple(r for r in manifest if str(r.path) in wanted), manifest.root, "csv")
    assert len(subset) == 3
    for backbone in bundle.backbones:
        histoboost.features.extract_features(subset, bundle.config, backbone, runtime)
    expected = bundle.using(Runtime(feature_cache=False)).predict(_unseen(bach, 3)).records
    monkeypatch.setattr(histoboost.features, "describe_image", lambda *a, **k: pytest.fail("described again"))
    assert bundle.using(runtime).predict(_unseen(bach, 3)).records == expected


def test_an_entry_stored_without_stain_flags_is_described_again_when_its_stain_check_failed(model, bach, tmp_path):
    """Stores written before the stain flags were kept cannot give a failed image's stain_qc text: such an entry is
    computed again (the store is left as it is); one whose check passed is used as it is."""
    from histoboost.data import scan_file
    from histoboost.features import FeatureStore

    bundle, _ = model
    runtime = Runtime(cache_dir=tmp_path / "cache")
    file = _unseen(bach, 1)[0]
    info = scan_file(file)
    predictor = bundle.predictor.using(runtime)
    reference = predictor.predict_image(file, info.image_id, info.mpp)[0]
    store = FeatureStore.open(tmp_path / "cache", bundle.config, bundle.backbones[0])
    entry = store.entry_for(info.image_id, info.mpp)
    stored = store.load(entry)
    assert stored is not None and stored.stain_flags == () and stored.stain_fallback == ""
    from dataclasses import replace

    store.save(entry, replace(stored, pooled=stored.pooled * 0, stain_fallback="none", stain_flags=None))
    again = predictor.using(runtime).predict_image(file, info.image_id, info.mpp)[0]
    assert np.array_equal(again.probs, reference.probs) and again.stain_qc == ""
    assert store.load(entry).stain_flags is None  # computed again, and the stored entry never overwritten
    store.save(entry, replace(stored, stain_fallback="none", stain_flags=("density collapsed",)))
    flagged = predictor.using(runtime).predict_image(file, info.image_id, info.mpp)[0]
    assert flagged.stain_qc == "density collapsed (used un-normalised)" and "stain QC failed" in flagged.refer


def test_only_models_workers_can_rebuild_go_to_a_dask_engine(model):
    from dataclasses import replace

    from histoboost.inference import Predictor

    bundle, _ = model

    class Remote:
        kind = "dask"

    p = bundle.predictor
    tuned = Predictor(
        p.config.merged({"finetune.enabled": True}), p.backbones, p.classifier, p.rule, p.identity, Runtime()
    )
    records = [object()]
    with pytest.raises(HistoboostError, match="not sent to Dask workers"):
        tuned.using(replace(Runtime(), engine=Remote())).describe_on_engine(records)
    with pytest.raises(HistoboostError, match="drop --no-cache"):
        p.using(replace(Runtime(), engine=Remote(), feature_cache=False)).describe_on_engine(records)
    assert p.describe_on_engine(records) == {}  # this process: nothing to hand out


def test_a_store_that_cannot_be_written_costs_a_warning_not_the_prediction(model, bach, tmp_path):
    bundle, _ = model
    (tmp_path / "file").write_text("a file where the cache folder should be")
    expected = bundle.using(Runtime(feature_cache=False)).predict(_unseen(bach, 1)).records
    with pytest.warns(UserWarning, match="predicting without the feature store"):
        got = bundle.using(Runtime(cache_dir=tmp_path / "file")).predict(_unseen(bach, 1)).records
    assert got == expected
