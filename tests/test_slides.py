"""Whole slides end to end: a mosaic of real BACH images against `predict`, the real CMU slide, the bounds
offset, QuPath's GeoJSON contract, bad inputs and an interrupted run."""

from __future__ import annotations

import csv
import gzip
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from histoboost.cli import main
from histoboost.runtime import Runtime
from histoboost.slides import SlideSettings, predict_slide

from conftest import CMU, MOSAIC
from mosaic import BACH_MPP, BoundsSlide, write_mosaic


@pytest.fixture(scope="session")
def mosaic_model(tmp_path_factory, bach):
    """A bundle trained on the 128 shared images that are not in the mosaic (small protocol, 8 crops so that
    one image's answer does not hang on where 3 crops fall)."""
    from histoboost.config import preset
    from histoboost.data import load_manifest
    from histoboost.training import train_bundle

    from conftest import SMALL

    root = tmp_path_factory.mktemp("mosaic-model")
    used = {f"{name}.jpeg" for row in MOSAIC for name in row}
    rows = [r for r in csv.DictReader(open(bach / "manifest.csv")) if r["path"] not in used]
    with open(root / "train.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({**r, "path": str(bach / r["path"])} for r in rows)
    manifest, _ = load_manifest(root / "train.csv")
    assert len(manifest) == 128
    return train_bundle(
        manifest,
        preset("quick").merged({**SMALL, "augment.n_crops": 8}),
        Runtime(cache_dir=root / "cache"),
        image_mpp=BACH_MPP,
    )


def geojson_features(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        data = json.load(handle)
    assert data["type"] == "FeatureCollection"
    return data["features"]


def check_geojson_contract(path: Path, size: tuple[int, int], classes: list[str]) -> list[dict]:
    """What QuPath 0.4/0.5 needs: objectType, classification {name, color}, finite measurements (no NaN
    strings), valid closed polygons inside the slide, unique ids."""
    import shapely
    from shapely.geometry import shape

    features = geojson_features(path)
    ids = [f["id"] for f in features]
    assert len(set(ids)) == len(ids)
    for feature in features:
        props = feature["properties"]
        assert props["objectType"] in ("tile", "annotation")
        name, color = props["classification"]["name"], props["classification"]["color"]
        assert isinstance(name, str) and ":" not in name and len(color) == 3 and all(0 <= c <= 255 for c in color)
        assert all(isinstance(v, (int, float)) and np.isfinite(v) for v in props["measurements"].values())
        geometry = shape(feature["geometry"])
        assert geometry.is_valid and not geometry.is_empty and geometry.geom_type in ("Polygon", "MultiPolygon")
        for polygon in getattr(geometry, "geoms", [geometry]):
            assert polygon.exterior.is_ring and all(hole.is_ring for hole in polygon.interiors)
        assert shapely.box(0, 0, *size).buffer(0.5).contains(geometry)
        if props["objectType"] == "tile":
            assert name in classes and {f"p_{c}" for c in classes} <= set(props["measurements"])
    return features


def test_cmu_slide_end_to_end(model, tmp_path):
    """The real SVS (skin, not breast: the machinery, not the diagnosis) through the command line."""
    _, path = model
    out = tmp_path / "out"
    code = main(
        [
            "slide",
            str(path),
            str(CMU),
            "--out",
            str(out),
            "--stride-um",
            "161.25",
            "--confirm-top",
            "3",
            "--quiet",
            "--cache-dir",
            str(tmp_path / "cache"),
        ]
    )
    assert code == 0
    folder = out / CMU.stem
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["slide"]["mpp"] == pytest.approx(0.499) and summary["slide"]["mpp_source"] == "openslide.mpp-x/y"
    assert summary["geometry"]["tile_um"] == pytest.approx(1536 * 0.42) and summary["geometry"]["working_mpp"] == 1.68
    assert 0.3 < summary["tissue"]["area_mm2"] < 1.0  # a strip of skin about 0.4 mm wide
    rows = list(csv.DictReader(open(folder / "tiles.csv")))
    assert len(rows) == summary["tiles"]["scored"] > 0 and summary["tiles"]["confirmed"] == 3
    for row in rows:
        assert int(row["width"]) == int(row["height"]) == round(645.12 / 0.499)
        assert float(row["tissue_fraction"]) >= 0.5
        p = [float(row[f"p_{c}"]) for c in ("normal_benign", "in_situ", "invasive")]
        assert sum(p) == pytest.approx(1, abs=1e-4) and float(row["p_carcinoma"]) == pytest.approx(
            p[1] + p[2], abs=1e-5
        )
    features = check_geojson_contract(
        folder / f"{CMU.stem}.geojson.gz", (2220, 2967), ["normal_benign", "in_situ", "invasive"]
    )
    assert sum(f["properties"]["objectType"] == "tile" for f in features) == len(rows)
    grid = np.load(folder / "heatmap.npz")
    assert grid["probs"].shape[:2] == tuple(summary["geometry"]["grid"]) and np.isfinite(
        grid["p_carcinoma"]
    ).sum() == len(rows)
    for name in ("heatmap.png", "mask.png", "mask-outline.png", "report.html"):
        assert (folder / name).stat().st_size > 0
    assert "No slide-level accuracy has been measured" in (folder / "report.html").read_text()
    listing = list(csv.DictReader(open(out / "slides.csv")))
    assert [r["status"] for r in listing] == ["ok"] and listing[0]["call"] == summary["call"]["group"]


def test_tile_geometry_comes_from_the_bundle_and_older_bundles_assume_bach(model):
    """A format-7 bundle records its training images' field and µm/px; one that does not assumes BACH's 0.42
    µm/px and 1536 px with a note; --train-mpp, --tile-um and --stride-um override."""
    from types import SimpleNamespace

    from histoboost.inference import ModelIdentity
    from histoboost.slides.run import slide_geometry

    bundle, _ = model
    assert {k: bundle.meta["training_data"][k] for k in ("field_px", "mpp", "working_mpp")} == {
        "field_px": 1536,
        "mpp": 0.42,
        "working_mpp": 1.68,
    }
    known = slide_geometry(bundle.predictor, SlideSettings())
    assert (known.tile_um, known.stride_um, known.working_mpp, known.notes) == (
        pytest.approx(645.12),
        pytest.approx(645.12),
        1.68,
        (),
    )
    older = SimpleNamespace(config=bundle.config, identity=ModelIdentity())  # a bundle of format 6 or older
    assumed = slide_geometry(older, SlideSettings())
    assert assumed.tile_um == pytest.approx(645.12) and assumed.working_mpp == pytest.approx(1.68)
    assert len(assumed.notes) == 2 and "--train-mpp" in assumed.notes[0]
    given = slide_geometry(older, SlideSettings(train_mpp=0.5, tile_um=500, stride_um=250))
    assert (given.tile_um, given.stride_um, given.working_mpp) == (500, 250, pytest.approx(2.0))
    assert len(given.notes) == 0 and given.tile_size() == 250


@pytest.mark.heavy
def test_mosaic_blocks_get_the_class_predict_gives(mosaic_model, mosaic, tmp_path):
    """Each BACH image in the mosaic is one tile: with the same stain fit (per image) and augmentations on both
    paths, the slide gives each block the class `predict` gives that image; no tile lands on the glass, and
    each tile's GeoJSON box lies on its block."""
    from shapely.geometry import shape

    bundle = mosaic_model
    slide_path, blocks = mosaic
    records, problems = bundle.predict([b[4] for b in blocks])
    assert not problems
    expected = {Path(r["path"]).name: r["class"] for r in records}
    same = SlideSettings(augmentations=bundle.config.augment.n_augment, confirm_top=0, stain_fit="tile")
    scorer = bundle.predictor.using(Runtime(cache_dir=tmp_path / "cache"))
    result = predict_slide(scorer, slide_path, tmp_path / "same", same)
    agree, matched, wanted = 0, 0, []
    for row in result.rows:
        cx, cy = row["x"] + row["width"] / 2, row["y"] + row["height"] / 2
        block = [b for b in blocks if b[0] <= cx < b[2] and b[1] <= cy < b[3]]
        assert block, f"a tile on the glass: {row}"
        x0, y0, x1, y1, image = block[0]
        overlap = (min(x1, row["x"] + row["width"]) - max(x0, row["x"])) * (
            min(y1, row["y"] + row["height"]) - max(y0, row["y"])
        )
        assert overlap / (1536 * 1536) > 0.9
        matched += 1
        wanted.append(expected[image.name])
        agree += row["class"] == wanted[-1]
    assert matched == len(blocks) == 16
    assert agree / matched >= 0.9, f"{agree} of {matched} blocks as predict"

    def block_of(x: float, y: float) -> Path:
        return next(b[4] for b in blocks if b[0] <= x < b[2] and b[1] <= y < b[3])

    by_block = {block_of(r["x"] + r["width"] / 2, r["y"] + r["height"] / 2): r for r in result.rows}
    tiles = [f for f in geojson_features(result.out / "mosaic.geojson.gz") if f["properties"]["objectType"] == "tile"]
    assert len(tiles) == matched
    for feature in tiles:  # each GeoJSON tile lies on the block whose tiles.csv row it carries
        centre = shape(feature["geometry"]).centroid
        row = by_block[block_of(centre.x, centre.y)]
        assert feature["properties"]["classification"]["name"] == row["class"]
        assert feature["properties"]["measurements"]["p_carcinoma"] == row["p_carcinoma"]
    # The slide defaults (one stain fit for the slide, one un-augmented view) move some answers: measured, said.
    default = predict_slide(scorer, slide_path, tmp_path / "default", SlideSettings(confirm_top=0))
    assert len(default.rows) == matched
    moved = sum(a["class"] != b["class"] for a, b in zip(result.rows, default.rows))
    as_predict = sum(row["class"] == w for row, w in zip(default.rows, wanted))
    print(
        f"mosaic: {agree}/{matched} blocks as predict with the same settings; the slide defaults changed {moved} "
        f"of {matched} classes and give {as_predict}/{matched} as predict"
    )


def test_bounds_offset_is_applied_once(model, tmp_path, monkeypatch):
    """A slide with openslide.bounds-* (as MRXS): every output is in the bounds frame, so the same tissue shifted
    inside a larger level 0 gives the same tiles.csv, GeoJSON boxes and heat map, and summary.json states the offset."""
    import openslide

    bundle, _ = model
    settings = SlideSettings(stride_um=161.25, confirm_top=0)
    scorer = bundle.predictor.using(Runtime(cache_dir=tmp_path / "cache"))
    plain = predict_slide(scorer, CMU, tmp_path / "plain", settings)
    real_open = openslide.open_slide
    monkeypatch.setattr(openslide, "open_slide", lambda p: BoundsSlide(real_open(p), (3000, 1700)))
    shifted = predict_slide(scorer, CMU, tmp_path / "shifted", settings)
    assert shifted.summary["slide"]["bounds_offset"] == [3000, 1700] and plain.summary["slide"]["bounds_offset"] == [
        0,
        0,
    ]
    assert (tmp_path / "plain" / "tiles.csv").read_text() == (tmp_path / "shifted" / "tiles.csv").read_text()
    boxes = [
        [f["geometry"] for f in geojson_features(folder / f"{CMU.stem}.geojson.gz")]
        for folder in (tmp_path / "plain", tmp_path / "shifted")
    ]
    assert boxes[0] == boxes[1]
    a, b = np.load(tmp_path / "plain" / "heatmap.npz"), np.load(tmp_path / "shifted" / "heatmap.npz")
    assert np.array_equal(a["start"], b["start"]) and np.allclose(a["p_carcinoma"], b["p_carcinoma"], equal_nan=True)


def test_bad_slides_one_line_each_and_the_others_scored(model, tmp_path, bach, capsys):
    """A non-slide file, a truncated slide, no µm/px, an all-white slide, a tile smaller than the crop and an
    output folder holding another slide's result: one line each; the good slide is still scored."""
    _, path = model
    slides = tmp_path / "slides"
    slides.mkdir()
    (slides / "notes.svs").write_text("not a slide")
    (slides / "truncated.svs").write_bytes(CMU.read_bytes()[:40_000])
    write_mosaic(slides / "no-mpp.tiff", [[bach / "Invasive/iv013.jpeg"]], levels=1, resolution=False)
    write_mosaic(slides / "blank.tiff", [[None]], levels=1)
    (slides / "good.svs").symlink_to(CMU)
    (slides / "clash.svs").symlink_to(CMU)
    out = tmp_path / "out"
    (out / "clash").mkdir(parents=True)
    (out / "clash" / "summary.json").write_text(json.dumps({"slide": {"fingerprint": "another"}}))
    code = main(
        [
            "slide",
            str(path),
            str(slides),
            "--out",
            str(out),
            "--stride-um",
            "161.25",
            "--confirm-top",
            "0",
            "--quiet",
            "--cache-dir",
            str(tmp_path / "cache"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 1
    rows = {Path(r["slide"]).name: r for r in csv.DictReader(open(out / "slides.csv"))}
    assert rows["good.svs"]["status"] == "ok"
    reasons = {name: rows[name]["error"] for name in rows if name != "good.svs"}
    assert "not a slide or image OpenSlide can read" in reasons["notes.svs"]
    assert "holds the result of another slide" in reasons["clash.svs"]
    assert "not a slide or image OpenSlide can read" in reasons["truncated.svs"]
    assert "states no µm/px" in reasons["no-mpp.tiff"] and "--mpp" in reasons["no-mpp.tiff"]
    assert "no tile of" in reasons["blank.tiff"]
    assert len([line for line in err.splitlines() if "error" in line]) == 5 and "Traceback" not in err
    # µm/px that makes a tile smaller than the bundle's crop, and µm/px outside 0.1-2.
    code = main(
        [
            "slide",
            str(path),
            str(slides / "no-mpp.tiff"),
            "--out",
            str(tmp_path / "o2"),
            "--mpp",
            "0.42",
            "--tile-um",
            "100",
            "--quiet",
            "--cache-dir",
            str(tmp_path / "cache"),
        ]
    )
    assert code == 1 and "smaller than the bundle's 192 px crop" in capsys.readouterr().err
    code = main(
        ["slide", str(path), str(slides / "no-mpp.tiff"), "--out", str(tmp_path / "o3"), "--mpp", "5", "--quiet"]
    )
    assert code == 1 and "outside 0.1-2" in capsys.readouterr().err


@pytest.mark.heavy
def test_killed_mid_slide_resumes_with_identical_outputs(model, mosaic, tmp_path):
    """kill -9 while a slide is scored, then rerun: the finished chunks are reused (not rewritten) and every
    output is as an uninterrupted run's. Only the killed run is a process of its own."""
    from test_cli import run_cli

    _, path = model
    slide_path, _ = mosaic
    args = [
        sys.executable,
        "-m",
        "histoboost.cli",
        "slide",
        str(path),
        str(slide_path),
        "--stride-um",
        "322.56",
        "--confirm-top",
        "0",
        "--quiet",
    ]
    reference = run_cli(*args[3:], "--out", tmp_path / "reference", "--cache-dir", tmp_path / "c1")
    assert reference.returncode == 0, reference.stderr
    cache = tmp_path / "c2"
    job = subprocess.Popen([*args, "--out", str(tmp_path / "resumed"), "--cache-dir", str(cache)])
    deadline = time.time() + 600
    while not list(cache.glob("slides/*/map-*.npz")) and time.time() < deadline and job.poll() is None:
        time.sleep(0.2)
    job.send_signal(signal.SIGKILL)
    job.wait()
    finished = {p: p.stat().st_mtime_ns for p in cache.glob("slides/*/map-*.npz")}
    assert finished and not (tmp_path / "resumed" / "mosaic" / "summary.json").exists()
    rerun = run_cli(*args[3:], "--out", tmp_path / "resumed", "--cache-dir", cache)
    assert rerun.returncode == 0, rerun.stderr
    assert all(p.stat().st_mtime_ns == t for p, t in finished.items())
    a, b = tmp_path / "reference" / "mosaic", tmp_path / "resumed" / "mosaic"
    summary = json.loads((b / "summary.json").read_text())
    assert summary["run"]["chunks_reused"] == len(finished)
    assert (a / "tiles.csv").read_bytes() == (b / "tiles.csv").read_bytes()
    assert (a / "mosaic.geojson.gz").read_bytes() == (b / "mosaic.geojson.gz").read_bytes()
    for key in ("probs", "decision", "tissue"):
        assert np.array_equal(np.load(a / "heatmap.npz")[key], np.load(b / "heatmap.npz")[key], equal_nan=True)
    drop = lambda s: {k: v for k, v in s.items() if k != "run"}  # noqa: E731
    assert drop(json.loads((a / "summary.json").read_text())) == drop(summary)


def test_slide_features_come_out_in_tridents_layout(model, mosaic, tmp_path):
    """`slide --features h5`: <slide>.h5 read with plain h5py holds one row per tiles.csv row, at its coordinates
    (in OpenSlide's level 0),
    and they are the rows the classifier scored (its probabilities from them are tiles.csv's); a rerun from the
    tile cache writes the same file's arrays."""
    import h5py
    from test_cli import run_cli

    from histoboost.bundle import descriptor_width

    bundle, path = model
    slide_path, _ = mosaic
    flags = ["--stride-um", "322.56", "--confirm-top", "0", "--features", "h5", "--quiet"]
    first = run_cli("slide", path, slide_path, *flags, "--out", tmp_path / "a", "--cache-dir", tmp_path / "cache")
    assert first.returncode == 0, first.stderr
    rows = list(csv.DictReader(open(tmp_path / "a" / "mosaic" / "tiles.csv")))
    with h5py.File(tmp_path / "a" / "mosaic" / "mosaic.h5", "r") as h5:
        features, coords, meta, coord_meta = (
            h5["features"][:],
            h5["coords"][:],
            dict(h5.attrs),
            dict(h5["coords"].attrs),
        )
    assert features.dtype == np.float32 and features.shape == (
        len(rows),
        descriptor_width(bundle.backbones, bundle.config),
    )
    ox, oy = json.loads((tmp_path / "a" / "mosaic" / "summary.json").read_text())["slide"]["bounds_offset"]
    assert coords.tolist() == [[int(r["x"]) + ox, int(r["y"]) + oy] for r in rows]  # OpenSlide's level 0
    assert list(meta["bounds_offset"]) == [ox, oy]
    assert coord_meta["patch_size_level0"] == int(rows[0]["width"])
    assert meta["encoder"] == "efficientnet_lite0" and meta["weights_sha256"] == bundle.backbones[0].weights_sha256
    assert meta["bundle_sha256"] == bundle.sha256 and meta["target_mpp"] > 0
    raw = bundle.classifier.predict_proba(features)[:, None, :]
    probs = bundle.rule.calibrated(raw).mean(axis=1)
    written = np.array([[float(r[f"p_{c}"]) for c in bundle.classes.classes] for r in rows])
    assert np.abs(probs - written).max() <= 1e-6
    import histoboost.inference

    with pytest.MonkeyPatch.context() as cached:  # the rerun reads every tile's features from the tile cache
        cached.setattr(histoboost.inference.Predictor, "describe_tiles", lambda *a: pytest.fail("described again"))
        again = run_cli("slide", path, slide_path, *flags, "--out", tmp_path / "b", "--cache-dir", tmp_path / "cache")
    assert again.returncode == 0, again.stderr
    with h5py.File(tmp_path / "b" / "mosaic" / "mosaic.h5", "r") as h5:
        assert np.array_equal(h5["features"][:], features) and np.array_equal(h5["coords"][:], coords)
    plain = run_cli("slide", path, slide_path, "--out", tmp_path / "c", "--quiet", "--confirm-top", "0")
    assert plain.returncode == 0 and not (tmp_path / "c" / "mosaic" / "mosaic.h5").exists()
    mixed = run_cli(
        "slide", path, slide_path, "--features", "h5", "--slide-augmentations", "2", "--out", tmp_path / "d"
    )
    assert mixed.returncode == 2 and "drop --slide-augmentations" in mixed.stderr
