"""The viewer (`histoboost view`) as a user runs it: a real server process, raw HTTP for what must be refused,
and Debian's Chromium driven by Playwright for what the pages draw."""

from __future__ import annotations

import csv
import hashlib
import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import CMU
from histoboost.cli import main
from histoboost.slides import SlideSettings, predict_slide

STATIC = Path(__file__).resolve().parents[1] / "src" / "histoboost" / "viewer" / "static"
SECRET = "TOP-SECRET-b64e1"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Flags that work as root in a container with no network (the machine notes): no sandbox, no GPU, no
# background networking; --headless=new is Chromium's own headless mode.
CHROMIUM_FLAGS = ["--no-sandbox", "--headless=new", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="session")
def results(model, mosaic, tmp_path_factory, bach):
    """What `view` is given: slide results of the mosaic and of the CMU slide, predictions with overlays, and
    beside them a secret file that must never be served (one result folder holds a link to it)."""
    bundle, path = model
    root = tmp_path_factory.mktemp("view")
    (root / "secret.txt").write_text(SECRET)
    predict_slide(bundle, mosaic[0], root / "slides" / "mosaic", SlideSettings(confirm_top=0), cache_dir=root / "c")
    predict_slide(bundle, CMU, root / "slides" / CMU.stem, SlideSettings(stride_um=161.25, confirm_top=0),
                  cache_dir=root / "c")
    (root / "slides" / "mosaic" / "leak.txt").symlink_to(root / "secret.txt")
    (root / "preds").mkdir()
    images = [bach / f"{name}.jpeg" for name in ("Normal/n021", "Benign/b020", "InSitu/is021", "Invasive/iv020")]
    code = main(["predict", str(path), *map(str, images), "--out", str(root / "preds" / "predictions.csv"),
                 "--overlay", str(root / "preds" / "overlays"), "--quiet"])
    assert code == 0
    return root


class Server:
    """`histoboost view` in its own process, on a free port of 127.0.0.1."""

    def __init__(self, *paths: Path):
        # As a user starts it: without the allocator settings the test suite (Makefile) sets for torch.
        env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
        self.proc = subprocess.Popen([sys.executable, "-m", "histoboost.cli", "view", *map(str, paths)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        line = self.proc.stdout.readline()
        match = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        assert match, line + self.proc.stderr.read()
        self.port = int(match.group(1))
        self.url = f"http://127.0.0.1:{self.port}"

    def get(self, raw_path: str) -> tuple[int, bytes]:
        """GET exactly `raw_path` (no client-side normalisation of `..` or escapes)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        conn.putrequest("GET", raw_path, skip_accept_encoding=True)
        conn.endheaders()
        response = conn.getresponse()
        body = response.read()
        conn.close()
        return response.status, body

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


def test_paths_that_leave_a_result_folder_are_refused(server, results):
    """`..`, its URL-encoded forms, absolute paths, backslashes and a link that leaves the folder: 403 or 404,
    and the secret beside the results is never in a response."""
    attempts = ["/slides/1/files/../../secret.txt", "/slides/1/files/%2e%2e/%2e%2e/secret.txt",
                "/slides/1/files/..%2f..%2fsecret.txt", "/slides/1/files/%2E%2E%2F%2E%2E%2Fsecret.txt",
                "/slides/1/files//etc/passwd", "/slides/1/files/%2fetc%2fpasswd", "/slides/1/files/..\\..\\secret.txt",
                "/slides/1/files/leak.txt", "/images/0/files/../secret.txt", "/images/0/files/%2e%2e%2fsecret.txt",
                "/static/../../secret.txt", "/static/%2e%2e/%2e%2e/app.py", "/static/..%2fapp.py",
                "/slides/1/files/C:/Windows/win.ini", "/slides/9/files/summary.json", "/slides/1/files/"]
    for path in attempts:
        status, body = server.get(path)
        assert status in (403, 404), (path, status)
        assert SECRET.encode() not in body and b"def create_app" not in body, path
    assert server.get("/slides/1/files/summary.json")[0] == 200  # what is inside is served
    assert server.get("/slides/1/files/top/tile-01.png")[0] == 200
    status, body = server.get("/slides/1/files/../mosaic/summary.json")
    assert status == 403  # even a `..` that would come back inside


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
    page.on("console", lambda m: page.errors.append(f"{m.text} ({m.location.get('url')})") if m.type == "error"
            else None)
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    yield page
    page.close()


READY = ("window.viewer && viewer.world.getItemCount() === 2 && window.heatReady "
         "&& viewer.world.getItemAt(0).getFullyLoaded() && !viewer.isAnimating()")


def open_slide_page(page, server: Server, index: int) -> float:
    started = time.perf_counter()
    page.goto(f"{server.url}/slides/{index}/")
    page.wait_for_function(READY, timeout=30_000)
    return time.perf_counter() - started


def screen_point(page, x: float, y: float) -> dict:
    """Where image-frame pixel (x, y) is on the page, through OpenSeadragon's coordinate API."""
    return page.evaluate("""([x, y]) => {
        const p = viewer.world.getItemAt(0).imageToViewerElementCoordinates(new OpenSeadragon.Point(x, y));
        const box = viewer.element.getBoundingClientRect();
        return {x: p.x, y: p.y, pageX: box.left + p.x, pageY: box.top + p.y};
    }""", [x, y])


def drawn(page, point: dict) -> list[int]:
    """The RGB the canvas drawer drew at a viewer-element point (a 3x3 mean)."""
    return page.evaluate("""(p) => {
        const canvas = viewer.drawer.canvas, r = window.devicePixelRatio || 1;
        const d = canvas.getContext('2d').getImageData(Math.round(p.x * r) - 1, Math.round(p.y * r) - 1, 3, 3).data;
        const mean = [0, 0, 0];
        for (let i = 0; i < d.length; i += 4) for (let c = 0; c < 3; c++) mean[c] += d[i + c] / 9;
        return mean.map(Math.round);
    }""", point)


def set_heat(page, layer: str | None = None, opacity: float | None = None, hide_class: int | None = None):
    if layer:
        page.check(f'input[name="layer"][value="{layer}"]')
    if hide_class is not None:
        page.uncheck(f'#classes input[data-class="{hide_class}"]')
    if opacity is not None:
        page.eval_on_selector("#opacity", "(e, v) => { e.value = String(v); e.dispatchEvent(new Event('input')); }",
                              opacity)
    page.wait_for_function("window.heatReady", timeout=30_000)
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
    page.wait_for_function(f"document.getElementById('tileinfo').dataset.tile === '{row['x']},{row['y']}'")
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
    page.wait_for_function("!viewer.isAnimating()")
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
    page.wait_for_function(f"viewer.viewport.getZoom() > {before} * 1.05")
    response = page.goto(f"{server.url}/slides/0/files/report.html")
    assert response.status == 200 and "No slide-level accuracy has been measured" in page.content()
    assert page.errors == []


def test_image_page_is_a_gallery_filtered_by_class_and_referral(page, server, results):
    with open(results / "preds" / "predictions.csv", newline="") as handle:
        records = list(csv.DictReader(handle))
    page.goto(f"{server.url}/images/0/")
    page.wait_for_selector(".card")
    page.wait_for_function("[...document.images].every(i => i.complete && i.naturalWidth > 0)")
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
