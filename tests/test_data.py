import csv
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from histoboost.config import PreprocessConfig
from histoboost.data import DataError, content_key, load_manifest, parse_label_map, read_image, working_scale

from conftest import tissue_like, write_png


def test_bach_manifest_counts(bach):
    manifest, problems = load_manifest(bach)
    summary = manifest.summary()
    assert summary["images"] == 144 and manifest.layout == "csv"
    assert summary["per_label"] == {"Benign": 36, "InSitu": 36, "Invasive": 36, "Normal": 36}
    assert summary["per_group"] == {"normal_benign": 72, "in_situ": 36, "invasive": 36}
    assert summary["patients"] == 0 and not manifest.has_patients
    assert summary["sizes"] == {"1536x1536": 144}
    assert problems == []
    first = manifest.records[0]
    assert first.image_id == content_key(read_image(first.path))
    assert first.extra["id_block"] == "Benign-0"
    assert len(set(manifest.column("id_block"))) == 18  # counted from the shared manifest.csv


def test_image_id_survives_renames(small_folder):
    before, _ = load_manifest(small_folder)
    os.rename(small_folder / "Normal" / "n001.jpeg", small_folder / "Normal" / "renamed.jpeg")
    after, _ = load_manifest(small_folder)
    assert {r.image_id for r in before} == {r.image_id for r in after}
    assert "Normal/renamed" in {r.name for r in after}


def test_class_folders_layout(small_folder):
    manifest, _ = load_manifest(small_folder)
    assert manifest.layout == "bach" and len(manifest) == 8
    assert list(manifest.groups) == [0, 0, 1, 1, 2, 2, 0, 0]  # sorted by name: Benign, InSitu, Invasive, Normal


def test_every_bad_file_is_reported_and_nothing_written(small_folder):
    (small_folder / "Benign" / "empty.jpeg").write_bytes(b"")
    data = (small_folder / "Benign" / "b001.jpeg").read_bytes()
    (small_folder / "Benign" / "truncated.jpeg").write_bytes(data[: len(data) // 3])
    (small_folder / "Normal" / "notes.png").write_text("not an image")
    write_png(small_folder / "Invasive" / "tiny.png", (100, 100))
    Image.open(small_folder / "Normal" / "n001.jpeg").convert("L").save(small_folder / "Normal" / "gray.png")
    listing = sorted(small_folder.rglob("*"))
    with pytest.raises(DataError) as caught:
        load_manifest(small_folder, PreprocessConfig(), crop_size=384)
    problems = {p.path.name: p for p in caught.value.problems}
    assert sorted(problems) == ["empty.jpeg", "gray.png", "notes.png", "tiny.png", "truncated.jpeg"]
    assert "empty file" in problems["empty.jpeg"].message
    assert "cannot be decoded" in problems["truncated.jpeg"].message
    assert "not an image" in problems["notes.png"].message
    assert "too small: 100x100 px is 50x50 at working scale 0.5" in problems["tiny.png"].message
    assert problems["gray.png"].severity == "warning" and "grayscale" in problems["gray.png"].message
    assert all(p.severity == "error" for n, p in problems.items() if n != "gray.png")
    assert all("\n" not in str(p) for p in problems.values())
    assert sorted(small_folder.rglob("*")) == listing


def test_grayscale_and_rgba_are_converted_with_a_warning(tmp_path):
    write_png(tmp_path / "Normal" / "a.png", mode="L")
    write_png(tmp_path / "Invasive" / "b.png", mode="RGBA", seed=1)
    manifest, problems = load_manifest(tmp_path)
    assert len(manifest) == 2 and {p.severity for p in problems} == {"warning"}
    assert read_image(tmp_path / "Normal" / "a.png").shape == (300, 400, 3)


def test_duplicates_under_different_labels_are_leakage(small_folder):
    shutil.copy(small_folder / "Normal" / "n001.jpeg", small_folder / "Invasive" / "copy.jpeg")
    with pytest.raises(DataError) as caught:
        load_manifest(small_folder)
    assert {p.path.name for p in caught.value.problems} == {"n001.jpeg", "copy.jpeg"}
    assert all("leak" in p.message for p in caught.value.problems)


def test_duplicates_with_the_same_label_are_counted_once(small_folder):
    shutil.copy(small_folder / "Normal" / "n001.jpeg", small_folder / "Normal" / "n001-again.jpeg")
    manifest, problems = load_manifest(small_folder)
    assert len(manifest) == 8
    assert [p.severity for p in problems] == ["warning"] and "counted once" in problems[0].message


def test_csv_manifest_with_patients_and_extra_columns(tmp_path):
    write_png(tmp_path / "img" / "a.png", seed=1)
    write_png(tmp_path / "img" / "b.png", seed=2)
    write_png(tmp_path / "img" / "c.png", seed=3)
    (tmp_path / "labels.csv").write_text(
        "path,label,patient,site\nimg/a.png,Fibroadenoma,p1,A\nimg/b.png,DCIS,p1,A\nimg/c.png,Lymphoma,,B\n"
    )
    with pytest.raises(DataError) as caught:
        load_manifest(tmp_path / "labels.csv")
    assert "--label-map 'Lymphoma=0'" in str(caught.value.problems[0])
    manifest, _ = load_manifest(tmp_path / "labels.csv", label_map=parse_label_map("Lymphoma=2"))
    assert [r.group for r in manifest] == [0, 1, 2]
    assert [r.patient for r in manifest] == ["p1", "p1", None]
    assert manifest.column("site") == ["A", "A", "B"] and manifest.has_patients


def test_csv_manifest_missing_file_and_columns(tmp_path):
    (tmp_path / "manifest.csv").write_text("path,label\nnowhere.png,Normal\n")
    with pytest.raises(DataError) as caught:
        load_manifest(tmp_path)
    assert "not found" in caught.value.problems[0].message
    (tmp_path / "manifest.csv").write_text("file,class\nx.png,Normal\n")
    with pytest.raises(DataError, match="missing column"):
        load_manifest(tmp_path)


def test_bach_ground_truth_csv(tmp_path):
    for seed, (name, label) in enumerate([("b001.tif", "Benign"), ("is001.tif", "InSitu"), ("n001.tif", "Normal")]):
        write_png(tmp_path / label / name, seed=seed)
    (tmp_path / "microscopy_ground_truth.csv").write_text("b001.tif,Benign\nis001.tif,InSitu\nn001.tif,Normal\n")
    manifest, _ = load_manifest(tmp_path)
    assert manifest.layout == "bach" and sorted(r.group for r in manifest) == [0, 0, 1]


def test_breakhis_layout(tmp_path):
    base = tmp_path / "BreaKHis_v1" / "histology_slides" / "breast"
    write_png(base / "benign" / "SOB" / "adenosis" / "SOB_B_A-14-22549AB-40-001.png", seed=1)
    write_png(base / "malignant" / "SOB" / "ductal" / "SOB_M_DC-14-2523-100-007.png", seed=2)
    manifest, _ = load_manifest(tmp_path)
    assert manifest.layout == "breakhis"
    by_label = {r.label: r for r in manifest}
    assert by_label["adenosis"].group == 0 and by_label["ductal_carcinoma"].group == 2
    assert by_label["adenosis"].patient == "14-22549AB"
    assert by_label["ductal_carcinoma"].extra == {"magnification": "100X"}
    assert 1 not in manifest.groups  # BreakHis has no in-situ group; later stages must cope


def test_tiff_resolution_sets_the_working_scale(tmp_path):
    path = tmp_path / "Normal" / "a.tif"
    path.parent.mkdir()
    # 0.42 µm/px, as BACH's originals: 1e4 / 0.42 pixels per centimetre.
    tissue_like((300, 200)).save(path, resolution=1e4 / 0.42, resolution_unit="cm")
    manifest, _ = load_manifest(tmp_path)
    assert manifest.records[0].mpp == pytest.approx(0.42, rel=1e-3)
    assert working_scale(manifest.records[0].mpp, PreprocessConfig(target_mpp=0.84)) == pytest.approx(0.5, rel=1e-3)
    assert working_scale(None, PreprocessConfig(scale=0.25, target_mpp=0.84)) == 0.25


def test_huge_images_are_refused_by_the_decompression_bomb_limit(tmp_path, monkeypatch):
    write_png(tmp_path / "Normal" / "a.png", (400, 300))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100_000)
    with pytest.raises(DataError) as caught:
        load_manifest(tmp_path)
    assert "decompression-bomb limit" in caught.value.problems[0].message


def test_manifest_csv_written_atomically(small_folder, tmp_path):
    manifest, _ = load_manifest(small_folder)
    out = tmp_path / "out.csv"
    manifest.to_csv(out)
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 8 and rows[0]["image_id"] == manifest.records[0].image_id
    assert not list(tmp_path.glob(".*.tmp"))


def test_missing_source_and_unknown_column(tmp_path, small_folder):
    with pytest.raises(DataError, match="no such file or folder"):
        load_manifest(tmp_path / "nope")
    manifest, _ = load_manifest(small_folder)
    with pytest.raises(DataError, match="no column 'id_block'"):
        manifest.column("id_block")


def test_read_image_scales(bach):
    image = read_image(bach / "Benign" / "b001.jpeg", 0.5)
    assert image.shape == (768, 768, 3) and image.dtype == np.uint8


def test_parse_label_map_rejects_bad_groups():
    assert parse_label_map("A=0, B = 2") == {"A": 0, "B": 2}
    with pytest.raises(DataError, match="Label=0"):
        parse_label_map("A=3")
