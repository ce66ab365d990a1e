"""Foundation-model specs and their strict offline loading.

No real foundation-model weights can be had offline, so every file here holds *random* weights saved in
the publisher's layout and format: the tests prove the architecture, the key mapping, the pooling and the
refusals, never that a model is pretrained.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from histoboost.backbones import BackboneError, _build_foundation, create_backbone, expected_shapes, identify
from histoboost.foundation import adapt
from histoboost.specs import REGISTRY, foundation_spec, register
from histoboost.specs import foundation_models as published_models

# Published architecture of each model, from its own card or code (the spec's `sources` cite them): width,
# depth, patch size, position-embedding length, register tokens, fc1 width (SwiGLU: packed, fc2 takes half),
# whether blocks carry layer scale. The key manifest below is written from these, independently of timm.
PUBLISHED = {
    # UNI get_encoder.py: vit_large_patch16_224, init_values 1e-5 (layer scale), 224 px -> 14x14 + CLS
    "uni": (1024, 24, 16, 197, 0, 4096, False, True),
    # UNI README: embed_dim 1536, depth 24, mlp_ratio 2.66667*2 (SwiGLU 4096 packed 8192), 8 registers,
    # no_embed_class (16x16 positions for patch 14 at 224)
    "uni2-h": (1536, 24, 14, 256, 8, 8192, True, True),
    # Virchow card: ViT-H/14 (1280 wide, 32 deep), mlp_ratio 5.3375 SwiGLU, 224 px; Virchow2 adds 4 registers
    # that share the position embedding (1 + 4 + 256)
    "virchow": (1280, 32, 14, 257, 0, 6832, True, True),
    "virchow2": (1280, 32, 14, 261, 4, 6832, True, True),
    # H-optimus card / bioptimus releases README: ViT-g/14 1536 wide, 40 deep, 4 registers, SwiGLU 8192, no
    # position for CLS or registers
    "h-optimus-0": (1536, 40, 14, 256, 4, 8192, True, True),
    "h-optimus-1": (1536, 40, 14, 256, 4, 8192, True, True),
    # Prov-GigaPath config.json: vit_giant_patch14_dinov2 with patch 16 (14x14 + CLS)
    "prov-gigapath": (1536, 40, 16, 197, 0, 8192, True, True),
    # Phikon config.json: ViT-B/16 (768, 12 layers, intermediate 3072), no layer scale
    "phikon": (768, 12, 16, 197, 0, 3072, False, False),
    # Phikon-v2 card: ViT-L/16 trained with DINOv2 (layer scale)
    "phikon-v2": (1024, 24, 16, 197, 0, 4096, False, True),
    # kaiko hubconf: timm vit_small/base patch16/8 at 224
    "kaiko-vits16": (384, 12, 16, 197, 0, 1536, False, False),
    "kaiko-vits8": (384, 12, 8, 785, 0, 1536, False, False),
    "kaiko-vitb16": (768, 12, 16, 197, 0, 3072, False, False),
    "kaiko-vitb8": (768, 12, 8, 785, 0, 3072, False, False),
    # kaiko hubconf: vit_large_patch14_reg4_dinov2 at DINOv2's 518 px (37x37 positions)
    "kaiko-vitl14": (1024, 24, 14, 1369, 4, 4096, False, True),
    # Lunit README: VisionTransformer(img_size=224, patch_size=16, embed_dim=384, num_heads=6)
    "lunit-vits16": (384, 12, 16, 197, 0, 1536, False, False),
    # Hibou-B config.json: Dinov2 with 4 registers, 768 wide, 12 layers, patch 14, SwiGLU; Hibou-L: ViT-L
    "hibou-b": (768, 12, 14, 256, 4, 4096, True, True),
    "hibou-l": (1024, 24, 14, 256, 4, 5472, True, True),
}


def vit_manifest(width, depth, patch, positions, registers, fc1, swiglu, layer_scale) -> dict[str, tuple]:
    """The keys and shapes of a timm VisionTransformer state dict with these published dimensions."""
    keys = {
        "cls_token": (1, 1, width),
        "pos_embed": (1, positions, width),
        "patch_embed.proj.weight": (width, 3, patch, patch),
        "patch_embed.proj.bias": (width,),
        "norm.weight": (width,),
        "norm.bias": (width,),
    }
    if registers:
        keys["reg_token"] = (1, registers, width)
    for i in range(depth):
        block = {
            "norm1.weight": (width,),
            "norm1.bias": (width,),
            "attn.qkv.weight": (3 * width, width),
            "attn.qkv.bias": (3 * width,),
            "attn.proj.weight": (width, width),
            "attn.proj.bias": (width,),
            "norm2.weight": (width,),
            "norm2.bias": (width,),
            "mlp.fc1.weight": (fc1, width),
            "mlp.fc1.bias": (fc1,),
            "mlp.fc2.weight": (width, fc1 // 2 if swiglu else fc1),
            "mlp.fc2.bias": (width,),
        }
        if layer_scale:
            block.update({"ls1.gamma": (width,), "ls2.gamma": (width,)})
        keys.update({f"blocks.{i}.{k}": v for k, v in block.items()})
    return keys


def test_every_spec_is_tested_and_named_as_its_hub_spells_it():
    assert set(PUBLISHED) == set(published_models())
    assert all(name == name.lower() for name in published_models())


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_full_size_state_dict_equals_the_published_key_manifest(name):
    """Built on the meta device at full size (no memory): every key and shape as the publisher's model has it."""
    found = {k: tuple(v) for k, v in expected_shapes(name).items()}
    assert found == vit_manifest(*PUBLISHED[name])
    spec = foundation_spec(name)
    assert spec.dim == PUBLISHED[name][0] * (2 if spec.embedding == "cls+mean" else 1)
    assert name in identify(expected_shapes(name))
    assert dict(spec.kwargs).get("img_size") == (518 if name == "kaiko-vitl14" else 224)  # always explicit


def twin_of(name: str, suffix: str = "twin", **changes) -> str:
    """A reduced-depth twin of a spec (same layout, one block), registered under `<name>-<suffix>`."""
    spec = foundation_spec(name)
    kwargs = {**dict(spec.kwargs), "depth": 1, **changes.pop("kwargs", {})}
    twin = dataclasses.replace(spec, name=f"{name}-{suffix}", kwargs=tuple(kwargs.items()), **changes)
    register(twin)
    return twin.name


@pytest.fixture
def twins():
    """Twins registered for one test, removed afterwards."""
    before = dict(REGISTRY)
    yield
    REGISTRY.clear()
    REGISTRY.update(before)


def random_model(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = _build_foundation(foundation_spec(name)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model


def reference_embedding(model, spec, rgb):
    tokens = model.forward_features(
        (rgb / 255 - torch.tensor(spec.mean).view(1, 3, 1, 1)) / torch.tensor(spec.std).view(1, 3, 1, 1)
    )
    if spec.embedding == "cls":
        return tokens[:, 0]
    return torch.cat([tokens[:, 0], tokens[:, model.num_prefix_tokens :].mean(1)], dim=1)


NO_ADAPTER = sorted(n for n, s in published_models().items() if s.adapter == "none")


@pytest.mark.parametrize("name", NO_ADAPTER)
def test_twin_saved_as_published_loads_strictly_with_identical_outputs(name, tmp_path, twins):
    """Random weights in the published format (a torch state dict) through the same path as --weights."""
    twin = twin_of(name)
    model = random_model(twin)
    path = tmp_path / foundation_spec(twin).weights_file
    torch.save(model.state_dict(), path)
    backbone = create_backbone(twin, path)
    rgb = torch.rand(2, 3, 224, 224) * 255
    with torch.inference_mode():
        assert torch.equal(backbone.embed(rgb), reference_embedding(model, foundation_spec(twin), rgb))
    assert backbone.embed(rgb).shape == (2, foundation_spec(name).dim)
    assert len(backbone.weights_sha256) == 64 and backbone.spec_sha256 == foundation_spec(twin).digest


def test_another_models_file_a_truncated_file_and_another_grid_are_one_clear_line(tmp_path, twins):
    uni, kaiko = twin_of("uni"), twin_of("kaiko-vits16")
    torch.save(random_model(kaiko).state_dict(), tmp_path / "kaiko.pth")
    with pytest.raises(BackboneError) as err:
        create_backbone(uni, tmp_path / "kaiko.pth")
    assert "not uni-twin weights" in str(err.value) and "looks like kaiko-vits16-twin" in str(err.value)
    assert "\n" not in str(err.value)
    torch.save(random_model(uni).state_dict(), tmp_path / "uni.bin")
    (tmp_path / "cut.bin").write_bytes((tmp_path / "uni.bin").read_bytes()[:100_000])
    with pytest.raises(BackboneError, match="not a readable safetensors or torch weights file"):
        create_backbone(uni, tmp_path / "cut.bin")
    small = twin_of("uni", "at-112", kwargs={"img_size": 112})
    with pytest.raises(BackboneError, match=r"position embedding is for another input size.*looks like uni-twin"):
        create_backbone(small, tmp_path / "uni.bin")


def test_a_download_folder_given_as_weights_names_the_file_inside_it(tmp_path):
    snapshot = tmp_path / "models--MahmoodLab--UNI" / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (snapshot / "pytorch_model.bin").write_bytes(b"")  # named only: the folder is refused before any read
    with pytest.raises(BackboneError) as caught:
        create_backbone("uni", tmp_path / "models--MahmoodLab--UNI")
    assert str(caught.value).endswith(
        f"is a folder: pass the weights file inside it, --weights uni={snapshot / 'pytorch_model.bin'}"
    )


def test_no_weights_says_where_to_get_them_and_never_downloads(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(BackboneError, match=r"uni needs its weights .*huggingface\.co/MahmoodLab/UNI.*--weights uni="):
        create_backbone("uni")


# -- adapters against the publishers' own code (Hugging Face transformers 4) ------------------------------


def _hf_twin(name: str, tmp_path, hf_model, size: int, patch: int, **kwargs):
    """A Hugging Face model with random weights saved as its hub files are, and the timm twin that loads it."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    with torch.no_grad():
        for p in hf_model.parameters():
            p.normal_(0, 0.05)
    hf_model.eval()
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in hf_model.state_dict().items()}, str(path))
    twin = twin_of(
        name,
        kwargs={"depth": 2, "embed_dim": 64, "num_heads": 4, "img_size": size, "patch_size": patch, **kwargs},
        input_size=size,
        dim=64,
    )
    return create_backbone(twin, path)


def _hf_cls(hf_model, backbone, rgb):
    pixels = (rgb / 255 - backbone.mean) / backbone.std
    return hf_model(pixel_values=pixels).last_hidden_state[:, 0]


def test_phikon_adapter_maps_transformers_vit_onto_timm(tmp_path, twins):
    from transformers import ViTConfig, ViTModel

    hf = ViTModel(
        ViTConfig(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=256,
            image_size=32,
            patch_size=16,
            layer_norm_eps=1e-6,
        )
    )  # Phikon's eps (discussion #1)
    assert any(k.startswith("pooler.") for k in hf.state_dict())  # dropped by the declared adapter
    backbone = _hf_twin("phikon", tmp_path, hf, 32, 16)
    rgb = torch.rand(3, 3, 32, 32) * 255
    with torch.inference_mode():
        torch.testing.assert_close(backbone.embed(rgb), _hf_cls(hf, backbone, rgb), atol=2e-5, rtol=1e-4)


def test_phikon_v2_adapter_maps_transformers_dinov2_onto_timm(tmp_path, twins):
    from transformers import Dinov2Config, Dinov2Model

    hf = Dinov2Model(
        Dinov2Config(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            mlp_ratio=4,
            image_size=32,
            patch_size=16,
            layer_norm_eps=1e-6,
        )
    )
    backbone = _hf_twin("phikon-v2", tmp_path, hf, 32, 16)
    rgb = torch.rand(3, 3, 32, 32) * 255
    with torch.inference_mode():
        torch.testing.assert_close(backbone.embed(rgb), _hf_cls(hf, backbone, rgb), atol=2e-5, rtol=1e-4)


def test_hibou_adapter_maps_dinov2_with_registers_and_swiglu_onto_timm(tmp_path, twins):
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    hf = Dinov2WithRegistersModel(
        Dinov2WithRegistersConfig(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            mlp_ratio=4,
            use_swiglu_ffn=True,
            num_register_tokens=4,
            image_size=28,
            patch_size=14,
            layer_norm_eps=1e-6,
        )
    )
    # transformers' SwiGLU width: (int(64 * 4 * 2 / 3) + 7) // 8 * 8 = 176, packed 352 = 5.5 x 64
    backbone = _hf_twin("hibou-b", tmp_path, hf, 28, 14, mlp_ratio=352 / 64)
    rgb = torch.rand(3, 3, 28, 28) * 255
    with torch.inference_mode():
        torch.testing.assert_close(backbone.embed(rgb), _hf_cls(hf, backbone, rgb), atol=2e-5, rtol=1e-4)


def test_kaiko_vitl14_adapter_reads_dinov2s_own_layout(tmp_path, twins):
    """DINOv2's layout: CLS and registers apart from a position embedding that includes CLS's (timm's
    _convert_dinov2 folds it into the CLS token); a file already in timm's layout loads unchanged."""
    twin = twin_of("kaiko-vitl14", kwargs={"img_size": 56}, input_size=56)
    model = random_model(twin)
    state = model.state_dict()
    cls_position = torch.randn(1, 1, 1024) * 0.05
    published = {k: v for k, v in state.items() if k not in ("cls_token", "pos_embed", "reg_token")}
    published.update(
        cls_token=state["cls_token"] - cls_position,
        register_tokens=state["reg_token"],
        pos_embed=torch.cat([cls_position, state["pos_embed"]], dim=1),
        mask_token=torch.zeros(1, 1024),
    )
    torch.save(published, tmp_path / "vitl14.pth")
    torch.save(state, tmp_path / "timm-layout.pth")
    rgb = torch.rand(2, 3, 56, 56) * 255
    with torch.inference_mode():
        reference = reference_embedding(model, foundation_spec(twin), rgb)
        torch.testing.assert_close(create_backbone(twin, tmp_path / "vitl14.pth").embed(rgb), reference)
        torch.testing.assert_close(create_backbone(twin, tmp_path / "timm-layout.pth").embed(rgb), reference)


def test_transformers_layout_at_full_size_is_recognised_as_phikon():
    from transformers import ViTConfig, ViTModel

    with torch.device("meta"):
        hf = ViTModel(ViTConfig(layer_norm_eps=1e-6))  # the defaults are ViT-B/16 at 224: Phikon's config.json
    assert identify({k: v.shape for k, v in hf.state_dict().items()}) == ["phikon"]


def test_adapters_drop_only_what_they_declare():
    state = {
        "embeddings.mask_token": torch.zeros(1),
        "pooler.dense.weight": torch.zeros(1),
        "something.else": torch.zeros(1),
    }
    assert set(adapt("hf-vit", state)) == {"something.else"}
    assert set(adapt("none", state)) == set(state)


def test_cls_plus_mean_skips_register_tokens(twins, tmp_path):
    """Virchow2's card: tokens 1-4 are registers; the mean is over the patch tokens only."""
    twin = twin_of("virchow2")
    model = random_model(twin)
    torch.save(model.state_dict(), tmp_path / "v2.bin")
    backbone = create_backbone(twin, tmp_path / "v2.bin")
    rgb = torch.rand(1, 3, 224, 224) * 255
    with torch.inference_mode():
        tokens = model.forward_features((rgb / 255 - backbone.mean) / backbone.std)
        embedding = backbone.embed(rgb)
    assert model.num_prefix_tokens == 5 and tokens.shape[1] == 5 + 256
    assert torch.equal(embedding[:, 1280:], tokens[:, 5:].mean(1))


# -- end to end through the library: a tiny ViT, CLS + mean, with and without carried weights ---------------


def tiny_twin(tmp_path, name: str, **changes) -> tuple[str, object]:
    """A tiny random twin (64 wide, 2 blocks, 64 px input) of a spec, saved as its publisher's file."""
    twin = twin_of(
        name,
        "tiny",
        kwargs={"depth": 2, "embed_dim": 64, "num_heads": 4, "img_size": 64, "patch_size": 16, "mlp_ratio": 4},
        input_size=64,
        dim=64 * (2 if foundation_spec(name).embedding == "cls+mean" else 1),
        **changes,
    )
    path = tmp_path / f"{twin}.bin"
    torch.save(random_model(twin).state_dict(), path)
    return twin, path


@pytest.mark.heavy
def test_tiny_vit_trains_and_predicts_and_gated_weights_never_travel(tmp_path, bach, twins):
    from histoboost.bundle import Bundle, BundleError
    from histoboost.config import preset
    from histoboost.data import load_manifest
    from histoboost.runtime import Runtime
    from histoboost.training import train_bundle

    from conftest import SMALL, copy_eight

    manifest, _ = load_manifest(copy_eight(bach, tmp_path / "data"))
    gated, gated_file = tiny_twin(tmp_path, "virchow2")  # CLS + mean, CC-BY-NC-ND: never carried
    config = preset("foundation").merged(
        {**SMALL, "augment.crop_size": 96, "features.backbones": [gated], "features.weights": [f"{gated}={gated_file}"]}
    )
    bundle = train_bundle(manifest, config, Runtime(cache_dir=tmp_path / "cache"))
    saved = bundle.save(tmp_path / "model")
    assert sorted(p.name for p in saved.iterdir()) == ["bundle.json", "model.ubj"]  # no weights member
    with pytest.raises(BundleError, match=f"needs backbone {gated} .*--weights {gated}="):
        Bundle.load(saved)
    other = tmp_path / "other.bin"
    torch.save(random_model(gated, seed=1).state_dict(), other)
    with pytest.raises(BundleError, match=f"is not the {gated} file the bundle was trained with"):
        Bundle.load(saved, weights={gated: other})
    with pytest.raises(BundleError, match="the bundle needs no file for resnet50"):
        Bundle.load(saved, weights={"resnet50": gated_file})
    loaded = Bundle.load(saved, weights={gated: gated_file})
    image = manifest.records[0]
    first, _ = bundle.predictor.predict_image(image.path, image.image_id, image.mpp)
    again, grid = loaded.predictor.predict_image(image.path, image.image_id, image.mpp, want_grid=True)
    assert first.aug_probs.shape == (3, 3) and (first.aug_probs == again.aug_probs).all()
    assert grid.shape[2] == 3 and grid.shape[0] >= 1  # a heat map from whole tiles

    open_, open_file = tiny_twin(tmp_path, "h-optimus-0")  # Apache-2.0: carried like any local weights
    config = config.merged({"features.backbones": [open_], "features.weights": [f"{open_}={open_file}"]})
    carried = train_bundle(manifest, config, Runtime(cache_dir=tmp_path / "cache")).save(tmp_path / "open")
    assert (carried / f"weights-{open_}.safetensors").is_file()
    assert Bundle.load(carried).backbones[0].weights_sha256 == bundle_sha(open_file)


def bundle_sha(path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_docs_list_every_spec_with_where_to_get_it():
    from pathlib import Path

    text = (Path(__file__).parents[1] / "docs" / "backbones.md").read_text()
    for name, spec in published_models().items():
        assert f"`{name}`" in text and spec.get in text and spec.licence in text


def test_a_file_the_adapter_cannot_read_is_one_line(tmp_path, twins):
    twin = twin_of("kaiko-vitl14", kwargs={"img_size": 56}, input_size=56)
    state = dict(random_model(twin).state_dict())
    state["register_tokens"] = state.pop("reg_token")
    del state["cls_token"]  # DINOv2's registers without the class token its conversion folds them into
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(BackboneError, match=r"not kaiko-vitl14-twin weights: \d+ tensors that its 'dinov2' layout"):
        create_backbone(twin, tmp_path / "broken.pth")


def test_check_file_names_the_models_a_file_fits_and_a_published_checksum(tmp_path, twins):
    from histoboost.backbones import check_file

    twin = twin_of("lunit-vits16")
    path = tmp_path / "dino_vit_small_patch16_ep200.torch"
    torch.save(random_model(twin).state_dict(), path)
    found = check_file(path)
    assert "lunit-vits16-twin" in found["fits"] and found["published_checksum_of"] == []
    register(dataclasses.replace(foundation_spec(twin), sha256=found["sha256"]))  # as if the publisher stated it
    assert check_file(path)["published_checksum_of"] == [twin]
