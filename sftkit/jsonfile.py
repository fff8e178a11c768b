"""Reading the JSON files sftkit keeps or is given (run settings, configs, manifests) with errors that name them."""
import json
from typing import Callable


def read_object(path: str, fail: Callable[[str], Exception], why: str = "") -> dict:
    """The JSON object in `path`; an unreadable file, bad JSON or another JSON value raises fail(message), the
    message naming the file (and `why` it matters, when given)."""
    suffix = f": {why}" if why else ""
    try:
        with open(path, encoding="utf-8") as handle:
            value = json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise fail(f"{path} is not valid JSON ({error}){suffix}") from None
    if not isinstance(value, dict):
        raise fail(f"{path} must hold a JSON object{suffix}")
    return value
