"""The experiment commands: `finetune`, `cv` (cross-validation and its report), `report` (rebuilt from a
run folder) and `demo` (the whole pipeline on synthetic data)."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from ..config import Config, ConfigError, build_config
from ..data import load_manifest
from ..evaluate import check_split
from ..outputs import check_output, check_writable, staged_folder
from .options import (
    Parents,
    UsageError,
    config_from_args,
    device_of,
    engine_of,
    load_data,
    mkdir,
    print_problems,
    progress_of,
    runtime_of,
)


def add_commands(commands, p: Parents) -> None:
    finetune = commands.add_parser(
        "finetune",
        parents=[p.common, p.protocol, p.tuning],
        help="fine-tune a backbone on labelled H&E images",
        description="Train a backbone from its ImageNet weights on stain-normalised, colour-augmented random crops "
        "of the images (3-class head, AdamW, warm-up + cosine, label smoothing, class balancing), stopping early on a "
        "validation part split off by whole split units. Writes WEIGHTS (safetensors) and WEIGHTS.json (its card); "
        "use them with --backbone NAME --weights WEIGHTS. Interrupted runs resume from their last epoch.",
    )
    finetune.add_argument("data", type=Path, help="data folder or CSV manifest")
    finetune.add_argument(
        "--backbone",
        required=True,
        metavar="NAME",
        help="resnet50, xception, efficientnet_lite0/1/2 (offline) or a timm name",
    )
    finetune.add_argument("--weights", metavar="PATH", help="start from this local weights file instead of ImageNet's")
    finetune.add_argument("--out", type=Path, required=True, metavar="WEIGHTS", help="output .safetensors file")
    finetune.add_argument(
        "--split-by",
        metavar="UNIT",
        help="unit the validation part is split by: patient (default where known), image or a "
        "manifest column, e.g. id_block",
    )
    finetune.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    finetune.set_defaults(run=_finetune)

    cv = commands.add_parser(
        "cv",
        parents=[p.common, p.protocol, p.features, p.store, p.evaluation, p.tuning, p.engine],
        help="cross-validate and write a report",
        description="Extract what the feature store lacks, cross-validate each backbone and their combinations on "
        "the same grouped folds, and write metrics.json, predictions.csv and report.html.",
    )
    cv.add_argument("data", type=Path, help="data folder or CSV manifest")
    cv.add_argument("--out", type=Path, help="run folder (default: runs/cv-DATE-TIME)")
    cv.add_argument("--force", action="store_true", help="replace --out if it exists (only once the run succeeds)")
    cv.add_argument(
        "--finetune",
        action="store_true",
        default=None,
        help="fine-tune each backbone inside every outer fold on that fold's training images only, "
        "then extract features with it (no test image ever reaches fine-tuning)",
    )
    cv.add_argument(
        "--compare-split",
        metavar="UNIT",
        default="auto",
        help="also cross-validate split by UNIT and show both side by side (default auto: image beside "
        "patient or a column, patient beside image where known; none to skip)",
    )
    cv.set_defaults(run=_cv)

    report = commands.add_parser(
        "report",
        parents=[p.common],
        help="rebuild a run's metrics and report.html",
        description="Recompute metrics.json, predictions.csv and report.html from a run "
        "folder's cv_results.npz and config.json.",
    )
    report.add_argument("run_dir", type=Path, metavar="RUN", help="a folder written by histoboost cv")
    report.set_defaults(run=_report)

    demo = commands.add_parser(
        "demo",
        parents=[p.common],
        help="the whole pipeline on a small synthetic data set, offline",
        description="Generate a small, deterministic, synthetic H&E-like data set (not real tissue), then run cv "
        "with the offline backbone and the quick preset.",
    )
    demo.add_argument("--out", type=Path, default=Path("runs/demo"), help="run folder (default: runs/demo)")
    demo.add_argument(
        "--cache-dir", type=Path, help="feature store (default: $HISTOBOOST_CACHE or ~/.cache/histoboost)"
    )
    demo.set_defaults(run=_demo)


def _finetune(args: argparse.Namespace) -> int:
    from ..evaluate import split_units
    from ..finetune import finetune, prepare_training_images

    backbone = args.backbone
    args.backbone, args.weights = [backbone], [args.weights] if args.weights else None
    config = config_from_args(args)
    device = device_of(args.device)
    if args.out.suffix != ".safetensors":
        raise UsageError(f"--out {args.out}: give a .safetensors file name")
    check_writable(args.out.parent)
    manifest = load_data(args, config)
    split_by, units = split_units(manifest, config.evaluate.split_by)
    if config.evaluate.split_by is None and not manifest.has_patients:
        print(
            "warning: no patient ids: the validation part is split by image, which overstates accuracy on new "
            "patients (use --split-by with a patient proxy such as id_block)",
            file=sys.stderr,
        )
    images = prepare_training_images(manifest, config, units, args.threads, progress=progress_of(args))
    result = finetune(images, config, backbone, args.out, config.weights_for(backbone), device, progress_of(args))
    card = result.card
    best = next(h for h in card["history"] if h["epoch"] == card["best_epoch"])
    done = (
        "already done with these settings and images, reused"
        if result.reused
        else (f"{card['epochs_run']} epoch(s){' (stopped early)' if card['stopped_early'] else ''}")
    )
    print(
        f"{backbone} fine-tuned on {len(card['data']['train_images'])} images, validated on "
        f"{len(card['data']['validation_images'])} (split by {split_by}): {done}; best epoch {card['best_epoch']}: "
        f"validation accuracy {best['val_accuracy']:.1%}, loss {best['val_loss']:.3f}"
    )
    print(
        f"weights: {result.weights}\ncard:    {result.card_path}\n"
        f"use:     --backbone {backbone} --weights {result.weights}"
    )
    return 0


def _cv(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    out = check_output(args.out or Path("runs") / time.strftime("cv-%Y%m%d-%H%M%S"), args.force)
    manifest = load_data(args, config)
    check_split(manifest, config)  # before any work (and before an engine starts)
    return _run_cv(manifest, config, out, args)


def _run_cv(manifest, config: Config, out: Path, args: argparse.Namespace) -> int:
    from ..evaluate import cross_validate
    from ..report import accuracy_table, write_outputs

    runtime_of(args)  # the device, checked before the engine starts
    with engine_of(args) as engine:
        run = cross_validate(manifest, config, runtime_of(args, engine), getattr(args, "compare_split", "auto"))
    for note in run.plan.warnings:
        print(f"warning: {note}", file=sys.stderr)
    provenance = {"backbones": run.extraction, "data": str(manifest.root)}
    with staged_folder(out, args.force) as staging:
        manifest.to_csv(staging / "manifest.csv")
        report = out / write_outputs(run, staging, provenance).relative_to(staging)
    print(
        f"{len(manifest)} images, {run.plan.n_folds}-fold cross-validation split by {run.plan.split_by}, "
        f"{config.augment.n_augment} augmentations per image"
        + (", backbones fine-tuned inside each fold on its training images only" if run.finetuned else "")
    )
    print(accuracy_table(run))
    print(f"report: {report}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from ..evaluate import CVRun
    from ..report import accuracy_table, write_outputs

    results, config_file = args.run_dir / "cv_results.npz", args.run_dir / "config.json"
    if not results.is_file() or not config_file.is_file():
        raise UsageError(
            f"{args.run_dir}: no cv_results.npz and config.json here; give a folder written by histoboost cv"
        )
    try:
        data = json.loads(config_file.read_text())
        config = Config.from_dict(data)
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, TypeError, ConfigError) as err:
        raise UsageError(
            f"{config_file}: damaged or not written by histoboost ({str(err)[:120]}); rerun histoboost cv"
        ) from None
    check_writable(args.run_dir.parent)  # the report is rebuilt beside the run, then swapped in
    run = CVRun.load(results, config)
    run.evaluate()
    # Rebuilt beside the run, then swapped in: an interrupted rebuild leaves the run as it was.
    with staged_folder(args.run_dir, force=True) as staging:
        shutil.copytree(args.run_dir, staging, dirs_exist_ok=True)
        report = args.run_dir / write_outputs(run, staging, data.get("provenance")).relative_to(staging)
    print(accuracy_table(run))
    print(f"report: {report}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from ..demo import DEMO_CONFIG, make_demo_data

    check_output(args.out / "cv", force=True)  # a previous demo's run is replaced, nothing else
    data_dir = mkdir(args.out) / "data"  # regenerated, byte for byte the same, on every run
    make_demo_data(data_dir)
    print(f"synthetic H&E-like demo data (not real tissue): {data_dir}")
    config = build_config("quick", DEMO_CONFIG, {"seed": args.seed})
    manifest, problems = load_manifest(
        data_dir, config.preprocess, config.augment.crop_size, threads=args.threads, progress=progress_of(args)
    )
    print_problems(problems)
    args.device, args.batch_size, args.force = "cpu", None, True
    return _run_cv(manifest, config, args.out / "cv", args)
