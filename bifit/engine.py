"""Plain training loop pieces (torchvision-references style): optimizer groups, one epoch, batch inputs.

No orchestration here: `pipeline/train.py` wraps these with Ray Train and MLflow.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import random
import time
from collections import defaultdict
from collections.abc import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from bifit.data.collate import tokenize
from bifit.data.ytvos import REDRAWN_KEY

log = logging.getLogger(__name__)

# (group name, substrings of parameter names, lr attribute of TrainConfig); first match wins, as in the
# official code: backbone, text encoder, text fusion, deformable linear projections, then everything else
GROUPS = (
    ("backbone", ("backbone.",), "lr_backbone"),
    ("text_encoder", ("text_encoder.",), "lr_text_encoder"),
    ("text_fusion", ("vl_interaction.vision_to_text.",), "lr_text_fusion"),
    ("linear_proj", ("reference_points", "sampling_offsets"), None),
)


class NonFiniteLossError(FloatingPointError):
    """A loss term, a model output, a gradient or a weight became NaN or inf; the message names the step, what
    was non-finite and the samples."""


def param_groups(model: nn.Module, tcfg) -> list[dict]:
    """AdamW groups with the official learning rates; only trainable parameters, each once."""
    groups = {name: [] for name, _, _ in GROUPS}
    groups["main"] = []
    for pname, p in model.named_parameters():
        if not p.requires_grad:
            continue
        for name, keys, _ in GROUPS:
            if any(k in pname for k in keys):
                groups[name].append(p)
                break
        else:
            groups["main"].append(p)
    lrs = {name: getattr(tcfg, attr) if attr else tcfg.lr * tcfg.lr_linear_proj_mult for name, _, attr in GROUPS}
    lrs["main"] = tcfg.lr
    order = ["main"] + [name for name, _, _ in GROUPS]
    return [{"params": groups[n], "lr": lrs[n], "name": n} for n in order if groups[n]]


def build_optimizer(model: nn.Module, tcfg):
    # fused: one kernel over all parameters (CPU and CUDA); the default per-tensor loop on CPU spends a quarter
    # of a small model's training step in Python
    optimizer = torch.optim.AdamW(param_groups(model, tcfg), lr=tcfg.lr, weight_decay=tcfg.weight_decay, fused=True)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, tcfg.lr_drop, gamma=tcfg.lr_gamma)
    return optimizer, scheduler


def batch_inputs(batch, tokenizer, device) -> tuple[dict, list[dict]]:
    """VideoBatch -> (model keyword inputs, targets on the device; string ids stay on the host)."""
    input_ids, attention_mask = tokenize(tokenizer, batch.captions)
    # non_blocking: the copies overlap with the host work that follows when the loader pins memory
    targets = [{k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in t.items()}
               for t in batch.targets]
    inputs = dict(
        images=batch.images.to(device, non_blocking=True), image_mask=batch.image_mask.to(device, non_blocking=True),
        input_ids=input_ids.to(device, non_blocking=True), attention_mask=attention_mask.to(device, non_blocking=True),
        image_sizes=torch.stack([t["size"] for t in targets]),
    )
    if "valid_indices" in targets[0]:
        inputs["valid_indices"] = torch.cat([t["valid_indices"].view(-1) for t in targets])
    return inputs, targets


def seed_epoch(seed: int, rank: int, epoch: int) -> int:
    """Seed `random`, NumPy and torch from (seed, rank, epoch), so that an epoch restarted from a checkpoint
    draws the same clips, augmentations and dropout masks as the uninterrupted run. Returns the derived seed."""
    derived = int.from_bytes(hashlib.sha256(f"{seed}/{rank}/{epoch}".encode()).digest()[:4], "little")
    random.seed(derived)
    np.random.seed(derived)
    torch.manual_seed(derived)
    return derived


def set_deterministic() -> None:
    """Deterministic kernels where PyTorch has them (warn-only: the deformable-attention backward on CUDA uses
    atomic adds, so GPU runs stay reproducible only up to float rounding); CPU runs need none of this."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def sample_ids(targets: list[dict]) -> list[str]:
    """Readable ids of a batch's samples: `video <v> exp_id <e> obj_id <o> frames [...]` (or `image_id`)."""
    ids = []
    for t in targets:
        if t.get("image_id") is not None:
            ids.append(str(t["image_id"]))
            continue
        sid = f"video {t.get('video')} exp_id {t.get('exp_id')}"
        if t.get("obj_id") is not None:
            sid += f" obj_id {t['obj_id']}"
        if torch.is_tensor(t.get("frames_idx")):
            sid += f" frames {t['frames_idx'].tolist()}"
        ids.append(sid)
    return ids


def float_outputs(outputs, prefix: str = ""):
    """(name, tensor) of every floating-point tensor in the nested model outputs (e.g. `aux_outputs[0].pred_boxes`)."""
    if torch.is_tensor(outputs):
        if outputs.is_floating_point():
            yield prefix, outputs
    elif isinstance(outputs, dict):
        for k, v in outputs.items():
            yield from float_outputs(v, f"{prefix}.{k}" if prefix else k)
    elif isinstance(outputs, (list, tuple)):
        for i, v in enumerate(outputs):
            yield from float_outputs(v, f"{prefix}[{i}]")


def nonfinite_outputs(outputs) -> list[str]:
    """Names of the model outputs holding NaN/inf (one host sync per output: only for the message)."""
    return [name for name, t in float_outputs(outputs) if not torch.isfinite(t).all()]


def nonfinite_message(losses: dict[str, torch.Tensor], total: torch.Tensor | None, step: int, epoch: int,
                      targets: list[dict], bad_outputs: list[str] = ()) -> str | None:
    """None when the outputs and the weighted total are finite, else a message naming the step, the bad loss
    terms (or model outputs) and the samples."""
    if bad_outputs:
        return (f"epoch {epoch} step {step}: non-finite model output(s) {', '.join(bad_outputs)} (the loss is not "
                f"used) on samples {sample_ids(targets)}")
    if torch.isfinite(total):
        return None
    bad = [f"{k}={v.item()}" for k, v in losses.items() if not torch.isfinite(v)]
    terms = ", ".join(bad) if bad else f"every term finite but the weighted total is {total.item()}"
    return f"epoch {epoch} step {step}: non-finite loss term(s) {terms} on samples {sample_ids(targets)}"


def gather_nonfinite(message: str | None, device: torch.device) -> list[str]:
    """The non-finite messages of all ranks (`rank r: ...`); every rank gets the same list, so every rank takes
    the same decision (skipping on one rank only would leave DDP's gradient all-reduce waiting forever)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [message] if message else []
    flag = torch.tensor([0 if message is None else 1], dtype=torch.int32,
                        device=device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(flag)
    if int(flag.item()) == 0:
        return []
    messages = [None] * dist.get_world_size()
    dist.all_gather_object(messages, message)
    return [f"rank {r}: {m}" for r, m in enumerate(messages) if m]


def sum_over_ranks(value: int, device: torch.device) -> int:
    """The sum of an integer over all ranks (itself when not distributed); every rank must call it."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    total = torch.tensor([value], dtype=torch.int64, device=device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(total)
    return int(total.item())


def redrawn_in(batch) -> int:
    """Redraws the loader made for this batch's clips (clips without a valid frame replaced, as the reference
    does); the count travels in the targets, so DataLoader workers' redraws are included."""
    return sum(int(t.get(REDRAWN_KEY, 0)) for t in batch.targets)


def all_finite(outputs) -> torch.Tensor:
    """A 0-d bool tensor: every floating-point model output is finite. Computed on the device, so checking it
    costs no host sync of its own."""
    flags = [torch.isfinite(t).all() for _, t in float_outputs(outputs)]
    return torch.stack(flags).all() if flags else torch.tensor(True)


def gradient_norm(model: nn.Module, clip_max_norm: float) -> torch.Tensor:
    """The total gradient norm (0-d, on the device), clipping to `clip_max_norm` when > 0. A non-finite norm
    means some gradient is NaN/inf; the optimizer must not step then (clipping would spread it to every weight)."""
    if clip_max_norm > 0:
        # foreach: one batched norm; the default on CPU is a Python loop of three ops per parameter
        return torch.nn.utils.clip_grad_norm_(model.parameters(), clip_max_norm, foreach=True)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) if grads else torch.zeros(())


def nonfinite_gradients(model: nn.Module) -> list[str]:
    """Names of the parameters whose gradient holds NaN/inf (one sync each: only for the message)."""
    return [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]


def nonfinite_parameters(model: nn.Module) -> list[str]:
    """Names of the parameters holding NaN/inf (one sync each: only for the message)."""
    return [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]


def parameters_finite(model: nn.Module) -> bool:
    """Every parameter is finite (one host sync; not through a norm, which overflows for large finite weights)."""
    flags = [torch.isfinite(p.detach()).all() for p in model.parameters()]
    return bool(torch.stack(flags).all()) if flags else True


def _names(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return f"{shown} and {len(names) - limit} more" if len(names) > limit else shown


def train_one_epoch(model, criterion, loader, optimizer, tokenizer, device, epoch: int, clip_max_norm: float = 0.1,
                    max_steps: int | None = None, skip_nonfinite: bool = False, amp: bool = False,
                    on_step: Callable[[int, dict], None] | None = None, global_step: int = 0, ema=None) -> dict:
    """One pass over `loader`. Returns averaged loss terms, steps, skipped steps, clips/s, the last step and
    `redrawn_samples` (the loader's redraws for the batches used, summed over ranks: a collective call).

    on_step(global_step, {"loss": ..., "lr/<group>": ..., terms...}) is called after every optimizer step;
    ema (a `bifit.ema.ModelEMA`) is updated after every optimizer step (not after a skipped batch).
    """
    model.train()
    sums, steps, skipped, clips, redrawn = defaultdict(float), 0, 0, 0, 0
    t0 = time.perf_counter()
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda")
    for batch in loader:
        if max_steps is not None and steps + skipped >= max_steps:
            break
        redrawn += redrawn_in(batch)
        inputs, targets = batch_inputs(batch, tokenizer, device)
        with autocast:
            outputs = model(**inputs)
            losses = criterion(outputs, targets)
            total = criterion.weighted_total(losses)
        global_step += 1
        logged = {"loss": total, **{k: v for k, v in losses.items() if "_" not in k[5:]}}
        optimizer.zero_grad(set_to_none=True)
        total.backward()  # every rank, even on a bad batch: DDP's all-reduce needs all of them
        grad_norm = gradient_norm(model, clip_max_norm)
        # the step's one host sync: the logged values, whether every model output and the gradient are finite
        values = torch.stack([v.detach().float() for v in logged.values()]
                             + [all_finite(outputs).float(), grad_norm.detach().float()]).tolist()
        grads_finite, outputs_finite = math.isfinite(values.pop()), values.pop() == 1.0
        values = dict(zip(logged, values))
        message = None
        if not outputs_finite or not math.isfinite(values["loss"]):  # rare: the details cost syncs of their own
            message = nonfinite_message(losses, total, global_step, epoch, targets, nonfinite_outputs(outputs))
        elif not grads_finite:
            bad = nonfinite_gradients(model)
            what = (f"non-finite gradient(s) of {_names(bad)}" if bad else
                    "a gradient norm that overflows float32 (every gradient finite but huge)")
            message = (f"epoch {epoch} step {global_step}: {what} (loss {values['loss']:.6g} was finite; the step is "
                       f"not applied) on samples {sample_ids(targets)}")
        problems = gather_nonfinite(message, device)
        if problems:
            if not skip_nonfinite:
                raise NonFiniteLossError("; ".join(problems) + " (set train.skip_nonfinite_batches: true to skip "
                                         "such batches, counted in MLflow as skipped_nonfinite_batches)")
            log.warning("skipping batch: %s", "; ".join(problems))
            skipped += 1
            optimizer.zero_grad(set_to_none=True)
            continue
        optimizer.step()
        if ema is not None:
            ema.update(model)
        steps += 1
        clips += inputs["images"].shape[0]
        for k, v in values.items():
            sums[k] += v
        if on_step is not None:
            on_step(global_step, {**values, **{f"lr/{g['name']}": g["lr"] for g in optimizer.param_groups}})
    if skipped and not steps:
        raise NonFiniteLossError(f"epoch {epoch}: all {skipped} batches were non-finite and skipped; the model has "
                                 "diverged (lower the learning rates)")
    if not parameters_finite(model):  # an optimizer step from finite gradients can still overflow
        raise NonFiniteLossError(f"epoch {epoch}: non-finite weights after step {global_step} in "
                                 f"{_names(nonfinite_parameters(model))}; the model has diverged (lower the "
                                 "learning rates); no checkpoint of it is written")
    elapsed = time.perf_counter() - t0
    out = {k: v / max(steps, 1) for k, v in sums.items()}
    out.update(steps=steps, skipped_steps=skipped, clips_per_s=clips / elapsed if elapsed > 0 else math.nan,
               seconds=elapsed, global_step=global_step, epoch=epoch, redrawn_samples=sum_over_ranks(redrawn, device))
    return out
