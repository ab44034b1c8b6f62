"""Atomic replacement of an output folder (written next to it under a temporary name first)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def replace_dir(src: Path, dst: Path) -> None:
    """Move the finished folder `src` to `dst`, replacing what was there (a folder, a file or a link)."""
    src, dst = Path(src), Path(dst)
    old = dst.parent / f".{dst.name}.old-{os.getpid()}"
    if dst.exists() or dst.is_symlink():
        os.replace(dst, old)
    os.replace(src, dst)
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old)
    elif old.exists() or old.is_symlink():
        old.unlink()
