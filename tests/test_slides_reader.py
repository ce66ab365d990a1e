"""slides.reader: µm/px is read, given or refused (never guessed), levels are chosen by µm/px, regions come back
as `predict` sees an image, and the bounds offset is added once."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from histoboost.slides import SlideError, open_slide, reader

from conftest import CMU
from mosaic import BACH_MPP, BLOCK_PX, BoundsSlide, write_mosaic


@pytest.fixture(scope="module")
def one_block(tmp_path_factory, bach):
    path = tmp_path_factory.mktemp("one-block") / "block.tiff"
    blocks = write_mosaic(path, [[bach / "InSitu/is013.jpeg"]], levels=3)
    return path, blocks[0]


def test_svs_states_its_mpp_and_has_a_quick_fingerprint():
    slide = open_slide(CMU)
    try:
        assert slide.mpp == pytest.approx(0.499, abs=1e-3) and slide.mpp_source == "openslide.mpp-x/y"
        assert slide.size == (2220, 2967) and slide.origin == (0, 0)
        assert slide.fingerprint.startswith("quickhash-1:")
    finally:
        slide.close()


def test_tiff_resolution_tags_give_the_mpp_and_levels_are_chosen_by_mpp(one_block):
    path, _ = one_block
    slide = open_slide(path)
    try:
        assert slide.mpp == pytest.approx(BACH_MPP, rel=1e-6)
        assert slide.downsamples == pytest.approx((1, 2, 4))
        assert [slide.level_for(m) for m in (0.3, 0.42, 0.8, 0.84, 1.0, 1.68, 10)] == [0, 0, 0, 1, 1, 2, 2]
    finally:
        slide.close()


def test_a_region_is_the_image_as_predict_resizes_it(one_block, bach):
    """Reading a block at half resolution takes pyramid level 1 (a Lanczos halving of the image) as it is;
    at another size the read level is resized with Lanczos, as `predict` resizes an image."""
    path, (x0, y0, x1, y1, image) = one_block
    with Image.open(image) as full:
        full = full.convert("RGB")
        half = np.asarray(full.resize((BLOCK_PX // 2,) * 2, Image.Resampling.LANCZOS))
        third = np.asarray(full.resize((512, 512), Image.Resampling.LANCZOS))
    slide = open_slide(path)
    try:
        assert np.array_equal(slide.read((x0, y0, x1, y1), (BLOCK_PX // 2,) * 2), half)
        # 512 px from level 1 (768 px), not from level 0: close to, but not exactly, the direct reduction.
        assert np.abs(slide.read((x0, y0, x1, y1), (512, 512)).astype(int) - third).mean() < 2
        assert (slide.read((-300, -300, -44, -44), (64, 64)) == 255).all()  # outside the slide: white glass
    finally:
        slide.close()


def test_thumbnail_read_in_blocks_equals_one_read(one_block, monkeypatch):
    path, _ = one_block
    slide = open_slide(path)
    try:
        whole, factor = slide.thumbnail(8.0)
        monkeypatch.setattr(reader, "_BLOCK", 7)
        blocks, _ = slide.thumbnail(8.0)
        assert factor == pytest.approx(8.0 / BACH_MPP)
        assert whole.shape == (round(slide.size[1] / factor), round(slide.size[0] / factor), 3)
        assert np.abs(whole.astype(int) - blocks).mean() < 3  # the same picture, up to block-edge filtering
    finally:
        slide.close()


def test_no_mpp_needs_mpp_and_values_outside_the_range_are_refused(tmp_path, bach):
    path = tmp_path / "no-mpp.tiff"
    write_mosaic(path, [[bach / "Benign/b013.jpeg"]], levels=1, resolution=False)
    with pytest.raises(SlideError, match=r"no-mpp.tiff: the file states no µm/px .* pass --mpp"):
        open_slide(path)
    assert open_slide(path, mpp=0.5).mpp_source == "--mpp"
    with pytest.raises(SlideError, match=r"5 µm/px \(--mpp\) is outside 0.1-2"):
        open_slide(path, mpp=5)
    with pytest.raises(SlideError, match=r"outside 0.1-2"):
        open_slide(path, mpp=0.05)


def test_plain_images_take_their_dpi_and_non_square_pixels_are_refused(tmp_path):
    rgb = np.full((64, 96, 3), 230, dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "field.png", dpi=(25400 / 0.5, 25400 / 0.5))
    slide = open_slide(tmp_path / "field.png")
    assert slide.mpp == pytest.approx(0.5, rel=1e-3) and slide.mpp_source == "image resolution tags"
    assert slide.size == (96, 64)
    assert slide.fingerprint.startswith("sha256-head-tail:")
    slide.close()
    import tifffile

    tifffile.imwrite(
        tmp_path / "stretched.tiff",
        np.zeros((512, 512, 3), np.uint8),
        tile=(256, 256),
        resolution=(1e4 / 0.25, 1e4 / 0.5),
        resolutionunit="CENTIMETER",
        photometric="rgb",
    )
    with pytest.raises(SlideError, match="pixels are not square"):
        open_slide(tmp_path / "stretched.tiff")


def test_unreadable_files_are_one_line(tmp_path):
    (tmp_path / "notes.svs").write_text("not a slide")
    with pytest.raises(SlideError, match=r"notes.svs: not a slide or image OpenSlide can read") as caught:
        open_slide(tmp_path / "notes.svs")
    assert "\n" not in str(caught.value)
    with pytest.raises(SlideError, match="no such file"):
        open_slide(tmp_path / "missing.svs")


def test_bounds_offset_is_the_origin_of_every_read(one_block):
    """A slide whose level 0 has its content at `openslide.bounds-*`: image-frame (0, 0) is the bounds' corner."""
    path, (x0, y0, x1, y1, _) = one_block
    plain = open_slide(path)
    shifted = reader._describe(path, BoundsSlide(open_slide(path).handle, (1000, 3000)), None)
    try:
        assert shifted.origin == (1000, 3000) and shifted.size == plain.size
        box = (x0 + 100, y0 + 200, x0 + 612, y0 + 712)
        assert np.array_equal(shifted.read(box, (256, 256)), plain.read(box, (256, 256)))
    finally:
        plain.close()
        shifted.close()
