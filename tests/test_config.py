import json

import pytest

from histoboost.config import Config, ConfigError, build_config, preset


def test_presets_match_the_protocols():
    paper, quick = preset("paper"), preset("quick")
    assert (paper.preprocess.scale, paper.augment.n_augment, paper.augment.n_crops, paper.augment.crop_size) == (
        0.5,
        40,
        20,
        750,
    )
    assert paper.preprocess.stain.method == "macenko" and paper.evaluate.folds == 6
    assert paper.features.backbones == ("resnet50", "xception")
    assert (quick.augment.n_augment, quick.augment.n_crops, quick.augment.crop_size) == (12, 12, 384)
    assert quick.features.backbones == ("efficientnet_lite0",)
    assert quick.classifier.n_estimators == 200


def test_json_round_trip_is_exact():
    config = preset("quick").merged({"preprocess.stain.target": [0.1] * 8, "seed": 7})
    again = Config.from_json(config.to_json())
    assert again == config
    assert again.to_json() == config.to_json()


def test_precedence_preset_then_file_then_flags():
    file_data = {"augment": {"n_augment": 5, "n_crops": 3}, "seed": 11}
    config = build_config("quick", file_data, {"augment.n_crops": 2, "seed": None})
    assert config.augment.n_augment == 5  # from the file
    assert config.augment.n_crops == 2  # flag beats file
    assert config.seed == 11  # an absent flag (None) does not override
    assert config.augment.crop_size == 384  # from the preset


def test_classifier_change_keeps_feature_hash():
    base = preset("paper")
    other_classifier = base.merged({"classifier.n_estimators": 50, "evaluate.folds": 4})
    assert other_classifier.stage_hash("features") == base.stage_hash("features")
    assert other_classifier.stage_hash("classifier") != base.stage_hash("classifier")


def test_feature_settings_change_feature_hash():
    base = preset("paper")
    for change in (
        {"augment.n_crops": 10},
        {"preprocess.stain.method": "none"},
        {"seed": 1},
        {"features.crop_pooling": "max"},
    ):
        assert base.merged(change).stage_hash("features") != base.stage_hash("features"), change
    # The backbone list is keyed per backbone by the feature store, not here.
    assert base.merged({"features.backbones": ["resnet50"]}).stage_hash("features") == base.stage_hash("features")


def test_hash_is_stable_across_processes():
    # A literal value: the hash must not depend on dict order, process or Python hash seed.
    settings = json.dumps(preset("paper").stage_settings("preprocess"), sort_keys=True)
    assert '"scale": 0.5' in settings
    assert preset("paper").stage_hash("preprocess") == Config.from_json(preset("paper").to_json()).stage_hash(
        "preprocess"
    )


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"augment": {"n_crop": 3}}, "unknown config key 'augment.n_crop'"),
        ({"augment": {"n_crops": "3"}}, "must be an integer"),
        ({"preprocess": {"stain": {"method": "vahadane"}}}, "must be one of"),
        ({"augment": {"n_augment": 0}}, "at least 1"),
        ({"preprocess": {"stain": {"target": [1.0, 2.0]}}}, "8 numbers"),
        ({"schema_version": 99}, "schema version 99"),
        ({"finetune": {"freeze_stages": 9}}, "finetune.freeze_stages must be 0 to 4"),
        ({"finetune": {"batch_size": 1}}, "finetune.batch_size must be at least 2"),
    ],
)
def test_bad_config_gives_a_clear_error(bad, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        Config.from_dict(
            {**preset("paper").to_dict(), **bad} if "schema_version" in bad else preset("paper").merged(bad).to_dict()
        )


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'fast'"):
        preset("fast")


def test_finetune_settings_key_the_weights_not_the_feature_store():
    base = preset("quick")
    longer = base.merged({"finetune.epochs": 20})
    assert longer.stage_hash("features") == base.stage_hash("features")  # the weights' sha256 keys the store
    assert longer.stage_hash("finetune") != base.stage_hash("finetune")
    assert longer.stage_hash("classifier") != base.stage_hash("classifier")
    # The crop size fine-tuning trains on, however it was set, and only what fine-tuning reads.
    assert base.finetune_crop_size == 384
    assert base.merged({"finetune.crop_size": 384}).stage_hash("finetune") == base.stage_hash("finetune")
    assert base.merged({"augment.n_augment": 3}).stage_hash("finetune") == base.stage_hash("finetune")


def test_the_config_refuses_what_its_backbones_cannot_do_whoever_builds_it():
    """Settings a ViT cannot take, and fine-tuning a foundation model, are refused when the config is made (in
    Python as on the command line), not after work has started."""
    with pytest.raises(ConfigError, match="is a ViT: crops cannot share one feature map"):
        preset("quick").merged({"features.backbones": ["uni"]})
    with pytest.raises(ConfigError, match="uni is a foundation model: histoboost uses it frozen"):
        preset("foundation").merged({"finetune.enabled": True})
    assert (
        build_config("quick", {"features": {"backbones": ["uni"]}}, {"features.mode": "exact"}).features.mode == "exact"
    )  # a file's ViT and a flag's --mode exact: checked once, together
