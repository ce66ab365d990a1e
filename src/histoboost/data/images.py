"""Reading image files: decoding to RGB, content keys, the tissue check, µm/px and the working scale."""

from __future__ import annotations

import hashlib
import io
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..config import PreprocessConfig
from ..progress import Progress
from .manifest import ImageRecord
from .problems import Problem

# Plausible microscopy resolutions; anything else (e.g. a default 72 dpi) is treated as unknown.
_MPP_RANGE = (0.05, 20.0)

# The tissue check (`tissue_problem`). In brackets: the closest of the 268 BACH training images.
_TISSUE_SAMPLE = 256  # the check reads a subsample of about this many pixels along the longer side
_NEAR_BLACK = 40  # a pixel is near black when every channel is below this
_MAX_DARK_FRACTION = 0.5  # [2.5% of pixels near black]
_STAINED_MAX = 205  # a pixel is stained when a channel is at most this: optical density >= 0.15 (stain.OD_BETA)
_MIN_STAINED_FRACTION = 0.01  # as stain.MIN_TISSUE_FRACTION [37%; with 85% of its area fat, 1.8%]
_MIN_BRIGHTNESS_SPREAD = 2.0  # standard deviation of brightness, 0-255 [10.4]
_MIN_NEIGHBOUR_CORRELATION = 0.15  # of horizontally adjacent pixels [0.84; random noise is about 0]
_NO_TISSUE_FIX = "remove it: histoboost reads H&E images of tissue"


@dataclass(frozen=True)
class _FileInfo:
    image_id: str  # content key of the decoded pixels
    width: int
    height: int
    mode: str
    mpp: float | None


def scan_files(paths: list[Path], threads: int | None, progress: Progress) -> dict[Path, _FileInfo | Problem]:
    """`scan_file` of each file once, in parallel (Pillow releases the GIL while decoding), by path."""
    from ..progress import track

    paths = list(dict.fromkeys(paths))  # a file listed under two spellings (`a.png`, `./a.png`) is read once
    workers = max(1, threads or os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(track(pool.map(scan_file, paths), "reading images", len(paths), progress, leave=False))
    return dict(zip(paths, results))


def scan_file(path: Path) -> _FileInfo | Problem:
    """Read and fully decode one file: its content key, size, mode and µm/px, or the problem with it."""
    try:
        data = path.read_bytes()
    except OSError as err:
        return Problem(path, f"cannot be read ({err.strerror or err})", "check the file's permissions")
    if not data:
        return Problem(path, "empty file (0 bytes)", "re-export or remove it")
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            limit = cast(int, Image.MAX_IMAGE_PIXELS)  # None would lift it; histoboost never does
            if width * height > limit:
                return Problem(
                    path,
                    f"too large ({width}x{height} = {width * height / 1e6:.0f} Mpx, over Pillow's "
                    f"decompression-bomb limit of {limit / 1e6:.0f} Mpx)",
                    "tile or downscale it first",
                )
            image.load()
            mode, mpp = image.mode, stated_mpp(image)
            rgb = np.asarray(_to_rgb(image))
    except Image.DecompressionBombError:
        return Problem(path, "too large (over Pillow's decompression-bomb limit)", "tile or downscale it first")
    except UnidentifiedImageError:
        return Problem(path, "not an image Pillow can read", "convert it to PNG, JPEG or TIFF, or remove it")
    except Exception as err:  # noqa: BLE001 - Pillow's decoders fail on damaged files with many types (struct.error, IndexError, ...)
        reason = str(err).split("\n")[0] or type(err).__name__
        return Problem(path, f"cannot be decoded ({reason})", "re-export the image, or remove it")
    no_tissue = tissue_problem(rgb)
    if no_tissue is not None:
        return Problem(path, no_tissue, _NO_TISSUE_FIX)
    return _FileInfo(content_key(rgb), width, height, mode, mpp)


def _to_rgb(image: Image.Image) -> Image.Image:
    """The image in RGB, as every reader here decodes it: 16-bit grayscale (and `I`, read as 16-bit) is
    scaled to 8 bits, where Pillow's convert would clip it to white."""
    if image.mode == "I" or image.mode.startswith("I;16"):
        values = np.clip(np.asarray(image), 0, 65535).astype(np.uint16)
        return Image.fromarray((values >> 8).astype(np.uint8)).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def content_key(rgb: np.ndarray) -> str:
    """An image's id: sha256 of its size and RGB uint8 pixels, so metadata edits (EXIF, comments, PNG
    text) and renames keep it and any pixel change gives another."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"content_key needs an RGB uint8 array (H, W, 3), not {rgb.dtype} {rgb.shape}")
    digest = hashlib.sha256(b"histoboost-rgb8:%d:%d\n" % (rgb.shape[1], rgb.shape[0]))
    digest.update(np.ascontiguousarray(rgb).data)
    return digest.hexdigest()


def tissue_problem(rgb: np.ndarray) -> str | None:
    """Why an RGB uint8 image (H, W, 3) shows no tissue (black, blank, one colour, noise), or None.

    Independent of stain normalisation, and read on a subsample: a few milliseconds per image."""
    if rgb.size == 0:
        return "no pixels (a 0x0 image)"
    rgb = rgb if rgb.shape[1] > 1 else rgb.transpose(1, 0, 2)  # neighbours along the longer side
    step = max(1, -(-max(rgb.shape[:2]) // _TISSUE_SAMPLE))
    sample = rgb[::step, ::step]
    red, green, blue = sample[..., 0], sample[..., 1], sample[..., 2]
    dark = float((np.maximum(np.maximum(red, green), blue) < _NEAR_BLACK).mean())
    if dark > _MAX_DARK_FRACTION:
        return f"too dark: {dark:.0%} of pixels near black (an all-black or unexposed image)"
    stained = float((np.minimum(np.minimum(red, green), blue) <= _STAINED_MAX).mean())
    if stained < _MIN_STAINED_FRACTION:
        return f"no tissue: {stained:.1%} of pixels stained (an all-white or blank image)"
    spread = float(_brightness(sample).std())
    if spread < _MIN_BRIGHTNESS_SPREAD:
        return f"no tissue: one flat colour (brightness spread {spread:.1f} of 255)"
    r = _correlation(_brightness(rgb[::step, :-1:step]), _brightness(rgb[::step, 1::step]))
    if r < _MIN_NEIGHBOUR_CORRELATION:
        return f"looks like noise, not tissue: neighbouring pixels uncorrelated (r={r:.2f})"
    return None


def _brightness(rgb: np.ndarray) -> np.ndarray:
    """Mean of the three channels, float32, flattened."""
    return (rgb[..., 0].astype(np.float32) + rgb[..., 1] + rgb[..., 2]).ravel() / 3


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two equally long series; 1.0 where either does not vary."""
    spread = float(a.std() * b.std())
    if spread == 0:
        return 1.0
    return float(((a - a.mean()) * (b - b.mean())).mean() / spread)


def stated_mpp(image: Image.Image) -> float | None:
    """µm per pixel from TIFF resolution tags, an Aperio description or the dpi, where plausible."""
    candidates: list[float] = []
    try:  # malformed resolution metadata means an unknown resolution, not an unreadable image
        tags = getattr(image, "tag_v2", None)
        if tags is not None:
            description = str(tags.get(270, ""))
            match = re.search(r"MPP\s*=\s*([0-9]*\.?[0-9]+)", description)
            if match:
                candidates.append(float(match.group(1)))
            x_res, unit = tags.get(282), tags.get(296, 2)
            if x_res:
                per_unit = float(x_res)
                um_per_unit = {2: 25400.0, 3: 10000.0}.get(int(unit))
                if per_unit > 0 and um_per_unit:
                    candidates.append(um_per_unit / per_unit)
        dpi = image.info.get("dpi")
        if dpi and float(dpi[0]) > 0:
            candidates.append(25400.0 / float(dpi[0]))
    except (TypeError, ValueError, ZeroDivisionError, IndexError):
        return None
    return next((mpp for mpp in candidates if plausible_mpp(mpp)), None)


def plausible_mpp(value: float | str | None) -> float | None:
    """`value` as µm/px when it is a plausible microscopy resolution (0.05-20), else None (a default 72 dpi, junk)."""
    if value is None:
        return None
    try:
        mpp = float(value)
    except (TypeError, ValueError):
        return None
    return mpp if _MPP_RANGE[0] <= mpp <= _MPP_RANGE[1] else None


def working_scale(mpp: float | None, preprocess: PreprocessConfig) -> float:
    """The resize factor to the working resolution: from µm/px when both are known, else the scale."""
    if preprocess.target_mpp is not None and mpp is not None:
        return mpp / preprocess.target_mpp
    return preprocess.scale


def read_image(path: str | Path, scale: float = 1.0) -> np.ndarray:
    """Decode an image to an RGB uint8 array (H, W, 3), resized by `scale` with Lanczos filtering."""
    with Image.open(path) as opened:
        return np.asarray(rescaled(_to_rgb(opened), scale), dtype=np.uint8).copy()


def rescaled(image: Image.Image, scale: float) -> Image.Image:
    """The image resized by `scale` with Lanczos filtering (itself at 1): how every image reaches the working scale,
    from a file or from an array."""
    if scale == 1.0:
        return image
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS)


def read_record(record: ImageRecord, preprocess: PreprocessConfig) -> np.ndarray:
    """The record's pixels at the working resolution."""
    return read_image(record.path, working_scale(record.mpp, preprocess))
