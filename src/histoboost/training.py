"""Training a bundle: the classifier and its decision rule fitted on every image of a manifest (after fine-tuning
the backbones when the config asks), with what a bundle records of its training data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .bundle import Bundle
from .config import Config
from .container import FORMAT_VERSION, MODEL_FILES
from .data import GROUP_NAMES, Manifest, class_scheme
from .errors import BundleError, HistoboostError
from .runtime import Runtime
from .version import __version__


def train_bundle(
    manifest: Manifest, config: Config, runtime: Runtime | None = None, image_mpp: float | None = None
) -> Bundle:
    """Train the classifier on every image of the manifest (features from the runtime's store, extracted where
    missing, on its engine's workers when it has one) and return the bundle, ready to save. `image_mpp` states the
    µm/px of images whose file and manifest state none (BACH's JPEGs: 0.42): recorded for whole slides, it
    changes no feature."""
    from .classifier import fit_decision_rule, make_classifier
    from .evaluate import check_split, split_units
    from .features import describe_dataset, library_versions

    check_split(manifest, config)
    runtime = runtime or Runtime()
    device = runtime.device
    unseen = None  # with fine-tuning: the images it did not train on, where the decision rule is chosen
    if config.finetune.enabled:
        config, unseen = _finetuned_config(manifest, config, runtime)
    described = describe_dataset(manifest, config, runtime)
    backbones, owners = [d.backbone for d in described], described[0].owners
    scheme = class_scheme(config.classifier.classes)
    try:
        targets = scheme.targets(manifest)
    except HistoboostError as err:
        raise BundleError(str(err)) from None
    groups = manifest.groups
    # Early stopping and the decision rule's inner folds group images as cross-validation does.
    _, units = split_units(manifest, config.evaluate.split_by)
    X = np.concatenate([d.X for d in described], axis=1)
    classifier = make_classifier(config.classifier, seed=config.seed, device=device)
    classifier.fit(X, targets[owners], groups=units[owners])
    try:
        rule = fit_decision_rule(
            X,
            targets[owners],
            owners,
            units[owners],
            config.classifier,
            config.seed,
            device,
            None if unseen is None else unseen[owners],
        )
    except ValueError as err:
        raise BundleError(f"{manifest.root}: {err}") from None
    config = config.merged({"features.weights": []})  # a bundle names no local path: it carries the weights
    meta = {
        "format_version": FORMAT_VERSION,
        "histoboost": __version__,
        "config": config.to_dict(),
        "backbones": [{**b.identity, "weights_source": without_folders(b.weights_source)} for b in backbones],
        "classes": list(scheme.classes),
        "classifier": {
            "type": config.classifier.kind,
            "file": MODEL_FILES[config.classifier.kind],
            "best_iteration": classifier.best_iteration,
        },
        "decision_rule": rule.to_dict(),
        "training_data": {
            "images": len(manifest),
            "per_group": {GROUP_NAMES[g]: int((groups == g).sum()) for g in range(3)},
            "per_class": {c: int((targets == k).sum()) for k, c in enumerate(scheme.classes)},
            "image_ids": sorted(r.image_id for r in manifest),
            "source": manifest.root.name,
            **training_geometry(manifest, config, image_mpp),
        },
        "versions": library_versions(),
    }
    return Bundle(config, classifier, backbones, meta, runtime=runtime)


def training_geometry(manifest: Manifest, config: Config, image_mpp: float | None = None) -> dict[str, Any]:
    """What a whole slide needs to be tiled like the training images: their median shorter side in pixels,
    their µm/px (the file's, else the manifest's `mpp` column, else `image_mpp`) and the µm/px the classifier
    saw after the working scale (medians; None where any image's is unknown)."""
    from .data import plausible_mpp, working_scale

    physical: list[float] = []
    working: list[float] = []
    for record in manifest:
        mpp = record.mpp or plausible_mpp(record.extra.get("mpp")) or image_mpp
        if mpp is None:
            physical = working = []
            break
        physical.append(mpp)
        working.append(mpp / working_scale(record.mpp, config.preprocess))
    return {
        "field_px": int(np.median([min(r.width, r.height) for r in manifest])),
        "mpp": float(np.median(physical)) if physical else None,
        "working_mpp": float(np.median(working)) if working else None,
    }


def _finetuned_config(manifest: Manifest, config: Config, runtime: Runtime) -> tuple[Config, np.ndarray]:
    """The config with each backbone's weights fine-tuned on these images (cached by key), and which
    images the fine-tuning did not train on (its validation part)."""
    from .evaluate import split_units
    from .features import default_cache_dir
    from .finetune import finetune_cached, prepare_training_images
    from .storage import local_folder

    cache_dir = local_folder(runtime.cache_dir or default_cache_dir(), "fine-tuned weights")  # before any work
    device, progress = runtime.device, runtime.progress
    _, units = split_units(manifest, config.evaluate.split_by)
    images = prepare_training_images(manifest, config, units, progress=progress)
    weights, trained_on = [], set()
    for name in config.features.backbones:
        result = finetune_cached(images, config, name, cache_dir, config.weights_for(name), device, progress)
        weights.append(f"{name}={result.weights}")
        trained_on |= set(result.card["data"]["train_images"])
    unseen = ~np.isin([r.image_id for r in manifest], list(trained_on))
    return config.merged({"features.weights": weights}), unseen


def without_folders(source: str) -> str:
    """A weights source as a bundle records it: `file:NAME` without the folders of the training machine."""
    kind, sep, where = source.partition(":")
    return f"{kind}:{Path(where).name}" if kind in ("file", "bundle") and sep else source
