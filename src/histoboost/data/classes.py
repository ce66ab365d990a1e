"""What the classifier tells apart (`ClassScheme`): the 3 diagnostic groups, or BACH's 4 classes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import DataError
from .labels import GROUP_NAMES, GROUPS, _label_key
from .manifest import Manifest


@dataclass(frozen=True)
class ClassScheme:
    """What the classifier tells apart: its classes, the data set's name of each and the diagnostic group each
    belongs to. Decisions are taken group first, then class within the group, so the 3-group answer derived
    from a class answer (probabilities summed per group) never disagrees with it."""

    name: str
    classes: tuple[str, ...]  # histoboost's names: the p_<class> and votes_<class> columns
    labels: tuple[str, ...]  # the data set's spelling of each class: predict's `label` column
    groups: tuple[int, ...]  # diagnostic group of each class
    label_keys: tuple[tuple[str, ...], ...] = ()  # labels (after `_label_key`) of each class; () = by group

    @property
    def is_groups(self) -> bool:
        """Whether the classes are the 3 diagnostic groups themselves."""
        return self.groups == GROUPS

    def targets(self, manifest: Manifest) -> np.ndarray:
        """The class index of each image (N,); `DataError` naming an image whose label is not one of the classes."""
        if not self.label_keys:
            return manifest.groups
        lookup = {key: c for c, keys in enumerate(self.label_keys) for key in keys}
        found = [lookup.get(_label_key(r.label)) for r in manifest]
        missing = [r for r, c in zip(manifest, found) if c is None]
        if missing:
            raise DataError(
                f"--classes {self.name} needs the labels {', '.join(self.labels)}: {len(missing)} image(s) "
                f"have others, e.g. {missing[0].label!r} ({missing[0].path}); use --classes groups"
            )
        return np.array(found, dtype=np.int64)


CLASS_SCHEMES = {
    "groups": ClassScheme("groups", GROUP_NAMES, GROUP_NAMES, GROUPS),
    # BACH / ICIAR 2018 part A's four classes, as the challenge and the published results score them.
    "bach4": ClassScheme(
        "bach4",
        ("normal", "benign", "in_situ", "invasive"),
        ("Normal", "Benign", "InSitu", "Invasive"),
        (0, 0, 1, 2),
        (("normal",), ("benign",), ("insitu", "insitucarcinoma", "dcis"), ("invasive", "invasivecarcinoma")),
    ),
}


def class_scheme(name: str) -> ClassScheme:
    """The named class scheme (`groups` or `bach4`)."""
    if name not in CLASS_SCHEMES:
        raise DataError(f"unknown classes {name!r}: choose one of {', '.join(CLASS_SCHEMES)}")
    return CLASS_SCHEMES[name]
