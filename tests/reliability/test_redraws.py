"""Training clips without a valid frame are redrawn as the official loader redraws them; the redraws are counted
in the items, summed by the engine over DataLoader workers and ranks, and reach the training's MLflow run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bifit.engine import sum_over_ranks
from pipeline.config import load_pipeline_config
from tests.reliability.conftest import on_gloo_ranks, write_params


def _sum(rank: int, out: dict) -> None:
    out[rank] = sum_over_ranks(10 * (rank + 1), torch.device("cpu"))


def test_every_rank_gets_the_sum_of_the_ranks_counts(tmp_path):
    out = on_gloo_ranks(_sum, tmp_path)
    assert out == {0: 30, 1: 30}
    assert sum_over_ranks(7, torch.device("cpu")) == 7  # not distributed: the value itself


def without_objects_but_in_one_video(bench: Path, dest: Path) -> Path:
    """A copy of the toy benchmark whose annotation PNGs are empty in every video but the first: every clip of
    those videos has no valid frame."""
    root = Path(shutil.copytree(bench, dest))
    videos = sorted(json.loads((root / "meta_expressions/train/meta_expressions.json").read_text())["videos"])
    for vid in videos[1:]:
        for path in (root / "train" / "Annotations" / vid).glob("*.png"):
            with Image.open(path) as png:
                empty = Image.fromarray(np.zeros_like(np.array(png)), mode="P")
                empty.putpalette(png.getpalette())
            empty.save(path)
    return root


@pytest.mark.timeout(600)  # a Ray run that hangs fails instead of blocking the suite
def test_ray_run_logs_the_redraw_count_to_mlflow(tmp_path, toy_data, fresh_ray):
    from mlflow.tracking import MlflowClient

    from pipeline.train import run_training

    fresh_ray()
    bench = toy_data / "ref-youtube-vos"
    root = without_objects_but_in_one_video(bench, tmp_path / "data")
    params = write_params(tmp_path / "run", toy_data, train=dict(epochs=1, max_steps_per_epoch=3))
    params.write_text(params.read_text().replace(str(bench), str(root)))
    cfg = load_pipeline_config(params)
    assert cfg.ray.num_workers == 2
    out = run_training(cfg)
    metrics = out["final"]["metrics"]
    assert metrics["redrawn_samples"] == metrics["train_redrawn_samples"] > 0  # one epoch: run total = epoch's
    assert metrics["skipped_samples"] == 0  # redrawn, not skipped: the data is what the reference trains on
    client = MlflowClient(cfg.mlflow.resolved_uri())
    assert [m.value for m in client.get_metric_history(out["run_id"], "redrawn_samples")] == \
        [metrics["redrawn_samples"]]
    assert client.get_run(out["run_id"]).data.metrics["epoch_train_redrawn_samples"] == metrics["redrawn_samples"]
