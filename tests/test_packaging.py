"""The declared dependency bounds admit only versions that have what the code calls."""

import tomllib

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from tests.conftest import REPO

PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def _requirement(name: str) -> SpecifierSet:
    return next(Requirement(r).specifier for r in PROJECT["dependencies"] if Requirement(r).name == name)


def test_python_311_and_312_are_allowed():
    python = SpecifierSet(PROJECT["requires-python"])
    assert "3.11.7" in python and "3.12.1" in python and "3.10.13" not in python


def test_torch_floor_has_safe_globals():
    # bifit/checkpoint.py loads official checkpoints under torch.serialization.safe_globals (torch 2.5+)
    assert "torch.serialization.safe_globals" in (REPO / "bifit" / "checkpoint.py").read_text()
    torch = _requirement("torch")
    assert "2.4.1" not in torch and "2.5.0" in torch
    assert "0.19.1" not in _requirement("torchvision") and "0.20.0" in _requirement("torchvision")
