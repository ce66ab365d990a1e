"""The Dask engine against `--engine local`: same bytes, a killed worker or client loses nothing, a poison image is
one problem, an unreachable scheduler one line. One LocalCluster of 2 worker processes serves the tests that leave
their workers whole; a test that kills workers gets its own cluster and closes it (no `client.restart()`, whose fixed
wait for the workers to come back a busy machine missed). The caller's environment is checked to come back
unchanged."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from test_cli import run_cli

distributed = pytest.importorskip("distributed")

FLAGS = [
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
    "--backbone",
    "efficientnet_lite0",
    "--quiet",
]


def _own_cluster():
    """histoboost's own LocalCluster start (2 workers x 1 thread), its scheduler address, and the environment it
    must leave as it found it."""
    from histoboost.engine import EngineSpec, open_engine

    before = dict(os.environ)
    with open_engine(EngineSpec("dask", workers=2, threads=1)) as engine:
        assert dict(os.environ) == before  # Dask's nanny variables did not stay in the caller
        yield engine
    assert dict(os.environ) == before


cluster = pytest.fixture(scope="module")(_own_cluster)
# For a test whose plugin kills workers: thrown away afterwards, so later tests never wait for workers to come back.
doomed_cluster = pytest.fixture(scope="function")(_own_cluster)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, bach):
    """Eight real BACH images extracted locally with 1 thread: the bytes every Dask run must reproduce."""
    from conftest import copy_eight

    root = tmp_path_factory.mktemp("engine")
    data = copy_eight(bach, root / "data")
    result = run_cli("extract", data, *FLAGS, "--threads", "1", "--cache-dir", root / "ref", "--out", root / "run")
    assert result.returncode == 0, result.stderr
    return data, root / "ref"


def _store(cache: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in cache.glob("features/*/[!.]*.npz")}


def _dask(cluster, *args) -> subprocess.CompletedProcess:
    return run_cli(*args, "--engine", "dask", "--scheduler", cluster.client.scheduler.address)


def _with_plugin(cluster, plugin, name: str):
    """Register a test-only worker plugin (it breaks workers on purpose) and remove it afterwards."""
    import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    cluster.client.register_plugin(plugin, name=name)


def test_workers_keep_histoboosts_threads_and_allocator(cluster):
    def settings():
        import torch

        return (
            torch.get_num_threads(),
            os.environ.get("MALLOC_TRIM_THRESHOLD_"),
            os.environ.get("OMP_NUM_THREADS"),
            os.environ.get("MALLOC_ARENA_MAX"),
        )

    for threads, trim, omp, arenas in cluster.client.run(settings).values():
        assert threads == 1 and omp == "1"
        assert trim != "65536"  # Dask's own value would make glibc hand freed memory back after every batch
        assert arenas == "1"  # tasks run in a worker thread: its own arena would do the same


def test_dask_features_are_byte_identical_to_local(cluster, reference, tmp_path):
    data, ref = reference
    result = _dask(cluster, "extract", data, *FLAGS, "--cache-dir", tmp_path / "cache", "--out", tmp_path / "run")
    assert result.returncode == 0, result.stderr
    assert "8 extracted" in result.stdout and "dask: 2 worker(s) x 1 thread(s)" in result.stderr
    ours = _store(tmp_path / "cache")
    assert len(ours) == 8 and ours == _store(ref)
    report = json.loads((tmp_path / "run" / "extract.json").read_text())
    assert report["engine"]["engine"] == "dask" and report["engine"]["threads_per_worker"] == 1
    again = _dask(cluster, "extract", data, *FLAGS, "--cache-dir", tmp_path / "cache", "--out", tmp_path / "run2")
    assert "0 extracted" in again.stdout and "8 reused" in again.stdout  # a finished image is never recomputed


def test_cv_on_dask_is_identical_to_local(cluster, reference, tmp_path):
    data, ref = reference
    flags = [
        *FLAGS,
        "--rounds",
        "20",
        "--folds",
        "2",
        "--split-by",
        "image",
        "--compare-split",
        "none",
        "--decision",
        "argmax",
        "--cache-dir",
        ref,
    ]
    local = run_cli("cv", data, *flags, "--threads", "1", "--out", tmp_path / "local")
    assert local.returncode == 0, local.stderr
    dask = _dask(cluster, "cv", data, *flags, "--out", tmp_path / "dask")
    assert dask.returncode == 0, dask.stderr
    with np.load(tmp_path / "local" / "cv_results.npz") as a, np.load(tmp_path / "dask" / "cv_results.npz") as b:
        assert a.files == b.files
        for name in a.files:
            assert np.array_equal(a[name], b[name]), name
    metrics = [json.loads((tmp_path / run / "metrics.json").read_text())["models"] for run in ("local", "dask")]
    assert metrics[0] == metrics[1]


def test_train_on_dask_extracts_on_the_workers_and_fits_the_same_model(cluster, reference, tmp_path):
    data, ref = reference
    flags = [*FLAGS, "--rounds", "20", "--split-by", "image"]
    dask = _dask(cluster, "train", data, *flags, "--cache-dir", tmp_path / "cache", "--out", tmp_path / "dask.zip")
    assert dask.returncode == 0, dask.stderr
    assert "dask: 2 worker(s)" in dask.stderr and _store(tmp_path / "cache") == _store(ref)
    local = run_cli("train", data, *flags, "--threads", "1", "--cache-dir", ref, "--out", tmp_path / "local.zip")
    assert local.returncode == 0, local.stderr
    models = [zipfile.ZipFile(tmp_path / f"{run}.zip").read("model.ubj") for run in ("dask", "local")]
    assert models[0] == models[1]


def test_predict_on_dask_describes_on_the_workers_and_writes_what_local_predict_writes(
    cluster, reference, tmp_path, monkeypatch
):
    import histoboost.features

    data, ref = reference
    flags = [*FLAGS, "--rounds", "20", "--split-by", "image"]
    model = tmp_path / "model.zip"
    assert run_cli("train", data, *flags, "--threads", "1", "--cache-dir", ref, "--out", model).returncode == 0
    with monkeypatch.context() as here:  # this process describes nothing: the workers do
        here.setattr(histoboost.features, "describe_image", lambda *a, **k: pytest.fail("described by the client"))
        dask = _dask(cluster, "predict", model, data, "--cache-dir", tmp_path / "cache", "--quiet")
    assert dask.returncode == 0, dask.stderr
    assert "dask: 2 worker(s)" in dask.stderr and _store(tmp_path / "cache") == _store(ref)  # the workers' bytes
    local = run_cli("predict", model, data, "--no-cache", "--threads", "1", "--quiet")
    assert local.returncode == 0 and dask.stdout == local.stdout and len(dask.stdout.splitlines()) == 9


def test_an_image_the_workers_cannot_describe_is_one_problem_by_a_relative_path_too(
    cluster, reference, tmp_path, monkeypatch
):
    """Workers report problems by absolute path; `predict data/` names them relatively: the image is still one
    problem line, and this process never prepares it again (the engine isolated it)."""
    import shutil

    import histoboost.features

    from conftest import write_png

    data, ref = reference
    model = tmp_path / "model.zip"
    flags = [*FLAGS, "--rounds", "20", "--split-by", "image"]
    assert run_cli("train", data, *flags, "--threads", "1", "--cache-dir", ref, "--out", model).returncode == 0
    shutil.copytree(data, tmp_path / "images")
    write_png(tmp_path / "images" / "Normal" / "tiny.png", (120, 100))  # smaller than the 192 px crop
    monkeypatch.chdir(tmp_path)
    with monkeypatch.context() as here:
        here.setattr(histoboost.features, "prepare_image", lambda *a, **k: pytest.fail("prepared by the client"))
        result = _dask(cluster, "predict", model, "images", "--cache-dir", tmp_path / "cache", "--quiet")
    assert result.returncode == 1 and len(result.stdout.splitlines()) == 9, result.stderr
    assert [line for line in result.stderr.splitlines() if "tiny.png" in line] == [
        line for line in result.stderr.splitlines() if line.startswith("error:")
    ]
    assert "too small" in result.stderr


class _DieOnce(distributed.WorkerPlugin):
    """Kills its worker the first time a feature file is about to be published (after its temporary is written)."""

    idempotent = True

    def __init__(self, marker: str):
        self.marker = marker

    def setup(self, worker=None):
        from histoboost import storage

        original = storage._commit

        def commit(tmp, target):
            if not os.path.exists(self.marker):
                Path(self.marker).write_text(str(tmp))
                os._exit(1)
            original(tmp, target)

        storage._commit = commit


def test_a_worker_killed_mid_extraction_loses_nothing(doomed_cluster, reference, tmp_path):
    data, ref = reference
    marker = tmp_path / "killed"
    _with_plugin(doomed_cluster, _DieOnce(str(marker)), "die-once")
    result = _dask(
        doomed_cluster, "extract", data, *FLAGS, "--cache-dir", tmp_path / "cache", "--out", tmp_path / "run"
    )
    assert marker.exists(), "a worker must have died"
    assert result.returncode == 0, result.stderr
    assert _store(tmp_path / "cache") == _store(ref)  # all eight, none corrupt
    assert not list((tmp_path / "cache").glob("features/*/.*.tmp")) and not list(
        (tmp_path / "cache").glob("features/*/.lease.*")
    )


class _Poison(distributed.WorkerPlugin):
    """Kills its worker whenever it prepares the image whose name holds `name`: a file that crashes a decoder."""

    idempotent = True

    def __init__(self, name: str):
        self.name = name

    def setup(self, worker=None):
        from histoboost import features

        original = features.prepare_image

        def prepare(path, *args, **kwargs):
            if self.name in str(path):
                os._exit(1)
            return original(path, *args, **kwargs)

        features.prepare_image = prepare


def test_a_poison_image_is_one_problem_and_the_others_are_done(doomed_cluster, reference, tmp_path):
    data, ref = reference
    _with_plugin(doomed_cluster, _Poison("is001"), "poison")
    # Only the running task is blamed for a death: a worker holds no queued task beside it.
    assert doomed_cluster.client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.WORKER_SATURATION) == 1.0
    result = _dask(
        doomed_cluster, "extract", data, *FLAGS, "--cache-dir", tmp_path / "cache", "--out", tmp_path / "run"
    )
    assert result.returncode == 1
    assert "7 extracted" in result.stdout and "1 failed" in result.stdout
    problem = [line for line in result.stderr.splitlines() if "is001" in line]
    assert len(problem) == 1 and "its worker died every time it ran" in problem[0]
    ours, theirs = _store(tmp_path / "cache"), _store(ref)
    assert len(ours) == 7 and all(ours[name] == theirs[name] for name in ours)


def test_a_killed_client_resumes_without_recomputing(cluster, reference, tmp_path):
    data, ref = reference
    cache = tmp_path / "cache"
    env = {**os.environ, "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "68719476736"}
    args = [
        sys.executable,
        "-m",
        "histoboost.cli",
        "extract",
        str(data),
        *FLAGS,
        "--cache-dir",
        str(cache),
        "--engine",
        "dask",
        "--scheduler",
        cluster.client.scheduler.address,
    ]
    proc = subprocess.Popen(
        [*args, "--out", str(tmp_path / "r1")], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 300
    while time.time() < deadline and len(_store(cache)) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(_store(cache))
    assert 2 <= done_before < 8, "the kill must land mid-run"
    resumed = subprocess.run(
        [*args, "--out", str(tmp_path / "r2")], env=env, capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr
    report = json.loads((tmp_path / "r2" / "extract.json").read_text())["backbones"]["efficientnet_lite0"]
    # Tasks of the killed client that were running may still finish: they are never done twice on purpose.
    assert report["computed"] + report["reused"] == 8 and report["reused"] >= done_before
    assert _store(cache) == _store(ref)


def test_an_unreachable_scheduler_is_one_line(reference, tmp_path, monkeypatch):
    data, _ = reference
    monkeypatch.setenv("DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT", "2s")
    result = run_cli(
        "extract",
        data,
        *FLAGS,
        "--engine",
        "dask",
        "--scheduler",
        "tcp://127.0.0.1:9",
        "--cache-dir",
        tmp_path / "cache",
        "--out",
        tmp_path / "run",
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert result.stderr.startswith("histoboost: error: cannot reach the Dask scheduler at tcp://127.0.0.1:9")
    assert not (tmp_path / "run").exists()
    monkeypatch.setenv("HISTOBOOST_SCHEDULER", "tcp://127.0.0.1:9")  # the address from the environment
    result = run_cli(
        "extract", data, *FLAGS, "--engine", "dask", "--cache-dir", tmp_path / "cache", "--out", tmp_path / "run"
    )
    assert result.returncode == 2 and "cannot reach the Dask scheduler at tcp://127.0.0.1:9" in result.stderr
    local = run_cli("extract", data, *FLAGS, "--scheduler", "tcp://127.0.0.1:9", "--out", tmp_path / "run")
    assert local.returncode == 2 and "need --engine dask" in local.stderr
    (tmp_path / "sched.json").write_text('{"type": "not a scheduler"}')
    for flags, message in (
        (["--scheduler-file", tmp_path / "sched.json"], "not a Dask scheduler file"),
        (["--memory-limit", "lots"], "is not a size"),
    ):
        result = run_cli("extract", data, *FLAGS, "--engine", "dask", *flags, "--out", tmp_path / "run")
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_a_scheduler_address_histoboost_cannot_use_is_one_line(reference, tmp_path, monkeypatch):
    """Other transports, tls:// without Dask's TLS settings, and a service that is not a Dask scheduler (a web
    server: Dask would read its reply as a frame length and try to allocate exabytes) are refused before Dask
    connects."""
    import http.server
    import threading

    data, _ = reference
    monkeypatch.setenv("DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT", "3s")
    web = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    try:
        cases = {
            "ucx://127.0.0.1:8786": "the ucx:// transport is not supported",
            "tls://127.0.0.1:8786": "tls:// needs Dask's TLS settings",
            f"tcp://127.0.0.1:{web.server_port}": "does not answer like a Dask scheduler",
        }
        for address, message in cases.items():
            result = run_cli(
                "extract",
                data,
                *FLAGS,
                "--engine",
                "dask",
                "--scheduler",
                address,
                "--cache-dir",
                tmp_path / "cache",
                "--out",
                tmp_path / "run",
            )
            assert result.returncode == 2, (address, result.stderr)
            assert message in result.stderr and result.stderr.strip().count("\n") == 0, (address, result.stderr)
            assert not (tmp_path / "run").exists()
    finally:
        web.shutdown()


def test_workers_without_the_memory_they_need_say_so(reference, tmp_path):
    """Every worker dies on every task when its memory limit is below what extraction needs: the one message names
    the limit, not each image."""
    data, _ = reference
    two = tmp_path / "data"
    for path in sorted(data.rglob("*.jpeg"))[:3:2]:  # one image of two classes
        (two / path.parent.name).mkdir(parents=True, exist_ok=True)
        (two / path.parent.name / path.name).write_bytes(path.read_bytes())
    result = run_cli(
        "extract",
        two,
        *FLAGS,
        "--engine",
        "dask",
        "--workers",
        "1",
        "--memory-limit",
        "900MiB",
        "--cache-dir",
        tmp_path / "cache",
        "--out",
        tmp_path / "run",
    )
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("histoboost: error: every task's worker died (2 images)"), result.stderr[-2000:]
    assert "memory limit (0.88 GiB per worker)" in last and "check the file" not in result.stderr


def test_two_machines_writing_one_store_lose_nothing(reference, tmp_path):
    """Two local runs at once with different host names (two "machines") on one shared cache."""
    data, ref = reference
    env = {**os.environ, "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "68719476736"}
    runs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "histoboost.cli",
                "extract",
                str(data),
                *FLAGS,
                "--threads",
                "1",
                "--cache-dir",
                str(tmp_path / "cache"),
                "--out",
                str(tmp_path / f"run-{host}"),
            ],
            env={**env, "HISTOBOOST_HOSTNAME": host},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for host in ("machine-a", "machine-b")
    ]
    for run in runs:
        out, err = run.communicate(timeout=600)
        assert run.returncode == 0, err
    assert _store(tmp_path / "cache") == _store(ref)
    assert not list((tmp_path / "cache").glob("features/*/.*.tmp")) and not list(
        (tmp_path / "cache").glob("features/*/.lease.*")
    )


def test_shards_split_the_images_once(reference, tmp_path):
    data, ref = reference
    counts = []
    for k in (1, 2, 3):
        result = run_cli(
            "extract",
            data,
            *FLAGS,
            "--threads",
            "1",
            "--shard",
            f"{k}/3",
            "--cache-dir",
            tmp_path / "cache",
            "--out",
            tmp_path / f"run{k}",
        )
        assert result.returncode == 0, result.stderr
        counts.append(
            json.loads((tmp_path / f"run{k}" / "extract.json").read_text())["backbones"]["efficientnet_lite0"][
                "computed"
            ]
        )
    assert sum(counts) == 8 and _store(tmp_path / "cache") == _store(ref)
    bad = run_cli("extract", data, *FLAGS, "--shard", "4/3", "--out", tmp_path / "bad")
    assert bad.returncode == 2 and "is not K/N" in bad.stderr


def test_slides_on_dask_match_local(cluster, trained, tmp_path):
    from conftest import CMU

    bundle, _, _ = trained
    model = bundle.save(tmp_path / "model")
    flags = ["--stride-um", "161.25", "--confirm-top", "2", "--quiet"]
    local = run_cli(
        "slide", model, CMU, *flags, "--threads", "1", "--out", tmp_path / "local", "--cache-dir", tmp_path / "c1"
    )
    assert local.returncode == 0, local.stderr
    dask = _dask(cluster, "slide", model, CMU, *flags, "--out", tmp_path / "dask", "--cache-dir", tmp_path / "c2")
    assert dask.returncode == 0, dask.stderr
    stem = CMU.stem
    for name in ("tiles.csv", "heatmap.npz"):
        assert (tmp_path / "local" / stem / name).read_bytes() == (tmp_path / "dask" / stem / name).read_bytes(), name
    with zipfile.ZipFile(tmp_path / "dask" / stem / "heatmap.npz") as archive:
        assert archive.testzip() is None
