"""Opening a whole-slide image with OpenSlide: its µm/px (never guessed), its bounds, and reading regions.

Every format OpenSlide reads (SVS, NDPI, MRXS, SCN, DICOM, pyramidal TIFF, ...) and, through its
`ImageSlide`, plain PNG/JPEG/TIFF images. All coordinates histoboost writes (tiles.csv, GeoJSON, heat
maps) are in the slide's *image frame*: full-resolution pixels from the top-left of the region
OpenSlide reports as `openslide.bounds-*` (the whole level 0 when there are none). That is the origin
QuPath and OpenSlide's Deep Zoom (`limit_bounds=True`) use; the offset is added in one place, `Slide.read`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from ..errors import SlideError

if TYPE_CHECKING:
    from openslide import AbstractSlide

MPP_RANGE = (0.1, 2.0)  # µm/px of real slides: 0.11 (100x oil) to about 2 (5x); outside it a tag is wrong
MPP_XY_TOLERANCE = 0.02  # mpp-x and mpp-y may differ by rounding, not by a real anisotropy
MAX_PIXELS = 2e10  # full-resolution pixels a slide may claim (--max-pixels): 200,000 x 100,000, a large real slide
MAX_THUMBNAIL_READ = 2**30  # pixels decoded for a thumbnail (about 10 s of JPEG): a level within it, or refused
PYRAMID_FIX = (
    "make a pyramid: vips tiffsave IN OUT.tif --tile --pyramid --compression jpeg (or bfconvert -pyramid-"
    "resolutions 6 -pyramid-scale 2, or QuPath's OME-TIFF export)"
)
_BLOCK = 2048  # level pixels per side of one read of a thumbnail (16 MiB of RGBA): memory bounded whatever the slide


@dataclass
class Slide:
    """An open slide: `read` regions of its image frame at any µm/px."""

    path: Path
    handle: AbstractSlide
    mpp: float  # µm/px at full resolution
    mpp_source: str  # "openslide.mpp-x/y", "TIFF resolution tags", "--mpp"
    origin: tuple[int, int]  # level-0 position of the image frame's (0, 0): the bounds offset
    size: tuple[int, int]  # image-frame width, height in full-resolution pixels
    fingerprint: str  # identifies the slide without reading it all
    vendor: str = ""
    properties: dict[str, str] = field(default_factory=dict)

    @property
    def downsamples(self) -> tuple[float, ...]:
        return tuple(self.handle.level_downsamples)

    def level_for(self, mpp: float) -> int:
        """The coarsest pyramid level that is still at least as fine as `mpp` (read it, then shrink)."""
        fine_enough = [i for i, d in enumerate(self.downsamples) if d * self.mpp <= mpp * (1 + 1e-6)]
        return max(fine_enough, key=lambda i: self.downsamples[i]) if fine_enough else 0

    def thumbnail_level(self, mpp: float) -> int:
        """The level a thumbnail at `mpp` is read from: `level_for(mpp)`, or a coarser one (then enlarged) where
        that level holds more than MAX_THUMBNAIL_READ pixels; `open_slide` refused slides with no such level."""
        within = [i for i, d in enumerate(self.downsamples) if self.size[0] * self.size[1] / d**2 <= MAX_THUMBNAIL_READ]
        return max(self.level_for(mpp), min(within, default=len(self.downsamples) - 1))

    def read(self, box: tuple[int, int, int, int], out_size: tuple[int, int], level: int | None = None) -> np.ndarray:
        """RGB uint8 (h, w, 3) of the image-frame box (x0, y0, x1, y1) resized to `out_size` (w, h) with
        Lanczos filtering (as images are for `predict`) from `level` (default: the coarsest fine enough);
        transparent or outside pixels are white."""
        x0, y0, x1, y1 = box
        if level is None:
            level = self.level_for(self.mpp * (x1 - x0) / out_size[0])
        ds = self.downsamples[level]
        w, h = max(1, round((x1 - x0) / ds)), max(1, round((y1 - y0) / ds))
        region = self.handle.read_region((x0 + self.origin[0], y0 + self.origin[1]), level, (w, h))
        rgb = _on_white(region)
        if rgb.size != tuple(out_size):
            rgb = rgb.resize(out_size, Image.Resampling.LANCZOS)
        return np.asarray(rgb, dtype=np.uint8)

    def thumbnail(self, mpp: float) -> tuple[np.ndarray, float]:
        """The whole image frame at about `mpp` µm/px, read block by block from `thumbnail_level` (never a whole
        level at once: each read covers at most _BLOCK x _BLOCK pixels of the level it comes from, so memory
        stays bounded whatever the slide): (RGB uint8 array, full-resolution pixels per thumbnail pixel)."""
        factor = mpp / self.mpp
        width, height = max(1, round(self.size[0] / factor)), max(1, round(self.size[1] / factor))
        level = self.thumbnail_level(mpp)
        block = max(1, int(_BLOCK * self.downsamples[level] / factor))  # thumbnail px per read
        out = np.empty((height, width, 3), dtype=np.uint8)
        for ty in range(0, height, block):
            for tx in range(0, width, block):
                tw, th = min(block, width - tx), min(block, height - ty)
                box = (round(tx * factor), round(ty * factor), round((tx + tw) * factor), round((ty + th) * factor))
                out[ty : ty + th, tx : tx + tw] = self.read(box, (tw, th), level)
        return out, factor

    def close(self) -> None:
        self.handle.close()


def open_slide(path: str | Path, mpp: float | None = None, max_pixels: float = MAX_PIXELS) -> Slide:
    """Open a slide (or a large plain image) and settle its µm/px: the file's, else `mpp`; with neither, or
    outside 0.1-2 µm/px, stop with one line (a scale is never guessed from the objective power). A slide whose
    header claims more than `max_pixels`, or has no level small enough for a thumbnail, is refused before any
    pixel is decoded (a forged or damaged header would otherwise allocate or decode for hours)."""
    import openslide

    path = Path(path)
    if not path.is_file():
        raise SlideError(f"{path}: no such file")
    try:
        handle = openslide.open_slide(str(path))
    except (openslide.OpenSlideError, Image.UnidentifiedImageError, OSError, ValueError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise SlideError(
            f"{path}: not a slide or image OpenSlide can read ({reason}): check the file (a truncated "
            "copy?) or convert it to pyramidal TIFF"
        ) from None
    except Image.DecompressionBombError:
        raise SlideError(
            f"{path}: a plain image too large to decode whole: convert it to a pyramidal TIFF "
            "(e.g. vips tiffsave --tile --pyramid)"
        ) from None
    try:
        return _describe(path, handle, mpp, max_pixels)
    except BaseException:
        handle.close()
        raise


def _describe(path: Path, handle, mpp: float | None, max_pixels: float = MAX_PIXELS) -> Slide:
    props = dict(handle.properties)
    _check_pixels(path, handle, max_pixels)
    own, source = _stated_mpp(handle, props, path)
    if mpp is not None:
        own, source = mpp, "--mpp"
    elif own is None:
        raise SlideError(
            f"{path}: the file states no µm/px (no openslide.mpp-x/y or resolution tags): pass --mpp "
            "with the scanner's value, e.g. --mpp 0.25 for a 40x scan"
        )
    if not MPP_RANGE[0] <= own <= MPP_RANGE[1]:
        raise SlideError(
            f"{path}: {own:g} µm/px ({source}) is outside {MPP_RANGE[0]}-{MPP_RANGE[1]} µm/px, so it is "
            "wrong: pass the scanner's value with --mpp"
        )
    bounds = [props.get(f"openslide.bounds-{k}") for k in ("x", "y", "width", "height")]
    width, height = handle.dimensions
    stated = [b for b in bounds if b is not None]
    if len(stated) == len(bounds):
        bx, by, bw, bh = (int(b) for b in stated)
        origin, size = (bx, by), (bw, bh)
    else:
        origin, size = (0, 0), (width, height)
    if min(size) <= 0:
        raise SlideError(
            f"{path}: OpenSlide finds no image data in it (an image frame of {size[0]}x{size[1]} px): "
            "the file is damaged or empty; check it with openslide-show-properties"
        )
    return Slide(
        path,
        handle,
        float(own),
        source,
        origin,
        size,
        slide_fingerprint(path, props),
        props.get("openslide.vendor", "image"),
        props,
    )


def _check_pixels(path: Path, handle, max_pixels: float) -> None:
    """Refuse, from the header alone, a slide larger than `max_pixels` or whose smallest level is more than a
    thumbnail may decode (a single-level giant is decoded whole for its thumbnail)."""
    width, height = handle.dimensions
    pyramid = "" if handle.level_count > 1 else " without a pyramid"
    if width * height > max_pixels:
        raise SlideError(
            f"{path}: claims {width}x{height} px{pyramid}, over the --max-pixels budget of "
            f"{max_pixels:.3g}: a damaged header? If the slide is real, pass a larger --max-pixels"
            + (f", or {PYRAMID_FIX}" if pyramid else "")
        )
    smallest = width * height / handle.level_downsamples[-1] ** 2
    if smallest > MAX_THUMBNAIL_READ:
        raise SlideError(
            f"{path}: a {width}x{height} px slide{pyramid or ' whose smallest level'} holds "
            f"{smallest:.3g} px, more than a thumbnail may decode ({MAX_THUMBNAIL_READ:.3g}): "
            f"{PYRAMID_FIX}"
        )


def _stated_mpp(handle, props: dict[str, str], path: Path) -> tuple[float | None, str]:
    """The file's own µm/px and where it came from, or (None, "")."""
    x, y = props.get("openslide.mpp-x"), props.get("openslide.mpp-y")
    if x is not None and y is not None:
        try:
            mx, my = float(x), float(y)
        except ValueError:
            return None, ""
        if mx > 0 and my > 0:
            if abs(mx - my) > MPP_XY_TOLERANCE * max(mx, my):
                raise SlideError(f"{path}: pixels are not square ({mx:g} x {my:g} µm): resample the slide first")
            return (mx + my) / 2, "openslide.mpp-x/y"
    if type(handle).__name__ == "ImageSlide":  # plain images: TIFF resolution tags or dpi, as for training images
        from ..data import stated_mpp

        with Image.open(path) as image:
            own = stated_mpp(image)
        return (own, "image resolution tags") if own is not None else (None, "")
    return None, ""


def slide_fingerprint(path: Path, props: dict[str, str]) -> str:
    """OpenSlide's quickhash-1 (the slide's smallest level and properties) where it has one, else a sha256 of
    the file's size, head and tail: stable across renames and copies, found without reading the whole file."""
    quick = props.get("openslide.quickhash-1")
    if quick:
        return f"quickhash-1:{quick}"
    digest = hashlib.sha256(b"histoboost-slide-head-tail\n")
    size = path.stat().st_size
    digest.update(str(size).encode())
    with open(path, "rb") as handle:
        digest.update(handle.read(2**20))
        if size > 2**21:
            handle.seek(size - 2**20)
            digest.update(handle.read(2**20))
    return f"sha256-head-tail:{digest.hexdigest()}"


def _on_white(region: Image.Image) -> Image.Image:
    """An RGBA region (OpenSlide's, premultiplied) composited on white, as glass looks."""
    if region.mode != "RGBA":
        return region.convert("RGB")
    white = Image.new("RGB", region.size, (255, 255, 255))
    white.paste(region, mask=region.getchannel("A"))
    return white
