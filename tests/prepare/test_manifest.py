"""Manifest verification: every kind of mismatch is reported with the path, checksums are cached, pins work."""

import hashlib
import json

import pytest

from bifit.prepare.manifest import (
    CHECKSUM_CACHE,
    Expect,
    Manifest,
    ManifestError,
    checksums,
    read_pins,
    verify,
    with_pins,
)


@pytest.fixture
def root(tmp_path):
    (tmp_path / "videos/a").mkdir(parents=True)
    (tmp_path / "videos/b").mkdir()
    (tmp_path / "videos/readme.txt").write_text("x")
    (tmp_path / "list.txt").write_text("a\nb\n\nc\n")
    (tmp_path / "meta.json").write_bytes(b'{"videos": {}}')
    return tmp_path


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_a_matching_folder_passes(root):
    m = Manifest("toy", [Expect("videos", "dir", count=2, entries="dirs"), Expect("list.txt", lines=3),
                         Expect("meta.json", size=14, sha256=sha(b'{"videos": {}}'))])
    report = verify(m, root)
    assert report.ok and report.checked["videos"] == {"count": 2, "expected": {"count": 2}}
    assert report.checked["list.txt"] == {"size": 7, "lines": 3, "expected": {"lines": 3}}
    assert report.checked["meta.json"]["size"] == 14
    assert report.raise_if_bad() is report


def test_every_problem_is_listed_with_its_path(root):
    m = Manifest("toy", [Expect("videos", "dir", count=3, entries="dirs", source="the release zip"),
                         Expect("videos", "dir", min_count=5, pattern="*.txt", entries="files"),
                         Expect("missing_dir", "dir"), Expect("missing.json", source="Google Drive"),
                         Expect("list.txt", lines=4), Expect("meta.json", size=99, sha256="0" * 64)])
    report = verify(m, root)
    text = "\n".join(report.problems)
    assert len(report.problems) == 7
    assert f"{root / 'videos'}: 2 sub-folders matching '*', expected 3 (from the release zip)" in text
    assert "1 files matching '*.txt', expected at least 5" in text
    assert f"{root / 'missing_dir'}: missing folder" in text
    assert f"{root / 'missing.json'}: missing file (from Google Drive)" in text
    assert "3 non-empty lines, expected 4" in text and "14 bytes, expected 99" in text
    digest = sha(b'{"videos": {}}')
    assert f"SHA-256 {digest}, expected {'0' * 64}" in text
    with pytest.raises(ManifestError, match=r"toy at .*: 7 problem\(s\)") as err:
        report.raise_if_bad(hint="place the files ...")
    assert "place the files ..." in str(err.value)


def test_minimum_counts_and_missing_path_instructions(root):
    m = Manifest("toy", [Expect("videos", "dir", min_count=2, entries="dirs"),
                         Expect("train/meta.json", source="train.zip", if_missing="get it from the page and place "
                                                                                "it at {path}")])
    report = verify(m, root)
    assert report.checked["videos"] == {"count": 2, "expected": {"min_count": 2}}  # the report says "at least"
    assert report.problems == [f"{root / 'train/meta.json'}: missing file (from train.zip); get it from the page "
                               f"and place it at {root / 'train/meta.json'}"]
    (root / "videos/c").mkdir()
    assert verify(Manifest("toy", m.items[:1]), root).ok  # more than the minimum passes


def test_checksums_are_cached_by_size_and_mtime(root):
    m = Manifest("toy", [Expect("meta.json", sha256=sha(b'{"videos": {}}'))])
    assert verify(m, root).ok
    cache = json.loads((root / CHECKSUM_CACHE).read_text())
    assert cache["meta.json"][2] == sha(b'{"videos": {}}')
    (root / "meta.json").write_bytes(b'{"videos": {"x": 1}}')  # content changes: size and mtime change
    assert not verify(m, root).ok


def test_pins_file(root, tmp_path_factory):
    pins_path = tmp_path_factory.mktemp("pins") / "pins.sha256"
    found = checksums(root, ["meta.json", "list.txt"])
    pins_path.write_text("# pinned after the first check\n" + "".join(f"{h}  {p}\n" for p, h in found.items()))
    pins = read_pins(pins_path)
    assert pins == found
    m = with_pins(Manifest("toy", [Expect("meta.json")]), pins)
    assert [e.path for e in m.items] == ["meta.json", "list.txt"] and m.items[0].sha256 == found["meta.json"]
    assert verify(m, root).ok
    (root / "list.txt").write_text("changed\n")
    assert any("list.txt: SHA-256" in p for p in verify(m, root).problems)
    pins_path.write_text("nothex  meta.json\n")
    with pytest.raises(ValueError, match=r"pins.sha256:1: expected '<sha256 hex>  <relative path>'"):
        read_pins(pins_path)


def test_bad_expectations_are_rejected():
    with pytest.raises(ValueError, match="Expect.kind"):
        Expect("x", "link")
    with pytest.raises(ValueError, match="Expect.entries"):
        Expect("x", "dir", entries="links")
