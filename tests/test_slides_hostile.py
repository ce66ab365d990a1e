"""Hostile whole slides and output places (docs/security.md, "Whole slides and outputs"): a garbled slide, headers
that claim giant images, --roi and --tissue-mask files that are not what they say, output folders that cannot be
written or hold the user's files, a killed run's staging folders and slide names that are paths. Every fixture is
made at test time; each case is one line, and the other slides are still scored."""

from __future__ import annotations

import csv
import errno
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from histoboost.cli import main
from histoboost.slides import SlideError, open_slide, reader

from conftest import CMU

FLAGS = ["--stride-um", "161.25", "--confirm-top", "0", "--quiet"]


def write_claim(path: Path, width: int, height: int, levels: int = 1, tile: int = 4096, mpp: float = 0.25) -> Path:
    """A tiled TIFF whose header claims `width` x `height` px (and `levels` pyramid levels, each 4x smaller) at `mpp`
    with no tile written (offsets and byte counts 0): a few kB to 1 MB, whatever the claim."""
    out = bytearray(b"II*\x00\x00\x00\x00\x00")
    directories = []

    def put(data: bytes) -> int:
        out.extend(data + b"\x00" * (len(data) % 2))
        return len(out) - len(data) - len(data) % 2

    for level in range(levels):
        w, h = max(1, width // 4**level), max(1, height // 4**level)
        n = math.ceil(w / tile) * math.ceil(h / tile)
        bits, zeros = put(struct.pack("<3H", 8, 8, 8)), put(bytes(4 * n))
        resolution = put(struct.pack("<2I", round(1e7 / (mpp * 4**level)), 1000))  # px per cm
        tags = [
            (256, 4, 1, w),
            (257, 4, 1, h),
            (258, 3, 3, bits),
            (259, 3, 1, 1),
            (262, 3, 1, 2),
            (277, 3, 1, 3),
            (282, 5, 1, resolution),
            (283, 5, 1, resolution),
            (284, 3, 1, 1),
            (296, 3, 1, 3),
            (322, 4, 1, tile),
            (323, 4, 1, tile),
            (324, 4, n, zeros),
            (325, 4, n, zeros),
        ]
        if level:
            tags.insert(0, (254, 4, 1, 1))  # NewSubfileType: a reduced-resolution copy
        directories.append(len(out))
        out.extend(struct.pack("<H", len(tags)))
        for tag, kind, count, value in tags:
            out.extend(struct.pack("<HHI", tag, kind, count))
            out.extend(struct.pack("<HH", value, 0) if kind == 3 and count == 1 else struct.pack("<I", value))
        out.extend(bytes(4))  # the next directory's offset, filled in below
    struct.pack_into("<I", out, 4, directories[0])
    for here, following in zip(directories, directories[1:]):
        struct.pack_into("<I", out, here + 2 + 12 * struct.unpack_from("<H", out, here)[0], following)
    path.write_bytes(bytes(out))
    return path


def write_garbled(path: Path) -> Path:
    """The real CMU SVS with the middle half of every full-resolution JPEG tile overwritten by random bytes."""
    import tifffile

    shutil.copy(CMU, path)
    path.chmod(0o644)
    with tifffile.TiffFile(CMU) as tif:
        page = tif.pages[0]
        spans = list(zip(page.dataoffsets, page.databytecounts))
    rng = np.random.default_rng(0)
    with open(path, "r+b") as handle:
        for offset, count in spans:
            handle.seek(offset + count // 4)
            handle.write(rng.integers(0, 256, count // 2, dtype=np.uint8).tobytes())
    return path


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One tile cache for the module: the CMU slide's tiles are scored once, then reused."""
    return tmp_path_factory.mktemp("slide-cache")


def slides_csv(out: Path) -> dict[str, dict]:
    return {Path(r["slide"]).name: r for r in csv.DictReader(open(out / "slides.csv", encoding="utf-8"))}


# -- slides that fail: one line each, the others scored ------------------------------------------------------


def test_a_garbled_slide_and_giant_claims_are_one_line_each_and_the_others_scored(model, cache, tmp_path, capsys):
    """Garbled JPEG tiles (OpenSlideError), a 2,000,000² px claim with a pyramid and a 200,000² px one without:
    one line each in slides.csv and on stderr, exit status 1; the real slide and a slide named `..svs` (whose stem
    is ".") are scored into folders of OUT, and the user's file in OUT stays."""
    _, path = model
    slides = tmp_path / "slides"
    slides.mkdir()
    write_garbled(slides / "garbled.svs")
    write_claim(slides / "giant.tif", 2_000_000, 2_000_000, levels=5)
    write_claim(slides / "flat.tif", 200_000, 200_000)
    (slides / "good.svs").symlink_to(CMU)
    (slides / "..svs").symlink_to(CMU)
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("the user's own file")
    code = main(["slide", str(path), str(slides), "--out", str(out), *FLAGS, "--cache-dir", str(cache)])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    rows = slides_csv(out)
    assert {n: r["status"] for n, r in rows.items()} == {
        "garbled.svs": "error",
        "giant.tif": "error",
        "flat.tif": "error",
        "good.svs": "ok",
        "..svs": "ok",
    }
    assert "could not be read (OpenSlideError: " in rows["garbled.svs"]["error"]
    assert "claims 2000000x2000000 px, over the --max-pixels budget of 2e+10" in rows["giant.tif"]["error"]
    assert "without a pyramid" in rows["flat.tif"]["error"] and "vips tiffsave" in rows["flat.tif"]["error"]
    for name in ("garbled.svs", "giant.tif", "flat.tif"):
        assert rows[name]["error"].startswith(str(slides / name)) and "\n" not in rows[name]["error"]
        assert sum(str(slides / name) in line for line in err.splitlines()) == 1
    assert rows["..svs"]["out"] == str(out / "slide-.")
    assert (out / "slide-." / "summary.json").is_file() and (out / "good" / "summary.json").is_file()
    assert (out / "mine.txt").read_text() == "the user's own file"
    assert sorted(p.name for p in out.iterdir()) == ["good", "mine.txt", "slide-.", "slides.csv"]


def test_a_two_million_squared_claim_is_refused_before_anything_is_allocated(tmp_path):
    """The header is refused before anything is allocated or decoded (it used to allocate 43.7 GiB)."""
    import tracemalloc

    giant = write_claim(tmp_path / "giant.tif", 2_000_000, 2_000_000, levels=5)
    tracemalloc.start()
    try:
        with pytest.raises(SlideError, match="over the --max-pixels budget"):
            open_slide(giant)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20
    with pytest.raises(SlideError, match="no image data"):  # a larger budget admits the claim: no tile is there
        open_slide(giant, max_pixels=5e12)


def test_a_slide_without_a_small_level_is_refused_with_how_to_make_a_pyramid(tmp_path):
    """Within the pixel budget but no level a thumbnail may decode: a single level of 100,000 x 50,000 px (it
    would take minutes at full CPU), or a pyramid whose smallest level is still too large."""
    for claim, said in (
        (write_claim(tmp_path / "flat.tif", 100_000, 50_000), "without a pyramid"),
        (write_claim(tmp_path / "gap.tif", 200_000, 100_000, levels=2), "whose smallest level"),
    ):
        with pytest.raises(SlideError, match=f"{said} holds .* more than a thumbnail may decode") as caught:
            open_slide(claim)
        assert "vips tiffsave IN OUT.tif --tile --pyramid" in str(caught.value)


def test_a_thumbnail_reads_a_coarser_level_when_the_right_one_is_over_budget(tmp_path, bach, monkeypatch):
    from mosaic import write_mosaic

    path = tmp_path / "block.tiff"
    write_mosaic(path, [[bach / "InSitu/is013.jpeg"]], levels=3)
    slide = open_slide(path)
    try:
        reads = []
        real = slide.read
        monkeypatch.setattr(slide, "read", lambda box, size, level=None: reads.append(level) or real(box, size, level))
        slide.thumbnail(0.84)
        assert set(reads) == {1}  # level 1 is 0.84 µm/px
        monkeypatch.setattr(reader, "MAX_THUMBNAIL_READ", slide.size[0] * slide.size[1] / 16)  # level 2 and under
        reads.clear()
        thumb, _ = slide.thumbnail(0.84)
        assert set(reads) == {2} and thumb.shape[:2] == (round(slide.size[1] / 2), round(slide.size[0] / 2))
    finally:
        slide.close()


def test_every_read_error_of_a_slide_is_its_one_line(tmp_path, monkeypatch):
    """What OpenSlide, Pillow, tifffile, numpy (an allocation) or the OS raise while one slide is read or written
    becomes that slide's row, naming the slide (and the file, for a system error)."""
    import openslide
    import tifffile

    from histoboost.slides import run

    slide = tmp_path / "a.svs"
    errors = {
        "OpenSlideError": (openslide.OpenSlideError("Corrupt JPEG data"), "could not be read (OpenSlideError"),
        "TiffFileError": (tifffile.TiffFileError("not a TIFF file"), "could not be read (TiffFileError"),
        "DecompressionBombError": (Image.DecompressionBombError("too many pixels"), "could not be read"),
        "truncated": (OSError("image file is truncated"), "could not be read (OSError: image file is truncated"),
        "ValueError": (ValueError("bad"), "could not be read (ValueError: bad)"),
        "disk": (
            OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "cache" / "x.npz")),
            f"No space left on device ({tmp_path / 'cache' / 'x.npz'})",
        ),
    }
    with pytest.raises(MemoryError) as caught:  # numpy's _ArrayMemoryError, raised without allocating
        np.empty(2**62, dtype=np.uint8)
    errors["MemoryError"] = (caught.value, "ran out of memory reading it (Unable to allocate")
    for name, (error, said) in errors.items():

        def fail(*args, error=error, **kwargs):
            raise error

        monkeypatch.setattr(run, "predict_slide", fail)
        row = run.slide_row(None, slide, tmp_path / "out", run.SlideSettings())
        assert row["status"] == "error" and row["error"].startswith(f"{slide}: ") and said in row["error"], name


def test_a_garbled_slide_on_a_dask_worker_is_its_one_line(model, tmp_path):
    """The engine task a Dask worker runs (slides.run.slide_task) returns the garbled slide's row: no exception
    crosses to the client, so the other slides' tasks go on."""
    import torch

    from histoboost.bundle import load_predictor
    from histoboost.runtime import Runtime
    from histoboost.slides.run import ModelSource, SlideSettings, SlideTask, slide_task

    bundle, path = model
    garbled = write_garbled(tmp_path / "garbled.svs")
    source = ModelSource(str(path), bundle.sha256, {}, load_predictor)
    row = slide_task(
        SlideTask(
            source,
            garbled,
            tmp_path / "out",
            SlideSettings(confirm_top=0),
            Runtime(cache_dir=tmp_path / "cache"),
            torch.get_num_threads(),
        )
    )
    assert row["status"] == "error" and "could not be read (OpenSlideError" in row["error"]


@pytest.mark.heavy
def test_slides_on_dask_go_on_past_a_garbled_slide(model, cache, tmp_path):
    pytest.importorskip("distributed")
    from test_cli import run_cli

    _, path = model
    slides = tmp_path / "slides"
    slides.mkdir()
    write_garbled(slides / "garbled.svs")
    (slides / "good.svs").symlink_to(CMU)
    result = run_cli(
        "slide",
        path,
        slides,
        "--out",
        tmp_path / "out",
        *FLAGS,
        "--cache-dir",
        cache,
        "--engine",
        "dask",
        "--workers",
        "1",
        "--threads",
        "1",
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    rows = slides_csv(tmp_path / "out")
    assert rows["good.svs"]["status"] == "ok" and "OpenSlideError" in rows["garbled.svs"]["error"]


# -- output places -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["under-a-file", "proc"])
def test_an_out_that_cannot_be_written_is_refused_before_any_work(where, model, small_folder, tmp_path, capsys):
    """slide, predict and cv: a place below a regular file, or in /proc (no file can be made there, even by root,
    for whom permission bits stop nothing), is refused in one line before anything is read or computed."""
    _, path = model
    (tmp_path / "file.txt").write_text("a file")
    base = tmp_path / "file.txt" if where == "under-a-file" else Path("/proc")
    image = str(next(small_folder.rglob("*.jpeg")))
    cache = tmp_path / "cache"
    for args in (
        ["slide", str(path), str(CMU), "--out", str(base / "hb-test" / "slides")],
        [
            "predict",
            str(path),
            image,
            "--out",
            str(base / "hb-test.csv") if where == "proc" else str(base / "hb-test" / "p.csv"),
        ],
        ["cv", str(small_folder), "--out", str(base / "hb-test" / "run"), "--cache-dir", str(cache)],
    ):
        assert main([*args, "--quiet"]) == 2, args[0]
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and (
            "is not a folder" in err or "cannot write there" in err or "no such folder" in err
        ), err
    assert not cache.exists() and (tmp_path / "file.txt").read_text() == "a file"


def test_a_users_slides_csv_is_never_overwritten(model, tmp_path, capsys):
    _, path = model
    out = tmp_path / "out"
    out.mkdir()
    (out / "slides.csv").write_text("patient,notes\n17,years of work\n")
    assert main(["slide", str(path), str(CMU), "--out", str(out), *FLAGS]) == 2
    assert "slides.csv exists and was not written by histoboost" in capsys.readouterr().err
    assert (out / "slides.csv").read_text() == "patient,notes\n17,years of work\n"
    assert sorted(p.name for p in out.iterdir()) == ["slides.csv"]


def test_a_full_disk_names_the_slide_and_the_file_and_leaves_no_staging(model, cache, tmp_path, monkeypatch):
    """A write that fails (here: no space left) is the slide's line with the slide and where it was writing;
    the staging folder is removed, and the next run writes over histoboost's own slides.csv."""
    from histoboost.slides import export

    _, path = model
    out = tmp_path / "out"

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export, "write_heatmap_npz", full)
    assert main(["slide", str(path), str(CMU), "--out", str(out), *FLAGS, "--cache-dir", str(cache)]) == 1
    error = slides_csv(out)[CMU.name]["error"]
    assert error.startswith(f"{CMU}: its results could not be written to {out / CMU.stem} (No space left on device)")
    assert sorted(p.name for p in out.iterdir()) == ["slides.csv"]
    monkeypatch.undo()
    assert main(["slide", str(path), str(CMU), "--out", str(out), *FLAGS, "--cache-dir", str(cache)]) == 0
    assert slides_csv(out)[CMU.name]["status"] == "ok"


def test_a_killed_runs_staging_folder_is_cleared_by_the_next_run(tmp_path):
    """SIGKILL inside `staged_folder` leaves its folder; the next staging beside it removes it (its writer is dead)
    together with a day-old one from another machine, and keeps a fresh one from another machine and every file
    histoboost did not name."""
    from histoboost import storage
    from histoboost.outputs import staged_folder

    out = tmp_path / "out"
    out.mkdir()
    killed = subprocess.run(
        [
            sys.executable,
            "-c",
            (
                "import os, signal, sys\nfrom pathlib import Path\nfrom histoboost.outputs import staged_folder\n"
                "with staged_folder(Path(sys.argv[1]) / 'a') as staging:\n"
                "    (staging / 'tiles.csv').write_text('half')\n    os.kill(os.getpid(), signal.SIGKILL)\n"
            ),
            str(out),
        ]
    )
    assert killed.returncode == -9
    left = [p for p in out.iterdir() if p.name.startswith(".a.staging-")]
    assert len(left) == 1 and (left[0] / "tiles.csv").is_file()
    old = out / ".b.staging-x1.elsewhere.42.0123abcd.tmp"
    fresh = out / ".c.staging-x2.elsewhere.43.4567cdef.tmp"
    mine = out / ".notes.tmp"
    for folder in (old, fresh):
        folder.mkdir()
    mine.write_text("the user's")
    day = time.time() - 86400
    for item in (old, mine):
        os.utime(item, (day, day))
    with staged_folder(out / "d") as staging:
        (staging / "tiles.csv").write_text("whole")
    assert sorted(p.name for p in out.iterdir()) == sorted([fresh.name, mine.name, "d"])
    assert storage.clear_abandoned(out, pattern=".*.staging-*.tmp") == []


def test_result_folders_are_children_of_out_whatever_the_name():
    from histoboost.slides.run import result_name

    out = Path("/data/out")
    for name, folder in (
        ("..svs", "slide-."),
        ("...svs", "slide-.."),
        (".hidden.svs", "slide-.hidden"),
        ("a\nb\x1b.svs", "a_b_"),
        ("\udcff.svs", "_"),
        ("r\u202egpj.svs", "r_gpj"),
        ("CMU-1 (copy).svs", "CMU-1 (copy)"),
        ("ß.ndpi", "ß"),
    ):
        got = result_name(Path(name))
        assert got == folder and (out / got).parent == out and not got.startswith("."), name


# -- --roi and --tissue-mask ---------------------------------------------------------------------------------

POLYGON = {"type": "Polygon", "coordinates": [[[100, 100], [900, 100], [900, 900], [100, 900], [100, 100]]]}


@pytest.mark.parametrize(
    "name, text, said",
    [
        ("nested", "[" * 100_000 + "]" * 100_000, "nested deeper than any GeoJSON"),
        ("digits", json.dumps(POLYGON).replace("900, 900", "9" * 4000 + ", 900"), "not a finite number"),
        (
            "hexagon",
            json.dumps({"type": "Feature", "geometry": {"type": "Hexagon", "coordinates": []}}),
            "holds a 'Hexagon' where a Polygon",
        ),
        ("nan", json.dumps(POLYGON).replace("900, 900", "NaN, 900"), "not a finite number"),
        ("infinity", json.dumps(POLYGON).replace("900, 900", "-Infinity, 900"), "not a finite number"),
        ("deep", "[" * 40 + json.dumps(POLYGON) + "]" * 40, "nests objects more than 16 deep"),
        (
            "vertex",
            json.dumps({"type": "Polygon", "coordinates": [[[[1, [2]]], [3, 4], [5, 6]]]}),
            "at least 3 distinct",
        ),
        (
            "outside",
            json.dumps({"type": "Polygon", "coordinates": [[[5e6, 5e6], [6e6, 5e6], [6e6, 6e6]]]}),
            "--roi polygons lie outside the slide",
        ),
    ],
)
def test_a_hostile_roi_is_one_line_naming_the_file(name, text, said, tmp_path):
    from histoboost.slides.tissue import mask_from_geojson

    roi = tmp_path / f"{name}.geojson"
    roi.write_text(text)
    with pytest.raises(SlideError) as caught:
        mask_from_geojson(roi, (125, 125), 8.0)
    message = str(caught.value)
    assert message.startswith(f"{roi}: --roi ") and said in message and "\n" not in message
    ok = tmp_path / "ok.geojson"
    ok.write_text(json.dumps({"type": "GeometryCollection", "geometries": [POLYGON]}))
    assert mask_from_geojson(ok, (125, 125), 8.0).sum() == pytest.approx(100 * 100, rel=0.05)


def test_roi_and_mask_problems_through_the_command_are_the_slides_line(model, tmp_path, capsys):
    """A Hexagon --roi and a 1000x3 px --tissue-mask (it would be stretched over a 2220x2967 slide): exit status 1,
    one line, no tile scored; a mask of the slide's shape at another resolution is taken."""
    _, path = model
    roi = tmp_path / "roi.geojson"
    roi.write_text(json.dumps({"type": "Feature", "geometry": {"type": "Hexagon", "coordinates": []}}))
    Image.new("L", (1000, 3), 255).save(tmp_path / "wide.png")
    for flag, value, said in (
        ("--roi", roi, "holds a 'Hexagon'"),
        ("--tissue-mask", tmp_path / "wide.png", "--tissue-mask is 1000x3 px, not the slide's"),
    ):
        out = tmp_path / flag.strip("-")
        assert main(["slide", str(path), str(CMU), "--out", str(out), flag, str(value), *FLAGS]) == 1
        err = capsys.readouterr().err
        assert said in slides_csv(out)[CMU.name]["error"] and said in err and "Traceback" not in err
    from histoboost.slides.tissue import mask_from_png

    Image.new("L", (222, 297), 255).save(tmp_path / "same.png")  # the slide's shape at 10 px per px
    assert mask_from_png(tmp_path / "same.png", (371, 278)).all()
