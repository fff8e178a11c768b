"""Where sftkit keeps things: the user's cache and the example data bundled with the repo."""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def cache_dir() -> Path:
    """$SFTKIT_CACHE, else $XDG_CACHE_HOME/sftkit, else ~/.cache/sftkit."""
    if os.environ.get("SFTKIT_CACHE"):
        return Path(os.environ["SFTKIT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sftkit"


def bundled(relative: str) -> str:
    """A file under examples/ of the sftkit checkout (installed with `pip install -e .`)."""
    path = REPO_ROOT / "examples" / relative
    if not path.exists():
        raise FileNotFoundError(
            f"bundled example '{relative}' not found at {path}: the examples ship with the source checkout; "
            "install sftkit from a clone with `pip install -e .` or pass --dataset"
        )
    return str(path)
