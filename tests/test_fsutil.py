"""Output folders are replaced whole or not at all."""

from __future__ import annotations

import pytest

from bifit.fsutil import staged_folder


def test_staged_folder_replaces_the_old_folder_when_the_block_completes(tmp_path):
    out = tmp_path / "prepared"
    out.mkdir()
    (out / "old.json").write_text("old")
    with staged_folder(out) as tmp:
        assert tmp.parent == tmp_path and tmp != out and not any(tmp.iterdir())
        (tmp / "new.json").write_text("new")
        assert (out / "old.json").read_text() == "old"  # readers see the old folder until the end
    assert sorted(p.name for p in out.iterdir()) == ["new.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared"]  # no temporary folder left


def test_staged_folder_keeps_the_old_folder_and_removes_the_partial_one_on_error(tmp_path):
    out = tmp_path / "prepared"
    out.mkdir()
    (out / "old.json").write_text("old")
    with pytest.raises(RuntimeError, match="disk full"), staged_folder(out) as tmp:
        (tmp / "half.json").write_text("{")
        raise RuntimeError("disk full")
    assert sorted(p.name for p in out.iterdir()) == ["old.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared"]


def test_staged_folder_starts_clean_after_a_killed_run(tmp_path):
    import os

    out = tmp_path / "nested" / "prepared"
    leftover = out.parent / f".{out.name}.partial-{os.getpid()}"
    leftover.mkdir(parents=True)
    (leftover / "stale.json").write_text("stale")
    with staged_folder(out) as tmp:
        assert not any(tmp.iterdir())
    assert out.is_dir() and not any(out.iterdir())
