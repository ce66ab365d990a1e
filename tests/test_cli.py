import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from conftest import write_png


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "68719476736"}
    return subprocess.run([sys.executable, "-m", "histoboost.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=600)


def test_help_lists_commands():
    result = run_cli("--help")
    assert result.returncode == 0 and "inspect" in result.stdout and "not for diagnosis" in result.stdout


@pytest.mark.heavy
def test_inspect_bach_reports_classes_groups_and_stain(bach):
    result = run_cli("inspect", bach, "--quiet")
    assert result.returncode == 0, result.stderr
    assert "per label:  Benign 36, InSitu 36, Invasive 36, Normal 36" in result.stdout
    assert "per group:  normal_benign 72, in_situ 36, invasive 36" in result.stdout
    assert "stain:      macenko: 144 images normalised, 0 flagged, 0 failed" in result.stdout
    assert result.stderr == ""


def test_inspect_bad_folder_one_line_per_file(small_folder):
    (small_folder / "Benign" / "empty.jpeg").write_bytes(b"")
    data = (small_folder / "Benign" / "b001.jpeg").read_bytes()
    (small_folder / "Benign" / "truncated.jpeg").write_bytes(data[:20000])
    write_png(small_folder / "Invasive" / "tiny.png", (100, 100))
    Image.open(small_folder / "Normal" / "n001.jpeg").convert("L").save(small_folder / "Normal" / "gray.png")
    result = run_cli("inspect", small_folder, "--quiet", "--no-stain-check")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    by_file = {name: [line for line in lines if name in line] for name in
               ("empty.jpeg", "truncated.jpeg", "tiny.png", "gray.png")}
    assert all(len(found) == 1 for found in by_file.values()), lines
    assert by_file["gray.png"][0].startswith("warning:")
    assert all(by_file[n][0].startswith("error:") for n in ("empty.jpeg", "truncated.jpeg", "tiny.png"))
    assert lines[-1] == f"histoboost: error: 3 unusable file(s) under {small_folder}"


def test_inspect_json_and_grayscale_warning_only(small_folder):
    Image.open(small_folder / "Normal" / "n001.jpeg").convert("L").save(small_folder / "Normal" / "gray.png")
    result = run_cli("inspect", small_folder, "--quiet", "--json", "--crop-size", "384", "--stain", "none")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["images"] == 9 and summary["per_group"] == {"normal_benign": 5, "in_situ": 2, "invasive": 2}
    assert len(summary["problems"]) == 1 and summary["problems"][0].startswith("warning:")
    # Stain normalisation cannot separate H from E in a grayscale image: that image is an error.
    result = run_cli("inspect", small_folder, "--quiet", "--json", "--crop-size", "384")
    summary = json.loads(result.stdout)
    assert result.returncode == 1
    assert summary["stain"] == {"method": "macenko", "checked": 9, "flagged": 0, "failed": 1}
    assert [p.split(": ")[1].rsplit("/", 1)[-1] for p in summary["problems"]] == ["gray.png", "gray.png"]
    assert "cannot be told apart" in summary["problems"][1] and "--stain none" in summary["problems"][1]


def test_bad_config_file_and_missing_data_are_one_line(tmp_path, small_folder):
    (tmp_path / "config.json").write_text('{"augment": {"n_crops": "many"}}')
    result = run_cli("inspect", small_folder, "--config", tmp_path / "config.json")
    assert result.returncode == 2
    assert result.stderr.strip() == (f"histoboost: error: {tmp_path / 'config.json'}: config key 'augment.n_crops' "
                                     "must be an integer, got 'many'")
    result = run_cli("inspect", tmp_path / "nowhere")
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1
    assert "no such file or folder" in result.stderr


def test_stain_reference_image_is_fitted(small_folder, bach):
    good = run_cli("inspect", small_folder, "--quiet", "--json", "--stain-reference", bach / "Normal" / "n010.jpeg")
    assert good.returncode == 0, good.stderr
    blank = small_folder.parent / "blank.png"
    Image.new("RGB", (300, 300), (250, 250, 250)).save(blank)
    result = run_cli("inspect", small_folder, "--stain-reference", blank)
    assert result.returncode == 2 and "too little tissue" in result.stderr and "Traceback" not in result.stderr
