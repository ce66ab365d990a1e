"""Discovering, validating and loading labelled images: the manifest is the pipeline's input.

An image's id is a content key: the sha256 of its decoded RGB pixels, so results survive renames and metadata
edits, and pixel-identical files are duplicates. The modules, in data-flow order: `labels` (diagnostic groups),
`problems` (what is wrong, per file), `manifest` (the validated records), `images` (decoding, tissue check,
µm/px), `layouts` (finding images and labels), `load` (`load_manifest`), `classes` (what the classifier tells
apart). This package re-exports their public names.
"""

from ..errors import DataError
from .classes import CLASS_SCHEMES, ClassScheme, class_scheme
from .images import (
    content_key,
    plausible_mpp,
    read_image,
    read_record,
    scan_file,
    scan_files,
    stated_mpp,
    tissue_problem,
    working_scale,
)
from .labels import DEFAULT_LABEL_GROUPS, GROUP_NAMES, GROUPS, parse_label_map
from .layouts import (
    BACH_GROUND_TRUTH,
    BREAKHIS_NAME,
    BREAKHIS_TYPES,
    IMAGE_SUFFIXES,
    MANIFEST_COLUMNS,
    MANIFEST_NAME,
    discover,
    find_images,
)
from .load import load_manifest
from .manifest import ImageRecord, Layout, Manifest
from .problems import Problem

__all__ = [
    "BACH_GROUND_TRUTH",
    "BREAKHIS_NAME",
    "BREAKHIS_TYPES",
    "CLASS_SCHEMES",
    "DEFAULT_LABEL_GROUPS",
    "GROUPS",
    "GROUP_NAMES",
    "IMAGE_SUFFIXES",
    "MANIFEST_COLUMNS",
    "MANIFEST_NAME",
    "ClassScheme",
    "DataError",
    "ImageRecord",
    "Layout",
    "Manifest",
    "Problem",
    "class_scheme",
    "content_key",
    "discover",
    "find_images",
    "load_manifest",
    "parse_label_map",
    "plausible_mpp",
    "read_image",
    "read_record",
    "scan_file",
    "scan_files",
    "stated_mpp",
    "tissue_problem",
    "working_scale",
]
