"""The viewer's web application: a fixed route table over the results it was given, read-only.

Starlette (routing, responses, static files) served by uvicorn: both well kept and small; the standard
library's `http.server` says of itself that it is not for production. OpenSlide reads block, so tile
endpoints are plain functions that Starlette runs in its thread pool: tiles are made concurrently.
Nothing from a URL is used as a path except through `inside`, which keeps every file inside its result
folder (no `..`, no absolute path, no link that leaves the folder), and there is no upload endpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import html
import io
import socket
import threading
import webbrowser
from pathlib import Path, PurePosixPath

import numpy as np

from ..slides.tiles import cell_origin
from .deepzoom import DeepZoomSlide
from .results import ImageResults, SlideResult, find_results

STATIC = Path(__file__).parent / "static"
# The vendored OpenSeadragon (static/openseadragon/VENDORED.md): npm's openseadragon@6.1.1, unchanged.
OPENSEADRAGON = {"version": "6.1.1", "sha256": "14d587cd3ee7c4861f1a41077ce642029364a21029956ba635bd8fb1202cf9ad"}
IMMUTABLE = {"Cache-Control": "public, max-age=31536000, immutable"}  # tile URLs carry the slide's fingerprint
REVALIDATE = {"Cache-Control": "no-cache"}
HEAT_CELL_PX = 8  # heat-layer pixels per grid cell: crisp cell edges when the browser smooths the layer


def create_app(slides: list[SlideResult], images: list[ImageResults]):
    """The Starlette application for these results (slides opened now, so a missing slide fails at start)."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    zooms = [DeepZoomSlide(s.slide_path, s.summary["slide"]["fingerprint"]) for s in slides]
    tokens = [hashlib.sha256(s.summary["slide"]["fingerprint"].encode()).hexdigest()[:16] for s in slides]

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

    def slide_data(request):
        result = pick(slides, request)
        index = request.path_params["index"]
        return JSONResponse(_slide_json(result, f"/slides/{index}/{tokens[index]}/slide.dzi"), headers=REVALIDATE)

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
            hidden = {int(k) for k in request.query_params.get("hide", "").split(",") if k}
        except ValueError:
            raise HTTPException(400, "hide is a comma-separated list of class numbers") from None
        return Response(heat_png(result, layer, hidden), media_type="image/png", headers=REVALIDATE)

    def result_file(items: list):
        def handler(request):
            result = pick(items, request)
            target = inside(result.folder, request.path_params["path"])
            return FileResponse(target, headers=REVALIDATE)
        return handler

    def images_data(request):
        result = pick(images, request)
        return JSONResponse(_images_json(result), headers=REVALIDATE)

    routes = [
        Route("/", index_page),
        Route("/slides/{index:int}/", page("slide")),
        Route("/slides/{index:int}/data.json", slide_data),
        Route("/slides/{index:int}/{token}/slide.dzi", dzi),
        Route("/slides/{index:int}/{token}/slide_files/{level:int}/{col:int}_{row:int}.jpeg", tile),
        Route("/slides/{index:int}/heat.png", heat),
        Route("/slides/{index:int}/files/{path:path}", result_file(slides)),
        Route("/images/{index:int}/", page("images")),
        Route("/images/{index:int}/data.json", images_data),
        Route("/images/{index:int}/files/{path:path}", result_file(images)),
        Mount("/static", StaticFiles(directory=STATIC)),
    ]
    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        for zoom in zooms:
            zoom.close()

    return Starlette(routes=routes, lifespan=lifespan)


def inside(root: Path, relative: str) -> Path:
    """The file `relative` names inside `root`, or an HTTP error: 403 for anything that would leave the
    folder (`..`, an absolute path, a drive, a backslash, a link pointing outside), 404 for a missing file."""
    from starlette.exceptions import HTTPException

    parts = PurePosixPath(relative).parts
    if (not parts or relative.startswith("/") or "\\" in relative or "\x00" in relative or ":" in parts[0]
            or any(part in ("..", ".") for part in parts)):
        raise HTTPException(403)
    target = (root / relative).resolve()
    if not target.is_relative_to(root.resolve()):
        raise HTTPException(403)
    if not target.is_file():
        raise HTTPException(404)
    return target


def heat_png(result: SlideResult, layer: str, hidden: set[int]) -> bytes:
    """One cell per grid tile, upsampled with nearest neighbours: p(carcinoma) on cividis (as heatmap.png)
    or each tile's class colour; transparent where no tile was scored or its class is hidden."""
    import matplotlib
    from PIL import Image

    decision = result.grid["decision"].astype(int)
    shown = (decision >= 0) & ~np.isin(decision, list(hidden))
    rgba = np.zeros((*decision.shape, 4), dtype=np.uint8)
    if layer == "carcinoma":
        values = np.nan_to_num(result.grid["p_carcinoma"].astype(float))
        rgba[...] = (matplotlib.colormaps["cividis"](values) * 255).astype(np.uint8)
    else:
        colors = np.array(result.summary["bundle"]["colors"], dtype=np.uint8)
        rgba[..., :3] = colors[np.clip(decision, 0, len(colors) - 1)]
    rgba[..., 3] = np.where(shown, 255, 0)
    big = rgba.repeat(HEAT_CELL_PX, axis=0).repeat(HEAT_CELL_PX, axis=1)
    buffer = io.BytesIO()
    Image.fromarray(big, "RGBA").save(buffer, "png")
    return buffer.getvalue()


def _with_token(zoom, tokens: list[str], request):
    from starlette.exceptions import HTTPException

    if request.path_params["token"] != tokens[request.path_params["index"]]:
        raise HTTPException(404)
    return zoom


def _slide_json(result: SlideResult, dzi_url: str) -> dict:
    """What the slide page needs: the DZI, the heat layer's place on the slide, each scored tile's cell and
    scores, the regions and top tiles, and the summary."""
    s, grid = result.summary, result.grid
    stride, tile_px = float(grid["stride_px"]), float(grid["tile_px"])
    origin = cell_origin(tuple(grid["start"]), tile_px, stride)
    rows, cols = grid["decision"].shape
    classes = s["bundle"]["classes"]
    tiles = [{"row": int(r["row"]), "col": int(r["col"]), "x": int(r["x"]), "y": int(r["y"]), "size": int(r["width"]),
              "class": r["class"], "p": {c: float(r[f"p_{c}"]) for c in classes}, "p_carcinoma": float(r["p_carcinoma"]),
              "refer": r["refer"], "confirmed": r["confirmed"] == "1"} for r in result.rows]
    return {
        "name": s["slide"]["name"], "dzi": dzi_url, "size": s["slide"]["size"], "mpp": s["slide"]["mpp"],
        "classes": classes, "colors": s["bundle"]["colors"], "groups": s["bundle"]["groups"],
        "grid": {"origin": list(origin), "stride": stride, "tile": tile_px, "rows": int(rows), "cols": int(cols),
                 "cell_px": HEAT_CELL_PX},
        "tiles": tiles, "regions": s["carcinoma_regions"]["regions"], "top": s["top_tiles"],
        "summary": {"call": s["call"]["group"], "rule": s["call"]["rule"], "refer": s["refer"],
                    "tissue_mm2": s["tissue"]["area_mm2"], "area_mm2": s["area_mm2"],
                    "regions": s["carcinoma_regions"]["count"], "largest_mm2": s["carcinoma_regions"]["largest_mm2"],
                    "tiles": s["tiles"], "stain": s["stain"], "bundle": s["bundle"]["sha256"],
                    "research_use_only": s["research_use_only"]},
        "report": "files/report.html",
    }


def _images_json(result: ImageResults) -> dict:
    records = []
    for r in result.records:
        probs = {k[2:]: _number(v) for k, v in r.items() if k.startswith("p_") and k != "p_carcinoma"}
        overlay = result.overlays.get(str(r.get("overlay") or ""))
        records.append({"name": r.get("name") or Path(str(r.get("path", ""))).name, "class": r.get("class"),
                        "p": probs, "agreement": _number(r.get("agreement")), "refer": r.get("refer") or "",
                        "overlay": f"files/{overlay}" if overlay else None})
    classes = list(dict.fromkeys(c for r in records for c in r["p"]))
    return {"name": result.name, "classes": classes, "records": records}


def _number(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _index_html(slides: list[SlideResult], images: list[ImageResults]) -> str:
    items = [f'<li><a href="/slides/{i}/">{html.escape(s.summary["slide"]["name"])}</a> '
             f'({html.escape(str(s.summary["call"]["group"]))})</li>' for i, s in enumerate(slides)]
    items += [f'<li><a href="/images/{i}/">{html.escape(r.name)}</a> ({len(r.records)} images)</li>'
              for i, r in enumerate(images)]
    return ("<!doctype html><html lang=en><meta charset=utf-8><link rel=icon href='data:,'><title>histoboost view</title>"
            '<link rel=stylesheet href="/static/style.css"><main><h1>histoboost results</h1>'
            "<p class=ruo>Research use only; not for diagnosis.</p><ul>" + "".join(items) + "</ul></main></html>")


def serve(paths: list[str | Path], host: str = "127.0.0.1", port: int = 0, open_browser: bool = False,
          announce=print) -> None:
    """Serve the results until interrupted (Ctrl-C stops it cleanly). Port 0: a free one."""
    import uvicorn

    from ..allocator import M_MMAP_THRESHOLD, mallopt

    # glibc raises its mmap threshold to the largest buffer freed, after which each of a server's threads keeps
    # its own copy of such buffers (a coarse tile of a one-level slide reads the whole slide): measured, 0.5 GB
    # more for 200 tile requests. A fixed threshold hands large buffers back at once.
    mallopt({M_MMAP_THRESHOLD: 2**20})
    slides, images = find_results(paths)
    app = create_app(slides, images)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)  # connections wait in the backlog from the moment the address is announced
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    url = f"http://{shown}:{bound}/" + ("slides/0/" if len(slides) == 1 and not images else "")
    announce(f"histoboost view: {len(slides)} slide(s), {len(images)} prediction set(s) at {url} (Ctrl-C stops)")
    if open_browser:
        threading.Timer(0.5, webbrowser.open, args=(url,)).start()
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on"))
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn raises the Ctrl-C again once it has shut down cleanly: the expected end
        pass
    announce("histoboost view: stopped")
