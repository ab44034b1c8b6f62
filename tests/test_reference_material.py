"""The tests run on any clone: the goldens live in the repository, unmodified, and nothing reads the developers'
reference folder beside the checkout (a user's machine has none)."""

import hashlib
import re
import subprocess
from pathlib import Path

import pytest

from tests.conftest import GOLDEN, REPO

FOLDER = "sha" + "red"  # spelled in parts so that repository-wide searches for the path do not list this file
OUTSIDE_REFERENCE = re.compile("|".join([
    re.escape("../" + FOLDER),
    "BIFIT_" + FOLDER.upper(),
    r"""parents?(\[\d\])?\s*/\s*["']""" + FOLDER + r"""["'/]""",
]))
SCANNED = ("bifit", "ops", "pipeline", "tests", "bench", "notebooks", "Makefile", ".ci", "dvc.yaml", "params.yaml")


def test_goldens_match_their_pinned_checksums():
    pinned = dict(reversed(line.split("  ")) for line in (GOLDEN / "SHA256SUMS").read_text().splitlines())
    assert set(pinned) == {"official_public_slim.pt", "ms_deform_attn_public.pt", "davis_metrics_public.npz",
                           "a2d_metrics_public.npz", "official_state_dict.tsv", "backbones_public.pt"}
    for name, digest in pinned.items():
        assert hashlib.sha256((GOLDEN / name).read_bytes()).hexdigest() == digest, f"tests/golden/{name} changed"


def _tracked_text_files():
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "--", *SCANNED],
                         cwd=REPO, capture_output=True, text=True, check=True)
    for name in out.stdout.splitlines():
        path = REPO / name
        if path == Path(__file__) or path.suffix in {".pt", ".npz", ".png", ".jpg", ".zip"} or not path.is_file():
            continue
        yield name, path.read_text(errors="replace")


def test_no_source_file_points_at_the_reference_folder_beside_the_checkout():
    offenders = [f"{name}:{text[:m.start()].count(chr(10)) + 1}: {m.group(0)}"
                 for name, text in _tracked_text_files() for m in OUTSIDE_REFERENCE.finditer(text)]
    assert not offenders, "read a folder that a user's clone does not have:\n" + "\n".join(offenders)


def test_the_scan_finds_such_a_reference():
    assert OUTSIDE_REFERENCE.search(f'golden = REPO.parent / "{FOLDER}" / "golden"')
    assert OUTSIDE_REFERENCE.search(f"cat ../{FOLDER}/spec/PARITY.md")
    assert not OUTSIDE_REFERENCE.search("features shared by all expressions")


def test_opening_a_file_beside_the_checkout_is_refused_during_tests():
    with pytest.raises(PermissionError, match="tests/golden"):
        open(REPO.parent / FOLDER / "golden" / "README.md")  # noqa: SIM115
