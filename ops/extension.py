"""Builds the compiled kernels on first use (torch.utils.cpp_extension.load + ninja) and caches them.

The build folder is keyed by torch version, CUDA version and a hash of the sources, so a later run loads
the cached build without compiling and a changed source or torch never reuses a stale one:
`$BIFIT_EXT_CACHE` or `~/.cache/bifit/extensions/<torch>-<cuda|cpu>-<hash>/<name>`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from functools import cache
from pathlib import Path

import torch

CSRC = Path(__file__).resolve().parent / "csrc"


class ExtensionBuildError(RuntimeError):
    """The compiled kernel could not be built; the message has the compiler's output and a fix."""


def _sources_hash(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:12]


def build_dir(name: str, sources: list[Path]) -> Path:
    root = Path(os.environ.get("BIFIT_EXT_CACHE", Path.home() / ".cache" / "bifit" / "extensions"))
    cuda = f"cu{torch.version.cuda}" if torch.version.cuda else "cpu"
    key = f"torch{torch.__version__.split('+')[0]}-{cuda}-{_sources_hash(sources)}"
    path = root / key / name
    path.mkdir(parents=True, exist_ok=True)
    return path


@cache
def load_cpu_extension(verbose: bool = False):
    """The CPU kernel module (functions `forward`, `backward`); raises ExtensionBuildError."""
    from torch.utils import cpp_extension

    sources = [CSRC / "ms_deform_attn_cpu.cpp"]
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        raise ExtensionBuildError("no C++ compiler found (install g++ or set CXX); using the pure-PyTorch path")
    try:
        return cpp_extension.load(
            name="bifit_msda_cpu", sources=[str(s) for s in sources], build_directory=str(build_dir("cpu", sources)),
            extra_cflags=["-O3", "-fopenmp", "-march=x86-64-v2" if os.uname().machine == "x86_64" else "-O3"],
            extra_ldflags=["-fopenmp"], verbose=verbose,
        )
    except Exception as err:  # noqa: BLE001 - the compiler's message is what the user needs
        tail = "\n".join(str(err).strip().splitlines()[-15:])
        raise ExtensionBuildError(f"building the CPU deformable-attention kernel failed:\n{tail}") from err
