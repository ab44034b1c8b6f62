"""Batch samplers for training.

`VideoGroupedBatchSampler` fills each optimizer step's global batch (all ranks together) with expressions of
ONE video that refer to different objects (the same scene, different targets), so that every step contrasts
referents: a model that ignores the sentence cannot fit such a batch. The official recipe draws clips
independently (a `DistributedSampler`); this is a training-recipe option (`data.batch_grouping: video`).

`EpochIndices` and `PerSampleSeeded` make a training loader's random draws (clip frames, augmentations, redraws)
a function of (seed, rank, epoch, dataset index) alone, whatever `num_workers` is; see `PerSampleSeeded`.
"""

from __future__ import annotations

import hashlib
import random
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler


def _round_robin(groups: list[list[int]]) -> list[int]:
    """One item of every group in turn: [[a1, a2], [b1], [c1, c2]] -> [a1, b1, c1, a2, c2]."""
    out, depth = [], max((len(g) for g in groups), default=0)
    for k in range(depth):
        out.extend(g[k] for g in groups if k < len(g))
    return out


class VideoGroupedBatchSampler(Sampler[list[int]]):
    """Per rank, batches of `batch_size` sample indices; the ranks' k-th batches together come from one video
    and cycle over its objects.

    samples: the dataset's samples (anything with `.video` and `.obj_id`), in dataset index order.
    Per epoch (seeded by seed and epoch, like `DistributedSampler`; the same on every rank): each video's
    samples are shuffled and interleaved object by object and cut into global batches of
    `batch_size * num_replicas` (a video's incomplete last one is dropped); the global batches of all videos
    are shuffled, and rank r takes the r-th `batch_size` slice of each.
    """

    def __init__(self, samples: Sequence, batch_size: int, num_replicas: int = 1, rank: int = 0, seed: int = 0):
        if batch_size < 1:
            raise ValueError(f"train.batch_size: expected an integer >= 1, got {batch_size}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"VideoGroupedBatchSampler.rank: expected 0 <= rank < {num_replicas}, got {rank}")
        self.batch_size, self.num_replicas, self.rank, self.seed = batch_size, num_replicas, rank, seed
        self.epoch = 0
        by_video: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
        for i, s in enumerate(samples):
            by_video[s.video][s.obj_id].append(i)
        self.videos = {v: dict(objs) for v, objs in sorted(by_video.items())}
        if len(self) == 0:
            raise ValueError(f"data.batch_grouping: video: no video has {batch_size * num_replicas} samples to fill "
                             f"a batch of {batch_size} (train.batch_size) for each of {num_replicas} rank(s) "
                             f"({len(samples)} samples in {len(self.videos)} videos); lower train.batch_size or "
                             "use data.batch_grouping: none")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.num_replicas

    def _global_batches(self) -> list[list[int]]:
        rng = random.Random(f"{self.seed}/{self.epoch}")
        batches, g = [], self.global_batch
        for objects in self.videos.values():
            groups = [rng.sample(idx, len(idx)) for _, idx in sorted(objects.items())]
            rng.shuffle(groups)
            order = _round_robin(groups)
            batches.extend(order[k : k + g] for k in range(0, len(order) - len(order) % g, g))
        rng.shuffle(batches)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        lo, hi = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        return iter([b[lo:hi] for b in self._global_batches()])

    def __len__(self) -> int:
        return sum(sum(len(i) for i in objs.values()) // self.global_batch for objs in self.videos.values())


# ---------------------------------------------------------------------------------------------------------------
# per-sample seeding of the training draws


def sample_seed(seed: int, rank: int, epoch: int, index: int) -> int:
    """The 32-bit seed of one item: dataset `index` drawn by `rank` in `epoch` of a run seeded with `seed` (the
    same derivation as `bifit.engine.seed_epoch`, one level further down)."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{rank}/{epoch}/{index}".encode()).digest()[:4], "little")


@contextmanager
def seeded_rngs(seed: int):
    """Seed the global `random`, NumPy and torch CPU generators with `seed` for the block, and put back their
    previous states afterwards (so a draw made in the main process, `num_workers: 0`, leaves the training loop's
    own random stream, e.g. its dropout masks, untouched). Only the CPU generator: `torch.manual_seed` would also
    reseed the CUDA generators the model's dropout draws from on a GPU."""
    states = random.getstate(), np.random.get_state(), torch.default_generator.get_state()
    random.seed(seed)
    np.random.seed(seed)
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.default_generator.set_state(states[2])


def _tagged(epoch: int, items) -> Iterator:
    for item in items:
        yield [(epoch, i) for i in item] if isinstance(item, list) else (epoch, item)


class EpochIndices(Sampler):
    """Wraps a sampler or a batch sampler that has `set_epoch`/`epoch` (`DistributedSampler`,
    `VideoGroupedBatchSampler`): yields `(epoch, index)` for each of its indices (lists of them for a batch
    sampler), the epoch being the sampler's when the iteration starts. The keys travel to the DataLoader worker
    processes with the indices, so a persistent worker knows which epoch every item belongs to. Call the wrapped
    sampler's `set_epoch` as before."""

    def __init__(self, sampler):
        self.sampler = sampler

    def __iter__(self) -> Iterator:
        return _tagged(self.sampler.epoch, self.sampler)  # the epoch read now, not at the first item

    def __len__(self) -> int:
        return len(self.sampler)


class PerSampleSeeded(Dataset):
    """A map-style dataset whose items are drawn reproducibly: `ds[(epoch, index)]` is `dataset[index]` drawn with
    the global `random`, NumPy and torch CPU generators seeded from `sample_seed(seed, rank, epoch, index)`
    (`seeded_rngs`), the keys coming from an `EpochIndices` sampler.

    Why per sample: DataLoader workers draw from their own generators, which PyTorch seeds once when a worker
    starts, and persistent workers (`persistent_workers=True`) carry that state from one epoch to the next. An
    epoch restarted from a checkpoint starts fresh workers, so it drew other clips and augmentations than the
    uninterrupted run, unless `num_workers` was 0. Reseeding workers at each epoch start would need the epoch
    inside the worker and would still tie every draw to the worker that happens to load the item; seeding each
    item from its own key needs neither, so the draws are the same for any `num_workers`, any prefetching, and
    in a restarted epoch, at the cost of one hash and three reseeds per item (microseconds, next to decoding
    frames). A redraw (a clip without a valid frame replaced by another sample) continues the item's stream.

    Covers what the dataset draws from those global generators (the defaults of `YTVOSDataset` and
    `make_train_transforms`); a dataset or transform given its own `random.Random` is not reseeded.
    Give the DataLoader a `generator` too: it draws its workers' base seed at every new iterator, from the global
    torch generator unless given its own, and with persistent workers only the first epoch of a process makes
    a new iterator, so a restarted epoch would take one more number from the training loop's stream (its
    dropout masks) than the uninterrupted run did."""

    def __init__(self, dataset, seed: int, rank: int = 0):
        self.dataset, self.seed, self.rank = dataset, seed, rank

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        with seeded_rngs(sample_seed(self.seed, self.rank, epoch, index)):
            return self.dataset[index]
