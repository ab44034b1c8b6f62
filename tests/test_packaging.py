"""The declared dependency bounds admit only versions that have what the code calls, and constraints.txt (the
tested set that `make setup` installs) pins every dependency within those bounds."""

import re
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.conftest import REPO

PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
REQUIREMENTS = [Requirement(r) for r in PROJECT["dependencies"]] + [
    Requirement(r) for extra in PROJECT["optional-dependencies"].values() for r in extra]
CONSTRAINTS = REPO / "constraints.txt"


def _requirement(name: str) -> SpecifierSet:
    return next(Requirement(r).specifier for r in PROJECT["dependencies"] if Requirement(r).name == name)


def _source(*parts: str) -> str:
    return REPO.joinpath(*parts).read_text()


def _pins() -> dict[str, Version]:
    """name -> version of every `name==version` line of constraints.txt (one per package)."""
    pins: dict[str, Version] = {}
    for n, line in enumerate(CONSTRAINTS.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        specs = list(req.specifier)
        assert len(specs) == 1 and specs[0].operator == "==", f"constraints.txt:{n}: expected name==version: {line}"
        name = canonicalize_name(req.name)
        assert name not in pins, f"constraints.txt:{n}: {req.name} pinned twice"
        pins[name] = Version(specs[0].version)
    return pins


def test_python_311_and_312_are_allowed():
    python = SpecifierSet(PROJECT["requires-python"])
    assert "3.11.7" in python and "3.12.1" in python and "3.10.13" not in python


def test_torch_floor_has_safe_globals():
    # bifit/checkpoint.py loads official checkpoints under torch.serialization.safe_globals (torch 2.5+)
    assert "torch.serialization.safe_globals" in _source("bifit", "checkpoint.py")
    torch = _requirement("torch")
    assert "2.4.1" not in torch and "2.5.0" in torch
    assert "0.19.1" not in _requirement("torchvision") and "0.20.0" in _requirement("torchvision")


def test_ray_floor_has_tune_run_config_and_train_v2_by_default():
    # ray.tune.RunConfig / FailureConfig (pipeline/tune.py) and Ray Train V2's errors (pipeline/train.py catches
    # ray.train.TrainingFailedError, pipeline/faults.py reads WorkerGroupError.worker_failures): V2 is the
    # default from Ray 2.51 (RAY_TRAIN_V2_ENABLED defaults to 0 up to 2.50)
    tune, train, faults = _source("pipeline", "tune.py"), _source("pipeline", "train.py"), _source("pipeline", "faults.py")
    assert "ray.tune.RunConfig(" in tune and "ray.tune.FailureConfig(" in tune
    assert "TrainingFailedError" in train and "worker_failures" in faults
    ray = next(r for r in REQUIREMENTS if r.name == "ray")
    assert {"train", "tune"} <= ray.extras
    for old in ("2.9.0", "2.41.0", "2.50.1"):
        assert old not in ray.specifier, f"ray{ray.specifier} admits {old}, which lacks Train V2 by default"
    assert "2.51.0" in ray.specifier


def test_transformers_floor_builds_roberta_tokenizers_from_vocab_and_merges():
    # bifit/synthetic/text_encoder.py: RobertaTokenizerFast(vocab=dict, merges=list) adding <s> ... </s>;
    # transformers 4.x wants vocab files, 5.0-5.16 give a class that adds no special tokens
    assert "RobertaTokenizerFast(vocab=" in _source("bifit", "synthetic", "text_encoder.py")
    transformers = _requirement("transformers")
    assert "4.57.6" not in transformers and "5.16.1" not in transformers and "5.17.0" in transformers


def test_numpy_floor_has_bitwise_count():
    assert "np.bitwise_count" in _source("bifit", "eval", "davis.py")  # NumPy 2.0
    assert "1.26.4" not in _requirement("numpy") and "2.0.0" in _requirement("numpy")


@pytest.mark.parametrize("name, last_bad, first_good", [
    ("pycocotools", "2.0.7", "2.0.8"),  # 2.0.7 installs next to NumPy 2, its _mask then fails to import
    ("h5py", "3.10.0", "3.11.0"),  # the same
    ("scipy", "1.12.0", "1.13.0"),  # requires numpy<2
    ("matplotlib", "3.8.3", "3.8.4"),  # requires numpy<2
    ("mlflow", "3.8.1", "3.9.0"),  # allows SQLAlchemy 2.1, then its sqlite store fails to import
    ("dvc", "3.65.0", "3.66.0"),  # allows pathspec 1.x, then fails to import
])
def test_floor_excludes_releases_that_install_but_cannot_run_here(name, last_bad, first_good):
    spec = _requirement(name)
    assert last_bad not in spec and first_good in spec, f"{name}{spec}"


def test_constraints_pin_every_declared_dependency_within_its_bounds():
    pins = _pins()
    problems = []
    for req in REQUIREMENTS:
        version = pins.get(canonicalize_name(req.name))
        if version is None:
            problems.append(f"{req.name}: not pinned")
        elif not req.specifier.contains(version, prereleases=True):
            problems.append(f"{req.name}=={version} is outside {req.name}{req.specifier}")
    assert not problems, "constraints.txt vs pyproject.toml: " + "; ".join(problems)


def test_constraints_pin_the_torch_the_makefile_installs():
    pins = _pins()
    makefile = _source("Makefile")
    torch_pins = re.search(r"^TORCH_PINS\s*:?=\s*(.+)$", makefile, re.M).group(1).split()
    for line in torch_pins:
        req = Requirement(line)
        assert pins[canonicalize_name(req.name)] in req.specifier, f"constraints.txt vs Makefile TORCH_PINS: {line}"


def test_make_setup_installs_under_the_constraints():
    recipe = re.search(r"^\$\(STAMP\):(.*)\n((?:\t.*\n)+)", _source("Makefile"), re.M)
    assert "$(CONSTRAINTS)" in recipe.group(1) or "constraints.txt" in recipe.group(1)  # a changed pin reinstalls
    installs = [line for line in recipe.group(2).splitlines() if "pip install" in line and "--upgrade pip" not in line]
    assert len(installs) == 2
    for line in installs:
        assert re.search(r"-c (\$\(CONSTRAINTS\)|constraints\.txt)", line), line
    assert "CONSTRAINTS := constraints.txt" in _source("Makefile")


@pytest.mark.parametrize("line", ["ray==2.50.1", "numpy==1.26.4", "transformers==4.57.6"])
def test_a_pin_below_a_floor_is_caught(line):
    """The bound check above is not vacuous: these (old) pins fail it."""
    req = Requirement(line)
    declared = next(r for r in REQUIREMENTS if r.name == req.name)
    assert not declared.specifier.contains(next(iter(req.specifier)).version)
