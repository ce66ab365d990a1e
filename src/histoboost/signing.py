"""Ed25519 signatures of bundles: who made a bundle, not only whether it was damaged.

The signature is detached (`<bundle>.sig` beside the bundle): the 64 raw bytes of an Ed25519
signature of the bundle's bundle.json, which holds the sha256 of every other member. Keys are PEM
files as OpenSSL writes them (`openssl genpkey -algorithm ed25519`), so a signature can also be
checked without histoboost:
`openssl pkeyutl -verify -pubin -inkey key.pub.pem -rawin -in bundle.json -sigfile model.zip.sig`.
The `cryptography` package does the cryptography.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from .errors import SigningError

SIGNATURE_BYTES = 64  # an Ed25519 signature


def generate_key(private_out: str | Path) -> tuple[Path, Path]:
    """A new Ed25519 key pair: PRIVATE (PKCS8 PEM, readable by its owner only) and PRIVATE.pub.pem."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    private_out = Path(private_out)
    public_out = private_out.with_name(private_out.name.removesuffix(".pem") + ".pub.pem")
    for path in (private_out, public_out):
        if path.exists():
            raise SigningError(f"{path} exists: choose another name; never overwrite a key")
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    fd = os.open(private_out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(private)
    public_out.write_bytes(public)
    return private_out, public_out


def private_key(path: str | Path):
    """The Ed25519 private key in a PEM file (unencrypted), read and checked before any work."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except OSError as err:
        raise SigningError(f"{path}: cannot read the signing key ({err.strerror})") from None
    except (ValueError, TypeError) as err:
        raise SigningError(
            f"{path}: not an unencrypted PEM private key ({str(err)[:80]}): make one with histoboost keygen"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningError(f"{path}: a {type(key).__name__}, not an Ed25519 key: make one with histoboost keygen")
    return key


def sign(message: bytes, key, signature_out: str | Path) -> Path:
    """Sign `message` with an Ed25519 private key (`private_key`) and write the detached signature atomically."""
    from .storage import write_bytes

    signature_out = Path(signature_out)
    write_bytes(signature_out, key.sign(message))
    return signature_out


def verify(message: bytes, signature: str | Path, public_key: str | Path) -> None:
    """Raise SigningError unless `signature` is a valid Ed25519 signature of `message` by `public_key`."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        key = serialization.load_pem_public_key(Path(public_key).read_bytes())
    except OSError as err:
        raise SigningError(f"{public_key}: cannot read the trusted key ({err.strerror})") from None
    except (ValueError, TypeError):
        raise SigningError(f"{public_key}: not a PEM public key: give the .pub.pem of the signer") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SigningError(f"{public_key}: not an Ed25519 public key")
    try:
        fd = os.open(signature, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        raise SigningError(
            f"no signature {signature} beside the bundle, and a trusted key was required: get the "
            ".sig from the bundle's author, or do not use it"
        ) from None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode) or info.st_size != SIGNATURE_BYTES:
            raise SigningError(
                f"{signature} is not a {SIGNATURE_BYTES}-byte Ed25519 signature file: get the .sig "
                "from the bundle's author, or do not use it"
            )
        data = handle.read(SIGNATURE_BYTES)
    try:
        key.verify(data, message)
    except InvalidSignature:
        raise SigningError(
            f"the signature {signature} does not verify with {public_key}: the bundle was altered or "
            "signed by someone else; do not use it"
        ) from None
