"""Seeded colour augmentations and crop boxes, on numpy images or batched torch tensors.

Every random number is drawn on the CPU by numpy from a generator seeded with (seed, image id,
augmentation index), so an augmentation is the same whatever order images are processed in and on
whichever device it is applied. Applying it in numpy or in torch (CPU or CUDA) may differ by one
intensity level where float rounding differs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .config import AugmentConfig
from .stain import IO, OD_BETA, StainFit


@dataclass(frozen=True)
class AugmentPlan:
    """One augmented view of an image: colour change, orientation and crop boxes."""

    index: int
    color: str  # rgb_affine | he | none
    scale: np.ndarray  # per RGB channel (rgb_affine) or per stain (he)
    shift: np.ndarray  # intensity fraction of 255 (rgb_affine) or stain concentration (he)
    rot90: int  # quarter turns, counter-clockwise
    flip: bool  # left-right mirror after the rotation
    boxes: np.ndarray  # (C, 4) int64 x0, y0, x1, y1 in the oriented image


def image_key(image_id: str) -> int:
    """A 64-bit integer from an image's sha256 hex id, for seeding."""
    return int(image_id[:16], 16)


def oriented_shape(height: int, width: int, rot90: int) -> tuple[int, int]:
    return (width, height) if rot90 % 2 else (height, width)


def plan_augmentation(
    image_id: str, index: int, height: int, width: int, config: AugmentConfig, seed: int
) -> AugmentPlan:
    """The `index`-th augmentation of an image of `height` x `width` pixels (working resolution)."""
    rng = np.random.default_rng([seed, image_key(image_id), index])
    if config.color == "he":
        scale = rng.uniform(1 - config.he_scale, 1 + config.he_scale, size=2)
        shift = rng.uniform(-config.he_shift, config.he_shift, size=2)
    elif config.color == "rgb_affine":
        scale = rng.uniform(1 - config.rgb_scale, 1 + config.rgb_scale, size=3)
        shift = rng.uniform(-config.rgb_shift, config.rgb_shift, size=3)
    else:
        scale, shift = np.ones(3), np.zeros(3)
    rot90, flip = 0, False
    if config.orientation == "dihedral":
        rot90, flip = int(rng.integers(4)), bool(rng.integers(2))
    elif config.orientation == "flip":
        rot90, flip = 2 * int(rng.integers(2)), bool(rng.integers(2))
    h, w = oriented_shape(height, width, rot90)
    boxes = crop_boxes(rng, h, w, config.crop_size, config.n_crops)
    return AugmentPlan(index, config.color, scale, shift, rot90, flip, boxes)


def plan_augmentations(image_id: str, height: int, width: int, config: AugmentConfig, seed: int) -> list[AugmentPlan]:
    """All A augmentations of one image."""
    return [plan_augmentation(image_id, i, height, width, config, seed) for i in range(config.n_augment)]


def crop_boxes(rng: np.random.Generator, height: int, width: int, size: int, count: int) -> np.ndarray:
    """`count` uniformly placed `size` x `size` boxes (x0, y0, x1, y1) inside the image."""
    if size > min(height, width):
        raise ValueError(f"a {size} px crop does not fit in a {width}x{height} image")
    x0 = rng.integers(0, width - size + 1, size=count)
    y0 = rng.integers(0, height - size + 1, size=count)
    return np.stack([x0, y0, x0 + size, y0 + size], axis=1).astype(np.int64)


def crops(image: np.ndarray, boxes: np.ndarray) -> list[np.ndarray]:
    """Views (no copies) of an (H, W, 3) image inside each box."""
    return [image[y0:y1, x0:x1] for x0, y0, x1, y1 in boxes]


def augment_image(image: np.ndarray, plan: AugmentPlan, stain_fit: StainFit | None = None) -> np.ndarray:
    """Apply a plan to an RGB uint8 (H, W, 3) image; `he` plans need the image's `StainFit`."""
    out = np.rot90(image, plan.rot90, axes=(0, 1))
    if plan.flip:
        out = out[:, ::-1]
    colored = _apply_color(out.astype(np.float32), plan, stain_fit, channel_axis=-1)
    return colored.astype(np.uint8)


def augment_batch(image: torch.Tensor, plans: list[AugmentPlan], stain_fit: StainFit | None = None) -> torch.Tensor:
    """Apply plans to one (3, H, W) image tensor on its device: float32 (A, 3, H', W') in [0, 255].

    All plans must give the same shape (always so for square images or without quarter turns).
    """
    shapes = {oriented_shape(image.shape[-2], image.shape[-1], p.rot90) for p in plans}
    if len(shapes) > 1:
        raise ValueError("plans with and without a quarter turn of a non-square image: batch them by shape")
    base = image.to(torch.float32)
    views = []
    for plan in plans:
        view = torch.rot90(base, plan.rot90, dims=(-2, -1))
        if plan.flip:
            view = view.flip(-1)
        views.append(_apply_color(view, plan, stain_fit, channel_axis=0))
    return torch.stack(views)


def _apply_color(x: Any, plan: AugmentPlan, stain_fit: StainFit | None, channel_axis: int) -> Any:
    """The colour change on float intensities (numpy or torch), rounded and clipped to [0, 255].

    Written once for both array kinds (they share these operators) so the two cannot drift apart.
    """
    xp = torch if isinstance(x, torch.Tensor) else np
    shape = [1, 1, 1]
    shape[channel_axis] = -1

    def const(values: np.ndarray) -> Any:
        arr = np.asarray(values, dtype=np.float32)
        return torch.as_tensor(arr, device=x.device) if xp is torch else arr

    if plan.color == "rgb_affine":
        out = x * const(plan.scale).reshape(shape) + const(plan.shift * 255.0).reshape(shape)
    elif plan.color == "he":
        if stain_fit is None:
            raise ValueError("H&E-space augmentation needs the image's stain fit")
        od = xp.moveaxis(-xp.log((x + 1.0) / IO), channel_axis, -1)
        conc = od @ const(np.linalg.pinv(stain_fit.he).T)
        tissue = (od >= OD_BETA).any(-1, keepdims=True)
        # Add only the change in stain (residual optical density kept), so scale 1, shift 0 is the
        # identity; background pixels are left as they are.
        delta = xp.where(tissue, conc * (const(plan.scale) - 1.0) + const(plan.shift), 0.0 * conc)
        od = od + delta @ const(stain_fit.he.T)
        out = xp.moveaxis(IO * xp.exp(-od), -1, channel_axis) - 1.0
    else:
        out = x
    return xp.clip(xp.round(out) if xp is torch else np.rint(out), 0, 255)


def training_view(
    crop: torch.Tensor,
    rng: np.random.Generator,
    stain_fit: StainFit | None,
    he_scale: float,
    he_shift: float,
    rgb_scale: float,
    rgb_shift: float,
) -> torch.Tensor:
    """One random fine-tuning view of a (3, s, s) crop on its device: a random H&E-space change (where the
    image's stains are known), then a random RGB affine change, rot90 and mirror; float32 in [0, 255].

    Fine-tuning draws a fresh view of every crop each epoch, so the network sees the stain variety of
    other labs rather than memorising one; square crops keep every orientation batchable.
    """
    empty = np.zeros((0, 4), dtype=np.int64)
    view = crop
    if stain_fit is not None:
        he = AugmentPlan(
            0, "he", rng.uniform(1 - he_scale, 1 + he_scale, 2), rng.uniform(-he_shift, he_shift, 2), 0, False, empty
        )
        view = augment_batch(view, [he], stain_fit)[0]
    rgb = AugmentPlan(
        0,
        "rgb_affine",
        rng.uniform(1 - rgb_scale, 1 + rgb_scale, 3),
        rng.uniform(-rgb_shift, rgb_shift, 3),
        int(rng.integers(4)),
        bool(rng.integers(2)),
        empty,
    )
    return augment_batch(view, [rgb])[0]
