"""The viewer (`histoboost view`) as a user runs it: a real server process, raw HTTP for what must be refused,
and Debian's Chromium driven by Playwright for what the pages draw."""

from __future__ import annotations

import base64
import csv
import hashlib
import http.client
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from histoboost.cli import main
from histoboost.runtime import Runtime
from histoboost.slides import SlideSettings, predict_slide

from conftest import CMU

STATIC = Path(__file__).resolve().parents[1] / "src" / "histoboost" / "viewer" / "static"
SECRET = "TOP-SECRET-b64e1"
EVIL = '<svg xmlns="http://www.w3.org/2000/svg" onload="alert(1)"><script>alert("evil")</script></svg>'
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Flags that work as root in a container with no network (the machine notes): no sandbox, no GPU, no
# background networking; --headless=new is Chromium's own headless mode.
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--headless=new",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="session")
def results(model, mosaic, tmp_path_factory, bach):
    """What `view` is given: slide results of the mosaic and of the CMU slide, predictions with overlays, and
    beside them a secret file that must never be served (one result folder holds a link to it)."""
    bundle, path = model
    root = tmp_path_factory.mktemp("view")
    (root / "secret.txt").write_text(SECRET)
    scorer = bundle.predictor.using(Runtime(cache_dir=root / "c"))
    predict_slide(scorer, mosaic[0], root / "slides" / "mosaic", SlideSettings(confirm_top=0))
    predict_slide(scorer, CMU, root / "slides" / CMU.stem, SlideSettings(stride_um=161.25, confirm_top=0))
    (root / "slides" / "mosaic" / "leak.txt").symlink_to(root / "secret.txt")
    (root / "preds").mkdir()
    images = [bach / f"{name}.jpeg" for name in ("Normal/n021", "Benign/b020", "InSitu/is021", "Invasive/iv020")]
    code = main(
        [
            "predict",
            str(path),
            *map(str, images),
            "--out",
            str(root / "preds" / "predictions.csv"),
            "--overlay",
            str(root / "preds" / "overlays"),
            "--quiet",
        ]
    )
    assert code == 0
    (root / "preds" / ".ssh").mkdir()
    (root / "preds" / ".ssh" / "id_rsa").write_text(SECRET)  # a secret beside the predictions
    for name in ("evil.html", "evil.svg"):  # pages someone put in a shared result folder
        (root / "slides" / "mosaic" / name).write_text(EVIL)
    return root


class Server:
    """`histoboost view` in its own process, on a free port of 127.0.0.1."""

    def __init__(self, *args: str | Path):
        # As a user starts it: without the allocator settings the test suite (Makefile) sets for torch.
        env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "histoboost.cli", "view", *map(str, args)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        line = self.proc.stdout.readline()
        match = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        assert match, line + self.proc.stderr.read()
        self.port = int(match.group(1))
        self.url = f"http://127.0.0.1:{self.port}"

    def get(self, raw_path: str) -> tuple[int, bytes]:
        """GET exactly `raw_path` (no client-side normalisation of `..` or escapes)."""
        status, _, body = self.fetch(raw_path)
        return status, body

    def fetch(self, raw_path: str, host: str | None = None) -> tuple[int, http.client.HTTPMessage, bytes]:
        """GET `raw_path` with this Host header (default: 127.0.0.1:port): status, headers and body."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        conn.putrequest("GET", raw_path, skip_host=True, skip_accept_encoding=True)
        conn.putheader("Host", host or f"127.0.0.1:{self.port}")
        conn.endheaders()
        response = conn.getresponse()
        body = response.read()
        conn.close()
        return response.status, response.headers, body

    def peak_rss_mib(self) -> float:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024

    def stop(self) -> tuple[int, str]:
        self.proc.send_signal(signal.SIGINT)
        out, err = self.proc.communicate(timeout=30)
        return self.proc.returncode, out + err


@pytest.fixture(scope="module")
def server(results):
    running = Server(results / "slides", results / "preds" / "predictions.csv")
    yield running
    running.stop()


def slide_index(server: Server, name: str) -> int:
    """The slides are listed by folder name: CMU-1-Small-Region, then mosaic."""
    return {"CMU-1-Small-Region": 0, "mosaic": 1}[name]


def test_vendored_openseadragon_is_the_pinned_release():
    from histoboost.viewer.app import OPENSEADRAGON

    data = (STATIC / "openseadragon" / "openseadragon.min.js").read_bytes()
    assert hashlib.sha256(data).hexdigest() == OPENSEADRAGON["sha256"]
    assert data.startswith(f"//! openseadragon {OPENSEADRAGON['version']}\n".encode())
    assert "Redistributions in binary form" in (STATIC / "openseadragon" / "LICENSE.txt").read_text()
    # The one <style> element it adds is allowed by its hash in the pages' Content-Security-Policy.
    style = re.findall(r'\.textContent="(@media[^"]*)"', data.decode())
    digest = base64.b64encode(hashlib.sha256(style[0].encode()).digest()).decode()
    assert len(style) == 1 and OPENSEADRAGON["style"] == f"'sha256-{digest}'"


def test_paths_that_leave_a_result_folder_are_refused(server, results):
    """`..`, its URL-encoded forms, absolute paths, backslashes and a link that leaves the folder: 403 or 404,
    and the secret beside the results is never in a response."""
    attempts = [
        "/slides/1/files/../../secret.txt",
        "/slides/1/files/%2e%2e/%2e%2e/secret.txt",
        "/slides/1/files/..%2f..%2fsecret.txt",
        "/slides/1/files/%2E%2E%2F%2E%2E%2Fsecret.txt",
        "/slides/1/files//etc/passwd",
        "/slides/1/files/%2fetc%2fpasswd",
        "/slides/1/files/..\\..\\secret.txt",
        "/slides/1/files/leak.txt",
        "/images/0/files/../secret.txt",
        "/images/0/files/%2e%2e%2fsecret.txt",
        "/static/../../secret.txt",
        "/static/%2e%2e/%2e%2e/app.py",
        "/static/..%2fapp.py",
        "/slides/1/files/C:/Windows/win.ini",
        "/slides/9/files/summary.json",
        "/slides/1/files/",
    ]
    for path in attempts:
        status, body = server.get(path)
        assert status in (403, 404), (path, status)
        assert SECRET.encode() not in body and b"def create_app" not in body, path
    assert server.get("/slides/1/files/summary.json")[0] == 200  # what is inside is served
    assert server.get("/slides/1/files/top/tile-01.png")[0] == 200
    status, body = server.get("/slides/1/files/../mosaic/summary.json")
    assert status == 404  # even a `..` that would come back inside: not one of the result's own file names


def test_many_concurrent_tile_requests_all_succeed_in_bounded_memory(server):
    data = json.loads(server.get("/slides/0/data.json")[1])
    base = data["dzi"].rsplit("/", 1)[0]
    status, dzi = server.get(data["dzi"])
    assert status == 200 and b'TileSize="254" Overlap="1"' in dzi
    # Every tile of the 8 finest levels, repeated: 200 requests in flight at once.
    paths = []
    level, width, height = 12, 2220, 2967
    while len(paths) < 200 and level >= 0:
        cols, rows = -(-width // 254), -(-height // 254)
        paths += [f"{base}/slide_files/{level}/{c}_{r}.jpeg" for r in range(rows) for c in range(cols)]
        level, width, height = level - 1, -(-width // 2), -(-height // 2)
    paths = (paths * 2)[:200]
    before = server.peak_rss_mib()
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=200) as pool:
        answers = list(pool.map(server.get, paths))
    seconds = time.perf_counter() - started
    assert [status for status, _ in answers] == [200] * 200
    assert all(body[:3] == b"\xff\xd8\xff" for _, body in answers)  # JPEG
    growth = server.peak_rss_mib() - before
    print(f"200 concurrent tile requests: {200 / seconds:.0f} requests/s, peak RSS +{growth:.0f} MiB")
    # Bounded: at most TILE_WORKERS tiles are made at once, and the coarse levels of this one-level slide read
    # the whole slide (about 100 MB each with its copies); unbounded threads and glibc's rising mmap threshold
    # made it 0.5-0.7 GB.
    assert growth < 320
    assert server.get(f"{base}/slide_files/12/99_99.jpeg")[0] == 404
    assert server.get("/slides/0/0000000000000000/slide.dzi")[0] == 404  # another slide's token


def test_view_binds_to_this_machine_and_stops_cleanly_on_ctrl_c(results):
    running = Server(results / "slides" / "mosaic")  # announced on 127.0.0.1 (Server checks the URL)
    assert running.get("/")[0] == 200
    for address in [a for a in os.popen("hostname -I").read().split() if "." in a and not a.startswith("127.")]:
        with pytest.raises(OSError):  # not reachable on this machine's other addresses
            http.client.HTTPConnection(address, running.port, timeout=2).request("GET", "/")
    code, output = running.stop()
    assert code == 0 and "histoboost view: stopped" in output and "Traceback" not in output


def test_a_result_that_cannot_be_shown_is_one_line(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("x")
    assert main(["view", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "holds no slide result" in err and len(err.strip().splitlines()) == 1


def test_a_huge_or_incomplete_slide_result_is_one_line(tmp_path, results, capsys):
    from histoboost.viewer.results import MAX_JSON_BYTES

    huge = shutil.copytree(results / "slides" / "mosaic", tmp_path / "huge")
    with open(huge / "summary.json", "r+b") as handle:  # sparse: no disk used
        handle.truncate(MAX_JSON_BYTES + 1)
    assert main(["view", str(huge)]) == 2
    err = capsys.readouterr().err
    assert "summary.json: not readable JSON (larger than 64 MiB)" in err and len(err.strip().splitlines()) == 1
    incomplete = shutil.copytree(results / "slides" / "mosaic", tmp_path / "incomplete")
    (incomplete / "heatmap.npz").unlink()
    assert main(["view", str(incomplete)]) == 2
    err = capsys.readouterr().err
    assert "not a complete slide result" in err and len(err.strip().splitlines()) == 1


# -- hostile requests and results -----------------------------------------------------------------------


def test_only_the_files_a_result_is_made_of_are_served(server, results):
    """Predictions: only the overlays their records name; slides: only the files `histoboost slide` writes.
    A secret beside the predictions CSV, a page or SVG someone put in a result folder, a 100 kB name: 404."""
    with open(results / "preds" / "predictions.csv", newline="") as handle:
        overlay = next(csv.DictReader(handle))["overlay"]
    for path in [
        "/images/0/files/.ssh/id_rsa",
        "/images/0/files/.ssh%2fid_rsa",
        "/images/0/files/predictions.csv",
        f"/images/0/files/overlays/{overlay}",
        "/slides/1/files/evil.html",
        "/slides/1/files/evil.svg",
        "/slides/1/files/top",
        "/slides/1/files/" + "a" * 100_000,
        "/images/0/files/" + "%2e" * 30_000,
    ]:
        status, body = server.get(path)
        assert status == 404, (path[:60], status)
        assert SECRET.encode() not in body and b"evil" not in body, path[:60]
    status, headers, body = server.fetch(f"/images/0/files/{overlay}")
    assert status == 200 and headers["Content-Type"] == "image/png" and body.startswith(b"\x89PNG")
    assert json.loads(server.get("/images/0/data.json")[1])["records"][0]["overlay"] == f"files/{overlay}"
    folder = results / "slides" / "mosaic"
    geojson = json.loads((folder / "summary.json").read_text())["files"]["geojson"]
    served = {
        "summary.json": "application/json",
        "report.html": "text/html; charset=utf-8",
        "heatmap.png": "image/png",
        "mask.png": "image/png",
        "mask-outline.png": "image/png",
        "top/tile-08.png": "image/png",
        "tiles.csv": "text/csv; charset=utf-8",
        "heatmap.npz": "application/octet-stream",
        geojson: "application/gzip",
    }
    for name, media_type in served.items():
        status, headers, body = server.fetch(f"/slides/1/files/{name}")
        assert status == 200 and headers["Content-Type"] == media_type and body == (folder / name).read_bytes(), name
        download = media_type not in ("image/png", "application/json", "text/html; charset=utf-8")
        assert headers.get("Content-Disposition", "").startswith("attachment") == download, name
        assert headers["Content-Security-Policy"].startswith("sandbox allow-same-origin; default-src 'none';"), name


def test_every_response_carries_the_security_headers(server):
    expected = {
        "X-Content-Type-Options": "nosniff",
        "X-Frame-Options": "DENY",
        "Referrer-Policy": "no-referrer",
        "Cross-Origin-Resource-Policy": "same-origin",
        "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; style-src 'self' "
        "'sha256-9xTiqzfwFaL2SGb1rmr8gysEwVVjIvqWAgmZgqFqpEE='; object-src 'none'; base-uri 'none'; "
        "form-action 'none'; frame-ancestors 'none'",
    }
    data = json.loads(server.get("/slides/0/data.json")[1])
    for path in [
        "/",
        "/slides/1/",
        "/slides/1/data.json",
        "/slides/1/heat.png",
        "/slides/1/heat.png?hide=99",
        "/images/0/",
        "/images/0/data.json",
        "/static/slide.js",
        "/static/openseadragon/openseadragon.min.js",
        data["dzi"],
        data["dzi"].replace("slide.dzi", "slide_files/0/0_0.jpeg"),
        "/nothing",
        "/slides/9/",
    ]:
        status, headers, _ = server.fetch(path)
        assert status in (200, 400, 404), (path, status)
        assert {name: headers[name] for name in expected} == expected, path
    status, headers, _ = server.fetch("/slides/1/files/report.html")
    assert headers["Content-Security-Policy"] == (
        "sandbox allow-same-origin; default-src 'none'; img-src 'self' "
        "data:; style-src 'unsafe-inline'; base-uri 'none'; "
        "form-action 'none'; frame-ancestors 'none'"
    )
    assert {name: headers[name] for name in expected if name != "Content-Security-Policy"} == {
        name: value for name, value in expected.items() if name != "Content-Security-Policy"
    }


def test_requests_for_another_host_are_refused(server):
    """DNS rebinding: a page of evil.example whose name now points at 127.0.0.1 sends `Host: evil.example`."""
    port = server.port
    for host in [
        "evil.example",
        f"evil.example:{port}",
        "127.0.0.1.evil.example",
        f"localhost:{port + 1}",
        f"127.0.0.1:{port}@evil.example",
    ]:
        status, headers, body = server.fetch("/slides/1/files/summary.json", host=host)
        assert status == 421 and b"fingerprint" not in body, host
        assert headers["X-Content-Type-Options"] == "nosniff"
    for host in ["localhost", f"localhost:{port}", "LOCALHOST", "127.0.0.1", f"127.0.0.1:{port}", f"[::1]:{port}"]:
        assert server.fetch("/", host=host)[0] == 200, host
    with socket.create_connection(("127.0.0.1", port), timeout=60) as conn:  # HTTP/1.0 without a Host header
        conn.sendall(b"GET / HTTP/1.0\r\n\r\n")
        answer = b"".join(iter(lambda: conn.recv(65536), b""))
    assert answer.startswith(b"HTTP/1.1 400 ")


@pytest.fixture(scope="module")
def shared(results, tmp_path_factory):
    """A copy of the mosaic's result, served with --allow-host, whose files are then swapped under it."""
    folder = shutil.copytree(results / "slides" / "mosaic", tmp_path_factory.mktemp("shared") / "mosaic", symlinks=True)
    running = Server(folder, "--allow-host", "Viewer.lan", "--allow-host", "10.0.0.7")
    yield running, folder
    running.stop()


def test_allow_host_adds_names(shared):
    server, _ = shared
    for host in ["viewer.lan", f"viewer.lan:{server.port}", "10.0.0.7", f"10.0.0.7:{server.port}", "localhost"]:
        assert server.fetch("/", host=host)[0] == 200, host
    assert server.fetch("/", host="evil.lan")[0] == 421


def test_a_file_swapped_after_start_is_not_served(shared, results):
    """Files are pinned at start: one replaced afterwards by a link to a secret, a new file, a FIFO, or one
    reached through a swapped folder is not served (and the server does not hang on the FIFO)."""
    server, folder = shared
    for name in ("heatmap.png", "mask-outline.png", "report.html", "top/tile-01.png"):
        assert server.get(f"/slides/0/files/{name}")[0] == 200, name
    (folder / "heatmap.png").unlink()
    (folder / "heatmap.png").symlink_to(results / "secret.txt")
    os.replace(folder / "mask-outline.png", folder / "moved.png")
    (folder / "mask-outline.png").write_text(SECRET)  # a new file: another inode
    (folder / "report.html").unlink()
    os.mkfifo(folder / "report.html")
    outside = folder.parent / "outside"
    outside.mkdir()
    (outside / "tile-01.png").write_text(SECRET)
    (folder / "top").rename(folder / "top-old")
    (folder / "top").symlink_to(outside)
    for name in ("heatmap.png", "mask-outline.png", "report.html", "top/tile-01.png"):
        status, body = server.get(f"/slides/0/files/{name}")
        assert status == 404 and SECRET.encode() not in body, name


def refusal(*paths: Path) -> str:
    """The one-line ViewerError `view` answers these results with."""
    from histoboost.viewer import ViewerError, find_results

    with pytest.raises(ViewerError) as caught:
        find_results(list(paths))
    message = str(caught.value)
    assert len(message.splitlines()) == 1, message
    return message


def edit_summary(folder: Path, change) -> None:
    summary = json.loads((folder / "summary.json").read_text())
    change(summary)
    (folder / "summary.json").write_text(json.dumps(summary))


def write_grid(folder: Path, **arrays) -> None:
    """heatmap.npz with some arrays replaced (None: left out)."""
    with np.load(folder / "heatmap.npz") as data:
        grid = {key: data[key] for key in data.files}
    grid.update(arrays)
    np.savez(folder / "heatmap.npz", **{k: v for k, v in grid.items() if v is not None})


def edit_tiles(folder: Path, change) -> None:
    """tiles.csv with its first row changed."""
    with open(folder / "tiles.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    change(rows[0])
    with open(folder / "tiles.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def link_out(path: Path) -> None:
    """The file moved out of its folder and a link left in its place."""
    outside = path.parent.parent / path.name
    path.rename(outside)
    path.symlink_to(outside)


def sparse(path: Path, size: int) -> None:
    with open(path, "r+b") as handle:  # no disk used
        handle.truncate(size)


MALFORMED = {  # what is done to a copy of a good result -> the file the refusal names, and what it says
    "no fingerprint": (
        lambda f: edit_summary(f, lambda s: s["slide"].pop("fingerprint")),
        "summary.json",
        "at slide ('fingerprint' is a required property)",
    ),
    "fingerprint a number": (
        lambda f: edit_summary(f, lambda s: s["slide"].update(fingerprint=7)),
        "summary.json",
        "at slide/fingerprint",
    ),
    "regions not a list": (
        lambda f: edit_summary(f, lambda s: s["carcinoma_regions"].update(regions={})),
        "summary.json",
        "at carcinoma_regions/regions",
    ),
    "a colour missing": (
        lambda f: edit_summary(f, lambda s: s["bundle"]["colors"].pop()),
        "summary.json",
        "differ in number",
    ),
    "GeoJSON name leaves the folder": (
        lambda f: edit_summary(f, lambda s: s["files"].update(geojson="../x.geojson.gz")),
        "summary.json",
        "at files/geojson",
    ),
    "NaN": (
        lambda f: edit_summary(f, lambda s: s["slide"].update(mpp=float("nan"))),
        "summary.json",
        "NaN is not a number JSON allows",
    ),
    "200 000 brackets": (
        lambda f: (f / "summary.json").write_text("[" * 200_000 + "]" * 200_000),
        "summary.json",
        "nested deeper than 32 levels",
    ),
    "nested 100 deep": (
        lambda f: edit_summary(f, lambda s: s.update(x=json.loads("[" * 100 + "]" * 100))),
        "summary.json",
        "nested deeper than 32 levels",
    ),
    "summary a link out": (lambda f: link_out(f / "summary.json"), "summary.json", "not a file inside the folder"),
    "tiles.csv a link out": (lambda f: link_out(f / "tiles.csv"), "tiles.csv", "not a file inside the folder"),
    "tiles.csv without p_carcinoma": (
        lambda f: (f / "tiles.csv").write_text((f / "tiles.csv").read_text().replace("p_carcinoma", "p_other", 1)),
        "tiles.csv",
        "no p_carcinoma column",
    ),
    "tiles.csv with a word for a number": (
        lambda f: edit_tiles(f, lambda r: r.update(x="abc")),
        "tiles.csv",
        "line 2: invalid literal for int()",
    ),
    "tiles.csv with a tile outside the grid": (
        lambda f: edit_tiles(f, lambda r: r.update(row="99999")),
        "tiles.csv",
        "line 2: cell 99999,",
    ),
    "tiles.csv with NaN": (
        lambda f: edit_tiles(f, lambda r: r.update(p_carcinoma="nan")),
        "tiles.csv",
        "line 2: nan is not a finite number",
    ),
    "tiles.csv over 64 MiB": (lambda f: sparse(f / "tiles.csv", 64 * 2**20 + 1), "tiles.csv", "over the 64 MiB"),
    "heatmap.npz of text": (lambda f: (f / "heatmap.npz").write_text("garbage"), "heatmap.npz", "not a numpy archive"),
    "heatmap.npz of pickles": (
        lambda f: write_grid(f, decision=np.array([[None, 1]], dtype=object)),
        "heatmap.npz",
        "decision is object",
    ),
    "heatmap.npz cut short": (
        lambda f: sparse(f / "heatmap.npz", (f / "heatmap.npz").stat().st_size // 2),
        "heatmap.npz",
        "not a numpy archive",
    ),
    "heatmap.npz without decision": (lambda f: write_grid(f, decision=None), "heatmap.npz", "no decision array"),
    "heatmap.npz shapes differ": (
        lambda f: write_grid(f, p_carcinoma=np.zeros((3, 3), np.float32)),
        "heatmap.npz",
        "p_carcinoma is float32 of shape (3, 3)",
    ),
    "heatmap.npz classes out of range": (
        lambda f: write_grid(f, decision=np.full((40, 40), 9, np.int8), p_carcinoma=np.zeros((40, 40), np.float32)),
        "heatmap.npz",
        "decision holds classes outside -1..",
    ),
    "heatmap.npz of 3000 x 3000 cells": (
        lambda f: write_grid(
            f, decision=np.zeros((3000, 3000), np.int8), p_carcinoma=np.zeros((3000, 3000), np.float16)
        ),
        "heatmap.npz",
        "1 to 4194304 cells",
    ),
    "heatmap.npz over 512 MiB": (
        lambda f: sparse(f / "heatmap.npz", 512 * 2**20 + 1),
        "heatmap.npz",
        "over the 512 MiB limit",
    ),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_a_malformed_slide_result_is_refused_at_start_in_one_line(case, results, tmp_path):
    damage, name, says = MALFORMED[case]
    folder = shutil.copytree(results / "slides" / "mosaic", tmp_path / "mosaic", symlinks=True)
    damage(folder)
    message = refusal(folder)
    assert f"{folder / name}: " in message and says in message and "run histoboost slide" in message
    assert "unsafe" not in message and "pickle" not in message  # numpy's advice is never passed on


def test_row_and_grid_limits(results, tmp_path, monkeypatch):
    """1.5 million tiles would take GBs in the server and the browser: MAX_ROWS refuses them (set low here)."""
    from histoboost.viewer import results as module

    folder = shutil.copytree(results / "slides" / "mosaic", tmp_path / "mosaic", symlinks=True)
    monkeypatch.setattr(module, "MAX_ROWS", 3)
    assert "tiles.csv: more than 3 rows, the most the viewer shows" in refusal(folder)
    monkeypatch.setattr(module, "MAX_ROWS", 10**6)
    monkeypatch.setattr(module, "MAX_GRID_CELLS", 10)
    assert "heatmap.npz: not a heat-map grid histoboost slide writes (a grid of shape" in refusal(folder)


def test_predictions_serve_only_the_overlays_their_records_name(results, tmp_path):
    """Overlay names that leave the folder, name a secret, or are links out are not served; a deeply nested
    predictions JSON is one line."""
    from histoboost.viewer.results import load_predictions

    preds = shutil.copytree(results / "preds", tmp_path / "preds", symlinks=True)
    (preds / "overlays" / "evil.overlay.png").symlink_to(results / "secret.txt")
    with open(preds / "predictions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    good = rows[0]["overlay"]
    for row, name in zip(rows, [good, "../secret.txt", ".ssh/id_rsa", "evil.overlay.png"]):
        row["overlay"] = name
    with open(preds / "hostile.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    assert list(load_predictions(preds / "hostile.csv").overlays) == [good]
    nested = preds / "nested.json"
    nested.write_text('[{"image_id": "x", "class": ' + "[" * 50 + "]" * 50 + "}]")
    message = refusal(nested)
    assert message.startswith(f"{nested}: not readable JSON (nested deeper") and "predict again" in message


def run_view(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "histoboost.cli", "view", *map(str, args)], capture_output=True, text=True, timeout=120
    )


def test_the_command_line_says_it_in_one_line(server, results, tmp_path):
    """A malformed result and a port in use: exit status 2, one line naming the file or the address and the fix."""
    folder = shutil.copytree(results / "slides" / "mosaic", tmp_path / "mosaic", symlinks=True)
    edit_summary(folder, lambda s: s["slide"].pop("fingerprint"))
    done = run_view(folder)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    assert f"{folder / 'summary.json'}: not a histoboost slide summary" in done.stderr
    done = run_view(results / "slides" / "mosaic", "--port", server.port)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert (
        f"cannot listen on 127.0.0.1:{server.port} (Address already in use): give another --port, or --port 0 "
        "for a free one"
        in done.stderr
        and "features already stored" not in done.stderr
    )


def test_the_heat_layer_of_a_large_grid_is_bounded_and_cached(results, tmp_path):
    """A 2048 x 2048 grid of random cells (the most the viewer takes) at 2 px a cell: a 4096 px layer; six
    layers asked for at once are made two at a time, and asked again come from the cache."""
    from PIL import Image

    folder = shutil.copytree(results / "slides" / "mosaic", tmp_path / "mosaic", symlinks=True)
    rng = np.random.default_rng(0)
    write_grid(
        folder,
        decision=rng.integers(-1, 3, (2048, 2048), dtype=np.int8),
        p_carcinoma=rng.random((2048, 2048), dtype=np.float32),
    )
    running = Server(folder)
    try:
        assert json.loads(running.get("/slides/0/data.json")[1])["grid"]["cell_px"] == 2
        paths = [
            f"/slides/0/heat.png?layer={layer}&hide={hide}"
            for layer in ("carcinoma", "class")
            for hide in ("", "0", "1,2")
        ]
        before = running.peak_rss_mib()
        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=6) as pool:
            answers = list(pool.map(running.get, paths))
        made = time.perf_counter() - started
        growth = running.peak_rss_mib() - before
        assert [status for status, _ in answers] == [200] * 6
        assert Image.open(io.BytesIO(answers[0][1])).size == (4096, 4096)
        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=6) as pool:
            again = list(pool.map(running.get, paths))
        cached = time.perf_counter() - started
        print(f"six heat layers of a 2048 x 2048 grid: {made:.1f} s, peak RSS +{growth:.0f} MiB; again {cached:.2f} s")
        assert again == answers  # the time is printed, never asserted: a loaded machine may take any time
        assert growth < 500  # unbounded (the grid as float64, 16 layers at once): GBs
    finally:
        running.stop()


# -- in the browser --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing: .ci/run installs Debian's chromium")
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield launched
        launched.close()


@pytest.fixture
def page(browser):
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    page.errors = []
    # A page without an icon of its own makes Chromium ask for /favicon.ico (a 404): every page states one.
    page.on(
        "console", lambda m: page.errors.append(f"{m.text} ({m.location.get('url')})") if m.type == "error" else None
    )
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    yield page
    page.close()


def wait_for(page, expression: str, timeout: float = 30) -> None:
    """Poll until `expression` is true in the page. Playwright's wait_for_function evaluates its string inside the
    page, which the viewer's Content-Security-Policy forbids (no 'unsafe-eval'); page.evaluate goes through the
    DevTools protocol, to which the policy does not apply."""
    deadline = time.monotonic() + timeout
    while not page.evaluate(expression):
        assert time.monotonic() < deadline, f"still false after {timeout} s: {expression}"
        page.wait_for_timeout(50)


READY = (
    "window.viewer && viewer.world.getItemCount() === 2 && window.heatReady "
    "&& viewer.world.getItemAt(0).getFullyLoaded() && !viewer.isAnimating()"
)


def open_slide_page(page, server: Server, index: int) -> float:
    started = time.perf_counter()
    page.goto(f"{server.url}/slides/{index}/")
    wait_for(page, READY)
    return time.perf_counter() - started


def screen_point(page, x: float, y: float) -> dict:
    """Where image-frame pixel (x, y) is on the page, through OpenSeadragon's coordinate API."""
    return page.evaluate(
        """([x, y]) => {
        const p = viewer.world.getItemAt(0).imageToViewerElementCoordinates(new OpenSeadragon.Point(x, y));
        const box = viewer.element.getBoundingClientRect();
        return {x: p.x, y: p.y, pageX: box.left + p.x, pageY: box.top + p.y};
    }""",
        [x, y],
    )


def drawn(page, point: dict) -> list[int]:
    """The RGB the canvas drawer drew at a viewer-element point (a 3x3 mean)."""
    return page.evaluate(
        """(p) => {
        const canvas = viewer.drawer.canvas, r = window.devicePixelRatio || 1;
        const d = canvas.getContext('2d').getImageData(Math.round(p.x * r) - 1, Math.round(p.y * r) - 1, 3, 3).data;
        const mean = [0, 0, 0];
        for (let i = 0; i < d.length; i += 4) for (let c = 0; c < 3; c++) mean[c] += d[i + c] / 9;
        return mean.map(Math.round);
    }""",
        point,
    )


def set_heat(page, layer: str | None = None, opacity: float | None = None, hide_class: int | None = None):
    if layer:
        page.check(f'input[name="layer"][value="{layer}"]')
    if hide_class is not None:
        page.uncheck(f'#classes input[data-class="{hide_class}"]')
    if opacity is not None:
        page.eval_on_selector(
            "#opacity", "(e, v) => { e.value = String(v); e.dispatchEvent(new Event('input')); }", opacity
        )
    wait_for(page, "window.heatReady")
    page.wait_for_timeout(300)  # one more frame drawn


def mosaic_tiles(results: Path) -> list[dict]:
    with open(results / "slides" / "mosaic" / "tiles.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_slide_page_draws_the_heat_map_on_its_tiles_and_reads_them_out(page, server, results, mosaic):
    """On the mosaic: the class layer at full opacity has each tile's class colour at the tile's centre (a
    carcinoma block when there is one), the glass between blocks is not coloured, the pointer over a tile
    shows tiles.csv's probabilities, and the opacity slider and class toggle change the drawn pixels."""
    open_slide_page(page, server, slide_index(server, "mosaic"))
    summary = json.loads((results / "slides" / "mosaic" / "summary.json").read_text())
    colors, classes = summary["bundle"]["colors"], summary["bundle"]["classes"]
    rows = mosaic_tiles(results)
    row = next((r for r in rows if r["class"] in ("in_situ", "invasive")), rows[0])
    k = classes.index(row["class"])
    centre = screen_point(page, int(row["x"]) + int(row["width"]) / 2, int(row["y"]) + int(row["height"]) / 2)
    _, blocks = mosaic
    gap = screen_point(page, blocks[0][2] + 768, blocks[0][1] + 768)  # white glass right of the first block
    set_heat(page, layer="class", opacity=1.0)
    assert all(abs(a - b) <= 12 for a, b in zip(drawn(page, centre), colors[k])), (drawn(page, centre), colors[k])
    assert min(drawn(page, gap)) > 225  # glass: no heat drawn
    page.mouse.move(centre["pageX"], centre["pageY"])
    wait_for(page, f"document.getElementById('tileinfo').dataset.tile === '{row['x']},{row['y']}'")
    shown = {el.get_attribute("data-p"): el.inner_text() for el in page.query_selector_all("#tileinfo td[data-p]")}
    assert shown == {f"p_{c}": f"{float(row[f'p_{c}']):.3f}" for c in [*classes, "carcinoma"]}
    full = drawn(page, centre)
    set_heat(page, opacity=0.2)
    faint = drawn(page, centre)
    assert sum(abs(a - b) for a, b in zip(full, faint)) > 30
    set_heat(page, hide_class=k)
    hidden = drawn(page, centre)
    assert sum(abs(a - b) for a, b in zip(faint, hidden)) > 10
    assert page.errors == []


def viewer_centre(page) -> list[float]:
    wait_for(page, "!viewer.isAnimating()")
    page.wait_for_timeout(500)
    return page.evaluate("""() => {
        const c = viewer.world.getItemAt(0).viewportToImageCoordinates(viewer.viewport.getCenter(true));
        return [c.x, c.y];
    }""")


def test_lists_pan_the_viewer_to_their_tile_or_region(page, server, results):
    summary = json.loads((results / "slides" / "mosaic" / "summary.json").read_text())
    open_slide_page(page, server, slide_index(server, "mosaic"))
    top = summary["top_tiles"][-1]
    page.click('#top button[data-index="7"]')
    x, y = viewer_centre(page)
    assert abs(x - (top["x"] + top["width"] / 2)) < top["width"] * 0.1
    assert abs(y - (top["y"] + top["height"] / 2)) < top["height"] * 0.1
    for n, region in enumerate(summary["carcinoma_regions"]["regions"]):
        page.click(f'#regions button[data-index="{n}"]')
        x, y = viewer_centre(page)
        x0, y0, x1, y1 = region["bounds"]
        assert abs(x - (x0 + x1) / 2) < (x1 - x0) * 0.1 and abs(y - (y0 + y1) / 2) < (y1 - y0) * 0.1
    assert page.errors == []


def test_the_real_slide_page_loads_its_tiles(page, server):
    seconds = open_slide_page(page, server, slide_index(server, "CMU-1-Small-Region"))
    print(f"CMU slide page: first tiles and heat map drawn in {seconds:.2f} s")
    assert page.inner_text("#name") == "CMU-1-Small-Region.svs"
    assert "µm" in page.inner_text("#scalebar-label") or "mm" in page.inner_text("#scalebar-label")
    assert page.evaluate("viewer.world.getItemAt(0).getFullyLoaded()")
    page.focus(".openseadragon-canvas")
    before = page.evaluate("viewer.viewport.getZoom(true)")
    page.keyboard.press("+")  # keyboard navigation: zoom in
    wait_for(page, f"viewer.viewport.getZoom() > {before} * 1.05")
    response = page.goto(f"{server.url}/slides/0/files/report.html")  # shown in a sandbox: its images load
    assert response.status == 200 and "No slide-level accuracy has been measured" in page.content()
    wait_for(page, "[...document.images].every(i => i.complete && i.naturalWidth > 0)")
    assert page.errors == []


def test_a_report_runs_no_script(page, results, tmp_path):
    """report.html is served in a sandbox without scripts: one someone put in a shared folder cannot use the
    viewer's origin (here it would retitle itself and fetch the summary)."""
    folder = shutil.copytree(results / "slides" / "mosaic", tmp_path / "mosaic", symlinks=True)
    attack = (
        "<script>document.title = 'ran'; fetch('/slides/0/files/summary.json')</script>"
        "<img src=x onerror=\"document.title = 'ran'\">"
    )
    (folder / "report.html").write_text((folder / "report.html").read_text().replace("</body>", attack + "</body>"))
    running = Server(folder)
    try:
        requests = []
        page.on("request", lambda r: requests.append(r.url))
        assert page.goto(f"{running.url}/slides/0/files/report.html").status == 200
        wait_for(page, "[...document.images].every(i => i.complete)")
        assert page.title() != "ran" and not any("summary.json" in url for url in requests)
        assert any("sandboxed" in error for error in page.errors)  # Chromium says it blocked the script
    finally:
        running.stop()


def test_image_page_is_a_gallery_filtered_by_class_and_referral(page, server, results):
    with open(results / "preds" / "predictions.csv", newline="") as handle:
        records = list(csv.DictReader(handle))
    page.goto(f"{server.url}/images/0/")
    page.wait_for_selector(".card")
    wait_for(page, "[...document.images].every(i => i.complete && i.naturalWidth > 0)")
    assert len(page.query_selector_all(".card")) == len(records) == 4
    assert len(page.query_selector_all(".card img")) == 4  # each overlay served from the predictions' folder
    wanted = records[0]["class"]
    page.select_option("#class-filter", wanted)
    visible = page.query_selector_all(".card:not([hidden])")
    assert len(visible) == sum(r["class"] == wanted for r in records)
    page.select_option("#class-filter", "")
    page.check("#refer-filter")
    assert len(page.query_selector_all(".card:not([hidden])")) == sum(bool(r["refer"]) for r in records)
    assert page.errors == []
