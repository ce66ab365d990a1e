"""histoboost: frozen-CNN or pathology foundation-model features + XGBoost for H&E breast histology
(normal/benign, in situ, invasive). Research software; not for diagnosis.

The Python API (docs/python.md)::

    import histoboost as hb
    config = hb.preset("quick")
    run = hb.cross_validate("data/", config, hb.Runtime(progress=True))
    model = hb.train("data/", config)
    model.save("model.zip")
    model = hb.load_model("model.zip")
    records, problems = model.predict(["new/a.png"])
    probs = model.predict_proba(rgb_array)
"""

from .api import cross_validate, load_manifest, load_model, train
from .config import Config, build_config, preset
from .data import GROUP_NAMES, ImageRecord, Manifest, Problem
from .errors import HistoboostError
from .runtime import Runtime
from .version import __version__

__all__ = [
    "GROUP_NAMES",
    "Config",
    "HistoboostError",
    "ImageRecord",
    "Manifest",
    "Problem",
    "Runtime",
    "__version__",
    "build_config",
    "cross_validate",
    "load_manifest",
    "load_model",
    "preset",
    "train",
]
