"""What every command shares: flag types checked at the boundary, the flag groups, the config built from
flags (preset < config file < flags) and the data set loaded and validated before any work."""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import storage
from ..config import PRESETS, ClassifierConfig, Config, ConfigError, build_config
from ..data import DataError, Problem, load_manifest, parse_label_map, read_image
from ..errors import UsageError
from ..progress import Progress
from ..specs import is_foundation
from ..stain import StainError, fit_reference


def count(lowest: int, highest: int = 1_000_000):
    """argparse type: an integer from `lowest` to `highest` (a bad value exits with status 2)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < lowest:
            raise argparse.ArgumentTypeError(f"{value} is below the smallest allowed, {lowest}")
        if value > highest:
            raise argparse.ArgumentTypeError(f"{value} is above the largest allowed, {highest}")
        return value

    return parse


def _number(check, wanted: str):
    """argparse type: a finite number for which `check` holds."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not (math.isfinite(value) and check(value)):
            raise argparse.ArgumentTypeError(f"{text} is not {wanted}")
        return value

    return parse


positive = _number(lambda v: v > 0, "a positive number")
non_negative = _number(lambda v: v >= 0, "zero or more")
share = _number(lambda v: 0 <= v <= 1, "a share between 0 and 1")


def sha256(text: str) -> str:
    """argparse type: a bundle identity, 64 hex digits."""
    if len(text) != 64 or any(c not in "0123456789abcdef" for c in text.lower()):
        raise argparse.ArgumentTypeError(f"{text!r} is not a sha256 (64 hex digits, as histoboost train prints it)")
    return text.lower()


def shard(text: str) -> tuple[int, int]:
    """argparse type: K/N, share K (from 1) of N."""
    k, _, n = text.partition("/")
    if not (k.isdigit() and n.isdigit() and 1 <= int(k) <= int(n)):
        raise argparse.ArgumentTypeError(f"{text!r} is not K/N with 1 <= K <= N, e.g. 3/16")
    return int(k), int(n)


@dataclass(frozen=True)
class Parents:
    """The flag groups commands share (argparse parents)."""

    common: argparse.ArgumentParser
    protocol: argparse.ArgumentParser
    features: argparse.ArgumentParser
    store: argparse.ArgumentParser
    evaluation: argparse.ArgumentParser
    tuning: argparse.ArgumentParser
    trust: argparse.ArgumentParser
    engine: argparse.ArgumentParser


def parents() -> Parents:
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("global options")
    group.add_argument(
        "--seed", type=count(0, 2**32 - 1), help="random seed for augmentations, crops, folds and models"
    )
    group.add_argument("--threads", type=count(1, 1024), help="CPU threads to use (default: all cores)")
    shown = group.add_mutually_exclusive_group()
    shown.add_argument("--quiet", action="store_true", help="no progress, only results and problems")
    shown.add_argument(
        "--progress",
        action="store_true",
        help="progress bars even when stderr is not a terminal (default: bars on a terminal, else one line per "
        "stage with its count and time)",
    )
    group.add_argument("--debug", action="store_true", help="show the traceback of an unexpected system error")

    protocol = argparse.ArgumentParser(add_help=False)
    group = protocol.add_argument_group("protocol (precedence: --preset < --config file < these flags)")
    group.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="starting settings (default: foundation when every backbone is a foundation model, else paper)",
    )
    group.add_argument("--config", type=Path, metavar="FILE", help="a saved config.json to rerun")
    group.add_argument("--scale", type=positive, help="working scale factor (paper: 0.5)")
    group.add_argument("--mpp", type=positive, help="target µm/px, used where the file states its resolution")
    group.add_argument("--stain", choices=["macenko", "reinhard", "none"], help="stain normalisation")
    group.add_argument(
        "--stain-fallback",
        choices=["reinhard", "none", "keep"],
        help="for an image whose normalisation fails the quality check: Reinhard, then none "
        "(default); none; or keep the failed output",
    )
    group.add_argument(
        "--stain-reference",
        type=Path,
        metavar="IMAGE",
        help="fit the stain reference to this image instead of the published default",
    )
    group.add_argument("--augmentations", "-A", type=count(1), help="colour augmentations per image")
    group.add_argument("--crops", "-C", type=count(1), help="crops per augmentation")
    group.add_argument("--crop-size", type=count(1), help="crop side in pixels at the working resolution")
    group.add_argument(
        "--label-map", metavar="LABEL=G,...", help="extra label-to-group mapping, e.g. 'Fibroadenoma=0,DCIS=1'"
    )

    features = argparse.ArgumentParser(add_help=False)
    group = features.add_argument_group("features")
    group.add_argument(
        "--backbone",
        action="append",
        metavar="NAME",
        help="network (repeatable): resnet50, xception, efficientnet_lite0/1/2 (offline), a foundation "
        "model (histoboost backbones) or a timm name; default: those --weights names, else the preset's",
    )
    group.add_argument(
        "--weights",
        action="append",
        metavar="[NAME=]PATH",
        help="local weights file (safetensors or torch state dict), e.g. uni=/path/pytorch_model.bin",
    )
    group.add_argument("--mode", choices=["shared", "exact"], help="shared feature map (fast, default) or CNN per crop")
    group.add_argument(
        "--stages",
        type=count(1),
        help="feature maps used: 1 = final (default); k = also the k-1 stages before the last",
    )
    group.add_argument("--pooling", choices=["mean", "max", "gem"], help="how crop descriptors are pooled")
    group.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    group.add_argument(
        "--batch-size", type=count(1), help="augmentations (or crops) per CNN batch (default: 8 on CPU, 48 on CUDA)"
    )

    store = argparse.ArgumentParser(add_help=False)
    store.add_argument_group("feature store").add_argument(
        "--cache-dir",
        type=storage.location,
        metavar="DIR|URL",
        help="feature store: a folder or an fsspec URL such as s3://bucket/cache (default: "
        "$HISTOBOOST_CACHE or ~/.cache/histoboost)",
    )

    evaluation = argparse.ArgumentParser(add_help=False)
    group = evaluation.add_argument_group("evaluation")
    group.add_argument(
        "--split-by",
        metavar="UNIT",
        help="image, patient (default when the data has patient ids) or a manifest column, e.g. id_block",
    )
    group.add_argument("--folds", type=count(2), help="cross-validation folds (paper: 6)")
    group.add_argument("--descriptor", choices=["crops", "whole", "crops+whole"], help="what the classifier sees")
    group.add_argument("--rounds", type=count(1), help="XGBoost boosting rounds")
    group.add_argument("--class-weight", choices=["none", "balanced"], help="weigh classes equally in training")
    group.add_argument(
        "--early-stopping",
        type=count(0),
        metavar="ROUNDS",
        help="stop boosting after ROUNDS without improvement on a grouped inner split",
    )
    group.add_argument(
        "--classes",
        choices=["groups", "bach4"],
        help="what the classifier tells apart: the 3 diagnostic groups (default) or BACH's 4 classes "
        "(Normal, Benign, InSitu, Invasive); the 3-group results come from the same predictions",
    )
    group.add_argument(
        "--classifier",
        choices=["xgboost", "logistic"],
        help="XGBoost (the seed study's, default) or standardised logistic regression",
    )
    group.add_argument(
        "--decision",
        choices=["operating-point", "argmax"],
        help="operating-point (default): carcinoma above the mean p(carcinoma) threshold chosen on "
        "inner folds of the training data for --target-sensitivity; argmax: the most probable class "
        "(majority vote over augmentations, the seed study's), which misses more carcinomas",
    )
    group.add_argument(
        "--target-sensitivity",
        type=share,
        metavar="S",
        help="the carcinoma sensitivity the operating point aims at on inner folds (default 0.95)",
    )
    group.add_argument(
        "--calibrate",
        action="store_true",
        default=None,
        help="temperature-scale the probabilities, fitted on inner folds of the training data",
    )
    group.add_argument("--inner-folds", type=count(2), help="inner folds for the threshold and calibration (default 4)")
    group.add_argument(
        "--refer-below",
        type=share,
        metavar="SHARE",
        help="refer an image to a pathologist when fewer than SHARE of its augmentations agree "
        "with the decision, e.g. 0.8 (stain-QC failures are always referred)",
    )

    tuning = argparse.ArgumentParser(add_help=False)
    group = tuning.add_argument_group("fine-tuning (see histoboost finetune --help)")
    group.add_argument(
        "--epochs", type=count(1), help="fine-tuning epochs at most (default 8; early stopping may end sooner)"
    )
    group.add_argument("--lr", type=positive, help="backbone learning rate (default 3e-4; the new head: 10x)")
    group.add_argument(
        "--freeze-stages",
        type=count(0),
        metavar="K",
        help="keep the stem and the first K feature levels at their ImageNet weights (default 0)",
    )
    group.add_argument("--crops-per-image", type=count(1), help="random training crops per image and epoch (default 8)")
    group.add_argument(
        "--finetune-crop-size",
        type=count(1),
        metavar="PX",
        help="training crop side at the working resolution (default: --crop-size)",
    )
    group.add_argument("--finetune-batch-size", type=count(2), metavar="N", help="crops per training step (default 16)")
    group.add_argument(
        "--patience", type=count(1), help="epochs without a better validation loss before stopping (default 3)"
    )

    trust = argparse.ArgumentParser(add_help=False)
    group = trust.add_argument_group("trusting a bundle (docs/security.md)")
    group.add_argument(
        "--expect-sha256",
        type=sha256,
        metavar="HASH",
        help="refuse the bundle unless its sha256 (as train printed it) is HASH",
    )
    group.add_argument(
        "--trusted-key",
        type=Path,
        metavar="PUB",
        help="refuse the bundle unless MODEL.sig is its valid signature by this Ed25519 public key",
    )
    group.add_argument(
        "--weights",
        action="append",
        metavar="NAME=PATH",
        dest="bundle_weights",
        help="your own file of a foundation model the bundle names but may not carry (gated or "
        "non-commercial weights); its sha256 must be the one the bundle was trained with",
    )
    engine = argparse.ArgumentParser(add_help=False)
    group = engine.add_argument_group("engine (docs/scale.md)")
    group.add_argument(
        "--engine",
        choices=["local", "dask"],
        default="local",
        help="local: in this process (default); dask: on Dask workers (pip install 'histoboost[dask]')",
    )
    group.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help="Dask scheduler, e.g. tcp://10.0.0.5:8786 (default: $HISTOBOOST_SCHEDULER); with no "
        "scheduler, --engine dask starts a local cluster of cores / --threads workers",
    )
    group.add_argument(
        "--scheduler-file",
        type=Path,
        metavar="FILE",
        help="the scheduler's JSON file (dask scheduler --scheduler-file, dask-jobqueue, dask-mpi)",
    )
    group.add_argument(
        "--workers", type=count(1, 4096), help="local cluster: worker processes (default: cores / threads)"
    )
    group.add_argument(
        "--memory-limit",
        metavar="SIZE",
        help="local cluster: memory per worker, e.g. 4GiB (default: "
        "memory / workers); Dask restarts a worker above 95%% of it",
    )
    return Parents(common, protocol, features, store, evaluation, tuning, trust, engine)


def _check_scheduler_file(path: Path) -> None:
    """A scheduler file is Dask's JSON with the scheduler's "address"; anything else is one line, not Dask's
    traceback."""
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(
            f"--scheduler-file {path}: no such file (start the scheduler with --scheduler-file first)"
        ) from None
    except (OSError, ValueError) as err:
        raise UsageError(f"--scheduler-file {path}: not a Dask scheduler file ({err})") from None
    if not isinstance(info, dict) or not isinstance(info.get("address"), str):
        raise UsageError(
            f'--scheduler-file {path}: not a Dask scheduler file (no "address"): give the file that '
            "dask scheduler --scheduler-file wrote"
        )


def _check_memory_limit(text: str) -> None:
    try:
        from dask.utils import parse_bytes
    except ImportError:  # open_engine says what to install
        return

    try:
        parse_bytes(text)
    except (ValueError, TypeError):
        raise UsageError(f"--memory-limit {text!r} is not a size: give e.g. 4GiB or 6GB") from None


@contextmanager
def engine_of(args: argparse.Namespace):
    """The engine the flags ask for, said on stderr (workers, threads, dashboard) and closed at the end."""
    from ..engine import EngineSpec, open_engine

    kind, scheduler, scheduler_file, workers, memory = (
        getattr(args, name, None) for name in ("engine", "scheduler", "scheduler_file", "workers", "memory_limit")
    )  # commands without engine flags: local
    if kind != "dask" and (scheduler or scheduler_file or workers or memory):
        raise UsageError("--scheduler, --scheduler-file, --workers and --memory-limit need --engine dask")
    if scheduler_file is not None:
        _check_scheduler_file(scheduler_file)
    if memory:
        _check_memory_limit(memory)
    spec = EngineSpec(
        kind or "local", scheduler, str(scheduler_file) if scheduler_file else None, workers, args.threads, memory
    )
    with open_engine(spec) as engine:
        if engine.kind != "local":
            info = engine.describe()
            dashboard = f"; dashboard: {info['dashboard']}" if info["dashboard"] else ""
            print(
                f"dask: {info['workers']} worker(s) x {info['threads_per_worker']} thread(s) at "
                f"{info['scheduler']}{dashboard}",
                file=sys.stderr,
            )
        yield engine


def bundle_weights(args: argparse.Namespace) -> dict[str, str | Path]:
    """`--weights NAME=PATH` of predict and evaluate, as {name: path}."""
    out: dict[str, str | Path] = {}
    for item in args.bundle_weights or ():
        name, sep, path = item.partition("=")
        if not (sep and name and path):
            raise UsageError(f"--weights {item}: give NAME=PATH, e.g. uni=/path/pytorch_model.bin")
        if name in out:
            raise UsageError(f"--weights {name}=… is given twice: give one file per backbone")
        out[name] = path
    return out


def config_from_args(args: argparse.Namespace) -> Config:
    """Preset < config file < flags; a stain reference image is fitted here and stored as numbers."""
    file_data = None
    if args.config is not None:
        try:
            file_data = json.loads(args.config.read_text())
        except OSError as err:
            raise UsageError(f"{args.config}: cannot read the config file ({err.strerror})") from None
        except ValueError as err:  # not JSON, or not UTF-8
            raise UsageError(
                f"{args.config}: not a valid JSON text ({str(err).splitlines()[0][:80]}); "
                "give a config.json written by histoboost"
            ) from None
    overrides: dict[str, Any] = {
        "seed": args.seed,
        "preprocess.scale": args.scale,
        "preprocess.target_mpp": args.mpp,
        "preprocess.stain.method": args.stain,
        "preprocess.stain.on_failure": args.stain_fallback,
        "augment.n_augment": args.augmentations,
        "augment.n_crops": args.crops,
        "augment.crop_size": args.crop_size,
        "features.weights": getattr(args, "weights", None),
        "features.mode": getattr(args, "mode", None),
        "features.stages": getattr(args, "stages", None),
        "features.crop_pooling": getattr(args, "pooling", None),
        "features.descriptor": getattr(args, "descriptor", None),
        "evaluate.split_by": getattr(args, "split_by", None),
        "evaluate.folds": getattr(args, "folds", None),
        "classifier.n_estimators": getattr(args, "rounds", None),
        "classifier.class_weight": getattr(args, "class_weight", None),
        "classifier.early_stopping_rounds": getattr(args, "early_stopping", None),
        "classifier.kind": getattr(args, "classifier", None),
        "classifier.classes": getattr(args, "classes", None),
        "classifier.target_sensitivity": getattr(args, "target_sensitivity", None),
        "classifier.calibrate": getattr(args, "calibrate", None),
        "classifier.inner_folds": getattr(args, "inner_folds", None),
        "classifier.refer_below_agreement": getattr(args, "refer_below", None),
        "finetune.enabled": getattr(args, "finetune", None),
        "finetune.epochs": getattr(args, "epochs", None),
        "finetune.learning_rate": getattr(args, "lr", None),
        "finetune.freeze_stages": getattr(args, "freeze_stages", None),
        "finetune.crops_per_image": getattr(args, "crops_per_image", None),
        "finetune.crop_size": getattr(args, "finetune_crop_size", None),
        "finetune.batch_size": getattr(args, "finetune_batch_size", None),
        "finetune.patience": getattr(args, "patience", None),
    }
    backbones = getattr(args, "backbone", None) or (
        None if args.config else _foundation_in(getattr(args, "weights", None))
    )
    overrides["features.backbones"] = backbones
    if args.stain is not None and args.stain_reference is None:
        overrides["preprocess.stain.target"] = None
        overrides["preprocess.stain.reference_image_sha256"] = None
    try:
        config = build_config(args.preset or default_preset(backbones), file_data, overrides)
    except ConfigError as err:
        source = f"{args.config}: " if args.config else ""
        raise ConfigError(f"{source}{err}") from None
    if args.stain_reference is not None:
        config = _with_stain_reference(config, args.stain_reference)
    decision = getattr(args, "decision", None)
    if decision == "argmax":
        if args.target_sensitivity is not None:
            raise UsageError("--decision argmax takes no --target-sensitivity: give one or the other")
        config = config.merged({"classifier.target_sensitivity": None})
    elif decision == "operating-point" and config.classifier.target_sensitivity is None:  # e.g. an older config.json
        config = config.merged({"classifier.target_sensitivity": ClassifierConfig().target_sensitivity})
    return config


def _foundation_in(weights: list[str] | None) -> list[str] | None:
    """The foundation models `--weights NAME=PATH` names, when every item names one: `--weights uni=PATH`
    alone is enough to use UNI (weights for CNNs leave the backbones to --backbone and the preset)."""
    names = [item.partition("=")[0] for item in weights or ()]
    return names if names and all(map(is_foundation, names)) else None


def default_preset(backbones: list[str] | None) -> str:
    """`foundation` when every chosen backbone is a foundation model, else the seed study's `paper`."""
    return "foundation" if backbones and all(map(is_foundation, backbones)) else "paper"


def _with_stain_reference(config: Config, path: Path) -> Config:
    method = config.preprocess.stain.method
    if method == "none":
        raise UsageError("--stain-reference needs --stain macenko or reinhard")
    try:
        data = path.read_bytes()
        rgb = read_image(path, config.preprocess.scale)
    except OSError as err:
        raise UsageError(f"{path}: cannot read the stain reference image ({err}); give an RGB H&E image") from None
    try:
        target = fit_reference(method, rgb)
    except StainError as err:
        raise UsageError(f"{path}: {err}; choose a reference image with more stained tissue") from None
    return config.merged(
        {
            "preprocess.stain.target": list(target),
            "preprocess.stain.reference_image_sha256": hashlib.sha256(data).hexdigest(),
        }
    )


def read_data(args: argparse.Namespace, config: Config):
    """The validated manifest of `args.data` and its warnings; its errors raise DataError."""
    return load_manifest(
        args.data,
        config.preprocess,
        config.augment.crop_size,
        label_map(args),
        threads=args.threads,
        progress=progress_of(args),
    )


def load_data(args: argparse.Namespace, config: Config):
    """`read_data`'s manifest, its warnings printed."""
    manifest, problems = read_data(args, config)
    print_problems(problems)
    return manifest


def label_map(args: argparse.Namespace) -> dict[str, int] | None:
    try:
        return parse_label_map(args.label_map) if args.label_map else None
    except DataError as err:
        raise UsageError(str(err)) from None


def mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def device_of(name: str) -> str:
    """`cpu`, `cuda` or `cuda:N` that exists on this machine."""
    import re

    import torch

    if not re.fullmatch(r"cpu|cuda(:\d+)?", name):
        raise UsageError(f"--device {name}: use cpu, cuda or cuda:N")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return name


def progress_of(args: argparse.Namespace) -> Progress:
    """What --quiet and --progress ask for (`histoboost.progress`)."""
    return False if args.quiet else "bars" if args.progress else True


def runtime_of(args: argparse.Namespace, engine=None):
    """The Runtime the flags ask for (device checked here), with the engine opened by `engine_of` when given."""
    from ..runtime import Runtime

    return Runtime(
        device_of(getattr(args, "device", "cpu")),
        getattr(args, "batch_size", None),
        getattr(args, "readers", 2),
        progress_of(args),
        getattr(args, "cache_dir", None),
        engine,
        not getattr(args, "no_cache", False),
    )


def print_problems(problems: tuple[Problem, ...] | list[Problem]) -> None:
    for problem in sorted(problems, key=lambda p: (p.severity != "error", str(p.path))):
        print(problem, file=sys.stderr)
