"""A small synthetic H&E-like data set, generated deterministically, so `make demo` runs the whole
pipeline offline with no data to download. It is NOT real tissue: nuclei (haematoxylin) and stroma
(eosin) are drawn as simple shapes and rendered with the Beer-Lambert law, with three architectures:

- normal/benign: glands (rings of small regular nuclei around a lumen) in sparse stroma;
- in situ: large ducts filled with nuclei, bounded by a ring, in sparse stroma;
- invasive: many larger, irregular nuclei scattered through the stroma.

Each synthetic "patient" has two images sharing a stain variation, so grouping by patient matters.
Real data: `histoboost cv ../shared/data/bach_iciar2018 --preset quick --split-by id_block`.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from .storage import write_bytes, write_text_atomic

DEMO_VERSION = 2
SIZE = 1024
PATIENTS_PER_CLASS = 8
IMAGES_PER_PATIENT = 2
CLASSES = ("normal_benign", "in_situ", "invasive")
# H&E optical-density vectors (Ruifrok & Johnston 2001), rows: haematoxylin, eosin.
H_VECTOR = np.array([0.650, 0.704, 0.286])
E_VECTOR = np.array([0.072, 0.990, 0.105])
# Demo protocol: the quick preset on 1024 px images (512 px at scale 0.5).
DEMO_CONFIG: dict = {}


def make_demo_data(folder: str | Path, seed: int = 2022) -> Path:
    """Write the demo images and their manifest.csv (path,label,patient) unless already there."""
    folder = Path(folder)
    manifest = folder / "manifest.csv"
    marker = folder / ".demo-version"
    if manifest.is_file() and marker.is_file() and marker.read_text().strip() == f"{DEMO_VERSION} {seed}":
        return manifest
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for group, label in enumerate(CLASSES):
        for p in range(PATIENTS_PER_CLASS):
            patient = f"P{group * PATIENTS_PER_CLASS + p + 1:02d}"
            stain_rng = np.random.default_rng([seed, group, p])
            stain = (stain_rng.uniform(0.75, 1.25), stain_rng.uniform(0.75, 1.25), stain_rng.uniform(-0.08, 0.08))
            for k in range(IMAGES_PER_PATIENT):
                rng = np.random.default_rng([seed, group, p, k])
                rgb = render(synthetic_tissue(group, rng), stain, rng)
                name = f"{label}/{patient}_{k + 1}.jpeg"
                (folder / label).mkdir(exist_ok=True)
                _save_jpeg(rgb, folder / name)
                rows.append((name, label, patient))
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "label", "patient"])
    writer.writerows(rows)
    write_text_atomic(manifest, buffer.getvalue())
    write_text_atomic(marker, f"{DEMO_VERSION} {seed}\n")
    return manifest


def synthetic_tissue(group: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Haematoxylin and eosin concentration maps (SIZE, SIZE) of one synthetic image."""
    from scipy.ndimage import gaussian_filter

    eosin = (
        0.35
        + 0.25 * _smooth_noise(rng, 24)
        + 0.25 * np.clip(gaussian_filter(rng.normal(size=(SIZE, SIZE)), (2, 14)) * 6, -1, 1)
    )
    haem = np.zeros((SIZE, SIZE))
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    fat = rng.integers(0, 6)
    for _ in range(fat):  # adipocytes: empty white circles
        cx, cy, r = rng.uniform(0, SIZE), rng.uniform(0, SIZE), rng.uniform(30, 70)
        eosin[(xx - cx) ** 2 + (yy - cy) ** 2 < r**2] *= 0.05
    nuclei = []
    if group == 0:
        for _ in range(rng.integers(1, 9)):
            cx, cy, r = rng.uniform(80, SIZE - 80), rng.uniform(80, SIZE - 80), rng.uniform(25, 50)
            eosin[(xx - cx) ** 2 + (yy - cy) ** 2 < r**2] *= 0.1  # lumen
            n = int(2 * np.pi * (r + 8) / 11)
            for a in np.linspace(0, 2 * np.pi, n, endpoint=False):
                nuclei.append((cx + (r + 8) * np.cos(a), cy + (r + 8) * np.sin(a), 4.5, 3.5, a, 1.0))
        nuclei += _scattered(rng, 120, (2.0, 6.0), (1.5, 2.5), 0.9)
    elif group == 1:
        for _ in range(rng.integers(1, 4)):
            cx, cy, r = rng.uniform(130, SIZE - 130), rng.uniform(130, SIZE - 130), rng.uniform(45, 110)
            inside = (xx - cx) ** 2 + (yy - cy) ** 2 < r**2
            eosin[inside] = 0.25 + 0.1 * eosin[inside]
            for a in np.linspace(0, 2 * np.pi, int(2 * np.pi * r / 12), endpoint=False):
                nuclei.append((cx + r * np.cos(a), cy + r * np.sin(a), 5.5, 2.5, a + np.pi / 2, 1.1))
            for _ in range(int(0.55 * r * r / 40)):
                rho, a = r * 0.92 * np.sqrt(rng.uniform()), rng.uniform(0, 2 * np.pi)
                nuclei.append(
                    (
                        cx + rho * np.cos(a),
                        cy + rho * np.sin(a),
                        rng.uniform(4.5, 6.5),
                        rng.uniform(4.0, 5.5),
                        rng.uniform(0, np.pi),
                        rng.uniform(1.0, 1.3),
                    )
                )
        nuclei += _scattered(rng, 100, (2.0, 6.0), (1.5, 2.5), 0.9)
    else:
        for _ in range(rng.integers(3, 30)):  # infiltrating cords and nests
            cx, cy = rng.uniform(0, SIZE), rng.uniform(0, SIZE)
            angle, length = rng.uniform(0, np.pi), rng.integers(5, 25)
            for t in range(length):
                jitter = rng.normal(0, 6, 2)
                nuclei.append(
                    (
                        cx + 12 * t * np.cos(angle) + jitter[0],
                        cy + 12 * t * np.sin(angle) + jitter[1],
                        rng.uniform(5.0, 9.0),
                        rng.uniform(3.5, 7.5),
                        rng.uniform(0, np.pi),
                        rng.uniform(1.0, 1.5),
                    )
                )
        nuclei += _scattered(rng, int(rng.integers(60, 250)), (4.0, 8.5), (3.5, 7.0), 1.2)
    for cx, cy, rx, ry, angle, strength in nuclei:
        _stamp_nucleus(haem, cx, cy, rx, ry, angle, strength, rng)
    haem = gaussian_filter(haem, 0.8)
    return np.clip(haem, 0, 3), np.clip(eosin, 0, 2)


def render(
    concentrations: tuple[np.ndarray, np.ndarray], stain: tuple[float, float, float], rng: np.random.Generator
) -> np.ndarray:
    """RGB uint8 by Beer-Lambert with a patient's stain strength (H, E) and eosin hue shift."""
    haem, eosin = concentrations
    e_vector = E_VECTOR + np.array([0.0, 0.0, stain[2]])
    od = haem[..., None] * stain[0] * H_VECTOR * 0.9 + eosin[..., None] * stain[1] * e_vector * 0.55
    rgb = 240.0 * np.exp(-od) + rng.normal(0, 3.0, od.shape)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def _scattered(
    rng: np.random.Generator, n: int, rx: tuple[float, float], ry: tuple[float, float], strength: float
) -> list[tuple]:
    return [
        (
            rng.uniform(0, SIZE),
            rng.uniform(0, SIZE),
            rng.uniform(*rx),
            rng.uniform(*ry),
            rng.uniform(0, np.pi),
            strength,
        )
        for _ in range(n)
    ]


def _stamp_nucleus(
    haem: np.ndarray,
    cx: float,
    cy: float,
    rx: float,
    ry: float,
    angle: float,
    strength: float,
    rng: np.random.Generator,
) -> None:
    """Add one soft-edged, slightly textured ellipse of haematoxylin to the map, in place."""
    r = int(np.ceil(max(rx, ry))) + 2
    x0, y0 = int(cx) - r, int(cy) - r
    ys, xs = slice(max(y0, 0), min(y0 + 2 * r + 1, SIZE)), slice(max(x0, 0), min(x0 + 2 * r + 1, SIZE))
    if ys.start >= ys.stop or xs.start >= xs.stop:
        return
    yy, xx = np.mgrid[ys, xs]
    dx, dy = xx - cx, yy - cy
    u = (dx * np.cos(angle) + dy * np.sin(angle)) / rx
    v = (-dx * np.sin(angle) + dy * np.cos(angle)) / ry
    inside = np.clip(1.5 * (1.0 - np.sqrt(u * u + v * v)) + 0.5, 0, 1)
    haem[ys, xs] += strength * inside * rng.uniform(0.8, 1.2, inside.shape)


def _smooth_noise(rng: np.random.Generator, sigma: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    field = gaussian_filter(rng.normal(size=(SIZE, SIZE)), sigma)
    return field / (np.abs(field).max() + 1e-9)


def _save_jpeg(rgb: np.ndarray, path: Path) -> None:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, "JPEG", quality=92)
    write_bytes(path, buffer.getvalue())
