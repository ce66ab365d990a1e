"""One typed, frozen configuration for a histoboost run: presets, JSON round trip and per-stage hashes.

A run writes its `Config` as JSON next to every output. Each pipeline stage has a hash over the
settings that affect it (and its upstream stages) only, so that e.g. changing a classifier setting
never invalidates cached features. This module reads no files: callers pass dictionaries in.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from .errors import ConfigError
from .specs import is_foundation, settings_problem

# Bumped when the meaning of a setting changes, so caches keyed by the stage hashes are not reused.
SCHEMA_VERSION = 1

StainMethod = Literal["macenko", "reinhard", "none"]
StainFallback = Literal["reinhard", "none", "keep"]
ColorAugment = Literal["rgb_affine", "he", "none"]
Orientation = Literal["none", "flip", "dihedral"]
CropPooling = Literal["mean", "max", "gem"]
ExtractMode = Literal["shared", "exact"]
Descriptor = Literal["crops", "whole", "crops+whole"]
ComputeDtype = Literal["float32", "bfloat16"]
ClassifierKind = Literal["xgboost", "logistic"]
ClassSchemeName = Literal["groups", "bach4"]
TrainDtype = Literal["auto", "float32", "bfloat16"]


@dataclass(frozen=True)
class StainConfig:
    """Stain normalisation. `target` None means the method's published default reference."""

    method: StainMethod = "macenko"
    # Fitted reference values: Macenko -> 3x2 stain matrix then 2 max concentrations (8 numbers);
    # Reinhard -> LAB means then LAB standard deviations (6 numbers). Written here, never re-read
    # from the reference image, so a saved config alone reproduces the run.
    target: tuple[float, ...] | None = None
    reference_image_sha256: str | None = None
    # When an image's normalised output fails the quality check (washed out, saturated, not H&E):
    # try Reinhard and, if that fails too, use the image un-normalised ("reinhard"); go straight to
    # un-normalised ("none"); or use the failed output anyway ("keep"). Such images are referred.
    on_failure: StainFallback = "reinhard"


@dataclass(frozen=True)
class PreprocessConfig:
    """How an image is brought to the working resolution and colour space before augmentation."""

    scale: float = 0.5  # used when target_mpp is unset or the file states no resolution
    target_mpp: float | None = None  # µm per pixel to work at, where the file states its resolution
    stain: StainConfig = field(default_factory=StainConfig)


@dataclass(frozen=True)
class AugmentConfig:
    """A seeded colour augmentations per image, each with C seeded crop boxes."""

    n_augment: int = 40  # A
    color: ColorAugment = "rgb_affine"
    # rgb_affine: out = alpha * x + beta per RGB channel, alpha in [1-s, 1+s], beta in [-b, b] * 255.
    # The paper gives no ranges; these are mild, typical values.
    rgb_scale: float = 0.1
    rgb_shift: float = 0.05
    # he: stain concentrations scaled by alpha in [1-s, 1+s] and shifted by beta in [-b, b]
    # (TIAToolbox's StainAugmentor defaults: sigma1=0.4, sigma2=0.2, which are strong; ours milder).
    he_scale: float = 0.2
    he_shift: float = 0.05
    orientation: Orientation = "none"  # rot90/flip per augmented image (keeps a shared feature map valid)
    n_crops: int = 20  # C
    crop_size: int = 750  # pixels at the working resolution


@dataclass(frozen=True)
class FeatureConfig:
    """Frozen-CNN feature extraction."""

    backbones: tuple[str, ...] = ("resnet50", "xception")
    # shared: one CNN pass per augmented image, each crop's descriptor average-pooled from the feature
    # map inside its window (region-of-interest pooling); exact: one CNN pass per crop (the reference).
    mode: ExtractMode = "shared"
    # 1: the final feature map; k > 1: also the outputs of the k - 1 network stages before the last
    # one (e.g. ResNet50 layer3, EfficientNet blocks.4), each pooled in the same windows and concatenated.
    stages: int = 1
    crop_pooling: CropPooling = "mean"  # crop descriptors -> one vector per augmented image
    gem_p: float = 3.0
    # What the classifier sees per augmented image: pooled crops, the whole feature map pooled, or both
    # concatenated. Both are always stored, so this choice never re-extracts.
    descriptor: Descriptor = "crops"
    dtype: ComputeDtype = "float32"  # CNN compute precision
    # Local weight files, "name=path" (or just "path" with one backbone); their sha256 keys the store.
    weights: tuple[str, ...] = ()


@dataclass(frozen=True)
class FinetuneConfig:
    """Adapting the backbone to H&E before features are extracted (`histoboost finetune`, `--finetune`).

    The network is trained from its ImageNet weights on random crops of the stain-normalised training
    images, each crop with its own H&E-space and RGB colour change and dihedral orientation; AdamW with
    linear warm-up then cosine decay, label smoothing, class-balanced loss, early stopping on a
    validation part split off by whole split units (patients, blocks), best epoch kept.
    """

    enabled: bool = False  # cv: fine-tune inside every outer fold; train: on the training images first
    epochs: int = 8
    crops_per_image: int = 8  # random crops of each training image per epoch
    crop_size: int | None = None  # pixels at the working resolution; None = augment.crop_size
    batch_size: int = 16
    learning_rate: float = 3e-4  # backbone; the new 3-class head learns 10x faster
    weight_decay: float = 0.01
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    class_balance: bool = True  # loss weighted by inverse class frequency of the training images
    freeze_stages: int = 0  # leave the stem and this many early network stages at their ImageNet weights
    he_scale: float = 0.3  # stronger than the feature-time augmentation: training wants variety
    he_shift: float = 0.1
    rgb_scale: float = 0.1
    rgb_shift: float = 0.05
    validation_fraction: float = 0.2  # of the split units, stratified by class
    patience: int = 3  # epochs without a better validation loss before stopping
    validation_crops: int = 8  # fixed crops per validation image
    dtype: TrainDtype = "auto"  # auto: bfloat16 autocast on CUDA, float32 on CPU (no bf16 units here)


@dataclass(frozen=True)
class ClassifierConfig:
    """The classifier on rows = augmented images, and how an image's rows become its decision."""

    kind: ClassifierKind = "xgboost"  # the seed study's; "logistic" = standardised logistic regression
    # What the classifier tells apart: the 3 diagnostic groups, or BACH's 4 classes (normal and benign apart);
    # the 3-group answer is always derived from the class answer (data.CLASS_SCHEMES).
    classes: ClassSchemeName = "groups"
    C: float = 0.001  # logistic: inverse L2 strength on standardised features (chosen by nested CV, docs/accuracy.md)
    # XGBoost:
    n_estimators: int = 300
    max_depth: int = 6
    learning_rate: float = 0.05
    subsample: float = 0.8
    # 64 bins and a quarter of the columns per tree: 3.5-4x less time than 256 bins and half the
    # columns, at the same accuracy within noise (experiments/results/classifier_cost.json).
    colsample_bytree: float = 0.25
    max_bin: int = 64
    class_weight: Literal["none", "balanced"] = "none"
    # Stop adding trees when an inner validation part (split off by whole images or patients, never
    # from the test fold) stops improving for this many rounds; 0 = off, train all n_estimators.
    early_stopping_rounds: int = 0
    # The decision (all chosen on training data only, by inner cross-validation grouped like the outer):
    # carcinoma when the mean p(in situ) + p(invasive) reaches the threshold that gives this sensitivity
    # on the inner folds; None (`--decision argmax`) = majority vote over augmentations, as in the seed study.
    # 0.95 by default in every preset: the most probable class misses about half the carcinomas of new patients
    # (docs/accuracy.md, "The default decision").
    target_sensitivity: float | None = 0.95
    calibrate: bool = False  # temperature scaling of the probabilities, fitted on the inner folds
    inner_folds: int = 4
    # "Refer to a pathologist" when fewer than this share of the augmentations agree with the
    # decision, or the stain quality check failed; 0 = only stain failures.
    refer_below_agreement: float = 0.0

    @property
    def decides_by_rule(self) -> bool:
        """Whether images are decided by a fitted rule (threshold, calibration or refer), not only
        by the seed study's majority vote."""
        return self.target_sensitivity is not None or self.calibrate or self.refer_below_agreement > 0


@dataclass(frozen=True)
class EvaluateConfig:
    """Cross-validation protocol."""

    folds: int = 6
    split_by: str | None = None  # image | patient | a manifest column; None = patient when known


@dataclass(frozen=True)
class Config:
    """Everything that determines a histoboost run's results."""

    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    seed: int = 0

    def __post_init__(self) -> None:
        _validate(self)

    # -- JSON round trip -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": SCHEMA_VERSION, **_to_plain(self)}

    def to_json(self, provenance: dict[str, Any] | None = None) -> str:
        """The config as JSON; `provenance` (weights checksums, versions) is written beside the settings
        for the record and ignored when the file is read back."""
        data = self.to_dict() if provenance is None else {**self.to_dict(), "provenance": provenance}
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Config:
        data = dict(data)
        data.pop("provenance", None)
        version = data.pop("schema_version", SCHEMA_VERSION)
        if version != SCHEMA_VERSION:
            raise ConfigError(
                f"config schema version {version} is not the {SCHEMA_VERSION} this histoboost reads: "
                "re-create the config with this version"
            )
        return _from_plain(cls, data, "")

    @classmethod
    def from_json(cls, text: str) -> Config:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"config is not valid JSON ({err})") from None
        if not isinstance(data, dict):
            raise ConfigError("config JSON must be an object")
        return cls.from_dict(data)

    # -- layering --------------------------------------------------------------------------------
    def merged(self, overrides: dict[str, Any]) -> Config:
        """A copy with `overrides` applied: nested dicts, or dotted keys like 'augment.n_crops'."""
        base = self.to_dict()
        for key, value in overrides.items():
            if key == "schema_version":
                continue
            _merge_into(base, key.split("."), value)
        return Config.from_dict(base)

    # -- hashes ----------------------------------------------------------------------------------
    def weights_for(self, backbone: str) -> str | None:
        """The local weights file configured for a backbone, if any."""
        for item in self.features.weights:
            name, sep, path = item.partition("=")
            if sep and name == backbone:
                return path
            if not sep and len(self.features.backbones) == 1:
                return item
        return None

    @property
    def finetune_crop_size(self) -> int:
        """The crop side fine-tuning trains on: its own setting, else the features' crop size."""
        return self.finetune.crop_size or self.augment.crop_size

    def stage_settings(self, stage: Stage) -> dict[str, Any]:
        """The settings that determine a stage's output, upstream stages included."""
        plain = _to_plain(self)
        settings: dict[str, Any] = {"schema_version": SCHEMA_VERSION}
        for section in _STAGE_SECTIONS[stage]:
            settings[section] = plain[section]
        if stage == "features":
            # Only the extraction settings: each backbone is keyed on its own by the feature store, and
            # the descriptor is chosen from what the store holds.
            settings["features"] = {
                k: v for k, v in plain["features"].items() if k not in ("backbones", "descriptor", "weights")
            }
        if stage == "finetune":  # the crop size it trains on, wherever it was set
            settings["finetune"]["crop_size"] = self.finetune_crop_size
        return settings

    def stage_hash(self, stage: Stage) -> str:
        """A stable 16-hex-digit hash of `stage_settings(stage)`."""
        canonical = json.dumps(self.stage_settings(stage), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


Stage = Literal["preprocess", "augment", "features", "finetune", "classifier", "evaluate"]

# Each stage depends on its own section and those upstream of it (the seed drives augmentations,
# fold assignment and the classifier).
_STAGE_SECTIONS: dict[str, tuple[str, ...]] = {
    "preprocess": ("preprocess",),
    "augment": ("preprocess", "augment", "seed"),
    "features": ("preprocess", "augment", "seed", "features"),
    # Fine-tuning reads stain-normalised images (preprocess); its weights then key the feature store
    # through their sha256.
    "finetune": ("preprocess", "seed", "finetune"),
    "classifier": ("preprocess", "augment", "seed", "features", "finetune", "classifier"),
    "evaluate": ("preprocess", "augment", "seed", "features", "finetune", "classifier", "evaluate"),
}

PRESETS: dict[str, dict[str, Any]] = {
    # The seed study: scale 0.5, Macenko, A=40, C=20 crops of 750 px, ResNet50 + Xception, 6 folds.
    "paper": {},
    # CPU demo: the offline backbone, fewer and smaller crops, fewer boosting rounds.
    "quick": {
        "augment": {"n_augment": 12, "n_crops": 12, "crop_size": 384},
        "features": {"backbones": ["efficientnet_lite0"]},
        "classifier": {"n_estimators": 200},
    },
    # The most accurate offline recipe measured on new patients (docs/accuracy.md, BACH's 268 training images split
    # by id_block): EfficientNet-Lite0 at 1.68 µm/px (files that state no µm/px: scale 0.25, BACH's 0.42 µm/px),
    # where a 384 px crop sees 645 µm, logistic regression, and the decision for 95% carcinoma sensitivity
    # (chosen on inner folds of the training data), referring images whose augmentations split: a pathologist's
    # first need is not to miss carcinoma.
    "accurate": {
        "preprocess": {"target_mpp": 1.68, "scale": 0.25},
        "augment": {"n_augment": 12, "n_crops": 12, "crop_size": 384},
        "features": {"backbones": ["efficientnet_lite0"]},
        "classifier": {"kind": "logistic", "C": 0.01, "refer_below_agreement": 0.75},
    },
    # Pathology foundation models (ViTs, docs/backbones.md): each crop is one 224 px tile at 0.5 µm/px, the
    # scale they were trained at (files that state no µm/px are read at --scale, default native), embedded on
    # its own (`exact`: a ViT has no feature map to share); few augmentations, since a ViT-L is 12x and a ViT-g
    # 55x a ResNet50 per tile on a CPU (docs/performance.md): 35 s and 161 s per image on 2 cores.
    "foundation": {
        "preprocess": {"target_mpp": 0.5, "scale": 1.0},
        "augment": {"n_augment": 4, "n_crops": 16, "crop_size": 224},
        "features": {"backbones": ["uni"], "mode": "exact"},
    },
}


def preset(name: str) -> Config:
    """The named preset (`paper`, `quick`, `accurate` or `foundation`)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    return Config().merged(PRESETS[name])


def build_config(
    preset_name: str = "paper",
    config_file_data: dict[str, Any] | None = None,
    overrides: dict[str, Any] | None = None,
) -> Config:
    """Layer settings with the precedence preset < config file < command-line flags."""
    # One merge, checked once: a layer may need the next (a file names a ViT, a flag gives it --mode exact).
    layered = preset(preset_name).to_dict()
    for layer in (config_file_data or {}, {k: v for k, v in (overrides or {}).items() if v is not None}):
        for key, value in layer.items():
            if key != "schema_version":
                _merge_into(layered, key.split("."), value)
    return Config.from_dict(layered)


# -- helpers -------------------------------------------------------------------------------------


def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, tuple):
        return [_to_plain(v) for v in obj]
    return obj


def _from_plain(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"config section {where or 'root'!r} must be an object, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown config key {where + unknown[0]!r}: valid keys here are {', '.join(sorted(names))}")
    kwargs = {name: _coerce(hints[name], value, where + name) for name, value in data.items()}
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, where: str) -> Any:
    """Convert a JSON value to the annotated type, with an error that names the key."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return _from_plain(typing.cast(type, hint), value, where + ".")  # a field annotated with a dataclass
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, where)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"config key {where!r} must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin is tuple:
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {where!r} must be a list, got {value!r}")
        return tuple(_coerce(args[0], v, where) for v in value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key {where!r} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key {where!r} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key {where!r} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key {where!r} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {hint!r} for {where}")  # a programming error


def _merge_into(target: dict[str, Any], path: list[str], value: Any) -> None:
    head, rest = path[0], path[1:]
    if rest:
        node = target.setdefault(head, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config key {head!r} is not a section")
        _merge_into(node, rest, value)
    elif isinstance(value, dict) and isinstance(target.get(head), dict):
        for key, sub in value.items():
            _merge_into(target[head], [key], sub)
    else:
        target[head] = value


def _validate(config: Config) -> None:
    pre, aug, feat = config.preprocess, config.augment, config.features
    checks = [
        (0 < pre.scale <= 4, "preprocess.scale must be in (0, 4]"),
        (pre.target_mpp is None or pre.target_mpp > 0, "preprocess.target_mpp must be positive"),
        (aug.n_augment >= 1, "augment.n_augment must be at least 1"),
        (aug.n_crops >= 1, "augment.n_crops must be at least 1"),
        (aug.crop_size >= 32, "augment.crop_size must be at least 32 pixels"),
        (0 <= aug.rgb_scale < 1 and 0 <= aug.rgb_shift < 1, "augment.rgb_scale and rgb_shift must be in [0, 1)"),
        (0 <= aug.he_scale < 1 and 0 <= aug.he_shift < 1, "augment.he_scale and he_shift must be in [0, 1)"),
        (len(feat.backbones) >= 1, "features.backbones must name at least one backbone"),
        (feat.gem_p > 0, "features.gem_p must be positive"),
        (config.classifier.n_estimators >= 1, "classifier.n_estimators must be at least 1"),
        (config.classifier.early_stopping_rounds >= 0, "classifier.early_stopping_rounds must be 0 (off) or more"),
        (config.classifier.C > 0, "classifier.C must be positive"),
        (1 <= config.features.stages <= 4, "features.stages must be 1 to 4"),
        (
            config.classifier.target_sensitivity is None or 0 < config.classifier.target_sensitivity <= 1,
            "classifier.target_sensitivity must be in (0, 1]",
        ),
        (config.classifier.inner_folds >= 2, "classifier.inner_folds must be at least 2"),
        (0 <= config.classifier.refer_below_agreement <= 1, "classifier.refer_below_agreement must be in [0, 1]"),
        (config.evaluate.folds >= 2, "evaluate.folds must be at least 2"),
        (config.finetune.epochs >= 1, "finetune.epochs must be at least 1"),
        (config.finetune.crops_per_image >= 1, "finetune.crops_per_image must be at least 1"),
        (
            config.finetune.crop_size is None or config.finetune.crop_size >= 32,
            "finetune.crop_size must be at least 32 pixels",
        ),
        (config.finetune.batch_size >= 2, "finetune.batch_size must be at least 2 (batch normalisation)"),
        (config.finetune.learning_rate > 0, "finetune.learning_rate must be positive"),
        (0 <= config.finetune.label_smoothing < 1, "finetune.label_smoothing must be in [0, 1)"),
        (0 <= config.finetune.freeze_stages <= 4, "finetune.freeze_stages must be 0 to 4"),
        (0 < config.finetune.validation_fraction < 1, "finetune.validation_fraction must be in (0, 1)"),
        (config.finetune.patience >= 1, "finetune.patience must be at least 1"),
        (config.finetune.validation_crops >= 1, "finetune.validation_crops must be at least 1"),
        (
            0 <= config.finetune.he_scale < 1
            and 0 <= config.finetune.he_shift < 1
            and 0 <= config.finetune.rgb_scale < 1
            and 0 <= config.finetune.rgb_shift < 1,
            "finetune colour strengths must be in [0, 1)",
        ),
        (config.seed >= 0, "seed must be a non-negative integer"),
    ]
    # Upper bounds and finiteness: a config can come from a shared bundle, and an absurd value must be one
    # line, not hours of work or an exhausted memory.
    clf, ft = config.classifier, config.finetune
    numbers = [
        pre.scale,
        pre.target_mpp or 1.0,
        aug.rgb_scale,
        aug.rgb_shift,
        aug.he_scale,
        aug.he_shift,
        feat.gem_p,
        clf.C,
        clf.learning_rate,
        clf.subsample,
        clf.colsample_bytree,
        ft.learning_rate,
        ft.weight_decay,
        ft.warmup_epochs,
        *(pre.stain.target or ()),
    ]
    checks += [
        (all(math.isfinite(v) for v in numbers), "every number in the config must be finite"),
        (pre.target_mpp is None or 0.05 <= pre.target_mpp <= 20, "preprocess.target_mpp must be 0.05 to 20 µm/px"),
        (aug.n_augment <= 1000 and aug.n_crops <= 1000, "augment.n_augment and n_crops must be at most 1000"),
        (aug.crop_size <= 8192, "augment.crop_size must be at most 8192 pixels"),
        (feat.gem_p <= 100, "features.gem_p must be at most 100"),
        (
            clf.n_estimators <= 100_000 and clf.max_depth <= 64 and clf.max_bin <= 65536,
            "classifier.n_estimators, max_depth or max_bin too large",
        ),
        (config.evaluate.folds <= 100 and clf.inner_folds <= 100, "folds must be at most 100"),
        (
            ft.epochs <= 10_000 and ft.crops_per_image <= 10_000 and ft.batch_size <= 65536,
            "finetune epochs, crops_per_image or batch_size too large",
        ),
        (config.seed < 2**32, "seed must be below 2**32"),
    ]
    stain = pre.stain
    if stain.target is not None:
        expected = {"macenko": 8, "reinhard": 6, "none": 0}[stain.method]
        checks.append(
            (len(stain.target) == expected, f"preprocess.stain.target must have {expected} numbers for {stain.method}")
        )
    for item in feat.weights:
        name, sep, _ = item.partition("=")
        if not sep and len(feat.backbones) > 1:
            checks.append((False, f"weights {item!r} names no backbone: with several, use NAME=PATH"))
        elif sep and name not in feat.backbones:
            checks.append(
                (False, f"weights for {name!r}, which is not among the backbones ({', '.join(feat.backbones)})")
            )
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    # What the backbones allow, refused here so that no caller meets it after work has started.
    problem = settings_problem(feat.backbones, feat.mode, feat.crop_pooling, feat.stages)
    if problem:
        raise ConfigError(problem)
    frozen = [name for name in feat.backbones if is_foundation(name)]
    if config.finetune.enabled and frozen:
        raise ConfigError(
            f"{frozen[0]} is a foundation model: histoboost uses it frozen (its features are already "
            "histology's); drop --finetune"
        )
