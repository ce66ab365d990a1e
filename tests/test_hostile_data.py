"""Hostile data (the W/T/U rows of shared/reference/research/hostile-inputs.md): content keys, 16-bit
images, images without tissue, broken manifests and layouts, non-UTF-8 names, and bounded fuzzing."""

import errno
import hashlib
import io
import os
import shutil
import struct
import tempfile
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, PngImagePlugin

from histoboost import storage
from histoboost.cli import main
from histoboost.config import PreprocessConfig, StainConfig
from histoboost.data import (
    DataError,
    Manifest,
    Problem,
    content_key,
    find_images,
    load_manifest,
    read_image,
    scan_file,
    tissue_problem,
)
from histoboost.data import images as data_images
from histoboost.storage import write_text_atomic

from conftest import tissue_like, write_png

FUZZ = settings(
    max_examples=500,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


def _with_jpeg_segments(data: bytes, *segments: tuple[bytes, bytes]) -> bytes:
    """A JPEG with extra marker segments (COM, APP1 Exif, ...) right after its start marker: new metadata,
    same pixels."""
    extra = b"".join(marker + struct.pack(">H", len(body) + 2) + body for marker, body in segments)
    return data[:2] + extra + data[2:]


def _problems(caught) -> dict[str, Problem]:
    return {p.path.name: p for p in caught.value.problems}


# -- 1. content key --------------------------------------------------------------------------------


def test_content_key_ignores_metadata_and_sees_every_pixel(tmp_path, bach):
    original = (bach / "Benign" / "b001.jpeg").read_bytes()
    exif = Image.Exif()
    exif[0x0131] = "some scanner 1.0"  # Software
    (tmp_path / "a.jpeg").write_bytes(original)
    (tmp_path / "a_comment.jpeg").write_bytes(_with_jpeg_segments(original, (b"\xff\xfe", b"exported by X")))
    (tmp_path / "a_exif.jpeg").write_bytes(_with_jpeg_segments(original, (b"\xff\xe1", exif.tobytes())))
    tissue_like((200, 120)).save(tmp_path / "p.png")
    text = PngImagePlugin.PngInfo()
    text.add_text("Comment", "annotated later")
    tissue_like((200, 120)).save(tmp_path / "p_text.png", pnginfo=text)
    changed = np.asarray(tissue_like((200, 120))).copy()
    changed[60, 100, 1] ^= 1
    Image.fromarray(changed).save(tmp_path / "p_pixel.png")

    infos = {p.name: scan_file(p) for p in tmp_path.iterdir()}
    assert len({hashlib.sha256(p.read_bytes()).digest() for p in tmp_path.iterdir()}) == 6  # all bytes differ
    assert infos["a.jpeg"].image_id == infos["a_comment.jpeg"].image_id == infos["a_exif.jpeg"].image_id
    assert infos["p.png"].image_id == infos["p_text.png"].image_id != infos["p_pixel.png"].image_id
    assert infos["a.jpeg"].image_id == content_key(read_image(tmp_path / "a.jpeg"))
    header = b"histoboost-rgb8:200:120\n"
    assert infos["p_pixel.png"].image_id == hashlib.sha256(header + changed.tobytes()).hexdigest()
    with pytest.raises(ValueError, match="RGB uint8"):
        content_key(changed.astype(np.float32))


def test_pixel_identical_files_are_duplicates(tmp_path, bach):
    (tmp_path / "Normal").mkdir()
    (tmp_path / "Invasive").mkdir()
    original = (bach / "Normal" / "n001.jpeg").read_bytes()
    (tmp_path / "Normal" / "n001.jpeg").write_bytes(original)
    (tmp_path / "Invasive" / "n001_commented.jpeg").write_bytes(_with_jpeg_segments(original, (b"\xff\xfe", b"x")))
    with pytest.raises(DataError) as caught:
        load_manifest(tmp_path)
    assert set(_problems(caught)) == {"n001.jpeg", "n001_commented.jpeg"}
    assert all("leak" in p.message for p in caught.value.problems)


# -- 2. 16-bit images -------------------------------------------------------------------------------


@pytest.mark.parametrize("mode, suffix", [("I;16", ".png"), ("I;16", ".tif"), ("I;16B", ".tif"), ("I", ".tif")])
def test_16_bit_grayscale_is_scaled_to_8_bits(tmp_path, mode, suffix):
    values = np.add.outer(np.arange(48) * 300, np.arange(64) * 800).astype(np.uint16)  # 0 .. 64500, a gradient
    if mode == "I;16B":
        image = Image.frombytes(mode, (64, 48), values.astype(">u2").tobytes())
    else:
        image = Image.fromarray(values.astype(np.int32) if mode == "I" else values)
    path = tmp_path / f"gray16{suffix}"
    image.save(path)
    info = scan_file(path)
    expected = np.repeat((values >> 8).astype(np.uint8)[..., None], 3, axis=-1)
    assert not isinstance(info, Problem), info
    assert info.mode == mode and info.image_id == content_key(expected)
    assert np.array_equal(read_image(path), expected)
    assert len(np.unique(read_image(path))) > 100


# -- 3. images without tissue -----------------------------------------------------------------------

rng = np.random.default_rng(0)
BLANKS = {
    "white.png": (np.full((512, 512, 3), 255, np.uint8), "no tissue: 0.0% of pixels stained"),
    "black.png": (np.zeros((512, 512, 3), np.uint8), "too dark: 100% of pixels near black"),
    "grey.png": (np.full((512, 512, 3), 128, np.uint8), "no tissue: one flat colour"),
    "pale.jpeg": (np.full((512, 512, 3), 245, np.uint8), "no tissue: 0.0% of pixels stained"),
    "noise.png": (rng.integers(0, 256, (512, 512, 3), dtype=np.uint8), "looks like noise, not tissue"),
    "one_pixel.png": (np.array([[[200, 100, 150]]], np.uint8), "no tissue: one flat colour"),
}


@pytest.mark.parametrize("stain", ["none", "macenko"])
def test_images_without_tissue_are_refused_whatever_the_stain_setting(tmp_path, bach, stain):
    for name, (pixels, _) in BLANKS.items():
        (tmp_path / "Normal").mkdir(exist_ok=True)
        Image.fromarray(pixels).save(tmp_path / "Normal" / name)
    shutil.copy(bach / "Invasive" / "iv001.jpeg", tmp_path / "Normal" / "real.jpeg")
    with pytest.raises(DataError) as caught:
        load_manifest(tmp_path, PreprocessConfig(scale=1.0, stain=StainConfig(stain)))
    problems = _problems(caught)
    assert sorted(problems) == sorted(BLANKS)  # one problem per blank image, none for the real one
    for name, (_, message) in BLANKS.items():
        assert problems[name].severity == "error" and problems[name].message.startswith(message)
        assert "remove it" in problems[name].fix and "\n" not in str(problems[name])


def test_every_real_image_and_a_mostly_fat_one_show_tissue(bach, bach_image):
    manifest, _ = load_manifest(bach)
    assert len(manifest) == 144  # every shared BACH image passes the check
    fat = bach_image("Normal/n096", 0.5).copy()  # the palest BACH image: 37% of pixels stained
    fat[: int(fat.shape[0] * 0.85)] = (238, 236, 240)  # 85% of it replaced by unstained fat: 1.8% stained
    assert tissue_problem(fat) is None
    fat[: int(fat.shape[0] * 0.97)] = (238, 236, 240)
    assert tissue_problem(fat).startswith("no tissue: 0.")
    assert tissue_problem(np.zeros((0, 5, 3), np.uint8)) == "no pixels (a 0x0 image)"
    noise_column = rng.integers(0, 256, (300, 1, 3), dtype=np.uint8)
    assert tissue_problem(noise_column).startswith("looks like noise")


# -- 4. manifests and layouts -----------------------------------------------------------------------


def test_label_and_group_that_disagree_are_an_error_per_row(tmp_path):
    for seed, name in enumerate(["n001.png", "iv001.png", "x.png"]):
        write_png(tmp_path / "img" / name, seed=seed)
    (tmp_path / "m.csv").write_text(
        "path,label,group\nimg/n001.png,Normal,2\nimg/iv001.png,Invasive,0\nimg/x.png,Lymphoma,2\n"
    )
    with pytest.raises(DataError) as caught:
        load_manifest(tmp_path / "m.csv")
    problems = _problems(caught)
    assert sorted(problems) == ["iv001.png", "n001.png"]
    assert problems["n001.png"].message == (
        "label 'Normal' means group 0 (normal_benign) but the group column on line 2 of m.csv says 2 (invasive)"
    )
    assert "--label-map 'Normal=2'" in problems["n001.png"].fix
    manifest, _ = load_manifest(tmp_path / "m.csv", label_map={"Normal": 2, "Invasive": 0})
    assert [r.group for r in manifest] == [0, 2, 2]


def test_manifest_header_problems_name_the_fix(tmp_path):
    write_png(tmp_path / "a.png")
    manifest = tmp_path / "m.csv"
    cases = {
        "path,label,label\na.png,Normal,Invasive\n": "column 'label' appears more than once in the header (keep one)",
        "path;label\na.png;Normal\n": "missing column(s) label, path (separate the columns with commas, not ';')",
        "file,class\na.png,Normal\n": "missing column(s) label, path (the first line must name the columns",
        "path,label\n": "the CSV lists no images, only its header",
        "\n\n": "empty file",
    }
    for text, message in cases.items():
        manifest.write_text(text)
        with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
            load_manifest(manifest)
    manifest.write_text("Path , LABEL,Patient,Site\na.png,Normal,p1,A\n")
    loaded, _ = load_manifest(manifest)
    assert loaded.records[0].label == "Normal" and loaded.records[0].patient == "p1" and loaded.column("Site") == ["A"]


def test_manifest_not_in_utf8_is_one_line_naming_the_fix(tmp_path):
    write_png(tmp_path / "a.png")
    (tmp_path / "m.csv").write_bytes("path,label,patient\na.png,Normal,José\n".encode("latin-1"))
    with pytest.raises(DataError) as caught:
        load_manifest(tmp_path / "m.csv")
    assert str(caught.value) == f"{tmp_path / 'm.csv'}: not UTF-8 text, byte 0xe9 on line 2 (save it as UTF-8)"


def test_manifest_rows_say_what_is_wrong(tmp_path):
    for seed, name in enumerate(["a.png", "b.png", "c.png"]):
        write_png(tmp_path / name, seed=seed)
    (tmp_path / "folder.png").mkdir()
    os.symlink(tmp_path / "gone.png", tmp_path / "dangling.png")
    (tmp_path / "m.csv").write_text(
        "path,label,patient\na.png,,p1\nb.png,Normal,p1,extra\nfolder.png,Normal\n"
        "dangling.png,Normal\n,Normal\n\nc.png,Invasive,\n"
    )
    with pytest.raises(DataError) as caught:
        load_manifest(tmp_path / "m.csv")
    messages = [p.message for p in caught.value.problems]
    assert messages == [
        "empty label on line 2 of m.csv",
        "4 fields on line 3 of m.csv, but 3 columns in the header",
        "listed on line 4 of m.csv but is a folder",
        f"listed on line 5 of m.csv but is a broken symbolic link (to {tmp_path / 'gone.png'})",
        "empty path on line 6 of m.csv",
    ]


def test_rows_that_list_a_file_again_are_counted_once_or_a_leak_found_before_any_image_is_read(tmp_path, monkeypatch):
    write_png(tmp_path / "a.png", seed=1)
    (tmp_path / "m.csv").write_text("path,label\na.png,Normal\na.png,Benign\na.png,Invasive\nmissing.png,Normal\n")
    monkeypatch.setattr(data_images, "scan_file", lambda path: pytest.fail(f"{path} decoded before the check"))
    with pytest.raises(DataError, match=r"^2 unusable file\(s\) under ") as caught:
        load_manifest(tmp_path / "m.csv")
    assert [(p.severity, p.message) for p in caught.value.problems] == [
        ("warning", "listed again on line 3 of m.csv (first on line 2): counted once"),
        (
            "error",
            "listed again on line 4 of m.csv as invasive, on line 2 as normal_benign: the same image in "
            "training and test would leak",
        ),
        ("error", "listed on line 5 of m.csv but not found"),
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "m.csv"]  # few problems: no file written


def test_100000_missing_files_are_counted_named_five_times_and_listed_in_a_file(tmp_path, capsys):
    (tmp_path / "m.csv").write_text("path,label\n" + "".join(f"gone/{i:06d}.png,Normal\n" for i in range(100_000)))
    assert main(["inspect", str(tmp_path / "m.csv"), "--quiet", "--no-stain-check"]) == 1
    lines = capsys.readouterr().err.splitlines()
    listing = tmp_path / "m.csv.problems.txt"
    assert len(lines) == 7 and sum(" but not found " in line for line in lines) == 5
    assert any(
        line.startswith(
            f"error: {listing}: 100,000 problems (100,000 error(s), 0 warning(s)), too many to "
            "print: the first 5 of each kind are shown"
        )
        for line in lines
    )
    assert lines[-1] == (
        f"histoboost: error: 100,000 unusable file(s) under {tmp_path}; all 100,000 problems are listed in {listing}"
    )
    written = listing.read_text().splitlines()
    assert len(written) == 100_000 and written[-1] == (
        f"error: {tmp_path / 'gone/099999.png'}: listed on line "
        "100001 of m.csv but not found (fix the path or remove the row)"
    )


def test_problems_of_a_read_only_data_folder_are_listed_in_a_temporary_file(tmp_path, monkeypatch):
    (tmp_path / "m.csv").write_text("path,label\n" + "gone.png,Normal\n" * 60)
    monkeypatch.setattr(storage, "temporary_for", lambda target: tmp_path / "read-only" / target.name)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    with pytest.raises(DataError) as caught:
        load_manifest(tmp_path / "m.csv")
    listing = caught.value.problems[-1].path
    assert listing.parent == tmp_path / "tmp" and listing.name.startswith("m.csv.problems.")
    assert str(caught.value).endswith(f"all 60 problems are listed in {listing}")
    assert len(caught.value.problems) == 6 and len(listing.read_text().splitlines()) == 60
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.csv", "tmp"]


def test_100000_rows_of_one_image_decode_it_once_in_bounded_memory(tmp_path, monkeypatch):
    write_png(tmp_path / "a.png", seed=1)
    (tmp_path / "m.csv").write_text("path,label\n" + "a.png,Normal\n" * 100_000)
    decoded = []
    monkeypatch.setattr(data_images, "scan_file", lambda path: decoded.append(path) or scan_file(path))
    tracemalloc.start()
    try:
        manifest, problems = load_manifest(tmp_path / "m.csv", threads=1)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(manifest) == 1 and decoded == [tmp_path / "a.png"]
    assert peak < 16 * 2**20  # loose: 2-4 MiB here; a record per row (before) took 205 MiB, decoding left out
    assert [p.severity for p in problems] == ["warning"] * 6
    assert problems[-1].path == tmp_path / "m.csv.problems.txt"
    assert problems[-1].message.startswith("99,999 problems (0 error(s), 99,999 warning(s)), too many to print")


def _bach_w8(root: Path) -> Path:
    """Hostile input W8: a name listed once, found in two class folders, and an image the CSV omits."""
    for seed, name in enumerate(
        ["Benign/a.jpeg", "Invasive/a.jpeg", "Invasive/b.jpeg", "InSitu/c.jpeg", "Normal/d.jpeg"]
    ):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        tissue_like(seed=seed).save(root / name)
    return root / "microscopy_ground_truth.csv"


def test_bach_ground_truth_matches_paths_and_reports_what_it_cannot(tmp_path):
    ground_truth = _bach_w8(tmp_path)
    ground_truth.write_text("a.jpeg,Benign\nb.jpeg,Invasive\nc.jpeg,InSitu\n")
    with pytest.raises(DataError) as caught:
        load_manifest(tmp_path)
    by_file = {p.path.relative_to(tmp_path).as_posix(): p for p in caught.value.problems}
    assert (
        by_file["a.jpeg"].message == "listed on line 1 of microscopy_ground_truth.csv matches 2 files: "
        "Benign/a.jpeg, Invasive/a.jpeg"
    )
    assert by_file["a.jpeg"].severity == "error"
    assert by_file["Normal/d.jpeg"].message == "not listed in microscopy_ground_truth.csv: left out"
    assert by_file["Normal/d.jpeg"].severity == "warning" and len(by_file) == 2

    ground_truth.write_text("Invasive/a.jpeg,Invasive\nb.jpeg,Invasive\nInSitu/c.jpeg,InSitu\nd.jpeg,\n")
    with pytest.raises(DataError) as caught:
        load_manifest(tmp_path)
    assert [str(p) for p in caught.value.problems] == [
        f"error: {tmp_path / 'Normal/d.jpeg'}: empty label on line 4 of microscopy_ground_truth.csv "
        "(fill in its class, e.g. Normal, Benign, InSitu or Invasive)",
        f"warning: {tmp_path / 'Benign/a.jpeg'}: not listed in microscopy_ground_truth.csv: left out "
        "(add it to microscopy_ground_truth.csv or move it away)",
    ]
    ground_truth.write_text("Invasive/a.jpeg,Invasive\nb.jpeg,Invasive\nInSitu/c.jpeg,InSitu\nd.jpeg,Normal\n")
    manifest, problems = load_manifest(tmp_path)
    assert {r.name: r.label for r in manifest} == {
        "Invasive/a": "Invasive",
        "Invasive/b": "Invasive",
        "InSitu/c": "InSitu",
        "Normal/d": "Normal",
    }
    assert [p.path.name for p in problems] == ["a.jpeg"] and problems[0].severity == "warning"


def _hostile_links(folder: Path) -> None:
    """Hostile input W12: a dangling link, a link loop and a folder, all named like images."""
    os.symlink("/nonexistent/missing.jpg", folder / "dangling.jpg")
    os.symlink("loopB.jpg", folder / "loopA.jpg")
    os.symlink("loopA.jpg", folder / "loopB.jpg")
    (folder / "dir.jpg").mkdir()


def test_broken_links_loops_and_folders_named_like_images_are_warnings(tmp_path):
    write_png(tmp_path / "data" / "Normal" / "n.png", seed=1)
    write_png(tmp_path / "elsewhere" / "iv.png", seed=2)
    _hostile_links(tmp_path / "data" / "Normal")
    os.symlink(tmp_path / "elsewhere", tmp_path / "data" / "Invasive")  # a linked class folder is followed
    os.symlink("..", tmp_path / "data" / "Normal" / "up")  # a link back to a folder already searched
    manifest, problems = load_manifest(tmp_path / "data")
    assert [r.name for r in manifest] == ["Invasive/iv", "Normal/n"]
    assert {p.path.name: p.message for p in problems} == {
        "dangling.jpg": "named like an image but is a broken symbolic link (to /nonexistent/missing.jpg): "
        "not read as an image",
        "loopA.jpg": "named like an image but is a symbolic link loop: not read as an image",
        "loopB.jpg": "named like an image but is a symbolic link loop: not read as an image",
        "dir.jpg": "named like an image but is a folder: not read as an image",
        "up": "links to a folder already searched: not followed",
    }
    assert {p.severity for p in problems} == {"warning"}

    _hostile_links(tmp_path / "elsewhere")  # the same, seen by the BACH ground-truth layout
    (tmp_path / "elsewhere" / "microscopy_ground_truth.csv").write_text("iv.png,Invasive\n")
    manifest, problems = load_manifest(tmp_path / "elsewhere")
    assert manifest.layout == "bach" and len(manifest) == 1
    assert sorted(p.path.name for p in problems) == ["dangling.jpg", "dir.jpg", "loopA.jpg", "loopB.jpg"]

    empty = tmp_path / "empty"
    empty.mkdir()
    _hostile_links(empty)
    with pytest.raises(DataError, match="no images found") as caught:
        load_manifest(empty)
    assert len(caught.value.problems) == 4
    assert find_images(empty) == ([], list(caught.value.problems))


# -- 5. non-UTF-8 file names and failed writes ------------------------------------------------------


def test_file_names_that_are_not_utf8_are_written_back_as_they_are(tmp_path):
    folder = tmp_path / "data" / "Normal"
    folder.mkdir(parents=True)
    latin1 = os.fsencode(folder) + b"/caf\xe9.png"
    with open(latin1, "wb") as handle:
        tissue_like().save(handle, "PNG")
    manifest, _ = load_manifest(tmp_path / "data")
    assert manifest.records[0].name == "Normal/caf\udce9"
    manifest.to_csv(tmp_path / "out.csv")
    assert b"caf\xe9.png" in (tmp_path / "out.csv").read_bytes()
    write_text_atomic(tmp_path / "names.txt", os.fsdecode(b"caf\xe9\n"))
    assert (tmp_path / "names.txt").read_bytes() == b"caf\xe9\n"


def test_a_failed_write_leaves_no_temporary_file_and_no_half_file(tmp_path, monkeypatch):
    target = tmp_path / "report.json"
    target.write_text("old")

    def disk_full(fd):  # the temporary holds some of the text when the disk fills up
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        write_text_atomic(target, "new content")
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"] and target.read_bytes() == b"old"


# -- 6. bounded fuzzing -----------------------------------------------------------------------------

HEADERS = [
    ["path", "label"],
    ["path", "label", "group"],
    ["path", "label", "group", "patient"],
    ["Path", "Label"],
    ["label", "path", "site"],
    ["path", "label", "label"],
    ["path", "label", ""],
]
GOOD_ROWS = [
    ["a.png", "Normal"],
    ["b.png", "Invasive", "2"],
    ["a.png", "InSitu", "1", "p1"],
    ["b.png", "Lymphoma", "0"],
]
CELLS = [
    "a.png",
    "b.png",
    "sub",
    "missing.png",
    "",
    " ",
    "Normal",
    "InSitu",
    "Invasive",
    "Lymphoma",
    "0",
    "1",
    "2",
    "7",
    "p1",
    "é",
    '"a.png"',
    '"x,y"',
    '"',
    "path",
    "label",
]
manifest_rows = st.lists(
    st.sampled_from(GOOD_ROWS) | st.lists(st.sampled_from(CELLS) | st.text(max_size=4), max_size=4), max_size=4
)
manifest_texts = st.one_of(
    st.binary(max_size=200),
    st.text(max_size=200).map(str.encode),
    st.builds(  # mostly well formed: a known header, likely rows, a separator, line ends, a BOM
        lambda header, rows, sep, end, bom: (bom + end.join(sep.join(r) for r in [header, *rows])).encode(),
        st.sampled_from(HEADERS),
        manifest_rows,
        st.sampled_from([",", ",", ",", ";", "\t"]),
        st.sampled_from(["\n", "\r\n", "\r"]),
        st.sampled_from(["", "\ufeff"]),
    ),
)


@FUZZ
@given(data=manifest_texts)
def test_fuzz_any_manifest_text_gives_a_manifest_or_a_data_error(tmp_path, data):
    if not (tmp_path / "a.png").exists():
        write_png(tmp_path / "a.png", seed=1)
        write_png(tmp_path / "b.png", seed=2)
        (tmp_path / "sub").mkdir()
    (tmp_path / "m.csv").write_bytes(data)
    try:
        manifest, problems = load_manifest(tmp_path / "m.csv", threads=1)
    except DataError as err:
        assert "\n" not in str(err)
    else:
        assert isinstance(manifest, Manifest) and len(manifest) >= 1


MODE_FORMATS = {
    "L": ["PNG", "TIFF", "JPEG", "BMP"],
    "RGB": ["PNG", "TIFF", "JPEG", "BMP"],
    "RGBA": ["PNG", "TIFF"],
    "P": ["PNG", "TIFF", "BMP"],
    "I;16": ["PNG", "TIFF"],
    "CMYK": ["TIFF", "JPEG"],
}
BYTES_PER_PIXEL = {"L": 1, "P": 1, "I;16": 2, "RGB": 3, "RGBA": 4, "CMYK": 4}


@st.composite
def image_files(draw) -> tuple[bytes, str]:
    """A small image in a random mode and format: random pixels, or random colours enlarged (smooth
    enough to pass the tissue check); then, sometimes, damaged."""
    mode = draw(st.sampled_from(sorted(MODE_FORMATS)))
    fmt = draw(st.sampled_from(MODE_FORMATS[mode]))
    width, height = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    if draw(st.booleans()):
        size = width * height * BYTES_PER_PIXEL[mode]
        image = Image.frombytes(mode, (width, height), draw(st.binary(min_size=size, max_size=size)))
    else:
        coarse = np.frombuffer(draw(st.binary(min_size=12, max_size=12)), np.uint8).reshape(2, 2, 3)
        rgb = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
        image = Image.fromarray(np.asarray(rgb.convert("L"), np.uint16) * 257) if mode == "I;16" else rgb.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    data = buffer.getvalue()
    cut = draw(st.sampled_from([None, "truncate", "flip"]))
    if cut is not None:
        at = draw(st.integers(0, len(data) - 1))
        flipped = bytes([data[at] ^ draw(st.integers(1, 255))])
        data = data[:at] if cut == "truncate" else data[:at] + flipped + data[at + 1 :]
    return data, fmt.lower()


@FUZZ
@given(file=image_files() | st.tuples(st.binary(max_size=300), st.sampled_from(["png", "jpeg", "tiff", "bmp"])))
def test_fuzz_image_files_give_pixels_or_a_problem(tmp_path, file):
    data, suffix = file
    path = tmp_path / f"x.{suffix}"
    path.write_bytes(data)
    info = scan_file(path)
    if isinstance(info, Problem):
        assert info.severity == "error" and info.message and "\n" not in info.message
    else:  # the file decodes: read_image gives the very pixels its id was made of
        rgb = read_image(path)
        assert rgb.shape == (info.height, info.width, 3) and content_key(rgb) == info.image_id
