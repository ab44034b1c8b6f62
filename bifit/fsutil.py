"""Atomic replacement of an output folder (written next to it under a temporary name first)."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
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


def component_problem(value) -> str | None:
    """Why `value` cannot be one file or folder name (None when it can). Ids and frame names read from metadata
    become path components: "../x", "a/b", "" or ".." would read or write outside the dataset or output folder."""
    if not isinstance(value, str) or not value:
        return "it is empty"
    if value in (".", ".."):
        return f"{value!r} names a folder itself"
    if "/" in value or "\\" in value:
        return "it contains a path separator"
    if "\x00" in value:
        return "it contains a NUL character"
    return None


def relative_path_problem(value: str) -> str | None:
    """Why `value` cannot be a path inside a dataset root (None when it can): absolute, or a '..' component."""
    if not isinstance(value, str) or not value:
        return "it is empty"
    if value.startswith(("/", "\\")) or (len(value) > 1 and value[1] == ":"):
        return "it is absolute"
    if ".." in value.replace("\\", "/").split("/"):
        return "it has a '..' component"
    if "\x00" in value:
        return "it contains a NUL character"
    return None


@contextlib.contextmanager
def staged_folder(dst: Path) -> Iterator[Path]:
    """A fresh temporary folder next to `dst` to write into: it replaces `dst` when the block completes and is
    removed when the block raises, so a reader never sees a half-written folder (and a rerun starts clean)."""
    dst = Path(dst)
    tmp = dst.parent / f".{dst.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        replace_dir(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
