"""Diagnostic groups, and the group a data set's own label means (`Invasive`, `dcis`, `--label-map`)."""

from __future__ import annotations

import re
from collections.abc import Mapping

from ..errors import DataError

GROUP_NAMES = ("normal_benign", "in_situ", "invasive")
GROUPS = (0, 1, 2)  # the class -> group map of the 3-group scheme: each class its own group

# Dataset labels -> diagnostic group, compared after `_label_key` (lower case, letters and digits).
DEFAULT_LABEL_GROUPS: dict[str, int] = {
    "normal": 0,
    "benign": 0,
    "normalbenign": 0,
    "nonmalignant": 0,
    "insitu": 1,
    "insitucarcinoma": 1,
    "dcis": 1,
    "invasive": 2,
    "invasivecarcinoma": 2,
    "malignant": 2,
    "0": 0,
    "1": 1,
    "2": 2,
    # BreakHis tumour types (benign -> 0, malignant -> 2).
    "adenosis": 0,
    "fibroadenoma": 0,
    "phyllodestumor": 0,
    "tubularadenoma": 0,
    "ductalcarcinoma": 2,
    "lobularcarcinoma": 2,
    "mucinouscarcinoma": 2,
    "papillarycarcinoma": 2,
}


def _label_key(label: str) -> str:
    return re.sub(r"[^a-z0-9]", "", label.lower())


def _maybe_group(label: str, label_map: Mapping[str, int] | None) -> int | None:
    if label_map:
        custom = {_label_key(k): v for k, v in label_map.items()}
        if _label_key(label) in custom:
            return custom[_label_key(label)]
    return DEFAULT_LABEL_GROUPS.get(_label_key(label))


def _group_of(label: str, label_map: Mapping[str, int] | None) -> int:
    group = _maybe_group(label, label_map)
    assert group is not None, "discovery keeps only labels with a group"
    return group


def parse_label_map(text: str) -> dict[str, int]:
    """Parse `Label=group,Label=group` (e.g. `Normal=0,Benign=0,InSitu=1,Invasive=2`)."""
    mapping: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        label, sep, group = item.rpartition("=")
        if not sep or group.strip() not in ("0", "1", "2"):
            raise DataError(f"--label-map item {item!r} must look like Label=0, Label=1 or Label=2")
        mapping[label.strip()] = int(group)
    return mapping
