"""Locally built models in a cache folder: built once, published atomically."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def build_once(target: Path, marker: str, build: Callable[[Path], None]) -> Path:
    """Return `target`, first running `build(scratch)` and renaming scratch to target if `target/marker` is missing.

    Building beside the target and renaming means concurrent builders (Ray workers) never see a half-written folder;
    the loser of a race keeps the winner's copy.
    """
    target = Path(target)
    if (target / marker).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(scratch)
        os.rename(scratch, target)
    except OSError:
        if not (target / marker).exists():
            raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target
