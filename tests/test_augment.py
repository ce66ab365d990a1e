import numpy as np
import pytest
import torch

from histoboost.augment import AugmentPlan, augment_batch, augment_image, crops, plan_augmentation, plan_augmentations
from histoboost.config import AugmentConfig
from histoboost.stain import fit_macenko

IMAGE_ID = "6f414852b58d822705435b3efdee01041f86310a3c3ade22e979e790e7b3943a"
OTHER_ID = "0" * 63 + "1"


def _augmented_crops(image, image_id, config, seed):
    fit = fit_macenko(image) if config.color == "he" else None
    out = []
    for plan in plan_augmentations(image_id, *image.shape[:2], config, seed):
        out.extend(crops(augment_image(image, plan, fit), plan.boxes))
    return out


@pytest.mark.parametrize("color", ["rgb_affine", "he"])
def test_same_seed_same_crops_other_seed_other_crops(bach_image, color):
    image = bach_image("InSitu/is001", 0.25)
    config = AugmentConfig(n_augment=3, n_crops=4, crop_size=128, color=color, orientation="dihedral")
    first = _augmented_crops(image, IMAGE_ID, config, seed=0)
    again = _augmented_crops(image, IMAGE_ID, config, seed=0)
    other = _augmented_crops(image, IMAGE_ID, config, seed=1)
    assert len(first) == 12 and all(c.shape == (128, 128, 3) for c in first)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not any(np.array_equal(a, b) for a, b in zip(first, other))


def test_plans_do_not_depend_on_processing_order():
    config = AugmentConfig(n_augment=5, n_crops=3, crop_size=100)
    all_plans = plan_augmentations(IMAGE_ID, 300, 400, config, seed=3)
    _ = plan_augmentations(OTHER_ID, 300, 400, config, seed=3)  # another image in between
    alone = plan_augmentation(IMAGE_ID, 4, 300, 400, config, seed=3)
    assert np.array_equal(alone.boxes, all_plans[4].boxes) and np.array_equal(alone.scale, all_plans[4].scale)
    assert not np.array_equal(all_plans[0].boxes, plan_augmentations(OTHER_ID, 300, 400, config, seed=3)[0].boxes)


@pytest.mark.parametrize("color", ["rgb_affine", "he", "none"])
def test_numpy_and_torch_agree_within_one_level(bach_image, color):
    image = bach_image("Invasive/iv001", 0.25)
    config = AugmentConfig(n_augment=4, n_crops=2, crop_size=128, color=color, orientation="dihedral")
    plans = plan_augmentations(IMAGE_ID, *image.shape[:2], config, seed=0)
    fit = fit_macenko(image)
    on_numpy = np.stack([augment_image(image, p, fit) for p in plans]).astype(int)
    on_torch = augment_batch(torch.from_numpy(image).permute(2, 0, 1), plans, fit).permute(0, 2, 3, 1).numpy()
    assert on_torch.shape == on_numpy.shape
    assert np.abs(on_numpy - on_torch).max() <= 1


@pytest.mark.parametrize("color", ["rgb_affine", "he"])
def test_neutral_parameters_are_the_identity(bach_image, color):
    image = bach_image("Normal/n010", 0.25)
    n = 3 if color == "rgb_affine" else 2
    plan = AugmentPlan(0, color, np.ones(n), np.zeros(n), 0, False, np.zeros((0, 4), np.int64))
    assert np.array_equal(augment_image(image, plan, fit_macenko(image)), image)


def test_rgb_affine_is_an_affine_map_of_intensities():
    image = np.full((8, 8, 3), 100, np.uint8)
    plan = AugmentPlan(
        0, "rgb_affine", np.array([1.1, 1.0, 0.9]), np.array([0.0, 0.02, -0.02]), 0, False, np.zeros((0, 4), np.int64)
    )
    assert augment_image(image, plan)[0, 0].tolist() == [110, 105, 85]


def test_he_augmentation_changes_tissue_only(bach_image):
    image = bach_image("Normal/n010", 0.25)
    image[:10] = 250  # a band of white background
    plan = AugmentPlan(0, "he", np.array([1.2, 0.8]), np.array([0.05, -0.05]), 0, False, np.zeros((0, 4), np.int64))
    out = augment_image(image, plan, fit_macenko(image))
    assert np.array_equal(out[:10], image[:10])
    assert np.abs(out[10:].astype(int) - image[10:]).mean() > 2


def test_crop_boxes_fit_and_crops_are_views():
    config = AugmentConfig(n_augment=8, n_crops=20, crop_size=750)
    image = np.zeros((768, 1024, 3), np.uint8)  # the paper's working image
    for plan in plan_augmentations(IMAGE_ID, 768, 1024, config, seed=0):
        x0, y0, x1, y1 = plan.boxes.T
        assert (x0 >= 0).all() and (y0 >= 0).all() and (x1 <= 1024).all() and (y1 <= 768).all()
        assert ((x1 - x0) == 750).all() and ((y1 - y0) == 750).all()
        assert all(np.shares_memory(c, image) for c in crops(image, plan.boxes))


def test_orientation_changes_the_crop_frame():
    config = AugmentConfig(n_augment=16, n_crops=2, crop_size=200, orientation="dihedral")
    plans = plan_augmentations(IMAGE_ID, 300, 500, config, seed=0)
    assert {p.rot90 for p in plans} == {0, 1, 2, 3} and {p.flip for p in plans} == {False, True}
    for plan in plans:
        width = 300 if plan.rot90 % 2 else 500
        assert plan.boxes[:, 2].max() <= width
    image = torch.zeros(3, 300, 500)
    with pytest.raises(ValueError, match="batch them by shape"):
        augment_batch(image, plans)


def test_he_needs_a_stain_fit():
    plan = AugmentPlan(0, "he", np.ones(2), np.zeros(2), 0, False, np.zeros((0, 4), np.int64))
    with pytest.raises(ValueError, match="stain fit"):
        augment_image(np.zeros((8, 8, 3), np.uint8), plan)


def test_crop_larger_than_image_is_refused():
    with pytest.raises(ValueError, match="does not fit"):
        plan_augmentation(IMAGE_ID, 0, 300, 300, AugmentConfig(crop_size=384), seed=0)
