"""The state-dict adapters of pathology foundation models: how a publisher's weights file (Hugging Face
transformers' layout, DINOv2's) becomes the keys timm's network loads. Each model's spec, naming its adapter, is in
`specs`; `backbones` builds the networks.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from .specs import Adapter

if TYPE_CHECKING:  # torch is imported where tensors are touched
    import torch


def adapt(adapter: Adapter, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict with the declared key map applied; nothing else is renamed or dropped."""
    if adapter == "none":
        return dict(state)
    if adapter == "dinov2":
        from timm.models.vision_transformer import _convert_dinov2

        # A no-op on a file already in timm's layout. timm's converter never reads its model argument.
        return _convert_dinov2(dict(state), None)  # type: ignore[arg-type]
    if adapter == "hf-vit":
        return _from_hugging_face(state, _HF_VIT)
    if adapter == "hf-dinov2":
        return _from_hugging_face(state, _HF_DINOV2)
    raise ValueError(f"unknown adapter {adapter!r}")


# Hugging Face transformers' ViTModel / Dinov2Model names -> timm VisionTransformer names, per layer.
_HF_VIT = {
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
    "attention.output.dense": "attn.proj",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
}
_HF_DINOV2 = {
    "norm1": "norm1",
    "norm2": "norm2",
    "attention.output.dense": "attn.proj",
    "layer_scale1": "ls1.gamma",
    "layer_scale2": "ls2.gamma",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "mlp.weights_in": "mlp.fc1",
    "mlp.weights_out": "mlp.fc2",
}
_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.(.+)\.(weight|bias|lambda1)$")


def _from_hugging_face(state: dict[str, torch.Tensor], per_layer: dict[str, str]) -> dict[str, torch.Tensor]:
    """transformers' ViT/DINOv2 keys as timm's: q, k and v joined into qkv; registers (when present) in timm's
    no-class-position layout (the class token takes its position embedding, as timm's _convert_dinov2 does).
    The pooler and the mask token, which the embedding never uses, are dropped; any other key is kept as is,
    so that a foreign file fails the strict load instead of loading partly."""
    import torch

    state = {k.removeprefix("vit.").removeprefix("dinov2."): v for k, v in state.items()}
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key.startswith("pooler.") or key == "embeddings.mask_token":
            continue
        match = _LAYER.match(key)
        if match:
            layer, name, kind = match.groups()
            if name in ("attention.attention.query", "attention.attention.key", "attention.attention.value"):
                qkv.setdefault((layer, kind), {})[name.rsplit(".", 1)[1]] = value
                continue
            if name in per_layer:
                gamma = per_layer[name].endswith("gamma")
                out[f"blocks.{layer}.{per_layer[name]}" + ("" if gamma else f".{kind}")] = value
                continue
        out[
            {
                "embeddings.cls_token": "cls_token",
                "embeddings.position_embeddings": "pos_embed",
                "embeddings.register_tokens": "reg_token",
                "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
                "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
                "layernorm.weight": "norm.weight",
                "layernorm.bias": "norm.bias",
            }.get(key, key)
        ] = value
    for (layer, kind), parts in qkv.items():
        if set(parts) == {"query", "key", "value"}:
            out[f"blocks.{layer}.attn.qkv.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]])
        else:  # an incomplete attention: keep what is there under its own name, for the strict load to name
            out.update({f"encoder.layer.{layer}.attention.attention.{p}.{kind}": v for p, v in parts.items()})
    if "embeddings.register_tokens" in state and "cls_token" in out and "pos_embed" in out:
        out["cls_token"] = out["cls_token"] + out["pos_embed"][:, :1]
        out["pos_embed"] = out["pos_embed"][:, 1:]
    return out
