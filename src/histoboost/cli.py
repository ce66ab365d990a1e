"""The `histoboost` command line: parses flags into a Config and calls the library; holds no logic."""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from PIL import Image

from . import __version__
from .config import PRESETS, Config, ConfigError, HistoboostError, build_config
from .data import DataError, Problem, load_manifest, parse_label_map, read_image, write_text_atomic
from .outputs import check_output, spreadsheet_safe, staged_folder
from .stain import StainError, check_images, fit_reference

# torch, timm and the feature code load only for the commands that need them, so that `--help`,
# `inspect` and bad-flag errors answer at once.


class UsageError(HistoboostError):
    """A flag or file given on the command line cannot be used."""


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if hasattr(sys.stdout, "reconfigure"):  # file names that are not UTF-8 are printed back as they are
        sys.stdout.reconfigure(errors="surrogateescape")
    # Oversized images are reported per file by validation; Pillow's own warning would only repeat it.
    warnings.simplefilter("ignore", category=Image.DecompressionBombWarning)
    try:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        return args.run(args)
    except OSError as err:  # disk full, read-only folder, a file gone: one line; --debug shows where
        if args.debug:
            raise
        where = f"{err.filename}: " if err.filename else ""
        print(f"histoboost: error: {where}{err.strerror or err} (what was already computed is kept; fix it and "
              "rerun to resume; --debug shows the traceback)", file=sys.stderr)
        return 1
    except DataError as err:
        _print_problems(err.problems)
        print(f"histoboost: error: {err}", file=sys.stderr)
        return 1
    except HistoboostError as err:
        print(f"histoboost: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("histoboost: interrupted", file=sys.stderr)
        return 130


class _Parser(argparse.ArgumentParser):
    """argparse, with a bad flag answered in one line (exit status 2) instead of the whole usage."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _count(lowest: int):
    """argparse type: an integer of at least `lowest` (a bad value exits with status 2)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < lowest:
            raise argparse.ArgumentTypeError(f"{value} is below the smallest allowed, {lowest}")
        return value
    return parse


def _number(check, wanted: str):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not (math.isfinite(value) and check(value)):
            raise argparse.ArgumentTypeError(f"{text} is not {wanted}")
        return value
    return parse


_positive = _number(lambda v: v > 0, "a positive number")
_non_negative = _number(lambda v: v >= 0, "zero or more")
_share = _number(lambda v: 0 <= v <= 1, "a share between 0 and 1")


def _sha256(text: str) -> str:
    if len(text) != 64 or any(c not in "0123456789abcdef" for c in text.lower()):
        raise argparse.ArgumentTypeError(f"{text!r} is not a sha256 (64 hex digits, as histoboost train prints it)")
    return text.lower()


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("global options")
    group.add_argument("--seed", type=_count(0), help="random seed for augmentations, crops, folds and models")
    group.add_argument("--threads", type=_count(1), help="CPU threads to use (default: all cores)")
    group.add_argument("--quiet", action="store_true", help="no progress bars, only results and problems")
    group.add_argument("--debug", action="store_true", help="show the traceback of an unexpected system error")

    protocol = argparse.ArgumentParser(add_help=False)
    group = protocol.add_argument_group("protocol (precedence: --preset < --config file < these flags)")
    group.add_argument("--preset", choices=sorted(PRESETS), default="paper", help="starting settings (default: paper)")
    group.add_argument("--config", type=Path, metavar="FILE", help="a saved config.json to rerun")
    group.add_argument("--scale", type=_positive, help="working scale factor (paper: 0.5)")
    group.add_argument("--mpp", type=_positive, help="target µm/px, used where the file states its resolution")
    group.add_argument("--stain", choices=["macenko", "reinhard", "none"], help="stain normalisation")
    group.add_argument("--stain-fallback", choices=["reinhard", "none", "keep"],
                       help="for an image whose normalisation fails the quality check: Reinhard, then none "
                       "(default); none; or keep the failed output")
    group.add_argument("--stain-reference", type=Path, metavar="IMAGE",
                       help="fit the stain reference to this image instead of the published default")
    group.add_argument("--augmentations", "-A", type=_count(1), help="colour augmentations per image")
    group.add_argument("--crops", "-C", type=_count(1), help="crops per augmentation")
    group.add_argument("--crop-size", type=_count(1), help="crop side in pixels at the working resolution")
    group.add_argument("--label-map", metavar="LABEL=G,...",
                       help="extra label-to-group mapping, e.g. 'Fibroadenoma=0,DCIS=1'")

    features = argparse.ArgumentParser(add_help=False)
    group = features.add_argument_group("features")
    group.add_argument("--backbone", action="append", metavar="NAME",
                       help="CNN (repeatable): resnet50, xception, efficientnet_lite0/1/2 (offline) or a timm name")
    group.add_argument("--weights", action="append", metavar="[NAME=]PATH",
                       help="local weights file (safetensors or torch state dict) instead of downloading")
    group.add_argument("--mode", choices=["shared", "exact"], help="shared feature map (fast, default) or CNN per crop")
    group.add_argument("--stages", type=_count(1), help="feature maps used: 1 = final (default); k = also the k-1 stages "
                       "before the last")
    group.add_argument("--pooling", choices=["mean", "max", "gem"], help="how crop descriptors are pooled")
    group.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    group.add_argument("--batch-size", type=_count(1),
                       help="augmentations (or crops) per CNN batch (default: 8 on CPU, 48 on CUDA)")
    group.add_argument("--cache-dir", type=Path, help="feature store (default: $HISTOBOOST_CACHE or ~/.cache/histoboost)")

    parser = _Parser(
        prog="histoboost",
        description="Classify H&E breast histology images (normal/benign, in-situ, invasive) with frozen CNN "
        "features and XGBoost. Research use only; not for diagnosis.",
    )
    parser.add_argument("--version", action="version", version=f"histoboost {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)

    inspect = commands.add_parser(
        "inspect", parents=[common, protocol], help="check a data set and summarise it",
        description="Read and validate every image, then print counts per label, group and patient, image sizes, "
        "every problem (one line per file) and stain-normalisation warnings. Writes no file.",
    )
    inspect.add_argument("data", type=Path, help="data folder (class sub-folders, manifest.csv, BACH, BreakHis) or CSV")
    inspect.add_argument("--no-stain-check", action="store_true", help="skip normalising every image")
    inspect.add_argument("--json", action="store_true", help="print the summary as JSON")
    inspect.set_defaults(run=_inspect)

    extract = commands.add_parser(
        "extract", parents=[common, protocol, features], help="compute and cache CNN features",
        description="Describe every image's augmented crops with each backbone and keep them in the feature store "
        "(one file per image; interrupted runs resume; nothing already computed is recomputed).",
    )
    extract.add_argument("data", type=Path, help="data folder or CSV manifest")
    extract.add_argument("--out", type=Path, help="run folder for config.json, manifest.csv, extract.json "
                         "(default: runs/extract-DATE-TIME)")
    extract.add_argument("--force", action="store_true", help="replace --out if it exists")
    extract.add_argument("--keep-crops", action="store_true", help="also store per-crop descriptors (float16)")
    extract.set_defaults(run=_extract)

    evaluation = argparse.ArgumentParser(add_help=False)
    group = evaluation.add_argument_group("evaluation")
    group.add_argument("--split-by", metavar="UNIT",
                       help="image, patient (default when the data has patient ids) or a manifest column, e.g. id_block")
    group.add_argument("--folds", type=_count(2), help="cross-validation folds (paper: 6)")
    group.add_argument("--descriptor", choices=["crops", "whole", "crops+whole"], help="what the classifier sees")
    group.add_argument("--rounds", type=_count(1), help="XGBoost boosting rounds")
    group.add_argument("--class-weight", choices=["none", "balanced"], help="weigh classes equally in training")
    group.add_argument("--early-stopping", type=_count(0), metavar="ROUNDS",
                       help="stop boosting after ROUNDS without improvement on a grouped inner split")
    group.add_argument("--classifier", choices=["xgboost", "logistic"],
                       help="XGBoost (the seed study's, default) or standardised logistic regression")
    group.add_argument("--target-sensitivity", type=_share, metavar="S",
                       help="call carcinoma above the mean p(carcinoma) threshold that reaches sensitivity S on "
                       "inner folds of the training data, e.g. 0.95 (default: majority vote)")
    group.add_argument("--calibrate", action="store_true", default=None,
                       help="temperature-scale the probabilities, fitted on inner folds of the training data")
    group.add_argument("--inner-folds", type=_count(2), help="inner folds for the threshold and calibration (default 4)")
    group.add_argument("--refer-below", type=_share, metavar="SHARE",
                       help="refer an image to a pathologist when fewer than SHARE of its augmentations agree "
                       "with the decision, e.g. 0.8 (stain-QC failures are always referred)")

    tuning = argparse.ArgumentParser(add_help=False)
    group = tuning.add_argument_group("fine-tuning (see histoboost finetune --help)")
    group.add_argument("--epochs", type=_count(1), help="fine-tuning epochs at most (default 8; early stopping may end sooner)")
    group.add_argument("--lr", type=_positive, help="backbone learning rate (default 3e-4; the new head: 10x)")
    group.add_argument("--freeze-stages", type=_count(0), metavar="K",
                       help="keep the stem and the first K feature levels at their ImageNet weights (default 0)")
    group.add_argument("--crops-per-image", type=_count(1), help="random training crops per image and epoch (default 8)")
    group.add_argument("--finetune-crop-size", type=_count(1), metavar="PX",
                       help="training crop side at the working resolution (default: --crop-size)")
    group.add_argument("--finetune-batch-size", type=_count(2), metavar="N", help="crops per training step (default 16)")
    group.add_argument("--patience", type=_count(1), help="epochs without a better validation loss before stopping (default 3)")

    finetune = commands.add_parser(
        "finetune", parents=[common, protocol, tuning], help="fine-tune a backbone on labelled H&E images",
        description="Train a backbone from its ImageNet weights on stain-normalised, colour-augmented random crops "
        "of the images (3-class head, AdamW, warm-up + cosine, label smoothing, class balancing), stopping early on a "
        "validation part split off by whole split units. Writes WEIGHTS (safetensors) and WEIGHTS.json (its card); "
        "use them with --backbone NAME --weights WEIGHTS. Interrupted runs resume from their last epoch.",
    )
    finetune.add_argument("data", type=Path, help="data folder or CSV manifest")
    finetune.add_argument("--backbone", required=True, metavar="NAME",
                          help="resnet50, xception, efficientnet_lite0/1/2 (offline) or a timm name")
    finetune.add_argument("--weights", metavar="PATH", help="start from this local weights file instead of ImageNet's")
    finetune.add_argument("--out", type=Path, required=True, metavar="WEIGHTS", help="output .safetensors file")
    finetune.add_argument("--split-by", metavar="UNIT",
                          help="unit the validation part is split by: patient (default where known), image or a "
                          "manifest column, e.g. id_block")
    finetune.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    finetune.set_defaults(run=_finetune)

    cv = commands.add_parser(
        "cv", parents=[common, protocol, features, evaluation, tuning], help="cross-validate and write a report",
        description="Extract what the feature store lacks, cross-validate each backbone and their combinations on "
        "the same grouped folds, and write metrics.json, predictions.csv and report.html.",
    )
    cv.add_argument("data", type=Path, help="data folder or CSV manifest")
    cv.add_argument("--out", type=Path, help="run folder (default: runs/cv-DATE-TIME)")
    cv.add_argument("--force", action="store_true", help="replace --out if it exists (only once the run succeeds)")
    cv.add_argument("--finetune", action="store_true", default=None,
                    help="fine-tune each backbone inside every outer fold on that fold's training images only, "
                    "then extract features with it (no test image ever reaches fine-tuning)")
    cv.add_argument("--compare-split", metavar="UNIT", default="auto",
                    help="also cross-validate split by UNIT and show both side by side (default auto: image beside "
                    "patient or a column, patient beside image where known; none to skip)")
    cv.set_defaults(run=_cv)

    report = commands.add_parser("report", parents=[common], help="rebuild a run's metrics and report.html",
                                 description="Recompute metrics.json, predictions.csv and report.html from a run "
                                 "folder's cv_results.npz and config.json.")
    report.add_argument("run_dir", type=Path, metavar="RUN", help="a folder written by histoboost cv")
    report.set_defaults(run=_report)

    train = commands.add_parser(
        "train", parents=[common, protocol, features, evaluation, tuning], help="train on all images and save a bundle",
        description="Train the classifier on every image (features from the store, extracted where missing) and "
        "write a portable bundle: XGBoost's native model, bundle.json with config and checksums. No pickle.",
    )
    train.add_argument("data", type=Path, help="data folder or CSV manifest")
    train.add_argument("--out", type=Path, required=True, metavar="MODEL", help="bundle folder, or MODEL.zip")
    train.add_argument("--sign", type=Path, metavar="KEY",
                       help="sign the bundle with this Ed25519 private key (histoboost keygen): writes MODEL.sig")
    train.add_argument("--finetune", action="store_true", default=None,
                       help="fine-tune each backbone on the training images first; the bundle carries the weights")
    train.set_defaults(run=_train)


    trust = argparse.ArgumentParser(add_help=False)
    group = trust.add_argument_group("trusting a bundle (docs/security.md)")
    group.add_argument("--expect-sha256", type=_sha256, metavar="HASH",
                       help="refuse the bundle unless its sha256 (as train printed it) is HASH")
    group.add_argument("--trusted-key", type=Path, metavar="PUB",
                       help="refuse the bundle unless MODEL.sig is its valid signature by this Ed25519 public key")

    predict = commands.add_parser(
        "predict", parents=[common, trust], help="classify new images with a bundle",
        description="Apply the bundle's preprocessing and test-time augmentations to each image and vote. Images "
        "that cannot be read are reported one line each; the others are still predicted (exit status 1).",
    )
    predict.add_argument("model", type=Path, metavar="MODEL", help="bundle folder or .zip from histoboost train")
    predict.add_argument("images", type=Path, nargs="+", metavar="IMAGE_OR_DIR")
    predict.add_argument("--out", type=Path, help="predictions file, .csv or .json (default: print CSV)")
    predict.add_argument("--force", action="store_true", help="replace --out if it exists")
    predict.add_argument("--overlay", type=Path, metavar="DIR", help="write a heat-map PNG per image here")
    predict.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    predict.add_argument("--batch-size", type=_count(1), help="augmentations per CNN batch (default: 8 on CPU, 48 on CUDA)")
    predict.set_defaults(run=_predict)

    evaluate = commands.add_parser(
        "evaluate", parents=[common, trust], help="check a bundle on a labelled set",
        description="Predict a labelled data set with a trained bundle and write the same metrics and report as cv: "
        "how to check a model on new patients.",
    )
    evaluate.add_argument("model", type=Path, metavar="MODEL")
    evaluate.add_argument("data", type=Path, help="labelled data folder or CSV manifest")
    evaluate.add_argument("--out", type=Path, help="run folder (default: runs/evaluate-DATE-TIME)")
    evaluate.add_argument("--force", action="store_true", help="replace --out if it exists (only once the run succeeds)")
    evaluate.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    evaluate.add_argument("--label-map", metavar="LABEL=G,...", help="extra label-to-group mapping")
    evaluate.set_defaults(run=_evaluate)

    demo = commands.add_parser(
        "demo", parents=[common], help="the whole pipeline on a small synthetic data set, offline",
        description="Generate a small, deterministic, synthetic H&E-like data set (not real tissue), then run cv "
        "with the offline backbone and the quick preset.",
    )
    demo.add_argument("--out", type=Path, default=Path("runs/demo"), help="run folder (default: runs/demo)")
    demo.add_argument("--cache-dir", type=Path, help="feature store (default: $HISTOBOOST_CACHE or ~/.cache/histoboost)")
    demo.set_defaults(run=_demo)

    keygen = commands.add_parser(
        "keygen", parents=[common], help="make an Ed25519 key pair to sign bundles",
        description="Write KEY (private, PKCS8 PEM, readable by you only) and KEY.pub.pem (give it to the people "
        "who use your bundles: predict --trusted-key). The same files as openssl genpkey -algorithm ed25519.",
    )
    keygen.add_argument("key", type=Path, metavar="KEY", help="private key file to write, e.g. histoboost-key.pem")
    keygen.set_defaults(run=_keygen)

    cache = commands.add_parser("cache", parents=[common], help="list or prune the feature store")
    cache.add_argument("action", choices=["list", "prune"])
    cache.add_argument("--cache-dir", type=Path, help="feature store (default: $HISTOBOOST_CACHE or ~/.cache/histoboost)")
    cache.add_argument("--key", action="append", default=[], help="prune: this store (repeatable)")
    cache.add_argument("--older-than", type=_non_negative, metavar="DAYS", help="prune: stores unused for DAYS days")
    cache.add_argument("--all", action="store_true", help="prune: every store")
    cache.set_defaults(run=_cache)
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    """Preset < config file < flags; a stain reference image is fitted here and stored as numbers."""
    file_data = None
    if args.config is not None:
        try:
            file_data = json.loads(args.config.read_text())
        except OSError as err:
            raise UsageError(f"{args.config}: cannot read the config file ({err.strerror})") from None
        except json.JSONDecodeError as err:
            raise UsageError(f"{args.config}: not valid JSON ({err.msg}, line {err.lineno}); "
                             "give a config.json written by histoboost") from None
    overrides: dict[str, Any] = {
        "seed": args.seed,
        "preprocess.scale": args.scale,
        "preprocess.target_mpp": args.mpp,
        "preprocess.stain.method": args.stain,
        "preprocess.stain.on_failure": args.stain_fallback,
        "augment.n_augment": args.augmentations,
        "augment.n_crops": args.crops,
        "augment.crop_size": args.crop_size,
        "features.backbones": getattr(args, "backbone", None),
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
    if args.stain is not None and args.stain_reference is None:
        overrides["preprocess.stain.target"] = None
        overrides["preprocess.stain.reference_image_sha256"] = None
    try:
        config = build_config(args.preset, file_data, overrides)
    except ConfigError as err:
        source = f"{args.config}: " if args.config else ""
        raise ConfigError(f"{source}{err}") from None
    if args.stain_reference is not None:
        config = _with_stain_reference(config, args.stain_reference)
    return config


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
    return config.merged({"preprocess.stain.target": list(target),
                          "preprocess.stain.reference_image_sha256": hashlib.sha256(data).hexdigest()})


def _inspect(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    try:
        manifest, problems = load_manifest(args.data, config.preprocess, config.augment.crop_size, _label_map(args),
                                           threads=args.threads, progress=not args.quiet)
    except DataError as err:
        if not args.json:
            raise
        print(json.dumps({"root": str(args.data), "usable": False, "error": str(err),
                          "problems": [str(p) for p in err.problems]}, indent=2))
        return 1
    summary = manifest.summary()
    if not args.no_stain_check and config.preprocess.stain.method != "none":
        qcs, stain_problems = check_images(manifest.records, config.preprocess, args.threads, not args.quiet)
        problems += stain_problems
        summary["stain"] = {"method": config.preprocess.stain.method, "checked": len(manifest),
                            "flagged": sum(1 for qc in qcs.values() if not qc.ok),
                            "failed": sum(1 for p in stain_problems if p.severity == "error")}
    summary["usable"] = True
    summary["problems"] = [str(p) for p in problems]
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        _print_summary(summary, config)
        _print_problems(problems)
    return 1 if any(p.severity == "error" for p in problems) else 0


def _extract(args: argparse.Namespace) -> int:
    from .backbones import create_backbone
    from .features import default_cache_dir, extract_features

    config = config_from_args(args)
    device = _device(args.device)
    run = check_output(args.out or Path("runs") / time.strftime("extract-%Y%m%d-%H%M%S"), args.force)
    manifest = _load_data(args, config)
    cache_dir = args.cache_dir or default_cache_dir()
    report: dict[str, Any] = {"data": str(args.data), "images": len(manifest), "cache_dir": str(cache_dir),
                              "backbones": {}}
    failed = False
    for name in config.features.backbones:
        backbone = create_backbone(name, config.weights_for(name), device)
        result = extract_features(manifest, config, backbone, cache_dir, device, _batch_size(args, device),
                                  args.keep_crops, progress=not args.quiet)
        _print_problems(result.problems)
        failed |= bool(result.problems)
        rate = f" at {result.images_per_second:.2f} img/s" if result.computed else ""
        print(f"{name}: {len(manifest)} images: {result.computed} extracted{rate}, {result.reused} reused, "
              f"{len(result.problems)} failed -> {result.store.root}")
        report["backbones"][name] = {**backbone.identity, "store": str(result.store.root),
                                     "computed": result.computed, "reused": result.reused,
                                     "failed": [str(p) for p in result.problems], "seconds": round(result.seconds, 2),
                                     "stain_flagged": sum(1 for qc in result.stain_qc.values() if not qc.ok)}
    provenance = {"backbones": {n: {k: b[k] for k in ("weights_sha256", "weights_source", "store")}
                                for n, b in report["backbones"].items()}}
    with staged_folder(run, args.force) as staging:
        write_text_atomic(staging / "config.json", config.to_json(provenance))
        manifest.to_csv(staging / "manifest.csv")
        write_text_atomic(staging / "extract.json", json.dumps(report, indent=2) + "\n")
    print(f"run folder: {run}")
    return 1 if failed else 0


def _finetune(args: argparse.Namespace) -> int:
    from .evaluate import split_units
    from .finetune import finetune, prepare_training_images

    backbone = args.backbone
    args.backbone, args.weights = [backbone], [args.weights] if args.weights else None
    config = config_from_args(args)
    device = _device(args.device)
    if args.out.suffix != ".safetensors":
        raise UsageError(f"--out {args.out}: give a .safetensors file name")
    manifest = _load_data(args, config)
    split_by, units = split_units(manifest, config.evaluate.split_by)
    if config.evaluate.split_by is None and not manifest.has_patients:
        print("warning: no patient ids: the validation part is split by image, which overstates accuracy on new "
              "patients (use --split-by with a patient proxy such as id_block)", file=sys.stderr)
    images = prepare_training_images(manifest, config, units, args.threads, progress=not args.quiet)
    result = finetune(images, config, backbone, args.out, config.weights_for(backbone), device, not args.quiet)
    card = result.card
    best = next(h for h in card["history"] if h["epoch"] == card["best_epoch"])
    done = "already done with these settings and images, reused" if result.reused else (
        f"{card['epochs_run']} epoch(s){' (stopped early)' if card['stopped_early'] else ''}")
    print(f"{backbone} fine-tuned on {len(card['data']['train_images'])} images, validated on "
          f"{len(card['data']['validation_images'])} (split by {split_by}): {done}; best epoch {card['best_epoch']}: "
          f"validation accuracy {best['val_accuracy']:.1%}, loss {best['val_loss']:.3f}")
    print(f"weights: {result.weights}\ncard:    {result.card_path}\nuse:     --backbone {backbone} --weights {result.weights}")
    return 0


def _cv(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    out = check_output(args.out or Path("runs") / time.strftime("cv-%Y%m%d-%H%M%S"), args.force)
    manifest = _load_data(args, config)
    _check_split(manifest, config)
    return _run_cv(manifest, config, out, args)


def _run_cv(manifest, config: Config, out: Path, args: argparse.Namespace) -> int:
    from .evaluate import cross_validate
    from .report import accuracy_table, write_outputs

    device = _device(getattr(args, "device", "cpu"))
    run = cross_validate(manifest, config, args.cache_dir, device, _batch_size(args, device),
                         progress=not args.quiet, compare_split=getattr(args, "compare_split", "auto"))
    for note in run.plan.warnings:
        print(f"warning: {note}", file=sys.stderr)
    provenance = {"backbones": run.extraction, "data": str(manifest.root)}
    with staged_folder(out, args.force) as staging:
        manifest.to_csv(staging / "manifest.csv")
        report = out / write_outputs(run, staging, provenance).relative_to(staging)
    print(f"{len(manifest)} images, {run.plan.n_folds}-fold cross-validation split by {run.plan.split_by}, "
          f"{config.augment.n_augment} augmentations per image"
          + (", backbones fine-tuned inside each fold on its training images only" if run.finetuned else ""))
    print(accuracy_table(run))
    print(f"report: {report}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from .evaluate import CVRun
    from .report import accuracy_table, write_outputs

    results, config_file = args.run_dir / "cv_results.npz", args.run_dir / "config.json"
    if not results.is_file() or not config_file.is_file():
        raise UsageError(f"{args.run_dir}: no cv_results.npz and config.json here; give a folder written by histoboost cv")
    try:
        data = json.loads(config_file.read_text())
        config = Config.from_dict(data)
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, TypeError, ConfigError) as err:
        raise UsageError(f"{config_file}: damaged or not written by histoboost ({str(err)[:120]}); rerun "
                         "histoboost cv") from None
    run = CVRun.load(results, config)
    run.evaluate()
    # Rebuilt beside the run, then swapped in: an interrupted rebuild leaves the run as it was.
    with staged_folder(args.run_dir, force=True) as staging:
        shutil.copytree(args.run_dir, staging, dirs_exist_ok=True)
        report = args.run_dir / write_outputs(run, staging, data.get("provenance")).relative_to(staging)
    print(accuracy_table(run))
    print(f"report: {report}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from .bundle import train_bundle

    from .bundle import signature_path
    from .signing import private_key, sign

    config = config_from_args(args)
    check_output(args.out, folder=args.out.suffix != ".zip")
    key = private_key(args.sign) if args.sign is not None else None  # a bad key is found now, not after training
    manifest = _load_data(args, config)
    _check_split(manifest, config)
    device = _device(args.device)
    bundle = train_bundle(manifest, config, args.cache_dir, device, _batch_size(args, device), progress=not args.quiet)
    path = bundle.save(args.out)
    counts = ", ".join(f"{k} {v}" for k, v in bundle.meta["training_data"]["per_group"].items())
    print(f"trained on {len(manifest)} images ({counts}) with {', '.join(config.features.backbones)}: {path}")
    print(f"bundle sha256: {bundle.sha256}  (its identity: check it with predict --expect-sha256)")
    if key is not None:
        from .bundle import META_FILE, read_members

        print(f"signature: {sign(read_members(path)[META_FILE], key, signature_path(path))}")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from .bundle import Bundle

    device = _device(args.device)
    if args.out is not None:  # checked before any work
        check_output(args.out, args.force, folder=False)
    if args.overlay is not None and args.overlay.exists() and not args.overlay.is_dir():
        raise UsageError(f"--overlay {args.overlay} is a file: give a folder")
    bundle = Bundle.load(args.model, device, args.expect_sha256, args.trusted_key)
    records, problems = bundle.predict(args.images, device, _batch_size(args, device), progress=not args.quiet,
                                       overlay_dir=args.overlay)
    _print_problems(problems)
    if not records:
        print("no image could be predicted; nothing written", file=sys.stderr)
        return 1
    text = _records_text(records, args.out.suffix.lower() if args.out else ".csv")
    if args.out:
        write_text_atomic(args.out, text)
        print(f"{len(records)} image(s) predicted -> {args.out}" + (f"; overlays in {args.overlay}" if args.overlay else ""))
    else:
        print(text, end="")
    return 1 if any(p.severity == "error" for p in problems) else 0


def _records_text(records: list[dict], suffix: str) -> str:
    if suffix == ".json":
        return json.dumps(records, indent=2) + "\n"
    import csv
    import io

    buffer = io.StringIO()
    if records:
        writer = csv.DictWriter(buffer, fieldnames=list(records[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: spreadsheet_safe(v) for k, v in r.items()} for r in records)
    return buffer.getvalue()


def _evaluate(args: argparse.Namespace) -> int:
    from .bundle import Bundle, evaluate_bundle
    from .report import accuracy_table, write_outputs

    device = _device(args.device)
    out = check_output(args.out or Path("runs") / time.strftime("evaluate-%Y%m%d-%H%M%S"), args.force)
    bundle = Bundle.load(args.model, device, args.expect_sha256, args.trusted_key)
    config = bundle.config
    manifest = _load_data(args, config)
    run = evaluate_bundle(bundle, manifest, device, progress=not args.quiet)
    with staged_folder(out, args.force) as staging:
        manifest.to_csv(staging / "manifest.csv")
        report = out / write_outputs(run, staging, {"bundle": str(args.model), "bundle_sha256": bundle.sha256,
                                                    "data": str(manifest.root)}).relative_to(staging)
    print(f"{len(manifest)} images of a held-out set, predicted by {args.model}")
    print(accuracy_table(run))
    print(f"report: {report}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import DEMO_CONFIG, make_demo_data

    data_dir = _mkdir(args.out) / "data"  # regenerated, byte for byte the same, on every run
    make_demo_data(data_dir)
    print(f"synthetic H&E-like demo data (not real tissue): {data_dir}")
    config = build_config("quick", DEMO_CONFIG, {"seed": args.seed})
    manifest, problems = load_manifest(data_dir, config.preprocess, config.augment.crop_size, threads=args.threads,
                                       progress=not args.quiet)
    _print_problems(problems)
    args.device, args.batch_size, args.force = "cpu", None, True
    return _run_cv(manifest, config, args.out / "cv", args)


def _load_data(args: argparse.Namespace, config: Config):
    """The validated manifest of `args.data`; its warnings are printed, its errors raise DataError."""
    manifest, problems = load_manifest(args.data, config.preprocess, config.augment.crop_size, _label_map(args),
                                       threads=args.threads, progress=not args.quiet)
    _print_problems(problems)
    return manifest


def _label_map(args: argparse.Namespace) -> dict[str, int] | None:
    try:
        return parse_label_map(args.label_map) if args.label_map else None
    except DataError as err:
        raise UsageError(str(err)) from None


def _check_split(manifest, config: Config) -> None:
    """--split-by names a unit the data has: checked before any extraction."""
    from .evaluate import split_units

    try:
        split_units(manifest, config.evaluate.split_by)
    except DataError as err:
        raise UsageError(f"--split-by {config.evaluate.split_by}: {err}") from None


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _keygen(args: argparse.Namespace) -> int:
    from .signing import generate_key

    private, public = generate_key(args.key)
    print(f"private key: {private} (keep it secret; sign with train --sign {private})\n"
          f"public key:  {public} (share it; users check with predict --trusted-key {public})")
    return 0


def _cache(args: argparse.Namespace) -> int:
    from .features import default_cache_dir, list_stores, prune_stores

    cache_dir = args.cache_dir or default_cache_dir()
    if args.action == "list":
        stores = list_stores(cache_dir)
        if not stores:
            print(f"no feature stores under {cache_dir}")
        for s in stores:
            aug = s["settings"].get("augment", {})
            print(f"{s['key']}  {s['backbone']:<20} {s['images']:>6} images  {s['bytes'] / 2**20:8.1f} MiB  "
                  f"A={aug.get('n_augment')} C={aug.get('n_crops')} crop={aug.get('crop_size')}  "
                  f"last used {s['last_used']}")
        return 0
    if not (args.key or args.older_than is not None or args.all):
        raise UsageError("cache prune needs --key KEY, --older-than DAYS or --all")
    removed = prune_stores(cache_dir, args.key, args.older_than, args.all)
    print(f"removed {len(removed)} feature store(s){': ' + ', '.join(removed) if removed else ''}")
    return 0


def _device(name: str) -> str:
    import torch

    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    if not (name == "cpu" or name.startswith("cuda")):
        raise UsageError(f"--device {name}: use cpu or cuda")
    return name


def _batch_size(args: argparse.Namespace, device: str) -> int:
    """Augmentations per CNN batch: the flag, else what fills the device without waste (8 keeps two CPU
    cores busy, 48 an H100; one image's augmentations are one batch unit, so A caps it)."""
    return getattr(args, "batch_size", None) or (8 if device == "cpu" else 48)


def _print_summary(summary: dict, config: Config) -> None:
    def counts(mapping: dict) -> str:
        return ", ".join(f"{k} {v}" for k, v in mapping.items())

    print(f"data:       {summary['root']} ({summary['layout']} layout, {summary['images']} usable images)")
    print(f"per label:  {counts(summary['per_label'])}")
    print(f"per group:  {counts(summary['per_group'])}")
    if summary["patients"]:
        print(f"patients:   {summary['patients']} ({summary['images_without_patient']} images without one)")
    else:
        print("patients:   none recorded: cross-validation split by image overstates accuracy on new patients")
    print(f"sizes:      {counts(summary['sizes'])}")
    pre = config.preprocess
    target = f"target {pre.target_mpp} µm/px where stated, else " if pre.target_mpp else ""
    print(f"resolution: µm/px {counts(summary['mpp'])}; working scale: {target}{pre.scale}")
    stain = summary.get("stain")
    if stain:
        print(f"stain:      {stain['method']}: {stain['checked']} images normalised, {stain['flagged']} flagged, "
              f"{stain['failed']} failed")
    n_err = sum(1 for p in summary["problems"] if p.startswith("error"))
    print(f"problems:   {n_err} error(s), {len(summary['problems']) - n_err} warning(s)")


def _print_problems(problems: tuple[Problem, ...] | list[Problem]) -> None:
    for problem in sorted(problems, key=lambda p: (p.severity != "error", str(p.path))):
        print(problem, file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
