"""`histoboost datasets`: every path of a fetch against a local HTTP server on 127.0.0.1 serving small archives made
here (the owners' URLs cannot be reached from CI): laid out as histoboost reads it, resumed after an interrupted
transfer, a wrong checksum refused with the file kept, hostile archives refused leaving nothing, server errors in
one line."""

from __future__ import annotations

import hashlib
import io
import json
import stat
import tarfile
import threading
import time
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest
from test_cli import run_cli

from histoboost.data import load_manifest
from histoboost.datasets import SOURCES, Source, fetch
from histoboost.datasets.catalogue import _bach_columns
from histoboost.datasets.unpack import unpack
from histoboost.errors import DatasetError

from conftest import tissue_like

BACH_NAMES = {"Benign": "b042", "InSitu": "is001", "Invasive": "iv073", "Normal": "n070"}  # 2 held out, 2 train


def bach_like_zip(path: Path) -> Path:
    """An archive laid out as BACH's: ICIAR2018_BACH_Challenge/Photos/<class>/<name>.tif and its ground truth
    (synthetic tissue-like pixels: no BACH image is copied)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        truth = []
        for i, (label, name) in enumerate(BACH_NAMES.items()):
            buffer = io.BytesIO()
            tissue_like((600, 500), seed=i).save(buffer, format="TIFF")
            zf.writestr(f"ICIAR2018_BACH_Challenge/Photos/{label}/{name}.tif", buffer.getvalue())
            truth.append(f"{name}.tif,{label}")
        zf.writestr("ICIAR2018_BACH_Challenge/Photos/microscopy_ground_truth.csv", "\n".join(truth) + "\n")
        zf.writestr("ICIAR2018_BACH_Challenge/WSI/readme.txt", "slides would be here\n")
    return path


class Server:
    """A Starlette app on 127.0.0.1 serving files by name (with HTTP range requests); a name can be set to fail
    (503) or to drop the connection half way once. It records the Range header of every request."""

    def __init__(self, folder: Path):
        import uvicorn
        from starlette.applications import Starlette
        from starlette.responses import FileResponse, PlainTextResponse, StreamingResponse
        from starlette.routing import Route

        self.folder, self.failing, self.cut_once, self.ranges = folder, set(), set(), []

        async def serve(request):
            name = request.path_params["name"]
            self.ranges.append(request.headers.get("range"))
            if name in self.failing:
                return PlainTextResponse("busy", status_code=503)
            path = folder / name
            if name in self.cut_once:
                self.cut_once.discard(name)
                data = path.read_bytes()

                async def half():
                    yield data[: len(data) // 2]
                    raise ConnectionResetError("the test drops the connection")

                return StreamingResponse(half(), headers={"content-length": str(len(data))})
            return FileResponse(path)

        app = Starlette(routes=[Route("/{name}", serve)])
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="critical"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)


@pytest.fixture
def server(tmp_path):
    (tmp_path / "served").mkdir()
    s = Server(tmp_path / "served")
    yield s
    s.close()


def source_for(server: Server, archive: Path, **changes) -> Source:
    data = archive.read_bytes()
    source = Source(
        name="bachlike",
        title="a BACH-like archive made by the test",
        url=server.url(archive.name),
        filename=archive.name,
        licence="test licence",
        licence_url="https://example.org/licence",
        citation="the test",
        size=len(data),
        md5=hashlib.md5(data).hexdigest(),
        images_folder="ICIAR2018_BACH_Challenge/Photos",
        columns=_bach_columns,
    )
    return replace(source, **changes)


def test_a_fetch_is_checked_unpacked_and_laid_out_with_licence_and_provenance(server, tmp_path):
    archive = bach_like_zip(server.folder / "bach.zip")
    done = fetch(source_for(server, archive), tmp_path / "data", progress=False)
    folder = tmp_path / "data" / "bachlike"
    assert done.folder == folder and done.manifests == {"manifest.csv": 4, "held_out.csv": 2, "train.csv": 2}
    assert done.sha256 == hashlib.sha256(archive.read_bytes()).hexdigest() and not done.already
    manifest, problems = load_manifest(folder / "manifest.csv")
    assert problems == [] and sorted(r.label for r in manifest) == sorted(BACH_NAMES)
    held_out, _ = load_manifest(folder / "held_out.csv")
    assert sorted(r.name for r in held_out) == [
        "ICIAR2018_BACH_Challenge/Photos/Benign/b042",
        "ICIAR2018_BACH_Challenge/Photos/Invasive/iv073",
    ]
    assert {r.extra["id_block"] for r in manifest} == {"Benign-2", "InSitu-0", "Invasive-3", "Normal-3"}
    provenance = json.loads((folder / "SOURCE.json").read_text())
    assert provenance["sha256"] == done.sha256 and provenance["published"] == {"md5": source_for(server, archive).md5}
    assert "test licence" in (folder / "LICENCE.txt").read_text()
    assert not (tmp_path / "data" / "bach.zip").exists()  # deleted once unpacked (--keep-archive keeps it)
    requests_made = len(server.ranges)
    again = fetch(source_for(server, archive), tmp_path / "data", progress=False)
    assert again.already and again.manifests == done.manifests and len(server.ranges) == requests_made
    (folder / "SOURCE.json").write_text("{not json")
    with pytest.raises(DatasetError, match="SOURCE.json is damaged.*fetch again"):
        fetch(source_for(server, archive), tmp_path / "data", progress=False)


def test_an_interrupted_transfer_resumes_with_a_range_request(server, tmp_path):
    archive = bach_like_zip(server.folder / "bach.zip")
    server.cut_once.add("bach.zip")
    source = source_for(server, archive)
    with pytest.raises(DatasetError, match="run the same command again"):
        fetch(source, tmp_path / "data", progress=False)
    part = tmp_path / "data" / "bach.zip.part"
    kept = part.stat().st_size
    assert 0 < kept < archive.stat().st_size and not (tmp_path / "data" / "bachlike").exists()
    data = archive.read_bytes()
    archive.write_bytes(bytes(kept) + data[kept:])  # a client that started again from byte 0 would get zeros
    done = fetch(source, tmp_path / "data", progress=False)
    assert server.ranges[-1] == f"bytes={kept}-" and done.manifests["manifest.csv"] == 4
    assert not part.exists()


def test_a_wrong_checksum_is_refused_and_the_file_kept(server, tmp_path):
    archive = bach_like_zip(server.folder / "bach.zip")
    wrong = source_for(server, archive, md5="0" * 32)
    with pytest.raises(DatasetError, match="md5 .* but the published one is 0{32}.*delete it"):
        fetch(wrong, tmp_path / "data", progress=False)
    assert (tmp_path / "data" / "bach.zip").read_bytes() == archive.read_bytes()
    assert not (tmp_path / "data" / "bachlike").exists()
    with pytest.raises(DatasetError, match="sha256"):  # a sha256 the user trusts is checked too
        fetch(source_for(server, archive), tmp_path / "data", sha256="f" * 64, progress=False)


def _zip(path: Path, members: dict[str, bytes], link: str | None = None) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        if link is not None:
            info = zipfile.ZipInfo(link)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, "/etc/passwd")
    return path


@pytest.mark.parametrize(
    "make, says",
    [
        (lambda p: _zip(p / "up.zip", {"../escaped.txt": b"x"}), "outside the folder"),
        (lambda p: _zip(p / "abs.zip", {"/tmp/escaped.txt": b"x"}), "outside the folder"),
        (lambda p: _zip(p / "link.zip", {"a.txt": b"x"}, link="Photos/link"), "a link or a device"),
        (lambda p: _zip(p / "bomb.zip", {"zeros.bin": bytes(64 * 2**20)}), "zip bomb"),
        (lambda p: p / "junk.zip", "neither a zip nor a tar"),
    ],
)
def test_a_hostile_zip_is_refused_and_nothing_is_unpacked(tmp_path, make, says):
    (tmp_path / "junk.zip").write_bytes(b"not an archive at all")
    into = tmp_path / "into"
    into.mkdir()
    with pytest.raises(DatasetError, match=says):
        unpack(make(tmp_path), into)
    assert list(into.iterdir()) == [] and not (tmp_path / "escaped.txt").exists()


def _tar(path: Path, name: str, data: bytes = b"x", link: bool = False) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        info = tarfile.TarInfo(name)
        if link:
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tf.addfile(info)
        else:
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize(
    "make, says",
    [
        (lambda p: _tar(p / "link.tar.gz", "Photos/passwd", link=True), "a link or a device"),
        (lambda p: _tar(p / "up.tar.gz", "../escaped.txt"), "outside the folder"),
        (lambda p: _tar(p / "abs.tar.gz", "/tmp/escaped.txt"), "outside the folder"),
        (lambda p: _tar(p / "bomb.tar.gz", "zeros.bin", bytes(64 * 2**20)), "bomb"),
    ],
)
def test_a_hostile_tar_is_refused_and_nothing_is_unpacked(tmp_path, make, says):
    (tmp_path / "into").mkdir()
    with pytest.raises(DatasetError, match=says):
        unpack(make(tmp_path), tmp_path / "into")
    assert list((tmp_path / "into").iterdir()) == [] and not (tmp_path / "escaped.txt").exists()


def test_a_fetch_of_a_hostile_archive_leaves_no_folder(server, tmp_path):
    archive = _zip(server.folder / "up.zip", {"../escaped.txt": b"x"})
    with pytest.raises(DatasetError, match="outside the folder"):
        fetch(source_for(server, archive), tmp_path / "data", progress=False)
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["up.zip"]


def test_server_errors_and_unknown_names_are_one_line(server, tmp_path, monkeypatch):
    archive = bach_like_zip(server.folder / "bach.zip")
    server.failing.add("bach.zip")
    monkeypatch.setitem(SOURCES, "bachlike", source_for(server, archive))
    result = run_cli("datasets", "fetch", "bachlike", "--to", tmp_path / "data", "--quiet")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"histoboost: error: {server.url('bach.zip')}: the server answered 503 Service Unavailable: try again "
        f"later, or download bach.zip by hand into {tmp_path / 'data'} and run the same command"
    ]
    assert "test licence" in result.stdout  # the licence is said before anything is downloaded
    unknown = run_cli("datasets", "fetch", "nosuch")
    assert unknown.returncode == 2 and "choose one of bach, bachlike, breakhis" in unknown.stderr
    manual = run_cli("datasets", "fetch", "bracs")
    assert manual.returncode == 2 and "registration" in manual.stderr


def test_the_list_names_each_source_its_licence_and_what_is_checked():
    listed = run_cli("datasets", "list")
    assert listed.returncode == 0
    assert "bach: BACH" in listed.stdout and "CC BY-NC-ND 4.0" in listed.stdout and "(checked: md5)" in listed.stdout
    assert "breakhis:" in listed.stdout and "nothing published" in listed.stdout and "bracs:" in listed.stdout


def test_bach_columns_follow_evas_patient_aware_split():
    """eva's split holds out 132 of BACH's 400 training images (kaiko-ai/eva, bach.py), 268 stay for training."""
    prefixes = {"Benign": "b", "InSitu": "is", "Invasive": "iv", "Normal": "n"}
    columns = [
        _bach_columns(Path(f"Photos/{label}/{prefix}{n:03d}.tif"))
        for label, prefix in prefixes.items()
        for n in range(1, 101)
    ]
    assert sum(c["split"] == "held_out" for c in columns) == 132
    assert sum(c["split"] == "train" for c in columns) == 268
    assert _bach_columns(Path("Photos/Benign/b060.tif")) == {"id_block": "Benign-2", "split": "train"}
    assert _bach_columns(Path("Photos/Benign/notes.tif")) == {"id_block": "", "split": ""}
