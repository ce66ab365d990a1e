import numpy as np
import pytest
from torchstain.numpy.normalizers import NumpyMacenkoNormalizer

from histoboost.config import PreprocessConfig, StainConfig
from histoboost.data import load_manifest
from histoboost.stain import (
    MACENKO_HE_REF,
    MACENKO_MAX_C_REF,
    REINHARD_REF,
    Normalizer,
    StainError,
    check_images,
    fit_macenko,
    fit_reference,
    macenko_normalize,
    normalize_safely,
    quality_check,
    reinhard_stats,
)

NAMES = ["Benign/b001", "InSitu/is001", "Invasive/iv011", "Normal/n010"]


def _angles(he: np.ndarray, ref: np.ndarray) -> np.ndarray:
    cos = np.sum(he / np.linalg.norm(he, axis=0) * ref / np.linalg.norm(ref, axis=0), axis=0)
    return np.degrees(np.arccos(np.clip(cos, -1, 1)))


@pytest.mark.parametrize("name", NAMES)
def test_macenko_matches_torchstain_with_its_tissue_rule(bach_image, name):
    rgb = bach_image(name)
    ours = macenko_normalize(rgb, fit=fit_macenko(rgb, rule="all"))
    theirs, _, _ = NumpyMacenkoNormalizer().normalize(rgb, stains=False)
    assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 1


@pytest.mark.parametrize("name", NAMES)
def test_macenko_output_has_the_reference_stains(bach_image, name):
    rgb = bach_image(name)
    out, qc = Normalizer(StainConfig("macenko")).normalize_with_qc(rgb)
    refit = fit_macenko(out)
    h_angle, e_angle = _angles(refit.he, MACENKO_HE_REF)
    assert h_angle < 3 and e_angle < 15  # eosin's direction is the less certain estimate
    assert refit.max_c[0] == pytest.approx(MACENKO_MAX_C_REF[0], rel=0.15)
    assert qc.ok, qc.flags
    # Normalisation moved the image: its stain vectors were not the reference before.
    assert max(_angles(fit_macenko(rgb).he, MACENKO_HE_REF)) > 10


def test_quality_check_flags_torchstains_washed_out_output(bach_image):
    # iv011's blue channel is saturated: torchstain's all-channel tissue rule keeps few pixels and
    # washes the image out; our any-channel rule keeps the tissue.
    rgb = bach_image("Invasive/iv011")
    fit = fit_macenko(rgb)
    theirs, _, _ = NumpyMacenkoNormalizer().normalize(rgb, stains=False)
    flagged = quality_check(rgb, theirs, fit, MACENKO_HE_REF)
    assert any(flag.startswith("washed out") for flag in flagged.flags)
    assert flagged.tissue_after < 0.5 * flagged.tissue_before
    assert quality_check(rgb, macenko_normalize(rgb, fit=fit), fit, MACENKO_HE_REF).ok


@pytest.mark.parametrize("name", NAMES)
def test_reinhard_matches_reference_statistics(bach_image, name):
    rgb = bach_image(name)
    before_means, _ = reinhard_stats(rgb)
    means, stds = reinhard_stats(Normalizer(StainConfig("reinhard"))(rgb))
    assert np.abs(means - REINHARD_REF[0]).max() < 1.0
    assert np.abs(stds - REINHARD_REF[1]).max() < 1.5
    assert np.abs(before_means - REINHARD_REF[0]).max() > 2.0  # it did change something


def test_fitted_reference_round_trips_through_the_config(bach_image):
    target = fit_reference("macenko", bach_image("Normal/n010"))
    normalizer = Normalizer(StainConfig("macenko", target=target))
    out = normalizer(bach_image("Invasive/iv011"))
    assert max(_angles(fit_macenko(out).he, np.array(target[:6]).reshape(3, 2))) < 15


def _stripes() -> np.ndarray:
    image = np.full((128, 128, 3), 255, np.uint8)
    image[::2] = 0  # dense, but with no stain structure to estimate
    return image


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
@pytest.mark.parametrize(
    "image",
    [np.full((128, 128, 3), 255, np.uint8), np.full((128, 128, 3), 245, np.uint8), _stripes()],
    ids=["white", "off-white", "stripes"],
)
def test_blank_images_give_a_clear_error(method, image):
    with pytest.raises(StainError, match="too little tissue|cannot be told apart"):
        Normalizer(StainConfig(method))(image)


def test_method_none_passes_images_through(bach_image):
    rgb = bach_image()
    out, qc = Normalizer(StainConfig("none")).normalize_with_qc(rgb)
    assert out is rgb and qc is None


def test_check_images_reports_blank_images_per_file(tmp_path, bach):
    import dataclasses

    from PIL import Image

    (tmp_path / "Invasive").mkdir()
    Image.open(bach / "Invasive" / "iv011.jpeg").resize((400, 400)).save(tmp_path / "Invasive" / "iv011.png")
    manifest, _ = load_manifest(tmp_path)
    # Validation refuses blank images before any stain step; the stain check must still report one per file.
    Image.fromarray(np.full((400, 400, 3), 250, np.uint8)).save(tmp_path / "blank.png")
    blank = dataclasses.replace(manifest.records[0], path=tmp_path / "blank.png", image_id="0" * 64)
    qcs, problems = check_images([*manifest.records, blank], PreprocessConfig(scale=1.0))
    assert len(qcs) == 1 and [p.path.name for p in problems] == ["blank.png"]
    assert "too little tissue" in problems[0].message and "remove it" in problems[0].fix


@pytest.mark.parametrize("on_failure, expected", [("reinhard", "reinhard"), ("none", "none"), ("keep", "kept")])
def test_a_failed_normalisation_falls_back_per_image(bach_image, on_failure, expected):
    rgb = bach_image("Benign/b001")
    faint = (*np.asarray(MACENKO_HE_REF).ravel(), 0.02, 0.01)  # a target this faint washes the tissue out
    out, qc, fallback = normalize_safely(rgb, StainConfig("macenko", target=faint, on_failure=on_failure))
    assert not qc.ok and any("washed out" in f or "density" in f for f in qc.flags)
    assert fallback == expected
    if expected == "none":
        assert np.array_equal(out, rgb)
    elif expected == "reinhard":
        assert np.array_equal(out, Normalizer(StainConfig("reinhard")).normalize_with_qc(rgb)[0])
    good, good_qc, none = normalize_safely(rgb, StainConfig("macenko", on_failure=on_failure))
    assert good_qc.ok and none == ""


def test_check_images_says_what_the_fallback_will_do(bach):
    manifest, _ = load_manifest(bach)
    faint = (*np.asarray(MACENKO_HE_REF).ravel(), 0.02, 0.01)
    preprocess = PreprocessConfig(scale=0.25, stain=StainConfig("macenko", target=faint, on_failure="none"))
    qcs, problems = check_images(manifest.records[:1], preprocess)
    assert problems and all("un-normalised image" in p.fix and p.severity == "warning" for p in problems)
