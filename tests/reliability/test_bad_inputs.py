"""The bad-input corpus (tests/reliability/bad_inputs.py): every broken dataset gives an error naming the file
and the problem, or, with data.skip_bad_samples, a skip recorded in the skip log; every invalid params.yaml is
rejected before Ray starts, naming the key; checkpoints that would run code or come from another architecture
are refused with the reason. Archives and .h5/.mat files are covered by tests/data (their modules' owners)."""

from __future__ import annotations

import logging
import pickle
import random
import re
import subprocess
import sys
import zipfile

import pytest
import torch
import yaml

from bifit.checkpoint import CheckpointError, load_checkpoint, load_official, to_official_state_dict
from bifit.config import ConfigError
from bifit.data import SampleError, YTVOSDataset
from bifit.data.ytvos import read_skip_log
from bifit.synthetic import SYNTHETIC_CATEGORIES
from tests.conftest import REPO, tiny_model
from tests.reliability.bad_inputs import (
    ACCEPTED_DATASETS,
    BAD_PARAMS,
    BAD_PARAMS_PREFLIGHT,
    CORRUPT_DATASETS,
    FATAL_DATASETS,
    broken_copy,
    code_running_checkpoint,
)
from tests.reliability.conftest import write_params


def dataset(root, **kw) -> YTVOSDataset:
    return YTVOSDataset(root, "train", 2, categories=SYNTHETIC_CATEGORIES, rng=random.Random(0), **kw)


def load_every_sample(ds: YTVOSDataset) -> None:
    for i in range(len(ds)):
        ds[i]


@pytest.fixture(scope="module")
def bench(toy_data):
    return toy_data / "ref-youtube-vos"


@pytest.fixture(scope="module")
def clean_count(bench) -> int:
    return len(dataset(bench))


# ---------------------------------------------------------------------------------------------------------------
# datasets


@pytest.mark.parametrize("case", CORRUPT_DATASETS, ids=lambda c: c.name)
def test_bad_dataset_fails_naming_the_file_and_the_problem(case, bench, tmp_path):
    root, message = broken_copy(bench, tmp_path / "copy", case)
    with pytest.raises(SampleError) as err:
        load_every_sample(dataset(root))
    assert re.search(message, str(err.value)), str(err.value)
    assert str(root) in str(err.value)
    if case.stage == "listing":
        assert "data.skip_bad_samples: true skips such samples and records them" in str(err.value)


@pytest.mark.parametrize("case", CORRUPT_DATASETS, ids=lambda c: c.name)
def test_bad_dataset_with_skip_records_every_skip_in_the_log(case, bench, tmp_path, clean_count):
    root, message = broken_copy(bench, tmp_path / "copy", case)
    log = tmp_path / "skipped.jsonl"
    ds = dataset(root, skip_bad_samples=True, skip_log=log)
    load_every_sample(ds)
    recorded = read_skip_log(log)
    assert recorded and all(re.search(message, f"{r['file']}: {r['reason']} [{r['id']}]") for r in recorded)
    assert recorded == [{k: v for k, v in r.items()} for r in ds.skipped]  # the log holds what the dataset saw
    if case.stage == "listing":  # left out of the samples, each one accounted for
        assert len(ds) < clean_count and all(r["index"] is None for r in recorded)
    else:  # served in its place: the next sample (index + 1), never silently
        assert all(isinstance(r["index"], int) for r in recorded)


@pytest.mark.parametrize("case", ACCEPTED_DATASETS, ids=lambda c: c.name)
def test_data_the_official_loader_accepts_is_redrawn_counted_and_warned(case, bench, tmp_path, clean_count, caplog):
    """Stricter than the reference would stop a real run: these load, their clips are redrawn as the reference
    redraws them, and each is counted and warned about naming the video."""
    root, message = broken_copy(bench, tmp_path / "copy", case)
    with caplog.at_level(logging.WARNING, logger="bifit.data.ytvos"):
        ds = dataset(root)
        served = [ds[i][1] for i in range(len(ds))]
    assert len(ds) == clean_count and not ds.skipped and all(t["valid"].any() for t in served)
    assert re.search(message, caplog.text), caplog.text
    assert sum(t["redrawn_samples"] for t in served) == ds.redrawn
    if case.stage == "loading":
        assert ds.redrawn > 0


@pytest.mark.parametrize("case", FATAL_DATASETS, ids=lambda c: c.name)
def test_unreadable_metadata_is_an_error_even_with_skip(case, bench, tmp_path):
    root, message = broken_copy(bench, tmp_path / "copy", case)
    for skip in (False, True):
        with pytest.raises(ValueError, match=message):
            dataset(root, skip_bad_samples=skip)


def test_bad_metadata_stops_the_train_stage_before_ray_with_a_one_line_message(bench, toy_data, tmp_path):
    """`python -m pipeline.train` (what `dvc repro` runs): exit status 1, the message names the file, no traceback."""
    case = next(c for c in CORRUPT_DATASETS if c.name == "empty expression")
    root, message = broken_copy(bench, tmp_path / "copy", case)
    params = write_params(tmp_path / "run", toy_data)
    params.write_text(params.read_text().replace(str(bench), str(root)))
    done = subprocess.run([sys.executable, "-m", "pipeline.train", "--params", str(params)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr and "Started a local Ray instance" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("pipeline.train: SampleError: ") and re.search(message, last)


# ---------------------------------------------------------------------------------------------------------------
# params.yaml


def broken_params(tmp_path, toy_data, sections: dict):
    path = write_params(tmp_path, toy_data)
    params = yaml.safe_load(path.read_text())
    for section, values in sections.items():
        params.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(params))
    return path


@pytest.fixture
def ray_must_not_start(monkeypatch):
    """Any attempt to start or join Ray fails the test; Ray looks not running, so run_training would try."""
    import ray

    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started although the settings are invalid")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", refuse)


@pytest.mark.parametrize("name,sections,message", BAD_PARAMS, ids=[c[0] for c in BAD_PARAMS])
def test_invalid_params_are_rejected_naming_the_key(name, sections, message, tmp_path, toy_data, ray_must_not_start):
    from pipeline import train

    path = broken_params(tmp_path, toy_data, sections)
    with pytest.raises(ConfigError) as err:
        train.main(["--params", str(path)])
    assert str(path) in str(err.value) and re.search(message, str(err.value)), str(err.value)


@pytest.mark.parametrize("name,sections,message", BAD_PARAMS_PREFLIGHT, ids=[c[0] for c in BAD_PARAMS_PREFLIGHT])
def test_impossible_settings_are_rejected_before_ray_starts(name, sections, message, tmp_path, toy_data,
                                                            ray_must_not_start, monkeypatch):
    from pipeline import train

    if name.startswith("GPU") and torch.cuda.device_count() >= 2:
        pytest.skip("this machine has the GPUs")  # the check is about their absence
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # the hub id check answers from the cache
    path = broken_params(tmp_path, toy_data, sections)
    with pytest.raises(ConfigError, match=message):
        train.main(["--params", str(path)])


def test_a_section_written_twice_is_rejected_naming_the_lines(tmp_path, toy_data, ray_must_not_start):
    """YAML keeps the last of two equal keys silently: the first section's settings would be lost unnoticed."""
    from pipeline import train

    path = broken_params(tmp_path, toy_data, {})
    text = path.read_text()
    path.write_text(text + "train:\n  epochs: 7\n")
    with pytest.raises(ConfigError) as err:
        train.main(["--params", str(path)])
    first = next(i for i, line in enumerate(text.splitlines(), 1) if line.startswith("train:"))
    assert re.search(rf"{re.escape(str(path))}: not valid YAML .*key 'train' written twice \(lines {first} and "
                     rf"{len(text.splitlines()) + 1}\)", str(err.value), re.S), str(err.value)


def test_a_key_written_twice_inside_a_section_is_rejected(tmp_path):
    from bifit.config import load_config

    path = tmp_path / "params.yaml"
    path.write_text("train:\n  lr: 0.0001\n  epochs: 2\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match=r"key 'lr' written twice \(lines 2 and 4\)"):
        load_config(path)


# ---------------------------------------------------------------------------------------------------------------
# checkpoints


def test_checkpoint_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "code_ran.txt"
    code_running_checkpoint(tmp_path / "evil.pth", marker)
    with pytest.raises(CheckpointError, match=r"evil\.pth: refused or unreadable with weights_only=True .*"
                                              r"Only tensors and plain containers are accepted"):
        load_checkpoint(tmp_path / "evil.pth")
    assert not marker.exists()
    # the control: unpickling the file's payload without torch's safe unpickler runs the code
    with zipfile.ZipFile(tmp_path / "evil.pth") as archive:
        payload = next(name for name in archive.namelist() if name.endswith("/data.pkl"))
        pickle.loads(archive.read(payload))
    assert marker.read_text() == "code ran"


def test_checkpoint_of_another_architecture_lists_the_mismatching_keys(tmp_path):
    """A ReferFormer-style model (one-way fusion, no inter-frame layers, wider) loaded into BIFIT."""
    other = tiny_model(hidden_dim=96, nheads=4, inter_frame_layers=0, bidirectional_vl=False)
    torch.save({"model": to_official_state_dict(other.state_dict())}, tmp_path / "referformer.pth")
    with pytest.raises(CheckpointError) as err:
        load_official(tmp_path / "referformer.pth", tiny_model())
    message = str(err.value)
    assert message.startswith(f"checkpoint {tmp_path / 'referformer.pth'}: does not match the model")
    assert re.search(r"\d+ missing keys: .*transformer\.decoder\.inter_frame\.layers\.0\.", message)
    assert re.search(r"\d+ shape mismatches: .*checkpoint \(96,?.*\) vs model \(64,?", message)


def test_truncated_checkpoint_is_refused_and_resume_falls_back_to_the_previous_one(tmp_path, caplog):
    from bifit.checkpoint import atomic_save
    from pipeline.train import latest_checkpoint

    for epoch in (0, 1):
        atomic_save({"format": "bifit-checkpoint-v1", "config": {}, "model": {}, "epoch": epoch},
                    tmp_path / f"epoch_{epoch:04d}.pth")
    newest = tmp_path / "epoch_0001.pth"
    newest.write_bytes(newest.read_bytes()[:-100])  # e.g. a disk that lost the end of the file
    with pytest.raises(CheckpointError, match=r"epoch_0001\.pth: refused or unreadable"):
        load_checkpoint(newest)
    assert latest_checkpoint(tmp_path)["epoch"] == 0
    assert f"skipping unreadable checkpoint {newest}" in caplog.text
