import json
import shutil
import zipfile

import numpy as np
import pytest
from PIL import Image

from histoboost.bundle import FORMAT_VERSION, Bundle, BundleError
from histoboost.config import preset
from histoboost.data import load_manifest
from histoboost.evaluate import evaluate_predictor
from histoboost.report import OVERLAY_LEGEND_HEIGHT
from histoboost.runtime import Runtime
from histoboost.training import train_bundle

from conftest import BACH, SMALL, write_png


def test_save_load_predict_equals_in_memory(trained, tmp_path):
    bundle, manifest, _ = trained
    paths = [r.path for r in manifest][:3]
    in_memory, problems = bundle.predict(paths)
    assert problems == []
    for out in (tmp_path / "model", tmp_path / "model.zip"):  # not the shared root: the `model` fixture saves there
        bundle.save(out)
        loaded = Bundle.load(out)
        again, _ = loaded.predict(paths)
        for a, b in zip(in_memory, again):
            assert {k: v for k, v in a.items() if k != "bundle_sha256"} == {
                k: v for k, v in b.items() if k != "bundle_sha256"
            }
        assert again[0]["bundle_sha256"] == loaded.sha256 and len(loaded.sha256) == 64
    record = in_memory[0]
    assert {
        "path",
        "class",
        "group",
        "p_normal_benign",
        "p_in_situ",
        "p_invasive",
        "votes_invasive",
        "bundle_format",
    } <= set(record)
    assert record["class"] in ("normal_benign", "in_situ", "invasive") and record["bundle_format"] == FORMAT_VERSION
    assert sum(record[f"votes_{g}"] for g in ("normal_benign", "in_situ", "invasive")) == 3


def test_bundle_holds_no_pickle_and_says_what_it_is(trained):
    bundle, _, root = trained
    out = bundle.save(root / "inspect-me")
    assert sorted(p.name for p in out.iterdir()) == ["bundle.json", "model.ubj"]
    meta = json.loads((out / "bundle.json").read_text())
    assert meta["format_version"] == FORMAT_VERSION and meta["classes"] == ["normal_benign", "in_situ", "invasive"]
    assert meta["backbones"][0]["weights_sha256"] == bundle.backbones[0].weights_sha256
    assert meta["config"]["augment"]["n_augment"] == 3 and meta["training_data"]["images"] == 8
    assert "xgboost" in meta["versions"]
    with pytest.raises(BundleError, match="exists"):
        bundle.save(out)


def test_altered_bundles_are_refused(trained):
    from histoboost.container import meta_digest

    bundle, _, root = trained
    out = bundle.save(root / "tamper")
    model = out / "model.ubj"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01
    model.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="model.ubj does not match its checksum"):
        Bundle.load(out)
    out2 = bundle.save(root / "tamper2")
    meta = json.loads((out2 / "bundle.json").read_text())
    meta["config"]["seed"] = 1
    (out2 / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="bundle.json does not match its checksum: the bundle was damaged"):
        Bundle.load(out2)
    out3 = bundle.save(root / "future")
    meta = json.loads((out3 / "bundle.json").read_text())
    meta["format_version"] = FORMAT_VERSION + 1
    meta["meta_sha256"] = meta_digest(meta)
    (out3 / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="newer than"):
        Bundle.load(out3)
    zipped = bundle.save(root / "tamper.zip")
    raw = bytearray(zipped.read_bytes())
    with zipfile.ZipFile(zipped) as archive:
        info = archive.getinfo("model.ubj")
    raw[info.header_offset + 60] ^= 0xFF
    zipped.write_bytes(bytes(raw))
    with pytest.raises(BundleError, match="damaged|checksum"):
        Bundle.load(zipped)


def test_bundle_needing_other_weights_is_refused(trained):
    bundle, _, root = trained
    out = bundle.save(root / "weights")
    meta = json.loads((out / "bundle.json").read_text())
    meta["backbones"][0]["weights_sha256"] = "0" * 64
    from histoboost.container import meta_digest

    meta["meta_sha256"] = meta_digest(meta)
    (out / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="trained with tf_efficientnet_lite0 and 000000000000"):
        Bundle.load(out)


def test_bad_images_are_reported_and_the_rest_predicted(trained, tmp_path):
    bundle, manifest, _ = trained
    (tmp_path / "empty.jpeg").write_bytes(b"")
    write_png(tmp_path / "tiny.png", (100, 100))
    good = manifest.records[0].path
    records, problems = bundle.predict([good, tmp_path / "empty.jpeg", tmp_path / "tiny.png", tmp_path / "nope.png"])
    assert len(records) == 1
    assert sorted(p.path.name for p in problems) == ["empty.jpeg", "nope.png", "tiny.png"]
    assert all("\n" not in str(p) for p in problems)


def test_overlay_size_and_legend(trained, tmp_path):
    bundle, manifest, _ = trained
    path = manifest.records[0].path
    records, _ = bundle.predict([path], overlay_dir=tmp_path)
    overlay = Image.open(tmp_path / records[0]["overlay"])
    assert records[0]["overlay"] == f"{path.stem}-{records[0]['image_id'][:12]}.overlay.png"
    assert overlay.size == (1024, 1024 + OVERLAY_LEGEND_HEIGHT)  # 1536 px image, longest side capped at 1024
    pixels = np.asarray(overlay.convert("RGB"))
    legend = pixels[1024:]
    assert (legend < 100).any()  # text and colour bar are drawn
    assert not np.array_equal(pixels[:1024], np.asarray(Image.open(path).convert("RGB").resize((1024, 1024))))


def test_logistic_bundle_carries_its_operating_point(trained):
    from histoboost.classifier import DecisionRule

    _, manifest, root = trained
    config = preset("quick").merged(
        {
            **SMALL,
            "classifier.kind": "logistic",
            "classifier.target_sensitivity": 1.0,
            "classifier.calibrate": True,
            "classifier.refer_below_agreement": 0.9,
        }
    )
    bundle = train_bundle(manifest, config, Runtime(cache_dir=root / "cache"))
    out = bundle.save(root / "logistic")
    assert sorted(p.name for p in out.iterdir()) == ["bundle.json", "model.json"]
    meta = json.loads((out / "bundle.json").read_text())
    rule = DecisionRule(**meta["decision_rule"])
    assert rule.threshold is not None and rule.temperature > 0 and rule.refer_below_agreement == 0.9
    loaded = Bundle.load(out)
    assert loaded.rule == rule
    records, _ = loaded.predict([r.path for r in manifest][:4])
    for record in records:
        assert record["p_carcinoma"] == pytest.approx(record["p_in_situ"] + record["p_invasive"], abs=1e-5)
        assert (record["group"] > 0) == (record["p_carcinoma"] >= rule.threshold)
        assert (record["refer"] == "votes split") == (record["agreement"] < 0.9)


def test_local_weights_travel_inside_the_bundle(trained, tmp_path):
    from histoboost.backbones import _package_weights
    from histoboost.specs import REGISTRY

    bundle, manifest, root = trained
    local = tmp_path / "lite0.pth"  # the same ImageNet weights, given as a local file (as fine-tuned ones are)
    shutil.copy(_package_weights(REGISTRY["efficientnet_lite0"]), local)
    carrying = train_bundle(
        manifest, bundle.config.merged({"features.weights": [str(local)]}), Runtime(cache_dir=root / "cache")
    )
    out = carrying.save(tmp_path / "model")
    meta = json.loads((out / "bundle.json").read_text())
    assert meta["format_version"] == FORMAT_VERSION == 7
    assert meta["backbones"][0]["file"] == "weights-efficientnet_lite0.safetensors"  # a .pth travels as safetensors
    assert "features" in meta["config"] and meta["config"]["features"]["weights"] == []  # no local path
    local.unlink()  # the bundle no longer needs the original file
    paths = [r.path for r in manifest][:2]
    expected, _ = carrying.predict(paths)
    loaded = Bundle.load(out)
    assert loaded.backbones[0].weights_sha256 == carrying.backbones[0].weights_sha256
    got, _ = loaded.predict(paths)
    assert [r["p_invasive"] for r in got] == [r["p_invasive"] for r in expected]
    weights = out / "weights-efficientnet_lite0.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="weights-efficientnet_lite0.safetensors does not match its checksum"):
        Bundle.load(out)


def test_a_four_class_bundle_predicts_normal_and_benign_apart_with_the_data_sets_labels(trained, tmp_path):
    """--classes bach4 end to end: trained on the eight images (features from the session's store), saved, loaded;
    its predictions of those images name each image's own BACH class (a merged normal/benign could not)."""
    bundle, manifest, root = trained
    config = bundle.config.merged({"classifier.classes": "bach4", "classifier.kind": "logistic", "classifier.C": 1.0})
    four = train_bundle(manifest, config, Runtime(cache_dir=root / "cache"))
    loaded = Bundle.load(four.save(tmp_path / "bach4.zip"))
    assert loaded.meta["classes"] == ["normal", "benign", "in_situ", "invasive"]
    assert loaded.meta["decision_rule"]["groups"] == [0, 0, 1, 2]
    assert loaded.meta["training_data"]["per_class"] == {"normal": 2, "benign": 2, "in_situ": 2, "invasive": 2}
    records, problems = loaded.predict([r.path for r in manifest])
    assert problems == []
    assert [r["label"] for r in records] == [r.label for r in manifest]  # Benign, Benign, InSitu, ... Normal
    assert {"p_normal", "p_benign", "p_in_situ", "p_invasive", "votes_benign", "class", "group"} <= set(records[0])
    for r in records:
        assert r["group"] == {"Normal": 0, "Benign": 0, "InSitu": 1, "Invasive": 2}[r["label"]]
        assert r["p_carcinoma"] == pytest.approx(r["p_in_situ"] + r["p_invasive"], abs=2e-6)
    held_out = tmp_path / "held_out"  # 4 other real BACH images: evaluate gives 4-class and 3-group metrics
    for label, name in (("Normal", "n010"), ("Benign", "b010"), ("InSitu", "is005"), ("Invasive", "iv011")):
        (held_out / label).mkdir(parents=True)
        shutil.copy(BACH / label / f"{name}.jpeg", held_out / label)
    run = evaluate_predictor(loaded.predictor, load_manifest(held_out)[0])
    metrics = run.results[0].metrics
    assert np.array(metrics["classes"]["majority_vote"]["confusion"]).sum(axis=1).tolist() == [1, 1, 1, 1]
    assert np.array(metrics["majority_vote"]["confusion"]).sum(axis=1).tolist() == [2, 1, 1]


def test_a_format_5_bundle_of_histoboost_0_3_is_read_as_the_three_groups(trained, tmp_path):
    """Format 5 had no class scheme: no config.classifier.classes, decision_rule.groups or per_class. Rewritten
    to exactly that layout, the bundle loads and predicts as before."""
    from histoboost.container import meta_digest

    bundle, manifest, _ = trained
    out = bundle.save(tmp_path / "v5")
    meta = json.loads((out / "bundle.json").read_text())
    meta["format_version"] = 5
    del meta["config"]["classifier"]["classes"], meta["decision_rule"]["groups"], meta["training_data"]["per_class"]
    meta["meta_sha256"] = meta_digest(meta)
    (out / "bundle.json").write_text(json.dumps(meta))
    old = Bundle.load(out)
    assert old.classes.name == "groups" and old.rule.groups == (0, 1, 2)
    paths = [r.path for r in manifest][:2]
    expected = [{k: v for k, v in r.items() if k != "bundle_sha256"} for r in bundle.predict(paths)[0]]
    assert [{k: v for k, v in r.items() if k != "bundle_sha256"} for r in old.predict(paths)[0]] == expected
