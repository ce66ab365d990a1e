"""A trained model as a portable bundle: `Bundle.load(path)` verifies and opens one (the format: `container`),
`bundle.predict(paths)` classifies images and `bundle.predict_slide(...)` a whole slide, both through the bundle's
`inference.Predictor`. Training one is `training.train_bundle`."""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, cast

import numpy as np

from .classifier import DecisionRule
from .config import Config, ConfigError
from .container import (
    FORMAT_VERSION,
    MAX_WEIGHTS_BYTES,
    META_FILE,
    MODEL_FILES,
    check_members,
    checked,
    identity,
    inventory,
    meta_digest,
    parse_meta,
    read_members,
    signature_path,
    write,
)
from .data import GROUPS, ClassScheme, Problem, class_scheme
from .errors import BundleError, HistoboostError, StainError
from .inference import ModelIdentity, Predictor, TrainingGeometry
from .runtime import Runtime

if TYPE_CHECKING:
    from .backbones import Backbone


class Predictions(NamedTuple):
    """What `Bundle.predict` returns: one record per image predicted (predict's CSV columns) and one problem per
    image that was not (a batch never stops for one bad image). Unpacks as `records, problems`."""

    records: list[dict[str, Any]]
    problems: list[Problem]


class Bundle:
    """A trained histoboost model: `Bundle.load(path).predict(paths)`. Its `predictor` classifies; the bundle adds
    what the model is (bundle.json's `meta`), where it was read from, and writing it."""

    def __init__(
        self,
        config: Config,
        classifier: Any,
        backbones: list[Backbone],
        meta: dict[str, Any],
        path: Path | None = None,
        sha256: str = "",
        runtime: Runtime | None = None,
    ):
        self.meta = meta
        self.path = path
        self.user_weights: dict[str, str] = {}  # foundation-model files the user gave for weights it does not carry
        data = meta["training_data"]
        model = ModelIdentity(
            sha256,
            meta["histoboost"],
            TrainingGeometry(data.get("mpp"), data.get("working_mpp"), data.get("field_px")),
            frozenset(data["image_ids"]),
        )
        self.predictor = Predictor(
            config, backbones, classifier, DecisionRule(**meta["decision_rule"]), model, runtime or Runtime()
        )

    # What the model is made of, as its predictor holds it.
    @property
    def config(self) -> Config:
        return self.predictor.config

    @property
    def classifier(self) -> Any:
        return self.predictor.classifier

    @property
    def backbones(self) -> list[Backbone]:
        return self.predictor.backbones

    @property
    def rule(self) -> DecisionRule:
        return self.predictor.rule

    @property
    def classes(self) -> ClassScheme:
        return self.predictor.classes

    @property
    def rule_text(self) -> str:
        """The decision rule in words: what `predict` outputs and `train` states."""
        return self.predictor.rule_text

    def using(self, runtime: Runtime) -> Bundle:
        """The same bundle on another runtime (an engine opened after loading, another cache folder)."""
        other = copy.copy(self)
        other.predictor = self.predictor.using(runtime)
        return other

    @property
    def sha256(self) -> str:
        """The identity: sha256 of bundle.json as saved (`container.identity`); "" before the bundle is saved."""
        return self.predictor.identity.sha256

    @property
    def training_image_ids(self) -> frozenset[str]:
        """Content keys of the images the classifier was trained on (to keep them out of evaluations)."""
        return self.predictor.identity.training_image_ids

    # -- writing ---------------------------------------------------------------------------------
    def members(self) -> dict[str, bytes]:
        """Every member's bytes, bundle.json last (it lists the others' sha256)."""
        from safetensors.torch import save

        model_file = MODEL_FILES[self.config.classifier.kind]
        out = {model_file: self.classifier.to_bytes()}
        meta = json.loads(json.dumps(self.meta))
        for spec, backbone in zip(meta["backbones"], self.backbones):
            # Not downloadable: carried, unless their licence forbids it (then the user passes their own file).
            if spec["weights_source"].startswith(("file:", "bundle:")) and backbone.redistributable:
                spec["file"] = f"weights-{spec['name']}.safetensors"
                state = {k: v.detach().cpu().contiguous() for k, v in backbone.model.state_dict().items()}
                out[spec["file"]] = save(state)  # the tensors in use, whatever format they came in
        meta["files"] = {name: hashlib.sha256(data).hexdigest() for name, data in sorted(out.items())}
        meta["meta_sha256"] = meta_digest(meta)
        out[META_FILE] = (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode()
        return out

    def save(self, out: str | Path) -> Path:
        """Write the bundle folder, or a .zip when `out` ends in .zip, atomically (whole or absent); sets
        `sha256` to the identity of what was written."""
        out = Path(out)
        if out.exists():
            raise BundleError(f"{out} exists: choose another --out or remove it")
        members = self.members()
        out.parent.mkdir(parents=True, exist_ok=True)
        write(out, members)
        self.predictor.identity = replace(self.predictor.identity, sha256=identity(members[META_FILE]))
        return out

    # -- reading ---------------------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        path: str | Path,
        runtime: Runtime | None = None,
        expect_sha256: str | None = None,
        trusted_key: str | Path | None = None,
        weights: Mapping[str, str | Path] | None = None,
    ) -> Bundle:
        """Open and verify a bundle folder or .zip; load its backbones (their weights must match).

        `expect_sha256` (the identity `train` printed) or `trusted_key` (an Ed25519 public key whose
        signature `<bundle>.sig` must verify) make a deliberately edited bundle fail to load. `weights`
        maps a foundation model the bundle does not carry to the user's own file of it. The backbones are built on
        `runtime`'s device, where the bundle then predicts."""
        path = Path(path)
        runtime = runtime or Runtime()
        device = runtime.device
        present = inventory(path)
        if META_FILE not in present:
            raise BundleError(f"{path}: not a histoboost bundle (no {META_FILE})")
        meta_bytes = read_members(path, [META_FILE], present)[META_FILE]
        sha256 = identity(meta_bytes)
        if expect_sha256 is not None and sha256 != expect_sha256.strip().lower():
            raise BundleError(
                f"{path}: bundle sha256 is {sha256}, not the expected {expect_sha256}: it is another "
                "or an altered bundle; do not use it"
            )
        if trusted_key is not None:
            from .signing import SigningError, verify

            try:
                verify(meta_bytes, signature_path(path), trusted_key)
            except SigningError as err:
                raise BundleError(f"{path}: {err}") from None
        meta = parse_meta(meta_bytes, path)
        check_members(meta, set(present), path)
        members = checked(read_members(path, sorted(meta["files"]), present), meta, path)
        try:
            config = Config.from_dict(meta["config"])
        except ConfigError as err:
            raise BundleError(
                f"{path}: {META_FILE} holds an unusable config ({err}): use the original bundle"
            ) from None
        scheme = class_scheme(config.classifier.classes)
        if (
            meta["classes"] != list(scheme.classes)
            or tuple(meta["decision_rule"].get("groups", GROUPS)) != scheme.groups
        ):
            raise BundleError(
                f"{path}: classes {meta['classes']} are not the {list(scheme.classes)} of its "
                f"--classes {scheme.name}: use the original bundle"
            )
        if config.classifier.kind != meta["classifier"]["type"]:
            raise BundleError(
                f"{path}: {META_FILE} names classifier {meta['classifier']['type']} but its config "
                f"{config.classifier.kind}: use the original bundle"
            )
        from .backbones import (
            BackboneError,
            create_backbone,
            file_sha256,
            parameter_bytes,
            weights_from_safetensors,
            weights_problem,
        )
        from .classifier import load_classifier  # torch and xgboost: only after the checks above
        from .specs import REGISTRY, is_foundation

        backbones, weights = [], dict(weights or {})
        wanted = {
            spec["name"]: spec for spec in meta["backbones"] if "file" not in spec and is_foundation(spec["name"])
        }
        for name, own in weights.items():
            if name not in wanted:
                raise BundleError(
                    f"{path}: --weights {name}=…: the bundle needs no file for {name} (it takes the "
                    f"user's own file only for foundation models it does not carry: "
                    f"{', '.join(wanted) or 'none'})"
                )
            problem = weights_problem(own, name)  # not found, or a folder: the file inside it to pass
            if problem:
                raise BundleError(problem)
            if file_sha256(Path(own)) != wanted[name]["weights_sha256"]:  # before a 4 GB network is built
                raise BundleError(
                    f"{path}: {own} is not the {name} file the bundle was trained with (sha256 "
                    f"{wanted[name]['weights_sha256'][:12]}…): give that file"
                )
        for spec in meta["backbones"]:
            try:
                if parameter_bytes(spec["name"]) > MAX_WEIGHTS_BYTES:  # before building it
                    raise BackboneError(
                        f"{spec['name']} is larger than the {MAX_WEIGHTS_BYTES / 2**30:.0f} GiB a bundle may need"
                    )
                if "file" not in spec and spec["name"] not in REGISTRY:
                    raise BackboneError(f"{spec['name']} is neither carried in the bundle nor a registered backbone")
                if "file" in spec:  # carried: built from the member in memory, its sha256 checked above
                    carried = weights_from_safetensors(
                        members[spec["file"]], spec["weights_sha256"], f"bundle:{spec['file']}"
                    )
                    backbone = create_backbone(spec["name"], carried, device)
                elif is_foundation(spec["name"]):  # never carried: the user's own file, checked by sha256 below
                    backbone = create_backbone(spec["name"], weights.get(spec["name"]), device)
                else:
                    backbone = create_backbone(spec["name"], None, device)
            except BackboneError as err:
                raise BundleError(
                    f"{path}: needs backbone {spec['name']} with weights sha256 {spec['weights_sha256'][:12]}…: {err}"
                ) from None
            if backbone.spec_sha256 != spec["spec_sha256"]:
                raise BundleError(
                    f"{path}: backbone {spec['name']} is defined differently in this histoboost than in "
                    f"the one that trained the bundle (histoboost {meta['histoboost']}): use that "
                    "version, or retrain"
                )
            if backbone.weights_sha256 != spec["weights_sha256"] or backbone.architecture != spec["architecture"]:
                versions = meta["versions"]
                raise BundleError(
                    f"{path}: backbone {spec['name']} here is {backbone.architecture} with weights sha256 "
                    f"{backbone.weights_sha256[:12]}… from {backbone.weights_source}; the bundle was "
                    f"trained with {spec['architecture']} and {spec['weights_sha256'][:12]}… from "
                    f"{spec['weights_source']} (timm {versions.get('timm', '?')}): install those weights, "
                    "or retrain"
                )
            backbones.append(backbone)
        model_file = meta["classifier"]["file"]
        try:
            classifier = load_classifier(
                members[model_file], config.classifier, meta["classifier"]["best_iteration"], device
            )
        except ValueError as err:
            raise BundleError(f"{path}: {model_file} is {err}: use the original bundle") from None
        width = descriptor_width(backbones, config, device)
        if classifier.n_features != width:
            raise BundleError(
                f"{path}: {model_file} takes {classifier.n_features} features but its backbones give "
                f"{width}: the bundle was altered; use the original bundle"
            )
        bundle = cls(config, classifier, backbones, meta, path, sha256, runtime)
        bundle.user_weights = {name: str(file) for name, file in weights.items()}
        return bundle

    # -- predicting ------------------------------------------------------------------------------
    def predict(self, paths: Sequence[str | Path], overlay_dir: str | Path | None = None) -> Predictions:
        """Predict images (files or folders of images) with the bundle's own preprocessing and test-time
        augmentations; returns one record per image and one problem per image that failed."""
        from .data import ImageRecord, scan_files
        from .progress import track
        from .report import write_overlay

        files, problems = _collect(paths)
        if overlay_dir is not None:
            Path(overlay_dir).mkdir(parents=True, exist_ok=True)
        found, progress = [], self.predictor.runtime.progress
        infos = scan_files(files, None, progress)  # in parallel; a file given twice is predicted twice
        for file in files:
            info = infos[file]
            if isinstance(info, Problem):
                problems.append(Problem(file, f"cannot be predicted ({info.message})", PREDICT_FIX))
            else:
                found.append(
                    ImageRecord(
                        info.image_id, file.stem, file, "", 0, None, info.width, info.height, info.mode, info.mpp
                    )
                )
        lost = self.predictor.describe_on_engine(found)  # on Dask workers first, when the runtime has them
        problems += [lost[r.image_id] for r in found if r.image_id in lost]
        records = []
        for image in track([r for r in found if r.image_id not in lost], "predicting", progress=progress):
            file = image.path
            try:
                prediction, grid = self.predictor.predict_image(
                    file, image.image_id, image.mpp, image.mode, want_grid=overlay_dir is not None
                )
                record = prediction.record(self.sha256, FORMAT_VERSION)
                if overlay_dir is not None:  # named by content too: two images called x.png never collide
                    overlay = Path(overlay_dir) / f"{file.stem}-{prediction.image_id[:12]}.overlay.png"
                    record["overlay"] = write_overlay(
                        file, cast(np.ndarray, grid), prediction.decision, overlay, class_name=record["class"]
                    ).name
            except (OSError, ValueError, StainError, HistoboostError) as err:
                problems.append(Problem(file, f"cannot be predicted ({str(err).splitlines()[0]})", PREDICT_FIX))
                continue
            records.append(record)
        return Predictions(records, problems)

    def predict_proba(
        self, images: str | Path | np.ndarray | Sequence[str | Path | np.ndarray], mpp: float | None = None
    ) -> np.ndarray:
        """Class probabilities (n, K) of images given as files or as arrays (RGB uint8 (H, W, 3) or grayscale
        (H, W), as `np.asarray(PIL.Image.open(f))` gives), in the order of `classes.classes`; (K,) for one image.
        The same numbers `predict` writes (its p_<class> columns, rounded there to 6 decimals). `mpp` is the
        arrays' µm/px (None: they state none); a file states its own. An image that cannot be used raises."""
        from .data import scan_file

        single = isinstance(images, (str, Path, np.ndarray))
        items: list[str | Path | np.ndarray] = [images] if isinstance(images, (str, Path, np.ndarray)) else [*images]
        probs = []
        for image in items:
            if isinstance(image, np.ndarray):
                probs.append(self.predictor.predict_array(image, mpp).probs)
                continue
            info = scan_file(Path(image))
            if isinstance(info, Problem):
                raise BundleError(f"{info.path}: {info.message} ({info.fix})")
            probs.append(self.predictor.predict_image(image, info.image_id, info.mpp, info.mode)[0].probs)
        return probs[0] if single else np.stack(probs)

    def predict_slide(self, path: str | Path, out: str | Path, settings: Any = None) -> Any:
        """Score a whole-slide image tile by tile and write its outputs into `out` (`slides.SlideSettings`
        says how; docs/slides.md): returns a `slides.SlideResult`."""
        from .slides import SlideSettings, predict_slide

        return predict_slide(self.predictor, path, out, settings or SlideSettings())

    def predict_slides(
        self,
        paths: Sequence[str | Path],
        out: str | Path,
        settings: Any = None,
        on_result: Callable[[dict], Any] | None = None,
        shard: tuple[int, int] | None = None,
    ) -> list[dict]:
        """Every slide of `paths` (files or folders) into OUT/<slide>/ and OUT/slides.csv; on the runtime's Dask
        engine, workers load this bundle from its path. Returns slides.csv's rows."""
        from .slides import SlideSettings
        from .slides.run import ModelSource, predict_slides

        source = (
            None if self.path is None else ModelSource(str(self.path), self.sha256, self.user_weights, load_predictor)
        )
        return predict_slides(self.predictor, paths, out, settings or SlideSettings(), on_result, shard, source)


PREDICT_FIX = "check the image; the others were predicted"


def load_predictor(path: str, sha256: str, weights: dict[str, str], runtime: Runtime) -> Predictor:
    """The predictor of the bundle at `path`, refused unless its identity is `sha256`: what a Dask worker loads to
    score slides (the task names this function; `slides` never imports the bundle)."""
    return Bundle.load(path, runtime, sha256, weights=weights).predictor


def descriptor_width(backbones: list, config: Config, device: str = "cpu") -> int:
    """How many features per row the backbones give under the config (one small forward pass each)."""
    import torch

    per_view = 2 if config.features.descriptor == "crops+whole" else 1
    with torch.inference_mode():
        probe = torch.zeros(1, 3, 64, 64, device=device)
        return per_view * sum(
            b.embed(probe, config.features.stages).shape[1] if b.has_maps else b.feature_dim for b in backbones
        )


def _collect(paths: Sequence[str | Path]) -> tuple[list[Path], list[Problem]]:
    """The image files given, folders searched (dangling links, loops and the like reported, not skipped)."""
    from .data import find_images

    files, problems = [], []
    for item in map(Path, paths):
        if item.is_dir():
            found, warnings = find_images(item)
            problems += warnings
            if not found:
                problems.append(Problem(item, "folder holds no images", "give image files or a folder of images"))
            files += found
        elif item.is_file():
            files.append(item)
        else:
            problems.append(Problem(item, "no such file or folder", "check the path"))
    return files, problems
