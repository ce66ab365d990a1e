"""slides.tiles: boxes rounded once from a float grid (no drift over thousands of tiles), grids that start at
the tissue and stay inside the slide, and tissue fractions per box."""

from __future__ import annotations

import numpy as np
import pytest

from histoboost.slides.tiles import tile_grid, tissue_fractions


def test_ten_thousand_tiles_do_not_drift():
    """645 µm at 0.42 µm/px is 1535.714... px: adding a rounded stride would drift 2,857 px over 10⁴ tiles."""
    tile = 645 / 0.42
    mask = np.ones((1, 10_000), bool)
    grid = tile_grid(mask, tile, (round(10_000 * tile), round(tile)), tile, tile)
    assert len(grid) == 10_000 and grid.shape == (1, 10_000)
    exact = grid.start[0] + np.arange(10_000) * tile
    assert np.abs(grid.boxes[:, 0] - exact).max() <= 0.5
    assert np.array_equal(grid.boxes[1:, 0], grid.boxes[:-1, 2])  # neighbours share an edge: no gap, no overlap
    assert set(np.unique(grid.boxes[:, 2] - grid.boxes[:, 0])) <= {1535, 1536}


def test_the_grid_starts_at_the_tissue_and_covers_it():
    mask = np.zeros((100, 100), bool)
    mask[20:41, 30:81] = True  # tissue from x 300 to 810, y 200 to 410 in full-resolution px
    grid = tile_grid(mask, 10.0, (1000, 1000), tile_px=100, stride_px=100)
    assert grid.start == (300.0, 200.0) and grid.shape == (3, 6)
    assert grid.boxes[:, 0].min() == 300 and grid.boxes[:, 2].max() >= 810 and grid.boxes[:, 3].max() >= 410
    assert np.array_equal(grid.boxes[:, 0], 300 + 100 * grid.cols)
    assert np.array_equal(grid.boxes[:, 1], 200 + 100 * grid.rows)
    half = (grid.rows == 2) & (grid.cols == 0)  # y 400-500 over tissue ending at 410
    assert grid.tissue[half] == pytest.approx(0.1) and grid.tissue[(grid.rows == 0) & (grid.cols == 0)] == 1


def test_a_finer_stride_overlaps_and_the_last_tile_stays_inside_the_slide():
    mask = np.zeros((50, 100), bool)
    mask[10:40, 55:100] = True  # tissue up to the slide's right edge
    grid = tile_grid(mask, 10.0, (1000, 500), tile_px=200, stride_px=50)
    assert grid.boxes[:, 2].max() == 1000 and grid.boxes[:, 0].min() >= 0 and grid.boxes[:, 3].max() <= 500
    xs = np.unique(grid.boxes[:, 0])
    assert set(np.diff(xs)) == {50}


def test_no_tissue_gives_no_tiles_and_fractions_count_outside_as_glass():
    assert len(tile_grid(np.zeros((10, 10), bool), 4.0, (40, 40), 8, 8)) == 0
    mask = np.ones((10, 10), bool)
    boxes = np.array([[0, 0, 40, 40], [20, 20, 60, 60], [40, 40, 80, 80]])
    assert tissue_fractions(mask, 4.0, boxes) == pytest.approx([1.0, 0.25, 0.0])
