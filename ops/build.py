"""Just-in-time build of the deformable-attention kernels in `ops/csrc/`.

Each kernel ("cpu", "cuda") is its own extension, compiled on first use by
`torch.utils.cpp_extension.load` + ninja into
`$BIFIT_EXT_CACHE/<torch>-<cuXYZ|cpu>-<hash>` (default cache root `~/.cache/bifit/extensions`), where
the hash covers the sources and every build flag (so a changed source or arch list never loads a
stale build). A finished build leaves a marker file; later runs find it and only load the library,
without a compiler. Every failure is a `BuildError` saying why, what to do, and the compiler's output.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

CSRC = Path(__file__).resolve().parent / "csrc"
HEADERS = ("msda_common.h", "msda_checks.h", "msda_cpu_kernels.h")
SOURCES = {"cpu": ("msda_cpu.cpp",), "cuda": ("msda_cuda.cu", "msda_cuda_ops.cpp")}
CPU_CFLAGS = ("-O3", "-fopenmp")
CPU_LDFLAGS = ("-fopenmp",)
CUDA_CFLAGS = ("-O3",)
NVCC_FLAGS = ("-O3", "--threads=2")
LIB_EXT = ".pyd" if os.name == "nt" else ".so"
LOG_TAIL = 40  # lines of compiler output quoted in errors
FALLBACK_FIX = "or select the pure-PyTorch path with BIFIT_MSDA_BACKEND=pytorch / model.msda_backend: pytorch"


class BuildError(RuntimeError):
    """A kernel could not be built or loaded: `reason` says why, `fix` what to do, `log` the compiler output."""

    def __init__(self, kind: str, reason: str, fix: str, log: str = ""):
        self.kind, self.reason, self.fix, self.log = kind, reason, fix, log
        message = f"ms_deform_attn: cannot build the {kind} kernel: {reason}.\nFix: {fix}"
        if self.first_error():
            message += f"\nFirst error: {self.first_error()}"
        if log.strip():
            tail = "\n".join(log.strip().splitlines()[-LOG_TAIL:])
            message += f"\n--- compiler output (last {LOG_TAIL} lines) ---\n{tail}"
        super().__init__(message)

    def first_error(self) -> str:
        """The compiler's first error line, if the log has one."""
        for line in self.log.splitlines():
            if re.search(r"\berror\b", line, re.IGNORECASE) and "build stopped" not in line:
                return line.strip()
        return ""

    def summary(self) -> str:
        """One paragraph for a warning: why, the first compiler error, and the fix."""
        error = f" ({self.first_error()})" if self.first_error() else ""
        return f"{self.reason}{error}. Fix: {self.fix}"


def cache_root() -> Path:
    return Path(os.environ.get("BIFIT_EXT_CACHE") or Path.home() / ".cache" / "bifit" / "extensions")


def source_hash(kind: str, flags: tuple[str, ...]) -> str:
    h = hashlib.sha256()
    for name in (*SOURCES[kind], *HEADERS):
        h.update(name.encode() + b"\0" + (CSRC / name).read_bytes() + b"\0")
    h.update("\0".join(flags).encode())
    return h.hexdigest()[:12]


def build_dir(kind: str, flags: tuple[str, ...]) -> Path:
    """`<root>/<torch version>-<cuXYZ or cpu>-<hash of sources and flags>`."""
    toolkit = f"cu{torch.version.cuda.replace('.', '')}" if kind == "cuda" and torch.version.cuda else "cpu"
    torch_version = re.sub(r"[^0-9A-Za-z.]+", "_", torch.__version__)
    return cache_root() / f"{torch_version}-{toolkit}-{source_hash(kind, flags)}"


def _require_cxx(kind: str) -> None:
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        raise BuildError(kind, f"no C++ compiler found (looked for {cxx!r} on PATH)",
                         f"install one (e.g. `apt-get install g++`) or point CXX at it, {FALLBACK_FIX}")


def _require_ninja(kind: str) -> None:
    if shutil.which("ninja") is not None:
        return
    try:  # the pip package ships the binary next to the interpreter, which may not be on PATH
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass
    if shutil.which("ninja") is None:
        raise BuildError(kind, "ninja not found", f"`pip install ninja` in this environment, {FALLBACK_FIX}")


def find_cuda_home() -> str:
    """The CUDA toolkit root: the first of $CUDA_HOME, $CUDA_PATH, nvcc on PATH, /usr/local/cuda with
    bin/nvcc and include/cuda_runtime.h."""
    fix = (f"install the CUDA toolkit {torch.version.cuda} (the version this torch was built with) and set "
           f"CUDA_HOME to its root (the folder holding bin/nvcc and include/cuda_runtime.h), {FALLBACK_FIX}")
    ok = lambda root: (Path(root) / "bin" / "nvcc").exists() and (Path(root) / "include" / "cuda_runtime.h").exists()
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            if ok(os.environ[var]):
                return os.environ[var]
            raise BuildError("cuda", f"{var}={os.environ[var]} has no bin/nvcc or no include/cuda_runtime.h", fix)
    candidates = []
    if shutil.which("nvcc"):
        candidates.append(Path(shutil.which("nvcc")).resolve().parent.parent)
    candidates += [Path("/usr/local/cuda"), *sorted(Path("/usr/local").glob("cuda-*"), reverse=True)]
    for root in candidates:
        if ok(root):
            return str(root)
    raise BuildError("cuda", "no CUDA toolkit found (CUDA_HOME unset, no nvcc with headers on PATH or in "
                     "/usr/local/cuda)", fix)


def nvcc_version(cuda_home: str) -> str:
    out = subprocess.run([str(Path(cuda_home) / "bin" / "nvcc"), "--version"], capture_output=True, text=True)
    match = re.search(r"release (\d+\.\d+)", out.stdout)
    if not match:
        raise BuildError("cuda", f"cannot read the version of {cuda_home}/bin/nvcc", "check the CUDA install",
                         out.stdout + out.stderr)
    return match.group(1)


def cuda_arch_list(arch_list: list[str] | None = None) -> list[str]:
    """Architectures like ["8.0", "9.0+PTX"]: the argument, else $TORCH_CUDA_ARCH_LIST, else the visible GPUs."""
    from_env = arch_list is None and os.environ.get("TORCH_CUDA_ARCH_LIST", "native") != "native"
    if from_env:
        arch_list = os.environ["TORCH_CUDA_ARCH_LIST"].replace(" ", ";").split(";")
    if arch_list is None:
        if not torch.cuda.is_available():
            raise BuildError("cuda", "no GPU is visible to pick architectures from",
                             "set TORCH_CUDA_ARCH_LIST, e.g. TORCH_CUDA_ARCH_LIST='8.0;9.0'")
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        arch_list = [f"{a}.{b}" for a, b in caps]
        arch_list[-1] += "+PTX"
    arch_list = [a.strip() for a in arch_list if a.strip()]
    bad = [a for a in arch_list if not re.fullmatch(r"\d+\.\d+a?(\+PTX)?", a)]
    if bad or not arch_list:
        raise BuildError("cuda", f"cannot read the CUDA architecture list {arch_list}",
                         "use numbers like TORCH_CUDA_ARCH_LIST='8.0;9.0+PTX'")
    if from_env and torch.cuda.is_available():  # catch "no kernel image is available" before it happens
        for i in range(torch.cuda.device_count()):
            cap = torch.cuda.get_device_capability(i)
            if not any(_runs_on(a, cap) for a in arch_list):
                raise BuildError("cuda", f"TORCH_CUDA_ARCH_LIST={';'.join(arch_list)} has no code for GPU {i} "
                                 f"(sm_{cap[0]}{cap[1]})", f"add {cap[0]}.{cap[1]} to TORCH_CUDA_ARCH_LIST or unset it")
    return arch_list


def _runs_on(arch: str, cap: tuple[int, int]) -> bool:
    """Whether code built for `arch` ("8.0", "9.0+PTX") runs on a GPU of compute capability `cap`."""
    major, minor = (int(x) for x in arch.split("+")[0].rstrip("a").split("."))
    if arch.endswith("+PTX"):
        return (major, minor) <= cap
    return major == cap[0] and minor <= cap[1]


def gencode_flags(arch_list: list[str]) -> list[str]:
    flags = []
    for arch in arch_list:
        num = arch.split("+")[0].replace(".", "")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if arch.endswith("+PTX"):
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    return flags


def _compile(kind: str, name: str, directory: Path, cflags, cuda_cflags, ldflags, verbose: bool) -> Path:
    from torch.utils import cpp_extension

    directory.mkdir(parents=True, exist_ok=True)
    try:
        cpp_extension.load(name, [str(CSRC / s) for s in SOURCES[kind]], extra_cflags=list(cflags),
                           extra_cuda_cflags=list(cuda_cflags), extra_ldflags=list(ldflags),
                           extra_include_paths=[str(CSRC)], build_directory=str(directory), verbose=verbose,
                           with_cuda=kind == "cuda", is_python_module=False)
    except (RuntimeError, OSError, subprocess.CalledProcessError) as e:
        text = str(e)
        log = text.split(":", 1)[1] if text.startswith("Error building extension") else text
        raise BuildError(kind, "compilation failed" if "Error building" in text else f"build error: {text[:200]}",
                         f"remove {directory} to force a clean rebuild; BIFIT_MSDA_BACKEND={kind} "
                         f"shows the full compiler output; {FALLBACK_FIX}", log) from e
    library = directory / f"{name}{LIB_EXT}"
    (directory / f"{name}.ok").write_text(f"built {time.strftime('%Y-%m-%d %H:%M:%S')} with torch "
                                          f"{torch.__version__} by {sys.executable}\n")
    return library


def build(kind: str, arch_list: list[str] | None = None, verbose: bool = False) -> str:
    """Build (or find) the `kind` extension, load it and return its `torch.ops` namespace name."""
    if kind not in SOURCES:
        raise ValueError(f"kind must be one of {sorted(SOURCES)}, got {kind!r}")
    cuda_cflags: tuple[str, ...] = ()
    if kind == "cuda":
        if torch.version.cuda is None:
            raise BuildError("cuda", f"this torch ({torch.__version__}) was built without CUDA",
                             f"install a CUDA build of torch, {FALLBACK_FIX}")
        cuda_cflags = (*NVCC_FLAGS, *gencode_flags(cuda_arch_list(arch_list)))
        cflags, ldflags = CUDA_CFLAGS, ()
    else:
        cflags, ldflags = CPU_CFLAGS, CPU_LDFLAGS
    flags = (*cflags, "|", *cuda_cflags, "|", *ldflags)
    directory = build_dir(kind, flags)
    name = f"bifit_msda_{kind}_{source_hash(kind, flags)}"
    library, marker = directory / f"{name}{LIB_EXT}", directory / f"{name}.ok"
    if library.exists() and marker.exists():  # a finished build: no compiler or toolkit needed
        try:
            torch.ops.load_library(str(library))
            return name
        except OSError:  # a half-copied cache, another platform's build: rebuild below
            marker.unlink(missing_ok=True)
    _require_cxx(kind)
    _require_ninja(kind)
    if kind == "cuda":
        from torch.utils import cpp_extension

        home = find_cuda_home()
        version = nvcc_version(home)
        if version.split(".")[0] != torch.version.cuda.split(".")[0]:
            raise BuildError("cuda", f"nvcc {version} at {home} does not match the CUDA {torch.version.cuda} "
                             "this torch was built with", f"set CUDA_HOME to a CUDA {torch.version.cuda} toolkit, "
                             f"or install the torch build for CUDA {version}, {FALLBACK_FIX}")
        cpp_extension.CUDA_HOME = home  # torch guesses from nvcc's folder, which can be a wrapper script
    _compile(kind, name, directory, cflags, cuda_cflags, ldflags, verbose)
    return name


_loaded: dict[str, object] = {}
_failed: dict[str, BuildError] = {}


def load_kernels(kind: str):
    """The `torch.ops` namespace holding `forward`/`backward` of the `kind` kernel, built on the first call.

    A failure is remembered too, so a broken toolchain costs one attempt per process (see `forget`)."""
    if kind in _loaded:
        return _loaded[kind]
    if kind in _failed:
        raise _failed[kind]
    try:
        _loaded[kind] = getattr(torch.ops, build(kind))
    except BuildError as e:
        _failed[kind] = e
        raise
    return _loaded[kind]


def forget() -> None:
    """Drop remembered builds and failures (the next `load_kernels` tries again)."""
    _loaded.clear()
    _failed.clear()
