"""The model commands: `train` (a bundle, optionally signed), `predict`, `evaluate` (a bundle on a held-out
set) and `keygen` (a key pair to sign bundles)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ..evaluate import check_split
from ..outputs import check_output, check_writable, csv_text, staged_folder
from ..storage import write_text_atomic
from .options import (
    Parents,
    UsageError,
    bundle_weights,
    config_from_args,
    count,
    engine_of,
    load_data,
    positive,
    print_problems,
    runtime_of,
)

NO_CACHE = "compute every image's features in memory; read and write no feature store"


def add_commands(commands, p: Parents) -> None:
    train = commands.add_parser(
        "train",
        parents=[p.common, p.protocol, p.features, p.store, p.evaluation, p.tuning, p.engine],
        help="train on all images and save a bundle",
        description="Train the classifier on every image (features from the store, extracted where missing) and "
        "write a portable bundle: XGBoost's native model, bundle.json with config and checksums. No pickle.",
    )
    train.add_argument("data", type=Path, help="data folder or CSV manifest")
    train.add_argument("--out", type=Path, required=True, metavar="MODEL", help="bundle folder, or MODEL.zip")
    train.add_argument(
        "--sign",
        type=Path,
        metavar="KEY",
        help="sign the bundle with this Ed25519 private key (histoboost keygen): writes MODEL.sig",
    )
    train.add_argument(
        "--image-mpp",
        type=positive,
        metavar="MPP",
        help="µm/px of training images whose file states none (BACH's JPEGs: 0.42); recorded in the "
        "bundle so that whole slides are tiled at the training field of view (a manifest's mpp column "
        "does the same per image)",
    )
    train.add_argument(
        "--finetune",
        action="store_true",
        default=None,
        help="fine-tune each backbone on the training images first; the bundle carries the weights",
    )
    train.set_defaults(run=_train)

    predict = commands.add_parser(
        "predict",
        parents=[p.common, p.trust, p.store, p.engine],
        help="classify new images with a bundle",
        description="Apply the bundle's preprocessing and test-time augmentations to each image and vote. Images "
        "that cannot be read are reported one line each; the others are still predicted (exit status 1). "
        "Features go into the feature store, as extract's do: an image predicted or evaluated again is not "
        "described again.",
    )
    predict.add_argument("model", type=Path, metavar="MODEL", help="bundle folder or .zip from histoboost train")
    predict.add_argument("images", type=Path, nargs="+", metavar="IMAGE_OR_DIR")
    predict.add_argument("--out", type=Path, help="predictions file, .csv or .json (default: print CSV)")
    predict.add_argument("--force", action="store_true", help="replace --out if it exists")
    predict.add_argument("--overlay", type=Path, metavar="DIR", help="write a heat-map PNG per image here")
    predict.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    predict.add_argument(
        "--batch-size", type=count(1), help="augmentations per CNN batch (default: 8 on CPU, 48 on CUDA)"
    )
    predict.add_argument("--no-cache", action="store_true", help=NO_CACHE)
    predict.set_defaults(run=_predict)

    evaluate = commands.add_parser(
        "evaluate",
        parents=[p.common, p.trust, p.store, p.engine],
        help="check a bundle on a labelled set",
        description="Predict a labelled data set with a trained bundle and write the same metrics and report as cv: "
        "how to check a model on new patients.",
    )
    evaluate.add_argument("model", type=Path, metavar="MODEL")
    evaluate.add_argument("data", type=Path, help="labelled data folder or CSV manifest")
    evaluate.add_argument("--out", type=Path, help="run folder (default: runs/evaluate-DATE-TIME)")
    evaluate.add_argument(
        "--force", action="store_true", help="replace --out if it exists (only once the run succeeds)"
    )
    evaluate.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    evaluate.add_argument("--label-map", metavar="LABEL=G,...", help="extra label-to-group mapping")
    evaluate.add_argument(
        "--batch-size", type=count(1), help="augmentations per CNN batch (default: 8 on CPU, 48 on CUDA)"
    )
    evaluate.add_argument("--no-cache", action="store_true", help=NO_CACHE)
    evaluate.set_defaults(run=_evaluate)

    keygen = commands.add_parser(
        "keygen",
        parents=[p.common],
        help="make an Ed25519 key pair to sign bundles",
        description="Write KEY (private, PKCS8 PEM, readable by you only) and KEY.pub.pem (give it to the people "
        "who use your bundles: predict --trusted-key). The same files as openssl genpkey -algorithm ed25519.",
    )
    keygen.add_argument("key", type=Path, metavar="KEY", help="private key file to write, e.g. histoboost-key.pem")
    keygen.set_defaults(run=_keygen)


def _train(args: argparse.Namespace) -> int:
    from ..container import signature_path
    from ..signing import private_key, sign
    from ..training import train_bundle

    config = config_from_args(args)
    check_output(args.out, folder=args.out.suffix != ".zip")
    key = private_key(args.sign) if args.sign is not None else None  # a bad key is found now, not after training
    manifest = load_data(args, config)
    check_split(manifest, config)  # before any work (and before an engine starts)
    runtime_of(args)  # the device, checked before the engine starts
    with engine_of(args) as engine:
        bundle = train_bundle(manifest, config, runtime_of(args, engine), image_mpp=args.image_mpp)
    path = bundle.save(args.out)
    counts = ", ".join(f"{k} {v}" for k, v in bundle.meta["training_data"]["per_group"].items())
    print(f"trained on {len(manifest)} images ({counts}) with {', '.join(config.features.backbones)}: {path}")
    print(f"decision: {bundle.rule_text}")
    print(f"bundle sha256: {bundle.sha256}  (its identity: check it with predict --expect-sha256)")
    if key is not None:
        from ..container import META_FILE, read_members

        print(f"signature: {sign(read_members(path, [META_FILE])[META_FILE], key, signature_path(path))}")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from ..bundle import Bundle

    runtime = runtime_of(args)
    if args.out is not None:  # checked before any work
        check_output(args.out, args.force, folder=False)
    if args.overlay is not None and args.overlay.exists():
        if not args.overlay.is_dir():
            raise UsageError(f"--overlay {args.overlay} is a file: give a folder")
        if any(args.overlay.iterdir()) and not args.force:
            raise UsageError(
                f"--overlay {args.overlay} holds files: choose an empty folder, or pass --force to "
                "write over overlays of the same names"
            )
    if args.overlay is not None:
        check_writable(args.overlay)
    bundle = Bundle.load(args.model, runtime, args.expect_sha256, args.trusted_key, bundle_weights(args))
    with engine_of(args) as engine:
        records, problems = bundle.using(runtime_of(args, engine)).predict(args.images, overlay_dir=args.overlay)
    print_problems(problems)
    if not records:
        print("no image could be predicted; nothing written", file=sys.stderr)
        return 1
    text = _records_text(records, args.out.suffix.lower() if args.out else ".csv")
    if args.out:
        write_text_atomic(args.out, text)
        print(
            f"{len(records)} image(s) predicted -> {args.out}"
            + (f"; overlays in {args.overlay}" if args.overlay else "")
        )
    else:
        print(text, end="")
    return 1 if any(p.severity == "error" for p in problems) else 0


def _records_text(records: list[dict], suffix: str) -> str:
    if suffix == ".json":
        return json.dumps(records, indent=2) + "\n"
    return csv_text(records, list(records[0])) if records else ""


def _evaluate(args: argparse.Namespace) -> int:
    from ..bundle import Bundle
    from ..evaluate import evaluate_predictor
    from ..report import accuracy_table, write_outputs

    runtime = runtime_of(args)
    out = check_output(args.out or Path("runs") / time.strftime("evaluate-%Y%m%d-%H%M%S"), args.force)
    bundle = Bundle.load(args.model, runtime, args.expect_sha256, args.trusted_key, bundle_weights(args))
    config = bundle.config
    manifest = load_data(args, config)
    with engine_of(args) as engine:
        run = evaluate_predictor(bundle.predictor.using(runtime_of(args, engine)), manifest)
    with staged_folder(out, args.force) as staging:
        manifest.to_csv(staging / "manifest.csv")
        report = out / write_outputs(
            run, staging, {"bundle": str(args.model), "bundle_sha256": bundle.sha256, "data": str(manifest.root)}
        ).relative_to(staging)
    print(f"{len(manifest)} images of a held-out set, predicted by {args.model}")
    print(accuracy_table(run))
    print(f"report: {report}")
    return 0


def _keygen(args: argparse.Namespace) -> int:
    from ..signing import generate_key

    private, public = generate_key(args.key)
    print(
        f"private key: {private} (keep it secret; sign with train --sign {private})\n"
        f"public key:  {public} (share it; users check with predict --trusted-key {public})"
    )
    return 0
