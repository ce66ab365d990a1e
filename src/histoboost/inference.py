"""The one inference seam: RGB pixels -> stain normalisation -> views -> features -> class probabilities -> a
decision with its referral reasons.

`Predictor` holds what a trained model is made of (config, backbones, classifier, decision rule) and where it runs
(a `Runtime`), nothing of where it came from: `Bundle` makes one, and images, arrays, held-out sets and whole-slide
tiles are all classified through it. p(carcinoma) and the refer text are computed here and nowhere else.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from . import storage
from .augment import plan_augmentation, plan_augmentations
from .classifier import DecisionRule, mean_decision, vote_counts
from .config import Config
from .data import CLASS_SCHEMES, ClassScheme, ImageRecord, Problem, class_scheme, content_key, working_scale
from .data.images import rescaled
from .errors import DataError, FeatureStoreError, HistoboostError, StainError
from .runtime import Runtime
from .specs import is_foundation
from .stain import FALLBACK_NOTES, fit_macenko

if TYPE_CHECKING:
    from .augment import AugmentPlan
    from .backbones import Backbone
    from .features import FeatureStore, ImageFeatures, PreparedImage

# Pillow modes without colour: such an image is predicted but referred (the classifier learnt H&E colour).
GRAYSCALE_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})


def p_carcinoma(probs: np.ndarray, groups: tuple[int, ...]) -> np.ndarray:
    """p(carcinoma) = p(in situ) + p(invasive): the summed probability of every class of group 1 or 2, over the
    last axis."""
    carcinoma: np.ndarray = np.asarray(probs)[..., np.asarray(groups) > 0].sum(axis=-1)
    return carcinoma


def refer_text(*reasons: str) -> str:
    """Why a pathologist should look, as one text: the non-empty reasons joined by "; "."""
    return "; ".join(filter(None, reasons))


@dataclass(frozen=True)
class TrainingGeometry:
    """The training images' geometry, which whole slides are tiled to match: µm/px (None: not known), the µm/px
    the classifier saw, and their shorter side in pixels."""

    mpp: float | None = None
    working_mpp: float | None = None
    field_px: int | None = None


@dataclass(frozen=True)
class ModelIdentity:
    """Which model this is, for outputs and caches: its sha256 (a bundle's identity), the histoboost that trained it
    and the images it was trained on (content keys)."""

    sha256: str = ""
    histoboost: str = ""
    geometry: TrainingGeometry = field(default_factory=TrainingGeometry)
    training_image_ids: frozenset[str] = frozenset()


@dataclass
class Prediction:
    """One image's result: the same columns as cross-validation's predictions.csv, plus provenance."""

    path: str
    name: str
    image_id: str
    probs: np.ndarray  # (K,) mean probability over augmentations (calibrated where the rule calibrates)
    votes: np.ndarray  # (K,)
    decision: int  # class index, by the decision rule: majority vote, or its carcinoma threshold
    aug_probs: np.ndarray  # (A, K) as the classifier gave them (before calibration)
    agreement: float = 1.0  # share of augmentations that agree with the decision
    refer: str = ""  # why a pathologist should look: "votes split", "stain QC failed", or ""
    stain_qc: str = ""  # the quality check's flags, and the fallback used
    classes: ClassScheme = CLASS_SCHEMES["groups"]
    rule: str = ""  # the decision rule in words (DecisionRule.describe)

    @property
    def p_carcinoma(self) -> float:
        return float(p_carcinoma(self.probs, self.classes.groups))

    def record(self, bundle_sha256: str, bundle_format: int) -> dict[str, Any]:
        """One row: `class` (histoboost's name), `label` (the data set's) and `group` (0-2) of the decision,
        then one probability and vote count per class."""
        scheme = self.classes
        return {
            "path": self.path,
            "name": self.name,
            "image_id": self.image_id,
            "class": scheme.classes[self.decision],
            "label": scheme.labels[self.decision],
            "group": scheme.groups[self.decision],
            "mean_prob_decision": int(mean_decision(self.probs[None, None], scheme.groups)[0]),
            **{f"p_{c}": round(float(p), 6) for c, p in zip(scheme.classes, self.probs)},
            "p_carcinoma": round(self.p_carcinoma, 6),
            **{f"votes_{c}": int(v) for c, v in zip(scheme.classes, self.votes)},
            "agreement": round(self.agreement, 3),
            "refer": self.refer,
            "stain_qc": self.stain_qc,
            "decision_rule": self.rule,
            "bundle_sha256": bundle_sha256,
            "bundle_format": bundle_format,
        }


@dataclass
class Decisions:
    """Many items' decisions (slide tiles): calibrated mean probabilities (N, K), class (N,), agreement of the
    views (N,) and the refer text of each (N,)."""

    probs: np.ndarray
    decision: np.ndarray
    agreement: np.ndarray
    refer: list[str]


class Predictor:
    """A trained model ready to classify: `predict_image(path)`, `predict_array(rgb)`, `score_tiles(tiles)`.

    Every entry runs the same preprocessing, features, classifier and decision rule as training and
    cross-validation, on the runtime's device and batch size."""

    def __init__(
        self,
        config: Config,
        backbones: list[Backbone],
        classifier: Any,
        rule: DecisionRule,
        identity: ModelIdentity = ModelIdentity(),
        runtime: Runtime = Runtime(),
    ):
        self.config = config
        self.backbones = backbones
        self.classifier = classifier
        self.rule = rule
        self.identity = identity
        self.runtime = runtime
        self.classes = class_scheme(config.classifier.classes)
        self._stores: list[FeatureStore] | None = None

    def using(self, runtime: Runtime) -> Predictor:
        """The same model on another runtime (its cache folder, progress or engine; the device it was built on)."""
        return Predictor(self.config, self.backbones, self.classifier, self.rule, self.identity, runtime)

    @property
    def rule_text(self) -> str:
        """The decision rule in words: what predictions state and `train` prints."""
        chosen_on = (
            "the images its fine-tuned backbone never trained on" if self.config.finetune.enabled else "inner folds"
        )
        return self.rule.describe(self.config.classifier.target_sensitivity, chosen_on)

    # -- one image -------------------------------------------------------------------------------------------
    def predict_image(
        self, path: str | Path, image_id: str, mpp: float | None, mode: str = "RGB", want_grid: bool = False
    ) -> tuple[Prediction, np.ndarray | None]:
        """An image file whose content key, µm/px and Pillow mode are known (a validated manifest's, or
        `data.scan_file`'s): its Prediction, and the class-probability grid when asked. Its features come from
        the runtime's feature store when there (an image predicted, evaluated or extracted before), else are
        computed and stored."""
        from .features import prepare_image

        features = None if want_grid else self._stored(image_id, mpp)
        grid = None
        if features is None:
            prepared = prepare_image(path, image_id, mpp, self.config)
            features = self._describe(prepared, image_id, mpp)
            grid = self.probability_grid(prepared.rgb) if want_grid else None
        return self._decided(features, str(path), Path(path).stem, image_id, mode), grid

    def predict_array(self, rgb: np.ndarray, mpp: float | None = None, name: str = "array") -> Prediction:
        """An RGB uint8 array (H, W, 3), or a grayscale one (H, W), as decoded from a file: the same result as the
        file with `predict_image` (and the same stored features). `mpp` is its µm/px (None: states none, like
        BACH's JPEGs)."""
        from .features import prepare_pixels

        rgb, mode = _as_rgb(rgb)
        image_id = content_key(rgb)
        features = self._stored(image_id, mpp)
        if features is None:
            scaled = _rescaled(rgb, working_scale(mpp, self.config.preprocess))
            features = self._describe(prepare_pixels(scaled, image_id, self.config), image_id, mpp)
        return self._decided(features, "", name, image_id, mode)

    def describe_on_engine(self, records: Sequence[ImageRecord]) -> dict[str, Problem]:
        """On the runtime's Dask engine, compute the features of `records` on the workers into the feature store
        first (only those missing), so that predicting them reads them back: the network's work spread as
        `extract` spreads it. Returns the images that could not be described, by content key; nothing to do on a
        local runtime. Workers build each backbone from its name (and weights file, checked by sha256): a model
        whose weights live only in its bundle (fine-tuned) or in the user's file (foundation) is refused."""
        engine = self.runtime.engine
        if engine is None or engine.kind == "local" or not records:
            return {}
        if not self.runtime.feature_cache:
            raise HistoboostError("Dask workers hand features over through the feature store: drop --no-cache")
        if self.config.finetune.enabled or any(is_foundation(b.name) for b in self.backbones):
            raise HistoboostError(
                "this model's backbone weights (fine-tuned into its bundle, or a foundation model's file) are not "
                "sent to Dask workers: run without --engine dask"
            )
        from .data import Manifest
        from .features import extract_features

        lost: dict[str, Problem] = {}
        manifest = Manifest(tuple(records), Path("."), "csv")
        by_path = {Path(r.path).absolute(): r.image_id for r in records}  # workers report absolute paths
        for backbone in self.backbones:
            result = extract_features(manifest, self.config, backbone, self.runtime)
            for problem in result.problems:
                image_id = by_path.get(Path(problem.path).absolute())
                if image_id is not None:
                    lost[image_id] = problem
        return lost

    def _decided(self, features: list[ImageFeatures], path: str, name: str, image_id: str, mode: str) -> Prediction:
        """One image's Prediction from its features under each backbone."""
        raw = self.classifier.predict_proba(self._joined(features))
        decision, agreement = self.rule.decide(raw[None])
        refer = refer_text(
            "votes split" if self.rule.refer(agreement)[0] else "",
            "grayscale, no H&E colour" if mode in GRAYSCALE_MODES else "",
        )
        qc = ""
        if features[0].stain_fallback:  # the stain check failed and was replaced (`stain.normalize_safely`)
            qc = f"{'; '.join(features[0].stain_flags or ())} ({FALLBACK_NOTES[features[0].stain_fallback]})"
            refer = refer_text(refer, "stain QC failed")
        return Prediction(
            path,
            name,
            image_id,
            self.rule.calibrated(raw).mean(axis=0),
            vote_counts(raw[None], self.classes.groups)[0],
            int(decision[0]),
            raw,
            float(agreement[0]),
            refer,
            qc,
            self.classes,
            self.rule_text,
        )

    def _describe(self, prepared: PreparedImage, image_id: str, mpp: float | None) -> list[ImageFeatures]:
        """Each backbone's features of a prepared image, put into the feature store where it has none for it."""
        from .features import describe_image

        out = []
        stores: list[FeatureStore | None] = [*self._feature_stores()] or [None] * len(self.backbones)
        for backbone, store in zip(self.backbones, stores):
            features = prepared.recorded(
                describe_image(
                    prepared.rgb,
                    prepared.plans,
                    backbone,
                    self.config,
                    self.runtime.device,
                    self.runtime.batch,
                    prepared.stain_fit,
                )
            )
            if store is not None:
                self._store_new(store, store.entry_for(image_id, mpp), features)
            out.append(features)
        return out

    def _store_new(self, store: FeatureStore, entry: str, features: ImageFeatures) -> None:
        """Save an entry the store lacks (one already there, e.g. `extract --keep-crops`'s, is left as it is)."""
        if storage.exists(store.path(entry)):
            return
        try:
            store.save(entry, features)
        except FeatureStoreError as err:  # a full disk: this prediction stands, the next ones go uncached
            self._without_store(err)

    def _stored(self, image_id: str, mpp: float | None) -> list[ImageFeatures] | None:
        """The image's features under every backbone from the feature store, or None if one is missing (or was
        stored before stain flags were recorded, for an image whose stain check failed)."""
        stores = self._feature_stores()
        if not stores:
            return None
        found = [store.load(store.entry_for(image_id, mpp)) for store in stores]
        if any(f is None or (f.stain_fallback and f.stain_flags is None) for f in found):
            return None
        return cast("list[ImageFeatures]", found)

    def _feature_stores(self) -> list[FeatureStore]:
        """The stores of this model's backbones and feature settings (those `extract` and `cv` fill), opened once;
        none when the runtime keeps no features."""
        if not self.runtime.feature_cache:
            return []
        if self._stores is None:
            from .features import FeatureStore, default_cache_dir

            root = self.runtime.cache_dir or default_cache_dir()
            try:
                self._stores = [FeatureStore.open(root, self.config, b) for b in self.backbones]
            except FeatureStoreError as err:  # a read-only home: predictions need no store, only go uncached
                self._without_store(err)
        return self._stores or []

    def _without_store(self, err: FeatureStoreError) -> None:
        """Go on without the feature store, said once: it saves work, predictions never depend on it."""
        warnings.warn(f"{err}; predicting without the feature store", stacklevel=3)
        self._stores = []

    def _rows(self, rgb: np.ndarray, plans: list[AugmentPlan], stain_fit: Any) -> np.ndarray:
        """The classifier's input rows (A, D) of one stain-normalised image under its augmentation plans."""
        from .features import describe_image

        runtime = self.runtime
        return self._joined(
            [
                describe_image(rgb, plans, b, self.config, runtime.device, runtime.batch, stain_fit)
                for b in self.backbones
            ]
        )

    def _joined(self, features: list[ImageFeatures]) -> np.ndarray:
        """The classifier's rows: each backbone's descriptors side by side."""
        kind = self.config.features.descriptor
        return np.concatenate([f.descriptor(kind) for f in features], axis=1)

    # -- many tiles ------------------------------------------------------------------------------------------
    def score_tiles(self, tiles: list[np.ndarray], keys: list[str], augmentations: int) -> np.ndarray:
        """Class probabilities (B, A, K) of stain-normalised tiles of one size: one batched forward per backbone
        for a single un-augmented view each (`augmentations` 0), or each tile's A augmentations as an image's."""
        config, (h, w) = self.config, tiles[0].shape[:2]
        if augmentations == 0:  # one view: the tile itself, with its own seeded crops
            return self.score_rows(self.describe_tiles(tiles, keys))
        wanted = replace(config.augment, n_augment=augmentations)
        out = []
        for rgb, key in zip(tiles, keys):
            plans = plan_augmentations(key, h, w, wanted, config.seed)
            fit = None
            if wanted.color == "he":
                try:
                    fit = fit_macenko(rgb)
                except StainError:  # too little stain to move in H&E space: this tile's views vary only by crop
                    plans = [replace(p, color="none") for p in plans]
            out.append(self.classifier.predict_proba(self._rows(rgb, plans, fit)))
        return np.stack(out)

    def describe_tiles(self, tiles: list[np.ndarray], keys: list[str]) -> np.ndarray:
        """The classifier's rows (B, D) of stain-normalised tiles of one size, a single un-augmented view each
        (with its tile's seeded crops): one batched forward per backbone. What `slide --features h5` writes."""
        import torch

        from .features import ImageFeatures, autocast, describe_views

        config, device, batch = self.config, self.runtime.device, self.runtime.batch
        h, w = tiles[0].shape[:2]
        plain = replace(config.augment, color="none", orientation="none")
        boxes = [plan_augmentation(key, 0, h, w, plain, config.seed).boxes for key in keys]
        views = torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2).to(device=device, dtype=torch.float32)
        described = []
        with torch.inference_mode(), autocast(device, config.features.dtype):
            for backbone in self.backbones:
                _, pooled, whole = describe_views(views, boxes, backbone, config, batch)
                described.append(ImageFeatures(pooled.float().cpu().numpy(), whole.float().cpu().numpy()))
        return self._joined(described)

    def score_rows(self, rows: np.ndarray) -> np.ndarray:
        """Class probabilities (B, 1, K) of single-view rows (`describe_tiles`)."""
        single: np.ndarray = self.classifier.predict_proba(rows)[:, None, :]
        return single

    def decide(self, raw: np.ndarray, stain_notes: list[str] | np.ndarray) -> Decisions:
        """Decisions of N items from their views' raw probabilities (N, A, K); a non-empty stain note (the fallback
        a failed stain check used) refers its item."""
        decision, agreement = self.rule.decide(raw)
        refer = [
            refer_text("votes split" if split else "", f"stain QC failed ({note})" if note else "")
            for split, note in zip(self.rule.refer(agreement), stain_notes)
        ]
        return Decisions(self.rule.calibrated(raw).mean(axis=1), decision, agreement, refer)

    # -- where in the image ----------------------------------------------------------------------------------
    def probability_grid(self, rgb: np.ndarray) -> np.ndarray:
        """Class probabilities (h, w, K) of each cell of the un-augmented image: the classifier applied to
        single feature-map cells (CNNs) or to single crop-sized tiles (when a ViT is among the backbones).
        Exploratory: it was trained on vectors pooled over crops."""
        import torch

        device = self.runtime.device
        maps = []
        with torch.inference_mode():
            x = torch.from_numpy(rgb).permute(2, 0, 1)[None].float().to(device)
            if all(b.has_maps for b in self.backbones):
                for backbone in self.backbones:
                    stage_maps = backbone.feature_maps(x, self.config.features.stages)
                    height, width = stage_maps[0][0].shape[2:]  # finer stages averaged onto the final map's cells
                    maps.append(
                        torch.cat(
                            [
                                torch.nn.functional.adaptive_avg_pool2d(m.float(), (int(height), int(width)))
                                for m, _ in stage_maps
                            ],
                            dim=1,
                        )[0]
                        .cpu()
                        .numpy()
                    )
            else:
                maps = self._tile_maps(x[0])
        h, w = maps[0].shape[1:]
        cells = []
        for fmap in maps:
            cell = fmap.reshape(fmap.shape[0], -1).T  # (h*w, D)
            cells.append(
                np.concatenate([cell, cell], axis=1) if self.config.features.descriptor == "crops+whole" else cell
            )
        grid: np.ndarray = self.classifier.predict_proba(np.concatenate(cells, axis=1)).reshape(h, w, -1)
        return grid

    def _tile_maps(self, x: Any, batch_size: int = 8) -> list[np.ndarray]:
        """Each backbone's embedding of crop-sized tiles covering the image (3, H, W): (D, rows, cols) each."""
        import torch

        size = self.config.augment.crop_size
        height, width = x.shape[1:]
        rows, cols = -(-height // size), -(-width // size)  # enough tiles to cover the image; the last ones
        ys = np.linspace(0, height - size, rows).round().astype(int)  # flush with the edge, overlapping a little
        xs = np.linspace(0, width - size, cols).round().astype(int)
        tiles = torch.stack([x[:, y : y + size, x0 : x0 + size] for y in ys for x0 in xs])
        return [
            torch.cat([b.embed(chunk, self.config.features.stages) for chunk in torch.split(tiles, batch_size)])
            .T.reshape(-1, rows, cols)
            .cpu()
            .numpy()
            for b in self.backbones
        ]


def _as_rgb(array: np.ndarray) -> tuple[np.ndarray, str]:
    """An RGB uint8 (H, W, 3) array and the Pillow mode it came as: grayscale (H, W) is spread to three channels,
    as decoding a grayscale file does."""
    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise DataError(
            f"an image array must be uint8 (as np.asarray(PIL.Image.open(f)) gives), not {array.dtype}: "
            "convert it with .astype(np.uint8) after scaling to 0-255"
        )
    if array.ndim == 2:
        return np.repeat(array[..., None], 3, axis=2), "L"
    if array.ndim == 3 and array.shape[2] == 3:
        return np.ascontiguousarray(array), "RGB"
    raise DataError(
        f"an image array must be (H, W, 3) RGB or (H, W) grayscale, not {array.shape}: drop an alpha "
        "channel with rgb[..., :3]"
    )


def _rescaled(rgb: np.ndarray, scale: float) -> np.ndarray:
    """The pixels at the working scale, resized as `data.read_image` resizes a file's."""
    if scale == 1.0:
        return rgb
    from PIL import Image

    return np.asarray(rescaled(Image.fromarray(rgb), scale), dtype=np.uint8).copy()
