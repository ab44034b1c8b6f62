"""Verification of a dataset folder against a manifest: expected files, folders, counts, line counts, sizes and
SHA-256 checksums. Used by the download stage before anything else runs.

A manifest is a list of :class:`Expect` entries relative to the dataset root. :func:`verify` checks all of them and
returns every problem at once (not only the first), each naming the path, what was expected and what was found.
Checksums of large files are cached by (size, mtime) in ``<root>/.bifit_checksums.json`` so that a second
verification does not read gigabytes again.

Pins: :func:`read_pins` reads a ``sha256sum``-style file (``<hex>  <relative path>`` per line) and
:func:`with_pins` adds its checksums to a manifest, so a user who has verified a download once can pin it.
"""

from __future__ import annotations

import fnmatch
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from bifit.prepare.archive import sha256_file

CHECKSUM_CACHE = ".bifit_checksums.json"


class ManifestError(ValueError):
    """A dataset folder that does not match its manifest; ``problems`` lists every mismatch."""

    def __init__(self, name: str, root, problems: list[str], hint: str = ""):
        self.name, self.root, self.problems = name, str(root), problems
        lines = "\n  ".join(problems[:40]) + (f"\n  ... and {len(problems) - 40} more" if len(problems) > 40 else "")
        super().__init__(f"{name} at {root}: {len(problems)} problem(s)\n  {lines}" + (f"\n{hint}" if hint else ""))


@dataclass(frozen=True)
class Expect:
    """One expected path below the root.

    kind "file": exists; optional ``size`` (bytes), ``sha256``, ``lines`` (number of non-empty lines).
    kind "dir": exists; optional ``count`` / ``min_count`` of direct entries matching ``pattern``
    (``entries`` "dirs", "files" or "any"). ``count`` is for numbers the release fixes, ``min_count`` for those
    that legitimately vary between copies of it.
    ``source`` says where the file comes from (shown with a problem); ``if_missing`` is the instruction added
    when the path is absent (``{path}`` is replaced by its full path).
    """

    path: str
    kind: str = "file"
    size: int | None = None
    sha256: str | None = None
    lines: int | None = None
    count: int | None = None
    min_count: int | None = None
    pattern: str = "*"
    entries: str = "any"
    source: str = ""
    if_missing: str = ""

    def __post_init__(self):
        if self.kind not in ("file", "dir"):
            raise ValueError(f"Expect.kind: expected 'file' or 'dir', got {self.kind!r} ({self.path})")
        if self.entries not in ("dirs", "files", "any"):
            raise ValueError(f"Expect.entries: expected 'dirs', 'files' or 'any', got {self.entries!r}")

    def expected(self) -> dict:
        """What is checked besides existence, e.g. ``{"min_count": 202}`` (for the status report)."""
        fields = {"size": self.size, "sha256": self.sha256, "lines": self.lines, "count": self.count,
                  "min_count": self.min_count}
        return {k: v for k, v in fields.items() if v is not None}

    def missing(self, path: Path, what: str) -> str:
        """The problem line for an absent path, with the instruction when there is one."""
        line = f"{path}: missing {what}" + (f" (from {self.source})" if self.source else "")
        return line + (f"; {self.if_missing.replace('{path}', str(path))}" if self.if_missing else "")


@dataclass
class Manifest:
    name: str
    items: list[Expect] = field(default_factory=list)

    def paths(self) -> list[str]:
        return [e.path for e in self.items]


@dataclass
class VerifyReport:
    name: str
    root: str
    problems: list[str]
    checked: dict[str, dict]  # path -> what was found (size, sha256, lines, count) and the "expected" checks

    @property
    def ok(self) -> bool:
        return not self.problems

    def raise_if_bad(self, hint: str = "") -> VerifyReport:
        if self.problems:
            raise ManifestError(self.name, self.root, self.problems, hint)
        return self

    def as_dict(self) -> dict:
        return {"name": self.name, "root": self.root, "ok": self.ok, "problems": self.problems,
                "checked": self.checked}


class _ChecksumCache:
    def __init__(self, root: Path, cache_file: Path | None = None):
        self.path = Path(cache_file) if cache_file is not None else root / CHECKSUM_CACHE
        try:
            self.data = json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError):
            self.data = {}
        self.dirty = False

    def sha256(self, rel: str, path: Path) -> str:
        st = path.stat()
        key = [st.st_size, st.st_mtime_ns]
        hit = self.data.get(rel)
        if hit and hit[:2] == key:
            return hit[2]
        digest = sha256_file(path)
        self.data[rel] = [*key, digest]
        self.dirty = True
        return digest

    def save(self) -> None:
        if self.dirty and self.path.parent.is_dir():
            tmp = self.path.with_name(self.path.name + ".partial")
            tmp.write_text(json.dumps(self.data, indent=0, sort_keys=True))
            os.replace(tmp, self.path)


def _entries(folder: Path, e: Expect) -> list[str]:
    names = []
    with os.scandir(folder) as it:
        for d in it:
            if d.name.startswith("."):
                continue
            if e.entries == "dirs" and not d.is_dir():
                continue
            if e.entries == "files" and not d.is_file():
                continue
            if fnmatch.fnmatch(d.name, e.pattern):
                names.append(d.name)
    return names


def _count_lines(path: Path) -> int:
    with path.open("rb") as fh:
        return sum(1 for line in fh if line.strip())


def verify(manifest: Manifest, root, cache_file: Path | None = None) -> VerifyReport:
    """Check every entry of ``manifest`` below ``root``; the report lists all problems. ``cache_file``: where the
    checksum cache lives (default ``<root>/.bifit_checksums.json``; elsewhere when ``root`` is another stage's output,
    which a file written into it would change)."""
    root = Path(root)
    problems, checked = [], {}
    cache = _ChecksumCache(root, cache_file)
    for e in manifest.items:
        path = root / e.path
        hint = f" (from {e.source})" if e.source else ""
        expected = {"expected": e.expected()} if e.expected() else {}
        if e.kind == "dir":
            if not path.is_dir():
                problems.append(e.missing(path, "folder"))
                continue
            n = len(_entries(path, e))
            checked[e.path] = {"count": n, **expected}
            what = {"dirs": "sub-folders", "files": "files", "any": "entries"}[e.entries]
            if e.count is not None and n != e.count:
                problems.append(f"{path}: {n} {what} matching {e.pattern!r}, expected {e.count}{hint}")
            if e.min_count is not None and n < e.min_count:
                problems.append(f"{path}: {n} {what} matching {e.pattern!r}, expected at least {e.min_count}{hint}")
            continue
        if not path.is_file():
            problems.append(e.missing(path, "file"))
            continue
        found = {"size": path.stat().st_size}
        if e.size is not None and found["size"] != e.size:
            problems.append(f"{path}: {found['size']} bytes, expected {e.size}{hint}")
        if e.lines is not None:
            found["lines"] = _count_lines(path)
            if found["lines"] != e.lines:
                problems.append(f"{path}: {found['lines']} non-empty lines, expected {e.lines}{hint}")
        if e.sha256 is not None:
            found["sha256"] = cache.sha256(e.path, path)
            if found["sha256"] != e.sha256.lower():
                problems.append(f"{path}: SHA-256 {found['sha256']}, expected {e.sha256.lower()}{hint}")
        checked[e.path] = {**found, **expected}
    cache.save()
    return VerifyReport(manifest.name, str(root), problems, checked)


def read_pins(path) -> dict[str, str]:
    """``sha256sum`` format: ``<64 hex>  <relative path>`` per line (``#`` comments and blank lines ignored)."""
    pins = {}
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(maxsplit=1)
        if len(parts) != 2 or len(parts[0]) != 64 or any(c not in "0123456789abcdefABCDEF" for c in parts[0]):
            raise ValueError(f"{path}:{n}: expected '<sha256 hex>  <relative path>', got {line!r}")
        pins[parts[1].lstrip("*").strip()] = parts[0].lower()
    return pins


def with_pins(manifest: Manifest, pins: dict[str, str]) -> Manifest:
    """The manifest with the pinned checksums added (pinned paths it does not list are added as files)."""
    items, listed = [], set()
    for e in manifest.items:
        listed.add(e.path)
        items.append(replace(e, sha256=pins[e.path]) if e.path in pins and e.kind == "file" else e)
    items += [Expect(p, sha256=h, source="pins file") for p, h in sorted(pins.items()) if p not in listed]
    return Manifest(manifest.name, items)


def checksums(root, paths, cache_file: Path | None = None) -> dict[str, str]:
    """SHA-256 of the given root-relative files (cached), e.g. to write a pins file after a first check."""
    root = Path(root)
    cache = _ChecksumCache(root, cache_file)
    out = {p: cache.sha256(p, root / p) for p in paths}
    cache.save()
    return out
