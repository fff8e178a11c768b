"""Image references: a file path, an http(s) URL, a data URL or bare base64, resolved, checked and opened.

A row names its images; loading resolves each reference once (relative paths against the data file's
folder, then the current folder; hub images given as bytes go to the sftkit cache) so a conversation always
carries references that open from anywhere. URLs are downloaded once into the cache.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import io
import os
import re
import urllib.error
import urllib.request

from .. import paths
from .errors import DataError

URL_PREFIXES = ("http://", "https://")
DATA_URL = re.compile(r"data:image/[\w.+-]+;base64,(.*)", re.S)
_BASE64 = re.compile(r"[A-Za-z0-9+/\r\n]+={0,2}")
DOWNLOAD_TIMEOUT = 30


def resolve_image(reference, base_dir: str | None = None) -> str:
    """The reference as one that opens from anywhere: an absolute path, a URL or base64 as given.

    `reference` is a string or a Hugging Face image value ({"bytes", "path"}), whose bytes are written to the cache.
    """
    if isinstance(reference, dict):
        if reference.get("bytes"):
            return _cached_bytes(reference["bytes"], reference.get("path"))
        reference = reference.get("path")
    if not isinstance(reference, str) or not reference:
        raise DataError(f"an image must be a path, URL or base64 string, got {type(reference).__name__}")
    if reference.startswith(URL_PREFIXES) or DATA_URL.match(reference):
        return reference
    path = os.path.expanduser(reference.removeprefix("file://"))
    candidates = [os.path.join(base_dir, path)] if base_dir and not os.path.isabs(path) else []
    candidates.append(path)
    for candidate in candidates:
        if os.path.isfile(candidate):
            return os.path.abspath(candidate)
    if _is_base64(reference):
        return reference
    where = f" (looked in {base_dir} and the current folder)" if base_dir and not os.path.isabs(path) else ""
    raise DataError(f"no such image file '{reference}'{where}")


def image_bytes(reference: str) -> bytes:
    """The encoded image a resolved reference names (a URL is downloaded once into the cache)."""
    data_url = DATA_URL.match(reference)
    if data_url or _is_base64(reference):
        try:
            return base64.b64decode(data_url.group(1) if data_url else reference)
        except (binascii.Error, ValueError) as error:
            raise DataError(f"the image's base64 does not decode: {error}") from None
    path = _downloaded(reference) if reference.startswith(URL_PREFIXES) else reference
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as error:
        raise DataError(f"cannot read the image file '{path}': {error.strerror or error}") from None


def open_image(reference: str):
    """The image as RGB pixels, fully decoded (a damaged file fails here, naming the reference)."""
    with _opened(reference) as image:
        try:
            image.load()
        except OSError as error:
            raise DataError(f"the image {_short(reference)} is damaged: {error}") from None
        return image.convert("RGB")


def image_size(reference: str) -> tuple[int, int]:
    """(width, height) from the image's header, which is enough to know how many tokens it becomes."""
    with _opened(reference) as image:
        return image.size


def _opened(reference: str):
    from PIL import Image, UnidentifiedImageError

    source = reference if os.path.isfile(reference) else io.BytesIO(image_bytes(reference))
    try:
        return Image.open(source)
    except (UnidentifiedImageError, OSError) as error:
        raise DataError(f"{_short(reference)} is not a readable image ({error})") from None


def _is_base64(reference: str) -> bool:
    return len(reference) >= 64 and not os.path.exists(reference) and _BASE64.fullmatch(reference) is not None


def _downloaded(url: str) -> str:
    """The cached copy of an image URL, downloaded on first use (written whole, then renamed)."""
    suffix = os.path.splitext(url.split("?")[0])[1][:8]
    target = os.path.join(paths.cache_dir(), "images", hashlib.sha256(url.encode()).hexdigest()[:32] + suffix)
    if os.path.isfile(target):
        return target
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT) as response:
            data = response.read()
    except (urllib.error.URLError, OSError, ValueError) as error:
        reason = getattr(error, "reason", error)
        raise DataError(f"could not download the image {url}: {reason}. Offline? Download it and give its path "
                        "instead") from None
    return _write_atomically(target, data)


def _cached_bytes(data: bytes, name: str | None) -> str:
    suffix = os.path.splitext(name or "")[1][:8] or ".img"
    target = os.path.join(paths.cache_dir(), "images", hashlib.sha256(data).hexdigest()[:32] + suffix)
    return target if os.path.isfile(target) else _write_atomically(target, data)


def _write_atomically(target: str, data: bytes) -> str:
    os.makedirs(os.path.dirname(target), exist_ok=True)
    temporary = f"{target}.{os.getpid()}.tmp"
    with open(temporary, "wb") as handle:
        handle.write(data)
    os.replace(temporary, target)
    return target


def _short(reference: str) -> str:
    return f"'{reference}'" if len(reference) <= 120 else f"'{reference[:60]}…' ({len(reference)} characters)"
