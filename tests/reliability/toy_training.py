"""The train stage's per-worker loop without Ray, for fast in-process checks: build the toy model, data, loader
(`pipeline.train._loader`, DataLoader workers included when `data.num_workers` > 0) and optimizer exactly as
`pipeline.train.train_loop_per_worker` does and run epochs with the same seeding."""

from __future__ import annotations

import random

import torch
from torch import nn

from bifit.engine import build_optimizer, sample_ids, seed_epoch, train_one_epoch
from pipeline.train import _build, _dataset, _loader


class ToyRun:
    """Model, optimizer, scheduler and loader of one rank (world size 1) at toy size."""

    def __init__(self, cfg, criterion_wrapper=None):
        self.cfg = cfg
        random.seed(cfg.train.seed)  # what a fresh worker process of rank 0 does
        torch.manual_seed(cfg.train.seed)
        self.tokenizer, self.model, criterion = _build(cfg)
        self.criterion = criterion_wrapper(criterion) if criterion_wrapper else criterion
        self.optimizer, self.scheduler = build_optimizer(self.model, cfg.train)
        self.dataset = _dataset(cfg)
        # built once, as _distribute does: persistent DataLoader workers live across the epochs
        self.sampler, self.loader = _loader(cfg, self.dataset, world=1, rank=0)
        self.global_step = 0

    def epoch(self, epoch: int, seed_each_epoch: bool = True, skip_nonfinite: bool = False) -> dict:
        self.sampler.set_epoch(epoch)  # as pipeline.train._train_epoch does
        if seed_each_epoch:
            seed_epoch(self.cfg.train.seed, 0, epoch)
        stats = train_one_epoch(self.model, self.criterion, self.loader, self.optimizer, self.tokenizer,
                                torch.device("cpu"), epoch, self.cfg.train.clip_max_norm,
                                max_steps=self.cfg.train.max_steps_per_epoch, skip_nonfinite=skip_nonfinite,
                                global_step=self.global_step)
        self.global_step = stats["global_step"]
        self.scheduler.step()
        return stats

    def state(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "lr_scheduler": self.scheduler.state_dict(), "global_step": self.global_step}

    def load(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["lr_scheduler"])
        self.global_step = state["global_step"]


class NonFiniteOnCall(nn.Module):
    """Wraps the criterion: on its `call`-th call the loss term `term` becomes `value` (NaN or inf); records the
    sample ids of that batch."""

    def __init__(self, inner: nn.Module, call: int, term: str = "loss_dice", value: float = float("nan")):
        super().__init__()
        self.inner, self.call, self.term, self.value = inner, call, term, value
        self.calls, self.poisoned_ids = 0, None

    def forward(self, outputs, targets):
        self.calls += 1
        losses = self.inner(outputs, targets)
        if self.calls == self.call:
            losses[self.term] = losses[self.term] * 0 + self.value
            self.poisoned_ids = sample_ids(targets)
        return losses

    def weighted_total(self, losses):
        return self.inner.weighted_total(losses)


class _NaNGradient(torch.autograd.Function):
    """Identity forward; NaN backward (a finite loss whose gradient is not, as an overflow in backward gives)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


class NaNGradientOnCalls(nn.Module):
    """Wraps the criterion: on the calls in `calls` the term `term` keeps its value but back-propagates NaN."""

    def __init__(self, inner: nn.Module, calls: set[int], term: str = "loss_dice"):
        super().__init__()
        self.inner, self.calls_to_poison, self.term = inner, set(calls), term
        self.calls, self.poisoned_ids = 0, []

    def forward(self, outputs, targets):
        self.calls += 1
        losses = self.inner(outputs, targets)
        if self.calls in self.calls_to_poison:
            losses[self.term] = _NaNGradient.apply(losses[self.term])
            self.poisoned_ids.append(sample_ids(targets))
        return losses

    def weighted_total(self, losses):
        return self.inner.weighted_total(losses)
