import csv
import json
import os
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from PIL import Image

from histoboost.bundle import FORMAT_VERSION

from conftest import write_png


def run_cli(*args) -> subprocess.CompletedProcess:
    """`histoboost ARGS` in this process (a cold torch import per run cost ~4 s): exit status, stdout and stderr as a
    process gives them (argparse's exits, a traceback: status 1, warnings, log lines); what a run changes in the
    process (environment, cwd, torch threads, warning filters, log streams, cached models) is put back."""
    import contextlib
    import io
    import logging
    import traceback
    import warnings

    import torch  # before the run, so that its thread count (--threads sets it) can be put back

    from histoboost.cli import main

    argv = [str(arg) for arg in args]
    out, err = io.StringIO(), io.StringIO()
    environment, cwd = dict(os.environ), os.getcwd()
    threads = torch.get_num_threads()
    # Log handlers made at import (Dask's, tornado's) write to the stderr of that time; a new process's would be ours.
    streams = [
        h
        for lg in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
        for h in getattr(lg, "handlers", ())
        if type(h) is logging.StreamHandler and h.stream in (sys.stderr, sys.__stderr__)
    ]
    last_resort = logging.StreamHandler(err)  # a new process has no root handler: Python's last resort prints
    last_resort.setLevel(logging.WARNING)
    logging.getLogger().addHandler(last_resort)
    olds = [h.setStream(err) for h in streams]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            warnings.resetwarnings()  # a new process's filters, shown on its stderr (pytest records them instead)
            for category in (ResourceWarning, ImportWarning, PendingDeprecationWarning, DeprecationWarning):
                warnings.simplefilter("ignore", category)
            warnings.filterwarnings("default", category=DeprecationWarning, module="__main__")
            warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: sys.stderr.write(
                warnings.formatwarning(message, category, filename, lineno, line)
            )
            try:
                code = main(argv)
            except SystemExit as exit:  # argparse: --help, --version, a bad flag
                code = exit.code if isinstance(exit.code, int) else 0 if exit.code is None else 1
                if not isinstance(exit.code, (int, type(None))):
                    print(exit.code, file=sys.stderr)
            except Exception:  # noqa: BLE001 - what an uncaught error does to a process
                traceback.print_exc()
                code = 1
    finally:
        for handler, old in zip(streams, olds):
            handler.setStream(old)
        logging.getLogger().removeHandler(last_resort)
        os.chdir(cwd)
        for name in set(os.environ) - set(environment):  # only what differs: Dask's threads may read the rest
            del os.environ[name]
        os.environ.update({k: v for k, v in environment.items() if os.environ.get(k) != v})
        torch.set_num_threads(threads)
        engine = sys.modules.get("histoboost.engine.core")
        if engine is not None:
            engine._RESOURCES.clear()  # a new process builds its backbone and bundle again
    text = [stream.getvalue().replace("\r\n", "\n").replace("\r", "\n") for stream in (out, err)]  # as text=True reads
    return subprocess.CompletedProcess(["histoboost", *argv], code, *text)


def run_cli_process(*args, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m histoboost.cli ARGS` as its own process, for the few tests where the process itself is tested:
    the module entry point, a kill or what a new process reads at start-up (the environment at import)."""
    env = {**os.environ, "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "68719476736", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "histoboost.cli", *map(str, args)], capture_output=True, text=True, env=env, timeout=600
    )


def test_help_lists_commands():
    """Through `python -m histoboost.cli`, as its own process: the module entry point itself."""
    result = run_cli_process("--help")
    assert result.returncode == 0 and "inspect" in result.stdout and "not for diagnosis" in result.stdout


def test_in_process_runs_answer_like_a_process_and_leave_this_one_as_it_was():
    """run_cli's own contract: argparse's exits become the status, and --threads and the environment a run
    changes do not reach the tests after it."""
    import torch

    threads, environment = torch.get_num_threads(), dict(os.environ)
    version = run_cli("--version")
    assert version.returncode == 0 and version.stdout.startswith("histoboost ")
    bad = run_cli("--no-such-flag")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr
    listed = run_cli("backbones", "--threads", str(threads + 1))
    assert listed.returncode == 0, listed.stderr
    assert torch.get_num_threads() == threads and dict(os.environ) == environment


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
    by_file = {
        name: [line for line in lines if name in line]
        for name in ("empty.jpeg", "truncated.jpeg", "tiny.png", "gray.png")
    }
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
    assert "cannot be told apart" in summary["problems"][1] and "--stain reinhard or none" in summary["problems"][1]


def test_bad_config_file_and_missing_data_are_one_line(tmp_path, small_folder):
    (tmp_path / "config.json").write_text('{"augment": {"n_crops": "many"}}')
    result = run_cli("inspect", small_folder, "--config", tmp_path / "config.json")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"histoboost: error: {tmp_path / 'config.json'}: config key 'augment.n_crops' must be an integer, got 'many'"
    )
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


SMALL_FLAGS = [
    "--preset",
    "quick",
    "--scale",
    "0.25",
    "--crop-size",
    "192",
    "-A",
    "2",
    "-C",
    "3",
    "--backbone",
    "efficientnet_lite0",
    "--quiet",
]


def _store_arrays(cache):
    import numpy as np

    (store,) = (cache / "features").iterdir()
    out = {}
    for path in sorted(store.glob("[!.]*.npz")):
        with np.load(path) as data:
            out[path.name] = {k: data[k].copy() for k in data}
    return out


def test_extract_then_reuse(small_folder, tmp_path):
    cache, run = tmp_path / "cache", tmp_path / "run"
    first = run_cli("extract", small_folder, *SMALL_FLAGS, "--cache-dir", cache, "--out", run)
    assert first.returncode == 0, first.stderr
    assert "efficientnet_lite0: 8 images: 8 extracted" in first.stdout
    refused = run_cli("extract", small_folder, *SMALL_FLAGS, "--cache-dir", cache, "--out", run)
    assert refused.returncode == 2 and "--force" in refused.stderr
    second = run_cli("extract", small_folder, *SMALL_FLAGS, "--cache-dir", cache, "--out", run, "--force")
    assert "8 images: 0 extracted, 8 reused, 0 failed" in second.stdout
    config = json.loads((run / "config.json").read_text())
    assert config["augment"]["n_augment"] == 2
    assert len(config["provenance"]["backbones"]["efficientnet_lite0"]["weights_sha256"]) == 64
    assert (run / "manifest.csv").read_text().count("\n") == 9
    rerun = run_cli(
        "extract",
        small_folder,
        "--config",
        run / "config.json",
        "--quiet",
        "--cache-dir",
        cache,
        "--out",
        tmp_path / "run2",
    )
    assert "0 extracted, 8 reused" in rerun.stdout, rerun.stderr
    listing = run_cli("cache", "list", "--cache-dir", cache)
    assert "efficientnet_lite0" in listing.stdout and "8 images" in listing.stdout
    assert run_cli("cache", "prune", "--cache-dir", cache).returncode == 2
    assert "removed 1" in run_cli("cache", "prune", "--all", "--cache-dir", cache).stdout


@pytest.mark.heavy
def test_sigkill_during_extraction_then_resume_equals_uninterrupted(small_folder, tmp_path):
    import signal
    import time

    flags = [
        "--preset",
        "quick",
        "--scale",
        "0.5",
        "--crop-size",
        "256",
        "-A",
        "4",
        "-C",
        "3",
        "--backbone",
        "efficientnet_lite0",
        "--quiet",
    ]
    reference = run_cli("extract", small_folder, *flags, "--cache-dir", tmp_path / "ref", "--out", tmp_path / "r1")
    assert reference.returncode == 0, reference.stderr
    cache = tmp_path / "killed"
    env = {**os.environ, "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "68719476736"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "histoboost.cli",
            "extract",
            str(small_folder),
            *flags,
            "--cache-dir",
            str(cache),
            "--out",
            str(tmp_path / "r2"),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while time.time() < deadline and len(list(cache.glob("features/*/[!.]*.npz"))) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(list(cache.glob("features/*/[!.]*.npz")))
    assert 2 <= done_before < 8, "the kill must land mid-run"
    resumed = run_cli("extract", small_folder, *flags, "--cache-dir", cache, "--out", tmp_path / "r2")
    assert f"{8 - done_before} extracted" in resumed.stdout and f"{done_before} reused" in resumed.stdout
    assert not list(cache.glob("features/*/.*.tmp"))  # the killed run's temporary file is cleared
    ours, theirs = _store_arrays(cache), _store_arrays(tmp_path / "ref")
    assert ours.keys() == theirs.keys() and len(ours) == 8
    for name in ours:
        for key in ours[name]:
            assert (ours[name][key] == theirs[name][key]).all(), (name, key)


def test_offline_backbone_error_is_one_line(small_folder, tmp_path):
    """A process of its own: huggingface_hub reads HF_HOME and HF_HUB_OFFLINE when it is imported."""
    env_flags = [
        "extract",
        small_folder,
        "--backbone",
        "resnet50",
        "--preset",
        "quick",
        "--quiet",
        "--cache-dir",
        tmp_path / "cache",
        "--out",
        tmp_path / "run",
    ]
    result = run_cli_process(*env_flags, env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith("histoboost: error: pretrained weights for resnet50")
    assert not (tmp_path / "run").exists()


@pytest.mark.heavy
def test_cv_end_to_end_on_real_bach_images(bach, tmp_path):
    # 24 real images (6 per class) at a small geometry, folds by the id_block patient proxy.
    rows = (bach / "manifest.csv").read_text().splitlines()[1:]
    picked = [r for label in ("Benign", "InSitu", "Invasive", "Normal") for r in rows if r.startswith(label + "/")][::6]
    lines = ["path,label,group,patient,id_block,source_repo"] + [str(bach) + "/" + r for r in picked]
    (tmp_path / "subset.csv").write_text("\n".join(lines) + "\n")
    run = tmp_path / "run"
    result = run_cli(
        "cv",
        tmp_path / "subset.csv",
        "--preset",
        "quick",
        "--scale",
        "0.25",
        "--crop-size",
        "192",
        "-A",
        "4",
        "-C",
        "4",
        "--rounds",
        "40",
        "--split-by",
        "id_block",
        "--quiet",
        "--cache-dir",
        tmp_path / "cache",
        "--out",
        run,
    )
    assert result.returncode == 0, result.stderr
    assert "split by id_block" in result.stdout and f"report: {run / 'report.html'}" in result.stdout
    metrics = json.loads((run / "metrics.json").read_text())
    model = metrics["models"]["efficientnet_lite0"]
    assert model["images"] == 24 and model["augmentations"] == 4 and metrics["split_by"] == "id_block"
    assert 0.0 <= model["majority_vote"]["accuracy"] <= 1.0
    assert sum(map(sum, model["majority_vote"]["confusion"])) == 24
    page = (run / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 4 and "Calibration" in page
    # The image split is shown beside the honest one, on the same features.
    assert {r["split_by"] for r in metrics["split_comparison"]} == {"id_block", "image"}
    assert "Split by image vs split by patient" in page
    # Rebuilding from the saved results gives the same metrics.
    rebuilt = run_cli("report", run)
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert json.loads((run / "metrics.json").read_text())["models"] == metrics["models"]
    first = json.loads((run / "config.json").read_text())["provenance"]["backbones"]["efficientnet_lite0"]
    assert (first["computed"], first["reused"]) == (24, 0)
    # A classifier change re-uses every stored feature.
    again = run_cli(
        "cv",
        tmp_path / "subset.csv",
        "--preset",
        "quick",
        "--scale",
        "0.25",
        "--crop-size",
        "192",
        "-A",
        "4",
        "-C",
        "4",
        "--split-by",
        "image",
        "--classifier",
        "logistic",
        "--target-sensitivity",
        "0.95",
        "--calibrate",
        "--refer-below",
        "0.75",
        "--quiet",
        "--cache-dir",
        tmp_path / "cache",
        "--out",
        tmp_path / "run2",
    )
    assert again.returncode == 0, again.stderr
    assert "(operating point)" in again.stdout
    second = json.loads((tmp_path / "run2" / "config.json").read_text())
    assert second["classifier"]["kind"] == "logistic" and second["classifier"]["target_sensitivity"] == 0.95
    op = json.loads((tmp_path / "run2" / "metrics.json").read_text())["models"]["efficientnet_lite0"]["operating_point"]
    assert len(op["thresholds"]) == 6 and 0 <= op["refer_rate"] <= 1
    assert (
        second["provenance"]["backbones"]["efficientnet_lite0"]["computed"],
        second["provenance"]["backbones"]["efficientnet_lite0"]["reused"],
    ) == (0, 24)
    # BACH's 4 classes on the same stored features: one run gives the 4-class and the derived 3-group metrics.
    four = run_cli(
        "cv",
        tmp_path / "subset.csv",
        "--preset",
        "quick",
        "--scale",
        "0.25",
        "--crop-size",
        "192",
        "-A",
        "4",
        "-C",
        "4",
        "--split-by",
        "id_block",
        "--classifier",
        "logistic",
        "--classes",
        "bach4",
        "--quiet",
        "--cache-dir",
        tmp_path / "cache",
        "--out",
        tmp_path / "run4",
    )
    assert four.returncode == 0, four.stderr
    assert "efficientnet_lite0 (4 classes)" in four.stdout and "balanced" in four.stdout
    model4 = json.loads((tmp_path / "run4" / "metrics.json").read_text())["models"]["efficientnet_lite0"]
    assert model4["classes"]["names"] == ["normal", "benign", "in_situ", "invasive"]
    assert np.array(model4["classes"]["majority_vote"]["confusion"]).sum(axis=1).tolist() == [6, 6, 6, 6]
    assert np.array(model4["majority_vote"]["confusion"]).sum(axis=1).tolist() == [12, 6, 6]
    assert "Rakhlin" in (tmp_path / "run4" / "report.html").read_text()


@pytest.mark.heavy
def test_train_predict_evaluate_and_tamper(small_folder, tmp_path, bach):
    flags = [
        "--preset",
        "quick",
        "--scale",
        "0.25",
        "--crop-size",
        "192",
        "-A",
        "3",
        "-C",
        "3",
        "--rounds",
        "20",
        "--quiet",
        "--cache-dir",
        tmp_path / "cache",
    ]
    model = tmp_path / "model.zip"
    trained = run_cli("train", small_folder, *flags, "--out", model)
    assert trained.returncode == 0, trained.stderr
    assert "trained on 8 images" in trained.stdout and model.is_file()
    # The default decision of every preset: the threshold for 95% carcinoma sensitivity on inner folds.
    assert "decision: operating point: carcinoma when mean p(carcinoma) >= " in trained.stdout
    assert "(chosen for 95% sensitivity on inner folds)" in trained.stdout
    identity = trained.stdout.split("bundle sha256: ")[1].split()[0]
    new = tmp_path / "new"
    new.mkdir()
    for path in list(small_folder.rglob("*.jpeg"))[:2]:
        (new / path.name).write_bytes(path.read_bytes())
    (new / "broken.jpeg").write_bytes(b"\xff\xd8\xff")
    result = run_cli(
        "predict", model, new, "--out", tmp_path / "preds.csv", "--overlay", tmp_path / "overlays", "--quiet"
    )
    assert result.returncode == 1  # one image failed; the others were predicted
    assert [line for line in result.stderr.splitlines() if "broken.jpeg" in line][0].startswith("error:")
    rows = (tmp_path / "preds.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[0].startswith("path,name,image_id,class,label,group")
    assert len(list((tmp_path / "overlays").glob("*.overlay.png"))) == 2
    as_json = run_cli(
        "predict", model, new / rows[1].split(",")[0].rsplit("/", 1)[-1], "--out", tmp_path / "one.json", "--quiet"
    )
    record = json.loads((tmp_path / "one.json").read_text())[0]
    assert as_json.returncode == 0 and record["bundle_format"] == FORMAT_VERSION and record["bundle_sha256"] == identity
    assert record["decision_rule"].startswith("operating point: carcinoma when mean p(carcinoma) >= ")
    argmax = run_cli("train", small_folder, *flags, "--decision", "argmax", "--out", tmp_path / "argmax.zip")
    assert argmax.returncode == 0 and "decision: argmax (majority vote over augmentations)" in argmax.stdout
    assert (
        json.loads(zipfile.ZipFile(tmp_path / "argmax.zip").read("bundle.json"))["decision_rule"]["threshold"] is None
    )
    both = run_cli(
        "train",
        small_folder,
        *flags,
        "--decision",
        "argmax",
        "--target-sensitivity",
        "0.9",
        "--out",
        tmp_path / "both.zip",
    )
    assert (
        both.returncode == 2 and "takes no --target-sensitivity" in both.stderr and not (tmp_path / "both.zip").exists()
    )
    refused = run_cli("evaluate", model, small_folder, "--out", tmp_path / "eval", "--quiet")
    assert refused.returncode == 2 and "in the bundle's training set" in refused.stderr
    held_out = tmp_path / "held_out"
    for label, name in (("Normal", "n010"), ("Benign", "b010"), ("InSitu", "is005"), ("Invasive", "iv011")):
        (held_out / label).mkdir(parents=True)
        shutil.copy(bach / label / f"{name}.jpeg", held_out / label)
    evaluated = run_cli("evaluate", model, held_out, "--out", tmp_path / "eval", "--quiet", "--expect-sha256", identity)
    assert evaluated.returncode == 0, evaluated.stderr
    assert "held out from training" in (tmp_path / "eval" / "report.html").read_text()
    raw = bytearray(model.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    model.write_bytes(bytes(raw))
    tampered = run_cli("predict", model, new)
    assert tampered.returncode == 2 and len(tampered.stderr.strip().splitlines()) == 1
    assert "use the original bundle" in tampered.stderr


@pytest.mark.heavy
def test_finetune_command_resumes_nothing_twice_and_its_weights_travel(demo_data, tmp_path):
    out = tmp_path / "lite0-demo.safetensors"
    tiny = (
        "--preset",
        "quick",
        "--scale",
        "0.125",
        "--crop-size",
        "64",
        "--epochs",
        "1",
        "--crops-per-image",
        "1",
        "--finetune-batch-size",
        "8",
        "--quiet",
    )
    first = run_cli("finetune", demo_data, "--backbone", "efficientnet_lite0", "--out", out, *tiny)
    assert first.returncode == 0, first.stderr
    assert "split by patient" in first.stdout and f"--weights {out}" in first.stdout
    card = json.loads(out.with_suffix(".json").read_text())
    assert len(card["data"]["train_images"]) + len(card["data"]["validation_images"]) == 48
    again = run_cli("finetune", demo_data, "--backbone", "efficientnet_lite0", "--out", out, *tiny)
    assert again.returncode == 0 and "already done" in again.stdout
    bad = run_cli("finetune", demo_data, "--backbone", "efficientnet_lite0", "--out", tmp_path / "w.pt", *tiny)
    assert bad.returncode == 2 and bad.stderr.strip() == (
        f"histoboost: error: --out {tmp_path / 'w.pt'}: give a .safetensors file name"
    )
    model = tmp_path / "model.zip"
    trained = run_cli(
        "train",
        demo_data,
        "--preset",
        "quick",
        "--scale",
        "0.125",
        "--crop-size",
        "64",
        "-A",
        "2",
        "-C",
        "2",
        "--classifier",
        "logistic",
        "--weights",
        out,
        "--cache-dir",
        tmp_path / "cache",
        "--out",
        model,
        "--quiet",
    )
    assert trained.returncode == 0, trained.stderr
    assert "weights-efficientnet_lite0.safetensors" in zipfile.ZipFile(model).namelist()
    out.unlink()
    predicted = run_cli("predict", model, demo_data / "invasive", "--quiet")
    assert predicted.returncode == 0, predicted.stderr
    assert len(predicted.stdout.strip().splitlines()) == 1 + 16


def test_backbones_check_of_a_file_that_holds_no_weights_is_one_line(tmp_path):
    for name, data in (("notes.pth", b"not weights"), ("big.safetensors", b"\xff" * 64)):
        (tmp_path / name).write_bytes(data)
        result = run_cli("backbones", "--check", tmp_path / name)
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
        assert "not a readable safetensors or torch weights file" in result.stderr
    missing = run_cli("backbones", "--check", tmp_path / "absent.bin")
    assert missing.returncode == 2 and "weights file not found" in missing.stderr


def test_backbones_lists_every_model_with_its_licence_and_source():
    from histoboost.specs import foundation_models

    result = run_cli("backbones")
    assert result.returncode == 0, result.stderr
    for name, spec in foundation_models().items():
        assert f"\n{name} " in result.stdout and spec.get in result.stdout
    assert "efficientnet_lite0" in result.stdout and "vit_giant_patch14_reg4_dinov2" in result.stdout


@pytest.fixture(scope="module")
def kaiko_random(tmp_path_factory):
    """kaiko-vits16 with *random* weights in its publisher's layout (a timm state dict in vits16.pth): tests
    the loading and the pipeline, not accuracy."""
    import torch

    from histoboost.backbones import _build_foundation
    from histoboost.specs import foundation_models

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "vits16.pth"
    torch.save(_build_foundation(foundation_models()["kaiko-vits16"]).state_dict(), path)
    return path


@pytest.mark.heavy
def test_foundation_model_from_local_weights_end_to_end(small_folder, tmp_path, kaiko_random):
    flags = [
        "--scale",
        "0.25",
        "--crop-size",
        "128",
        "-A",
        "2",
        "-C",
        "2",
        "--quiet",
        "--cache-dir",
        tmp_path / "cache",
    ]
    weights = ["--weights", f"kaiko-vits16={kaiko_random}"]
    extracted = run_cli("extract", small_folder, *weights, *flags, "--out", tmp_path / "run")
    assert extracted.returncode == 0, extracted.stderr
    assert "kaiko-vits16: 8 images: 8 extracted" in extracted.stdout  # --weights alone chose the backbone
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["features"]["mode"] == "exact" and config["preprocess"]["target_mpp"] == 0.5  # its preset
    shared = run_cli("extract", small_folder, *weights, *flags, "--mode", "shared", "--out", tmp_path / "run2")
    assert shared.returncode == 2 and "is a ViT" in shared.stderr and len(shared.stderr.splitlines()) == 1
    assert not (tmp_path / "run2").exists()  # refused before any work
    # 2 folds of 8 images leave 1 in-situ image to train on: too few to choose an operating point
    cv = run_cli(
        "cv",
        small_folder,
        *weights,
        *flags,
        "--folds",
        "2",
        "--rounds",
        "10",
        "--decision",
        "argmax",
        "--out",
        tmp_path / "cv",
    )
    assert cv.returncode == 0, cv.stderr
    model = tmp_path / "model.zip"
    assert run_cli("train", small_folder, *weights, *flags, "--rounds", "10", "--out", model).returncode == 0
    assert sorted(zipfile.ZipFile(model).namelist()) == ["bundle.json", "model.ubj"]  # non-commercial: not carried
    image = next(small_folder.rglob("*.jpeg"))
    refused = run_cli("predict", model, image)
    assert refused.returncode == 2 and "--weights kaiko-vits16=PATH" in refused.stderr
    predicted = run_cli("predict", model, image, "--weights", f"kaiko-vits16={kaiko_random}")
    assert predicted.returncode == 0, predicted.stderr
    assert predicted.stdout.count("\n") == 2
    checked = run_cli("backbones", "--check", kaiko_random)
    assert "fits: kaiko-vits16 or lunit-vits16" in checked.stdout and "no publisher states a checksum" in checked.stdout


def test_the_decision_flag_sets_the_operating_point_or_argmax(tmp_path):
    """Every preset decides by the 95% operating point; `--decision argmax` turns it off, and `--decision
    operating-point` turns it back on over a config file that has it off (a 0.6 run's config.json)."""
    from histoboost.cli import build_parser
    from histoboost.cli.options import config_from_args

    def parse(*flags):
        return config_from_args(build_parser().parse_args(["train", "DATA", "--out", "m.zip", *map(str, flags)]))

    for name in ("paper", "quick", "accurate"):
        assert parse("--preset", name).classifier.target_sensitivity == 0.95
    assert parse("--decision", "argmax").classifier.target_sensitivity is None
    assert parse("--target-sensitivity", "0.9").classifier.target_sensitivity == 0.9
    old = tmp_path / "config.json"
    old.write_text(json.dumps({"classifier": {"target_sensitivity": None}}))
    assert parse("--config", old).classifier.target_sensitivity is None
    assert parse("--config", old, "--decision", "operating-point").classifier.target_sensitivity == 0.95


def test_weights_flag_alone_picks_foundation_models_and_their_preset_only():
    from histoboost.cli import build_parser
    from histoboost.cli.options import config_from_args
    from histoboost.errors import ConfigError

    def parse(*flags):
        return config_from_args(build_parser().parse_args(["extract", "DATA", *flags]))

    config = parse("--weights", "uni=/weights/pytorch_model.bin")
    assert config.features.backbones == ("uni",) and config.features.mode == "exact"
    assert config.augment.crop_size == 224 and config.preprocess.target_mpp == 0.5
    assert parse("--weights", "resnet50=/w.pth").features.backbones == ("resnet50", "xception")  # as before
    with pytest.raises(ConfigError, match="is a ViT: crops cannot share"):
        parse("--weights", "uni=/w.bin", "--preset", "quick")  # quick shares one feature map
    with pytest.raises(ConfigError, match="GeM"):
        parse("--weights", "uni=/w.bin", "--pooling", "gem")


@pytest.mark.heavy
def test_accurate_preset_trains_at_1_68_um_per_px_and_decides_by_its_carcinoma_threshold(small_folder, tmp_path):
    """The `accurate` preset end to end at its real geometry (8 real BACH images, 2 per class): logistic regression
    on EfficientNet-Lite0 at 1.68 µm/px, a carcinoma threshold chosen on inner folds, split votes referred."""
    model = tmp_path / "accurate.zip"
    trained = run_cli(
        "train", small_folder, "--preset", "accurate", "--quiet", "--cache-dir", tmp_path / "cache", "--out", model
    )
    assert trained.returncode == 0, trained.stderr
    meta = json.loads(zipfile.ZipFile(model).read("bundle.json"))
    config, rule = meta["config"], meta["decision_rule"]
    assert config["preprocess"]["target_mpp"] == 1.68 and config["preprocess"]["scale"] == 0.25
    assert config["classifier"]["kind"] == "logistic" and config["features"]["backbones"] == ["efficientnet_lite0"]
    assert 0 < rule["threshold"] < 1 and rule["refer_below_agreement"] == 0.75
    predicted = run_cli("predict", model, small_folder, "--out", tmp_path / "p.csv", "--quiet")
    assert predicted.returncode == 0, predicted.stderr
    rows = list(csv.DictReader((tmp_path / "p.csv").open()))
    assert len(rows) == 8
    for row in rows:  # the threshold, not the argmax, calls carcinoma
        assert (row["group"] != "0") == (float(row["p_carcinoma"]) >= rule["threshold"])


def test_four_classes_on_data_without_the_four_labels_is_one_line_before_any_work(demo_data, tmp_path):
    """The demo data's labels are the 3 groups: --classes bach4 stops before extraction, naming a file and the fix."""
    for command in ("cv", "train"):
        out = tmp_path / command
        result = run_cli(
            command,
            demo_data,
            "--preset",
            "quick",
            "--classes",
            "bach4",
            "--quiet",
            "--cache-dir",
            tmp_path / "cache",
            "--out",
            out,
        )
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert (
            "needs the labels Normal, Benign, InSitu, Invasive" in result.stderr and "--classes groups" in result.stderr
        )
        assert "normal_benign" in result.stderr and not out.exists() and not (tmp_path / "cache").exists()
