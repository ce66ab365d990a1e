"""`histoboost view`: a local, read-only web viewer for slide results (deep zoom, heat map, tiles, regions)
and image predictions (a gallery with overlays). Presentation only: it reads what `slide` and `predict` wrote."""

from .app import create_app, serve
from .results import ViewerError, find_results

__all__ = ["ViewerError", "create_app", "find_results", "serve"]
