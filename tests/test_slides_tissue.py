"""slides.tissue: stained tissue in, glass and pen marks out, sizes in µm² (the same answer at any
resolution), the same mask every time, and users' own masks and ROIs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image, ImageDraw

from histoboost.slides import SlideError
from histoboost.slides.tissue import mask_from_geojson, mask_from_png, mask_outline, tissue_mask

GLASS, PINK, PURPLE = (242, 240, 241), (226, 150, 200), (140, 90, 170)
PENS = {"blue": (40, 70, 190), "green": (60, 160, 90), "black": (25, 25, 30)}


def scene(mpp: float) -> np.ndarray:
    """A thumbnail of glass holding: a 3 mm tissue disc with a 400 µm hole (kept) and a 100 µm hole (filled),
    a 1 mm purple piece, a 100 µm speck (dropped) and blue, green and black pen strokes. Sizes in µm."""
    side = round(8000 / mpp)
    image = Image.new("RGB", (side, side), GLASS)
    draw = ImageDraw.Draw(image)
    px = lambda *um: [v / mpp for v in um]  # noqa: E731
    draw.ellipse(px(500, 500, 3500, 3500), fill=PINK)
    draw.ellipse(px(1600, 1600, 2000, 2000), fill=GLASS)
    draw.ellipse(px(2700, 2000, 2800, 2100), fill=GLASS)
    draw.ellipse(px(5000, 1000, 6000, 2000), fill=PURPLE)
    draw.rectangle(px(6500, 6500, 6600, 6600), fill=PINK)
    for i, colour in enumerate(PENS.values()):
        draw.rectangle(px(500 + 2500 * i, 5000, 2500 + 2500 * i, 5400), fill=colour)
    return np.asarray(image)


def at(mask: np.ndarray, mpp: float, x_um: float, y_um: float) -> bool:
    return bool(mask[round(y_um / mpp), round(x_um / mpp)])


def test_tissue_is_found_and_glass_pen_specks_and_small_holes_are_not_what_they_seem():
    mpp = 8.0
    mask = tissue_mask(scene(mpp), mpp)
    assert at(mask, mpp, 1000, 2000) and at(mask, mpp, 5500, 1500)  # pink and purple tissue
    assert at(mask, mpp, 2750, 2050)  # a 100 µm hole is filled
    assert not at(mask, mpp, 1800, 1800)  # a 400 µm hole is kept
    assert not at(mask, mpp, 6550, 6550)  # a 100 µm speck is dropped
    for i in range(3):
        assert not at(mask, mpp, 1500 + 2500 * i, 5200), list(PENS)[i]
    assert not mask[:, -20:].any() and not mask[-20:].any()  # glass
    tissue_um2 = mask.sum() * mpp**2
    expected = np.pi * (1500**2 - 200**2) + np.pi * 500**2
    assert tissue_um2 == pytest.approx(expected, rel=0.03)


def test_the_same_tissue_at_another_resolution_gives_the_same_mask():
    """Areas are in µm², so a 4 µm/px thumbnail gives the mask of the 8 µm/px one (up to edge pixels)."""
    coarse, fine = tissue_mask(scene(8.0), 8.0), tissue_mask(scene(4.0), 4.0)
    reduced = fine.reshape(coarse.shape[0], 2, coarse.shape[1], 2).mean(axis=(1, 3)) >= 0.5
    assert (reduced != coarse).mean() < 0.005
    assert not reduced[round(6550 / 8), round(6550 / 8)] and reduced[round(2050 / 8), round(2750 / 8)]


def test_the_mask_is_deterministic_and_empty_on_blank_glass():
    rgb = scene(8.0)
    assert np.array_equal(tissue_mask(rgb, 8.0), tissue_mask(rgb.copy(), 8.0))
    assert not tissue_mask(np.full((300, 400, 3), 245, np.uint8), 8.0).any()


def test_a_users_png_mask_is_stretched_over_the_thumbnail(tmp_path):
    drawn = np.zeros((50, 100), np.uint8)
    drawn[:, :50] = 255
    Image.fromarray(drawn).save(tmp_path / "mask.png")
    mask = mask_from_png(tmp_path / "mask.png", (100, 200))
    assert mask.shape == (100, 200) and mask[:, :100].all() and not mask[:, 100:].any()
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    with pytest.raises(SlideError, match=r"bad.png: --tissue-mask is not a readable image"):
        mask_from_png(tmp_path / "bad.png", (10, 10))


def test_a_qupath_roi_is_rasterised_in_thumbnail_pixels(tmp_path):
    """A QuPath annotation export: full-resolution pixel coordinates, divided by the thumbnail's factor."""
    square = [[1000, 2000], [3000, 2000], [3000, 4000], [1000, 4000], [1000, 2000]]
    hole = [[1500, 2500], [2000, 2500], [2000, 3000], [1500, 3000], [1500, 2500]]
    roi = {
        "type": "FeatureCollection",
        "features": [
            {
                "type": "Feature",
                "properties": {"objectType": "annotation"},
                "geometry": {"type": "Polygon", "coordinates": [square, hole]},
            }
        ],
    }
    (tmp_path / "roi.geojson").write_text(json.dumps(roi))
    mask = mask_from_geojson(tmp_path / "roi.geojson", (300, 300), factor=20.0)
    assert mask.sum() == pytest.approx(100 * 100 - 25 * 25, rel=0.05)
    assert mask[175, 60] and not mask[137, 87] and not mask[50, 50]
    (tmp_path / "points.geojson").write_text(json.dumps({"type": "Point", "coordinates": [1, 2]}))
    with pytest.raises(SlideError, match="holds a 'Point' where a Polygon"):
        mask_from_geojson(tmp_path / "points.geojson", (10, 10), 1.0)
    (tmp_path / "empty.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": []}))
    with pytest.raises(SlideError, match="holds no polygon"):
        mask_from_geojson(tmp_path / "empty.geojson", (10, 10), 1.0)
    (tmp_path / "broken.geojson").write_text("{")
    with pytest.raises(SlideError, match=r"broken.geojson: --roi is not a readable GeoJSON"):
        mask_from_geojson(tmp_path / "broken.geojson", (10, 10), 1.0)


def test_a_huge_roi_file_is_refused_before_it_is_read(tmp_path):
    from histoboost.slides.tissue import MAX_ROI_BYTES

    huge = tmp_path / "huge.geojson"
    with open(huge, "wb") as handle:  # sparse: no disk used
        handle.truncate(MAX_ROI_BYTES + 1)
    with pytest.raises(SlideError, match=r"huge.geojson: --roi is not a readable GeoJSON file \(larger than 64 MiB"):
        mask_from_geojson(huge, (10, 10), 1.0)


def test_the_outline_is_a_valid_polygon_of_the_mask_in_full_resolution_pixels():
    mpp, factor = 8.0, 16.0
    mask = tissue_mask(scene(mpp), mpp)
    outline = mask_outline(mask, factor)
    assert outline.is_valid and outline.geom_type == "MultiPolygon" and len(outline.geoms) == 2
    assert outline.area == pytest.approx(mask.sum() * factor**2, rel=0.02)
    assert sum(len(p.interiors) for p in outline.geoms) == 1  # the 400 µm hole
    assert mask_outline(np.zeros((5, 5), bool), factor).is_empty
