"""Safe archive extraction: every refusal (absolute path, '..', symlink out, hard link out, size bomb, overwrite)
leaves the target untouched, and a good archive extracts idempotently and resumably."""

import io
import os
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest

from bifit.prepare.archive import ArchiveError, ExtractLimits, extract, list_members


def make_zip(path: Path, entries: list[tuple[str, bytes]], symlinks: dict[str, str] | None = None) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries:
            zf.writestr(zipfile.ZipInfo(name), data, compress_type=zipfile.ZIP_DEFLATED)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)
    return path


def make_tar(path: Path, entries: list[tarfile.TarInfo | tuple[str, bytes]], mode: str = "w:gz") -> Path:
    with tarfile.open(path, mode) as tf:
        for e in entries:
            if isinstance(e, tarfile.TarInfo):
                tf.addfile(e)
            else:
                info = tarfile.TarInfo(e[0])
                info.size = len(e[1])
                tf.addfile(info, io.BytesIO(e[1]))
    return path


def link_info(name: str, target: str, kind) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
            and ".extracted" not in p.parts}


GOOD = [("DAVIS/ImageSets/2017/val.txt", b"blackswan\n"), ("DAVIS/JPEGImages/480p/blackswan/00000.jpg", b"x" * 300),
        ("notes/readme.txt", b"hello")]


# ----------------------------------------------------------------------------------------------------------------
# refusals: nothing is written


@pytest.mark.parametrize("name", ["/etc/evil.txt", "C:/evil.txt", "\\\\server\\share\\evil.txt"])
def test_absolute_paths_are_refused(tmp_path, name):
    archive = make_zip(tmp_path / "a.zip", [GOOD[0], (name, b"evil")])
    target = tmp_path / "out"
    with pytest.raises(ArchiveError, match="absolute path refused") as err:
        extract(archive, target, progress=False)
    assert err.value.member == name and str(archive) in str(err.value)
    assert not target.exists()


@pytest.mark.parametrize("name", ["../evil.txt", "DAVIS/../../evil.txt", "a/./../../evil.txt"])
def test_dotdot_components_are_refused_in_zip_and_tar(tmp_path, name):
    for archive in (make_zip(tmp_path / "a.zip", [GOOD[0], (name, b"evil")]),
                    make_tar(tmp_path / "a.tar.gz", [GOOD[0], (name, b"evil")])):
        with pytest.raises(ArchiveError, match=r"'\.\.' component refused"):
            extract(archive, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / "evil.txt").exists()


@pytest.mark.parametrize("link", ["/etc/passwd", "../../outside", "../.."])
def test_symlinks_leaving_the_target_are_refused(tmp_path, link):
    tar = make_tar(tmp_path / "a.tar", [GOOD[0], link_info("sub/link", link, tarfile.SYMTYPE)], mode="w")
    zf = make_zip(tmp_path / "a.zip", [GOOD[0]], symlinks={"sub/link": link})
    for archive in (tar, zf):
        with pytest.raises(ArchiveError, match="symbolic link .* leaves the target folder"):
            extract(archive, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("order", ["link first", "chained link first"])
def test_a_chain_of_links_leaving_the_target_is_refused(tmp_path, order):
    """``a/l -> ..`` stays inside, ``m -> a/l/..`` reads as inside lexically, but on disk it is the target's parent."""
    links = [link_info("a/l", "..", tarfile.SYMTYPE), link_info("m", "a/l/..", tarfile.SYMTYPE)]
    members = [("a/keep.txt", b"x"), *(links if order == "link first" else links[::-1])]
    tar = make_tar(tmp_path / "a.tar", members, mode="w")
    zf = make_zip(tmp_path / "a.zip", [("a/keep.txt", b"x")], symlinks={"a/l": "..", "m": "a/l/.."})
    for archive in (tar, zf):
        with pytest.raises(ArchiveError, match=r"^.*a\.(tar|zip): member 'm' symbolic link to 'a/l/\.\.' leaves the target folder$"):
            extract(archive, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    # the same two links with m -> a/l/keep.txt stay inside and are created
    ok = make_tar(tmp_path / "ok.tar", [("keep.txt", b"x"), ("a/keep.txt", b"y"), link_info("a/l", "..", tarfile.SYMTYPE),
                                         link_info("m", "a/l/keep.txt", tarfile.SYMTYPE)], mode="w")
    extract(ok, tmp_path / "ok", progress=False)
    assert (tmp_path / "ok" / "m").read_bytes() == b"x"


def test_a_link_loop_is_refused(tmp_path):
    archive = make_tar(tmp_path / "a.tar", [link_info("x", "y/z", tarfile.SYMTYPE),
                                            link_info("y", "x", tarfile.SYMTYPE)], mode="w")
    with pytest.raises(ArchiveError, match="symbolic link .* leaves the target folder"):
        extract(archive, tmp_path / "out", progress=False)


def test_a_link_leaving_through_a_link_already_in_the_target_is_refused(tmp_path):
    target, outside = tmp_path / "out", tmp_path / "outside"
    (target / "d").mkdir(parents=True)
    outside.mkdir()
    (target / "d" / "up").symlink_to(outside)  # left by an earlier, hand-made extraction
    archive = make_tar(tmp_path / "a.tar", [link_info("m", "d/up", tarfile.SYMTYPE)], mode="w")
    with pytest.raises(ArchiveError, match="leaves the target folder through a link already there"):
        extract(archive, target, progress=False)
    assert not (target / "m").is_symlink()


def test_writing_through_a_symlink_member_is_refused(tmp_path):
    archive = make_tar(tmp_path / "a.tar", [link_info("d", ".", tarfile.SYMTYPE), ("d/file.txt", b"x")], mode="w")
    with pytest.raises(ArchiveError, match="below the symbolic link 'd'"):
        extract(archive, tmp_path / "out", progress=False)


def test_existing_link_in_the_target_is_not_followed_outside(tmp_path):
    target, outside = tmp_path / "out", tmp_path / "outside"
    target.mkdir()
    outside.mkdir()
    (target / "DAVIS").symlink_to(outside)
    with pytest.raises(ArchiveError, match="outside the target"):
        extract(make_zip(tmp_path / "a.zip", GOOD), target, progress=False)
    assert list(outside.iterdir()) == []


@pytest.mark.parametrize("source", ["/etc/passwd", "../outside.txt", "not/in/archive.txt"])
def test_hardlinks_out_of_the_archive_are_refused(tmp_path, source):
    archive = make_tar(tmp_path / "a.tar", [GOOD[0], link_info("hl", source, tarfile.LNKTYPE)], mode="w")
    with pytest.raises(ArchiveError) as err:
        extract(archive, tmp_path / "out", progress=False)
    assert err.value.member in ("hl", source)
    assert not (tmp_path / "out").exists()


def test_hardlink_and_symlink_inside_the_archive_are_created(tmp_path):
    archive = make_tar(tmp_path / "a.tar", [("data/a.txt", b"payload"), link_info("data/b.txt", "data/a.txt",
                                                                                   tarfile.LNKTYPE),
                                            link_info("data/c.txt", "a.txt", tarfile.SYMTYPE)], mode="w")
    report = extract(archive, tmp_path / "out", progress=False)
    out = tmp_path / "out/data"
    assert (out / "b.txt").read_bytes() == b"payload" and os.path.samefile(out / "a.txt", out / "b.txt")
    assert os.readlink(out / "c.txt") == "a.txt" and report.links == 2


def test_device_files_are_refused(tmp_path):
    info = tarfile.TarInfo("dev/null")
    info.type = tarfile.CHRTYPE
    with pytest.raises(ArchiveError, match="special member refused"):
        extract(make_tar(tmp_path / "a.tar", [info], mode="w"), tmp_path / "out", progress=False)


def test_zip_bomb_ratio_is_refused(tmp_path):
    archive = make_zip(tmp_path / "bomb.zip", [("zeros.bin", bytes(4 << 20))])  # 4 MiB of zeros -> ~4 KiB
    assert list_members(archive)[0].compressed < 64 << 10
    with pytest.raises(ArchiveError, match=r"compression ratio \d+ above the limit 200 \(size bomb\?\)"):
        extract(archive, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_tar_gz_bomb_total_ratio_is_refused(tmp_path):
    archive = make_tar(tmp_path / "bomb.tar.gz", [("zeros.bin", bytes(4 << 20))])
    with pytest.raises(ArchiveError, match="total compression ratio"):
        extract(archive, tmp_path / "out", progress=False)


def test_total_size_limit_is_enforced(tmp_path):
    archive = make_zip(tmp_path / "a.zip", [("a.bin", os.urandom(3000)), ("b.bin", os.urandom(3000))])
    with pytest.raises(ArchiveError, match="uncompressed size exceeds the limit of 5000 bytes") as err:
        extract(archive, tmp_path / "out", limits=ExtractLimits(max_total_bytes=5000), progress=False)
    assert err.value.member == "b.bin" and not (tmp_path / "out").exists()


def test_duplicate_members_are_refused(tmp_path):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate name
        archive = make_zip(tmp_path / "a.zip", [("x.txt", b"one"), ("x.txt", b"two")])
    with pytest.raises(ArchiveError, match="appears twice"):
        extract(archive, tmp_path / "out", progress=False)


# ----------------------------------------------------------------------------------------------------------------
# overwrite, idempotence, resume


def test_existing_different_file_is_never_overwritten_silently(tmp_path):
    archive = make_zip(tmp_path / "a.zip", GOOD)
    target = tmp_path / "out"
    (target / "notes").mkdir(parents=True)
    (target / "notes/readme.txt").write_bytes(b"my own notes")
    with pytest.raises(ArchiveError, match="exists with different content; refusing to overwrite"):
        extract(archive, target, progress=False)
    assert (target / "notes/readme.txt").read_bytes() == b"my own notes"
    report = extract(archive, target, overwrite=True, progress=False)
    assert (target / "notes/readme.txt").read_bytes() == b"hello" and report.files_written >= 1


def test_extraction_is_idempotent_and_resumable(tmp_path):
    archive = make_zip(tmp_path / "a.zip", GOOD)
    target = tmp_path / "out"
    first = extract(archive, target, progress=False)
    assert first.files_written == 3 and tree(target) == dict((k, v) for k, v in GOOD)
    assert extract(archive, target, progress=False).skipped_complete  # the completion record short-cuts
    # an interrupted run: record missing, one file lost, a stale partial file left behind
    for p in (target / ".extracted").iterdir():
        p.unlink()
    (target / "notes/readme.txt").unlink()
    resumed = extract(archive, target, progress=False)
    assert (resumed.files_written, resumed.files_identical) == (1, 2)
    assert tree(target) == dict((k, v) for k, v in GOOD)
    assert not list(target.rglob("*.partial-*"))


def test_changed_archive_is_checked_again(tmp_path):
    archive = make_zip(tmp_path / "a.zip", GOOD)
    target = tmp_path / "out"
    extract(archive, target, progress=False)
    make_zip(archive, [*GOOD[:2], ("notes/readme.txt", b"changed")])
    with pytest.raises(ArchiveError, match="exists with different content"):
        extract(archive, target, progress=False)


def test_plain_tar_bz2_and_missing_archive(tmp_path):
    archive = make_tar(tmp_path / "a.tar.bz2", GOOD, mode="w:bz2")
    extract(archive, tmp_path / "out", progress=False)
    assert tree(tmp_path / "out") == dict((k, v) for k, v in GOOD)
    with pytest.raises(ArchiveError, match="archive file not found"):
        extract(tmp_path / "missing.zip", tmp_path / "out", progress=False)
    (tmp_path / "bad.zip").write_bytes(b"not an archive")
    with pytest.raises(ArchiveError, match="not a zip or tar archive"):
        extract(tmp_path / "bad.zip", tmp_path / "out", progress=False)


# ----------------------------------------------------------------------------------------------------------------
# official archives that share a documentation file (the two Ref-DAVIS17 zips, extracted with plain unzip)

TRAINVAL, SEMANTICS = "DAVIS-2017-Unsupervised-trainval-480p.zip", "DAVIS-2017_semantics-480p.zip"


def davis_zips(tmp_path: Path, second: list[tuple[str, bytes]] | None = None) -> tuple[Path, Path]:
    first = make_zip(tmp_path / TRAINVAL, [("DAVIS/README.md", b"trainval readme"),
                                           ("DAVIS/SOURCES.md", b"trainval sources"), GOOD[0], GOOD[1]])
    later = make_zip(tmp_path / SEMANTICS, second or [("DAVIS/README.md", b"semantics readme"),
                                                      ("DAVIS/SOURCES.md", b"semantics sources"),
                                                      ("DAVIS/davis_semantics.json", b"{}")])
    return first, later


def test_later_archive_replaces_a_shared_documentation_file_as_unzip_does(tmp_path, caplog):
    first, later = davis_zips(tmp_path)
    target = tmp_path / "ref-davis"
    extract(first, target, progress=False)
    with caplog.at_level("WARNING", logger="bifit.prepare.archive"):
        report = extract(later, target, progress=False)
    assert (target / "DAVIS/README.md").read_bytes() == b"semantics readme"
    assert (target / "DAVIS/SOURCES.md").read_bytes() == b"semantics sources"
    assert report.replaced == ["DAVIS/README.md", "DAVIS/SOURCES.md"]
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert str(later) in messages[0] and str(target / "DAVIS/README.md") in messages[0] and TRAINVAL in messages[0]
    assert (target / "DAVIS/davis_semantics.json").read_bytes() == b"{}"
    assert (target / "DAVIS/ImageSets/2017/val.txt").read_bytes() == GOOD[0][1]


def test_shared_documentation_stays_idempotent_and_resumable(tmp_path):
    first, later = davis_zips(tmp_path)
    target = tmp_path / "ref-davis"
    extract(first, target, progress=False)
    extract(later, target, progress=False)
    again = [extract(a, target, progress=False) for a in (first, later)]
    assert all(r.skipped_complete for r in again) and again[1].replaced == ["DAVIS/README.md", "DAVIS/SOURCES.md"]
    (target / f".extracted/{SEMANTICS}.json").unlink()  # interrupted after its files, before its record
    resumed = extract(later, target, progress=False)
    assert resumed.replaced == [] and resumed.files_identical == 3
    (target / f".extracted/{TRAINVAL}.json").unlink()  # the first archive extracted again after the later one
    order = [first, later]
    assert extract(first, target, progress=False, official_order=order).kept == ["DAVIS/README.md",
                                                                                 "DAVIS/SOURCES.md"]
    assert (target / "DAVIS/README.md").read_bytes() == b"semantics readme"


def test_official_order_after_a_plain_unzip_by_hand(tmp_path):
    first, later = davis_zips(tmp_path)
    target = tmp_path / "ref-davis"
    for archive in (first, later):  # what `unzip` leaves: the later copy, and no records
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(target)
    with pytest.raises(ArchiveError, match="exists with different content"):  # no record, no order: no evidence
        extract(first, target, progress=False)
    order = [first, later]
    reports = [extract(a, target, progress=False, official_order=order) for a in order]
    assert reports[0].kept == ["DAVIS/README.md", "DAVIS/SOURCES.md"] and reports[0].files_written == 0
    assert reports[1].replaced == [] and reports[1].files_identical == 3
    assert (target / "DAVIS/README.md").read_bytes() == b"semantics readme"


@pytest.mark.parametrize("second, expected", [
    ([("DAVIS/ImageSets/2017/val.txt", b"bear\n")], "exists with different content; refusing to overwrite"),
    ([("DAVIS/README.md/notes.txt", b"x")], "exists and is not a folder"),
    ([("DAVIS/JPEGImages/480p/blackswan", b"x")], "exists and is not a regular file"),
])
def test_shared_data_paths_and_type_changes_are_refused(tmp_path, second, expected):
    first, later = davis_zips(tmp_path, second)
    target = tmp_path / "ref-davis"
    extract(first, target, progress=False)
    before = tree(target)
    with pytest.raises(ArchiveError, match=expected) as err:
        extract(later, target, progress=False)
    assert str(later) in str(err.value) and err.value.member == second[0][0]
    assert tree(target) == before


def test_a_symlink_member_never_replaces_a_shared_documentation_file(tmp_path):
    first = davis_zips(tmp_path)[0]
    later = make_zip(tmp_path / SEMANTICS, [], symlinks={"DAVIS/README.md": "SOURCES.md"})
    target = tmp_path / "ref-davis"
    extract(first, target, progress=False)
    with pytest.raises(ArchiveError, match="refusing to replace it with a link"):
        extract(later, target, progress=False)
    assert (target / "DAVIS/README.md").read_bytes() == b"trainval readme"


def test_edited_or_linked_documentation_is_not_replaced(tmp_path):
    first, later = davis_zips(tmp_path)
    target = tmp_path / "ref-davis"
    extract(first, target, progress=False)
    (target / "DAVIS/README.md").write_bytes(b"my notes")  # changed since the first archive wrote it
    with pytest.raises(ArchiveError, match="exists with different content"):
        extract(later, target, progress=False)
    assert (target / "DAVIS/README.md").read_bytes() == b"my notes"
    (target / "DAVIS/README.md").unlink()
    (target / "DAVIS/README.md").symlink_to("SOURCES.md")  # replacing it would write through a link
    with pytest.raises(ArchiveError, match="exists and is not a regular file"):
        extract(later, target, progress=False)
    assert (target / "DAVIS/SOURCES.md").read_bytes() == b"trainval sources"
