"""Shared fixtures: the real BACH images in ../shared/data (read in place, never copied into the repo)."""

from __future__ import annotations

import os

# `make test` runs two pytest-xdist workers on a 2-core machine: each keeps to one core (torch, OpenMP, OpenBLAS read
# these when imported), since two processes that each spin two threads on two cores run several times slower.
if os.environ.get("PYTEST_XDIST_WORKER"):
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(name, "1")

import shutil  # after the thread settings: numpy and torch read them when they load
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mosaic import write_mosaic

BACH = Path(__file__).resolve().parents[2] / "shared" / "data" / "bach_iciar2018"
CMU = Path(__file__).resolve().parents[2] / "shared" / "data" / "wsi" / "CMU-1-Small-Region.svs"  # a real SVS


@pytest.fixture(scope="session", autouse=True)
def feature_cache(tmp_path_factory):
    """The default feature store ($HISTOBOOST_CACHE) in a temporary folder: a test that names no --cache-dir never
    writes into the user's ~/.cache/histoboost."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HISTOBOOST_CACHE", str(tmp_path_factory.mktemp("default-cache")))
        yield


@pytest.fixture(scope="session")
def bach() -> Path:
    if not (BACH / "manifest.csv").is_file():
        pytest.fail(f"the shared BACH images are missing: expected {BACH} (see the README, 'Tests')")
    return BACH


@pytest.fixture(scope="session")
def bach_image(bach: Path):
    """Load a BACH image by name at a given scale."""
    from histoboost.data import read_image

    def load(name: str = "Benign/b001", scale: float = 0.25) -> np.ndarray:
        return read_image(bach / f"{name}.jpeg", scale)

    return load


EIGHT = {
    "Normal": ["n001", "n003"],
    "Benign": ["b001", "b002"],
    "InSitu": ["is001", "is003"],
    "Invasive": ["iv001", "iv003"],
}


def copy_eight(bach: Path, root: Path) -> Path:
    """A class-folder data set of 2 real BACH images per class, copied into `root`."""
    for label, names in EIGHT.items():
        (root / label).mkdir(parents=True)
        for name in names:
            shutil.copy(bach / label / f"{name}.jpeg", root / label / f"{name}.jpeg")
    return root


# A small, fast protocol for tests that train a bundle.
SMALL = {
    "preprocess.scale": 0.25,
    "augment.n_augment": 3,
    "augment.n_crops": 3,
    "augment.crop_size": 192,
    "classifier.n_estimators": 20,
}


@pytest.fixture(scope="session")
def trained(tmp_path_factory, bach):
    """A bundle trained once per test session on eight real BACH images: (bundle, manifest, folder)."""
    from histoboost.config import preset
    from histoboost.data import load_manifest
    from histoboost.runtime import Runtime
    from histoboost.training import train_bundle

    root = tmp_path_factory.mktemp("bundle")
    manifest, _ = load_manifest(copy_eight(bach, root / "data"))
    # BACH's JPEGs state no µm/px: 0.42 (recorded for whole slides; it changes no feature)
    bundle = train_bundle(manifest, preset("quick").merged(SMALL), Runtime(cache_dir=root / "cache"), image_mpp=0.42)
    return bundle, manifest, root


@pytest.fixture
def small_folder(tmp_path: Path, bach: Path) -> Path:
    """A class-folder data set of 2 real images per class (copied into a temporary folder)."""
    return copy_eight(bach, tmp_path / "data")


def tissue_like(size: tuple[int, int] = (400, 300), seed: int = 0) -> Image.Image:
    """Random colours at 1/20 scale, enlarged: smooth like tissue, so the tissue check accepts it
    (per-pixel noise is refused as "not tissue")."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (max(2, size[1] // 20), max(2, size[0] // 20), 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize(size, Image.Resampling.BICUBIC)


def write_png(path: Path, size: tuple[int, int] = (400, 300), mode: str = "RGB", seed: int = 0) -> Path:
    """A small image that passes the tissue check, for layout tests that need no real tissue."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tissue_like(size, seed).convert(mode).save(path)
    return path


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    """The synthetic demo set (48 images of 24 patients), generated once per test session."""
    from histoboost.demo import make_demo_data

    root = tmp_path_factory.mktemp("demo") / "data"
    make_demo_data(root)
    return root


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory) -> Path:
    """A feature cache for the demo set at the quick preset: test_demo's run fills it and test_docs starts from a
    copy (the same images and settings: nothing extracted twice)."""
    return tmp_path_factory.mktemp("demo-cache")


# Images of known class that the session bundle (conftest.trained) was not trained on.
MOSAIC = [
    ["Normal/n005", "Benign/b004", "InSitu/is005", "Invasive/iv005"],
    ["Normal/n008", "Benign/b005", "InSitu/is007", "Invasive/iv007"],
    ["Normal/n010", "Benign/b007", "InSitu/is009", "Invasive/iv009"],
    ["Normal/n012", "Benign/b008", "InSitu/is011", "Invasive/iv011"],
]


@pytest.fixture(scope="session")
def model(trained):
    bundle, _, root = trained
    path = root / "model"
    if not path.exists():
        bundle.save(path)
    return bundle, path


@pytest.fixture(scope="session")
def mosaic(tmp_path_factory, bach):
    folder = tmp_path_factory.mktemp("mosaic")
    blocks = write_mosaic(folder / "mosaic.tiff", [[bach / f"{name}.jpeg" for name in row] for row in MOSAIC])
    return folder / "mosaic.tiff", blocks


# The files whose tests take minutes, longest first: under `make test`'s two workers (each takes whole files, in
# collection order) they start at once instead of leaving one worker alone with them at the end.
LONG_FILES = ("test_demo.py", "test_cli.py", "test_slides.py", "test_engine.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return LONG_FILES.index(name) if name in LONG_FILES else len(LONG_FILES)

    items.sort(key=rank)  # stable: the order within a file, and of the other files, stays
