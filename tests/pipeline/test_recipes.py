"""The training recipes at toy size (train.recipe): scratch (the pretrain stage trains nothing and says so),
pretrain_finetune (the pretrain stage trains on the RefCOCO/+/g pseudo-videos; the train stage starts from its
model minus the class heads) and joint (videos and image datasets in one training set)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from tests.pipeline.test_chain import TOY

REFCOCO_SYNTHETIC = dict(seed=4, num_train_images=4, num_val_images=2, num_test_images=1, frames_per_video=4,
                         height=96, width=128, expressions_per_object=1)


def _params(tmp: Path, dataset: str = "ytvos", **train) -> Path:
    raw = json.loads(json.dumps(TOY))
    raw["ray"].update(num_workers=1, cpus_per_worker=1)
    raw["train"].update(epochs=1, max_steps_per_epoch=2, lr_drop=[1], **train)
    raw["data"]["dataset"] = dataset
    raw["paths"]["pretrained"] = "{tmp}/models/pretrained"
    raw["datasets"] = {"prepared": "{tmp}/prepared", "status": "{tmp}/status",
                       "refcoco": {"root": "{tmp}/coco", "synthetic": REFCOCO_SYNTHETIC},
                       "a2d": {"root": "{tmp}/a2d_sentences", "synthetic": dict(
                           num_train_videos=2, num_test_videos=1, frames_per_video=8, annotated_frames=2)}}
    raw["pretrain"] = {"overrides": {"train.batch_size": 2, "data.num_frames": 1, "train.max_steps_per_epoch": 2}}
    text = yaml.safe_dump(raw).replace("{tmp}", str(tmp)).replace("{te}", str(tmp / "synthetic/te"))
    path = tmp / "params.yaml"
    path.write_text(text.replace("{root}", str(tmp / "synthetic/ref-youtube-vos")))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The generated Ref-YouTube-VOS copy, the converted synthetic RefCOCO/+/g and the prepared synthetic A2D-Sentences,
    through the stages."""
    from pipeline import download, generate, preprocess

    tmp = tmp_path_factory.mktemp("recipes")
    params = _params(tmp)
    generate.main(["--params", str(params)])
    download.main(["--params", str(params), "--dataset", "refcoco"])
    preprocess.main(["--params", str(params), "--dataset", "refcoco"])
    download.main(["--params", str(params), "--dataset", "a2d"])
    preprocess.main(["--params", str(params), "--dataset", "a2d"])
    return tmp


def _config(tmp: Path, dataset: str = "ytvos", **train):
    from pipeline.config import load_pipeline_config

    return load_pipeline_config(_params(tmp, dataset, **train))


def test_with_recipe_scratch_the_pretrain_stage_trains_nothing_and_says_so(data):
    from pipeline import train

    train.main(["--params", str(_params(data)), "--stage", "pretrain"])
    folder = data / "models/pretrained"
    assert [p.name for p in folder.iterdir()] == ["NOT_USED.txt"]
    assert "recipe is\nscratch, so the train stage does not start from a pretrained model" in \
        (folder / "NOT_USED.txt").read_text()
    assert json.loads((data / "metrics/pretrain.json").read_text()) == {"used": 0}
    assert (data / "plots/pretrain_loss.csv").read_text() == train.LOSS_HEADER
    assert not (data / "runs/pretrain").exists()


def test_pretrain_then_finetune_starts_from_the_pretrained_model_without_its_class_heads(data):
    from bifit.checkpoint import load_checkpoint
    from pipeline import train
    from pipeline.faults import read_events

    params = _params(data, recipe="pretrain_finetune")
    train.main(["--params", str(params), "--stage", "pretrain"])
    pretrained = data / "models/pretrained/bifit.pth"
    assert pretrained.is_file() and not (data / "models/pretrained/NOT_USED.txt").exists()
    metrics = json.loads((data / "metrics/pretrain.json").read_text())
    assert metrics["used"] == 1 and metrics["train_loss"] > 0
    rows = (data / "plots/pretrain_loss.csv").read_text().splitlines()
    assert rows[0] == train.LOSS_HEADER.strip() and len(rows) == 3  # header + 2 steps
    # the pretrain run trained on single images (pretrain.overrides), in its own run folder
    pre_cfg = load_checkpoint(pretrained)["config"]
    assert pre_cfg["data"]["num_frames"] == 1 and pre_cfg["train"]["batch_size"] == 2
    assert len(list((data / "runs/pretrain").iterdir())) == 1

    train.main(["--params", str(params)])
    cfg = _config(data, recipe="pretrain_finetune")
    assert cfg.training_dict()["start_from"]["sha256"] is not None  # a new pretrained model: a new run folder
    folder = train.run_dir(cfg)
    starts = [e for e in read_events(folder) if e["event"] == "start_weights"]
    assert len(starts) == 1 and starts[0]["path"] == str(pretrained)
    dec_layers = TOY["model"]["dec_layers"]
    assert len(starts[0]["dropped"]) == 2 * dec_layers  # weight and bias of each layer's class head
    assert all("class_embed" in k for k in starts[0]["dropped"]) and starts[0]["kept_initialisation"] == []
    final = load_checkpoint(data / "models/bifit.pth")
    assert final["config"]["train"]["recipe"] == "pretrain_finetune" and final["config"]["data"]["num_frames"] == 2


def test_a_missing_pretrained_model_is_refused_before_ray_starts(data, tmp_path):
    from bifit.config import ConfigError
    from pipeline.train import run_training

    cfg = _config(data, recipe="pretrain_finetune")
    cfg.paths.pretrained = str(tmp_path / "nothing-here")
    with pytest.raises(ConfigError, match=r"pretrain_finetune starts from the pretrain stage's model.*dvc repro "
                                          r"pretrain"):
        run_training(cfg)
    cfg = _config(data, start_from=str(tmp_path / "missing.pth"))
    with pytest.raises(ConfigError, match=r"train.start_from: expected a checkpoint file"):
        run_training(cfg)


def test_joint_training_mixes_videos_and_image_pseudo_videos(data):
    from bifit.data.refcoco import JointDataset, RefCOCODataset
    from bifit.data.ytvos import YTVOSDataset
    from tests.reliability.toy_training import ToyRun

    cfg = _config(data, recipe="joint")
    run = ToyRun(cfg)
    assert isinstance(run.dataset, JointDataset)
    parts = run.dataset.datasets
    assert [type(p) for p in parts] == [RefCOCODataset] * 3 + [YTVOSDataset]
    assert [p.dataset_name for p in parts[:3]] == ["refcoco", "refcoco+", "refcocog"]
    assert all(p.num_frames == cfg.data.num_frames for p in parts)
    assert len(run.dataset) == sum(len(p) for p in parts) and all(len(p) > 0 for p in parts)
    stats = run.epoch(0)
    assert stats["steps"] == 2 and torch.isfinite(torch.tensor(stats["loss"]))
    # the run folder of a joint run differs from a video-only one, and names the image data
    scratch = _config(data)
    assert cfg.training_hash() != scratch.training_hash()
    assert cfg.training_dict()["image_datasets"]["datasets"] == ["refcoco", "refcoco+", "refcocog"]


def test_a2d_training_reads_the_a2d_train_split_with_one_annotated_frame_per_clip(data):
    from bifit.data.a2d import A2DDataset, read_index
    from pipeline.preflight import check_training_data
    from tests.reliability.toy_training import ToyRun

    cfg = _config(data, "a2d")
    run = ToyRun(cfg)
    assert isinstance(run.dataset, A2DDataset) and run.dataset.train and run.dataset.split == "train"
    samples = read_index(data / "prepared/a2d/index_train.json")["samples"]
    assert len(run.dataset) == len(samples) == check_training_data(cfg) > 0
    imgs, target = run.dataset[0]
    assert imgs.shape[0] == cfg.data.num_frames and target["masks"].shape[0] == 1  # one annotated frame
    stats = run.epoch(0)
    assert stats["steps"] == 2 and torch.isfinite(torch.tensor(stats["loss"]))
    # its run folder is keyed by the A2D data, not by data.root
    assert "a2d" in cfg.training_dict() and "root" not in cfg.training_dict()["data"]
    assert cfg.training_hash() != _config(data).training_hash()


def test_recipe_settings_are_checked(data):
    from bifit.config import ConfigError
    from pipeline.config import load_pipeline_config

    with pytest.raises(ConfigError, match=r"data.expressions_per_clip: expected 1 with train.recipe joint"):
        load_pipeline_config(_params(data, recipe="joint"), overrides={"data.expressions_per_clip": 2})
    with pytest.raises(ConfigError, match=r"train.start_from: expected null with recipe pretrain_finetune"):
        _config(data, recipe="pretrain_finetune", start_from="x.pth")
    with pytest.raises(ConfigError, match=r"data.dataset: expected 'ytvos' with train.recipe joint"):
        _config(data, "a2d", recipe="joint")
    with pytest.raises(ConfigError, match=r"pretrain.overrides.train.recipe: expected no such key here"):
        load_pipeline_config(_params(data), overrides={"pretrain.overrides": {"train.recipe": "joint"}})


def test_with_ema_decay_the_exported_model_is_the_weight_average_and_checkpoints_hold_both(data):
    from bifit.checkpoint import load_checkpoint
    from pipeline import train

    params = _params(data, ema_decay=0.9)
    train.main(["--params", str(params)])
    folder = train.run_dir(_config(data, ema_decay=0.9))
    ckpt = load_checkpoint(folder / "epoch_0000.pth")
    assert ckpt["ema"]["updates"] == 2 and ckpt["ema"]["decay"] == 0.9  # one update per optimizer step
    exported = load_checkpoint(data / "models/bifit.pth")
    assert exported["weights"] == "ema"
    for k, v in exported["model"].items():
        assert torch.equal(v, ckpt["ema"]["model"][k])
    # the average is not the last weights: two steps in, it still holds part of the starting point
    moved = [k for k, v in ckpt["model"].items() if v.is_floating_point() and not torch.equal(v, exported["model"][k])]
    assert any("bbox_embed" in k for k in moved) and any("backbone" in k for k in moved)
