"""Deep Zoom tiles of a slide, as OpenSlide's own deep-zoom server makes them: `DeepZoomGenerator` with
254 px tiles and 1 px overlap (a power of two with the overlap), bounds limited (so the DZI frame is the
image frame every histoboost output uses), ICC profiles converted to sRGB, JPEG at quality 75, and the
encoded tiles kept in a bounded LRU cache."""

from __future__ import annotations

import functools
import io
import os
import threading
from pathlib import Path

from ..slides.reader import SlideError, slide_fingerprint

TILE_SIZE = 254
OVERLAP = 1
JPEG_QUALITY = 75
CACHE_TILES = 2048  # encoded tiles kept per slide (~30 MB of JPEG at most)
# Tiles made at once per slide. A coarse Deep Zoom level of a slide without a matching pyramid level reads a
# large region (the whole of a small one-level slide for its top levels, tens of MB); unbounded, 40 requests
# at once held 0.7 GB. The work is CPU-bound, so more at once than cores gains nothing.
TILE_WORKERS = max(2, os.cpu_count() or 2)


class DeepZoomSlide:
    """One slide's DZI descriptor and tiles. OpenSlide handles are thread-safe, so tiles are made
    concurrently; tiles are memoised by functools' LRU cache (thread-safe, bounded)."""

    def __init__(self, path: Path, fingerprint: str):
        import openslide
        from openslide.deepzoom import DeepZoomGenerator

        try:
            self.slide = openslide.open_slide(str(path))
        except (openslide.OpenSlideError, OSError, ValueError) as err:
            raise SlideError(
                f"{path}: cannot open the slide this result was made from ({err}): put it back, or score it again"
            ) from None
        if slide_fingerprint(path, dict(self.slide.properties)) != fingerprint:
            self.slide.close()
            raise SlideError(
                f"{path} is not the slide this result was made from (its fingerprint differs): score "
                "it again with histoboost slide"
            )
        self.generator = DeepZoomGenerator(self.slide, tile_size=TILE_SIZE, overlap=OVERLAP, limit_bounds=True)
        self._transform = _srgb_transform(self.slide)
        self._tile = functools.lru_cache(maxsize=CACHE_TILES)(self._make_tile)
        self._workers = threading.BoundedSemaphore(TILE_WORKERS)

    def dzi(self) -> str:
        return self.generator.get_dzi("jpeg")

    def tile(self, level: int, col: int, row: int) -> bytes | None:
        """The JPEG bytes of one tile, or None when the address is outside the pyramid (checked before the
        cache, so requests for absent tiles cannot push real ones out of it)."""
        if not (0 <= level < self.generator.level_count):
            return None
        cols, rows = self.generator.level_tiles[level]
        if not (0 <= col < cols and 0 <= row < rows):
            return None
        return self._tile(level, col, row)

    def _make_tile(self, level: int, col: int, row: int) -> bytes:
        with self._workers:
            image = self.generator.get_tile(level, (col, row))
            if self._transform is not None:
                from PIL import ImageCms

                ImageCms.applyTransform(image, self._transform, inPlace=True)
            buffer = io.BytesIO()
            image.save(buffer, "jpeg", quality=JPEG_QUALITY)
        return buffer.getvalue()

    def close(self) -> None:
        self.slide.close()


def _srgb_transform(slide):
    """An ICC transform from the slide's embedded profile to sRGB (the profile's default intent), as OpenSlide's
    deep-zoom example does by default; None when the slide has no profile."""
    profile = getattr(slide, "color_profile", None)
    if profile is None:
        return None
    from PIL import ImageCms

    intent = ImageCms.getDefaultIntent(profile)
    # Pillow's stubs want its Intent and Flags enums; the profile's own intent number is passed on unchecked.
    return ImageCms.buildTransform(profile, ImageCms.createProfile("sRGB"), "RGB", "RGB", intent, 0)  # type: ignore[arg-type]
