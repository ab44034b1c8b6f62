"""A loss that becomes NaN/inf: the step stops with a message naming the epoch, the step, the loss term and the
batch's sample ids, every rank takes the same decision, and the optional skip is counted and logged to MLflow."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn

from bifit.engine import NonFiniteLossError, gather_nonfinite
from pipeline import tracking
from pipeline.config import load_pipeline_config
from pipeline.faults import read_events, read_fatal
from tests.reliability.conftest import on_gloo_ranks, write_params
from tests.reliability.toy_training import NaNGradientOnCalls, NonFiniteOnCall, ToyRun

# an absurd learning rate: the first optimizer step leaves weights near 1e30, the next forward overflows
EXPLODING = dict(lr=1.0e30, lr_backbone=1.0e30, lr_text_encoder=1.0e30, lr_text_fusion=1.0e30, epochs=1,
                 max_steps_per_epoch=3)


@pytest.fixture(scope="module")
def cfg(tmp_path_factory, toy_data, one_thread):
    folder = tmp_path_factory.mktemp("nonfinite")
    return load_pipeline_config(write_params(folder, toy_data, train=dict(epochs=1, max_steps_per_epoch=3)))


@pytest.mark.parametrize("value,shown", [(float("nan"), "nan"), (float("inf"), "inf")])
def test_nonfinite_loss_stops_naming_step_term_and_sample_ids(cfg, value, shown):
    run = ToyRun(cfg, lambda c: NonFiniteOnCall(c, call=2, term="loss_dice", value=value))
    with pytest.raises(NonFiniteLossError) as err:
        run.epoch(0)
    message = str(err.value)
    assert message.startswith(f"epoch 0 step 2: non-finite loss term(s) loss_dice={shown} on samples ")
    ids = run.criterion.poisoned_ids
    assert ids and all(re.fullmatch(r"video \w+ exp_id \d+ obj_id \d+ frames \[\d+(, \d+)*\]", i) for i in ids)
    assert str(ids) in message and "train.skip_nonfinite_batches" in message


class NonFiniteBoxesOnCall(nn.Module):
    """Wraps the model: on its `call`-th call the predicted boxes are NaN (what diverging weights produce)."""

    def __init__(self, inner: nn.Module, call: int):
        super().__init__()
        self.inner, self.call, self.calls = inner, call, 0

    def forward(self, **inputs):
        self.calls += 1
        outputs = self.inner(**inputs)
        if self.calls == self.call:
            outputs["pred_boxes"] = outputs["pred_boxes"] * float("nan")
        return outputs


def test_nonfinite_model_outputs_are_named_not_blamed_on_the_loss(cfg):
    run = ToyRun(cfg)
    run.model = NonFiniteBoxesOnCall(run.model, call=1)
    with pytest.raises(NonFiniteLossError, match=r"^epoch 0 step 1: non-finite model output\(s\) pred_boxes \(the loss "
                                                 r"is not used\) on samples \['video \w+ exp_id \d+ obj_id \d+"):
        run.epoch(0)


def test_skip_mode_skips_only_that_batch_and_counts_it(cfg):
    run = ToyRun(cfg, lambda c: NonFiniteOnCall(c, call=2, term="loss_mask"))
    stats = run.epoch(0, skip_nonfinite=True)
    assert stats["skipped_steps"] == 1 and stats["steps"] == 2 and stats["global_step"] == 3
    assert math.isfinite(stats["loss"])
    assert all(torch.isfinite(p).all() for p in run.model.parameters())


def _weights(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_nonfinite_gradient_of_a_finite_loss_stops_before_the_step(cfg):
    """Clipping would spread one NaN gradient to every gradient and the step to every weight; the step is not
    applied and the message names the batch whose backward produced it."""
    run = ToyRun(cfg, lambda c: NaNGradientOnCalls(c, calls={2}))
    before = {}

    def remember(step, values):  # after step 1's optimizer step: the weights step 2 must leave untouched
        before.update(_weights(run.model))

    with pytest.raises(NonFiniteLossError) as err:
        from torch.utils.data import DataLoader

        from bifit.data import collate_fn
        from bifit.engine import train_one_epoch

        loader = DataLoader(run.dataset, batch_size=cfg.train.batch_size, collate_fn=collate_fn)
        train_one_epoch(run.model, run.criterion, loader, run.optimizer, run.tokenizer, torch.device("cpu"), 0,
                        cfg.train.clip_max_norm, max_steps=3, on_step=remember)
    message = str(err.value)
    assert re.match(r"epoch 0 step 2: non-finite gradient\(s\) of [\w.]+(, [\w.]+)*( and \d+ more)? \(loss [\d.e+-]+ "
                    r"was finite; the step is not applied\) on samples ", message), message
    assert str(run.criterion.poisoned_ids[0]) in message
    after = _weights(run.model)
    assert before and all(torch.equal(before[k], after[k]) for k in before)  # step 2 changed nothing


def test_skip_mode_skips_a_batch_with_nonfinite_gradients_and_the_weights_stay_finite(cfg):
    run = ToyRun(cfg, lambda c: NaNGradientOnCalls(c, calls={2}))
    stats = run.epoch(0, skip_nonfinite=True)
    assert stats["skipped_steps"] == 1 and stats["steps"] == 2
    assert all(torch.isfinite(p).all() for p in run.model.parameters())


def test_skip_mode_stops_when_every_batch_of_an_epoch_is_skipped(cfg):
    run = ToyRun(cfg, lambda c: NaNGradientOnCalls(c, calls={1, 2, 3}))
    with pytest.raises(NonFiniteLossError, match=r"^epoch 0: all 3 batches were non-finite and skipped; the model has "
                                                 r"diverged \(lower the learning rates\)$"):
        run.epoch(0, skip_nonfinite=True)


def test_weights_that_overflow_in_the_optimizer_step_stop_the_epoch(tmp_path, toy_data):
    """Finite gradients, but a learning rate that takes float32 weights past 3.4e38: no checkpoint of them."""
    huge = dict(lr=1.0e39, lr_backbone=1.0e39, lr_text_encoder=1.0e39, lr_text_fusion=1.0e39, epochs=1,
                max_steps_per_epoch=1)
    run = ToyRun(load_pipeline_config(write_params(tmp_path, toy_data, train=huge)))
    with pytest.raises(NonFiniteLossError, match=r"^epoch 0: non-finite weights after step 1 in [\w.]+.*; the model "
                                                 r"has diverged \(lower the learning rates\); no checkpoint of it is "
                                                 r"written$"):
        run.epoch(0, skip_nonfinite=True)


def _agree(rank: int, out: dict) -> None:
    message = "epoch 0 step 7: non-finite loss term(s) loss_giou=nan on samples ['video v exp_id 1']" \
        if rank == 1 else None
    out[rank] = gather_nonfinite(message, torch.device("cpu"))
    out[f"{rank}-finite"] = gather_nonfinite(None, torch.device("cpu"))


def test_every_rank_takes_the_same_decision(tmp_path):
    """Only rank 1 sees the NaN; rank 0 must stop (or skip) too, or DDP's gradient all-reduce would hang."""
    out = on_gloo_ranks(_agree, tmp_path)
    expected = ["rank 1: epoch 0 step 7: non-finite loss term(s) loss_giou=nan on samples ['video v exp_id 1']"]
    assert out[0] == out[1] == expected
    assert out["0-finite"] == out["1-finite"] == []


@pytest.mark.timeout(600)  # a Ray run that hangs fails instead of blocking the suite
def test_ray_run_stops_once_with_the_message_and_no_retry(tmp_path, toy_data, fresh_ray):
    """With ray.max_failures: 1 Ray restarts the worker group; the restarted group finds the fatal record and
    ends at once instead of replaying the NaN, and the driver raises the workers' message. (One worker: the
    agreement between ranks is checked above with two gloo processes.)"""
    from pipeline.train import run_dir, run_training

    fresh_ray()
    cfg = load_pipeline_config(write_params(tmp_path, toy_data, train=EXPLODING,
                                           ray=dict(num_workers=1, max_failures=1)))
    with pytest.raises(NonFiniteLossError, match=r"^epoch 0 step \d: non-finite (loss term|model output)\(s\) "
                                                 r".* on samples \['video \w+ exp_id \d+ obj_id \d+ frames") as err:
        run_training(cfg)
    assert "stopped on Ray Train worker rank 0" in err.value.__notes__[0]  # raised from the fatal record
    folder = run_dir(cfg)
    assert read_fatal(folder)["type"] == "NonFiniteLossError"
    assert [e["event"] for e in read_events(folder)] == ["driver_start", "start"]  # trained once, not 2 times
    run_id = (folder / "mlflow_run_id").read_text().strip()
    assert tracking.run_state(cfg.mlflow.resolved_uri(), run_id) == "FAILED"  # the worker's error ended the run


@pytest.mark.timeout(600)  # a Ray run that hangs fails instead of blocking the suite
def test_ray_run_skips_nonfinite_batches_and_logs_the_counter_to_mlflow(tmp_path, toy_data, fresh_ray):
    from mlflow.tracking import MlflowClient

    from pipeline.train import run_training

    fresh_ray()
    cfg = load_pipeline_config(write_params(tmp_path, toy_data, train={**EXPLODING, "skip_nonfinite_batches": True},
                                           ray=dict(num_workers=1)))
    out = run_training(cfg)
    metrics = out["final"]["metrics"]
    assert metrics["train_steps"] + metrics["train_skipped_steps"] == 3 and metrics["train_skipped_steps"] >= 1
    assert metrics["skipped_nonfinite_batches"] == metrics["train_skipped_steps"]
    history = MlflowClient(cfg.mlflow.resolved_uri()).get_metric_history(out["run_id"], "skipped_nonfinite_batches")
    assert [m.value for m in history] == [metrics["train_skipped_steps"]]
    samples = MlflowClient(cfg.mlflow.resolved_uri()).get_metric_history(out["run_id"], "skipped_samples")
    assert [m.value for m in samples] == [0]  # the data-skip counter is logged too (clean data: none)
    from bifit.checkpoint import safe_load

    exported = safe_load(out["final"]["path"])["model"]
    assert exported and all(torch.isfinite(v).all() for v in exported.values() if v.is_floating_point())
