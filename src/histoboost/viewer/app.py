"""The viewer's web application: a fixed route table over the results it was given, read-only.

Starlette (routing, responses, static files) served by uvicorn: both well kept and small; the standard
library's `http.server` says of itself that it is not for production. OpenSlide reads block, so tile
endpoints are plain functions that Starlette runs in its thread pool: tiles are made concurrently.
Nothing from a URL is used as a path: a result file's URL is only a key into the files pinned at start
(results.py), and there is no upload endpoint. Requests naming another Host are refused (a web page cannot
reach the viewer through DNS rebinding), and every response carries HEADERS, so a file someone put in a
shared result folder cannot run script in the viewer's origin.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import html
import json
import math
import socket
import threading
import webbrowser
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import quote

import numpy as np

from ..slides.tiles import cell_origin
from .deepzoom import DeepZoomSlide
from .results import ImageResults, SlideResult, ViewerError, find_results, open_served

STATIC = Path(__file__).parent / "static"
# The vendored OpenSeadragon (static/openseadragon/VENDORED.md): npm's openseadragon@6.1.1, unchanged.
OPENSEADRAGON = {
    "version": "6.1.1",
    "sha256": "14d587cd3ee7c4861f1a41077ce642029364a21029956ba635bd8fb1202cf9ad",
    # the one <style> element it adds (a focus-outline rule): allowed by its hash, no other inline style
    "style": "'sha256-9xTiqzfwFaL2SGb1rmr8gysEwVVjIvqWAgmZgqFqpEE='",
}
# The pages: scripts, styles, data and images from the viewer only (images also as data: and blob: URLs, as
# OpenSeadragon makes them); no plugins, no <base>, no form posts, never framed.
CSP = (
    f"default-src 'self'; img-src 'self' data: blob:; style-src 'self' {OPENSEADRAGON['style']}; "
    "object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
# Result files (report.html among them) are shown but run no script: a sandbox without allow-scripts (its
# same origin kept only so that report.html's images load), inline styles, images from the viewer.
FILE_CSP = (
    "sandbox allow-same-origin; default-src 'none'; img-src 'self' data:; style-src 'unsafe-inline'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Resource-Policy": "same-origin",
}
IMMUTABLE = {"Cache-Control": "public, max-age=31536000, immutable"}  # tile URLs carry the slide's fingerprint
REVALIDATE = {"Cache-Control": "no-cache"}
HEAT_CELL_PX = 8  # heat-layer pixels per grid cell: crisp cell edges when the browser smooths the layer
MAX_HEAT_PIXELS = 2**24  # a larger grid gets fewer pixels a cell (at least 1): a layer is at most 64 MiB RGBA
HEAT_WORKERS = 2  # heat layers made at once: each takes up to a few times MAX_HEAT_PIXELS x 4 bytes
HEAT_CACHE = 16  # heat layers kept (PNG): two layers x the class toggles of a slide or two


def create_app(slides: list[SlideResult], images: list[ImageResults], hosts: Iterable[str]):
    """The Starlette application for these results, answering requests whose Host header is one of `hosts`
    (`allowed_hosts`). Slides are opened and every page's data encoded now, so a problem fails at start."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.middleware import Middleware
    from starlette.responses import FileResponse, HTMLResponse, Response, StreamingResponse
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    zooms = [DeepZoomSlide(s.slide_path, s.summary["slide"]["fingerprint"]) for s in slides]
    tokens = [hashlib.sha256(s.summary["slide"]["fingerprint"].encode()).hexdigest()[:16] for s in slides]
    cell_px = [heat_cell_px(s.grid["decision"].shape) for s in slides]
    slide_data = [
        _encode(_slide_json(s, f"/slides/{i}/{tokens[i]}/slide.dzi", cell_px[i])) for i, s in enumerate(slides)
    ]
    image_data = [_encode(_images_json(r)) for r in images]
    heat_workers = threading.BoundedSemaphore(HEAT_WORKERS)

    @functools.lru_cache(maxsize=HEAT_CACHE)
    def heat_layer(index: int, layer: str, hidden: frozenset[int]) -> bytes:
        with heat_workers:
            return heat_png(slides[index], layer, hidden, cell_px[index])

    def pick(items: list, request):
        index = request.path_params["index"]
        if not 0 <= index < len(items):
            raise HTTPException(404)
        return items[index]

    def index_page(request):
        return HTMLResponse(_index_html(slides, images), headers=REVALIDATE)

    def page(name: str):
        def handler(request):
            pick(slides if name == "slide" else images, request)
            return FileResponse(STATIC / f"{name}.html", headers=REVALIDATE)

        return handler

    def data(encoded: list[bytes]):
        def handler(request):
            return Response(pick(encoded, request), media_type="application/json", headers=REVALIDATE)

        return handler

    def dzi(request):
        zoom = _with_token(pick(zooms, request), tokens, request)
        return Response(zoom.dzi(), media_type="application/xml", headers=IMMUTABLE)

    def tile(request):
        zoom = _with_token(pick(zooms, request), tokens, request)
        p = request.path_params
        data = zoom.tile(p["level"], p["col"], p["row"])
        if data is None:
            raise HTTPException(404)
        return Response(data, media_type="image/jpeg", headers=IMMUTABLE)

    def heat(request):
        result = pick(slides, request)
        layer = request.query_params.get("layer", "carcinoma")
        if layer not in ("carcinoma", "class"):
            raise HTTPException(400, "layer is carcinoma or class")
        try:
            hidden = frozenset(int(k) for k in request.query_params.get("hide", "").split(",") if k)
        except ValueError:
            hidden = None
        if hidden is None or not hidden <= set(range(len(result.summary["bundle"]["classes"]))):
            raise HTTPException(400, "hide is a comma-separated list of class numbers")
        return Response(
            heat_layer(request.path_params["index"], layer, hidden), media_type="image/png", headers=REVALIDATE
        )

    def result_file(items: list, files: str):
        def handler(request):
            served = getattr(pick(items, request), files).get(request.path_params["path"])
            handle = open_served(served) if served else None
            if handle is None:
                raise HTTPException(404)
            headers = {**REVALIDATE, "Content-Security-Policy": FILE_CSP}
            if served.attachment:
                headers["Content-Disposition"] = f"attachment; filename*=utf-8''{quote(served.path.name)}"
            return StreamingResponse(_chunks(handle), media_type=served.media_type, headers=headers)

        return handler

    routes = [
        Route("/", index_page),
        Route("/slides/{index:int}/", page("slide")),
        Route("/slides/{index:int}/data.json", data(slide_data)),
        Route("/slides/{index:int}/{token}/slide.dzi", dzi),
        Route("/slides/{index:int}/{token}/slide_files/{level:int}/{col:int}_{row:int}.jpeg", tile),
        Route("/slides/{index:int}/heat.png", heat),
        Route("/slides/{index:int}/files/{path:path}", result_file(slides, "files")),
        Route("/images/{index:int}/", page("images")),
        Route("/images/{index:int}/data.json", data(image_data)),
        Route("/images/{index:int}/files/{path:path}", result_file(images, "overlays")),
        Mount("/static", StaticFiles(directory=STATIC)),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        for zoom in zooms:
            zoom.close()

    return Starlette(routes=routes, lifespan=lifespan, middleware=[Middleware(HostGuard, hosts=frozenset(hosts))])


class HostGuard:
    """ASGI middleware: answers only requests whose Host header is one of `hosts` (421 Misdirected Request
    for another, 400 for none), and adds HEADERS to every response (where a route has not set its own).
    Starlette's TrustedHostMiddleware would answer 400 for both and add no headers, so one middleware does both."""

    def __init__(self, app, hosts: frozenset[str]):
        self.app, self.hosts = app, hosts

    async def __call__(self, scope, receive, send):
        from starlette.datastructures import Headers, MutableHeaders
        from starlette.responses import PlainTextResponse

        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in HEADERS.items():
                    headers.setdefault(name, value)
            await send(message)

        host = Headers(scope=scope).get("host")
        if host is None:
            return await PlainTextResponse("no Host header", 400)(scope, receive, send_with_headers)
        if host.lower() not in self.hosts:
            return await PlainTextResponse(
                "this server does not answer for that host (histoboost view --allow-host NAME adds one)", 421
            )(scope, receive, send_with_headers)
        await self.app(scope, receive, send_with_headers)


def allowed_hosts(host: str, port: int, names: Iterable[str] = ()) -> frozenset[str]:
    """The Host header values the viewer answers: the address it listens on, localhost, 127.0.0.1, [::1]
    and `names`, each with or without the port."""
    bare = {
        f"[{n}]" if ":" in n else n
        for n in (n.strip().strip("[]").lower() for n in (host, "localhost", "127.0.0.1", "::1", *names))
    }
    return frozenset(v for n in bare for v in (n, f"{n}:{port}"))


def heat_cell_px(shape: tuple[int, int]) -> int:
    """Heat-layer pixels per grid cell: HEAT_CELL_PX, fewer for a grid so large that the layer would pass
    MAX_HEAT_PIXELS (results.MAX_GRID_CELLS keeps it at least 1)."""
    return max(1, min(HEAT_CELL_PX, math.isqrt(MAX_HEAT_PIXELS // (shape[0] * shape[1]))))


def heat_png(result: SlideResult, layer: str, hidden: frozenset[int], cell_px: int) -> bytes:
    """One cell per grid tile, enlarged `cell_px` times with nearest neighbours: p(carcinoma) on cividis (as
    heatmap.png) or each tile's class colour; transparent where no tile was scored or its class is hidden.
    Made in 8-bit arrays: a byte per channel and cell before enlarging."""
    import io

    from PIL import Image

    decision = result.grid["decision"]
    shown = (decision >= 0) & ~np.isin(decision, list(hidden))
    rgba = np.empty((*decision.shape, 4), dtype=np.uint8)
    if layer == "carcinoma":  # matplotlib's own lookup: cell value x takes entry floor(256 x), clipped
        scaled = np.nan_to_num(result.grid["p_carcinoma"]) * 256
        rgba[..., :3] = _cividis()[np.clip(scaled, 0, 255, out=scaled).astype(np.uint8)]
    else:
        colors = np.array(result.summary["bundle"]["colors"], dtype=np.uint8)
        rgba[..., :3] = colors[np.clip(decision, 0, len(colors) - 1)]
    rgba[..., 3] = shown.view(np.uint8) * np.uint8(255)
    image = Image.fromarray(rgba)
    if cell_px > 1:
        image = image.resize((image.width * cell_px, image.height * cell_px), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, "png", compress_level=1)  # served locally: 4-5 times faster than level 6, as small here
    return buffer.getvalue()


@functools.cache
def _cividis() -> np.ndarray:
    import matplotlib

    return (matplotlib.colormaps["cividis"](np.arange(256))[:, :3] * 255).astype(np.uint8)


def _chunks(handle, size: int = 2**16):
    with handle:
        while chunk := handle.read(size):
            yield chunk


def _encode(value) -> bytes:
    """JSON as Starlette's JSONResponse writes it (strict: the browser reads no NaN)."""
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()


def _with_token(zoom, tokens: list[str], request):
    from starlette.exceptions import HTTPException

    if request.path_params["token"] != tokens[request.path_params["index"]]:
        raise HTTPException(404)
    return zoom


def _slide_json(result: SlideResult, dzi_url: str, cell_px: int) -> dict:
    """What the slide page needs: the DZI, the heat layer's place on the slide, each scored tile's cell and
    scores, the regions and top tiles, and the summary."""
    s, grid = result.summary, result.grid
    stride, tile_px = float(grid["stride_px"]), float(grid["tile_px"])
    origin = cell_origin(tuple(grid["start"].tolist()), tile_px, stride)
    rows, cols = grid["decision"].shape
    return {
        "name": s["slide"]["name"],
        "dzi": dzi_url,
        "size": s["slide"]["size"],
        "mpp": s["slide"]["mpp"],
        "classes": s["bundle"]["classes"],
        "colors": s["bundle"]["colors"],
        "groups": s["bundle"]["groups"],
        "grid": {
            "origin": list(origin),
            "stride": stride,
            "tile": tile_px,
            "rows": int(rows),
            "cols": int(cols),
            "cell_px": cell_px,
        },
        "tiles": result.tiles,
        "regions": s["carcinoma_regions"]["regions"],
        "top": s["top_tiles"],
        "summary": {
            "call": s["call"]["group"],
            "rule": s["call"]["rule"],
            "refer": s["refer"],
            "tissue_mm2": s["tissue"]["area_mm2"],
            "area_mm2": s["area_mm2"],
            "regions": s["carcinoma_regions"]["count"],
            "largest_mm2": s["carcinoma_regions"]["largest_mm2"],
            "tiles": s["tiles"],
            "stain": s["stain"],
            "bundle": s["bundle"]["sha256"],
            "research_use_only": s["research_use_only"],
        },
        "report": "files/report.html",
    }


def _images_json(result: ImageResults) -> dict:
    records: list[dict] = []
    for r in result.records:
        probs = {k[2:]: _number(v) for k, v in r.items() if k.startswith("p_") and k != "p_carcinoma"}
        overlay = str(r.get("overlay"))
        records.append(
            {
                "name": _text(r.get("name")) or Path(_text(r.get("path"))).name,
                "class": _text(r.get("class")),
                "p": probs,
                "agreement": _number(r.get("agreement")),
                "refer": _text(r.get("refer")),
                "overlay": f"files/{quote(overlay)}" if overlay in result.overlays else None,
            }
        )
    classes = list(dict.fromkeys(c for r in records for c in r["p"]))
    return {"name": result.name, "classes": classes, "records": records}


def _number(value) -> float | None:
    """A finite number, or None (empty, text, NaN: the page shows nothing)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _text(value) -> str:
    return "" if value is None else str(value)


def _index_html(slides: list[SlideResult], images: list[ImageResults]) -> str:
    items = [
        f'<li><a href="/slides/{i}/">{html.escape(s.summary["slide"]["name"])}</a> '
        f"({html.escape(s.summary['call']['group'])})</li>"
        for i, s in enumerate(slides)
    ]
    items += [
        f'<li><a href="/images/{i}/">{html.escape(r.name)}</a> ({len(r.records)} images)</li>'
        for i, r in enumerate(images)
    ]
    return (
        "<!doctype html><html lang=en><meta charset=utf-8><link rel=icon href='data:,'><title>histoboost view</title>"
        '<link rel=stylesheet href="/static/style.css"><main><h1>histoboost results</h1>'
        "<p class=ruo>Research use only; not for diagnosis.</p><ul>" + "".join(items) + "</ul></main></html>"
    )


def serve(
    paths: list[str | Path],
    host: str = "127.0.0.1",
    port: int = 0,
    open_browser: bool = False,
    announce=print,
    allow_hosts: Iterable[str] = (),
) -> None:
    """Serve the results until interrupted (Ctrl-C stops it cleanly). Port 0: a free one. `allow_hosts`: more
    names the browser may reach it by (`allowed_hosts`)."""
    import uvicorn

    from ..allocator import M_MMAP_THRESHOLD, mallopt

    # glibc raises its mmap threshold to the largest buffer freed, after which each of a server's threads keeps
    # its own copy of such buffers (a coarse tile of a one-level slide reads the whole slide): measured, 0.5 GB
    # more for 200 tile requests. A fixed threshold hands large buffers back at once.
    mallopt({M_MMAP_THRESHOLD: 2**20})
    slides, images = find_results(paths)
    host = host.strip("[]")
    shown = f"[{host}]" if ":" in host else host
    with _listen(host, shown, port) as sock:
        bound = sock.getsockname()[1]
        app = create_app(slides, images, allowed_hosts(host, bound, allow_hosts))
        url = f"http://{shown}:{bound}/" + ("slides/0/" if len(slides) == 1 and not images else "")
        announce(f"histoboost view: {len(slides)} slide(s), {len(images)} prediction set(s) at {url} (Ctrl-C stops)")
        if open_browser:
            threading.Timer(0.5, webbrowser.open, args=(url,)).start()
        # Not behind a proxy: X-Forwarded-* headers are not believed, whoever sends them.
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on", proxy_headers=False)
        try:
            uvicorn.Server(config).run(sockets=[sock])
        except KeyboardInterrupt:  # uvicorn raises the Ctrl-C again once it has shut down cleanly: the expected end
            pass
    announce("histoboost view: stopped")


def _listen(host: str, shown: str, port: int) -> socket.socket:
    """A socket listening on host:port, or a one-line ViewerError naming them and the fix."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        fix = (
            "give another --port, or --port 0 for a free one"
            if err.errno in (errno.EADDRINUSE, errno.EACCES)
            else "give --host an address of this machine (127.0.0.1: this machine only)"
        )
        raise ViewerError(f"cannot listen on {shown}:{port} ({err.strerror or err}): {fix}") from None
    sock.listen(2048)  # connections wait in the backlog from the moment the address is announced
    return sock
