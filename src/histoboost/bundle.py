"""A trained model as a portable bundle, and prediction on new images.

A bundle is a folder (optionally zipped): the classifier (XGBoost's native `model.ubj`, or the
logistic model's arrays as `model.json`), every backbone weights file that was given locally or made
by fine-tuning (`weights-<backbone>.safetensors`, so the bundle works on another machine), and `bundle.json` with the format version, the full config
(stain reference, protocol, seed), the decision rule chosen on the training data (threshold,
temperature, refer setting), the backbones' weights identity (sha256), the class names, library
versions, a fingerprint of the training data and the sha256 of every other file. No pickle anywhere. Loading verifies all of it and refuses, with one line, a bundle
that was altered, that needs weights not available here, or that is newer than this histoboost.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .backbones import file_sha256
from .config import Config, HistoboostError
from .data import GROUP_NAMES, IMAGE_SUFFIXES, Manifest, Problem, write_text_atomic
from .classifier import DecisionRule, vote_counts

FORMAT_VERSION = 3  # 2: logistic classifier, decision rule; 3: local and fine-tuned weights carried
MODEL_FILES = {"xgboost": "model.ubj", "logistic": "model.json"}
META_FILE = "bundle.json"


class BundleError(HistoboostError):
    """A bundle cannot be written or used; the message says why."""


@dataclass
class Prediction:
    """One image's result: the same columns as cross-validation's predictions.csv, plus provenance."""

    path: str
    name: str
    image_id: str
    probs: np.ndarray  # (3,) mean probability over augmentations (calibrated where the bundle calibrates)
    votes: np.ndarray  # (3,)
    decision: int  # by the bundle's decision rule: majority vote, or its carcinoma threshold
    aug_probs: np.ndarray  # (A, 3) as the classifier gave them (before calibration)
    agreement: float = 1.0  # share of augmentations that agree with the decision
    refer: str = ""  # why a pathologist should look: "votes split", "stain QC failed", or ""
    stain_qc: str = ""  # the quality check's flags, and the fallback used

    def record(self, bundle_sha256: str) -> dict[str, Any]:
        return {
            "path": self.path, "name": self.name, "image_id": self.image_id,
            "class": GROUP_NAMES[self.decision], "group": self.decision,
            "mean_prob_decision": int(self.probs.argmax()),
            **{f"p_{g}": round(float(p), 6) for g, p in zip(GROUP_NAMES, self.probs)},
            "p_carcinoma": round(float(self.probs[1:].sum()), 6),
            **{f"votes_{g}": int(v) for g, v in zip(GROUP_NAMES, self.votes)},
            "agreement": round(self.agreement, 3), "refer": self.refer, "stain_qc": self.stain_qc,
            "bundle_sha256": bundle_sha256, "bundle_format": FORMAT_VERSION,
        }


class Bundle:
    """A trained histoboost model: `Bundle.load(path).predict(paths)`."""

    def __init__(self, config: Config, classifier, backbones: list, meta: dict[str, Any], path: Path | None = None):
        self.config = config
        self.classifier = classifier
        self.backbones = backbones
        self.meta = meta
        self.path = path
        self.rule = DecisionRule(**meta.get("decision_rule", {}))

    @property
    def sha256(self) -> str:
        """Identity of the bundle: the sha256 of its bundle.json (which lists every other file's)."""
        return self.meta.get("_sha256", "")

    # -- writing ---------------------------------------------------------------------------------
    def save(self, out: str | Path) -> Path:
        """Write the bundle folder, or a .zip when `out` ends in .zip; atomically (temp + rename)."""
        out = Path(out)
        if out.exists():
            raise BundleError(f"{out} exists: choose another --out or remove it")
        staging = Path(tempfile.mkdtemp(prefix=".bundle-", dir=out.parent if out.parent.exists() else None))
        try:
            model_file = self.meta["classifier"]["file"]
            self.classifier.save_model(staging / model_file)
            meta = json.loads(json.dumps({k: v for k, v in self.meta.items() if not k.startswith("_")}))
            meta["files"] = {model_file: file_sha256(staging / model_file)}
            for spec in meta["backbones"]:
                if spec["weights_source"].startswith("file:"):  # not downloadable: carried in the bundle
                    name = f"weights-{spec['name']}{Path(spec['weights_source']).suffix}"
                    shutil.copyfile(spec["weights_source"].removeprefix("file:"), staging / name)
                    if file_sha256(staging / name) != spec["weights_sha256"]:
                        raise BundleError(f"{spec['weights_source'][5:]} changed since the model was trained: retrain")
                    spec["file"], meta["files"][name] = name, spec["weights_sha256"]
            meta["meta_sha256"] = _meta_digest(meta)
            write_text_atomic(staging / META_FILE, json.dumps(meta, indent=2, sort_keys=True) + "\n")
            out.parent.mkdir(parents=True, exist_ok=True)
            if out.suffix == ".zip":
                tmp_zip = out.with_name(f".{out.name}.tmp")
                with zipfile.ZipFile(tmp_zip, "w", zipfile.ZIP_DEFLATED) as archive:
                    for name in (META_FILE, *meta["files"]):
                        archive.write(staging / name, name)
                os.replace(tmp_zip, out)
            else:
                os.replace(staging, out)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return out

    # -- reading ---------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> Bundle:
        """Open and verify a bundle folder or .zip; load its backbones (their weights must match)."""
        from .backbones import BackboneError, create_backbone
        from .classifier import load_classifier

        path = Path(path)
        files = _read_bundle_files(path)
        try:
            meta = json.loads(files[META_FILE])
        except KeyError:
            raise BundleError(f"{path}: not a histoboost bundle (no {META_FILE})") from None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise BundleError(f"{path}: {META_FILE} is damaged: use the original bundle") from None
        version = meta.get("format_version") if isinstance(meta, dict) else None
        if not isinstance(version, int):
            raise BundleError(f"{path}: {META_FILE} has no format version: not a histoboost bundle")
        if version > FORMAT_VERSION:  # checked first: a newer format may check itself differently
            raise BundleError(f"{path}: bundle format {version} is newer than the {FORMAT_VERSION} this histoboost "
                              f"{__version__} reads: upgrade histoboost")
        if meta.get("meta_sha256") != _meta_digest(meta):
            raise BundleError(f"{path}: {META_FILE} does not match its checksum: the bundle was altered or "
                              "damaged; use the original bundle")
        for name, digest in meta.get("files", {}).items():
            if name not in files or hashlib.sha256(files[name]).hexdigest() != digest:
                raise BundleError(f"{path}: {name} does not match its checksum: the bundle was altered or damaged; "
                                  "use the original bundle")
        meta["_sha256"] = hashlib.sha256(files[META_FILE]).hexdigest()
        config = Config.from_dict(meta["config"])
        backbones = []
        with tempfile.TemporaryDirectory() as tmp:
            for spec in meta["backbones"]:
                weights = config.weights_for(spec["name"])
                if "file" in spec:  # carried in the bundle (checked against its sha256 above)
                    weights = Path(tmp) / spec["file"]
                    weights.write_bytes(files[spec["file"]])
                try:
                    backbone = create_backbone(spec["name"], weights, device)
                except BackboneError as err:
                    raise BundleError(f"{path}: needs backbone {spec['name']} with weights sha256 "
                                      f"{spec['weights_sha256'][:12]}…: {err}") from None
                if backbone.weights_sha256 != spec["weights_sha256"]:
                    raise BundleError(f"{path}: backbone {spec['name']} here has weights sha256 "
                                      f"{backbone.weights_sha256[:12]}…, the bundle was trained with "
                                      f"{spec['weights_sha256'][:12]}…: pass the original file with --weights")
                backbones.append(backbone)
            model_file = meta["classifier"]["file"]
            (Path(tmp) / model_file).write_bytes(files[model_file])
            classifier = load_classifier(Path(tmp) / model_file, config.classifier,
                                         meta["classifier"]["best_iteration"], device)
        return cls(config, classifier, backbones, meta, path)

    # -- predicting ------------------------------------------------------------------------------
    def predict(self, paths: list[str | Path], device: str = "cpu", batch_size: int = 8, progress: bool = False,
                overlay_dir: str | Path | None = None) -> tuple[list[dict[str, Any]], list[Problem]]:
        """Predict images (files or folders of images) with the bundle's own preprocessing and test-time
        augmentations; returns one record per image and one problem per image that failed."""
        from tqdm.auto import tqdm

        from .stain import StainError

        files, problems = _collect(paths)
        records = []
        for file in tqdm(files, desc="predicting", unit="img", disable=not progress):
            try:
                prediction, grid = self.predict_one(file, device, batch_size, want_grid=overlay_dir is not None)
            except (OSError, ValueError, StainError, HistoboostError) as err:
                problems.append(Problem(file, f"cannot be predicted ({str(err).splitlines()[0]})",
                                        "check the image; the others were predicted"))
                continue
            records.append(prediction.record(self.sha256))
            if overlay_dir is not None:
                from .report import write_overlay

                write_overlay(file, grid, prediction.decision, Path(overlay_dir))
        return records, problems

    def predict_one(self, path: Path, device: str = "cpu", batch_size: int = 8, want_grid: bool = False):
        """One image file, read and checked here: (Prediction, class-probability grid or None)."""
        from .data import scan_file

        info = scan_file(Path(path))
        if isinstance(info, Problem):
            raise BundleError(info.message)
        return self.predict_known(path, info.sha256, info.mpp, device, batch_size, want_grid)

    def predict_known(self, path: str | Path, image_id: str, mpp: float | None, device: str = "cpu",
                      batch_size: int = 8, want_grid: bool = False):
        """An image whose id (sha256) and resolution are known, e.g. from a validated manifest."""
        from .features import describe_image, prepare_image
        from .stain import FALLBACK_NOTES

        prepared = prepare_image(path, image_id, mpp, self.config)
        rows = np.concatenate([describe_image(prepared.rgb, prepared.plans, b, self.config, device, batch_size,
                                              prepared.stain_fit).descriptor(self.config.features.descriptor)
                               for b in self.backbones], axis=1)
        raw = self.classifier.predict_proba(rows)
        grid = self._probability_grid(prepared.rgb, device) if want_grid else None
        decision, agreement = self.rule.decide(raw[None])
        refer = "votes split" if self.rule.refer(agreement)[0] else ""
        qc = ""
        if prepared.qc is not None and not prepared.qc.ok:
            qc = f"{'; '.join(prepared.qc.flags)} ({FALLBACK_NOTES[prepared.stain_fallback]})"
            refer = "; ".join(filter(None, [refer, "stain QC failed"]))
        prediction = Prediction(str(path), Path(path).stem, image_id, self.rule.calibrated(raw).mean(axis=0),
                                vote_counts(raw[None])[0], int(decision[0]), raw, float(agreement[0]), refer, qc)
        return prediction, grid

    def _probability_grid(self, rgb: np.ndarray, device: str) -> np.ndarray:
        """Class probabilities (h, w, 3) of each feature-map cell of the un-augmented image: the classifier
        applied to single cells. Exploratory: it was trained on vectors pooled over crops."""
        import torch

        maps = []
        with torch.inference_mode():
            x = torch.from_numpy(rgb).permute(2, 0, 1)[None].float().to(device)
            for backbone in self.backbones:
                stage_maps = backbone.feature_maps(x, self.config.features.stages)
                size = stage_maps[0][0].shape[2:]  # finer stages averaged onto the final map's cells
                maps.append(torch.cat([torch.nn.functional.adaptive_avg_pool2d(m.float(), size)
                                       for m, _ in stage_maps], dim=1)[0].cpu().numpy())
        h, w = maps[0].shape[1:]
        cells = []
        for fmap in maps:
            cell = fmap.reshape(fmap.shape[0], -1).T  # (h*w, D)
            cells.append(np.concatenate([cell, cell], axis=1)
                         if self.config.features.descriptor == "crops+whole" else cell)
        return self.classifier.predict_proba(np.concatenate(cells, axis=1)).reshape(h, w, 3)


def train_bundle(manifest: Manifest, config: Config, cache_dir: str | Path | None = None, device: str = "cpu",
                 batch_size: int = 8, progress: bool = True) -> Bundle:
    """Train the classifier on every image of the manifest (features from the store, extracted where
    missing) and return the bundle, ready to save."""
    from .classifier import fit_decision_rule, make_classifier
    from .evaluate import split_units
    from .features import describe_dataset, library_versions

    unseen = None  # with fine-tuning: the images it did not train on, where the decision rule is chosen
    if config.finetune.enabled:
        config, unseen = _finetuned_config(manifest, config, cache_dir, device, progress)
    described = describe_dataset(manifest, config, cache_dir, device, batch_size, progress)
    backbones, owners = [d.backbone for d in described], described[0].owners
    groups = manifest.groups
    # Early stopping and the decision rule's inner folds group images as cross-validation does.
    _, units = split_units(manifest, config.evaluate.split_by)
    X = np.concatenate([d.X for d in described], axis=1)
    classifier = make_classifier(config.classifier, seed=config.seed, device=device)
    classifier.fit(X, groups[owners], groups=units[owners])
    try:
        rule = fit_decision_rule(X, groups[owners], owners, units[owners], config.classifier, config.seed, device,
                                 None if unseen is None else unseen[owners])
    except ValueError as err:
        raise BundleError(f"{manifest.root}: {err}") from None
    ids = sorted(r.image_id for r in manifest)
    meta = {
        "format_version": FORMAT_VERSION,
        "histoboost": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "config": config.to_dict(),
        "backbones": [b.identity for b in backbones],
        "classes": list(GROUP_NAMES),
        "classifier": {"type": config.classifier.kind, "file": MODEL_FILES[config.classifier.kind],
                       "best_iteration": classifier.best_iteration},
        "decision_rule": rule.to_dict(),
        "training_data": {"images": len(manifest), "per_group": {GROUP_NAMES[g]: int((groups == g).sum())
                                                                  for g in range(3)},
                          "image_ids_sha256": hashlib.sha256("\n".join(ids).encode()).hexdigest(),
                          "source": str(manifest.root)},
        "versions": library_versions(),
    }
    return Bundle(config, classifier, backbones, meta)


def _finetuned_config(manifest: Manifest, config: Config, cache_dir: str | Path | None, device: str,
                      progress: bool) -> tuple[Config, np.ndarray]:
    """The config with each backbone's weights fine-tuned on these images (cached by key), and which
    images the fine-tuning did not train on (its validation part)."""
    from .evaluate import split_units
    from .features import default_cache_dir
    from .finetune import finetune_cached, prepare_training_images

    _, units = split_units(manifest, config.evaluate.split_by)
    images = prepare_training_images(manifest, config, units, progress=progress)
    weights, trained_on = [], set()
    for name in config.features.backbones:
        result = finetune_cached(images, config, name, cache_dir or default_cache_dir(), config.weights_for(name),
                                 device, progress)
        weights.append(f"{name}={result.weights}")
        trained_on |= set(result.card["data"]["train_images"])
    unseen = ~np.isin([r.image_id for r in manifest], list(trained_on))
    return config.merged({"features.weights": weights}), unseen


def evaluate_bundle(bundle: Bundle, manifest: Manifest, device: str = "cpu", progress: bool = True):
    """Predict a labelled set with a bundle and compute the cross-validation metrics on it (one
    "fold": the whole set, held out from training)."""
    from tqdm.auto import tqdm

    from .evaluate import CVResult, CVRun, FoldPlan

    predictions = [bundle.predict_known(r.path, r.image_id, r.mpp, device)[0]
                   for r in tqdm(manifest.records, desc="predicting", unit="img", disable=not progress)]
    n = len(manifest)
    plan = FoldPlan(np.zeros(n, dtype=np.int64), np.array([r.patient or r.image_id for r in manifest], dtype=object),
                    "held-out set", 1)
    result = CVResult("bundle", np.stack([p.aug_probs for p in predictions]), manifest.groups, plan)
    if bundle.config.classifier.decides_by_rule:  # the bundle's operating point, as cross-validation reports it
        result.rules = [bundle.rule]
        result.decision = np.array([p.decision for p in predictions])
        result.agreement = np.array([p.agreement for p in predictions])
    run = CVRun(bundle.config, plan, [result], np.array([r.image_id for r in manifest]),
                np.array([r.name for r in manifest]), np.array([str(r.path) for r in manifest]),
                np.array([r.patient or "" for r in manifest]))
    run.evaluate()
    return run


def _read_bundle_files(path: Path) -> dict[str, bytes]:
    if path.is_dir():
        return {p.name: p.read_bytes() for p in path.iterdir() if p.is_file()}
    if path.is_file() and zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                return {name: archive.read(name) for name in archive.namelist()}
        except (zipfile.BadZipFile, zlib.error, OSError) as err:
            raise BundleError(f"{path}: the zip is damaged ({err}): use the original bundle") from None
    raise BundleError(f"{path}: no bundle here (give the folder or .zip written by histoboost train)")


def _collect(paths: list[str | Path]) -> tuple[list[Path], list[Problem]]:
    files, problems = [], []
    for item in map(Path, paths):
        if item.is_dir():
            found = sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not found:
                problems.append(Problem(item, "folder holds no images", "give image files or a folder of images"))
            files += found
        elif item.is_file():
            files.append(item)
        else:
            problems.append(Problem(item, "no such file or folder", "check the path"))
    return files, problems


def _meta_digest(meta: dict[str, Any]) -> str:
    """sha256 of bundle.json's content without its own checksum, in a canonical form."""
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


