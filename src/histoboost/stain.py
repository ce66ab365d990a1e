"""Stain normalisation (Macenko, Reinhard) on tissue pixels, and a quality check of its output.

Macenko follows torchstain's numpy implementation step for step (and is tested against it), but is
written here because torchstain keeps the fitted stain matrix and concentrations private (quality
control and H&E-space augmentation need them) and fails with NaN or a LinAlgError on blank images.
Reinhard uses torchstain's RGB<->LAB conversions and computes its statistics on tissue pixels only,
where torchstain's includes the white background.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
from torchstain.numpy.utils import lab2rgb, rgb2lab

from .config import PreprocessConfig, StainConfig
from .data import ImageRecord, Problem, read_record
from .errors import StainError
from .progress import Progress

# What to do about an image whose stains cannot be normalised (validation already refused blank ones).
STAIN_FAILURE_FIX = "if it shows tissue, try --stain reinhard or none, or another --stain-reference; if not, remove it"

# Macenko et al., ISBI 2009, reference values as published with the method (also torchstain's defaults).
MACENKO_HE_REF = np.array([[0.5626, 0.2159], [0.7201, 0.8012], [0.4062, 0.5581]])
MACENKO_MAX_C_REF = np.array([1.9705, 1.0308])
# Reinhard's target: tissue LAB means and standard deviations (torchstain/OpenCV LAB scaling, 0-255)
# of images rendered in the Macenko reference appearance, so both methods aim at the same colours.
# Measured with experiments/stain_survey.py on the 144 shared BACH images (mean over images).
REINHARD_REF = (
    (145.2, 149.6, 116.8),  # L, a, b means
    (37.3, 6.0, 5.0),  # L, a, b standard deviations
)

TissueRule = Literal["any", "all"]

IO = 240.0  # transmitted light intensity (torchstain's default)
OD_BETA = 0.15  # a pixel is tissue when its optical density reaches this (see `tissue_mask`)
ANGLE_PERCENTILE = 1.0  # robust extremes of the stain-vector angles (Macenko's alpha)
MIN_TISSUE_FRACTION = 0.01
MIN_TISSUE_PIXELS = 500
MIN_STAIN_ANGLE = 2.0  # degrees between the two stain vectors below which they are one colour


@dataclass(frozen=True)
class StainFit:
    """An image's own stain description, as Macenko estimates it."""

    he: np.ndarray  # (3, 2) optical-density vectors of haematoxylin and eosin, unit length
    max_c: np.ndarray  # (2,) 99th percentile concentrations
    tissue_fraction: float


@dataclass(frozen=True)
class StainQC:
    """Measurements that reveal a failed normalisation (washed out, saturated, not H&E)."""

    tissue_before: float  # fraction of tissue pixels in the input
    tissue_after: float  # ... and in the output
    od_before: float  # 99th percentile of summed optical density over tissue, input
    od_after: float  # ... and output
    he_angle: float  # degrees between the image's stain vectors and the reference ones (worst of H, E)
    flags: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.flags


def optical_density(rgb: np.ndarray) -> np.ndarray:
    """Optical density per channel, float32 (..., 3), as in torchstain: -log((I + 1) / Io)."""
    return -np.log((rgb.astype(np.float32) + 1.0) / IO)


def tissue_mask(rgb: np.ndarray, rule: TissueRule = "any") -> np.ndarray:
    """Pixels dense enough to be stained tissue, excluding white background.

    `any` (ours): optical density >= OD_BETA in at least one channel. `all` (torchstain's): in every
    channel. `all` keeps almost no pixels of images whose blue channel is saturated (common in BACH),
    and Macenko then washes them out; `any` keeps their tissue.
    """
    od = optical_density(rgb) >= OD_BETA
    return np.any(od, axis=-1) if rule == "any" else np.all(od, axis=-1)


def fit_macenko(rgb: np.ndarray, rule: TissueRule = "any") -> StainFit:
    """Estimate an RGB uint8 image's stain vectors and maximal concentrations (Macenko 2009)."""
    od = optical_density(rgb.reshape(-1, 3))
    # Intensities above Io give slightly negative densities; no stain is there.
    tissue = np.maximum(od[tissue_mask(rgb.reshape(-1, 3), rule)], 0).astype(np.float64)
    _require_tissue(len(tissue), len(od))
    _, eigvecs = np.linalg.eigh(np.cov(tissue.T))
    plane = eigvecs[:, 1:3]
    projected = tissue @ plane
    phi = np.arctan2(projected[:, 1], projected[:, 0])
    lo, hi = np.percentile(phi, [ANGLE_PERCENTILE, 100 - ANGLE_PERCENTILE])
    v_min = plane @ np.array([np.cos(lo), np.sin(lo)])
    v_max = plane @ np.array([np.cos(hi), np.sin(hi)])
    # Haematoxylin first: the vector with the larger red optical density (torchstain's heuristic).
    he = np.stack([v_min, v_max], axis=1) if v_min[0] > v_max[0] else np.stack([v_max, v_min], axis=1)
    if abs(float(v_min @ v_max)) > np.cos(np.radians(MIN_STAIN_ANGLE)):
        raise StainError("haematoxylin and eosin cannot be told apart (the tissue has a single colour)")
    concentrations = stain_concentrations(od, he)
    max_c = np.percentile(concentrations, 99, axis=0)
    if not np.all(np.isfinite(he)) or np.any(max_c <= 0):
        raise StainError("stain vectors could not be estimated (too little stained tissue)")
    return StainFit(he=he, max_c=max_c, tissue_fraction=len(tissue) / len(od))


def stain_concentrations(od: np.ndarray, he: np.ndarray) -> np.ndarray:
    """Least-squares stain concentrations (N, 2) of optical densities (N, 3) for a (3, 2) matrix."""
    return od.reshape(-1, 3) @ np.linalg.pinv(he).T.astype(np.float32)


def render_stains(concentrations: np.ndarray, he: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Beer-Lambert rendering of concentrations (N, 2) with stain matrix (3, 2) to RGB uint8."""
    rgb = IO * np.exp(-(concentrations @ he.T.astype(np.float32)))
    # Truncation (not rounding), as torchstain does, so the two agree to the level.
    return np.clip(rgb, 0, 255).astype(np.uint8).reshape(shape)


def macenko_normalize(
    rgb: np.ndarray,
    he_ref: np.ndarray = MACENKO_HE_REF,
    max_c_ref: np.ndarray = MACENKO_MAX_C_REF,
    fit: StainFit | None = None,
) -> np.ndarray:
    """Re-render an RGB uint8 image with the reference stain vectors and concentration scale."""
    fit = fit or fit_macenko(rgb)
    concentrations = stain_concentrations(optical_density(rgb), fit.he)
    concentrations *= (np.asarray(max_c_ref) / fit.max_c).astype(np.float32)
    return render_stains(concentrations, np.asarray(he_ref), rgb.shape)


def reinhard_stats(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """LAB means and standard deviations (3,) over the image's tissue pixels."""
    mask = tissue_mask(rgb)
    _require_tissue(int(mask.sum()), mask.size)
    lab = rgb2lab(rgb[mask].astype(np.float32) / 255.0)
    return lab.mean(axis=0), lab.std(axis=0)


def reinhard_normalize(rgb: np.ndarray, means_ref: np.ndarray, stds_ref: np.ndarray) -> np.ndarray:
    """Match the tissue's LAB means and deviations to the reference; background stays as it was."""
    mask = tissue_mask(rgb)
    means, stds = reinhard_stats(rgb)
    lab = rgb2lab(rgb[mask].astype(np.float32) / 255.0)
    lab = (lab - means) / np.maximum(stds, 1e-6) * np.asarray(stds_ref) + np.asarray(means_ref)
    out = rgb.copy()
    out[mask] = np.clip(np.rint(lab2rgb(lab.astype(np.float32)) * 255.0), 0, 255).astype(np.uint8)
    return out


class Normalizer:
    """Stain normalisation as configured: `Normalizer(config.preprocess.stain)(rgb)`."""

    def __init__(self, config: StainConfig):
        self.config = config
        target = None if config.target is None else np.asarray(config.target, dtype=np.float64)
        if config.method == "macenko":
            self.he_ref = MACENKO_HE_REF if target is None else target[:6].reshape(3, 2)
            self.max_c_ref = MACENKO_MAX_C_REF if target is None else target[6:]
        elif config.method == "reinhard":
            ref = np.asarray(REINHARD_REF) if target is None else target.reshape(2, 3)
            self.means_ref, self.stds_ref = ref[0], ref[1]

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        return self.normalize_with_qc(rgb)[0]

    def normalize_with_qc(self, rgb: np.ndarray) -> tuple[np.ndarray, StainQC | None]:
        """The normalised image and its quality check (None when the method is `none`)."""
        if self.config.method == "none":
            return rgb, None
        fit = fit_macenko(rgb)
        if self.config.method == "macenko":
            out = macenko_normalize(rgb, self.he_ref, self.max_c_ref, fit)
            return out, quality_check(rgb, out, fit, self.he_ref)
        out = reinhard_normalize(rgb, self.means_ref, self.stds_ref)
        return out, quality_check(rgb, out, fit, MACENKO_HE_REF)


def normalize_safely(rgb: np.ndarray, stain: StainConfig) -> tuple[np.ndarray, StainQC | None, str]:
    """Stain-normalise; where the output fails its quality check, fall back as `stain.on_failure` says
    instead of feeding an artefact to the model. Returns (image, the first method's QC, fallback used)."""
    out, qc = Normalizer(stain).normalize_with_qc(rgb)
    if qc is None or qc.ok:
        return out, qc, ""
    if stain.on_failure == "keep":
        return out, qc, "kept"
    if stain.on_failure == "reinhard" and stain.method != "reinhard":
        second, second_qc = Normalizer(replace(stain, method="reinhard", target=None)).normalize_with_qc(rgb)
        if second_qc is not None and second_qc.ok:
            return second, qc, "reinhard"
    return rgb, qc, "none"


# What each fallback of `normalize_safely` means, as reports and predictions say it.
FALLBACK_NOTES = {"reinhard": "used Reinhard", "none": "used un-normalised", "kept": "kept the failed output"}


def fit_reference(method: str, rgb: np.ndarray) -> tuple[float, ...]:
    """Reference values fitted from a user's reference image, to be stored in `StainConfig.target`."""
    if method == "macenko":
        fit = fit_macenko(rgb)
        return tuple(float(v) for v in (*fit.he.ravel(), *fit.max_c))
    if method == "reinhard":
        means, stds = reinhard_stats(rgb)
        return tuple(float(v) for v in (*means, *stds))
    raise StainError(f"stain method {method!r} takes no reference image")


# Quality-control thresholds (docs/stain.md): all 144 shared BACH images pass them after our
# normalisation; 16 of torchstain's outputs fail them.
QC_MIN_TISSUE_KEPT = 0.5  # output keeps at least half of the input's tissue pixels
QC_MIN_OD_RATIO = 0.5  # ... and half of its optical-density range
QC_MAX_SATURATED = 0.05  # at most 5% of tissue pixels rendered pure white or black
QC_MAX_ANGLE = 45.0  # degrees between the image's stain vectors and the reference (BACH: 17-37)


def quality_check(before: np.ndarray, after: np.ndarray, fit: StainFit, he_ref: np.ndarray) -> StainQC:
    """Compare input and normalised output: a collapse of tissue or density means a washed-out result."""
    mask_before = tissue_mask(before)
    tissue_before = float(mask_before.mean())
    tissue_after = float(tissue_mask(after).mean())
    od_before = _od_range(before, mask_before)
    od_after = _od_range(after, mask_before)
    tissue_pixels = after[mask_before]
    saturated = float(np.mean(np.all(tissue_pixels >= 254, axis=-1) | np.all(tissue_pixels <= 1, axis=-1)))
    ref = np.asarray(he_ref) / np.linalg.norm(he_ref, axis=0)
    cosines = np.clip(np.sum(fit.he / np.linalg.norm(fit.he, axis=0) * ref, axis=0), -1, 1)
    he_angle = float(np.degrees(np.arccos(cosines)).max())
    flags = []
    if tissue_after < QC_MIN_TISSUE_KEPT * tissue_before:
        flags.append(f"washed out: tissue {tissue_before:.0%} -> {tissue_after:.0%} of pixels")
    if od_after < QC_MIN_OD_RATIO * od_before:
        flags.append(f"density collapsed: optical density {od_before:.2f} -> {od_after:.2f}")
    if saturated > QC_MAX_SATURATED:
        flags.append(f"saturated: {saturated:.0%} of tissue pixels pure white or black")
    if he_angle > QC_MAX_ANGLE:
        flags.append(f"stain vectors {he_angle:.0f} degrees from H&E")
    return StainQC(tissue_before, tissue_after, od_before, od_after, he_angle, tuple(flags))


def _od_range(rgb: np.ndarray, mask: np.ndarray) -> float:
    total = optical_density(rgb[mask]).sum(axis=-1)
    return float(np.percentile(total, 99)) if total.size else 0.0


def _require_tissue(n_tissue: int, n_pixels: int) -> None:
    if n_tissue < MIN_TISSUE_PIXELS or n_tissue < MIN_TISSUE_FRACTION * n_pixels:
        raise StainError(
            f"too little tissue for stain normalisation ({n_tissue / max(n_pixels, 1):.1%} of pixels stained)"
        )


def check_images(
    records: Sequence[ImageRecord], preprocess: PreprocessConfig, threads: int | None = None, progress: Progress = False
) -> tuple[dict[str, StainQC], list[Problem]]:
    """Normalise each image at its working resolution and check the result (for `inspect`).

    Returns QC measurements by image id, and one problem per image that cannot be normalised
    (error) or whose normalisation looks wrong (warning).
    """
    from .progress import track

    normalizer = Normalizer(preprocess.stain)

    def one(record: ImageRecord) -> StainQC | StainError | None:
        try:
            return normalizer.normalize_with_qc(read_record(record, preprocess))[1]
        except StainError as err:
            return err

    with ThreadPoolExecutor(max_workers=max(1, threads or os.cpu_count() or 1)) as pool:
        results = list(track(pool.map(one, records), "checking stain", len(records), progress, leave=False))
    qcs: dict[str, StainQC] = {}
    problems: list[Problem] = []
    for record, result in zip(records, results):
        if isinstance(result, StainError):
            problems.append(Problem(record.path, str(result), STAIN_FAILURE_FIX))
        elif result is not None:
            qcs[record.image_id] = result
            fallback = {
                "reinhard": "Reinhard's normalisation (or none, if that fails too)",
                "none": "the un-normalised image",
                "keep": "this output anyway",
            }[preprocess.stain.on_failure]
            problems.extend(
                Problem(
                    record.path,
                    f"stain normalisation: {flag}",
                    f"check the image (out of focus, faded or not H&E?); histoboost will use {fallback} "
                    "and refer it (preprocess.stain.on_failure)",
                    "warning",
                )
                for flag in result.flags
            )
    return qcs, problems
