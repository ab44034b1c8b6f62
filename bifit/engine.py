"""Plain training loop pieces (torchvision-references style): optimizer groups, one epoch, batch inputs.

No orchestration here: `pipeline/train.py` wraps these with Ray Train and MLflow.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable

import torch
from torch import nn

from bifit.data.collate import tokenize

# (group name, substrings of parameter names, lr attribute of TrainConfig); first match wins, as in the
# official code: backbone, text encoder, text fusion, deformable linear projections, then everything else
GROUPS = (
    ("backbone", ("backbone.",), "lr_backbone"),
    ("text_encoder", ("text_encoder.",), "lr_text_encoder"),
    ("text_fusion", ("vl_interaction.vision_to_text.",), "lr_text_fusion"),
    ("linear_proj", ("reference_points", "sampling_offsets"), None),
)


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or inf; the message names the step, the term and the samples."""


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
    optimizer = torch.optim.AdamW(param_groups(model, tcfg), lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, tcfg.lr_drop, gamma=tcfg.lr_gamma)
    return optimizer, scheduler


def batch_inputs(batch, tokenizer, device) -> tuple[dict, list[dict]]:
    """VideoBatch -> (model keyword inputs, targets on the device; string ids stay on the host)."""
    input_ids, attention_mask = tokenize(tokenizer, batch.captions)
    targets = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in batch.targets]
    inputs = dict(
        images=batch.images.to(device), image_mask=batch.image_mask.to(device),
        input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
        image_sizes=torch.stack([t["size"] for t in targets]),
    )
    if "valid_indices" in targets[0]:
        inputs["valid_indices"] = torch.cat([t["valid_indices"].view(-1) for t in targets])
    return inputs, targets


def sample_ids(targets: list[dict]) -> list[str]:
    return [str(t.get("image_id") or f"{t.get('video')}/{t.get('exp_id')}") for t in targets]


def check_finite(losses: dict[str, torch.Tensor], total: torch.Tensor, step: int, targets: list[dict]) -> None:
    if torch.isfinite(total):
        return
    bad = [k for k, v in losses.items() if not torch.isfinite(v)]
    raise NonFiniteLossError(
        f"step {step}: non-finite loss (terms {bad or ['total']}) on samples {sample_ids(targets)}"
    )


def train_one_epoch(model, criterion, loader, optimizer, tokenizer, device, epoch: int, clip_max_norm: float = 0.1,
                    max_steps: int | None = None, skip_nonfinite: bool = False, amp: bool = False,
                    on_step: Callable[[int, dict], None] | None = None, global_step: int = 0) -> dict:
    """One pass over `loader`. Returns averaged loss terms, steps, skipped steps, clips/s and the last step.

    on_step(global_step, {"loss": ..., "lr/<group>": ..., terms...}) is called after every optimizer step.
    """
    model.train()
    sums, steps, skipped, clips = defaultdict(float), 0, 0, 0
    t0 = time.perf_counter()
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda")
    for batch in loader:
        if max_steps is not None and steps + skipped >= max_steps:
            break
        inputs, targets = batch_inputs(batch, tokenizer, device)
        with autocast:
            outputs = model(**inputs)
            losses = criterion(outputs, targets)
            total = criterion.weighted_total(losses)
        global_step += 1
        try:
            check_finite(losses, total, global_step, targets)
        except NonFiniteLossError:
            if not skip_nonfinite:
                raise
            skipped += 1
            optimizer.zero_grad(set_to_none=True)
            continue
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        if clip_max_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_max_norm)
        optimizer.step()
        steps += 1
        clips += inputs["images"].shape[0]
        values = {"loss": total.item(), **{k: v.item() for k, v in losses.items() if "_" not in k[5:]}}
        for k, v in values.items():
            sums[k] += v
        if on_step is not None:
            on_step(global_step, {**values, **{f"lr/{g['name']}": g["lr"] for g in optimizer.param_groups}})
    elapsed = time.perf_counter() - t0
    out = {k: v / max(steps, 1) for k, v in sums.items()}
    out.update(steps=steps, skipped_steps=skipped, clips_per_s=clips / elapsed if elapsed > 0 else math.nan,
               seconds=elapsed, global_step=global_step, epoch=epoch)
    return out
