"""The whole chain at toy size: generate -> train (Ray, 2 workers) -> resume -> evaluate -> package, with MLflow."""

import json
import zipfile
from pathlib import Path

import pytest
import yaml

TOY = {
    "model": dict(backbone="resnet18", text_encoder="{te}", freeze_text_encoder=False, hidden_dim=32, nheads=4,
                  enc_layers=1, dec_layers=2, dim_feedforward=32, num_queries=3,
                  msda_backend="pytorch"),
    "data": dict(root="{root}", categories="synthetic", num_frames=2, train_scales=[96], max_size=192,
                 crop_resize_scales=[112], crop_min=96, crop_max=112, eval_short_side=96),
    "train": dict(epochs=2, batch_size=1, max_steps_per_epoch=2, lr_drop=[1]),
    "eval": dict(batch_expressions=4),
    "synthetic": dict(num_train_videos=3, num_valid_videos=3, num_test_videos=1, frames_per_video=4, height=96,
                      width=128, small_radius=[6, 8], large_radius=[12, 16], min_visible_pixels=10),
    "text_encoder_assets": dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64),
    "ray": dict(num_workers=2, cpus_per_worker=1, max_failures=0, storage_path="{tmp}/ray"),
    "mlflow": dict(tracking_uri="sqlite:///{tmp}/mlflow.db", artifact_location="{tmp}/mlartifacts"),
    "paths": dict(synthetic_root="{tmp}/synthetic", text_encoder_dir="{tmp}/synthetic/te", runs="{tmp}/runs",
                  model="{tmp}/models/bifit.pth", metrics="{tmp}/metrics", plots="{tmp}/plots",
                  predictions="{tmp}/pred", submission="{tmp}/submission.zip"),
}


def _params(tmp: Path) -> Path:
    text = yaml.safe_dump(TOY).replace("{tmp}", str(tmp)).replace("{te}", str(tmp / "synthetic/te"))
    text = text.replace("{root}", str(tmp / "synthetic/ref-youtube-vos"))
    path = tmp / "params.yaml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    from pipeline import evaluate_dataset, generate, package, train

    tmp = tmp_path_factory.mktemp("chain")
    params = _params(tmp)
    raw = yaml.safe_load(params.read_text())
    raw["datasets"] = {"ytvos": {"checkpoint": str(tmp / "models/bifit.pth")}}  # the trained model, as dvc.yaml
    params.write_text(yaml.safe_dump(raw))
    generate.main(["--params", str(params)])
    train.main(["--params", str(params)])
    metrics = evaluate_dataset.main(["--params", str(params), "--dataset", "ytvos"])
    package.main(["--params", str(params)])
    return tmp, params, metrics


def test_train_writes_checkpoints_model_metrics_and_mlflow_run(chain):
    import mlflow
    from mlflow.tracking import MlflowClient

    from bifit.checkpoint import load_checkpoint

    tmp, _, _ = chain
    ckpts = sorted((tmp / "runs/train").glob("*/epoch_*.pth"))
    assert [p.name for p in ckpts] == ["epoch_0000.pth", "epoch_0001.pth"]
    model = load_checkpoint(tmp / "models/bifit.pth")
    assert model["epoch"] == 1 and model["config"]["model"]["hidden_dim"] == 32
    train_metrics = json.loads((tmp / "metrics/train.json").read_text())
    assert train_metrics["train_steps"] == 2 and train_metrics["train_loss"] > 0
    lines = (tmp / "plots/train_loss.csv").read_text().splitlines()
    assert lines[0] == "step,epoch,loss,loss_mask,loss_dice" and len(lines) == 1 + 4  # 2 epochs x 2 steps
    mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
    run = MlflowClient().get_run(model["mlflow_run_id"])
    assert run.data.params["model.hidden_dim"] == "32"
    assert "ytvos_jf" in run.data.metrics and "loss" in run.data.metrics
    assert run.data.params["ytvos_eval_amp"] == "False" and run.data.params["ytvos_eval_device"] in ("cpu", "cuda")
    history = MlflowClient().get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4]
    artifacts = [a.path for a in MlflowClient().list_artifacts(run.info.run_id, "model")]
    assert artifacts == ["model/bifit.pth"]


def test_evaluate_and_package(chain):
    import torch

    tmp, _, metrics = chain
    saved = json.loads((tmp / "metrics/ytvos.json").read_text())
    assert saved == metrics
    for key in ("jf", "j", "f", "jf_shuffled"):
        assert 0.0 <= saved[key] <= 1.0
    assert saved["num_expressions"] > 0
    assert (saved["device"], saved["amp"]) == ("cuda" if torch.cuda.is_available() else "cpu", False)  # auto
    with zipfile.ZipFile(tmp / "submission.zip") as zf:
        names = zf.namelist()
    assert names and all(n.startswith("Annotations/") and n.endswith(".png") for n in names)
    meta = json.loads((tmp / "synthetic/ref-youtube-vos/meta_expressions/valid/meta_expressions.json").read_text())
    expected = sum(len(v["frames"]) * len(v["expressions"]) for k, v in meta["videos"].items()
                   if k not in json.loads((tmp / "synthetic/ref-youtube-vos/meta_expressions/test/"
                                                 "meta_expressions.json").read_text())["videos"])
    assert len(names) == expected


def test_rerun_resumes_instead_of_training_again(chain):
    """The run folder lost its newest checkpoint (Ray's storage still has it) and holds a corrupt newer
    file: the rerun skips the corrupt file, restores Ray's checkpoint and trains nothing again."""
    from pipeline import train

    tmp, params, _ = chain
    first, last = sorted((tmp / "runs/train").glob("*/epoch_*.pth"))
    first_mtime = first.stat().st_mtime_ns
    last.unlink()
    (first.parent / "epoch_0002.pth").write_bytes(b"truncated garbage")
    train.main(["--params", str(params)])
    assert first.stat().st_mtime_ns == first_mtime  # epoch 1 was not trained again
    assert last.exists()  # restored from Ray's copy
    steps = [int(line.split(",")[0]) for line in (tmp / "plots/train_loss.csv").read_text().splitlines()[1:]]
    assert steps == [1, 2, 3, 4]
    (first.parent / "epoch_0002.pth").unlink()


def test_latest_checkpoint_falls_back_past_corrupt_files(tmp_path, caplog):
    import torch

    from bifit.checkpoint import atomic_save
    from pipeline.train import latest_checkpoint

    atomic_save({"format": "bifit-checkpoint-v1", "model": {}, "config": {}, "epoch": 0}, tmp_path / "epoch_0000.pth")
    torch.save({"format": "bifit-checkpoint-v1", "model": {}, "config": {}, "epoch": 1}, tmp_path / "epoch_0001.pth")
    data = (tmp_path / "epoch_0001.pth").read_bytes()
    (tmp_path / "epoch_0001.pth").write_bytes(data[: len(data) // 2])  # half-written
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt["epoch"] == 0
    assert "skipping unreadable checkpoint" in caplog.text and "epoch_0001.pth" in caplog.text


def test_epoch_checkpoint_holds_what_a_resume_reads(tmp_path, monkeypatch):
    """An epoch checkpoint (bifit.checkpoint.save_checkpoint) restores weights, optimizer, scheduler, step and
    the run totals of a fresh worker, and records the config, metrics and MLflow run."""
    import torch

    from bifit.checkpoint import OUR_FORMAT, load_checkpoint
    from bifit.config import to_dict
    from pipeline import train
    from pipeline.config import load_pipeline_config

    cfg = load_pipeline_config(_params(tmp_path))

    def worker(seed, **totals):
        torch.manual_seed(seed)
        model = torch.nn.Linear(4, 3)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [1], gamma=0.1)
        return train._Worker(cfg=cfg, rank=0, world=1, folder=tmp_path, loss_csv=tmp_path / "loss.csv",
                             run_id="abc", log_metrics=None, device=torch.device("cpu"), tokenizer=None, model=model,
                             criterion=None, optimizer=optimizer, scheduler=scheduler, **totals)

    trained = worker(0, global_step=7, skipped_nonfinite=2, redrawn=3)
    trained.model(torch.ones(2, 4)).sum().backward()
    trained.optimizer.step()
    trained.scheduler.step()
    path = train._save_checkpoint(trained, 4, {"train_loss": 0.5})
    assert path == tmp_path / "epoch_0004.pth" and not list(tmp_path.glob(".epoch_0004.pth.*"))
    ckpt = load_checkpoint(path)
    assert ckpt["format"] == OUR_FORMAT and ckpt["config"] == to_dict(cfg)
    assert (ckpt["epoch"], ckpt["metrics"], ckpt["mlflow_run_id"]) == (4, {"train_loss": 0.5}, "abc")

    monkeypatch.setattr(train, "_newest_checkpoint", lambda w: train.latest_checkpoint(w.folder))  # no Ray session
    resumed = worker(1)
    train._resume(resumed)
    assert (resumed.start_epoch, resumed.global_step, resumed.skipped_nonfinite, resumed.redrawn) == (5, 7, 2, 3)
    for a, b in zip(trained.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert resumed.scheduler.state_dict() == trained.scheduler.state_dict()
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)
    for key in ("exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(resumed.optimizer.state_dict()["state"][0][key], trained.optimizer.state_dict()["state"][0][key])


def test_package_refuses_incomplete_predictions(chain):
    from pipeline.package import SubmissionError, check_predictions

    tmp, _, _ = chain
    victim = next((tmp / "pred").rglob("*.png"))
    victim.unlink()
    with pytest.raises(SubmissionError, match="missing"):
        check_predictions(tmp / "pred", tmp / "synthetic/ref-youtube-vos")


def test_bad_params_rejected_before_ray_starts(tmp_path):
    import ray

    from bifit.config import ConfigError
    from pipeline import train

    params = _params(tmp_path)
    params.write_text(params.read_text().replace("num_workers: 2", "num_workers: 0"))
    with pytest.raises(ConfigError, match="ray.num_workers"):
        train.main(["--params", str(params)])
    assert not ray.is_initialized()
    assert not (tmp_path / "runs").exists() and not (tmp_path / "ray").exists()  # no run folder was started
