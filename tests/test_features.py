import json

import numpy as np
import pytest
import torch

from histoboost.augment import plan_augmentations
from histoboost.backbones import create_backbone
from histoboost.config import preset
from histoboost.data import Manifest, load_manifest, read_record
from histoboost.features import (
    FeatureStore,
    FeatureStoreError,
    describe_image,
    extract_features,
    list_stores,
    load_matrix,
    pool_crops,
    prune_stores,
)
from histoboost.runtime import Runtime
from histoboost.stain import Normalizer

# Small geometry for speed: BACH at scale 0.25 is 384x384; crops of 192 px.
SMALL = {"preprocess.scale": 0.25, "augment.n_augment": 3, "augment.n_crops": 4, "augment.crop_size": 192}


@pytest.fixture(scope="session")
def backbone():
    return create_backbone("efficientnet_lite0")


@pytest.fixture(scope="session")
def config():
    return preset("quick").merged(SMALL)


@pytest.fixture(scope="session")
def bach_subset(bach) -> Manifest:
    manifest, _ = load_manifest(bach)
    picks = [r for r in manifest if r.name in {"Benign/b001", "InSitu/is001", "Invasive/iv011", "Normal/n010"}]
    return Manifest(tuple(picks), manifest.root, manifest.layout)


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def _describe(record, config, backbone, **kwargs):
    rgb = Normalizer(config.preprocess.stain)(read_record(record, config.preprocess))
    plans = plan_augmentations(record.image_id, *rgb.shape[:2], config.augment, config.seed)
    return describe_image(rgb, plans, backbone, config, **kwargs)


def test_roi_pool_is_the_mean_of_the_cells_in_a_grid_aligned_box():
    from histoboost.features import roi_pool

    fmap = torch.rand(1, 5, 10, 10)
    box = np.array([[64, 96, 192, 224]])  # x cells 2..5, y cells 3..6 at stride 32
    expected = fmap[0, :, 3:7, 2:6].mean(dim=(1, 2))
    assert torch.allclose(roi_pool(fmap, [box], 32)[0, 0], expected, atol=1e-6)


def test_crop_pooling():
    crops = torch.tensor([[[1.0, 4.0], [3.0, 2.0]]])
    assert pool_crops(crops, "mean").tolist() == [[2.0, 3.0]]
    assert pool_crops(crops, "max").tolist() == [[3.0, 4.0]]
    gem = pool_crops(crops, "gem", p=3.0)
    assert torch.allclose(gem, ((crops**3).mean(1)) ** (1 / 3))


def test_exact_and_shared_agree_and_are_reported(bach_subset, backbone, config, record_property):
    crop_cos, pooled_cos = [], []
    for record in bach_subset:
        shared = _describe(record, config, backbone, keep_crops=True)
        exact = _describe(record, config.merged({"features.mode": "exact"}), backbone, keep_crops=True)
        assert shared.pooled.shape == exact.pooled.shape == (3, 1280)
        assert np.array_equal(shared.boxes, exact.boxes)
        crop_cos.append(_cos(shared.crops, exact.crops).mean())
        pooled_cos.append(_cos(shared.pooled, exact.pooled).mean())
        # The whole feature map pooled is the same in both modes.
        assert np.allclose(shared.whole, exact.whole, atol=1e-4)
    record_property("crop_cosine", float(np.mean(crop_cos)))
    record_property("pooled_cosine", float(np.mean(pooled_cos)))
    print(f"exact vs shared: crop cosine {np.mean(crop_cos):.3f}, pooled cosine {np.mean(pooled_cos):.3f}")
    # Not the same features (the CNN sees padding at crop borders in exact mode), but close.
    assert 0.6 < np.mean(crop_cos) < 0.999 and 0.7 < np.mean(pooled_cos) < 0.999


def test_describe_is_deterministic_and_batch_independent(bach_subset, backbone, config):
    record = bach_subset.records[0]
    a = _describe(record, config, backbone, batch_size=3)
    b = _describe(record, config, backbone, batch_size=3)
    assert np.array_equal(a.pooled, b.pooled) and np.array_equal(a.whole, b.whole)
    c = _describe(record, config, backbone, batch_size=1)
    assert np.allclose(a.pooled, c.pooled, rtol=1e-4, atol=1e-5)


def test_store_reuses_adds_and_survives_renames(bach_subset, backbone, config, tmp_path):
    first = Manifest(bach_subset.records[:3], bach_subset.root, "csv")
    result = extract_features(first, config, backbone, Runtime(cache_dir=tmp_path))
    assert (result.computed, result.reused) == (3, 0)
    again = extract_features(first, config, backbone, Runtime(cache_dir=tmp_path))
    assert (again.computed, again.reused) == (0, 3)
    more = extract_features(bach_subset, config, backbone, Runtime(cache_dir=tmp_path))
    assert (more.computed, more.reused) == (1, 3)
    assert not list(result.store.root.glob(".*"))  # no temporary files left
    X, owners = load_matrix(bach_subset, more.store, "crops+whole")
    assert X.shape == (4 * 3, 2 * 1280) and owners.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    index = json.loads((result.store.root / "index.json").read_text())
    assert index["backbone"]["weights_sha256"] == backbone.weights_sha256
    assert index["settings"]["augment"]["n_crops"] == 4 and "torch" in index["versions"]


def test_changed_settings_never_reuse_features(bach_subset, backbone, config, tmp_path):
    store = FeatureStore.open(tmp_path, config, backbone)
    for change in ({"augment.n_crops": 2}, {"preprocess.stain.method": "none"}, {"features.mode": "exact"}):
        assert FeatureStore.open(tmp_path, config.merged(change), backbone).root != store.root
    # Classifier settings and the descriptor choice share the store.
    same = config.merged({"classifier.n_estimators": 10, "features.descriptor": "whole"})
    assert FeatureStore.open(tmp_path, same, backbone).root == store.root


def test_stale_store_is_refused(backbone, config, tmp_path):
    store = FeatureStore.open(tmp_path, config, backbone)
    index = store.root / "index.json"
    meta = json.loads(index.read_text())
    meta["settings"]["augment"]["n_crops"] = 99
    index.write_text(json.dumps(meta))
    with pytest.raises(FeatureStoreError, match="other settings"):
        FeatureStore.open(tmp_path, config, backbone)


def test_unreadable_store_file_is_recomputed(bach_subset, backbone, config, tmp_path):
    one = Manifest(bach_subset.records[:1], bach_subset.root, "csv")
    result = extract_features(one, config, backbone, Runtime(cache_dir=tmp_path))
    good = result.store.load(one.records[0].image_id)
    result.store.path(one.records[0].image_id).write_bytes(b"garbage")
    assert result.store.load(one.records[0].image_id) is None
    with pytest.raises(FeatureStoreError, match="run histoboost extract"):
        load_matrix(one, result.store, "crops")
    redone = extract_features(one, config, backbone, Runtime(cache_dir=tmp_path))
    assert redone.computed == 1
    assert np.array_equal(redone.store.load(one.records[0].image_id).pooled, good.pooled)


def test_keep_crops_upgrades_stored_files(bach_subset, backbone, config, tmp_path):
    one = Manifest(bach_subset.records[:1], bach_subset.root, "csv")
    extract_features(one, config, backbone, Runtime(cache_dir=tmp_path))
    upgraded = extract_features(one, config, backbone, Runtime(cache_dir=tmp_path), keep_crops=True)
    assert upgraded.computed == 1
    stored = upgraded.store.load(one.records[0].image_id)
    assert stored.crops.shape == (3, 4, 1280) and stored.crops.dtype == np.float16
    assert stored.boxes.shape == (3, 4, 4)


def test_list_and_prune(backbone, config, tmp_path):
    FeatureStore.open(tmp_path, config, backbone)
    other = FeatureStore.open(tmp_path, config.merged({"augment.n_crops": 2}), backbone)
    (other.root / ".leftover.123.tmp.npz").write_bytes(b"")
    assert {s["key"] for s in list_stores(tmp_path)} == {p.name for p in (tmp_path / "features").iterdir()}
    assert prune_stores(tmp_path, keys=[other.key]) == [other.key]
    assert len(list_stores(tmp_path)) == 1
    assert prune_stores(tmp_path, older_than_days=1) == []
    assert len(prune_stores(tmp_path, everything=True)) == 1


@pytest.mark.parametrize("mode", ["shared", "exact"])
def test_more_stages_add_the_earlier_stage_to_the_final_descriptor(bach_subset, backbone, config, mode):
    record = bach_subset.records[0]
    one = config.merged({"features.mode": mode, "augment.n_augment": 2})
    two = one.merged({"features.stages": 2})
    rgb = Normalizer(one.preprocess.stain)(read_record(record, one.preprocess))
    plans = plan_augmentations(record.image_id, *rgb.shape[:2], one.augment, one.seed)
    final = describe_image(rgb, plans, backbone, one)
    both = describe_image(rgb, plans, backbone, two)
    assert both.pooled.shape == (2, 1280 + 112) and both.whole.shape == (2, 1280 + 112)  # + blocks.4 (stride 16)
    assert np.allclose(both.pooled[:, :1280], final.pooled, atol=1e-4)
    assert one.stage_hash("features") != two.stage_hash("features")
