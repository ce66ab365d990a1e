"""A trained model as a portable bundle, and prediction on new images.

A bundle is a folder or a .zip of fixed members: `bundle.json` (format version, the full config,
backbones and their weights identity, the decision rule, the training images' ids, library versions
and the sha256 of every other member), the classifier (XGBoost's native `model.ubj`, or the logistic
model's arrays as `model.json`) and, for weights that cannot be downloaded (local or fine-tuned),
`weights-<backbone>.safetensors`, except gated or non-commercial foundation-model weights: those are
named by sha256 and the user passes their own file when loading. No pickle anywhere.

A bundle is a file people download and share, so loading treats it as hostile (docs/security.md):
sizes, compression and member names are checked before anything is read; bundle.json is read first
and checked (identity, signature, the published JSON Schema schemas/bundle-7.schema.json) before any
field is used or any other member read; the files it lists must be exactly the members present;
members are read into memory, never written out and never looked up by a name taken from bundle.json.
The bundle's identity is the sha256 of its bundle.json, which holds the sha256 of every other member:
checksums detect damage, while `expect_sha256` and Ed25519 signatures (`signing`) detect deliberate edits.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from functools import cache, cached_property
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__, storage
from .config import Config, ConfigError, HistoboostError
from .data import CLASS_SCHEMES, GROUP_NAMES, GROUPS, ClassScheme, Manifest, Problem, class_scheme
from .classifier import DecisionRule, mean_decision, vote_counts

# 4: fixed member names, schema, safetensors-only weights, training image ids;
# 5: each backbone's spec sha256; foundation-model weights the user supplies;
# 6: the class scheme (classes other than the 3 groups: decision_rule.groups, training_data.per_class);
# 7: the training images' geometry (training_data.mpp, working_mpp, field_px) for whole-slide tiling
FORMAT_VERSION = 7
OLDEST_FORMAT = 5
MODEL_FILES = {"xgboost": "model.ubj", "logistic": "model.json"}
META_FILE = "bundle.json"
_MEMBER_NAME = re.compile(r"^(bundle\.json|model\.ubj|model\.json|weights-[A-Za-z0-9_.-]{1,128}\.safetensors)$")

# Refused before anything is read (a zip's sizes come from its directory; reading never goes past them).
MAX_MEMBERS = 10  # bundle.json, the classifier and at most 8 weights files
MAX_META_BYTES = 16 * 2**20
MAX_MEMBER_BYTES = {"bundle.json": MAX_META_BYTES, "model.ubj": 2**30, "model.json": 64 * 2**20}
MAX_WEIGHTS_BYTES = 8 * 2**30  # a ViT-g in float32 is about 4.5 GB
MAX_TOTAL_BYTES = 24 * 2**30
MAX_RATIO = 50  # uncompressed / compressed, for members over 1 MiB: models compress ~10x, zeros ~1000x
MAX_WEIGHTS_RATIO = 4  # float weights compress about 1.1-fold
MAX_JSON_DEPTH = 8
# Pillow modes without colour: such an image is predicted but referred (the classifier learnt H&E colour).
GRAYSCALE_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})


class BundleError(HistoboostError):
    """A bundle cannot be written or used; the message says why."""


@dataclass
class Prediction:
    """One image's result: the same columns as cross-validation's predictions.csv, plus provenance."""

    path: str
    name: str
    image_id: str
    probs: np.ndarray  # (K,) mean probability over augmentations (calibrated where the bundle calibrates)
    votes: np.ndarray  # (K,)
    decision: int  # class index, by the bundle's decision rule: majority vote, or its carcinoma threshold
    aug_probs: np.ndarray  # (A, K) as the classifier gave them (before calibration)
    agreement: float = 1.0  # share of augmentations that agree with the decision
    refer: str = ""  # why a pathologist should look: "votes split", "stain QC failed", or ""
    stain_qc: str = ""  # the quality check's flags, and the fallback used
    classes: ClassScheme = CLASS_SCHEMES["groups"]
    rule: str = ""  # the bundle's decision rule in words (DecisionRule.describe)

    def record(self, bundle_sha256: str) -> dict[str, Any]:
        """One row: `class` (histoboost's name), `label` (the data set's) and `group` (0-2) of the decision,
        then one probability and vote count per class."""
        scheme = self.classes
        carcinoma = np.asarray(scheme.groups) > 0
        return {
            "path": self.path, "name": self.name, "image_id": self.image_id,
            "class": scheme.classes[self.decision], "label": scheme.labels[self.decision],
            "group": scheme.groups[self.decision],
            "mean_prob_decision": int(mean_decision(self.probs[None, None], scheme.groups)[0]),
            **{f"p_{c}": round(float(p), 6) for c, p in zip(scheme.classes, self.probs)},
            "p_carcinoma": round(float(self.probs[carcinoma].sum()), 6),
            **{f"votes_{c}": int(v) for c, v in zip(scheme.classes, self.votes)},
            "agreement": round(self.agreement, 3), "refer": self.refer, "stain_qc": self.stain_qc,
            "decision_rule": self.rule, "bundle_sha256": bundle_sha256, "bundle_format": FORMAT_VERSION,
        }


class Bundle:
    """A trained histoboost model: `Bundle.load(path).predict(paths)`."""

    def __init__(self, config: Config, classifier, backbones: list, meta: dict[str, Any], path: Path | None = None,
                 sha256: str = ""):
        self.config = config
        self.classifier = classifier
        self.backbones = backbones
        self.meta = meta
        self.path = path
        self.sha256 = sha256  # the identity: sha256 of bundle.json as saved (see `identity`)
        self.rule = DecisionRule(**meta["decision_rule"])
        self.classes = class_scheme(config.classifier.classes)

    @property
    def rule_text(self) -> str:
        """The decision rule in words: what `predict` output and `train` state."""
        chosen_on = ("the images its fine-tuned backbone never trained on" if self.config.finetune.enabled
                     else "inner folds")
        return self.rule.describe(self.config.classifier.target_sensitivity, chosen_on)

    @cached_property
    def training_image_ids(self) -> frozenset[str]:
        """Content keys of the images the classifier was trained on (to keep them out of evaluations)."""
        return frozenset(self.meta["training_data"]["image_ids"])

    # -- writing ---------------------------------------------------------------------------------
    def members(self) -> dict[str, bytes]:
        """Every member's bytes, bundle.json last (it lists the others' sha256)."""
        from safetensors.torch import save

        model_file = MODEL_FILES[self.config.classifier.kind]
        out = {model_file: self.classifier.to_bytes()}
        meta = json.loads(json.dumps(self.meta))
        for spec, backbone in zip(meta["backbones"], self.backbones):
            # Not downloadable: carried, unless their licence forbids it (then the user passes their own file).
            if spec["weights_source"].startswith(("file:", "bundle:")) and backbone.redistributable:
                spec["file"] = f"weights-{spec['name']}.safetensors"
                state = {k: v.detach().cpu().contiguous() for k, v in backbone.model.state_dict().items()}
                out[spec["file"]] = save(state)  # the tensors in use, whatever format they came in
        meta["files"] = {name: hashlib.sha256(data).hexdigest() for name, data in sorted(out.items())}
        meta["meta_sha256"] = _meta_digest(meta)
        out[META_FILE] = (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode()
        return out

    def save(self, out: str | Path) -> Path:
        """Write the bundle folder, or a .zip when `out` ends in .zip, atomically (temp + rename); sets
        `sha256` to the identity of what was written."""
        out = Path(out)
        if out.exists():
            raise BundleError(f"{out} exists: choose another --out or remove it")
        members = self.members()
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        try:
            if out.suffix == ".zip":
                with zipfile.ZipFile(staging / out.name, "w", zipfile.ZIP_DEFLATED) as archive:
                    for name in (META_FILE, *sorted(set(members) - {META_FILE})):
                        info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
                        info.external_attr = 0o644 << 16  # readable when unzipped by other tools
                        archive.writestr(info, members[name], compress_type=zipfile.ZIP_DEFLATED)
                os.replace(staging / out.name, out)
            else:
                for name, data in members.items():
                    (staging / name).write_bytes(data)
                os.replace(staging, out)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        self.sha256 = identity(members[META_FILE])
        return out

    # -- reading ---------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path, device: str = "cpu", expect_sha256: str | None = None,
             trusted_key: str | Path | None = None, weights: dict[str, str | Path] | None = None) -> Bundle:
        """Open and verify a bundle folder or .zip; load its backbones (their weights must match).

        `expect_sha256` (the identity `train` printed) or `trusted_key` (an Ed25519 public key whose
        signature `<bundle>.sig` must verify) make a deliberately edited bundle fail to load. `weights`
        maps a foundation model the bundle does not carry to the user's own file of it."""
        path = Path(path)
        present = inventory(path)
        if META_FILE not in present:
            raise BundleError(f"{path}: not a histoboost bundle (no {META_FILE})")
        meta_bytes = read_members(path, [META_FILE], present)[META_FILE]
        sha256 = identity(meta_bytes)
        if expect_sha256 is not None and sha256 != expect_sha256.strip().lower():
            raise BundleError(f"{path}: bundle sha256 is {sha256}, not the expected {expect_sha256}: it is another "
                              "or an altered bundle; do not use it")
        if trusted_key is not None:
            from .signing import SigningError, verify

            try:
                verify(meta_bytes, signature_path(path), trusted_key)
            except SigningError as err:
                raise BundleError(f"{path}: {err}") from None
        meta = parse_meta(meta_bytes, path)
        _check_members(meta, set(present), path)
        members = _checked(read_members(path, sorted(meta["files"]), present), meta, path)
        try:
            config = Config.from_dict(meta["config"])
        except ConfigError as err:
            raise BundleError(f"{path}: {META_FILE} holds an unusable config ({err}): use the original bundle") from None
        scheme = class_scheme(config.classifier.classes)
        if meta["classes"] != list(scheme.classes) or tuple(meta["decision_rule"].get("groups", GROUPS)) != scheme.groups:
            raise BundleError(f"{path}: classes {meta['classes']} are not the {list(scheme.classes)} of its "
                              f"--classes {scheme.name}: use the original bundle")
        if config.classifier.kind != meta["classifier"]["type"]:
            raise BundleError(f"{path}: {META_FILE} names classifier {meta['classifier']['type']} but its config "
                              f"{config.classifier.kind}: use the original bundle")
        from .backbones import (REGISTRY, BackboneError, create_backbone, file_sha256, parameter_bytes,
                                weights_from_safetensors, weights_problem)
        from .classifier import load_classifier  # torch and xgboost: only after the checks above
        from .foundation import FOUNDATION

        backbones, weights = [], dict(weights or {})
        wanted = {spec["name"]: spec for spec in meta["backbones"] if "file" not in spec and spec["name"] in FOUNDATION}
        for name, own in weights.items():
            if name not in wanted:
                raise BundleError(f"{path}: --weights {name}=…: the bundle needs no file for {name} (it takes the "
                                  f"user's own file only for foundation models it does not carry: "
                                  f"{', '.join(wanted) or 'none'})")
            problem = weights_problem(own, name)  # not found, or a folder: the file inside it to pass
            if problem:
                raise BundleError(problem)
            if file_sha256(Path(own)) != wanted[name]["weights_sha256"]:  # before a 4 GB network is built
                raise BundleError(f"{path}: {own} is not the {name} file the bundle was trained with (sha256 "
                                  f"{wanted[name]['weights_sha256'][:12]}…): give that file")
        for spec in meta["backbones"]:
            try:
                if parameter_bytes(spec["name"]) > MAX_WEIGHTS_BYTES:  # before building it
                    raise BackboneError(f"{spec['name']} is larger than the {MAX_WEIGHTS_BYTES / 2**30:.0f} GiB a "
                                        "bundle may need")
                if "file" not in spec and spec["name"] not in REGISTRY and spec["name"] not in FOUNDATION:
                    raise BackboneError(f"{spec['name']} is neither carried in the bundle nor a registered backbone")
                if "file" in spec:  # carried: built from the member in memory, its sha256 checked above
                    own = weights_from_safetensors(members[spec["file"]], spec["weights_sha256"],
                                                   f"bundle:{spec['file']}")
                    backbone = create_backbone(spec["name"], own, device)
                elif spec["name"] in FOUNDATION:  # never carried: the user's own file, checked by sha256 below
                    backbone = create_backbone(spec["name"], weights.get(spec["name"]), device)
                else:
                    backbone = create_backbone(spec["name"], None, device)
            except BackboneError as err:
                raise BundleError(f"{path}: needs backbone {spec['name']} with weights sha256 "
                                  f"{spec['weights_sha256'][:12]}…: {err}") from None
            if backbone.spec_sha256 != spec["spec_sha256"]:
                raise BundleError(f"{path}: backbone {spec['name']} is defined differently in this histoboost than in "
                                  f"the one that trained the bundle (histoboost {meta['histoboost']}): use that "
                                  "version, or retrain")
            if backbone.weights_sha256 != spec["weights_sha256"] or backbone.architecture != spec["architecture"]:
                versions = meta["versions"]
                raise BundleError(f"{path}: backbone {spec['name']} here is {backbone.architecture} with weights sha256 "
                                  f"{backbone.weights_sha256[:12]}… from {backbone.weights_source}; the bundle was "
                                  f"trained with {spec['architecture']} and {spec['weights_sha256'][:12]}… from "
                                  f"{spec['weights_source']} (timm {versions.get('timm', '?')}): install those weights, "
                                  "or retrain")
            backbones.append(backbone)
        model_file = meta["classifier"]["file"]
        try:
            classifier = load_classifier(members[model_file], config.classifier, meta["classifier"]["best_iteration"],
                                         device)
        except ValueError as err:
            raise BundleError(f"{path}: {model_file} is {err}: use the original bundle") from None
        width = descriptor_width(backbones, config, device)
        if classifier.n_features != width:
            raise BundleError(f"{path}: {model_file} takes {classifier.n_features} features but its backbones give "
                              f"{width}: the bundle was altered; use the original bundle")
        return cls(config, classifier, backbones, meta, path, sha256)

    # -- predicting ------------------------------------------------------------------------------
    def predict(self, paths: list[str | Path], device: str = "cpu", batch_size: int = 8, progress: bool = False,
                overlay_dir: str | Path | None = None) -> tuple[list[dict[str, Any]], list[Problem]]:
        """Predict images (files or folders of images) with the bundle's own preprocessing and test-time
        augmentations; returns one record per image and one problem per image that failed."""
        from tqdm.auto import tqdm

        from .stain import StainError

        from .report import write_overlay

        files, problems = _collect(paths)
        if overlay_dir is not None:
            Path(overlay_dir).mkdir(parents=True, exist_ok=True)
        records = []
        for file in tqdm(files, desc="predicting", unit="img", disable=not progress):
            try:
                prediction, grid = self.predict_one(file, device, batch_size, want_grid=overlay_dir is not None)
                record = prediction.record(self.sha256)
                if overlay_dir is not None:  # named by content too: two images called x.png never collide
                    overlay = Path(overlay_dir) / f"{file.stem}-{prediction.image_id[:12]}.overlay.png"
                    record["overlay"] = write_overlay(file, grid, prediction.decision, overlay,
                                                      class_name=record["class"]).name
            except (OSError, ValueError, StainError, HistoboostError) as err:
                problems.append(Problem(file, f"cannot be predicted ({str(err).splitlines()[0]})",
                                        "check the image; the others were predicted"))
                continue
            records.append(record)
        return records, problems

    def predict_slide(self, path: str | Path, out: str | Path, settings=None, device: str = "cpu",
                      batch_size: int = 8, threads: int = 2, cache_dir: str | Path | None = None,
                      progress: bool = False):
        """Score a whole-slide image tile by tile and write its outputs into `out` (`slides.SlideSettings`
        says how; docs/slides.md): returns a `slides.SlideResult`."""
        from .slides import SlideSettings, predict_slide

        return predict_slide(self, path, out, settings or SlideSettings(), device, batch_size, threads, cache_dir,
                             progress)

    def predict_one(self, path: Path, device: str = "cpu", batch_size: int = 8, want_grid: bool = False):
        """One image file, read and checked here: (Prediction, class-probability grid or None)."""
        from .data import scan_file

        info = scan_file(Path(path))
        if isinstance(info, Problem):
            raise BundleError(info.message)
        return self.predict_known(path, info.image_id, info.mpp, device, batch_size, want_grid, info.mode)

    def predict_known(self, path: str | Path, image_id: str, mpp: float | None, device: str = "cpu",
                      batch_size: int = 8, want_grid: bool = False, mode: str = "RGB"):
        """An image whose content key, resolution and Pillow mode are known, e.g. from a validated manifest."""
        from .features import describe_image, prepare_image
        from .stain import FALLBACK_NOTES

        prepared = prepare_image(path, image_id, mpp, self.config)
        rows = np.concatenate([describe_image(prepared.rgb, prepared.plans, b, self.config, device, batch_size,
                                              prepared.stain_fit).descriptor(self.config.features.descriptor)
                               for b in self.backbones], axis=1)
        raw = self.classifier.predict_proba(rows)
        grid = self._probability_grid(prepared.rgb, device) if want_grid else None
        decision, agreement = self.rule.decide(raw[None])
        reasons = ["votes split" if self.rule.refer(agreement)[0] else "",
                   "grayscale, no H&E colour" if mode in GRAYSCALE_MODES else ""]
        refer = "; ".join(filter(None, reasons))
        qc = ""
        if prepared.qc is not None and not prepared.qc.ok:
            qc = f"{'; '.join(prepared.qc.flags)} ({FALLBACK_NOTES[prepared.stain_fallback]})"
            refer = "; ".join(filter(None, [refer, "stain QC failed"]))
        prediction = Prediction(str(path), Path(path).stem, image_id, self.rule.calibrated(raw).mean(axis=0),
                                vote_counts(raw[None], self.classes.groups)[0], int(decision[0]), raw,
                                float(agreement[0]), refer, qc, self.classes, self.rule_text)
        return prediction, grid

    def _probability_grid(self, rgb: np.ndarray, device: str) -> np.ndarray:
        """Class probabilities (h, w, K) of each cell of the un-augmented image: the classifier applied to
        single feature-map cells (CNNs) or to single crop-sized tiles (when a ViT is among the backbones).
        Exploratory: it was trained on vectors pooled over crops."""
        import torch

        maps = []
        with torch.inference_mode():
            x = torch.from_numpy(rgb).permute(2, 0, 1)[None].float().to(device)
            if all(b.has_maps for b in self.backbones):
                for backbone in self.backbones:
                    stage_maps = backbone.feature_maps(x, self.config.features.stages)
                    size = stage_maps[0][0].shape[2:]  # finer stages averaged onto the final map's cells
                    maps.append(torch.cat([torch.nn.functional.adaptive_avg_pool2d(m.float(), size)
                                           for m, _ in stage_maps], dim=1)[0].cpu().numpy())
            else:
                maps = self._tile_maps(x[0])
        h, w = maps[0].shape[1:]
        cells = []
        for fmap in maps:
            cell = fmap.reshape(fmap.shape[0], -1).T  # (h*w, D)
            cells.append(np.concatenate([cell, cell], axis=1)
                         if self.config.features.descriptor == "crops+whole" else cell)
        return self.classifier.predict_proba(np.concatenate(cells, axis=1)).reshape(h, w, -1)

    def _tile_maps(self, x, batch_size: int = 8) -> list[np.ndarray]:
        """Each backbone's embedding of crop-sized tiles covering the image (3, H, W): (D, rows, cols) each."""
        import torch

        size = self.config.augment.crop_size
        height, width = x.shape[1:]
        rows, cols = -(-height // size), -(-width // size)  # enough tiles to cover the image; the last ones
        ys = np.linspace(0, height - size, rows).round().astype(int)  # flush with the edge, overlapping a little
        xs = np.linspace(0, width - size, cols).round().astype(int)
        tiles = torch.stack([x[:, y:y + size, x0:x0 + size] for y in ys for x0 in xs])
        return [torch.cat([b.embed(chunk, self.config.features.stages) for chunk in tiles.split(batch_size)])
                .T.reshape(-1, rows, cols).cpu().numpy() for b in self.backbones]


def train_bundle(manifest: Manifest, config: Config, cache_dir: str | Path | None = None, device: str = "cpu",
                 batch_size: int = 8, progress: bool = True, image_mpp: float | None = None, engine=None) -> Bundle:
    """Train the classifier on every image of the manifest (features from the store, extracted where
    missing, on `engine`'s workers when given) and return the bundle, ready to save. `image_mpp` states the
    µm/px of images whose file and manifest state none (BACH's JPEGs: 0.42): recorded for whole slides, it
    changes no feature."""
    from .classifier import fit_decision_rule, make_classifier
    from .evaluate import split_units
    from .features import describe_dataset, library_versions

    unseen = None  # with fine-tuning: the images it did not train on, where the decision rule is chosen
    if config.finetune.enabled:
        config, unseen = _finetuned_config(manifest, config, cache_dir, device, progress)
    described = describe_dataset(manifest, config, cache_dir, device, batch_size, progress, engine)
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
        rule = fit_decision_rule(X, targets[owners], owners, units[owners], config.classifier, config.seed, device,
                                 None if unseen is None else unseen[owners])
    except ValueError as err:
        raise BundleError(f"{manifest.root}: {err}") from None
    config = config.merged({"features.weights": []})  # a bundle names no local path: it carries the weights
    meta = {
        "format_version": FORMAT_VERSION,
        "histoboost": __version__,
        "config": config.to_dict(),
        "backbones": [{**b.identity, "weights_source": _without_folders(b.weights_source)} for b in backbones],
        "classes": list(scheme.classes),
        "classifier": {"type": config.classifier.kind, "file": MODEL_FILES[config.classifier.kind],
                       "best_iteration": classifier.best_iteration},
        "decision_rule": rule.to_dict(),
        "training_data": {"images": len(manifest), "per_group": {GROUP_NAMES[g]: int((groups == g).sum())
                                                                  for g in range(3)},
                          "per_class": {c: int((targets == k).sum()) for k, c in enumerate(scheme.classes)},
                          "image_ids": sorted(r.image_id for r in manifest), "source": manifest.root.name,
                          **training_geometry(manifest, config, image_mpp)},
        "versions": library_versions(),
    }
    return Bundle(config, classifier, backbones, meta)


def training_geometry(manifest: Manifest, config: Config, image_mpp: float | None = None) -> dict[str, Any]:
    """What a whole slide needs to be tiled like the training images: their median shorter side in pixels,
    their µm/px (the file's, else the manifest's `mpp` column, else `image_mpp`) and the µm/px the classifier
    saw after the working scale (medians; None where any image's is unknown)."""
    from .data import plausible_mpp, working_scale

    physical, working = [], []
    for record in manifest:
        mpp = record.mpp or plausible_mpp(record.extra.get("mpp")) or image_mpp
        if mpp is None:
            physical = working = []
            break
        physical.append(mpp)
        working.append(mpp / working_scale(record.mpp, config.preprocess))
    return {"field_px": int(np.median([min(r.width, r.height) for r in manifest])),
            "mpp": float(np.median(physical)) if physical else None,
            "working_mpp": float(np.median(working)) if working else None}


def _finetuned_config(manifest: Manifest, config: Config, cache_dir: str | Path | None, device: str,
                      progress: bool) -> tuple[Config, np.ndarray]:
    """The config with each backbone's weights fine-tuned on these images (cached by key), and which
    images the fine-tuning did not train on (its validation part)."""
    from .evaluate import split_units
    from .features import default_cache_dir
    from .finetune import finetune_cached, prepare_training_images
    from .storage import local_folder

    cache_dir = local_folder(cache_dir or default_cache_dir(), "fine-tuned weights")  # refused before any work
    _, units = split_units(manifest, config.evaluate.split_by)
    images = prepare_training_images(manifest, config, units, progress=progress)
    weights, trained_on = [], set()
    for name in config.features.backbones:
        result = finetune_cached(images, config, name, cache_dir, config.weights_for(name),
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

    seen = [r for r in manifest if r.image_id in bundle.training_image_ids]
    if seen:
        raise BundleError(f"{len(seen)} of the {len(manifest)} images were in the bundle's training set (e.g. "
                          f"{seen[0].path}): evaluating on them overstates accuracy; remove them and evaluate on "
                          "images the model never saw")
    predictions = [bundle.predict_known(r.path, r.image_id, r.mpp, device, mode=r.mode)[0]
                   for r in tqdm(manifest.records, desc="predicting", unit="img", disable=not progress)]
    n = len(manifest)
    plan = FoldPlan(np.zeros(n, dtype=np.int64), np.array([r.patient or r.image_id for r in manifest], dtype=object),
                    "held-out set", 1)
    try:
        truth = bundle.classes.targets(manifest)
    except HistoboostError as err:
        raise BundleError(str(err)) from None
    result = CVResult("bundle", np.stack([p.aug_probs for p in predictions]), truth, plan, classes=bundle.classes)
    if bundle.config.classifier.decides_by_rule:  # the bundle's operating point, as cross-validation reports it
        result.rules = [bundle.rule]
        result.decision = np.array([p.decision for p in predictions])
        result.agreement = np.array([p.agreement for p in predictions])
    run = CVRun(bundle.config, plan, [result], np.array([r.image_id for r in manifest]),
                np.array([r.name for r in manifest]), np.array([str(r.path) for r in manifest]),
                np.array([r.patient or "" for r in manifest]))
    run.evaluate()
    return run


def descriptor_width(backbones: list, config: Config, device: str = "cpu") -> int:
    """How many features per row the backbones give under the config (one small forward pass each)."""
    import torch

    per_view = 2 if config.features.descriptor == "crops+whole" else 1
    with torch.inference_mode():
        probe = torch.zeros(1, 3, 64, 64, device=device)
        return per_view * sum(b.embed(probe, config.features.stages).shape[1] if b.has_maps else b.feature_dim
                              for b in backbones)


def _without_folders(source: str) -> str:
    """A weights source as a bundle records it: `file:NAME` without the folders of the training machine."""
    kind, sep, where = source.partition(":")
    return f"{kind}:{Path(where).name}" if kind in ("file", "bundle") and sep else source


def identity(meta_bytes: bytes) -> str:
    """A bundle's identity: the sha256 of its bundle.json bytes. bundle.json holds the sha256 of every
    other member and loading requires exactly those members, so the identity covers the whole bundle."""
    return hashlib.sha256(meta_bytes).hexdigest()


def signature_path(bundle: str | Path) -> Path:
    """Where a bundle's detached signature lives: `<bundle>.sig` beside it."""
    bundle = Path(bundle)
    return bundle.with_name(bundle.name + ".sig")


def inventory(path: Path) -> dict[str, int]:
    """The members of a bundle folder or zip and their sizes, checked (names, count, sizes, compression,
    no encryption, plain files only) before a byte of any member is read."""
    if path.is_dir():
        entries = list(os.scandir(path))
        for entry in entries:
            if not entry.is_file(follow_symlinks=False):
                raise BundleError(f"{path}: {entry.name} is not a regular file (a link, folder or device): a bundle "
                                  "holds plain files only; use the original bundle")
        sizes = {e.name: (e.stat(follow_symlinks=False).st_size, None) for e in entries}
    elif path.is_file() and zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                infos = archive.infolist()
        except (zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError) as err:
            raise BundleError(f"{path}: the zip is damaged ({str(err)[:120]}): use the original bundle") from None
        if len({i.filename for i in infos}) != len(infos):
            raise BundleError(f"{path}: the zip lists a member twice: use the original bundle")
        for info in infos:
            if info.flag_bits & 0x1 or info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                raise BundleError(f"{path}: {info.filename[:80]!r} is encrypted or compressed other than by deflate: "
                                  "not a histoboost bundle")
        sizes = {i.filename: (i.file_size, i.compress_size) for i in infos}
    else:
        raise BundleError(f"{path}: no bundle here (give the folder or .zip written by histoboost train)")
    _check_sizes(sizes, path)
    return {name: size for name, (size, _) in sizes.items()}


def read_members(path: Path, names: list[str], sizes: dict[str, int] | None = None) -> dict[str, bytes]:
    """The named members of a bundle into memory, never more bytes than each declares; `sizes` is the
    bundle's `inventory`, taken here when the caller has none."""
    sizes = sizes if sizes is not None else inventory(path)
    out = {}
    try:
        if path.is_dir():
            for name in names:
                with open(path / name, "rb", opener=_no_follow) as handle:
                    out[name] = handle.read(sizes[name] + 1)
        else:
            with zipfile.ZipFile(path) as archive:
                for name in names:
                    with archive.open(name) as handle:  # deflate output bounded per read, CRC checked at the end
                        out[name] = b"".join(iter(lambda: handle.read(1 << 16), b""))
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError, RuntimeError) as err:
        raise BundleError(f"{path}: the bundle is damaged or unreadable ({str(err)[:120]}): use the original "
                          "bundle") from None
    for name, data in out.items():
        if len(data) != sizes[name]:
            raise BundleError(f"{path}: {name} changed while it was read: use the original bundle")
    return out


def _no_follow(file: str, flags: int) -> int:
    return os.open(file, flags | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))


def _check_sizes(sizes: dict[str, tuple[int, int | None]], path: Path) -> None:
    """Member names, count, sizes and compression ratios within the limits."""
    if len(sizes) > MAX_MEMBERS:
        raise BundleError(f"{path}: {len(sizes)} members, more than a bundle ever has ({MAX_MEMBERS}): not a "
                          "histoboost bundle")
    for name, (size, packed) in sizes.items():
        if not _MEMBER_NAME.fullmatch(name):
            raise BundleError(f"{path}: holds {name[:80]!r}, which a bundle never has (only {META_FILE}, model.ubj or "
                              "model.json and weights-<backbone>.safetensors): use the original bundle")
        limit = MAX_MEMBER_BYTES.get(name, MAX_WEIGHTS_BYTES)
        if size > limit:
            raise BundleError(f"{path}: {name} is {size / 2**20:.0f} MiB, over the {limit / 2**20:.0f} MiB limit: "
                              "not a histoboost bundle")
        if packed is None:
            continue
        ratio = MAX_WEIGHTS_RATIO if name.endswith(".safetensors") else MAX_RATIO
        if size > 2**20 and size > ratio * max(packed, 1):
            raise BundleError(f"{path}: {name} expands {size / max(packed, 1):.0f}-fold, over the {ratio}-fold "
                              "limit (a zip bomb?): not a histoboost bundle")
        if packed > size + size // 100 + 1024:
            raise BundleError(f"{path}: {name} is stored larger than it unpacks: not a histoboost bundle")
    total = sum(size for size, _ in sizes.values())
    if total > MAX_TOTAL_BYTES:
        raise BundleError(f"{path}: {total / 2**30:.1f} GiB in all, over the {MAX_TOTAL_BYTES / 2**30:.0f} GiB limit")


@cache
def _schema_validator():
    import jsonschema

    schema = json.loads(resources.files("histoboost").joinpath("schemas/bundle-7.schema.json").read_text())
    return jsonschema.Draft202012Validator(schema)


def parse_meta(data: bytes, path: Path) -> dict[str, Any]:
    """bundle.json parsed and checked against the schema (depth, types, ranges, known keys, version)."""
    try:
        meta = storage.strict_json(data)
    except ValueError:  # not JSON, not UTF-8, NaN/Infinity, or a number of thousands of digits
        raise BundleError(f"{path}: {META_FILE} is damaged (not strict JSON): use the original bundle") from None
    except RecursionError:
        raise BundleError(f"{path}: {META_FILE} is nested too deeply: not a histoboost bundle") from None
    if storage.json_depth(meta, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        raise BundleError(f"{path}: {META_FILE} is nested deeper than {MAX_JSON_DEPTH} levels: not a histoboost bundle")
    version = meta.get("format_version") if isinstance(meta, dict) else None
    if not isinstance(version, int) or isinstance(version, bool):
        raise BundleError(f"{path}: {META_FILE} has no integer format_version: not a histoboost bundle")
    if version > FORMAT_VERSION:  # checked first: a newer format may check itself differently
        raise BundleError(f"{path}: bundle format {version} is newer than the {FORMAT_VERSION} this histoboost "
                          f"{__version__} reads: upgrade histoboost")
    if version < OLDEST_FORMAT:
        hint = ("histoboost 0.1.0 reads it" if version < 4 else "histoboost 0.2.0 reads it") if version >= 1 else \
            "no histoboost wrote it"
        raise BundleError(f"{path}: bundle format {version} is older than the {OLDEST_FORMAT} this histoboost reads "
                          f"({hint}): retrain it with this version")
    error = next(iter(_schema_validator().iter_errors(meta)), None)  # the first, without collecting them all
    if error is not None:
        where = "/".join(map(str, error.absolute_path)) or "the top level"
        raise BundleError(f"{path}: {META_FILE} fails the format-{FORMAT_VERSION} schema at {where} "
                          f"({error.message[:160]}): use the original bundle")
    ids = meta["training_data"]["image_ids"]
    if len(set(ids)) != len(ids):
        raise BundleError(f"{path}: {META_FILE} lists a training image twice: use the original bundle")
    if meta["meta_sha256"] != _meta_digest(meta):
        raise BundleError(f"{path}: {META_FILE} does not match its checksum: the bundle was damaged; use the "
                          "original bundle")
    return meta


def _check_members(meta: dict[str, Any], present: set[str], path: Path) -> None:
    """`files` lists exactly the members present, under the fixed names its classifier and backbones need."""
    listed, present = set(meta["files"]), present - {META_FILE}
    if listed != present:
        extra, missing = sorted(present - listed), sorted(listed - present)
        raise BundleError(f"{path}: members {', '.join(extra) or '(none)'} not listed and {', '.join(missing) or '(none)'} "
                          "missing: the bundle was altered or damaged; use the original bundle")
    expected = {meta["classifier"]["file"]} | {f"weights-{b['name']}.safetensors" for b in meta["backbones"] if "file" in b}
    named = {meta["classifier"]["file"]} | {b["file"] for b in meta["backbones"] if "file" in b}
    if named != expected or listed != expected:
        raise BundleError(f"{path}: members {', '.join(sorted(listed))} are not the fixed names its classifier and "
                          "backbones need: use the original bundle")


def _checked(members: dict[str, bytes], meta: dict[str, Any], path: Path) -> dict[str, bytes]:
    """The members, each matching the sha256 bundle.json lists for it."""
    for name in sorted(members):
        if hashlib.sha256(members[name]).hexdigest() != meta["files"][name]:
            raise BundleError(f"{path}: {name} does not match its checksum: the bundle was altered or damaged; "
                              "use the original bundle")
    return members


def _collect(paths: list[str | Path]) -> tuple[list[Path], list[Problem]]:
    """The image files given, folders searched (dangling links, loops and the like reported, not skipped)."""
    from .data import find_images

    files, problems = [], []
    for item in map(Path, paths):
        if item.is_dir():
            found, warnings = find_images(item)
            problems += warnings
            if not found:
                problems.append(Problem(item, "folder holds no images", "give image files or a folder of images"))
            files += found
        elif item.is_file():
            files.append(item)
        else:
            problems.append(Problem(item, "no such file or folder", "check the path"))
    return files, problems


def _meta_digest(meta: dict[str, Any]) -> str:
    """sha256 of bundle.json's content without its own checksum, in a canonical form: detects damage to
    bundle.json, not deliberate edits (anyone can recompute it; see `identity`)."""
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


