"""Safe, resumable extraction of the dataset archives (zip, tar, tar.gz, tar.bz2, tar.xz).

Every member is checked before anything is written, and the whole archive is refused when one member is unsafe:

- absolute names (``/x``, ``C:/x``, ``\\\\server\\x``) and names with a ``..`` component;
- symbolic links whose target is absolute or resolves outside the target folder; hard links to anything that is
  not an earlier regular-file member of the same archive;
- device files, FIFOs and other special members;
- two members with the same path (the second would silently replace the first);
- size bombs: more than ``ExtractLimits.max_total_bytes`` uncompressed in total, a member larger than
  ``ratio_min_bytes`` whose uncompressed/compressed ratio exceeds ``max_ratio`` (zip), or a total ratio above
  ``max_ratio`` (compressed tar, where only the total is known); the bytes actually written are counted too, so a
  header that understates a size stops the extraction.

Writing never overwrites silently: an existing file with the same bytes is left alone (so a second run is a no-op
and an interrupted run resumes where it stopped), an existing file with other bytes is an error naming it (pass
``overwrite=True`` to replace it). The one exception follows ``unzip``, which the official instructions use (the
two Ref-DAVIS17 zips both carry such files): a documentation file (README, SOURCES, LICENSE, ... by name) holding
exactly the copy another archive has of it is replaced by this archive's regular file, with a warning naming both
archives and the path (``ExtractReport.replaced``). The other archive is known from its extraction record (which
keeps the SHA-256 of its documentation files) or, when ``official_order`` lists the archives extracted into the
target, by reading its member. When that other archive comes later in ``official_order`` the file is left as it
is (``ExtractReport.kept``), so extracting in any order, or after a plain ``unzip`` by hand, ends as the official
order does. Data files, edited files, folders, links and anything reached through a link are never replaced.

Each file is written to a temporary name and renamed into place, so a crash never leaves a truncated file under its
final name; every write goes through the resolved real path of its folder, which must stay inside the target (no
writing through links, old or new). After a complete extraction a small record (archive size and mtime, and the
SHA-256 of its documentation files) is kept under ``<target>/.extracted/`` and later calls return at once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from tqdm import tqdm

RECORD_DIR = ".extracted"
_CHUNK = 1 << 20
# file names (before the first dot, any case) of documentation that official archives may share
DOC_NAMES = ("README", "SOURCES", "LICENSE", "LICENCE", "COPYING", "NOTICE", "AUTHORS", "CHANGELOG", "CHANGES",
             "CITATION")
DOC_MAX_BYTES = 16 << 20  # a larger "README" of another archive is not read to compare it (size bomb)

log = logging.getLogger(__name__)


class ArchiveError(ValueError):
    """An archive that is refused or cannot be extracted: ``archive``, ``member`` (or None) and ``reason``."""

    def __init__(self, archive, member: str | None, reason: str):
        self.archive, self.member, self.reason = str(archive), member, reason
        where = f" member {member!r}" if member is not None else ""
        super().__init__(f"{archive}:{where} {reason}")


@dataclass(frozen=True)
class ExtractLimits:
    max_total_bytes: int = 256 << 30  # 256 GiB: A2D-Sentences, the largest set, is far below
    max_ratio: float = 200.0  # uncompressed / compressed
    ratio_min_bytes: int = 1 << 20  # members below this size are never refused for their ratio
    max_members: int = 5_000_000


@dataclass
class Member:
    """One archive entry in a format-neutral form."""

    name: str  # normalised relative POSIX path
    kind: str  # "file" | "dir" | "symlink" | "hardlink"
    size: int = 0  # uncompressed bytes (files)
    compressed: int | None = None  # zip only
    link: str | None = None  # symlink target (as stored) or hard-link source member
    mode: int | None = None
    handle: object = field(default=None, repr=False)  # ZipInfo or TarInfo


@dataclass
class ExtractReport:
    archive: str
    target: str
    files_written: int = 0
    files_identical: int = 0  # already present with the same bytes (resumed or repeated run)
    dirs: int = 0
    links: int = 0
    bytes_written: int = 0
    skipped_complete: bool = False  # the record of an earlier complete extraction matched
    replaced: list[str] = field(default_factory=list)  # documentation files another archive had extracted
    kept: list[str] = field(default_factory=list)  # documentation files left as a later official archive has them

    def as_dict(self) -> dict:
        return dict(self.__dict__)


# ----------------------------------------------------------------------------------------------------------------
# listing and checks


def archive_kind(path: Path) -> str:
    if zipfile.is_zipfile(path):
        return "zip"
    if tarfile.is_tarfile(path):
        return "tar"
    raise ArchiveError(path, None, "not a zip or tar archive (or the file is damaged)")


def safe_name(archive, raw: str) -> str:
    """The member name as a normalised relative POSIX path; raises ArchiveError for absolute names and ``..``."""
    name = raw.replace("\\", "/")
    if name.startswith("/") or (len(name) > 1 and name[1] == ":") or name.startswith("//"):
        raise ArchiveError(archive, raw, "absolute path refused")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise ArchiveError(archive, raw, "path with a '..' component refused")
    if not parts:
        raise ArchiveError(archive, raw, "empty member name refused")
    return "/".join(parts)


def _zip_members(archive: Path, zf: zipfile.ZipFile) -> Iterator[Member]:
    for info in zf.infolist():
        name = safe_name(archive, info.filename)
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):
            target = zf.read(info).decode("utf-8", errors="replace")
            yield Member(name, "symlink", link=target, handle=info)
        elif info.is_dir():
            yield Member(name, "dir", handle=info)
        elif stat.S_IFMT(mode) and not stat.S_ISREG(mode):  # no type bits: a regular file (zipfile.writestr)
            raise ArchiveError(archive, info.filename, f"special file (mode {oct(mode)}) refused")
        else:
            yield Member(name, "file", size=info.file_size, compressed=info.compress_size,
                         mode=stat.S_IMODE(mode) or None, handle=info)


def _tar_members(archive: Path, tf: tarfile.TarFile) -> Iterator[Member]:
    for info in tf:
        name = safe_name(archive, info.name)
        if info.issym():
            yield Member(name, "symlink", link=info.linkname, handle=info)
        elif info.islnk():
            yield Member(name, "hardlink", link=info.linkname, handle=info)
        elif info.isdir():
            yield Member(name, "dir", handle=info)
        elif info.isreg():
            yield Member(name, "file", size=info.size, mode=stat.S_IMODE(info.mode), handle=info)
        else:
            raise ArchiveError(archive, info.name, "device, FIFO or other special member refused")


def _resolve_link(name: str, target: str, links: dict[str, str] | None = None, depth: int = 0) -> str | None:
    """The archive-relative path a symlink at ``name`` points to, or None if it leaves the archive root.

    ``links`` (the archive's symlink members, name -> stored target) are followed where the path passes through one,
    as the filesystem will once they are extracted: ``a/l -> ..`` then ``m -> a/l/..`` leaves the root although each
    is harmless on its own. A chain deeper than 40 links (a loop) counts as leaving."""
    if target.startswith("/") or (len(target) > 1 and target[1] == ":") or depth > 40:
        return None
    parts = list(PurePosixPath(name).parent.parts)
    for p in target.replace("\\", "/").split("/"):
        if p in ("", "."):
            continue
        if p == "..":
            if not parts:
                return None
            parts.pop()
            continue
        parts.append(p)
        here = "/".join(parts)
        if links and here in links:  # through another link: continue from where that one points
            resolved = _resolve_link(here, links[here], links, depth + 1)
            if resolved is None:
                return None
            parts = resolved.split("/") if resolved else []
    return "/".join(parts)


def check_members(archive: Path, members: list[Member], limits: ExtractLimits) -> None:
    """Raise ArchiveError for the first unsafe member or limit (nothing has been written yet)."""
    if len(members) > limits.max_members:
        raise ArchiveError(archive, None, f"{len(members)} members, more than the limit {limits.max_members}")
    seen: dict[str, str] = {}
    links = {m.name: m.link or "" for m in members if m.kind == "symlink"}  # all of them: any order on disk
    total = 0
    for m in members:
        if m.name in seen and not (m.kind == "dir" and seen[m.name] == "dir"):
            raise ArchiveError(archive, m.name, "appears twice in the archive; the second copy would overwrite "
                                                "the first")
        if m.kind == "symlink":
            if _resolve_link(m.name, m.link or "", links) is None:
                raise ArchiveError(archive, m.name, f"symbolic link to {m.link!r} leaves the target folder")
        elif m.kind == "hardlink":
            source = safe_name(archive, m.link or "")
            if seen.get(source) != "file":
                raise ArchiveError(archive, m.name, f"hard link to {m.link!r}, which is not an earlier regular "
                                                    "file of the archive (it would link outside the target)")
        elif m.kind == "file":
            total += m.size
            if total > limits.max_total_bytes:
                raise ArchiveError(archive, m.name, f"uncompressed size exceeds the limit of "
                                                    f"{limits.max_total_bytes} bytes (size bomb?)")
            if m.compressed is not None and m.size > limits.ratio_min_bytes:
                ratio = m.size / max(m.compressed, 1)
                if ratio > limits.max_ratio:
                    raise ArchiveError(archive, m.name, f"compression ratio {ratio:.0f} above the limit "
                                                        f"{limits.max_ratio:.0f} (size bomb?)")
        seen[m.name] = m.kind
    size = Path(archive).stat().st_size
    if total > limits.ratio_min_bytes and total / max(size, 1) > limits.max_ratio:
        raise ArchiveError(archive, None, f"total compression ratio {total / max(size, 1):.0f} above the limit "
                                          f"{limits.max_ratio:.0f} (size bomb?)")
    for m in members:  # a member below a symlink member would be written through the link
        for parent in PurePosixPath(m.name).parents:
            if seen.get(str(parent)) == "symlink":
                raise ArchiveError(archive, m.name, f"lies below the symbolic link {str(parent)!r}")


def list_members(archive: Path) -> list[Member]:
    archive = Path(archive)
    if archive_kind(archive) == "zip":
        with zipfile.ZipFile(archive) as zf:
            return list(_zip_members(archive, zf))
    with tarfile.open(archive, "r:*") as tf:
        return list(_tar_members(archive, tf))


# ----------------------------------------------------------------------------------------------------------------
# writing


def _record_path(target: Path, archive: Path) -> Path:
    return target / RECORD_DIR / f"{archive.name}.json"


def _fingerprint(archive: Path) -> dict:
    st = archive.stat()
    return {"archive": archive.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _same_bytes(path: Path, chunks: Iterator[bytes]) -> bool:
    with path.open("rb") as fh:
        for chunk in chunks:
            if fh.read(len(chunk)) != chunk:
                return False
        return fh.read(1) == b""


def is_documentation(name: str) -> bool:
    """A documentation file by name (``DAVIS/README.md``, ``LICENSE``): never data the loaders read."""
    return PurePosixPath(name).name.split(".")[0].upper() in DOC_NAMES


class _SharedDocs:
    """Which other archive a documentation file of the target is a copy of, by content: the records of the
    archives extracted there (name -> {sha256: archive name}), then the members of ``official_order``."""

    def __init__(self, target: Path, archive: Path, official_order):
        names = [Path(a).name for a in official_order]
        self.later = set(names[names.index(archive.name) + 1:]) if archive.name in names else set()
        self.siblings = [Path(a) for a in official_order if Path(a).name != archive.name]
        self.recorded: dict[str, dict[str, str]] = {}
        for record in sorted((target / RECORD_DIR).glob("*.json")):
            if record.name == f"{archive.name}.json":
                continue  # this archive's own files are never replaced (a changed archive is an error)
            for name, digest in _read_record(record).get("documentation", {}).items():
                self.recorded.setdefault(name, {})[digest] = record.name[: -len(".json")]

    def owner(self, name: str, path: Path) -> str | None:
        """The other archive whose copy of documentation file ``name`` ``path`` holds, else None."""
        if not is_documentation(name):
            return None
        digest = sha256_file(path)
        found = self.recorded.get(name, {}).get(digest)
        return found or next((a.name for a in self.siblings if _member_digest(a, name) == digest), None)


def _digest(chunks: Iterator[bytes]) -> str:
    h = hashlib.sha256()
    for chunk in chunks:
        h.update(chunk)
    return h.hexdigest()


def _member_digest(archive: Path, name: str) -> str | None:
    """SHA-256 of the regular-file member ``name`` of ``archive``; None when absent or unreadable."""
    try:
        member = next((m for m in list_members(archive) if m.name == name and m.kind == "file"), None)
        if member is None or member.size > DOC_MAX_BYTES:
            return None
        if archive_kind(archive) == "zip":
            with zipfile.ZipFile(archive) as zf:
                return _digest(_zip_chunks(zf, member))
        with tarfile.open(archive, "r:*") as tf:
            return _digest(_tar_chunks(tf, member))
    except (ArchiveError, OSError, zipfile.BadZipFile, tarfile.TarError):
        return None  # an unreadable archive is no evidence: the file is refused as before


def _read_record(record: Path) -> dict:
    """An extraction record, or {} when it is unreadable (then the archive is simply extracted again)."""
    try:
        data = json.loads(record.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _real_parent(archive: Path, target_real: Path, dest: Path, name: str) -> Path:
    """Create ``dest``'s folder one level at a time and return it resolved. Every level must resolve inside the
    target, so nothing is created or written through a link that leads out (an old one in the target too)."""
    current = target_real
    for part in PurePosixPath(name).parent.parts:
        nxt = current / part
        if not nxt.is_symlink() and not nxt.exists():
            nxt.mkdir()
        real = nxt.resolve()
        if real != target_real and target_real not in real.parents:
            raise ArchiveError(archive, name, f"its folder {nxt} resolves to {real}, outside the target "
                                              f"{target_real} (a link in the target folder?)")
        if not real.is_dir():
            raise ArchiveError(archive, name, f"{nxt} exists and is not a folder")
        current = real
    return current


class _Writer:
    def __init__(self, archive: Path, target: Path, limits: ExtractLimits, overwrite: bool, report: ExtractReport,
                 official_order=()):
        self.archive, self.limits, self.overwrite, self.report = archive, limits, overwrite, report
        self.target_real = target.resolve()
        self.target = target
        self.shared = _SharedDocs(target, archive, official_order)
        self.docs: dict[str, str] = {}  # this archive's documentation files -> SHA-256 (for its record)

    def file(self, m: Member, read_chunks) -> None:
        if is_documentation(m.name):
            self.docs[m.name] = _digest(read_chunks())
        dest = self.target / m.name
        parent = _real_parent(self.archive, self.target_real, dest, m.name)
        final = parent / dest.name
        if final.is_symlink() or final.is_dir():
            raise ArchiveError(self.archive, m.name, f"{final} exists and is not a regular file")
        if final.exists():
            if final.stat().st_size == m.size and _same_bytes(final, read_chunks()):
                self.report.files_identical += 1
                return
            if not self._replaces(m, final):
                return
        tmp = parent / f".{dest.name}.partial-{os.getpid()}"
        written = 0
        try:
            with tmp.open("wb") as out:
                for chunk in read_chunks():
                    written += len(chunk)
                    if written > m.size or self.report.bytes_written + written > self.limits.max_total_bytes:
                        raise ArchiveError(self.archive, m.name, "more bytes than its header declares or than "
                                                                 "the size limit allows (size bomb?)")
                    out.write(chunk)
            if written != m.size:
                raise ArchiveError(self.archive, m.name, f"{written} bytes, header says {m.size} (truncated?)")
            if m.mode:
                os.chmod(tmp, m.mode & 0o755 | 0o600)
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        self.report.files_written += 1
        self.report.bytes_written += written

    def _replaces(self, m: Member, final: Path) -> bool:
        """Whether to replace ``final`` (a regular file with other bytes); False keeps it; raises when refused."""
        if self.overwrite:
            return True
        owner = self.shared.owner(m.name, final)
        if owner is None:
            raise ArchiveError(self.archive, m.name, f"{final} exists with different content; refusing to "
                                                     "overwrite it (move it away or pass overwrite=True; only an "
                                                     "unchanged documentation file of another archive is replaced)")
        if owner in self.shared.later:
            log.info("%s: keeping %s as %s has it (that archive comes later in the official order)",
                     self.archive, final, owner)
            self.report.kept.append(m.name)
            return False
        log.warning("%s: replacing %s, extracted earlier from %s, with this archive's copy (as unzip does)",
                    self.archive, final, owner)
        self.report.replaced.append(m.name)
        return True

    def directory(self, m: Member) -> None:
        _real_parent(self.archive, self.target_real, self.target / m.name / "x", f"{m.name}/x")
        self.report.dirs += 1

    def link(self, m: Member) -> None:
        dest = self.target / m.name
        parent = _real_parent(self.archive, self.target_real, dest, m.name)
        final = parent / dest.name
        if m.kind == "hardlink":
            source = (self.target / safe_name(self.archive, m.link)).resolve()
            if final.exists() and os.path.samefile(final, source):
                return
            if final.exists() or final.is_symlink():
                raise ArchiveError(self.archive, m.name, f"{final} exists; refusing to replace it with a link")
            os.link(source, final)
        else:
            if final.is_symlink() and os.readlink(final) == m.link:
                return
            if final.exists() or final.is_symlink():
                raise ArchiveError(self.archive, m.name, f"{final} exists; refusing to replace it with a link")
            os.symlink(m.link, final)
            if not final.resolve().is_relative_to(self.target_real):  # through links already in the target
                final.unlink()
                raise ArchiveError(self.archive, m.name, f"symbolic link to {m.link!r} leaves the target folder "
                                                         "through a link already there")
        self.report.links += 1


def extract(archive, target, *, limits: ExtractLimits | None = None, overwrite: bool = False,
            progress: bool = True, official_order=()) -> ExtractReport:
    """Check every member of ``archive`` and extract it below ``target`` (module docstring: rules).
    ``official_order``: the archives extracted into ``target`` (this one included), in the order of the official
    instructions; it decides which copy of a shared documentation file is kept."""
    archive, target = Path(archive), Path(target)
    limits = limits or ExtractLimits()
    if not archive.is_file():
        raise ArchiveError(archive, None, "archive file not found")
    report = ExtractReport(str(archive), str(target))
    record = _record_path(target, archive)
    done = _read_record(record) if record.is_file() else {}
    if done.get("fingerprint") == _fingerprint(archive):
        report.skipped_complete = True
        for key in ("replaced", "kept"):  # what the complete extraction did: the status stays the same
            setattr(report, key, list(done.get("report", {}).get(key, [])))
        return report
    members = list_members(archive)
    check_members(archive, members, limits)
    target.mkdir(parents=True, exist_ok=True)
    writer = _Writer(archive, target, limits, overwrite, report, official_order)
    total = sum(m.size for m in members)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"extract {archive.name}", disable=not progress)
    if archive_kind(archive) == "zip":
        with zipfile.ZipFile(archive) as zf:
            _write_all(members, writer, bar, lambda m: _zip_chunks(zf, m))
    else:
        with tarfile.open(archive, "r:*") as tf:
            _write_all(members, writer, bar, lambda m: _tar_chunks(tf, m))
    bar.close()
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"fingerprint": _fingerprint(archive), "report": report.as_dict(),
                                  "documentation": writer.docs}, indent=1))
    return report


def _write_all(members: list[Member], writer: _Writer, bar, chunks_of) -> None:
    links = []
    for m in members:
        if m.kind == "file":
            writer.file(m, lambda m=m: chunks_of(m))
            bar.update(m.size)
        elif m.kind == "dir":
            writer.directory(m)
        else:
            links.append(m)
    for m in links:  # after the files, so hard links find their source and nothing is written through a link
        writer.link(m)


def _zip_chunks(zf: zipfile.ZipFile, m: Member) -> Iterator[bytes]:
    with zf.open(m.handle) as fh:
        while chunk := fh.read(_CHUNK):
            yield chunk


def _tar_chunks(tf: tarfile.TarFile, m: Member) -> Iterator[bytes]:
    fh = tf.extractfile(m.handle)
    if fh is None:
        raise ArchiveError(tf.name, m.name, "cannot read the member's data")
    with fh:
        while chunk := fh.read(_CHUNK):
            yield chunk


def sha256_file(path, chunk: int = _CHUNK) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()
