"""VideoGroupedBatchSampler: one video per batch, different objects, every sample at most once, ranks disjoint.
PerSampleSeeded + EpochIndices: an item's random draws depend on (seed, rank, epoch, index) only."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from bifit.data.samplers import EpochIndices, PerSampleSeeded, VideoGroupedBatchSampler


@dataclass(frozen=True)
class S:
    video: str
    obj_id: str


def samples():
    # video a: 3 objects x 4 samples; b: 2 objects x 3 samples; c: one object, one sample (cannot fill a batch)
    return ([S("a", o) for o in "123" for _ in range(4)] + [S("b", o) for o in "12" for _ in range(3)]
            + [S("c", "1")])


def test_batches_hold_one_video_and_different_objects():
    data = samples()
    sampler = VideoGroupedBatchSampler(data, batch_size=2, seed=0)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 12 // 2 + 6 // 2  # c's lone sample is dropped
    for batch in batches:
        assert len(batch) == 2
        assert len({data[i].video for i in batch}) == 1
        assert len({data[i].obj_id for i in batch}) == 2  # round-robin over the video's objects
    used = Counter(i for b in batches for i in b)
    assert max(used.values()) == 1 and len(used) == 18


def test_epochs_reshuffle_and_repeat_with_the_seed():
    data = samples()
    a, b = VideoGroupedBatchSampler(data, 2, seed=3), VideoGroupedBatchSampler(data, 2, seed=3)
    first = list(a)
    assert first == list(b)
    a.set_epoch(1)
    assert list(a) != first and len(list(a)) == len(first)


def test_ranks_share_each_step_s_video_and_get_disjoint_samples():
    data = samples()
    shares = [list(VideoGroupedBatchSampler(data, 2, num_replicas=2, rank=r, seed=1)) for r in (0, 1)]
    assert len(shares[0]) == len(shares[1]) == 12 // 4 + 6 // 4
    for mine, theirs in zip(*shares):  # one optimizer step: the global batch is one video, 4 samples
        step = mine + theirs
        assert len({data[i].video for i in step}) == 1 and len(step) == 4
        objects_in_video = {s.obj_id for s in data if s.video == data[step[0]].video}
        assert len({data[i].obj_id for i in step}) == min(4, len(objects_in_video))
    flat = [i for share in shares for b in share for i in b]
    assert len(flat) == len(set(flat)) == 16


def test_rejects_settings_that_leave_nothing():
    with pytest.raises(ValueError, match="data.batch_grouping: video: no video has 5 samples"):
        VideoGroupedBatchSampler([S("a", "1")] * 4, batch_size=5)
    with pytest.raises(ValueError, match="rank"):
        VideoGroupedBatchSampler(samples(), 2, num_replicas=2, rank=2)


def test_pipeline_loader_uses_the_grouped_sampler_when_asked(monkeypatch):
    from pipeline.config import PipelineConfig
    from pipeline.train import _loader

    class Dataset:  # the loader only needs .samples and item access
        samples = samples()

        def __len__(self):
            return len(self.samples)

        def __getitem__(self, i):
            return i

    cfg = PipelineConfig()
    cfg.train.batch_size = 2
    cfg.data.batch_grouping = "video"
    sampler, loader = _loader(cfg, Dataset(), world=1, rank=0)
    monkeypatch.setattr(loader, "collate_fn", list)
    assert isinstance(sampler, VideoGroupedBatchSampler) and len(loader) == len(sampler) == 9
    for batch in loader:
        assert len({Dataset.samples[i].video for i in batch}) == 1
    cfg.data.batch_grouping = "none"
    sampler, loader = _loader(cfg, Dataset(), world=1, rank=0)
    assert not isinstance(sampler, VideoGroupedBatchSampler) and len(loader) == 19 // 2


# ---------------------------------------------------------------------------------------------------------------
# per-sample seeding


class Draws:
    """Each item: its index and one draw of each global generator a dataset or transform may use."""

    samples = samples()

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return i, random.random(), float(np.random.rand()), float(torch.rand(()))


def _epochs(num_workers: int, epochs, grouped: bool = False, seed: int = 3, rank: int = 0) -> list[list]:
    """The items of each epoch in `epochs`, from one loader whose workers persist across them."""
    data = Draws()
    if grouped:
        sampler = VideoGroupedBatchSampler(data.samples, 2, num_replicas=2, rank=rank, seed=seed)
        kwargs = dict(batch_sampler=EpochIndices(sampler))
    else:
        sampler = DistributedSampler(data, num_replicas=2, rank=rank, shuffle=True, seed=seed, drop_last=True)
        kwargs = dict(batch_size=2, sampler=EpochIndices(sampler), drop_last=True)
    loader = DataLoader(PerSampleSeeded(data, seed, rank), collate_fn=list, num_workers=num_workers,
                        persistent_workers=num_workers > 0, generator=torch.Generator().manual_seed(seed), **kwargs)
    out = []
    for epoch in epochs:
        sampler.set_epoch(epoch)
        out.append([item for batch in loader for item in batch])
    return out


@pytest.mark.parametrize("grouped", [False, True])
def test_draws_depend_on_seed_rank_epoch_and_index_only(grouped):
    main = _epochs(0, [0, 1, 2], grouped)
    assert _epochs(2, [0, 1, 2], grouped) == main  # the same with worker processes (persistent across epochs)
    assert _epochs(2, [1, 2], grouped) == main[1:]  # a run restarted at epoch 1: fresh workers, the same draws
    assert _epochs(1, [2], grouped) == main[2:]
    first, second = ({i: d for i, *d in epoch} for epoch in main[:2])
    assert all(first[i] != second[i] for i in set(first) & set(second))  # another epoch: other draws
    data = Draws()
    key = (0, 5)
    assert PerSampleSeeded(data, 3, 0)[key] == PerSampleSeeded(data, 3, 0)[key]
    assert PerSampleSeeded(data, 3, 1)[key] != PerSampleSeeded(data, 3, 0)[key] != PerSampleSeeded(data, 4, 0)[key]


def test_drawing_in_the_main_process_leaves_the_global_generators_alone():
    """num_workers 0: the items are drawn in the training process; its own stream (dropout) must not move."""
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    expected = random.random(), np.random.rand(), torch.rand(())
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    _epochs(0, [0, 1])
    assert (random.random(), np.random.rand(), torch.rand(())) == expected
