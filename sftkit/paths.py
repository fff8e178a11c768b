"""Where sftkit keeps things: the user's cache, and the data files shipped in the package (default data, presets)."""
from __future__ import annotations

import os
from importlib import resources
from pathlib import Path


def cache_dir() -> Path:
    """$SFTKIT_CACHE, else $XDG_CACHE_HOME/sftkit, else ~/.cache/sftkit."""
    if os.environ.get("SFTKIT_CACHE"):
        return Path(os.environ["SFTKIT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sftkit"


def packaged(package: str, name: str) -> str:
    """A data file shipped inside the wheel (found the same way in an editable or a normal install)."""
    path = resources.files(package) / name
    if not path.is_file():
        raise FileNotFoundError(f"'{name}' is missing from the installed package {package}: reinstall sftkit")
    return str(path)


def bundled(relative: str) -> str:
    """A file of the bundled example data (examples/data in the repository, sftkit/example_data in the wheel)."""
    return packaged("sftkit.example_data", relative)
