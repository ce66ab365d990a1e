"""Whole-slide images: read (OpenSlide), find the tissue, tile it at the bundle's field of view and µm/px,
score each tile with the bundle's own features and decision rule, and write tiles.csv, heat maps, QuPath
GeoJSON, summary.json and report.html. Modules in the order of the data flow: reader, tissue, tiles, score,
export, run."""

from .reader import Slide, SlideError, open_slide

_RUN = ("SlideResult", "SlideSettings", "predict_slide", "predict_slides")


def __getattr__(name: str):
    """The scoring side (torch, the network) loads when first asked for, so reading slides and their results
    (the viewer) stays light."""
    if name in _RUN:
        from . import run

        return getattr(run, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Slide", "SlideError", "SlideResult", "SlideSettings", "open_slide", "predict_slide", "predict_slides"]
