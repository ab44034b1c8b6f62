"""Exponential moving average of a model's weights (`train.ema_decay`; not in the official recipe).

After every optimizer step: ema = decay * ema + (1 - decay) * weights, for every floating-point parameter and
buffer (batch-norm statistics included); integer buffers (batch-norm step counters) are copied. The average
follows the weights closely at first (decay min(decay, (1 + n) / (10 + n)) after n updates), so an early model is
not dragged towards its random initialisation. Frozen parameters keep the value they had when the average
started (they do not change).
"""

from __future__ import annotations

import torch
from torch import nn


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)  # DDP


class ModelEMA:
    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ModelEMA: decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        self.state = {k: v.detach().clone() for k, v in _unwrap(model).state_dict().items()}
        trainable = {name for name, p in _unwrap(model).named_parameters() if p.requires_grad}
        # the entries that move: trainable parameters and floating-point buffers (batch-norm running statistics)
        buffers = {name for name, b in _unwrap(model).named_buffers() if b.is_floating_point()}
        self.averaged = sorted(k for k in self.state if k in trainable or k in buffers)
        self.copied = [k for k, v in self.state.items() if not v.is_floating_point()]  # e.g. num_batches_tracked

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One averaging step towards `model`'s current weights (call after optimizer.step())."""
        weights = _unwrap(model).state_dict()
        self.updates += 1
        d = self.current_decay()
        ema = [self.state[k] for k in self.averaged]
        cur = [weights[k].detach() for k in self.averaged]
        torch._foreach_lerp_(ema, cur, 1.0 - d)  # ema += (1 - d) * (cur - ema)
        for k in self.copied:
            self.state[k].copy_(weights[k])

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "model": self.state}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.state) - set(state["model"])
        if missing:
            raise KeyError(f"ModelEMA: the saved average lacks {sorted(missing)[:5]} ({len(missing)} entries)")
        self.updates = int(state["updates"])
        for k, v in state["model"].items():
            if k in self.state:
                self.state[k].copy_(v)
