"""histoboost: frozen-CNN features + XGBoost for H&E breast histology (normal/benign, in-situ, invasive).

Research software; not for diagnosis.
"""

from .config import Config, build_config, preset
from .data import GROUP_NAMES, ImageRecord, Manifest, load_manifest

__version__ = "0.7.0"


def __getattr__(name: str):
    """Heavy parts (torch, timm, xgboost) load on first use, so `import histoboost` stays quick."""
    if name == "cross_validate":
        from .evaluate import cross_validate

        return cross_validate
    if name == "load_bundle":
        from .bundle import Bundle

        return Bundle.load
    raise AttributeError(f"module 'histoboost' has no attribute {name!r}")


__all__ = ["Config", "GROUP_NAMES", "ImageRecord", "Manifest", "build_config", "cross_validate", "load_bundle", "load_manifest",
           "preset", "__version__"]
