"""Fine-tuning a backbone on H&E crops, so that the features the classifier sees are histology's.

From the backbone's ImageNet weights (offline ones included), a 3-class head is trained together with
the network on random crops of the stain-normalised training images (the pipeline's own preprocessing),
each crop with a fresh H&E-space and RGB colour change and dihedral orientation. AdamW, linear warm-up
then cosine decay, label smoothing, class-balanced loss, optional freezing of early stages; early
stopping on a validation part split off by whole split units (patients or blocks, never images of a
training patient), keeping the best epoch. Output: a safetensors file that `--weights` loads everywhere,
and a JSON card beside it (base weights, data fingerprint, the images used, settings, training curve).

Every epoch is checkpointed atomically, so an interrupted run resumes from its last finished epoch;
every random draw is seeded by (seed, epoch, image), so the same seed on the same backend gives the
same weights, resumed or not. Written here rather than with a trainer library (Lightning, timm's
train script) because those want datasets of files and their own checkpoint and config systems; this
loop is short, shares our preprocessing and keys, and resumes exactly.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import storage
from .augment import image_key, training_view
from .backbones import Backbone, TimmModel, create_backbone, file_sha256
from .config import Config, FinetuneConfig
from .data import GROUP_NAMES, DataError, Manifest, Problem, read_image, working_scale
from .errors import FinetuneError
from .progress import Progress
from .stain import StainError, StainFit, fit_macenko, normalize_safely
from .storage import write_text_atomic

CARD_FORMAT = 1


@dataclass(frozen=True)
class TrainingImage:
    """One labelled image ready for fine-tuning: stain-normalised pixels at the working resolution."""

    image_id: str
    rgb: np.ndarray  # (H, W, 3) uint8
    stain_fit: StainFit | None  # its stains, for H&E-space augmentation (None: RGB changes only)
    group: int
    unit: str  # split unit: patient, block or the image itself


@dataclass(frozen=True)
class FinetuneResult:
    """Where the fine-tuned weights are and what their card says."""

    weights: Path
    card: dict
    reused: bool = False

    @property
    def card_path(self) -> Path:
        return card_path(self.weights)


def refuse_foundation(name: str) -> None:
    """Fine-tuning adapts CNNs (batch-norm stages, a new head); foundation models are used frozen."""
    from .specs import is_foundation

    if is_foundation(name):
        raise FinetuneError(
            f"{name} is a foundation model: histoboost uses it frozen (its features are already "
            "histology's); drop --finetune"
        )


def card_path(weights: Path) -> Path:
    return weights.with_suffix(".json")


# -- preparing the images ------------------------------------------------------------------------


def prepare_training_images(
    manifest: Manifest, config: Config, units: np.ndarray, threads: int | None = None, progress: Progress = True
) -> list[TrainingImage]:
    """Read, scale and stain-normalise every image once (in threads); raises DataError listing the images
    that cannot be used (too small for the crop, or unreadable)."""
    from .progress import track

    size = config.finetune_crop_size

    def load(i: int) -> TrainingImage | Problem:
        record = manifest.records[i]
        try:
            rgb = read_image(record.path, working_scale(record.mpp, config.preprocess))
            if min(rgb.shape[:2]) < size:
                return Problem(
                    record.path,
                    f"{rgb.shape[1]}x{rgb.shape[0]} px at the working scale is smaller "
                    f"than the {size} px fine-tuning crop",
                    "use a smaller --finetune-crop-size",
                )
            normalised, _, _ = normalize_safely(rgb, config.preprocess.stain)
        except (OSError, ValueError, StainError) as err:
            return Problem(record.path, f"cannot be prepared for fine-tuning ({err})", "check or remove the image")
        try:
            fit = fit_macenko(normalised)
        except StainError:  # too little tissue to know its stains: colour changes in RGB only
            fit = None
        return TrainingImage(record.image_id, normalised, fit, record.group, str(units[i]))

    with ThreadPoolExecutor(max_workers=threads or os.cpu_count() or 1) as pool:
        loaded = list(track(pool.map(load, range(len(manifest))), "preparing images", len(manifest), progress, False))
    problems = [p for p in loaded if isinstance(p, Problem)]
    if problems:
        raise DataError(f"{len(problems)} image(s) cannot be used for fine-tuning", tuple(problems))
    return [image for image in loaded if isinstance(image, TrainingImage)]  # every one, once none is a Problem


def validation_split(groups: np.ndarray, units: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Which images form the validation part (bool per image): about `fraction` of the split units,
    stratified by class, whole units only, so validation measures new patients as the test does."""
    import warnings

    from sklearn.model_selection import StratifiedGroupKFold

    n_splits = max(2, round(1 / fraction))
    per_class = [len(set(units[groups == g])) for g in np.unique(groups)]
    if len(per_class) < 2 or min(per_class) < 2:
        raise FinetuneError(
            "fine-tuning needs at least 2 split units (patients, blocks or images) of every class "
            "to keep some for validation; add images or split by a finer unit"
        )
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    classes = set(np.unique(groups))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # scarce classes: handled below
        parts = [val for _, val in splitter.split(np.zeros(len(groups)), groups, units)]
    # The first part that holds every class (one exists unless a class has too few units), so that the
    # validation loss weighs all classes.
    val = next((v for v in parts if set(groups[v]) == classes), parts[0])
    is_val = np.zeros(len(groups), dtype=bool)
    is_val[val] = True
    if set(groups[~is_val]) != classes:
        raise FinetuneError("the validation split left a class without training images; add images of it")
    return is_val


def data_fingerprint(images: list[TrainingImage]) -> str:
    """sha256 over the images' identities, classes and units, in a stable order."""
    lines = sorted(f"{im.image_id}:{im.group}:{im.unit}" for im in images)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


# -- the model -----------------------------------------------------------------------------------


def trainable_backbone(
    name: str, base_weights: str | Path | None, freeze_stages: int, seed: int, device: str
) -> tuple[Backbone, list[nn.Module]]:
    """The backbone with a fresh 3-class head, trainable except its stem and first `freeze_stages`
    feature levels; returns it with the frozen modules (kept in eval mode: their batch statistics stay)."""
    backbone = create_backbone(name, base_weights, "cpu")
    model = backbone.model
    torch.manual_seed(seed)
    model.reset_classifier(len(GROUP_NAMES))
    model.requires_grad_(True)
    frozen = frozen_modules(model, freeze_stages)
    for module in frozen:
        module.requires_grad_(False)
    backbone.to(device)
    return backbone, frozen


def frozen_modules(model: TimmModel, stages: int) -> list[nn.Module]:
    """The stem and the network up to its `stages`-th feature level (timm's `feature_info`), as the
    modules to freeze, in order; 0 freezes nothing."""
    if stages == 0:
        return []
    info = model.feature_info
    if stages > len(info) - 1:
        raise FinetuneError(
            f"freeze_stages {stages}: this network has {len(info)} feature levels; freeze at most {len(info) - 1}"
        )
    top, _, sub = info[stages - 1]["module"].partition(".")
    frozen = []
    for name, child in model.named_children():
        if name != top:
            frozen.append(child)
            continue
        if not sub:
            return [*frozen, child]
        for inner_name, inner in child.named_children():  # e.g. EfficientNet's blocks.0 .. blocks.<sub>
            frozen.append(inner)
            if inner_name == sub:
                return frozen
    raise FinetuneError(f"cannot find {info[stages - 1]['module']} in {type(model).__name__}")  # timm changed


def _train_mode(model: nn.Module, frozen: list[nn.Module]) -> None:
    model.train()
    for module in frozen:
        module.eval()


# -- training ------------------------------------------------------------------------------------


def finetune(
    images: list[TrainingImage],
    config: Config,
    backbone_name: str,
    out: str | Path,
    base_weights: str | Path | None = None,
    device: str = "cpu",
    progress: Progress = True,
) -> FinetuneResult:
    """Fine-tune `backbone_name` on `images` and write `out` (safetensors) and its card (.json).

    An existing `out` made with the same settings and data is reused; a checkpoint of an interrupted
    run with the same settings and data is resumed; anything else at `out` is refused.
    """
    from .progress import meter

    refuse_foundation(backbone_name)
    out = Path(out)
    ft, seed = config.finetune, config.seed
    base = create_backbone(backbone_name, base_weights, "cpu").identity
    fingerprint = data_fingerprint(images)
    key = finetune_key(config, base["weights_sha256"], fingerprint)
    existing = _existing(out, key)
    if existing is not None:
        return FinetuneResult(out, existing, reused=True)
    groups = np.array([im.group for im in images])
    units = np.array([im.unit for im in images], dtype=object)
    is_val = validation_split(groups, units, ft.validation_fraction, seed)
    train = [im for im, v in zip(images, is_val) if not v]
    val = [im for im, v in zip(images, is_val) if v]

    backbone, frozen = trainable_backbone(backbone_name, base_weights, ft.freeze_stages, seed, device)
    model = backbone.model
    optimizer = _optimizer(model, ft)
    steps_per_epoch = math.ceil(len(train) * ft.crops_per_image / ft.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(round(ft.warmup_epochs * steps_per_epoch), ft.epochs * steps_per_epoch)
    )
    train_groups = np.array([im.group for im in train])
    weights = (
        len(train) / (len(GROUP_NAMES) * np.maximum(np.bincount(train_groups, minlength=3), 1))
        if ft.class_balance
        else np.ones(len(GROUP_NAMES))
    )
    loss_fn = nn.CrossEntropyLoss(
        weight=torch.tensor(weights, dtype=torch.float32, device=device), label_smoothing=ft.label_smoothing
    )
    use_bf16 = ft.dtype == "bfloat16" or (ft.dtype == "auto" and torch.device(device).type == "cuda")

    state = _resume(out, key) or {"epoch": 0, "history": [], "best": None, "best_epoch": 0, "best_loss": math.inf}
    if state["epoch"]:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    val_batches = _validation_batches(val, config, device)
    cudnn = torch.backends.cudnn
    was = cudnn.deterministic, cudnn.benchmark
    cudnn.deterministic, cudnn.benchmark = True, False  # same seed, same weights on CUDA too
    bar = meter(
        f"fine-tuning {backbone_name}", ft.epochs * steps_per_epoch, "step", progress, state["epoch"] * steps_per_epoch
    )
    stale = state["epoch"] - state["best_epoch"] if state["best_epoch"] else 0
    for epoch in range(state["epoch"] + 1, ft.epochs + 1):
        if stale >= ft.patience:
            break
        start = time.perf_counter()
        torch.manual_seed(seed * 100_003 + epoch)  # dropout, drop-path: the same on a resumed run
        _train_mode(model, frozen)
        losses = []
        for batch, labels in _training_batches(train, config, epoch, device):
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=use_bf16):
                logits = model(backbone.prepare(batch))
            loss = loss_fn(logits.float(), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{np.mean(losses):.3f}")
        val_loss, val_acc = evaluate_images(model, backbone, val_batches, use_bf16, device)
        seconds = time.perf_counter() - start
        state["history"].append(
            {
                "epoch": epoch,
                "train_loss": round(float(np.mean(losses)), 5),
                "val_loss": round(val_loss, 5),
                "val_accuracy": round(val_acc, 5),
                "learning_rate": optimizer.param_groups[0]["lr"],
                "seconds": round(seconds, 2),
            }
        )
        if val_loss < state["best_loss"]:
            state.update(
                best={k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
                best_epoch=epoch,
                best_loss=val_loss,
            )
            stale = 0
        else:
            stale += 1
        state.update(
            epoch=epoch, model=model.state_dict(), optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict()
        )
        _checkpoint(out, key, state)
        bar.set_postfix(epoch=epoch, loss=f"{np.mean(losses):.3f}", val_acc=f"{val_acc:.2f}")
    bar.close()
    cudnn.deterministic, cudnn.benchmark = was
    card = _card(backbone_name, backbone, base, key, fingerprint, config, train, val, state, device)
    _write_weights(out, state["best"], card)
    _checkpoint_path(out).unlink(missing_ok=True)
    return FinetuneResult(out, json.loads(card_path(out).read_text()))


def _optimizer(model: TimmModel, ft: FinetuneConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters: weight decay on weights only (not biases or norms), the
    new head at 10x the backbone's learning rate."""
    head = {id(p) for p in model.get_classifier().parameters()}
    params = [p for p in model.parameters() if p.requires_grad]
    body = [p for p in params if id(p) not in head]
    return torch.optim.AdamW(
        [
            {"params": [p for p in body if p.ndim > 1], "lr": ft.learning_rate, "weight_decay": ft.weight_decay},
            {"params": [p for p in body if p.ndim <= 1], "lr": ft.learning_rate, "weight_decay": 0.0},
            {
                "params": [p for p in params if id(p) in head],
                "lr": 10 * ft.learning_rate,
                "weight_decay": ft.weight_decay,
            },
        ]
    )


def finetune_cached(
    images: list[TrainingImage],
    config: Config,
    backbone_name: str,
    cache_dir: Path,
    base_weights: str | Path | None = None,
    device: str = "cpu",
    progress: Progress = True,
) -> FinetuneResult:
    """`finetune` into the cache (`<cache>/finetune/<backbone>-<key>/`), so that cross-validation reruns
    and resumes reuse the weights of every fold already fine-tuned."""
    base = create_backbone(backbone_name, base_weights, "cpu").identity
    key = finetune_key(config, base["weights_sha256"], data_fingerprint(images))
    out = Path(cache_dir) / "finetune" / f"{backbone_name}-{key}" / "weights.safetensors"
    return finetune(images, config, backbone_name, out, base_weights, device, progress)


def warmup_cosine(warmup_steps: int, total_steps: int):
    """Learning-rate factor per step: linear warm-up to 1, then cosine decay to 0 at `total_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _training_batches(train: list[TrainingImage], config: Config, epoch: int, device: str):
    """This epoch's shuffled (crops, labels) batches: `crops_per_image` random crops of every image, each
    a fresh random view; everything drawn from (seed, epoch, image, crop)."""
    ft, size = config.finetune, config.finetune_crop_size
    order = np.random.default_rng([config.seed, epoch]).permutation(
        [(i, j) for i in range(len(train)) for j in range(ft.crops_per_image)]
    )
    for start in range(0, len(order), ft.batch_size):
        views, labels = [], []
        for i, j in order[start : start + ft.batch_size]:
            image = train[i]
            rng = np.random.default_rng([config.seed, epoch, image_key(image.image_id), j])
            h, w = image.rgb.shape[:2]
            y, x = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
            crop = torch.from_numpy(np.ascontiguousarray(image.rgb[y : y + size, x : x + size])).permute(2, 0, 1)
            views.append(
                training_view(
                    crop.to(device), rng, image.stain_fit, ft.he_scale, ft.he_shift, ft.rgb_scale, ft.rgb_shift
                )
            )
            labels.append(image.group)
        yield torch.stack(views), torch.tensor(labels, device=device)


def _validation_batches(val: list[TrainingImage], config: Config, device: str) -> list[tuple[torch.Tensor, int]]:
    """Each validation image's fixed crops (no colour change), drawn once from (seed, image)."""
    size, count = config.finetune_crop_size, config.finetune.validation_crops
    out = []
    for image in val:
        rng = np.random.default_rng([config.seed, image_key(image.image_id), 7919])
        h, w = image.rgb.shape[:2]
        ys, xs = rng.integers(0, h - size + 1, count), rng.integers(0, w - size + 1, count)
        crops = np.stack([image.rgb[y : y + size, x : x + size] for y, x in zip(ys, xs)])
        out.append((torch.from_numpy(crops).permute(0, 3, 1, 2), image.group))  # uint8: 4x less memory
    return out


def evaluate_images(
    model: nn.Module, backbone: Backbone, batches: list[tuple[torch.Tensor, int]], bf16: bool, device: str
) -> tuple[float, float]:
    """Image-level log loss and accuracy of the mean crop probability."""
    model.eval()
    losses, correct = [], 0
    with torch.inference_mode(), torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
        for crops, group in batches:
            probs = model(backbone.prepare(crops.to(device).float())).float().softmax(dim=1).mean(dim=0)
            losses.append(-math.log(max(float(probs[group]), 1e-12)))
            correct += int(probs.argmax()) == group
    return float(np.mean(losses)), correct / max(1, len(batches))


# -- files ---------------------------------------------------------------------------------------


def finetune_key(config: Config, base_sha256: str, fingerprint: str) -> str:
    """What determines the weights: settings, seed, preprocessing, base weights and data."""
    body = {
        "format": CARD_FORMAT,
        "settings": config.stage_settings("finetune"),
        "base_weights_sha256": base_sha256,
        "data": fingerprint,
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def _existing(out: Path, key: str) -> dict | None:
    """The card of finished weights at `out` made with this key; refuses other files there."""
    if not out.exists():
        return None
    try:
        card = json.loads(card_path(out).read_text())
    except (OSError, json.JSONDecodeError):
        card = {}
    if card.get("key") != key:
        raise FinetuneError(
            f"{out} exists and was not made with these settings and images: choose another --out or remove it"
        )
    if file_sha256(out) != card.get("weights_sha256"):
        raise FinetuneError(f"{out} does not match the sha256 in its card {card_path(out)}: remove both and rerun")
    return card


def _checkpoint_path(out: Path) -> Path:
    return out.with_name(out.name + ".partial.pt")


def _checkpoint(out: Path, key: str, state: dict) -> None:
    """The state after an epoch, published at once (`storage.write_bytes`): a kill never leaves half a file."""
    out.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save({**state, "key": key}, buffer)
    storage.write_bytes(_checkpoint_path(out), buffer.getvalue())


def _resume(out: Path, key: str) -> dict | None:
    path = _checkpoint_path(out)
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - a damaged checkpoint only costs the epochs it held
        return None
    return state if state.get("key") == key else None


def _write_weights(out: Path, state: dict, card: dict) -> None:
    """The weights (safetensors), then the card with their sha256; both atomically."""
    from safetensors.torch import save

    data = save({k: v.contiguous() for k, v in state.items()}, metadata={"format": "pt"})
    card["weights_sha256"] = hashlib.sha256(data).hexdigest()
    write_text_atomic(card_path(out), json.dumps(card, indent=2) + "\n")
    storage.write_bytes(out, data)


def _card(
    name: str,
    backbone: Backbone,
    base: dict,
    key: str,
    fingerprint: str,
    config: Config,
    train: list[TrainingImage],
    val: list[TrainingImage],
    state: dict,
    device: str,
) -> dict:
    from .features import library_versions

    history = state["history"]
    return {
        "format": CARD_FORMAT,
        "key": key,
        "backbone": name,
        "architecture": backbone.architecture,
        "base_weights_sha256": base["weights_sha256"],
        "base_weights_source": base["weights_source"],
        "classes": list(GROUP_NAMES),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "device": str(device),
        "settings": config.stage_settings("finetune"),
        "data": {
            "fingerprint": fingerprint,
            "train_images": sorted(im.image_id for im in train),
            "validation_images": sorted(im.image_id for im in val),
            "per_group": {GROUP_NAMES[g]: int(sum(im.group == g for im in train + val)) for g in range(3)},
            "validation_units": sorted({im.unit for im in val}),
        },
        "best_epoch": state["best_epoch"],
        "epochs_run": len(history),
        "stopped_early": len(history) < config.finetune.epochs,
        "history": history,
        "versions": library_versions(),
    }
