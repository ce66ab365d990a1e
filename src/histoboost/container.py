"""The bundle's container format: fixed members in a folder or a .zip, read as hostile and written atomically.

A bundle is a folder or a .zip of fixed members: `bundle.json` (format version, the full config, backbones and their
weights identity, the decision rule, the training images' ids, library versions and the sha256 of every other
member), the classifier (XGBoost's native `model.ubj`, or the logistic model's arrays as `model.json`) and, for
weights that cannot be downloaded (local or fine-tuned), `weights-<backbone>.safetensors`, except gated or
non-commercial foundation-model weights: those are named by sha256 and the user passes their own file when loading.
No pickle anywhere.

A bundle is a file people download and share, so reading treats it as hostile (docs/security.md): sizes,
compression and member names are checked before anything is read; bundle.json is read first and checked (identity,
signature, the published JSON Schema schemas/bundle-7.schema.json) before any field is used or any other member
read; the files it lists must be exactly the members present; members are read into memory, never written out and
never looked up by a name taken from bundle.json. The identity is the sha256 of bundle.json, which holds the sha256
of every other member: checksums detect damage, while an expected sha256 and Ed25519 signatures (`signing`) detect
deliberate edits.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import zipfile
import zlib
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from . import storage
from .errors import BundleError
from .outputs import staged_folder
from .version import __version__

# 4: fixed member names, schema, safetensors-only weights, training image ids;
# 5: each backbone's spec sha256; foundation-model weights the user supplies;
# 6: the class scheme (classes other than the 3 groups: decision_rule.groups, training_data.per_class);
# 7: the training images' geometry (training_data.mpp, working_mpp, field_px) for whole-slide tiling
FORMAT_VERSION = 7
OLDEST_FORMAT = 5
MODEL_FILES = {"xgboost": "model.ubj", "logistic": "model.json"}
META_FILE = "bundle.json"
_MEMBER_NAME = re.compile(r"^(bundle\.json|model\.ubj|model\.json|weights-[A-Za-z0-9_.-]{1,128}\.safetensors)$")

# Refused before anything is read (a zip's sizes come from its directory; reading never goes past them).
MAX_MEMBERS = 10  # bundle.json, the classifier and at most 8 weights files
MAX_META_BYTES = 16 * 2**20
MAX_MEMBER_BYTES = {"bundle.json": MAX_META_BYTES, "model.ubj": 2**30, "model.json": 64 * 2**20}
MAX_WEIGHTS_BYTES = 8 * 2**30  # a ViT-g in float32 is about 4.5 GB
MAX_TOTAL_BYTES = 24 * 2**30
MAX_RATIO = 50  # uncompressed / compressed, for members over 1 MiB: models compress ~10x, zeros ~1000x
MAX_WEIGHTS_RATIO = 4  # float weights compress about 1.1-fold
MAX_JSON_DEPTH = 8


def identity(meta_bytes: bytes) -> str:
    """A bundle's identity: the sha256 of its bundle.json bytes. bundle.json holds the sha256 of every
    other member and loading requires exactly those members, so the identity covers the whole bundle."""
    return hashlib.sha256(meta_bytes).hexdigest()


def signature_path(bundle: str | Path) -> Path:
    """Where a bundle's detached signature lives: `<bundle>.sig` beside it."""
    bundle = Path(bundle)
    return bundle.with_name(bundle.name + ".sig")


def inventory(path: Path) -> dict[str, int]:
    """The members of a bundle folder or zip and their sizes, checked (names, count, sizes, compression,
    no encryption, plain files only) before a byte of any member is read."""
    if path.is_dir():
        entries = list(os.scandir(path))
        for entry in entries:
            if not entry.is_file(follow_symlinks=False):
                raise BundleError(
                    f"{path}: {entry.name} is not a regular file (a link, folder or device): a bundle "
                    "holds plain files only; use the original bundle"
                )
        sizes: dict[str, tuple[int, int | None]] = {
            e.name: (e.stat(follow_symlinks=False).st_size, None) for e in entries
        }
    elif path.is_file() and zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                infos = archive.infolist()
        except (zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError) as err:
            raise BundleError(f"{path}: the zip is damaged ({str(err)[:120]}): use the original bundle") from None
        if len({i.filename for i in infos}) != len(infos):
            raise BundleError(f"{path}: the zip lists a member twice: use the original bundle")
        for info in infos:
            if info.flag_bits & 0x1 or info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                raise BundleError(
                    f"{path}: {info.filename[:80]!r} is encrypted or compressed other than by deflate: "
                    "not a histoboost bundle"
                )
        sizes = {i.filename: (i.file_size, i.compress_size) for i in infos}
    else:
        raise BundleError(f"{path}: no bundle here (give the folder or .zip written by histoboost train)")
    _check_sizes(sizes, path)
    return {name: size for name, (size, _) in sizes.items()}


def read_members(path: Path, names: list[str], sizes: dict[str, int] | None = None) -> dict[str, bytes]:
    """The named members of a bundle into memory, never more bytes than each declares; `sizes` is the
    bundle's `inventory`, taken here when the caller has none."""
    sizes = sizes if sizes is not None else inventory(path)
    out = {}
    try:
        if path.is_dir():
            for name in names:
                with open(path / name, "rb", opener=_no_follow) as handle:
                    out[name] = handle.read(sizes[name] + 1)
        else:
            with zipfile.ZipFile(path) as archive:
                for name in names:
                    with archive.open(name) as handle:  # deflate output bounded per read, CRC checked at the end
                        out[name] = b"".join(iter(lambda: handle.read(1 << 16), b""))
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError, RuntimeError) as err:
        raise BundleError(
            f"{path}: the bundle is damaged or unreadable ({str(err)[:120]}): use the original bundle"
        ) from None
    for name, data in out.items():
        if len(data) != sizes[name]:
            raise BundleError(f"{path}: {name} changed while it was read: use the original bundle")
    return out


def _no_follow(file: str, flags: int) -> int:
    return os.open(file, flags | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))


def _check_sizes(sizes: dict[str, tuple[int, int | None]], path: Path) -> None:
    """Member names, count, sizes and compression ratios within the limits."""
    if len(sizes) > MAX_MEMBERS:
        raise BundleError(
            f"{path}: {len(sizes)} members, more than a bundle ever has ({MAX_MEMBERS}): not a histoboost bundle"
        )
    for name, (size, packed) in sizes.items():
        if not _MEMBER_NAME.fullmatch(name):
            raise BundleError(
                f"{path}: holds {name[:80]!r}, which a bundle never has (only {META_FILE}, model.ubj or "
                "model.json and weights-<backbone>.safetensors): use the original bundle"
            )
        limit = MAX_MEMBER_BYTES.get(name, MAX_WEIGHTS_BYTES)
        if size > limit:
            raise BundleError(
                f"{path}: {name} is {size / 2**20:.0f} MiB, over the {limit / 2**20:.0f} MiB limit: "
                "not a histoboost bundle"
            )
        if packed is None:
            continue
        ratio = MAX_WEIGHTS_RATIO if name.endswith(".safetensors") else MAX_RATIO
        if size > 2**20 and size > ratio * max(packed, 1):
            raise BundleError(
                f"{path}: {name} expands {size / max(packed, 1):.0f}-fold, over the {ratio}-fold "
                "limit (a zip bomb?): not a histoboost bundle"
            )
        if packed > size + size // 100 + 1024:
            raise BundleError(f"{path}: {name} is stored larger than it unpacks: not a histoboost bundle")
    total = sum(size for size, _ in sizes.values())
    if total > MAX_TOTAL_BYTES:
        raise BundleError(f"{path}: {total / 2**30:.1f} GiB in all, over the {MAX_TOTAL_BYTES / 2**30:.0f} GiB limit")


@cache
def _schema_validator():
    import jsonschema

    schema = json.loads(resources.files("histoboost").joinpath("schemas/bundle-7.schema.json").read_text())
    return jsonschema.Draft202012Validator(schema)


def parse_meta(data: bytes, path: Path) -> dict[str, Any]:
    """bundle.json parsed and checked against the schema (depth, types, ranges, known keys, version)."""
    try:
        meta = storage.strict_json(data)
    except ValueError:  # not JSON, not UTF-8, NaN/Infinity, or a number of thousands of digits
        raise BundleError(f"{path}: {META_FILE} is damaged (not strict JSON): use the original bundle") from None
    except RecursionError:
        raise BundleError(f"{path}: {META_FILE} is nested too deeply: not a histoboost bundle") from None
    if storage.json_depth(meta, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        raise BundleError(f"{path}: {META_FILE} is nested deeper than {MAX_JSON_DEPTH} levels: not a histoboost bundle")
    version = meta.get("format_version") if isinstance(meta, dict) else None
    if not isinstance(version, int) or isinstance(version, bool):
        raise BundleError(f"{path}: {META_FILE} has no integer format_version: not a histoboost bundle")
    if version > FORMAT_VERSION:  # checked first: a newer format may check itself differently
        raise BundleError(
            f"{path}: bundle format {version} is newer than the {FORMAT_VERSION} this histoboost "
            f"{__version__} reads: upgrade histoboost"
        )
    if version < OLDEST_FORMAT:
        hint = (
            ("histoboost 0.1.0 reads it" if version < 4 else "histoboost 0.2.0 reads it")
            if version >= 1
            else "no histoboost wrote it"
        )
        raise BundleError(
            f"{path}: bundle format {version} is older than the {OLDEST_FORMAT} this histoboost reads "
            f"({hint}): retrain it with this version"
        )
    error = next(iter(_schema_validator().iter_errors(meta)), None)  # the first, without collecting them all
    if error is not None:
        where = "/".join(map(str, error.absolute_path)) or "the top level"
        raise BundleError(
            f"{path}: {META_FILE} fails the format-{FORMAT_VERSION} schema at {where} "
            f"({error.message[:160]}): use the original bundle"
        )
    ids = meta["training_data"]["image_ids"]
    if len(set(ids)) != len(ids):
        raise BundleError(f"{path}: {META_FILE} lists a training image twice: use the original bundle")
    if meta["meta_sha256"] != meta_digest(meta):
        raise BundleError(
            f"{path}: {META_FILE} does not match its checksum: the bundle was damaged; use the original bundle"
        )
    return meta


def check_members(meta: dict[str, Any], present: set[str], path: Path) -> None:
    """`files` lists exactly the members present, under the fixed names its classifier and backbones need."""
    listed, present = set(meta["files"]), present - {META_FILE}
    if listed != present:
        extra, missing = sorted(present - listed), sorted(listed - present)
        raise BundleError(
            f"{path}: members {', '.join(extra) or '(none)'} not listed and {', '.join(missing) or '(none)'} "
            "missing: the bundle was altered or damaged; use the original bundle"
        )
    expected = {meta["classifier"]["file"]} | {
        f"weights-{b['name']}.safetensors" for b in meta["backbones"] if "file" in b
    }
    named = {meta["classifier"]["file"]} | {b["file"] for b in meta["backbones"] if "file" in b}
    if named != expected or listed != expected:
        raise BundleError(
            f"{path}: members {', '.join(sorted(listed))} are not the fixed names its classifier and "
            "backbones need: use the original bundle"
        )


def checked(members: dict[str, bytes], meta: dict[str, Any], path: Path) -> dict[str, bytes]:
    """The members, each matching the sha256 bundle.json lists for it."""
    for name in sorted(members):
        if hashlib.sha256(members[name]).hexdigest() != meta["files"][name]:
            raise BundleError(
                f"{path}: {name} does not match its checksum: the bundle was altered or damaged; "
                "use the original bundle"
            )
    return members


def meta_digest(meta: dict[str, Any]) -> str:
    """sha256 of bundle.json's content without its own checksum, in a canonical form: detects damage to
    bundle.json, not deliberate edits (anyone can recompute it; see `identity`)."""
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write(out: Path, members: dict[str, bytes]) -> None:
    """Write the members as the folder `out`, or as a .zip when `out` ends in .zip, atomically: whole or absent."""
    if out.suffix == ".zip":
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
            for name in (META_FILE, *sorted(set(members) - {META_FILE})):
                info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
                info.external_attr = 0o644 << 16  # readable when unzipped by other tools
                archive.writestr(info, members[name], compress_type=zipfile.ZIP_DEFLATED)
        storage.write_bytes(out, buffer.getvalue())
    else:
        with staged_folder(out) as staging:
            for name, data in members.items():
                storage.write_bytes(staging / name, data)
