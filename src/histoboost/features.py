"""Frozen-network descriptors of augmented images, and the feature store that caches them per image.

For each image: decode, scale and stain-normalise once; make its A colour augmentations on the device;
describe its C crops per augmentation, either by running the network on each crop (`exact`, the
reference, and the only mode for ViTs) or by running a CNN once per augmented image and
average-pooling the final feature map inside each crop's window (`shared`, region-of-interest pooling
at the network's stride). The crop descriptors are pooled into one vector per augmented image; the
whole view's descriptor is stored beside it. One image's augmentations are one batch unit, so results
never depend on other images.
"""

from __future__ import annotations

import io
import json
import os
import platform
import re
import shutil
import time
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torchvision.ops import roi_align

from . import storage
from .augment import AugmentPlan, augment_batch, plan_augmentations
from .backbones import Backbone
from .config import Config, PreprocessConfig
from .data import ImageRecord, Manifest, Problem, read_image, working_scale
from .errors import DataError, FeatureStoreError, HistoboostError
from .runtime import Runtime
from .specs import settings_problem
from .stain import STAIN_FAILURE_FIX, StainError, StainFit, StainQC, fit_macenko, normalize_safely
from .version import __version__

_STORE_NAME = re.compile(r"^[A-Za-z0-9_.-]+-[0-9a-f]{16}$")
# 2: images keyed by the content key of their decoded pixels, not their file bytes;
# 3: a store is keyed by the backbone's spec sha256 and timm's version too
STORE_FORMAT = 3
T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class ImageFeatures:
    """Descriptors of one image's A augmentations."""

    pooled: np.ndarray  # (A, D) float32: crop descriptors pooled per augmentation
    whole: np.ndarray  # (A, D) float32: the whole feature map pooled per augmentation
    crops: np.ndarray | None = None  # (A, C, D) float16 crop descriptors, when kept (heat maps)
    boxes: np.ndarray | None = None  # (A, C, 4) crop boxes, with `crops`
    stain_fallback: str = ""  # what replaced a normalisation that failed its quality check, if any
    stain_flags: tuple[str, ...] | None = None  # why it failed the check; None: not recorded (stores before 0.9)

    def descriptor(self, kind: str) -> np.ndarray:
        """The (A, D') rows the classifier sees: `crops`, `whole` or `crops+whole`."""
        parts = {"crops": [self.pooled], "whole": [self.whole], "crops+whole": [self.pooled, self.whole]}[kind]
        return np.concatenate(parts, axis=1)


# -- preparing one image ----


@dataclass(frozen=True)
class PreparedImage:
    """One image at the working resolution, stain-normalised, with its augmentation plans."""

    rgb: np.ndarray
    qc: StainQC | None
    plans: list[AugmentPlan]
    stain_fit: StainFit | None  # the normalised image's stains, for H&E-space augmentation
    stain_fallback: str = ""  # "reinhard", "none" (un-normalised) or "kept" after a failed check

    def recorded(self, features: ImageFeatures) -> ImageFeatures:
        """`features` of this image with its stain check's outcome, as the store keeps them."""
        flags = self.qc.flags if self.qc is not None else ()
        return replace(features, stain_fallback=self.stain_fallback, stain_flags=flags)


def prepare_image(path: str | Path, image_id: str, mpp: float | None, config: Config) -> PreparedImage:
    """Decode, scale, stain-normalise and plan one image: the one preprocessing that training,
    cross-validation and prediction share. Raises StainError, or DataError for an image too small."""
    return prepare_pixels(read_image(path, working_scale(mpp, config.preprocess)), image_id, config)


def prepare_pixels(rgb: np.ndarray, image_id: str, config: Config) -> PreparedImage:
    """`prepare_image` of pixels already at the working resolution (an array given in Python)."""
    if min(rgb.shape[:2]) < config.augment.crop_size:
        raise DataError(
            f"too small: {rgb.shape[1]}x{rgb.shape[0]} px at the working scale, smaller than the "
            f"{config.augment.crop_size} px crop"
        )
    normalised, qc, fallback = normalize_safely(rgb, config.preprocess.stain)
    plans = plan_augmentations(image_id, rgb.shape[0], rgb.shape[1], config.augment, config.seed)
    return PreparedImage(
        normalised, qc, plans, fit_macenko(normalised) if config.augment.color == "he" else None, fallback
    )


# -- describing one image ------------------------------------------------------------------------


def describe_image(
    image: np.ndarray,
    plans: list[AugmentPlan],
    backbone: Backbone,
    config: Config,
    device: str | torch.device = "cpu",
    batch_size: int = 8,
    stain_fit=None,
    keep_crops: bool = False,
) -> ImageFeatures:
    """Descriptors of one stain-normalised RGB uint8 image (H, W, 3) under its augmentation plans."""
    feat = config.features
    base = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).to(device)
    pooled, whole, crops = [], [], []
    with torch.inference_mode(), autocast(device, feat.dtype):
        for chunk in _chunks(plans, batch_size):
            crop_desc, pooled_desc, whole_desc = describe_views(
                augment_batch(base, chunk, stain_fit), [p.boxes for p in chunk], backbone, config, batch_size
            )
            crops.append(crop_desc)
            pooled.append(pooled_desc)
            whole.append(whole_desc)
    crop_array = torch.cat(crops).cpu().numpy()
    return ImageFeatures(
        pooled=torch.cat(pooled).cpu().numpy().astype(np.float32),
        whole=torch.cat(whole).cpu().numpy().astype(np.float32),
        crops=crop_array.astype(np.float16) if keep_crops else None,
        boxes=np.stack([p.boxes for p in plans]) if keep_crops else None,
    )


def describe_views(
    batch: torch.Tensor, boxes: list[np.ndarray], backbone: Backbone, config: Config, batch_size: int = 8
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Descriptors of a batch of views (B, 3, H, W) float in [0, 255], each with its own crop boxes:
    crops (B, C, D), crops pooled (B, D) and the whole view (B, D). The views may be one image's
    augmentations or different images (a slide's tiles); call inside inference mode."""
    feat = config.features
    problem = settings_problem([backbone.name], feat.mode, feat.crop_pooling, feat.stages)
    if problem:
        raise HistoboostError(problem)
    if feat.mode == "shared":
        maps = [(m.float(), stride) for m, stride in backbone.feature_maps(batch, feat.stages)]
        crop_desc = torch.cat([roi_pool(m, boxes, stride) for m, stride in maps], dim=2)
        whole = torch.cat([m.mean(dim=(2, 3)) for m, _ in maps], dim=1)
    else:
        crop_desc = torch.stack(
            [_exact_crops(backbone, view, b, batch_size, feat.stages) for view, b in zip(batch, boxes)]
        )
        # A ViT sees the whole view at its input size: a low-resolution overview (as eva's BACH protocol).
        whole = backbone.embed(batch, feat.stages)
    return crop_desc, pool_crops(crop_desc, feat.crop_pooling, feat.gem_p), whole


def roi_pool(fmap: torch.Tensor, boxes: list[np.ndarray], stride: int) -> torch.Tensor:
    """Average of the feature map (B, D, h, w) inside each pixel box: (B, C, D).

    `roi_align` with one output bin and adaptive sampling averages bilinear samples about one per
    feature cell across the window; `aligned=True` puts pixel box edges on the right cell centres.
    """
    rois = torch.cat(
        [
            torch.cat([torch.full((len(b), 1), float(i)), torch.as_tensor(b, dtype=torch.float32)], dim=1)
            for i, b in enumerate(boxes)
        ]
    ).to(fmap.device)
    out = roi_align(fmap, rois, output_size=1, spatial_scale=1.0 / stride, sampling_ratio=-1, aligned=True)
    return out.view(len(boxes), -1, fmap.shape[1])


def pool_crops(crops: torch.Tensor, how: str, p: float = 3.0) -> torch.Tensor:
    """Pool crop descriptors (B, C, D) over the crops: mean, max or generalised mean (GeM)."""
    if how == "mean":
        return crops.mean(dim=1)
    if how == "max":
        return crops.amax(dim=1)
    return crops.clamp(min=1e-6).pow(p).mean(dim=1).pow(1.0 / p)


def _exact_crops(
    backbone: Backbone, view: torch.Tensor, boxes: np.ndarray, batch_size: int, stages: int = 1
) -> torch.Tensor:
    """The network on every crop of one augmented view (3, H, W), each crop embedded on its own: (C, D)."""
    out = []
    for chunk in _chunks(list(boxes), batch_size):
        batch = torch.stack([view[:, y0:y1, x0:x1] for x0, y0, x1, y1 in chunk])
        out.append(backbone.embed(batch, stages).float())
    return torch.cat(out)


def autocast(device: str | torch.device, dtype: str):
    """bfloat16 autocast on `device` when the features are configured for it, else a no-op context."""
    device_type = torch.device(device).type
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")


def _chunks(items: list[T], size: int) -> Iterator[list[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# -- the feature store ---------------------------------------------------------------------------


def default_cache_dir() -> Path | str:
    """$HISTOBOOST_CACHE (a folder or an fsspec URL), else $XDG_CACHE_HOME/histoboost, else ~/.cache/histoboost."""
    if os.environ.get("HISTOBOOST_CACHE"):
        return storage.location(os.environ["HISTOBOOST_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "histoboost"


class FeatureStore:
    """One folder per (backbone, weights, feature settings), one `.npz` file per image content key."""

    def __init__(self, root: Path | str, meta: dict, preprocess: PreprocessConfig | None = None):
        self.root = root
        self.meta = meta
        self.preprocess = preprocess

    def entry(self, record: ImageRecord) -> str:
        """The name a manifest image's features are stored under (`entry_for`)."""
        return self.entry_for(record.image_id, record.mpp)

    def entry_for(self, image_id: str, mpp: float | None) -> str:
        """The name an image's features are stored under: its content key, plus its working scale where
        the file's own resolution sets it (the same pixels stated at another µm/px give other features)."""
        if self.preprocess is None or self.preprocess.target_mpp is None or mpp is None:
            return image_id
        return f"{image_id}-at-{working_scale(mpp, self.preprocess):.6g}"

    @property
    def key(self) -> str:
        return storage.name_of(self.root)

    @classmethod
    def open(cls, cache_dir: str | Path, config: Config, backbone: Backbone) -> FeatureStore:
        """The store for these settings, created if new; refuses one whose index disagrees. `cache_dir` may be an
        fsspec URL (`s3://bucket/cache`): then each image's features are one object, put once."""
        import timm

        settings = {
            "format": STORE_FORMAT,
            "backbone": backbone.identity,
            "timm": timm.__version__,
            "settings": config.stage_settings("features"),
        }
        key = _hash(settings)
        root = storage.join(storage.location(cache_dir), "features", f"{backbone.name}-{key}")
        index = storage.join(root, "index.json")
        if storage.exists(index):
            found = read_index(index)
            if {k: found.get(k) for k in settings} != settings:
                raise FeatureStoreError(
                    f"{root} holds features made with other settings than its name says: "
                    f"delete it (histoboost cache prune --key {storage.name_of(root)}) to re-extract"
                )
            if not storage.is_url(index):
                try:
                    os.utime(index)  # "last used", for `cache list` and `cache prune --older-than`
                except OSError:  # a read-only store (shared, mounted) is still good for reading
                    pass
            return cls(root, found, config.preprocess)
        meta = {
            **settings,
            "key": storage.name_of(root),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "versions": library_versions(),
        }
        try:
            storage.make_folder(root)
            storage.write_bytes(index, (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode())
        except OSError as err:
            raise FeatureStoreError(
                f"{root}: cannot create the feature store ({err.strerror or err}): give a writable --cache-dir"
            ) from None
        return cls(root, meta, config.preprocess)

    def path(self, image_id: str) -> Path | str:
        return storage.join(self.root, f"{image_id}.npz")

    def load(self, image_id: str) -> ImageFeatures | None:
        """The stored features, or None when absent, truncated or with any bit flipped (then they are
        recomputed): every member's CRC is checked, since np.load alone may stop short of it."""
        try:
            data = storage.read_bytes(self.path(image_id))
            if data is None:
                return None
            raw = io.BytesIO(data)
            with zipfile.ZipFile(raw) as archive:
                if archive.testzip() is not None:
                    return None
            raw.seek(0)
            with np.load(raw) as arrays:
                crops, boxes = arrays.get("crops"), arrays.get("boxes")  # NpzFile is a Mapping
                fallback = str(arrays["stain_fallback"]) if "stain_fallback" in arrays else ""
                flags = tuple(map(str, arrays["stain_flags"])) if "stain_flags" in arrays else None
                return ImageFeatures(arrays["pooled"], arrays["whole"], crops, boxes, fallback, flags)
        except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile, zlib.error):  # damaged: recompute
            return None

    def has(self, image_id: str, need_crops: bool = False) -> bool:
        """Whether usable features are stored (a missing or damaged file counts as absent)."""
        stored = self.load(image_id)
        return stored is not None and (stored.crops is not None or not need_crops)

    def save(self, image_id: str, features: ImageFeatures) -> None:
        """Publish one image's features at once (`storage.write_bytes`): readers on any machine see the whole
        file or none."""
        arrays = {
            "pooled": features.pooled,
            "whole": features.whole,
            "stain_fallback": np.array(features.stain_fallback),
        }
        if features.stain_flags is not None:
            arrays["stain_flags"] = np.array(features.stain_flags, dtype=str)
        if features.crops is not None and features.boxes is not None:  # kept together
            arrays.update(crops=features.crops, boxes=features.boxes)
        try:
            storage.write_npz(self.path(image_id), arrays)
        except OSError as err:  # disk full, read-only: what was stored before stays
            raise FeatureStoreError(
                f"{self.root}: cannot store features ({err.strerror or err}): free space or give "
                "a writable --cache-dir; rerun to resume"
            ) from None


def read_index(index: Path | str) -> dict:
    """A store's index.json; one clear line when it is damaged."""
    try:
        found = json.loads(storage.read_bytes(index) or b"")
    except (ValueError, OSError):  # not JSON, not UTF-8, unreadable
        found = None
    if not isinstance(found, dict):
        raise FeatureStoreError(f"{index}: damaged index; delete its folder to re-extract")
    return found


def _stores(cache_dir: str | Path) -> list[Path]:
    """The feature stores under a cache: folders under features/ named `<backbone>-<16 hex digits>` that
    hold an index.json; nothing else there is ever listed or touched."""
    base = storage.local_folder(cache_dir, "cache list and prune") / "features"
    if not base.is_dir():
        return []
    return sorted(
        p for p in base.iterdir() if _STORE_NAME.match(p.name) and p.is_dir() and (p / "index.json").is_file()
    )


def _is_ours(root: Path) -> bool:
    """Whether a store's index is histoboost's own for this folder (its key is the folder's name)."""
    try:
        return read_index(root / "index.json").get("key") == root.name
    except FeatureStoreError:
        return False


def list_stores(cache_dir: str | Path) -> list[dict]:
    """Every feature store under the cache: key, backbone, settings, images, bytes, last use."""
    stores = []
    for root in _stores(cache_dir):
        index = root / "index.json"
        try:
            meta = read_index(index)
        except FeatureStoreError:
            meta = {"damaged": True}
        stats = [f.stat() for f in [index, *root.glob("*.npz")] if not f.name.startswith(".") and f.exists()]
        stores.append(
            {
                "key": root.name,
                "path": str(root),
                "backbone": meta.get("backbone", {}).get("name", "damaged index"),
                "images": len(stats) - 1,
                "bytes": sum(st.st_size for st in stats[1:]),
                "last_used": time.strftime("%Y-%m-%d %H:%M", time.localtime(max(st.st_mtime for st in stats))),
                "settings": meta.get("settings", {}),
            }
        )
    return stores


def prune_stores(
    cache_dir: str | Path, keys: Iterable[str] = (), older_than_days: float | None = None, everything: bool = False
) -> list[str]:
    """Delete the named stores, those unused for `older_than_days`, or all, and clear temporary files of dead
    writers; a store that a live run holds a lease on is kept. Only histoboost's stores (see `_stores` and
    `_is_ours`) are ever touched: a store whose index is damaged or not histoboost's is left for the user to delete.
    Returns what was removed."""
    removed = []
    now = time.time()
    keys = set(keys)
    for root in filter(_is_ours, _stores(cache_dir)):
        storage.clear_abandoned(root)
        if storage.foreign_lease(root):  # a run here or on another machine is writing into it now
            if everything or root.name in keys:
                warnings.warn(
                    f"{root}: kept: a run is writing into it (a fresh lease); prune it when that run ends", stacklevel=2
                )
            continue
        last = max(f.stat().st_mtime for f in [root / "index.json", *root.glob("*.npz")])
        stale = older_than_days is not None and now - last > older_than_days * 86400
        if everything or root.name in keys or stale:
            shutil.rmtree(root)
            removed.append(root.name)
    return removed


# -- extracting a data set -----------------------------------------------------------------------


@dataclass
class ExtractResult:
    """What `extract_features` did for one backbone."""

    store: FeatureStore
    computed: int = 0
    reused: int = 0
    seconds: float = 0.0
    problems: list[Problem] = field(default_factory=list)
    stain_qc: dict[str, StainQC] = field(default_factory=dict)

    @property
    def images_per_second(self) -> float:
        return self.computed / self.seconds if self.seconds else 0.0


def extract_features(
    manifest: Manifest,
    config: Config,
    backbone: Backbone,
    runtime: Runtime | None = None,
    keep_crops: bool = False,
    shard: tuple[int, int] | None = None,
) -> ExtractResult:
    """Describe every image of the manifest (or of its `shard` K of N) not yet in the runtime's store; each result
    is saved as soon as it is computed, so an interrupted run resumes where it stopped. On the runtime's Dask
    engine, chunks of images are tasks: workers read the files by path and write into the store, and return only
    small records."""
    from .engine import shard_of
    from .progress import meter

    runtime = runtime or Runtime()
    device, batch_size, progress, engine = runtime.device, runtime.batch, runtime.progress, runtime.engine
    store = FeatureStore.open(runtime.cache_dir or default_cache_dir(), config, backbone)
    storage.clear_abandoned(store.root)
    result = ExtractResult(store)
    records = shard_of(manifest.records, shard, lambda r: r.image_id) if shard else list(manifest.records)
    todo = [r for r in records if not store.has(store.entry(r), keep_crops)]
    result.reused = len(records) - len(todo)

    def tally(outcome: ImageOutcome) -> None:
        if outcome.problem is not None:
            result.problems.append(outcome.problem)
        else:
            result.computed += 1
            if outcome.qc is not None:
                result.stain_qc[outcome.image_id] = outcome.qc
        bar.update(1)

    start = time.perf_counter()
    bar = meter(f"{backbone.name} features", len(records), "img", progress, initial=result.reused)
    with storage.Lease(store.root):  # for the whole run: prune elsewhere keeps the store while workers write
        _extract(todo, config, backbone, store, device, batch_size, keep_crops, engine, tally)
    bar.close()
    storage.clear_abandoned(store.root)
    result.seconds = time.perf_counter() - start
    return result


def _extract(
    todo: list[ImageRecord],
    config: Config,
    backbone: Backbone,
    store: FeatureStore,
    device,
    batch_size: int,
    keep_crops: bool,
    engine,
    tally: Callable[[ImageOutcome], None],
) -> None:
    """`extract_features`' work: in this process, or as chunks of images on the engine's workers."""
    from .engine import EngineError, TaskLost

    if engine is None or engine.kind == "local":
        extract_records(todo, config, backbone, store, device, batch_size, keep_crops, on_outcome=tally)
    else:
        # Workers may run elsewhere, in another folder: every path they get is absolute.
        configured = config.weights_for(backbone.name)
        weights = Path(configured).absolute() if configured is not None else None
        root = store.root if storage.is_url(store.root) else Path(store.root).absolute()
        todo = [replace(r, path=Path(r.path).absolute()) for r in todo]
        size = max(1, min(16, -(-len(todo) // (4 * max(1, engine.workers)))))
        tasks = [
            ExtractTask(
                tuple(chunk),
                config,
                backbone.name,
                weights,
                root,
                store.meta,
                str(device),
                batch_size,
                keep_crops,
                engine.threads,
            )
            for chunk in _chunks(todo, size)
        ]
        lost, finished = [], 0
        for task, outcomes in engine.map(extract_task, tasks, split=ExtractTask.one_image_each):
            if isinstance(outcomes, TaskLost):  # only ever a one-image task: the image kills its workers
                lost += [
                    ImageOutcome(r.image_id, problem=Problem(r.path, f"not described: {outcomes.reason}", POISON_FIX))
                    for r in task.records
                ]
                continue
            finished += 1
            for outcome in outcomes:
                tally(outcome)
        if len(lost) > 1 and not finished:  # not every image is poison: the workers cannot hold the work
            raise EngineError(f"every task's worker died ({len(lost)} images): {engine.memory_note()}")
        for outcome in lost:
            tally(outcome)


POISON_FIX = "check the file (histoboost inspect), convert it, or leave it out of the data set"


@dataclass(frozen=True)
class ImageOutcome:
    """What one image's extraction came to: small enough to return from a worker instead of its features."""

    image_id: str
    problem: Problem | None = None
    qc: StainQC | None = None


def extract_records(
    records: list[ImageRecord],
    config: Config,
    backbone: Backbone,
    store: FeatureStore,
    device: str | torch.device = "cpu",
    batch_size: int = 8,
    keep_crops: bool = False,
    on_outcome: Callable[[ImageOutcome], None] | None = None,
) -> list[ImageOutcome]:
    """Describe `records` into `store`, saving each image as soon as it is done. Decoding runs a thread ahead of
    the network."""

    def prepare(record: ImageRecord) -> tuple[ImageRecord, PreparedImage | StainError | DataError]:
        """In a thread, while the CNN runs on the previous image."""
        try:
            return record, prepare_image(record.path, record.image_id, record.mpp, config)
        except (StainError, DataError) as err:  # this image's problem: the others go on
            return record, err

    outcomes = []
    with storage.Lease(store.root):
        for record, prepared in prefetch(prepare, records):
            if isinstance(prepared, (StainError, DataError)):
                fix = STAIN_FAILURE_FIX if isinstance(prepared, StainError) else "check the image or leave it out"
                outcome = ImageOutcome(record.image_id, Problem(record.path, str(prepared), fix))
            else:
                features = describe_image(
                    prepared.rgb, prepared.plans, backbone, config, device, batch_size, prepared.stain_fit, keep_crops
                )
                store.save(store.entry(record), prepared.recorded(features))
                outcome = ImageOutcome(record.image_id, qc=prepared.qc)
            outcomes.append(outcome)
            if on_outcome is not None:
                on_outcome(outcome)
    return outcomes


@dataclass(frozen=True)
class ExtractTask:
    """One engine task: a chunk of images to describe on a worker into the store the client opened (its root and
    meta), with the backbone named (built on the worker) and the client's device, batch and threads."""

    records: tuple[ImageRecord, ...]
    config: Config
    backbone: str
    weights: Any
    store_root: Any
    store_meta: dict
    device: str
    batch_size: int
    keep_crops: bool
    threads: int

    def one_image_each(self) -> list[ExtractTask]:
        """The chunk split into one task per image, to find an image that kills its workers ([] if one already)."""
        return [replace(self, records=(record,)) for record in self.records] if len(self.records) > 1 else []


def extract_task(task: ExtractTask) -> list[ImageOutcome]:
    """Run an `ExtractTask` on a worker. The worker's backbone is built once per process; the threads are checked,
    since the features' bytes depend on them."""
    from .backbones import create_backbone
    from .engine import check_threads, process_resource

    check_threads(task.threads)
    backbone = process_resource(
        ("backbone", task.backbone, str(task.weights), task.device),
        lambda: create_backbone(task.backbone, task.weights, task.device),
    )
    wanted = task.store_meta["backbone"]
    if (backbone.weights_sha256, backbone.spec_sha256) != (wanted["weights_sha256"], wanted["spec_sha256"]):
        raise FeatureStoreError(
            f"{task.backbone} on this worker has weights sha256 {backbone.weights_sha256[:12]}…, the store "
            f"{task.store_root} holds features of {wanted['weights_sha256'][:12]}…: give the workers the same weights"
        )
    store = FeatureStore(task.store_root, task.store_meta, task.config.preprocess)
    # A task run again (its worker died) skips what its first run stored: nothing is done twice.
    todo = [r for r in task.records if not store.has(store.entry(r), task.keep_crops)]
    done = [ImageOutcome(r.image_id) for r in task.records if r not in todo]
    return done + extract_records(todo, task.config, backbone, store, task.device, task.batch_size, task.keep_crops)


@dataclass
class DatasetFeatures:
    """One backbone's rows for a whole data set: (N * A, D') features and each row's image index."""

    backbone: Backbone
    extraction: ExtractResult
    X: np.ndarray
    owners: np.ndarray
    stain_fallbacks: list[str] = field(default_factory=list)  # per manifest image, "" where none

    @property
    def provenance(self) -> dict:
        e = self.extraction
        return {
            **self.backbone.identity,
            "store": str(e.store.root),
            "computed": e.computed,
            "reused": e.reused,
            "seconds": round(e.seconds, 2),
        }


def describe_dataset(manifest: Manifest, config: Config, runtime: Runtime | None = None) -> list[DatasetFeatures]:
    """Each configured backbone's features for every image, extracting only what the runtime's store lacks.
    Raises DataError listing the images that could not be described."""
    from .backbones import create_backbone

    runtime = runtime or Runtime()
    out = []
    for name in config.features.backbones:
        backbone = create_backbone(name, config.weights_for(name), runtime.device)
        result = extract_features(manifest, config, backbone, runtime)
        if result.problems:
            raise DataError(
                f"{len(result.problems)} image(s) could not be described with {name}", tuple(result.problems)
            )
        X, owners, fallbacks = _load_rows(manifest, result.store, config.features.descriptor)
        out.append(DatasetFeatures(backbone, result, X, owners, fallbacks))
    return out


def load_matrix(manifest: Manifest, store: FeatureStore, descriptor: str) -> tuple[np.ndarray, np.ndarray]:
    """Rows = augmented images: features (N * A, D') and the manifest index of each row."""
    X, owners, _ = _load_rows(manifest, store, descriptor)
    return X, owners


def _load_rows(manifest: Manifest, store: FeatureStore, descriptor: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """`load_matrix`'s rows and owners, with each image's stain fallback, from one read of each file."""
    rows, owners, fallbacks = [], [], []
    for i, record in enumerate(manifest):
        features = store.load(store.entry(record))
        if features is None:
            raise FeatureStoreError(f"{record.path}: no features in {store.root}; run histoboost extract first")
        block = features.descriptor(descriptor)
        rows.append(block)
        owners.append(np.full(len(block), i))
        fallbacks.append(features.stain_fallback)
    return np.concatenate(rows), np.concatenate(owners), fallbacks


def prefetch(fn: Callable[[T], R], items: list[T], depth: int = 2, threads: int = 1) -> Iterator[R]:
    """`map(fn, items)` in order, computed up to `depth` items ahead in `threads` background threads (a
    bounded queue: memory holds at most `depth` results, whatever the number of items)."""
    with ThreadPoolExecutor(max_workers=threads) as pool:
        pending: list[Future] = [pool.submit(fn, item) for item in items[:depth]]
        for nxt in items[depth:]:
            yield pending.pop(0).result()
            pending.append(pool.submit(fn, nxt))
        for future in pending:
            yield future.result()


def _hash(obj: dict) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def library_versions() -> dict[str, str]:
    """Versions of what computes features (and, where installed, the classifier), for provenance."""
    import importlib.metadata

    import timm

    versions = {
        "histoboost": __version__,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }
    try:
        versions["xgboost"] = importlib.metadata.version("xgboost")
    except importlib.metadata.PackageNotFoundError:
        pass
    return versions
