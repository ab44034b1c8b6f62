"""Reproducibility on CPU without Ray (fast): two runs with the same seed and config are bitwise identical, and
an epoch restarted from a checkpoint replays the uninterrupted run exactly because every epoch is seeded from
(seed, rank, epoch). The Ray runs in test_fault_tolerance.py check the same end to end."""

from __future__ import annotations

import copy

import pytest
import torch

from bifit.checkpoint import atomic_save, load_checkpoint
from pipeline.config import load_pipeline_config
from tests.reliability.conftest import write_params
from tests.reliability.toy_training import ToyRun

# the reference photometric distortion draws many random numbers: a replay that is off shows at once
TRAIN = dict(epochs=2, max_steps_per_epoch=2, lr_drop=[1])


@pytest.fixture(scope="module")
def cfg(tmp_path_factory, toy_data, one_thread):
    folder = tmp_path_factory.mktemp("determinism")
    return load_pipeline_config(write_params(folder, toy_data, train=TRAIN, data=dict(photometric="official")))


def losses(stats: dict) -> dict:
    return {k: v for k, v in stats.items() if k.startswith("loss")}


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), f"weights differ at {name}"


def test_two_runs_with_the_same_seed_are_identical(cfg):
    first, second = ToyRun(cfg), ToyRun(cfg)
    for epoch in range(2):
        assert losses(first.epoch(epoch)) == losses(second.epoch(epoch))
    assert_same_weights(first.model, second.model)


def test_epoch_restarted_from_checkpoint_replays_the_uninterrupted_run(cfg, tmp_path):
    straight = ToyRun(cfg)
    straight.epoch(0)
    last = straight.epoch(1)

    interrupted = ToyRun(cfg)
    interrupted.epoch(0)
    atomic_save({"format": "bifit-checkpoint-v1", "config": {}, **interrupted.state()}, tmp_path / "epoch_0000.pth")
    resumed = ToyRun(cfg)  # a fresh process: new model, optimizer and random state
    resumed.load(load_checkpoint(tmp_path / "epoch_0000.pth"))
    assert losses(resumed.epoch(1)) == losses(last)
    assert_same_weights(straight.model, resumed.model)


def test_without_per_epoch_seeding_a_restart_would_diverge(cfg):
    """The control that shows the check above has teeth: seeding once at start-up is not enough."""
    straight = ToyRun(cfg)
    straight.epoch(0, seed_each_epoch=False)
    last = straight.epoch(1, seed_each_epoch=False)
    interrupted = ToyRun(cfg)
    interrupted.epoch(0, seed_each_epoch=False)
    resumed = ToyRun(cfg)
    resumed.load(copy.deepcopy(interrupted.state()))
    assert losses(resumed.epoch(1, seed_each_epoch=False)) != losses(last)



# ---------------------------------------------------------------------------------------------------------------
# DataLoader worker processes (data.num_workers > 0, persistent across epochs as the train stage makes them)


@pytest.fixture(scope="module")
def cfg_workers(tmp_path_factory, toy_data, one_thread):
    folder = tmp_path_factory.mktemp("determinism_workers")
    return load_pipeline_config(write_params(folder, toy_data, train=TRAIN,
                                             data=dict(photometric="official", num_workers=2)))


@pytest.fixture(scope="module")
def straight_with_workers(cfg_workers):
    """Epochs 0 and 1 in one go with 2 persistent DataLoader workers: the run, the state after epoch 0 and the
    losses of each epoch."""
    run = ToyRun(cfg_workers)
    assert run.loader.num_workers == 2 and run.loader.persistent_workers
    first = run.epoch(0)
    after_first = copy.deepcopy(run.state())
    return run, after_first, [losses(first), losses(run.epoch(1))]


def test_epoch_restarted_from_checkpoint_replays_the_uninterrupted_run_with_dataloader_workers(cfg_workers,
                                                                                                straight_with_workers):
    """Persistent workers carry their random state from one epoch to the next, a restarted epoch starts fresh
    ones: the draws must not depend on that (each item is drawn from (seed, rank, epoch, index))."""
    straight, after_first, epoch_losses = straight_with_workers
    resumed = ToyRun(cfg_workers)  # a fresh process: new model, optimizer, loader and worker processes
    resumed.load(after_first)
    assert losses(resumed.epoch(1)) == epoch_losses[1]
    assert_same_weights(straight.model, resumed.model)


def test_dataloader_workers_draw_and_train_as_the_main_process(cfg, cfg_workers, straight_with_workers):
    """The same (seed, rank, epoch) gives the same clips and augmentations with 0 or 2 DataLoader workers, and so
    the same training, bit for bit."""
    from pipeline.train import _dataset, _loader

    main_sampler, main = _loader(cfg, _dataset(cfg), world=1, rank=0)
    workers_sampler, workers = _loader(cfg_workers, _dataset(cfg_workers), world=1, rank=0)
    for epoch in (0, 1):
        main_sampler.set_epoch(epoch)
        workers_sampler.set_epoch(epoch)
        for a, b in zip(main, workers, strict=True):
            assert torch.equal(a.images, b.images) and torch.equal(a.image_mask, b.image_mask)
            assert a.captions == b.captions
            for ta, tb in zip(a.targets, b.targets, strict=True):
                assert ta.keys() == tb.keys()
                assert all(torch.equal(ta[k], tb[k]) if torch.is_tensor(ta[k]) else ta[k] == tb[k] for k in ta)

    straight, _, epoch_losses = straight_with_workers
    in_main = ToyRun(cfg)
    assert in_main.loader.num_workers == 0
    assert [losses(in_main.epoch(epoch)) for epoch in (0, 1)] == epoch_losses
    assert_same_weights(in_main.model, straight.model)
