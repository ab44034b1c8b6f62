"""One training step, measured: ours vs the reference arm (and vs a baseline revision on CPU), in one run.

    python bench/train_step.py [--setups default,paper] [--devices cpu,cuda] [--runs N] [--warmup N]
                               [--rounds N] [--threads 2] [--baseline c864ca5|none] [--out PATH]

A step is what the train stage runs per batch: `bifit.engine.train_one_epoch` itself over a short list of
prepared batches (host->device copies, forward, loss with the aux terms, backward, clip_grad_norm, fused AdamW
step, the loop's own logging sync), timed from its `on_step` callback, so the loop's overheads are measured too.

Setups
  default  the embedded default: the model/matcher/loss/data/train sections of params.yaml (read with
           bifit.config.load_config from a copy holding only those sections; no pipeline module is imported), a
           tiny random RoBERTa of the text_encoder_assets size (frozen as in params.yaml), and real batches: a
           small synthetic benchmark (bifit.synthetic, params.yaml's frame size) generated into a temporary
           folder and read with the train stage's dataset, transforms, sampler, collate and DataLoader settings,
           1 clip x data.expressions_per_clip expressions of data.num_frames frames. The loader's time per batch
           is reported separately (`data_ms`); the steps run on the prefetched batches.
  paper    the paper architecture (params.yaml + params_paper.yaml): ResNet-50, 4/4 layers, hidden 256, 5 queries,
           a roberta-base-sized random text encoder (frozen), batch 1 clip x 1 expression of 6 frames, synthetic
           clips resized to a paper crop size: 320x320 on CPU (feasible on 2 cores), 360x640 on CUDA.

Arms (same batches, same order, blocks interleaved because a shared machine's speed drifts)
  ours       the library as it is in this checkout;
  reference  the same model inside bench/reference_arm.reference_formulations() (the official formulations);
  baseline   (default setup, CPU) the library of revision --baseline (default c864ca5, the code before the speed
             work), exported with `git archive` into a temporary folder and run in a subprocess whose sys.path has
             that tree first, driven block by block so that ours/baseline/reference alternate. Skipped (with the
             reason recorded) when git or the revision is not available, e.g. in an unpacked tarball.

Reported per setup and device: wall ms per step (median of the timed steps, every step listed), the data time
(default), aten ops per step (CPU, torch.profiler, one profiled block after the warm-up) or CUDA kernels per step
and device-busy ms per step (CUDA: union of the profiler's device-event intervals) and the busy fraction (busy ms /
unprofiled median wall ms), the speed-ups reference/ours and baseline/ours, and the goals of the issue (labelled as
goals; every other figure is measured). Before timing, both arms' losses on the same batch are computed in eval mode
(dropout off, strict float32: no TF32, no autocast) and must agree to the printed tolerance, else the run fails.
Results: bench/results/train_step.json.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_BASELINE = "c864ca5"
PROTOCOL = "@@bench "  # worker -> parent reply lines

# The issue's goals. These are the only figures written as constants; everything else is measured.
GOALS = [
    dict(setup="default", device="cuda", metric="ms_per_step", op="<=", value=25.0,
         label="embedded default on an H200: <= 25 ms/step"),
    dict(setup="default", device="cuda", metric="busy_fraction", op=">=", value=0.60,
         label="embedded default on an H200: device busy >= 60%"),
    dict(setup="paper", device="cuda", metric="busy_fraction", op=">=", value=0.85,
         label="paper architecture on an H200: device busy >= 85%"),
    dict(setup="paper", device="cuda", metric="speedup_vs_reference", op=">=", value=1.3,
         label="paper architecture on an H200: >= 1.3x faster than the reference arm"),
    dict(setup="default", device="cpu", metric="speedup_vs_baseline", op=">=", value=1.3,
         label="embedded default on CPU: >= 1.3x faster than the baseline"),
]

# per (setup, device): timed steps per arm, warm-up steps, interleaved rounds, profiled steps
PLAN = {
    ("default", "cpu"): dict(runs=24, warmup=3, rounds=6, profile=2),
    ("default", "cuda"): dict(runs=40, warmup=5, rounds=4, profile=5),
    ("paper", "cpu"): dict(runs=3, warmup=1, rounds=3, profile=1),
    ("paper", "cuda"): dict(runs=20, warmup=5, rounds=2, profile=3),
}
PAPER_SIZE = {"cpu": (320, 320), "cuda": (360, 640)}
PAPER_MODEL = {"model.backbone": "resnet50", "model.num_queries": 5, "model.enc_layers": 4, "model.dec_layers": 4,
               "model.hidden_dim": 256, "model.freeze_text_encoder": True,
               "data.num_frames": 6, "data.expressions_per_clip": 1, "train.batch_size": 1}
ROBERTA_BASE = dict(vocab_size=50265, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                    intermediate_size=3072, max_position_embeddings=514, type_vocab_size=1, pad_token_id=1,
                    bos_token_id=0, eos_token_id=2, model_type="roberta")
SYNTHETIC_VIDEOS = dict(num_train_videos=8, num_valid_videos=1, num_test_videos=0)
NUM_BATCHES = {"default": 16, "paper": 4}  # distinct prepared batches, cycled
# eval-mode agreement of ours and the reference (strict float32): relative, on the total and on every loss term
LOSS_RTOL = {"cpu": 1e-4, "cuda": 1e-3}
LOSS_ATOL = 1e-6


# ---------------------------------------------------------------------------------------------------------------
# helpers shared by the parent and the baseline worker (they import the library lazily, from whichever tree
# sys.path puts first)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def strict_fp32():
    """No TF32 in matmuls/convolutions while the arms' outputs are compared."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def config_from_sections(sections: dict):
    """A bifit Config from plain section dicts; keys this tree's Config does not know are dropped and returned
    (the baseline tree predates keys added since)."""
    from bifit.config import Config, from_dict

    hints = {f.name: f.type for f in dataclasses.fields(Config)}
    dropped, kept = [], {}
    for name, values in sections.items():
        if name not in hints:
            dropped.append(name)
            continue
        cls = type(getattr(Config(), name))
        known = {f.name for f in dataclasses.fields(cls)}
        kept[name] = {k: v for k, v in values.items() if k in known}
        dropped += [f"{name}.{k}" for k in values if k not in known]
    model_keys = {f.name for f in dataclasses.fields(type(Config().model))}
    if "mask_dim" in model_keys and "model" in kept:  # older trees had to be told mask_dim == hidden_dim
        kept["model"]["mask_dim"] = kept["model"].get("hidden_dim", Config().model.hidden_dim)
    return from_dict(Config, kept).validate(), dropped


def pin(batch):
    """The batch with pinned host tensors (what the train stage's loader gives on a GPU)."""
    def p(x):
        if torch.is_tensor(x):
            return x.pin_memory()
        if isinstance(x, dict):
            return {k: p(v) for k, v in x.items()}
        if isinstance(x, list):
            return [p(v) for v in x]
        return x
    return type(batch)(*[p(x) for x in batch])


def union_us(intervals) -> float:
    total, end = 0.0, None
    for s, e in sorted(intervals):
        if end is None or s > end:
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total


def summarize_profile(prof, steps: int, device: torch.device) -> dict:
    from torch.autograd import DeviceType

    events = list(prof.events())
    cpu = [e for e in events if e.device_type == DeviceType.CPU]
    aten = [e for e in cpu if e.name.startswith("aten::")]
    top = [e for e in aten if not (getattr(e, "cpu_parent", None) is not None
                                   and e.cpu_parent.name.startswith("aten::"))]
    out = {"profiled_steps": steps, "aten_ops_per_step": len(aten) / steps,
           "aten_top_level_ops_per_step": len(top) / steps}
    if device.type == "cuda":
        cpu_names = {e.name for e in cpu}

        def kind(e):
            activity = str(getattr(e, "activity_type", "") or "").lower()
            # record_function ranges (e.g. torch.optim's "Optimizer.step#AdamW.step") are mirrored on the GPU
            # timeline as user annotations under the CPU range's name; sync waits are not work either
            if "annotation" in activity or "sync" in activity or e.name in cpu_names:
                return "other"
            if "memcpy" in activity or e.name.startswith("Memcpy"):
                return "memcpy"
            if "memset" in activity or e.name.startswith("Memset"):
                return "memset"
            return "kernel"

        all_dev = [e for e in events if e.device_type == DeviceType.CUDA]
        dev = [e for e in all_dev if kind(e) != "other"]
        kinds = [kind(e) for e in dev]
        busy_us = union_us([(e.time_range.start, e.time_range.end) for e in dev])
        kernel_us = sum(e.time_range.end - e.time_range.start for e, k in zip(dev, kinds) if k == "kernel")
        out.update(
            kernels_per_step=kinds.count("kernel") / steps, memcpy_per_step=kinds.count("memcpy") / steps,
            memset_per_step=kinds.count("memset") / steps, busy_ms_per_step=busy_us / 1e3 / steps,
            kernel_ms_per_step=kernel_us / 1e3 / steps,
            launch_api_calls_per_step=sum("LaunchKernel" in e.name for e in cpu) / steps,
            device_events_seen=len(all_dev), device_events_not_work=len(all_dev) - len(dev),
        )
    return out


class Trainer:
    """Model, criterion, optimizer and tokenizer built with the library's own pieces, as the train stage does."""

    def __init__(self, cfg, device, tokenizer_dir, text_encoder_config=None, state_dict_path=None, seed=None):
        from transformers import AutoTokenizer

        from bifit.engine import build_optimizer
        from bifit.models import build_model
        from bifit.models.criterion import build_criterion

        self.cfg, self.device = cfg, device
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        torch.manual_seed(cfg.train.seed if seed is None else seed)
        text_encoder = None
        if text_encoder_config is not None:
            from bifit.models.text_encoder import build_hf_text_encoder

            text_encoder = build_hf_text_encoder(config=text_encoder_config)
        self.model = build_model(cfg.model, text_encoder)
        self.state_dict_loaded = None
        if state_dict_path is not None:
            try:
                self.model.load_state_dict(torch.load(state_dict_path, map_location="cpu", weights_only=True))
                self.state_dict_loaded = True
            except RuntimeError as err:  # the architecture's parameters changed since: own (seeded) weights
                self.state_dict_loaded = f"not loaded: {str(err).splitlines()[0]}"
        self.model.to(device)
        self.criterion = build_criterion(cfg)
        self.optimizer, _ = build_optimizer(self.model, cfg.train)
        self.trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        self.parameters = sum(p.numel() for p in self.model.parameters())

    def eval_loss(self, batch, reference: bool = False) -> dict:
        """Loss terms in eval mode (dropout off), strict float32, no grad; model outputs kept for comparison."""
        from bifit.engine import batch_inputs

        self.model.eval()
        ctx = _reference_ctx() if reference else contextlib.nullcontext()
        try:
            with strict_fp32(), torch.no_grad(), ctx:
                inputs, targets = batch_inputs(batch, self.tokenizer, self.device)
                out = self.model(**inputs)
                losses = self.criterion(out, targets)
                total = self.criterion.weighted_total(losses)
        finally:
            self.model.train()
        return {"total": float(total), "terms": {k: float(v) for k, v in losses.items()},
                "outputs": {k: out[k].detach().float().cpu() for k in ("pred_logits", "pred_boxes", "pred_masks")
                            if k in out}}

    def block(self, batches, reference: bool = False, profile: bool = False) -> dict:
        """train_one_epoch over `batches`; per-step wall times from its on_step callback."""
        from bifit.engine import train_one_epoch

        stamps = []

        def on_step(step, values):
            stamps.append(time.perf_counter())

        prof = contextlib.nullcontext()
        if profile:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            prof = torch.profiler.profile(activities=activities)
        ctx = _reference_ctx() if reference else contextlib.nullcontext()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        with ctx as counts, prof as p:
            sync(self.device)
            c0, t0 = time.process_time(), time.perf_counter()
            train_one_epoch(model=self.model, criterion=self.criterion, loader=batches, optimizer=self.optimizer,
                            tokenizer=self.tokenizer, device=self.device, epoch=0,
                            clip_max_norm=self.cfg.train.clip_max_norm, amp=self.cfg.train.amp, on_step=on_step)
            sync(self.device)
            t1, c1 = time.perf_counter(), time.process_time()
        if len(stamps) != len(batches):
            raise RuntimeError(f"train_one_epoch reported {len(stamps)} optimizer steps for {len(batches)} batches "
                               "(skipped or non-finite batches?)")
        ms = [(b - a) * 1e3 for a, b in zip([t0] + stamps[:-1], stamps)]
        out = {"ms": ms, "block_ms_per_step": (t1 - t0) * 1e3 / len(batches),
               "process_cpu_ms_per_step": (c1 - c0) * 1e3 / len(batches)}
        if self.device.type == "cuda":
            out["peak_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        if counts is not None:
            out["reference_calls_per_step"] = {k: v / len(batches) for k, v in sorted(counts.items())}
        if profile:
            out["profile"] = summarize_profile(p, len(batches), self.device)
        return out


def _reference_ctx():
    from bench.reference_arm import reference_formulations

    return reference_formulations()


def source_digest(tree: Path) -> str:
    """sha256 over the library sources of a tree (bifit/, ops/): names the code measured, committed or not."""
    h = hashlib.sha256()
    for sub in ("bifit", "ops"):
        for path in sorted((tree / sub).rglob("*")):
            if path.is_file() and path.suffix in (".py", ".cpp", ".cu", ".h"):
                h.update(str(path.relative_to(tree)).encode())
                h.update(path.read_bytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------------
# baseline worker (subprocess): the same Trainer on another tree's library, driven over stdin/stdout


def worker_main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    proto = os.fdopen(os.dup(1), "w", buffering=1)  # replies only; library prints go to stderr
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def reply(obj):
        proto.write(PROTOCOL + json.dumps(obj) + "\n")
        proto.flush()

    try:
        tree = Path(spec["tree"]).resolve()
        script_dir = str(Path(__file__).resolve().parent)
        sys.path[:] = [str(tree)] + [p for p in sys.path if p not in (script_dir, "", str(REPO))]
        torch.set_num_threads(spec["threads"])
        import bifit
        import ops

        for mod in (bifit, ops):
            if not Path(mod.__file__).resolve().is_relative_to(tree):
                raise RuntimeError(f"baseline worker imported {mod.__name__} from {mod.__file__}, not from {tree}")
        from bifit.data.collate import VideoBatch

        cfg, dropped = config_from_sections(spec["config"])
        batches = [VideoBatch(*b) for b in torch.load(spec["batches"], weights_only=True)]
        trainer = Trainer(cfg, torch.device("cpu"), spec["tokenizer_dir"], state_dict_path=spec["state_dict"])
        ev = trainer.eval_loss(batches[0])
        reply({"ready": True, "eval_total": ev["total"], "eval_terms": ev["terms"], "dropped_config_keys": dropped,
               "state_dict_loaded": trainer.state_dict_loaded, "bifit": str(Path(bifit.__file__).parent),
               "trainable_parameters": trainer.trainable})
        for line in sys.stdin:
            cmd = json.loads(line)
            if cmd["cmd"] == "quit":
                break
            try:
                reply(trainer.block([batches[i] for i in cmd["indices"]], profile=cmd.get("profile", False)))
            except Exception:  # noqa: BLE001 - reported to the parent, which stops the run
                reply({"error": traceback.format_exc()})
    except Exception:  # noqa: BLE001
        reply({"error": traceback.format_exc()})


class BaselineWorker:
    def __init__(self, spec: dict, folder: Path):
        spec_path = folder / "worker_spec.json"
        spec_path.write_text(json.dumps(spec))
        self.log_path = folder / "worker_stderr.log"
        self.log = self.log_path.open("w")
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--_worker", str(spec_path)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     cwd=str(folder))
        self.ready = None

    def _read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(PROTOCOL):
                msg = json.loads(line[len(PROTOCOL):])
                if "error" in msg:
                    raise RuntimeError(f"baseline worker failed:\n{msg['error']}")
                return msg
        self.log.flush()
        tail = self.log_path.read_text()[-4000:]
        raise RuntimeError(f"baseline worker exited (rc {self.proc.wait()}) without a reply; stderr tail:\n{tail}")

    def wait_ready(self) -> dict:
        if self.ready is None:
            self.ready = self._read()
        return self.ready

    def block(self, indices, profile=False) -> dict:
        self.proc.stdin.write(json.dumps({"cmd": "block", "indices": list(indices), "profile": profile}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def git(*args) -> str:
    return subprocess.run(["git", "-C", str(REPO), *args], check=True, capture_output=True, text=True).stdout.rstrip()


def export_revision(rev: str, folder: Path) -> tuple[Path | None, str | None, str]:
    """(tree, full sha, why-not): the library of `rev` (bifit/, ops/) unpacked into folder/baseline."""
    try:
        sha = git("rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
    except (OSError, subprocess.CalledProcessError) as err:
        return None, None, f"git or revision {rev!r} unavailable ({type(err).__name__})"
    tree = folder / "baseline"
    tree.mkdir()
    for paths in (["bifit", "ops"], []):  # the library only; the whole tree if the revision lacks one of them
        proc = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", sha, *paths], capture_output=True)
        if proc.returncode == 0:
            with tarfile.open(fileobj=io.BytesIO(proc.stdout)) as tar:
                tar.extractall(tree, filter="data")
            return tree, sha, ""
    return None, sha, f"git archive {sha} failed: {proc.stderr.decode(errors='replace').strip()}"


# ---------------------------------------------------------------------------------------------------------------
# parent: configuration, data, arms


def load_params(folder: Path, overlays=(), overrides=None):
    """params.yaml (+ overlays) read with bifit.config.load_config, through a copy of the files that keeps only the
    sections bifit.config.Config knows (the pipeline's own sections would need pipeline.config). Returns
    (Config, the raw params.yaml mapping)."""
    import yaml

    from bifit.config import Config, load_config

    keep = {f.name for f in dataclasses.fields(Config)}
    src = REPO / "params.yaml"
    raw = yaml.safe_load(src.read_text()) or {}
    names = raw.get("overlay") or []
    names = ([names] if isinstance(names, str) else list(names)) + list(overlays)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for i, name in enumerate(names):
        path = Path(name) if Path(name).is_absolute() else src.parent / name
        extra = yaml.safe_load(path.read_text()) or {}
        dst = folder / f"overlay{i}_{path.name}"
        dst.write_text(yaml.safe_dump({k: v for k, v in extra.items() if k in keep}))
        written.append(dst.name)
    base = {k: v for k, v in raw.items() if k in keep}
    base["overlay"] = written or None
    (folder / "params.yaml").write_text(yaml.safe_dump(base))
    return load_config(folder / "params.yaml", overrides=overrides, cls=Config), raw


def make_assets(folder: Path, raw: dict) -> tuple[Path, Path, dict]:
    """A small synthetic benchmark (params.yaml's generator settings, fewer videos) and a random tiny RoBERTa of the
    text_encoder_assets size with its tokenizer (no pretraining: timing only)."""
    from bifit.config import from_dict
    from bifit.synthetic.config import SyntheticConfig
    from bifit.synthetic.text_encoder import (
        TinyTextEncoderConfig,
        expression_corpus,
        write_text_encoder_assets,
    )
    from bifit.synthetic.ytvos import generate_benchmark

    syn = {**(raw.get("synthetic") or {}), **SYNTHETIC_VIDEOS}
    root = folder / "ref-youtube-vos"
    summary = generate_benchmark(from_dict(SyntheticConfig, syn, "synthetic"), root, progress=False)
    te = {**(raw.get("text_encoder_assets") or {}), "pretrain_steps": 0}
    te_dir = write_text_encoder_assets(folder / "text-encoder", expression_corpus(root), TinyTextEncoderConfig(**te))
    info = {"synthetic": {k: syn[k] for k in ("height", "width", "frames_per_video", *SYNTHETIC_VIDEOS) if k in syn},
            "train_expressions": summary.get("train_expressions"),
            "text_encoder": {k: te[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                 "intermediate_size") if k in te}}
    return root, Path(te_dir), info


def default_batches(cfg, root: Path, n: int, pin_memory: bool):
    """n batches from the train stage's dataset/transforms/sampler/collate/DataLoader; ms per batch."""
    from torch.utils.data import DataLoader, DistributedSampler

    from bifit.data import ResizeConfig, YTVOSDataset, collate_fn, make_train_transforms
    from bifit.engine import seed_epoch
    from bifit.synthetic import SYNTHETIC_CATEGORIES

    d = cfg.data
    resize = ResizeConfig.from_data_config(d)
    dataset = YTVOSDataset(root, "train", d.num_frames,
                           transforms=make_train_transforms(resize, photometric=d.photometric),
                           categories=SYNTHETIC_CATEGORIES if d.categories == "synthetic" else None,
                           skip_bad_samples=d.skip_bad_samples, expressions_per_clip=d.expressions_per_clip)
    workers = dict(num_workers=d.num_workers, persistent_workers=d.num_workers > 0, pin_memory=pin_memory)
    if d.batch_grouping == "video":
        from bifit.data.samplers import VideoGroupedBatchSampler

        sampler = VideoGroupedBatchSampler(dataset.samples, cfg.train.batch_size, 1, 0, cfg.train.seed)
        loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_fn, **workers)
    else:
        sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=cfg.train.seed,
                                     drop_last=True)
        loader = DataLoader(dataset, batch_size=cfg.train.batch_size, sampler=sampler, collate_fn=collate_fn,
                            drop_last=True, **workers)
    batches, times, epoch = [], [], 0
    sampler.set_epoch(epoch)
    seed_epoch(cfg.train.seed, 0, epoch)
    it = iter(loader)
    while len(batches) < n:
        t0 = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            epoch += 1
            sampler.set_epoch(epoch)
            it = iter(loader)
            continue
        times.append((time.perf_counter() - t0) * 1e3)
        batches.append(batch)
    del it, loader
    return batches, {"ms_median": statistics.median(times), "ms_runs": times, "batches": n,
                     "loader": {"num_workers": d.num_workers, "pin_memory": pin_memory,
                                "batch_grouping": d.batch_grouping}}


def paper_batches(root: Path, size: tuple[int, int], n: int, frames: int):
    """n batches of 1 clip x 1 expression: synthetic clips (normalised, no augmentation) resized to `size`."""
    import random

    import torch.nn.functional as F

    from bifit.data import YTVOSDataset, collate_fn
    from bifit.synthetic import SYNTHETIC_CATEGORIES

    random.seed(0)
    dataset = YTVOSDataset(root, "train", frames, categories=SYNTHETIC_CATEGORIES)
    step = max(1, len(dataset) // n)
    batches = []
    for i in range(n):
        imgs, target = dataset[(i * step) % len(dataset)]
        imgs = F.interpolate(imgs, size=size, mode="bilinear", align_corners=False)
        target = dict(target)  # boxes are normalised cxcywh: unchanged by resizing the whole frame
        target["masks"] = F.interpolate(target["masks"][:, None].float(), size=size, mode="nearest")[:, 0] > 0.5
        target["size"] = torch.tensor(size, dtype=target["size"].dtype)
        batches.append(collate_fn([(imgs, target)]))
    return batches


def batch_shape(batch) -> dict:
    return {"clips": int(batch.images.shape[0]), "expressions": len(batch.captions),
            "frames": int(batch.images.shape[1]), "hw": list(batch.images.shape[-2:])}


def arm_summary(blocks: list[dict], warm: dict | None, prof: dict | None) -> dict:
    ms = [m for b in blocks for m in b["ms"]]
    out = {"ms_per_step": statistics.median(ms), "ms_min": min(ms), "ms_runs": ms,
           "block_medians_ms": [statistics.median(b["ms"]) for b in blocks],
           "block_ms_per_step": [b["block_ms_per_step"] for b in blocks],
           "process_cpu_ms_per_step": statistics.median(b["process_cpu_ms_per_step"] for b in blocks),
           "process_cpu_ms_per_step_blocks": [b["process_cpu_ms_per_step"] for b in blocks]}
    if warm is not None:
        out["warmup_ms"] = warm["ms"]
    if prof is not None:
        out["profile"] = dict(prof["profile"], profiled_ms_per_step=statistics.median(prof["ms"]))
        if "busy_ms_per_step" in prof["profile"]:
            out["busy_ms_per_step"] = prof["profile"]["busy_ms_per_step"]
            out["busy_fraction"] = prof["profile"]["busy_ms_per_step"] / out["ms_per_step"]
            out["busy_fraction_profiled"] = prof["profile"]["busy_ms_per_step"] / statistics.median(prof["ms"])
        for k in ("reference_calls_per_step",):
            if k in prof:
                out[k] = prof[k]
    peaks = [b["peak_memory_gib"] for b in blocks if "peak_memory_gib" in b]
    if peaks:
        out["peak_memory_gib"] = max(peaks)
    return out


def check_agreement(ours: dict, ref: dict, device: str) -> dict:
    rtol = LOSS_RTOL[device]

    def rel(a, b):
        return abs(a - b) / max(abs(a), abs(b), LOSS_ATOL)

    terms = {k: rel(ours["terms"][k], ref["terms"][k]) for k in ours["terms"]}
    out_diff = {k: float((ours["outputs"][k] - ref["outputs"][k]).abs().max()) for k in ours["outputs"]}
    res = {"ours_loss": ours["total"], "reference_loss": ref["total"], "abs_diff": abs(ours["total"] - ref["total"]),
           "rel_diff": rel(ours["total"], ref["total"]), "max_term_rel_diff": max(terms.values()),
           "worst_term": max(terms, key=terms.get), "rtol": rtol, "outputs_max_abs_diff": out_diff}
    res["ok"] = res["rel_diff"] <= rtol and res["max_term_rel_diff"] <= rtol
    return res


def measure(setup: str, device: torch.device, args, folder: Path, assets, baseline) -> dict:
    root, te_dir, _ = assets
    dev = device.type
    plan = dict(PLAN[(setup, dev)])
    for k in ("runs", "warmup", "rounds"):
        if getattr(args, k) is not None:
            plan[k] = getattr(args, k)
    plan["rounds"] = max(1, min(plan["rounds"], plan["runs"]))
    plan["profile"] = max(1, min(plan["profile"], plan["runs"]))
    if setup == "default":
        cfg, _ = load_params(folder / f"params_{setup}_{dev}", overrides={"model.text_encoder": str(te_dir)})
        batches, data = default_batches(cfg, root, NUM_BATCHES[setup], pin_memory=dev == "cuda")
        text_encoder_config = None
    else:
        cfg, _ = load_params(folder / f"params_{setup}_{dev}", overlays=["params_paper.yaml"],
                             overrides={**PAPER_MODEL, "model.text_encoder": "roberta-base-sized (random)"})
        batches = paper_batches(root, PAPER_SIZE[dev], NUM_BATCHES[setup], cfg.data.num_frames)
        if dev == "cuda":
            batches = [pin(b) for b in batches]
        data = {"note": "synthetic clips resized to the paper crop size before timing; no loader time measured"}
        text_encoder_config = ROBERTA_BASE
    print(f"\n== {setup} on {dev}: {batch_shape(batches[0])}; plan {plan}", flush=True)

    # baseline worker (default setup, CPU): it builds its model while we check the arms' agreement
    worker, with_baseline = None, baseline is not None and setup == "default" and dev == "cpu"
    trainer = Trainer(cfg, device, te_dir, text_encoder_config=text_encoder_config)
    if with_baseline:
        tree, _ = baseline
        state_path, batches_path = folder / "initial_state.pt", folder / "batches.pt"
        torch.save([tuple(b) for b in batches], batches_path)
        torch.save(trainer.model.state_dict(), state_path)
        worker = BaselineWorker({"tree": str(tree), "threads": args.threads, "tokenizer_dir": str(te_dir),
                                 "config": dataclasses.asdict(cfg), "batches": str(batches_path),
                                 "state_dict": str(state_path)}, folder)

    result = {"setup": setup, "device": dev, "batch": batch_shape(batches[0]),
              "batch_hw_seen": sorted({tuple(batch_shape(b)["hw"]) for b in batches}), "data": data, "plan": plan,
              "model": {"backbone": cfg.model.backbone, "hidden_dim": cfg.model.hidden_dim,
                        "enc_layers": cfg.model.enc_layers, "dec_layers": cfg.model.dec_layers,
                        "num_queries": cfg.model.num_queries, "num_frames": cfg.data.num_frames,
                        "backbone_norm": cfg.model.backbone_norm, "dropout": cfg.model.dropout,
                        "text_encoder": "random RoBERTa " + ("roberta-base size" if text_encoder_config else
                                                             "of the text_encoder_assets size"),
                        "freeze_text_encoder": cfg.model.freeze_text_encoder, "amp": cfg.train.amp and dev == "cuda",
                        "parameters": trainer.parameters, "trainable_parameters": trainer.trainable}}

    try:
        # 1. the arms agree (eval mode, strict float32) -- before any optimizer step changes the weights
        ours_eval = trainer.eval_loss(batches[0])
        ref_eval = trainer.eval_loss(batches[0], reference=True)
        check = check_agreement(ours_eval, ref_eval, dev)
        result["agreement"] = check
        print(f"eval loss ours {check['ours_loss']:.6f} reference {check['reference_loss']:.6f}: rel diff "
              f"{check['rel_diff']:.2e}, worst term {check['worst_term']} {check['max_term_rel_diff']:.2e} "
              f"(tolerance rel {check['rtol']:.0e}); outputs max |diff| "
              + ", ".join(f"{k} {v:.1e}" for k, v in check["outputs_max_abs_diff"].items()), flush=True)
        if not check["ok"]:
            raise SystemExit(f"FAIL: {setup}/{dev}: ours and the reference arm disagree in eval mode: {check}")
        if worker is not None:
            ready = worker.wait_ready()
            result["baseline_eval"] = {
                "loss": ready["eval_total"], "rel_diff_vs_ours": abs(ready["eval_total"] - ours_eval["total"])
                / max(abs(ours_eval["total"]), LOSS_ATOL), "state_dict_loaded": ready["state_dict_loaded"],
                "dropped_config_keys": ready["dropped_config_keys"], "library": ready["bifit"]}
            be = result["baseline_eval"]
            flag = "" if be["rel_diff_vs_ours"] <= check["rtol"] or be["state_dict_loaded"] is not True else \
                "  WARNING: the baseline computes a different loss from the same weights"
            print(f"baseline eval loss {be['loss']:.6f} (rel diff vs ours {be['rel_diff_vs_ours']:.2e}; weights "
                  f"{'shared' if be['state_dict_loaded'] is True else be['state_dict_loaded']}; config keys "
                  f"unknown to it: {be['dropped_config_keys'] or 'none'}){flag}", flush=True)

        # 2. warm-up then one profiled block per arm (it doubles as extra warm-up)
        nb = len(batches)
        idx = lambda start, n: [(start + i) % nb for i in range(n)]  # noqa: E731
        arms = {"ours": lambda ix, profile=False: trainer.block([batches[i] for i in ix], profile=profile),
                "reference": lambda ix, profile=False: trainer.block([batches[i] for i in ix], reference=True,
                                                                      profile=profile)}
        if worker is not None:
            arms["baseline"] = lambda ix, profile=False: worker.block(ix, profile=profile)
        warm, prof, blocks = {}, {}, {a: [] for a in arms}
        for name, run in arms.items():
            t0 = time.perf_counter()
            warm[name] = run(idx(0, plan["warmup"])) if plan["warmup"] else None
            prof[name] = run(idx(plan["warmup"], plan["profile"]), profile=True)
            print(f"{name}: warm-up {[round(m) for m in warm[name]['ms']] if warm[name] else []} ms, profiled "
                  f"{[round(m) for m in prof[name]['ms']]} ms ({time.perf_counter() - t0:.1f} s)", flush=True)

        # 3. timed blocks, interleaved: the arms' order alternates from round to round
        per = [plan["runs"] // plan["rounds"] + (r < plan["runs"] % plan["rounds"]) for r in range(plan["rounds"])]
        start, loads = plan["warmup"] + plan["profile"], []
        for r, n in enumerate(per):
            order = list(arms) if r % 2 == 0 else list(reversed(arms))
            for name in order:
                blocks[name].append(arms[name](idx(start, n)))
            start += n
            loads.append(os.getloadavg()[0])
            print(f"round {r + 1}/{len(per)}: " + ", ".join(
                f"{a} {statistics.median(blocks[a][-1]['ms']):.1f}" for a in arms) + " ms/step (median)", flush=True)
    finally:
        if worker is not None:
            worker.close()

    result["arms"] = {a: arm_summary(blocks[a], warm[a], prof[a]) for a in arms}
    result["loadavg_per_round"] = loads
    ours = result["arms"]["ours"]
    for other in ("reference", "baseline"):
        if other not in result["arms"]:
            continue
        a = result["arms"][other]
        result[f"speedup_vs_{other}"] = a["ms_per_step"] / ours["ms_per_step"]
        # drift-robust companion: the median over rounds of the ratio of the two arms' block medians in that round
        # (adjacent blocks); and the ratio of process CPU time per step (threads' busy time, spin-waits included:
        # not a speed, a cost)
        result[f"speedup_vs_{other}_paired"] = statistics.median(
            b / o for b, o in zip(a["block_medians_ms"], ours["block_medians_ms"]))
        result[f"cpu_time_ratio_{other}_over_ours"] = a["process_cpu_ms_per_step"] / ours["process_cpu_ms_per_step"]
    if "baseline" in result["arms"]:
        result["baseline_revision"] = baseline[1]
    calls = result["arms"]["reference"].get("reference_calls_per_step", {})
    missing = [k for k in ("dynamic_mask", "mha") if not calls.get(k)]
    if not any(k.startswith("msda") for k in calls):
        missing.append("msda")
    if cfg.model.backbone_norm == "frozen_batch_norm" and not calls.get("conv_bn"):
        missing.append("conv_bn")
    if missing:
        raise SystemExit(f"FAIL: {setup}/{dev}: the reference arm never called its {missing} formulation(s) "
                         f"(calls per step {calls}): the swap in bench/reference_arm.py no longer reaches the model")
    if calls.get("msda_cuda_pytorch_fallback"):
        result["reference_note"] = ("the CUDA deformable-attention kernels did not build: the reference arm ran the "
                                    "pure-PyTorch core on CUDA (slower than the official CUDA kernel)")
    return result


def evaluate_goals(results: list[dict], device_names: dict) -> list[dict]:
    out = []
    for goal in GOALS:
        for r in results:
            if (r["setup"], r["device"]) != (goal["setup"], goal["device"]):
                continue
            ours = r["arms"]["ours"]
            value = {"ms_per_step": ours["ms_per_step"], "busy_fraction": ours.get("busy_fraction"),
                     "speedup_vs_reference": r.get("speedup_vs_reference"),
                     "speedup_vs_baseline": r.get("speedup_vs_baseline")}[goal["metric"]]
            met = None if value is None else (value <= goal["value"] if goal["op"] == "<=" else value >= goal["value"])
            entry = dict(goal, measured=value, met=met, measured_on=device_names[r["device"]])
            if goal["device"] == "cuda" and "H200" not in device_names[r["device"]]:
                entry["note"] = "the goal is for an H200; measured on another device"
            out.append(entry)
            r.setdefault("goals", []).append(entry)
    return out


def print_table(results: list[dict]) -> None:
    def f(v, spec):
        return "-" if v is None else format(v, spec)

    head = (f"{'setup':<8}{'device':<7}{'ours ms':>10}{'ref ms':>10}{'ref/ours':>9}{'base ms':>10}{'base/ours':>10}"
            f"{'busy %':>8}{'ops|kernels /step ours/ref/base':>34}  goals")
    print("\n" + head + "\n" + "-" * len(head))
    for r in results:
        a = r["arms"]
        base = a.get("baseline")
        key = "kernels_per_step" if r["device"] == "cuda" else "aten_ops_per_step"
        counts = "/".join(f(a[n]["profile"].get(key), ".0f") if n in a else "-" for n in ("ours", "reference",
                                                                                          "baseline"))
        busy = a["ours"].get("busy_fraction")
        verdict = {True: "MET", False: "not met", None: "?"}
        goals = "; ".join(f"{g['label'].split(': ', 1)[1]} {verdict[g['met']]}" for g in r.get("goals", []))
        print(f"{r['setup']:<8}{r['device']:<7}{a['ours']['ms_per_step']:>10.1f}{a['reference']['ms_per_step']:>10.1f}"
              f"{r['speedup_vs_reference']:>8.2f}x{f(base and base['ms_per_step'], '.1f'):>10}"
              f"{f(r.get('speedup_vs_baseline'), '.2f') + ('x' if base else ''):>10}"
              f"{f(busy and 100 * busy, '.1f'):>8}{counts:>34}  {goals}")
    for r in results:
        extra = [f"{k.replace('speedup_vs_', '')} {r[k]:.2f}x" for k in (
            "speedup_vs_reference_paired", "speedup_vs_baseline_paired") if k in r]
        cpu = "/".join(f"{r['arms'][n]['process_cpu_ms_per_step']:.0f}" for n in ("ours", "reference", "baseline")
                       if n in r["arms"])
        print(f"{r['setup']}/{r['device']}: paired speed-ups {', '.join(extra)}; process CPU ms/step {cpu}; min ms "
              + "/".join(f"{r['arms'][n]['ms_min']:.1f}" for n in ("ours", "reference", "baseline") if n in r["arms"])
              + f" (ours/ref/base); load avg per round {[round(x, 1) for x in r['loadavg_per_round']]}")
        if "data" in r and "ms_median" in r["data"]:
            print(f"data ({r['setup']}, {r['device']}): {r['data']['ms_median']:.1f} ms per batch from the train "
                  f"stage's loader (median of {r['data']['batches']}), not included in the step times")
    print("goals (from the issue): " + "; ".join(g["label"] for g in GOALS))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=None, help="timed steps per arm (default: per setup/device, "
                        + ", ".join(f"{s}/{d} {p['runs']}" for (s, d), p in PLAN.items()) + ")")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps per arm (default: per setup/device)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="interleaved blocks per arm the timed steps are split into (default: per setup/device)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--setups", default="default,paper")
    parser.add_argument("--devices", default="cpu,cuda", help="cuda is skipped (and said so) when no GPU is visible")
    parser.add_argument("--baseline", default=DEFAULT_BASELINE,
                        help="git revision whose library is the CPU baseline of the default setup ('none': skip)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "train_step.json")
    parser.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._worker:
        worker_main(args._worker)
        return

    sys.path.insert(0, str(REPO))
    t_start, load_start = time.perf_counter(), os.getloadavg()
    digest_start = source_digest(REPO)
    torch.set_num_threads(args.threads)
    setups = [s.strip() for s in args.setups.split(",") if s.strip()]
    devices = [d.strip() for d in args.devices.split(",") if d.strip()]
    for s in setups:
        if s not in ("default", "paper"):
            parser.error(f"--setups: unknown setup {s!r} (default, paper)")
    skipped = {}
    if "cuda" in devices and not torch.cuda.is_available():
        devices.remove("cuda")
        skipped["cuda"] = "no GPU visible to torch"
        print("cuda: skipped (no GPU visible to torch)")
    device_names = {"cpu": platform.processor() or platform.machine()}
    if "cuda" in devices:
        device_names["cuda"] = torch.cuda.get_device_name(0)

    try:
        revision = git("rev-parse", "HEAD")
        dirty = git("--no-optional-locks", "status", "--porcelain", "--", "bifit", "ops", "bench", "params.yaml",
                    "params_paper.yaml")
    except (OSError, subprocess.CalledProcessError):
        revision, dirty = None, None
    with tempfile.TemporaryDirectory(prefix="bifit-train-step-") as tmp:
        folder = Path(tmp)
        baseline, baseline_note = None, None
        if args.baseline.lower() != "none" and "cpu" in devices and "default" in setups:
            tree, sha, why = export_revision(args.baseline, folder)
            if tree is None:
                baseline_note = f"baseline skipped: {why}"
                print(baseline_note)
            else:
                baseline = (tree, sha)
        _, raw = load_params(folder / "params_raw")
        assets = make_assets(folder, raw)
        results = []
        for setup in setups:
            for dev in devices:
                results.append(measure(setup, torch.device(dev), args, folder, assets, baseline))
    goals = evaluate_goals(results, device_names)
    print_table(results)
    elapsed = time.perf_counter() - t_start
    digest_end = source_digest(REPO)
    meta = {
        "torch": torch.__version__, "python": platform.python_version(), "threads": args.threads,
        "devices": device_names, "devices_skipped": skipped, "cuda": torch.version.cuda,
        "git_revision": revision, "uncommitted_changes": None if dirty is None else dirty.splitlines(),
        "library_digest": digest_start, "library_changed_during_run": digest_end != digest_start,
        "baseline": {"revision_requested": args.baseline, "revision": baseline and baseline[1],
                     "note": baseline_note},
        "seconds": elapsed, "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "assets": assets[2],
        "notes": ["ms_per_step: median wall time between train_one_epoch's on_step callbacks over the timed steps "
                  "(prepared batches, host->device copy included, data loading excluded: see data)",
                  "busy_fraction: profiler device-busy ms per step (union of kernel/memcpy/memset intervals) / "
                  "unprofiled ms_per_step; busy_fraction_profiled uses the profiled steps' wall time",
                  "aten_ops_per_step counts every aten:: event (nested ones included); aten_top_level_ops_per_step "
                  "those without an aten:: parent",
                  "speedup_vs_reference = reference ms / ours ms; speedup_vs_baseline = baseline ms / ours ms "
                  "(medians over all timed steps); *_paired: median over rounds of the per-round ratio of block "
                  "medians (adjacent blocks, robust to drift); cpu_time_ratio_*: process CPU ms per step of the "
                  "other arm / ours (all threads, OpenMP spin-waits included: a cost, not a speed)",
                  "the machine is shared: loadavg_* (1-minute load average) says how busy it was"],
    }
    if meta["library_changed_during_run"]:
        print("note: the library's sources changed while the benchmark ran; the figures are for the code imported "
              f"at the start (digest {digest_start})")
    out = {"meta": meta, "goals": {"source": "the issue (targets, not measurements)", "list": GOALS},
           "goal_results": goals, "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out} ({elapsed:.0f} s)")


if __name__ == "__main__":
    main()
