import hashlib

import numpy as np
import pytest

from histoboost.data import load_manifest
from histoboost.demo import CLASSES, IMAGES_PER_PATIENT, PATIENTS_PER_CLASS, render, synthetic_tissue


def test_synthetic_tissue_is_deterministic_and_stains_like_he():
    a = render(synthetic_tissue(2, np.random.default_rng(5)), (1.0, 1.0, 0.0), np.random.default_rng(6))
    b = render(synthetic_tissue(2, np.random.default_rng(5)), (1.0, 1.0, 0.0), np.random.default_rng(6))
    assert np.array_equal(a, b) and a.shape == (1024, 1024, 3)
    mean = a.reshape(-1, 3).mean(axis=0)
    assert mean[1] < mean[0] and mean[1] < mean[2]  # pink-purple: green absorbed most


def _digests(folder):
    return {p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*.jpeg")}


@pytest.mark.heavy
def test_demo_data_set_is_reproducible_and_runs_offline(tmp_path, demo_data, demo_cache):
    from test_cli import run_cli

    result = run_cli("demo", "--out", tmp_path / "demo", "--cache-dir", demo_cache, "--quiet")
    assert result.returncode == 0, result.stderr
    assert "synthetic" in result.stdout and "split by patient" in result.stdout and "report:" in result.stdout
    assert (tmp_path / "demo" / "cv" / "report.html").is_file()
    manifest, problems = load_manifest(tmp_path / "demo" / "data")
    assert problems == [] and len(manifest) == len(CLASSES) * PATIENTS_PER_CLASS * IMAGES_PER_PATIENT
    assert manifest.summary()["patients"] == len(CLASSES) * PATIENTS_PER_CLASS
    assert _digests(tmp_path / "demo" / "data") == _digests(demo_data)  # the session's own make_demo_data run
