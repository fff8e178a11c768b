"""A checkpoint's manifest.json: every file with its size and sha256, signed with this user's key.

The sizes and hashes catch truncation and edits: resume, chat and merge name the file that does not match.
The signature (HMAC-SHA256 with a random key kept in the user's sftkit cache, 0600, made on first use) says
that this user's sftkit wrote the checkpoint; only then is state that its reader unpickles (DeepSpeed's own
files) loaded without --trust_checkpoint. Everything else sftkit reads from a checkpoint is data (JSON,
safetensors, torch.load with weights_only=True) and is safe to load from anyone once the hashes match.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from .errors import CheckpointError
from .jsonfile import read_object
from .paths import cache_dir, private_file, private_folder

MANIFEST = "manifest.json"
FORMAT = "sftkit-checkpoint-manifest"
VERSION = 1
KEY_ENV = "SFTKIT_CHECKPOINT_KEY"
KEY_BYTES = 32


@dataclass(frozen=True)
class Verified:
    """What checking a folder against its manifest found (every listed file checked matched, or it raised)."""

    listed: bool  # the folder has a manifest
    signed: bool  # the manifest carries this user's signature
    unlisted: tuple[str, ...]  # files in the folder that the manifest does not name


def key_path() -> Path:
    """$SFTKIT_CHECKPOINT_KEY, else checkpoint.key in the sftkit cache (share it between machines to resume there)."""
    return Path(os.environ.get(KEY_ENV) or cache_dir() / "checkpoint.key")


def signing_key(create: bool = False) -> bytes | None:
    """This user's key; made on first use when `create`, else None while there is none."""
    path = key_path()
    try:
        key = path.read_bytes()
    except FileNotFoundError:
        return _create_key(path) if create else None
    except OSError as error:
        raise CheckpointError(f"cannot read the checkpoint key {path} ({error.strerror})") from None
    if len(key) != KEY_BYTES:
        raise CheckpointError(f"{path} is not an sftkit checkpoint key ({len(key)} bytes): delete it to make a new one")
    return key


def _create_key(path: Path) -> bytes:
    try:
        private_folder(path.parent)
        temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        with os.fdopen(private_file(temporary), "wb") as handle:
            handle.write(secrets.token_bytes(KEY_BYTES))
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(temporary, path)  # atomic and never replaces: a process that made the key first wins
        except FileExistsError:
            pass
        finally:
            os.unlink(temporary)
    except OSError as error:
        raise CheckpointError(f"cannot create the checkpoint key {path} ({error.strerror}): make the sftkit cache "
                              f"folder writable or set SFTKIT_CACHE (or {KEY_ENV}) to a writable place") from None
    return signing_key()


def write(folder: str) -> str:
    """List every file of a finished checkpoint folder with its size and sha256, signed; returns the manifest path."""
    files = {name: describe(os.path.join(folder, name)) for name in _files(folder)}
    body = {"format": FORMAT, "version": VERSION, "files": files, "signature": _sign(signing_key(create=True), files)}
    path = os.path.join(folder, MANIFEST)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(body, handle, indent=1, sort_keys=True)
    return path


def verify(folder: str, skip: tuple[str, ...] = ()) -> Verified:
    """Check every listed file (but those starting with a `skip` prefix) against the manifest; CheckpointError
    naming the first one that is missing, of another size or of other content."""
    present = tuple(name for name in _files(folder))
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        return Verified(False, False, present)
    files, signature = _read(path)
    for name, expected in sorted(files.items()):
        if not name.startswith(skip):
            _check(folder, name, expected)
    key = signing_key()
    signed = key is not None and isinstance(signature, str) and hmac.compare_digest(signature, _sign(key, files))
    return Verified(True, signed, tuple(name for name in present if name not in files))


def describe(path: str) -> dict:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return {"size": os.path.getsize(path), "sha256": digest.hexdigest()}


def _files(folder: str) -> list[str]:
    """Every file under `folder` as a relative POSIX path, sorted, without the manifest itself."""
    names = []
    for root, _, files in os.walk(folder):
        for name in files:
            relative = os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/")
            if relative != MANIFEST:
                names.append(relative)
    return sorted(names)


def _read(path: str) -> tuple[dict, str | None]:
    """(files, signature) of a manifest, checked for shape."""
    body = read_object(path, CheckpointError, "the checkpoint cannot be checked")
    files = body.get("files")
    if body.get("format") != FORMAT or body.get("version") != VERSION or not isinstance(files, dict) or not all(
            isinstance(v, dict) and isinstance(v.get("size"), int) and isinstance(v.get("sha256"), str) for v in files.values()):
        raise CheckpointError(f"{path} is not an sftkit checkpoint manifest (format {FORMAT}, version {VERSION})")
    for name in files:
        if os.path.isabs(name) or ".." in name.split("/"):
            raise CheckpointError(f"{path} names a file outside its folder ({name!r}): refused")
    return files, body.get("signature")


def _check(folder: str, name: str, expected: dict) -> None:
    path = os.path.join(folder, *name.split("/"))
    where = f"(the checkpoint's {MANIFEST} lists it with {expected['size']} bytes)"
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} is missing {where}")
    size = os.path.getsize(path)
    if size != expected["size"]:
        raise CheckpointError(f"{path} has {size} bytes, not the {expected['size']} it was saved with: "
                              "truncated or changed after saving")
    if describe(path)["sha256"] != expected["sha256"]:
        raise CheckpointError(f"{path} was changed after saving: its sha256 differs from the one in {MANIFEST}")


def _sign(key: bytes, files: dict) -> str:
    message = json.dumps({"format": FORMAT, "version": VERSION, "files": files}, sort_keys=True, separators=(",", ":"))
    return hmac.new(key, message.encode(), hashlib.sha256).hexdigest()
