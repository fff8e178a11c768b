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


def private_folder(path) -> Path:
    """Make `path` (and parents) if missing and leave it readable by this user only (0700): what sftkit keeps
    there (tokenized data, the checkpoint key) is trusted on the next run, so nobody else may write it."""
    path = Path(path)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        if path.stat().st_mode & 0o077:
            path.chmod(0o700)
    except PermissionError:  # a folder someone else owns (e.g. set through an environment variable): leave it
        pass
    return path


def private_file(path) -> int:
    """Open a new file for writing that only this user can read (0600); fails if it exists."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
