"""The project files a stage's command runs: its `python -m <module>` and every project module that module
imports, transitively (any import statement, also inside functions, not under `if TYPE_CHECKING:`), plus the files
a module opens next to itself (`Path(__file__)... "name"`, e.g. ops/build.py's kernel sources in ops/csrc)."""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = frozenset(p.name for p in REPO.iterdir() if (p / "__init__.py").is_file() and p.name != "tests")


COMPOUND = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.If, ast.For, ast.While, ast.With, ast.Try)


def module_file(name: str) -> Path | None:
    """The file of project module `name` (a.b.c -> a/b/c.py or a/b/c/__init__.py), None outside the project."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = REPO.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _walk(node: ast.AST):
    """ast.walk without the bodies of `if TYPE_CHECKING:` (never executed) and of a module's `__getattr__`
    (run on access to one of its names: `lazy_attributes`)."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            for sub in child.orelse:
                yield sub
                yield from _walk(sub)
            continue
        if isinstance(node, ast.Module) and isinstance(child, ast.FunctionDef) and child.name == "__getattr__":
            continue
        yield child
        yield from _walk(child)


def _imports(node: ast.AST, package: str, walk=_walk) -> set[str]:
    """The modules the import statements under `node` load (`package`: where relative imports start)."""
    modules = set()
    for sub in walk(node):
        if isinstance(sub, ast.Import):
            for alias in sub.names:
                modules.update(_with_parents(alias.name))
        elif isinstance(sub, ast.ImportFrom):
            if sub.level:
                base = package.split(".")[: len(package.split(".")) - sub.level + 1]
                mod = ".".join(base + ([sub.module] if sub.module else []))
            else:
                mod = sub.module
            modules.update(_with_parents(mod))
            modules.update(f"{mod}.{alias.name}" for alias in sub.names if module_file(f"{mod}.{alias.name}"))
    return modules


@cache
def lazy_attributes(package: str) -> dict[str, frozenset[str]]:
    """A package's module-level `__getattr__`: name -> the modules imported when that name is accessed (branches
    `if name == "x":`; imports outside such a branch count for every name, key "*")."""
    path = module_file(package)
    if path is None or path.name != "__init__.py":
        return {}
    out: dict[str, set[str]] = {}
    for fn in ast.parse(path.read_text()).body:
        if not (isinstance(fn, ast.FunctionDef) and fn.name == "__getattr__"):
            continue
        covered = set()
        for node in ast.walk(fn):
            test = node.test if isinstance(node, ast.If) else None
            if (isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq)
                    and isinstance(test.comparators[0], ast.Constant)):
                mods = set()
                for stmt in node.body:
                    mods |= _imports(ast.Module(body=[stmt], type_ignores=[]), package, walk=ast.walk)
                    covered |= {id(n) for n in ast.walk(stmt)}
                out.setdefault(test.comparators[0].value, set()).update(mods)
        rest = [n for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom)) and id(n) not in covered]
        out.setdefault("*", set()).update(_imports(ast.Module(body=rest, type_ignores=[]), package, walk=ast.walk))
    return {k: frozenset(v) for k, v in out.items()}


def _with_parents(name: str) -> list[str]:
    """Importing a.b.c runs a/__init__.py and a/b/__init__.py too."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


@cache
def direct_needs(path: Path) -> tuple[frozenset[str], frozenset[Path]]:
    """(project modules `path` imports, other files it opens next to itself)."""
    tree = ast.parse(path.read_text(), str(path))
    this = module_name(path)
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    modules, files = _imports(tree, package), set()
    for node in _walk(tree):
        # names taken from a package with a lazy __getattr__: `from bifit import load_model`, `bifit.load_model`
        if isinstance(node, ast.ImportFrom) and not node.level and node.module:
            for alias in node.names:
                modules |= _lazy(node.module, alias.name)
        elif isinstance(node, ast.Attribute):
            base = _dotted(node.value)
            if base:
                modules |= _lazy(base, node.attr)
        elif isinstance(node, ast.stmt) and not isinstance(node, COMPOUND):
            names = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
            if "__file__" in names:  # e.g. CSRC = Path(__file__).resolve().parent / "csrc"
                for const in ast.walk(node):
                    if isinstance(const, ast.Constant) and isinstance(const.value, str) and const.value:
                        target = path.parent / const.value
                        if target.exists() and target.resolve().is_relative_to(REPO):
                            files.add(target.resolve())
    return frozenset(m for m in modules if module_file(m)), frozenset(files)


def _dotted(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return base and f"{base}.{node.attr}"
    return None


def _lazy(package: str, name: str) -> set[str]:
    if module_file(package) is None or module_file(f"{package}.{name}"):
        return set()
    lazy = lazy_attributes(package)
    return set(lazy.get(name, ())) | set(lazy.get("*", ())) if lazy else set()


def needed_files(module: str) -> set[Path]:
    """Every project file `python -m module` runs or reads next to its code (absolute paths)."""
    seen_modules: set[str] = set()
    files: set[Path] = set()
    todo = _with_parents(module)
    while todo:
        name = todo.pop()
        if name in seen_modules or module_file(name) is None:
            continue
        seen_modules.add(name)
        path = module_file(name)
        files.add(path)
        mods, extra = direct_needs(path)
        todo.extend(mods)
        for f in extra:
            files.add(f)
            if f.suffix == ".py" and f.is_relative_to(REPO):
                todo.append(module_name(f))
    return files


def command_modules(cmd: str) -> list[str]:
    """The modules a stage command runs: `python -m a.b` and `python a/b.py`."""
    mods = re.findall(r"\bpython3?\s+-m\s+([\w.]+)", cmd)
    mods += [module_name(REPO / p) for p in re.findall(r"\bpython3?\s+([\w/]+\.py)\b", cmd)]
    return mods
