"""The public breast H&E data sets histoboost can fetch: where each lives, what it weighs, the checksum its
owners publish, its licence, and how its images are laid out and grouped once unpacked.

Facts come from the owners' pages and from loaders that read the same files (cited beside each value); what no
source publishes (a size, a sha256) is None and said so when fetching, never guessed.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Source:
    """One downloadable data set: an archive at `url`, checked by the digests given (hex, lower case)."""

    name: str
    title: str
    url: str
    filename: str
    licence: str
    licence_url: str
    citation: str
    size: int | None = None  # bytes; None: not published
    md5: str | None = None
    sha256: str | None = None
    images_folder: str = ""  # inside the archive, where histoboost reads the images from
    columns: Callable[[Path], Mapping[str, str]] | None = None  # extra manifest columns of an image, by its path
    cv_flags: str = ""  # what its first cross-validation needs beyond the manifest (the unit to split by)
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def digests(self) -> dict[str, str]:
        """The published checksums, by hashlib name."""
        return {name: value for name, value in (("md5", self.md5), ("sha256", self.sha256)) if value}


@dataclass(frozen=True)
class ManualSource:
    """A data set whose owners require registration: histoboost says where to get it and how to read it."""

    name: str
    title: str
    page: str
    licence: str
    how: str


# BACH part A's 400 training images in eva's patient-aware split (kaiko-ai/eva,
# src/eva/vision/data/datasets/classification/bach.py: "indices ... picked to prevent data leakage due to images
# belonging to the same patient"); its 132 held-out ids per class, by image number.
_BACH_HELD_OUT = {
    "Benign": [*range(42, 60), *range(61, 91)],
    "InSitu": [*range(40, 70)],
    "Invasive": [*range(41, 59), *range(61, 74)],
    "Normal": [*range(46, 69)],
}
_BACH_NAME = re.compile(r"^(?:b|is|iv|n)(\d{3})$")


def _bach_columns(path: Path) -> dict[str, str]:
    """`id_block` (blocks of 20 image numbers per class: BACH publishes no patient id for most images, and
    neighbouring numbers tend to share one) and `split` (eva's patient-aware `train` / `held_out`)."""
    label, match = path.parent.name, _BACH_NAME.match(path.stem)
    if match is None or label not in _BACH_HELD_OUT:
        return {"id_block": "", "split": ""}
    number = int(match.group(1))
    return {
        "id_block": f"{label}-{(number - 1) // 20}",
        "split": "held_out" if number in _BACH_HELD_OUT[label] else "train",
    }


SOURCES: dict[str, Source] = {
    "bach": Source(
        name="bach",
        title="BACH (ICIAR 2018 Grand Challenge on BreAst Cancer Histology), part A: 400 microscopy images, "
        "Normal, Benign, InSitu, Invasive (2048x1536 TIFF, 0.42 µm/px)",
        # Zenodo record 3632035, the owners' deposit (iciar2018-challenge.grand-challenge.org/Dataset/)
        url="https://zenodo.org/records/3632035/files/ICIAR2018_BACH_Challenge.zip",
        filename="ICIAR2018_BACH_Challenge.zip",
        # Zenodo's md5 of the file, as kaiko-ai/eva recorded it (commit 69f21a56, bach.py); Zenodo publishes
        # no sha256 and histoboost has not seen the size in bytes (about 10.4 GB)
        md5="8ae1801334aa943c44627c1eef3631b2",
        licence="CC BY-NC-ND 4.0: non-commercial use, attribution, no modified copies shared",
        licence_url="https://creativecommons.org/licenses/by-nc-nd/4.0/legalcode",
        citation="Aresta G. et al., BACH: Grand challenge on breast cancer histology images, Medical Image "
        "Analysis 56 (2019) 122-139; data: Polónia A., Eloy C., Aguiar P., Zenodo 3632035",
        images_folder="ICIAR2018_BACH_Challenge/Photos",
        columns=_bach_columns,
        cv_flags="--split-by id_block",
        notes=(
            "the manifest's `split` column is eva's patient-aware split: cross-validate the 268 `train` images "
            "(--split-by id_block), keep the 132 `held_out` ones for histoboost evaluate",
            "patient ids are published for only part of the images (a spreadsheet on the challenge page): "
            "`id_block` groups neighbouring image numbers instead",
        ),
    ),
    "breakhis": Source(
        name="breakhis",
        title="BreakHis (Breast Cancer Histopathological Database, UFPR): 7,909 images of 82 patients, benign "
        "and malignant tumours at 40x-400x (700x460 PNG); no in-situ class",
        # the owners' page: web.inf.ufpr.br/vri/databases/breast-cancer-histopathological-database-breakhis/
        url="http://www.inf.ufpr.br/vri/databases/BreaKHis_v1.tar.gz",
        filename="BreaKHis_v1.tar.gz",
        licence="the owners' terms: free for research, cite the paper; read them on the owners' page before use "
        "(histoboost could not confirm their wording)",
        licence_url="https://web.inf.ufpr.br/vri/databases/breast-cancer-histopathological-database-breakhis/",
        citation="Spanhol F. A., Oliveira L. S., Petitjean C., Heutte L., A dataset for breast cancer "
        "histopathological image classification, IEEE TBME 63(7) (2016) 1455-1462",
        images_folder="BreaKHis_v1/histology_slides/breast",
        notes=(
            "the owners publish no checksum: the sha256 of what was downloaded is recorded in SOURCE.json; "
            "pass --sha256 to check it against a value you trust",
            "patients come from the file names (SOB_M_DC-14-2523-40-001: patient 14-2523); cross-validate one "
            "magnification at a time (the manifest's `magnification` column)",
        ),
    ),
}

MANUAL: dict[str, ManualSource] = {
    "bracs": ManualSource(
        name="bracs",
        title="BRACS (BReAst Carcinoma Subtyping): 4,539 regions of interest, normal, benign, atypia, DCIS, invasive",
        page="https://www.bracs.icar.cnr.it/",
        licence="CC BY-NC 4.0; the owners require registration (no anonymous download)",
        how="register and download its regions of interest from the owners' page; map its seven classes to "
        "histoboost's groups with --label-map (N, PB, UDH: 0; DCIS: 1; IC: 2; the atypias FEA and ADH: your "
        "choice), using the class names as its folders spell them",
    ),
}
