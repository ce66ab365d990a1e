"""The Python API: the few calls a notebook needs, each the command line's work without its printing
(docs/python.md). Data may be given as a folder or CSV (loaded and checked here) or as a loaded `Manifest`; where
and how work runs is one `Runtime`; errors are `errors.HistoboostError`s whose message is the command line's one
line."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from .config import Config, preset
from .data import Manifest, parse_label_map
from .data import load_manifest as _load_manifest
from .progress import Progress
from .runtime import Runtime

if TYPE_CHECKING:  # heavy (torch, xgboost): imported when called
    from .bundle import Bundle
    from .evaluate import CVRun

DataSource = str | Path | Manifest


def load_manifest(
    source: str | Path, config: Config | None = None, label_map: str | None = None, progress: Progress = False
) -> Manifest:
    """Discover, decode and check every image under a folder or CSV manifest (`histoboost inspect`'s checks): the
    usable images, with warnings (converted, skipped) in `manifest.problems`. Unusable data raises `DataError`,
    whose `problems` lists each file. `config` (default: the quick preset) sets the working scale and crop size
    every image must hold; `label_map` maps extra labels to groups ("Tumour=2,Stroma=0")."""
    config = config or preset("quick")
    manifest, problems = _load_manifest(
        source,
        config.preprocess,
        config.augment.crop_size,
        parse_label_map(label_map) if label_map else None,
        progress=progress,
    )
    return replace(manifest, problems=tuple(problems))


def cross_validate(
    data: DataSource, config: Config | None = None, runtime: Runtime | None = None, compare_split: str | None = None
) -> CVRun:
    """`histoboost cv`: the config's protocol on the data, grouped folds, every backbone and combination; the run's
    `metrics()` are typed, its `results[i].metrics` complete. `compare_split` "auto" adds the report's split
    comparison."""
    from .evaluate import cross_validate as _cross_validate

    config = config or preset("quick")
    return _cross_validate(_manifest(data, config), config, runtime, compare_split)


def train(
    data: DataSource, config: Config | None = None, runtime: Runtime | None = None, image_mpp: float | None = None
) -> Bundle:
    """`histoboost train`: a bundle trained on every image, ready to `save` or to predict with. `image_mpp` states
    the µm/px of images whose files state none (BACH's JPEGs: 0.42), for whole slides."""
    from .training import train_bundle

    config = config or preset("quick")
    return train_bundle(_manifest(data, config), config, runtime, image_mpp)


def load_model(
    path: str | Path,
    runtime: Runtime | None = None,
    expect_sha256: str | None = None,
    trusted_key: str | Path | None = None,
    weights: dict[str, str | Path] | None = None,
) -> Bundle:
    """A saved bundle, verified (`expect_sha256` or a `trusted_key` refuse an altered one), its backbones on the
    runtime's device; `weights` gives your own file of a foundation model the bundle does not carry."""
    from .bundle import Bundle

    return Bundle.load(path, runtime, expect_sha256, trusted_key, weights)


def _manifest(data: DataSource, config: Config) -> Manifest:
    return data if isinstance(data, Manifest) else load_manifest(data, config)
