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
``overwrite=True`` to replace it). Each file is written to a temporary name and renamed into place, so a crash
never leaves a truncated file under its final name; every write goes through the resolved real path of its folder,
which must stay inside the target (no writing through links, old or new). After a complete extraction a small
record (archive size and mtime) is kept under ``<target>/.extracted/`` and later calls return at once.
"""

from __future__ import annotations

import hashlib
import json
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


def _inside(parent: str, name: str) -> bool:
    return name == parent or name.startswith(parent + "/") if parent else True


def _resolve_link(name: str, target: str) -> str | None:
    """The archive-relative path a symlink at ``name`` points to, or None if it leaves the archive root."""
    if target.startswith("/") or (len(target) > 1 and target[1] == ":"):
        return None
    parts = list(PurePosixPath(name).parent.parts)
    for p in target.replace("\\", "/").split("/"):
        if p in ("", "."):
            continue
        if p == "..":
            if not parts:
                return None
            parts.pop()
        else:
            parts.append(p)
    return "/".join(parts)


def check_members(archive: Path, members: list[Member], limits: ExtractLimits) -> None:
    """Raise ArchiveError for the first unsafe member or limit (nothing has been written yet)."""
    if len(members) > limits.max_members:
        raise ArchiveError(archive, None, f"{len(members)} members, more than the limit {limits.max_members}")
    seen: dict[str, str] = {}
    total = 0
    for m in members:
        if m.name in seen and not (m.kind == "dir" and seen[m.name] == "dir"):
            raise ArchiveError(archive, m.name, "appears twice in the archive; the second copy would overwrite "
                                                "the first")
        if m.kind == "symlink":
            if _resolve_link(m.name, m.link or "") is None:
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
    def __init__(self, archive: Path, target: Path, limits: ExtractLimits, overwrite: bool, report: ExtractReport):
        self.archive, self.limits, self.overwrite, self.report = archive, limits, overwrite, report
        self.target_real = target.resolve()
        self.target = target

    def file(self, m: Member, read_chunks) -> None:
        dest = self.target / m.name
        parent = _real_parent(self.archive, self.target_real, dest, m.name)
        final = parent / dest.name
        if final.is_symlink() or final.is_dir():
            raise ArchiveError(self.archive, m.name, f"{final} exists and is not a regular file")
        if final.exists():
            if final.stat().st_size == m.size and _same_bytes(final, read_chunks()):
                self.report.files_identical += 1
                return
            if not self.overwrite:
                raise ArchiveError(self.archive, m.name, f"{final} exists with different content; refusing to "
                                                         "overwrite it (move it away or pass overwrite=True)")
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
        self.report.links += 1


def extract(archive, target, *, limits: ExtractLimits | None = None, overwrite: bool = False,
            progress: bool = True) -> ExtractReport:
    """Check every member of ``archive`` and extract it below ``target`` (module docstring: rules)."""
    archive, target = Path(archive), Path(target)
    limits = limits or ExtractLimits()
    if not archive.is_file():
        raise ArchiveError(archive, None, "archive file not found")
    report = ExtractReport(str(archive), str(target))
    record = _record_path(target, archive)
    if record.is_file():
        try:
            if json.loads(record.read_text()).get("fingerprint") == _fingerprint(archive):
                report.skipped_complete = True
                return report
        except (OSError, json.JSONDecodeError):
            pass
    members = list_members(archive)
    check_members(archive, members, limits)
    target.mkdir(parents=True, exist_ok=True)
    writer = _Writer(archive, target, limits, overwrite, report)
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
    record.write_text(json.dumps({"fingerprint": _fingerprint(archive), "report": report.as_dict()}, indent=1))
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
