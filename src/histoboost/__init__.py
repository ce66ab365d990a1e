"""histoboost: frozen-CNN features + XGBoost for H&E breast histology (normal/benign, in-situ, invasive).

Research software; not for diagnosis.
"""

from .config import Config, build_config, preset
from .data import GROUP_NAMES, ImageRecord, Manifest, load_manifest

__version__ = "0.1.0"

__all__ = ["Config", "GROUP_NAMES", "ImageRecord", "Manifest", "build_config", "load_manifest", "preset", "__version__"]
