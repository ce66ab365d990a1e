"""Scoring a slide's tiles with a model's `inference.Predictor`: the same preprocessing, features and decision rule
as `predict`.

Each tile is read at the model's working µm/px from the pyramid level just finer than it, stain-normalised
with one fit for the whole slide (made on its most tissue-rich tiles), described by the bundle's backbones
and classified. The map uses one un-augmented view per tile, many tiles per forward pass; the most
suspicious tiles are then re-scored with the bundle's full augmentation vote ("screen, then confirm").
Tiles are read by background threads through a bounded queue, overlapped with the network, and results
are stored in chunks as they are finished, so an interrupted slide resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import storage
from ..config import StainConfig
from ..errors import HistoboostError
from ..inference import Predictor, p_carcinoma, refer_text
from ..stain import (
    FALLBACK_NOTES,
    Normalizer,
    StainError,
    StainFit,
    fit_macenko,
    macenko_normalize,
    normalize_safely,
    quality_check,
)
from .reader import Slide
from .tiles import TileGrid

CHUNK = 32  # tiles per stored result: the most an interrupted run recomputes
STAIN_SAMPLE_TILES = 16  # the slide's stain fit is made on this many of its most tissue-rich tiles
STAIN_SAMPLE_PIXELS = 2**19  # ... on about this many of their pixels (percentiles need no more)
CACHE_FORMAT = 1


@dataclass(frozen=True)
class Geometry:
    """How tiles are cut and read: side and stride in µm, the working µm/px, and where each came from."""

    tile_um: float
    stride_um: float
    working_mpp: float
    notes: tuple[str, ...] = ()

    def tile_size(self) -> int:
        """Tile side in pixels at the working resolution."""
        return max(1, round(self.tile_um / self.working_mpp))


@dataclass
class TileScores:
    """Per scored tile: class probabilities (N, K), decisions (N,), agreement of the views (N,), referral
    reasons (N,), whether the tile was confirmed with the full augmentation vote (N,)."""

    probs: np.ndarray
    decision: np.ndarray
    agreement: np.ndarray
    refer: list[str]
    confirmed: np.ndarray
    stain: str  # how the slide was stain-normalised, for the summary
    stain_refer: str  # non-empty when the slide's stain fit failed its quality check
    features: np.ndarray | None = None  # (N, D) the classifier's rows of the map's view, when kept


class TileCache:
    """Finished chunks of one slide's tile results, one .npz per chunk (written atomically; no pickle)."""

    def __init__(self, root: Path | None):
        self.root = root
        self.reused = 0
        if root is not None:
            root.mkdir(parents=True, exist_ok=True)
            storage.clear_abandoned(root)

    def load(self, name: str) -> dict[str, np.ndarray] | None:
        if self.root is None or not (self.root / f"{name}.npz").is_file():
            return None
        try:
            with np.load(self.root / f"{name}.npz", allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
        except (OSError, ValueError):  # a damaged chunk is computed again
            return None
        self.reused += 1
        return arrays

    def save(self, name: str, arrays: dict[str, np.ndarray]) -> None:
        if self.root is None:
            return
        storage.write_npz(self.root / f"{name}.npz", arrays)


def cache_key(slide: Slide, bundle_sha256: str, grid: TileGrid, geometry: Geometry, settings: dict) -> str:
    """What a slide's tile results depend on: the slide, the model (its bundle's identity), the tile boxes and the
    scoring settings."""
    digest = hashlib.sha256(
        json.dumps(
            {
                "format": CACHE_FORMAT,
                "slide": slide.fingerprint,
                "bundle": bundle_sha256,
                "origin": slide.origin,
                "boxes": hashlib.sha256(np.ascontiguousarray(grid.boxes, dtype=np.int64).tobytes()).hexdigest(),
                "working_mpp": geometry.working_mpp,
                "tile_px": geometry.tile_size(),
                **settings,
            },
            sort_keys=True,
        ).encode()
    )
    return digest.hexdigest()


def tile_key(slide: Slide, box: np.ndarray) -> str:
    """A tile's id (seeds its crops and augmentations): the slide's fingerprint and the tile's box."""
    return hashlib.sha256(f"{slide.fingerprint}|{','.join(map(str, box.tolist()))}".encode()).hexdigest()


def score_tiles(
    predictor: Predictor,
    slide: Slide,
    grid: TileGrid,
    geometry: Geometry,
    augmentations: int = 0,
    confirm_top: int = 0,
    stain_fit: str = "slide",
    cache: TileCache | None = None,
    keep_features: bool = False,
) -> TileScores:
    """Score every tile of `grid` (already the tiles kept): the map with `augmentations` views per tile (0: one
    un-augmented view), then the `confirm_top` tiles most likely carcinoma with the model's own vote. Runs on the
    predictor's runtime (device, batch, tile readers, progress). `keep_features` (one view only) keeps each tile's
    classifier rows in `TileScores.features`."""
    from ..features import prefetch
    from ..progress import meter

    cache = cache or TileCache(None)
    config, runtime = predictor.config, predictor.runtime
    batch = runtime.batch
    size = geometry.tile_size()
    if size < config.augment.crop_size:
        raise HistoboostError(
            f"{slide.path}: a {geometry.tile_um:g} µm tile is {size} px at {geometry.working_mpp:g} "
            f"µm/px, smaller than the bundle's {config.augment.crop_size} px crop: give a larger "
            "--tile-um"
        )
    normalise, stain, stain_refer = slide_normaliser(slide, grid, geometry, config.preprocess.stain, stain_fit)

    def read(index: int) -> tuple[np.ndarray, str]:
        return normalise(slide.read(tuple(grid.boxes[index]), (size, size)))

    if keep_features and augmentations:
        raise HistoboostError("tile features are those of the map's single view: drop --augmentations to keep them")
    n = len(grid)
    chunks = [range(start, min(start + CHUNK, n)) for start in range(0, n, CHUNK)]
    done = {i: cache.load(f"map-{i:06d}") for i in range(len(chunks))}
    if keep_features:  # a chunk stored without its features is computed again
        done = {i: arrays if arrays is not None and "features" in arrays else None for i, arrays in done.items()}
    todo = [t for i, chunk in enumerate(chunks) if done[i] is None for t in chunk]
    views = augmentations or 1
    raw = np.zeros((n, views, len(predictor.classes.classes)))
    fallback = np.array([""] * n, dtype=object)
    features: np.ndarray | None = None
    for i, arrays in done.items():
        if arrays is not None:
            raw[chunks[i].start : chunks[i].stop], fallback[chunks[i].start : chunks[i].stop] = (
                arrays["raw"],
                arrays["stain"],
            )
            if keep_features:
                features = _rows_into(features, n, chunks[i], arrays["features"])
    bar = meter(slide.path.name[:32], n, "tile", runtime.progress, initial=n - len(todo))
    pending: list[tuple[int, np.ndarray, str]] = []
    for index, (rgb, note) in zip(todo, prefetch(read, todo, depth=2 * batch, threads=runtime.readers)):
        pending.append((index, rgb, note))
        chunk = index // CHUNK
        if len(pending) == batch or index == chunks[chunk].stop - 1:
            indices = [p[0] for p in pending]
            tiles, keys = [p[1] for p in pending], [tile_key(slide, grid.boxes[i]) for i in indices]
            if keep_features:
                rows = predictor.describe_tiles(tiles, keys)
                raw[indices] = predictor.score_rows(rows)
                features = _rows_into(features, n, indices, rows)
            else:
                raw[indices] = predictor.score_tiles(tiles, keys, augmentations)
            fallback[indices] = [p[2] for p in pending]
            bar.update(len(pending))
            pending = []
        if index == chunks[chunk].stop - 1:
            span = slice(chunks[chunk].start, chunks[chunk].stop)
            kept = {"features": features[span]} if features is not None else {}
            cache.save(f"map-{chunk:06d}", {"raw": raw[span], "stain": fallback[span].astype(str), **kept})
    bar.close()
    scores = _decide(predictor, raw, fallback, stain, stain_refer)
    scores.features = features
    if confirm_top and config.augment.n_augment > views:
        _confirm(predictor, scores, read, grid, slide, confirm_top, cache)
    return scores


def _rows_into(features: np.ndarray | None, n: int, where: Any, rows: np.ndarray) -> np.ndarray:
    """`rows` put at `where` (a range or indices) of the (n, D) feature array, made on first use."""
    if features is None:
        features = np.zeros((n, rows.shape[1]), dtype=np.float32)
    features[where] = rows
    return features


def _decide(predictor: Predictor, raw: np.ndarray, fallback: np.ndarray, stain: str, stain_refer: str) -> TileScores:
    decided = predictor.decide(raw, fallback)
    return TileScores(
        decided.probs,
        decided.decision,
        decided.agreement,
        decided.refer,
        np.zeros(len(raw), dtype=bool),
        stain,
        stain_refer,
    )


def _confirm(
    predictor: Predictor,
    scores: TileScores,
    read: Callable[[int], tuple[np.ndarray, str]],
    grid: TileGrid,
    slide: Slide,
    top: int,
    cache: TileCache,
) -> None:
    """Re-score the `top` tiles most likely carcinoma with the model's own augmentation vote, in place."""
    classes = predictor.classes
    order = np.argsort(-p_carcinoma(scores.probs, classes.groups), kind="stable")[:top]
    for index in order:
        name = f"confirm-{index:06d}"
        arrays = cache.load(name)
        if arrays is None:
            rgb, _ = read(int(index))
            arrays = {
                "raw": predictor.score_tiles(
                    [rgb], [tile_key(slide, grid.boxes[index])], predictor.config.augment.n_augment
                )[0]
            }
            cache.save(name, arrays)
        confirmed = _decide(predictor, arrays["raw"][None], np.array([""], dtype=object), "", "")
        reasons = [scores.refer[index], confirmed.refer[0]]
        if confirmed.decision[0] != scores.decision[index]:
            reasons.append(
                f"confirmation changed {classes.classes[scores.decision[index]]} to "
                f"{classes.classes[confirmed.decision[0]]}"
            )
        scores.probs[index], scores.decision[index] = confirmed.probs[0], confirmed.decision[0]
        scores.agreement[index], scores.confirmed[index] = confirmed.agreement[0], True
        scores.refer[index] = refer_text(*reasons)


def slide_normaliser(slide: Slide, grid: TileGrid, geometry: Geometry, stain: StainConfig, how: str):
    """The tile normaliser: `slide` fits Macenko once on the most tissue-rich tiles and applies that fit to
    every tile (a tile's own fit follows its content, not the slide's stains); `tile` fits each tile as
    `predict` fits each image. Returns (normalise(rgb) -> (rgb, fallback note), description, slide referral)."""

    def per_tile(rgb: np.ndarray) -> tuple[np.ndarray, str]:
        try:
            out, qc, used = normalize_safely(rgb, stain)
        except StainError:
            return rgb, "too little tissue to normalise; used un-normalised"
        return out, FALLBACK_NOTES[used] if qc is not None and not qc.ok else ""

    if how == "tile" or stain.method != "macenko":
        return per_tile, f"{stain.method}, fitted per tile", ""
    size = geometry.tile_size()
    sample = np.argsort(-grid.tissue, kind="stable")[:STAIN_SAMPLE_TILES]
    from ..features import prefetch

    tiles = prefetch(lambda i: slide.read(tuple(grid.boxes[i]), (size, size)), sample.tolist(), 4, 2)
    pixels = np.concatenate([rgb.reshape(-1, 3) for rgb in tiles])
    pixels = pixels[:: max(1, len(pixels) // STAIN_SAMPLE_PIXELS)][:, None]  # a regular sample: same fit, faster
    normaliser = Normalizer(stain)
    try:
        fit: StainFit = fit_macenko(pixels)
        qc = quality_check(
            pixels, macenko_normalize(pixels, normaliser.he_ref, normaliser.max_c_ref, fit), fit, normaliser.he_ref
        )
    except StainError as err:
        return per_tile, f"macenko per tile (the slide fit failed: {err})", "slide stain fit failed"
    if not qc.ok:
        return (
            per_tile,
            f"macenko per tile (the slide fit failed its check: {'; '.join(qc.flags)})",
            "slide stain fit failed its quality check",
        )

    def per_slide(rgb: np.ndarray) -> tuple[np.ndarray, str]:
        return macenko_normalize(rgb, normaliser.he_ref, normaliser.max_c_ref, fit), ""

    return per_slide, f"macenko, one fit for the slide on {len(sample)} tiles", ""
