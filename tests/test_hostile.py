"""Hostile and careless inputs (docs/security.md): forged bundles, zip bombs, outputs that must be whole or
absent, damaged stores and run files, bad flags. Each test names the item of the hardening issue it covers;
images and manifests are in test_hostile_data.py."""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from histoboost import storage
from histoboost.bundle import Bundle, BundleError
from histoboost.config import preset
from histoboost.container import META_FILE, inventory, meta_digest
from histoboost.runtime import Runtime
from histoboost.training import train_bundle

from conftest import SMALL


def _forge(source: Path, out: Path, edit=None, members: dict | None = None, rehash: bool = True) -> Path:
    """A copy of a folder bundle with bundle.json edited and its checksums recomputed, as an attacker would."""
    shutil.copytree(source, out)
    meta = json.loads((out / META_FILE).read_text())
    for name, data in (members or {}).items():
        (out / name).write_bytes(data)
    if edit is not None:
        edit(meta)
    if rehash:
        import hashlib

        for name in list(meta.get("files", {})):
            if (out / name).is_file():
                meta["files"][name] = hashlib.sha256((out / name).read_bytes()).hexdigest()
        meta["meta_sha256"] = meta_digest(meta)
    (out / META_FILE).write_text(json.dumps(meta))
    return out


@pytest.fixture(scope="module")
def genuine(trained):
    bundle, _, root = trained
    return bundle.save(root / "genuine")


# -- 1. no path from bundle.json is ever written or opened ------------------------------------------------


def test_member_names_from_bundle_json_never_become_paths(genuine, tmp_path):
    target = tmp_path / "pwned"
    forged = [
        lambda m: m["classifier"].update(file=f"../{target.name}/x.ubj"),
        lambda m: m["classifier"].update(file=str(target / "abs.ubj")),
        lambda m: m["backbones"][0].update(file=f"../../{target.name}/w.safetensors"),
        lambda m: m["config"]["features"].update(weights=["efficientnet_lite0=/etc/passwd"]),
    ]
    for i, edit in enumerate(forged):
        with pytest.raises(BundleError) as err:
            Bundle.load(_forge(genuine, tmp_path / f"b{i}", edit))
        assert "\n" not in str(err.value)
    assert not target.exists() and not list(tmp_path.rglob("x.ubj")) and not list(tmp_path.rglob("abs.ubj"))


def test_files_must_list_exactly_the_members_present(genuine, tmp_path):
    extra = _forge(genuine, tmp_path / "extra", members={"weights-evil.safetensors": b"x"})
    with pytest.raises(BundleError, match="weights-evil.safetensors not listed"):
        Bundle.load(extra)
    dropped = _forge(genuine, tmp_path / "dropped", lambda m: m.update(files={}))
    with pytest.raises(BundleError, match="files"):  # the schema wants at least the classifier
        Bundle.load(dropped)
    unknown = shutil.copytree(genuine, tmp_path / "unknown")
    (unknown / "README.txt").write_text("hello")
    with pytest.raises(BundleError, match="README.txt.*never has"):
        Bundle.load(unknown)
    linked = shutil.copytree(genuine, tmp_path / "linked")
    (linked / "model.ubj").unlink()
    (linked / "model.ubj").symlink_to(genuine / "model.ubj")
    with pytest.raises(BundleError, match="not a regular file"):
        Bundle.load(linked)


# -- 2. sizes are checked before anything is read -----------------------------------------------------------


def test_zip_bomb_is_refused_in_one_line_at_small_memory(genuine, tmp_path):
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as archive:
        for member in genuine.iterdir():
            archive.write(member, member.name)
        with archive.open("weights-efficientnet_lite0.safetensors", "w", force_zip64=True) as handle:
            block = bytes(2**20)
            for _ in range(512):  # 512 MiB of zeros in a ~0.5 MB zip
                handle.write(block)
    assert bomb.stat().st_size < 2 * 2**20
    code = (
        "import resource, sys\nfrom histoboost.bundle import Bundle, BundleError\n"
        "rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024\nbefore = rss()\n"
        "try:\n    Bundle.load(sys.argv[1])\nexcept BundleError as err:\n    print(err)\n"
        "print(rss() - before)"
    )
    result = subprocess.run([sys.executable, "-c", code, bomb], capture_output=True, text=True, check=True)
    message, grown_mib = result.stdout.strip().rsplit("\n", 1)
    assert "zip bomb" in message and "\n" not in message
    assert int(grown_mib) < 50  # refused before torch is even imported; the 512 MiB were never inflated


def test_a_bundle_naming_a_huge_network_is_refused_before_building_it(genuine, tmp_path, monkeypatch):
    from histoboost import backbones, bundle

    monkeypatch.setattr(bundle, "MAX_WEIGHTS_BYTES", 2**20)  # Lite0 (~19 MB) stands in for a ViT-giant here
    built = []
    monkeypatch.setattr(backbones, "create_backbone", lambda *a, **k: built.append(a))
    with pytest.raises(BundleError, match="larger than the 0 GiB"):
        Bundle.load(genuine)
    assert built == [] and backbones.parameter_bytes("vit_giant_patch14_dinov2") > 4 * 2**30


def test_too_many_members_are_refused_before_reading(genuine, tmp_path):
    many = tmp_path / "many.zip"
    with zipfile.ZipFile(many, "w") as archive:
        for i in range(20):
            archive.writestr(f"weights-x{i}.safetensors", b"")
    with pytest.raises(BundleError, match="20 members"):
        inventory(many)


# -- 3. integrity is not authenticity: identity and signatures ---------------------------------------------


def test_a_forged_threshold_is_caught_by_the_schema_or_by_the_expected_identity(trained, genuine, tmp_path):
    from histoboost.container import identity

    negative = _forge(genuine, tmp_path / "negative", lambda m: m["decision_rule"].update(threshold=-1))
    with pytest.raises(BundleError, match="decision_rule/threshold"):
        Bundle.load(negative)
    # A threshold of 0 is a valid value: the bundle's own checksums cannot tell it from a real one...
    zero = _forge(genuine, tmp_path / "zero", lambda m: m["decision_rule"].update(threshold=0.0))
    assert Bundle.load(zero).rule.threshold == 0.0
    # ...but the identity the author published can.
    published = identity((genuine / META_FILE).read_bytes())
    assert Bundle.load(genuine, expect_sha256=published).sha256 == published
    with pytest.raises(BundleError, match="not the expected"):
        Bundle.load(zero, expect_sha256=published)


def test_signatures_detect_deliberate_edits(trained, genuine, tmp_path):
    from histoboost.container import signature_path
    from histoboost.signing import generate_key, private_key, sign

    key, public = generate_key(tmp_path / "key.pem")
    assert (key.stat().st_mode & 0o777) == 0o600 and public.name == "key.pub.pem"
    signed = shutil.copytree(genuine, tmp_path / "signed")
    sign((signed / META_FILE).read_bytes(), private_key(key), signature_path(signed))
    assert Bundle.load(signed, trusted_key=public).sha256
    swapped = _forge(signed, tmp_path / "swapped", lambda m: m["decision_rule"].update(threshold=0.0))
    shutil.copy(signature_path(signed), signature_path(swapped))
    with pytest.raises(BundleError, match="does not verify"):
        Bundle.load(swapped, trusted_key=public)
    with pytest.raises(BundleError, match="no signature"):
        Bundle.load(genuine, trusted_key=public)
    _, stranger = generate_key(tmp_path / "stranger.pem")
    with pytest.raises(BundleError, match="does not verify"):
        Bundle.load(signed, trusted_key=stranger)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
def test_signature_verifies_with_openssl_as_documented(genuine, tmp_path):
    from histoboost.container import signature_path
    from histoboost.signing import generate_key, private_key, sign

    key, public = generate_key(tmp_path / "key.pem")
    sign((genuine / META_FILE).read_bytes(), private_key(key), signature_path(tmp_path / "model"))
    result = subprocess.run(
        [
            "openssl",
            "pkeyutl",
            "-verify",
            "-pubin",
            "-inkey",
            public,
            "-rawin",
            "-in",
            genuine / META_FILE,
            "-sigfile",
            signature_path(tmp_path / "model"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0 and "Verified Successfully" in result.stdout


def test_torch_floor_excludes_the_weights_only_bypass():
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert '"torch>=2.6"' in pyproject  # CVE-2025-32434


# -- 4. every field validated before use; 14. older formats refused in one line -----------------------------


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda m: m.pop("config"), "'config' is a required property"),
        (lambda m: m.update(backbones="x"), "backbones"),
        (lambda m: m["decision_rule"].update(extra=1), "decision_rule"),
        (lambda m: m["classifier"].update(best_iteration=-1), "classifier"),
        (lambda m: m["config"].update(seed="x"), "unusable config"),
        (lambda m: m.update(format_version="4"), "no integer format_version"),
        (lambda m: m.update(format_version=4.0), "no integer format_version"),
        (lambda m: m.update(format_version=True), "no integer format_version"),
        (lambda m: m.update(format_version=-7), "no histoboost wrote it"),
        (lambda m: m.update(format_version=3), "older than the 5 this histoboost reads .histoboost 0.1.0 reads it"),
        (lambda m: m.update(format_version=4), "older than the 5 this histoboost reads .histoboost 0.2.0 reads it"),
        (lambda m: m.update(format_version=99), "newer than"),
        (lambda m: m["backbones"][0].update(spec_sha256="../x"), "backbones/0/spec_sha256"),
        (lambda m: m["backbones"][0].update(spec_sha256="0" * 64), "is defined differently in this histoboost"),
        (lambda m: m["versions"].update(deep={"a": {"b": {"c": {"d": {"e": {"f": {"g": 1}}}}}}}), "nested deeper"),
        # The class scheme (format 6): a class list, group map or config that disagree, a group outside 0-2, a model
        # of another number of classes.
        (lambda m: m["decision_rule"].update(groups=[0, 0, 1, 2]), "are not the .* of its --classes groups"),
        (lambda m: m["decision_rule"].update(groups=[0, 1, 7]), "decision_rule/groups"),
        (lambda m: m.update(classes=["normal", "benign", "in_situ", "invasive"]), "of its --classes groups"),
        (lambda m: m["config"]["classifier"].update(classes="bach4"), "of its --classes bach4"),
        (lambda m: m["config"]["classifier"].update(classes="bach5"), "unusable config"),
        (
            lambda m: (
                m["config"]["classifier"].update(classes="bach4"),
                m["decision_rule"].update(groups=[0, 0, 1, 2]),
                m.update(classes=["normal", "benign", "in_situ", "invasive"]),
            ),
            "an XGBoost model of 3 classes, not 4",
        ),
        (lambda m: m["training_data"].update(per_class={"normal": -1}), "training_data/per_class"),
    ],
)
def test_malformed_bundle_json_is_one_line(genuine, tmp_path, edit, expected):
    forged = _forge(genuine, tmp_path / "forged", edit)
    with pytest.raises(BundleError, match=expected) as err:
        Bundle.load(forged)
    assert "\n" not in str(err.value)


def test_deep_or_junk_json_and_junk_model_are_one_line(genuine, tmp_path):
    deep = shutil.copytree(genuine, tmp_path / "deep")
    (deep / META_FILE).write_text("[" * 200_000)
    with pytest.raises(BundleError, match="nested too deeply|not JSON"):
        Bundle.load(deep)
    junk = _forge(genuine, tmp_path / "junk", members={"model.ubj": b"junk"})
    with pytest.raises(BundleError, match="model.ubj is not an XGBoost model"):
        Bundle.load(junk)
    empty = _forge(genuine, tmp_path / "empty", members={"model.ubj": b""})  # XGBoost would abort the process
    with pytest.raises(BundleError, match="model.ubj is not an XGBoost model"):
        Bundle.load(empty)


def test_bundle_json_follows_the_published_schema_and_names_no_local_path(genuine):
    import jsonschema

    from histoboost.container import _schema_validator

    meta = json.loads((genuine / META_FILE).read_text())
    jsonschema.validate(meta, _schema_validator().schema)
    assert meta["config"]["features"]["weights"] == [] and "created" not in meta
    assert len(meta["training_data"]["image_ids"]) == meta["training_data"]["images"] == 8


def test_same_training_gives_the_same_identity(trained, tmp_path):
    bundle, _, _ = trained
    a, b = bundle.save(tmp_path / "a.zip"), bundle.save(tmp_path / "b.zip")
    assert a.read_bytes() == b.read_bytes()


# -- 5. CSV outputs are safe in a spreadsheet; 7. per-image outputs named uniquely ---------------------------


def test_formula_names_are_neutralised_and_overlays_never_collide(trained, tmp_path, bach):
    from test_cli import run_cli

    bundle, _, root = trained
    model = bundle.save(tmp_path / "model")
    images = tmp_path / "images"
    (images / "a").mkdir(parents=True)
    (images / "b").mkdir()
    shutil.copy(bach / "Normal" / "n010.jpeg", images / "a" / "x.jpeg")
    shutil.copy(bach / "Invasive" / "iv011.jpeg", images / "b" / "x.jpeg")
    shutil.copy(bach / "Benign" / "b010.jpeg", images / '=HYPERLINK("http:evil.example";"open").jpeg')
    result = run_cli("predict", model, images, "--out", tmp_path / "p.csv", "--overlay", tmp_path / "ov", "--quiet")
    assert result.returncode == 0, result.stderr
    import csv

    rows = list(csv.DictReader((tmp_path / "p.csv").open()))
    assert len(rows) == 3 and len(list((tmp_path / "ov").glob("*.overlay.png"))) == 3
    assert {r["overlay"].removeprefix("'") for r in rows} == {p.name for p in (tmp_path / "ov").iterdir()}
    assert not any(v.startswith(("=", "+", "-", "@")) for r in rows for v in r.values())
    assert any(r["name"].startswith("'=HYPERLINK") for r in rows)


# -- 6. outputs whole or absent, nothing overwritten ---------------------------------------------------------


def test_staged_folder_leaves_nothing_that_looks_complete(tmp_path):
    from histoboost.outputs import OutputError, check_output, staged_folder

    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt), staged_folder(out) as staging:
        (staging / "metrics.json").write_text("{}")
        raise KeyboardInterrupt
    assert not out.exists() and not list(tmp_path.iterdir())
    with staged_folder(out) as staging:
        (staging / "metrics.json").write_text("old")
    with pytest.raises(OutputError, match="exists.*--force"):
        check_output(out)
    with pytest.raises(KeyboardInterrupt):  # forced, but interrupted: the old run stays whole
        with staged_folder(out, force=True) as staging:
            (staging / "metrics.json").write_text("new")
            raise KeyboardInterrupt
    assert (out / "metrics.json").read_text() == "old"
    with staged_folder(out, force=True) as staging:
        (staging / "metrics.json").write_text("new")
    assert (out / "metrics.json").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    with pytest.raises(OutputError, match="no such folder"):
        check_output(tmp_path / "no" / "such" / "preds.csv", folder=False)
    with pytest.raises(OutputError, match="is a folder"):
        check_output(out, force=True, folder=False)


@pytest.mark.parametrize("atomic", [True, False])
def test_forced_replacement_swaps_folders(tmp_path, monkeypatch, atomic):
    import ctypes

    from histoboost.outputs import _exchange

    if not atomic:  # no renameat2 (another OS or C library): two renames
        monkeypatch.setattr(ctypes, "CDLL", lambda *a, **k: (_ for _ in ()).throw(OSError("no libc")))
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "x").write_text("new")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "y").write_text("old")
    _exchange(tmp_path / "new", tmp_path / "run")
    assert (tmp_path / "run" / "x").read_text() == "new" and (tmp_path / "new" / "y").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "run"]


def test_cli_refuses_existing_outputs_before_any_work(trained, small_folder, tmp_path):
    from test_cli import run_cli

    bundle, _, _ = trained
    model = bundle.save(tmp_path / "model")
    (tmp_path / "run").mkdir()
    (tmp_path / "important.csv").write_text("IMPORTANT")
    for args in (
        ("cv", small_folder, "--out", tmp_path / "run"),
        ("evaluate", model, small_folder, "--out", tmp_path / "run"),
        ("predict", model, small_folder, "--out", tmp_path / "important.csv"),
        ("predict", model, small_folder, "--out", tmp_path / "missing" / "p.csv"),
    ):
        result = run_cli(*args, "--quiet")
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert (tmp_path / "important.csv").read_text() == "IMPORTANT" and not list((tmp_path / "run").iterdir())


# -- 8. cache prune touches only stores, never a live writer's file; a read-only store reads -----------------


def test_prune_touches_only_stores_and_dead_temporaries(tmp_path, monkeypatch):
    from histoboost.features import prune_stores

    base = tmp_path / "features"
    precious = base / "my_precious_features"
    precious.mkdir(parents=True)
    (precious / "data.npz").write_bytes(b"mine")
    (base / "README.txt").write_text("notes")
    web = base / "web_project"  # a folder of someone else's that happens to hold an index.json
    web.mkdir()
    (web / "index.json").write_text('{"name": "mine"}')
    key = "lite0-0123456789abcdef"
    store = base / key
    store.mkdir()
    (store / "index.json").write_text(json.dumps({"key": key}))
    host = storage.host()
    live = store / f".img.npz.{host}.{os.getppid()}.0123abcd.tmp"  # the test runner's parent: alive
    other_machine = store / ".img.npz.another-host.1.0123abcd.tmp"
    dead = store / f".img.npz.{host}.999999999.0123abcd.tmp"
    for tmp in (live, other_machine, dead):
        tmp.write_bytes(b"")
    assert prune_stores(tmp_path, keys=["none"]) == []
    assert live.exists() and other_machine.exists() and not dead.exists()
    assert prune_stores(tmp_path, everything=True) == [key]
    assert (precious / "data.npz").read_bytes() == b"mine" and (base / "README.txt").exists()
    assert (web / "index.json").exists()


def test_read_only_store_is_usable_and_unwritable_cache_is_one_line(tmp_path, monkeypatch):
    from histoboost.backbones import create_backbone
    from histoboost.features import FeatureStore, FeatureStoreError

    config = preset("quick").merged(SMALL)
    backbone = create_backbone("efficientnet_lite0")
    store = FeatureStore.open(tmp_path, config, backbone)

    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(os, "utime", read_only)
    assert FeatureStore.open(tmp_path, config, backbone).root == store.root
    (tmp_path / "file").write_text("")
    with pytest.raises(FeatureStoreError, match="cannot create the feature store"):
        FeatureStore.open(tmp_path / "file", config, backbone)


# -- 11. evaluate refuses the bundle's own training images ---------------------------------------------------


def test_evaluate_refuses_training_images(trained):
    from histoboost.errors import EvaluationError
    from histoboost.evaluate import evaluate_predictor

    bundle, manifest, _ = trained
    with pytest.raises(EvaluationError, match="8 of the 8 images were in the bundle's training set"):
        evaluate_predictor(bundle.predictor, manifest)


# -- 12. numeric flags at the boundary, exit status 2, late checks moved early --------------------------------


@pytest.mark.parametrize(
    "flags",
    [
        ["--threads", "-1"],
        ["--batch-size", "0"],
        ["--early-stopping", "-5"],
        ["--folds", "1"],
        ["--scale", "nan"],
        ["--refer-below", "1.5"],
        ["--label-map", "Normal=5"],
        ["--seed", "x"],
    ],
)
def test_bad_flags_exit_2_in_one_line(flags, small_folder, tmp_path):
    from test_cli import run_cli

    result = run_cli("cv", small_folder, "--out", tmp_path / "run", "--quiet", *flags)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr


def test_train_checks_split_by_before_extracting(small_folder, tmp_path):
    from test_cli import run_cli

    result = run_cli(
        "train",
        small_folder,
        "--preset",
        "quick",
        "--split-by",
        "nosuchcolumn",
        "--out",
        tmp_path / "m.zip",
        "--cache-dir",
        tmp_path / "cache",
        "--quiet",
    )
    assert result.returncode == 2 and "--split-by nosuchcolumn" in result.stderr
    assert not (tmp_path / "cache").exists()  # nothing was extracted


# -- 13. content key: a metadata-only change does not change the answer -------------------------------------


def test_metadata_only_change_gives_the_same_prediction(trained, tmp_path, bach):
    bundle, _, _ = trained
    original = tmp_path / "n010.jpeg"
    shutil.copy(bach / "Normal" / "n010.jpeg", original)
    data = original.read_bytes()
    tagged = tmp_path / "tagged.jpeg"
    tagged.write_bytes(data[:2] + b"\xff\xfe\x00\x0ehello world!" + data[2:])  # a JPEG COM segment
    assert np.array_equal(np.asarray(Image.open(original)), np.asarray(Image.open(tagged)))
    (a, b), problems = bundle.predict([original, tagged])
    assert problems == []
    assert {k: v for k, v in a.items() if k not in ("path", "name")} == {
        k: v for k, v in b.items() if k not in ("path", "name")
    }


# -- 15. damaged store and run files; 16. no traceback anywhere ----------------------------------------------


def test_same_pixels_at_another_stated_resolution_are_stored_apart(trained, tmp_path):
    import dataclasses

    from histoboost.config import PreprocessConfig
    from histoboost.features import FeatureStore

    record = trained[1].records[0]
    fine, coarse = dataclasses.replace(record, mpp=0.25), dataclasses.replace(record, mpp=0.5)
    by_scale = FeatureStore(tmp_path, {}, PreprocessConfig())
    assert by_scale.entry(fine) == by_scale.entry(coarse) == record.image_id  # the scale factor applies to both
    by_mpp = FeatureStore(tmp_path, {}, PreprocessConfig(target_mpp=0.5))
    assert by_mpp.entry(fine) == f"{record.image_id}-at-0.5" and by_mpp.entry(coarse) == f"{record.image_id}-at-1"


def test_damaged_store_files_count_as_missing(tmp_path):
    from histoboost.features import FeatureStore, ImageFeatures

    store = FeatureStore(tmp_path, {})
    features = ImageFeatures(np.ones((2, 4), np.float32), np.zeros((2, 4), np.float32))
    for i, damage in enumerate(("truncate", "flip")):
        store.save(f"id{i}", features)
        path = store.path(f"id{i}")
        raw = bytearray(path.read_bytes())
        if damage == "truncate":
            raw = raw[: len(raw) // 2]
        else:
            raw[raw.find(features.pooled.tobytes()) + 5] ^= 0x01  # one bit of one stored number
        path.write_bytes(bytes(raw))
        assert store.load(f"id{i}") is None and not store.has(f"id{i}")


def test_full_disk_keeps_what_was_stored_and_leaves_no_temporary(tmp_path, monkeypatch):
    from histoboost.features import FeatureStore, FeatureStoreError, ImageFeatures

    store = FeatureStore(tmp_path, {})
    features = ImageFeatures(np.ones((2, 4), np.float32), np.zeros((2, 4), np.float32))
    store.save("kept", features)

    def full(fd):  # the temporary holds part of the file when the disk fills up
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(FeatureStoreError, match="No space left on device.*rerun to resume"):
        store.save("new", features)
    assert store.has("kept") and sorted(p.name for p in tmp_path.iterdir()) == ["kept.npz"]


def test_damaged_run_files_and_index_are_one_line(tmp_path, small_folder):
    from test_cli import run_cli

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{not json")
    np.savez(run / "cv_results.npz", a=np.zeros(3))
    result = run_cli("report", run)
    assert result.returncode == 2 and "config.json: damaged" in result.stderr and "Traceback" not in result.stderr
    (run / "config.json").write_text(preset("quick").to_json())
    (run / "cv_results.npz").write_bytes((run / "cv_results.npz").read_bytes()[:100])
    result = run_cli("report", run)
    assert result.returncode == 2 and "cv_results.npz: damaged" in result.stderr and "Traceback" not in result.stderr
    store = tmp_path / "cache" / "features" / "lite0-0123456789abcdef"
    store.mkdir(parents=True)
    (store / "index.json").write_text("{broken")
    (tmp_path / "cache" / "features" / "README.txt").write_text("notes")
    listing = run_cli("cache", "list", "--cache-dir", tmp_path / "cache")
    assert listing.returncode == 0 and "damaged index" in listing.stdout and "README" not in listing.stdout


def test_a_full_disk_names_the_file_the_user_asked_for(tmp_path, monkeypatch):
    from histoboost.storage import write_text_atomic

    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError) as err:
        write_text_atomic(tmp_path / "preds.csv", "x")
    assert err.value.filename == str(tmp_path / "preds.csv") and not list(tmp_path.iterdir())


def test_grayscale_images_are_predicted_but_referred(trained, tmp_path, bach):
    _, manifest, root = trained  # without stain normalisation, which would refuse a grayscale image itself
    bundle = train_bundle(
        manifest,
        preset("quick").merged({**SMALL, "preprocess.stain.method": "none"}),
        Runtime(cache_dir=root / "cache"),
    )
    gray = tmp_path / "gray.png"
    Image.open(bach / "Invasive" / "iv011.jpeg").convert("L").save(gray)
    (record,), problems = bundle.predict([gray])
    assert problems == [] and "grayscale, no H&E colour" in record["refer"]


def test_system_errors_are_one_line_unless_debug(monkeypatch, capsys, tmp_path):
    from histoboost import cli
    from histoboost.cli import dataset

    def broken(args):
        raise OSError(28, "No space left on device", str(tmp_path / "x"))

    monkeypatch.setattr(dataset, "_cache", broken)
    assert cli.main(["cache", "list"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No space left on device" in err and str(tmp_path / "x") in err
    with pytest.raises(OSError):
        cli.main(["cache", "list", "--debug"])


# -- found by a review after the first version of this file ---------------------------------------------------


def test_encrypted_or_bzip2_members_and_strict_json(genuine, tmp_path):
    for method, name in ((zipfile.ZIP_DEFLATED, "encrypted"), (zipfile.ZIP_BZIP2, "bzip2")):
        odd = tmp_path / f"{name}.zip"
        with zipfile.ZipFile(odd, "w") as archive:
            for member in sorted(genuine.iterdir()):
                archive.writestr(member.name, member.read_bytes(), compress_type=method)
        if name == "encrypted":  # set the "encrypted" bit in every central directory entry
            raw = bytearray(odd.read_bytes())
            at = raw.find(b"PK\x01\x02")
            while at != -1:
                raw[at + 8] |= 0x1
                at = raw.find(b"PK\x01\x02", at + 4)
            odd.write_bytes(bytes(raw))
        with pytest.raises(BundleError, match="encrypted or compressed other than by deflate"):
            Bundle.load(odd)
    nan = _forge(genuine, tmp_path / "nan", lambda m: m["decision_rule"].update(temperature=float("nan")))
    with pytest.raises(BundleError, match="not strict JSON"):
        Bundle.load(nan)
    digits = shutil.copytree(genuine, tmp_path / "digits")
    (digits / META_FILE).write_text('{"format_version": ' + "1" * 5000 + "}")
    with pytest.raises(BundleError, match="not strict JSON"):
        Bundle.load(digits)


def test_classifier_must_fit_its_backbones_and_backbones_must_be_known(genuine, tmp_path):
    from histoboost.classifier import BoostedTrees
    from histoboost.config import ClassifierConfig

    rng = np.random.default_rng(0)
    narrow = BoostedTrees(ClassifierConfig(n_estimators=3)).fit(rng.random((30, 10)), np.arange(30) % 3).to_bytes()
    swapped = _forge(
        genuine, tmp_path / "swapped", lambda m: m["classifier"].update(best_iteration=0), members={"model.ubj": narrow}
    )
    with pytest.raises(BundleError, match="takes 10 features but its backbones give 1280"):
        Bundle.load(swapped)
    foreign = _forge(genuine, tmp_path / "foreign", lambda m: m["backbones"][0].update(name="convnext_tiny"))
    with pytest.raises(BundleError, match="neither carried in the bundle nor a registered backbone"):
        Bundle.load(foreign)


def test_a_signature_that_is_not_a_file_is_one_line(genuine, tmp_path):
    from histoboost.container import signature_path
    from histoboost.signing import generate_key

    _, public = generate_key(tmp_path / "key.pem")
    bundle = shutil.copytree(genuine, tmp_path / "b")
    os.mkfifo(signature_path(bundle))  # would block a plain read forever
    with pytest.raises(BundleError, match="not a 64-byte Ed25519 signature file"):
        Bundle.load(bundle, trusted_key=public)


def test_weights_cannot_ask_for_a_huge_head(tmp_path):
    import torch
    from safetensors.torch import save_file

    from histoboost.backbones import BackboneError, create_backbone, read_weights

    state = {k: v.contiguous() for k, v in create_backbone("efficientnet_lite0").model.state_dict().items()}
    state["classifier.weight"] = torch.zeros(10**8, 0)  # 0 bytes on disk, 10**8 classes
    save_file(state, tmp_path / "w.safetensors")
    with pytest.raises(BackboneError, match="fits no head"):
        create_backbone("efficientnet_lite0", read_weights(tmp_path / "w.safetensors"))


def test_force_replaces_only_run_folders_and_finished_work_is_never_deleted(tmp_path, monkeypatch):
    from histoboost.outputs import OutputError, check_output, staged_folder

    documents = tmp_path / "Documents"
    documents.mkdir()
    (documents / "thesis.txt").write_text("years of work")
    with pytest.raises(OutputError, match="no histoboost run folder"):
        check_output(documents, force=True)
    (tmp_path / "empty").mkdir()
    monkeypatch.chdir(tmp_path / "empty")
    assert check_output(Path("."), force=True) == tmp_path / "empty"  # '.' as --out works, no traceback
    out = tmp_path / "run"
    with pytest.raises(OutputError, match="the finished results are in"), staged_folder(out) as staging:
        (staging / "metrics.json").write_text("finished")
        out.mkdir()  # another run took the name meanwhile
        (out / "other.txt").write_text("theirs")
    kept = [p for p in tmp_path.iterdir() if p.name.startswith(".run.staging-")]
    assert len(kept) == 1 and (kept[0] / "metrics.json").read_text() == "finished"
    assert (out / "other.txt").read_text() == "theirs"


def test_temporaries_of_entries_with_dots_are_cleared(tmp_path):
    dead = tmp_path / f".abc-at-0.5.npz.{storage.host()}.999999999.0123abcd.tmp"
    dead.write_bytes(b"")
    storage.clear_abandoned(tmp_path)
    assert not dead.exists()
