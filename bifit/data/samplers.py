"""Batch samplers for training.

`VideoGroupedBatchSampler` fills each optimizer step's global batch (all ranks together) with expressions of
ONE video that refer to different objects (the same scene, different targets), so that every step contrasts
referents: a model that ignores the sentence cannot fit such a batch. The official recipe draws clips
independently (a `DistributedSampler`); this is a training-recipe option (`data.batch_grouping: video`).
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterator, Sequence

from torch.utils.data import Sampler


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
