"""Segmenting a user's video end to end, measured: frames per second of ``bifit.segment`` (decode + model +
writing masks, overlay video and scores) for a 10-second 480p clip with a ResNet-50 model.

    python bench/segment.py [--seconds 10] [--fps 30] [--cpu-frames 48] [--threads 2] [--out PATH]

Input: a generated 854x480 clip of ``--seconds`` at ``--fps`` (a textured background with two moving shapes,
H.264), segmented with our command-line code (:func:`bifit.segment.write_segmentation`: windows of 24 frames,
resize to the 360 short side, 0/255 PNG masks, overlay .mp4, result.json) by the paper architecture (ResNet-50,
4/4 layers, hidden 256, 5 queries; random weights: speed does not depend on them) with a roberta-base-sized random
text encoder (12 layers, 768 wide; a small vocabulary trained on the sentences), in float32.

Runs per device: 1 sentence and 2 sentences (the second shares each window's visual features). On the CPU only the
first ``--cpu-frames`` frames of the clip are segmented (two windows; the whole clip would take ~10 minutes per
run on 2 cores): the rate is per frame and the frames are the same 480p frames. On CUDA (when torch sees a GPU)
the whole clip. Also measured: decoding alone (the whole clip), to show the share of each part.

There is no reference figure: the official code has no segment-your-own-video tool (its inference scripts read
extracted JPEG frames of the benchmarks). The JSON says so rather than inventing one.
Results: bench/results/segment.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bifit.segment import SegmentConfig, write_segmentation  # noqa: E402
from bifit.video_io import open_video, write_video  # noqa: E402

SENTENCES = ["the red circle moving to the right", "the blue square moving down"]
SIZE = (480, 854)  # 480p, 16:9
# written in a child process: training the tokenizer leaves the `tokenizers` thread pool busy for a few seconds,
# which would slow the first timed run on a 2-core machine
WRITE_CHECKPOINT = """
import sys, torch
from bifit.checkpoint import save_checkpoint
from bifit.config import Config, DataConfig, ModelConfig, to_dict
from bifit.models import build_model
from bifit.synthetic.text_encoder import TinyTextEncoderConfig, write_text_encoder_assets
folder, sentences = sys.argv[1], sys.argv[2:]
encoder = write_text_encoder_assets(folder + "/text-encoder", sentences * 20, TinyTextEncoderConfig(
    vocab_size=300, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
    max_position_embeddings=64, pretrain_steps=0))
cfg = ModelConfig(text_encoder=str(encoder))  # the paper architecture
torch.manual_seed(0)
save_checkpoint(folder + "/paper_r50.pth", build_model(cfg).eval(),
                to_dict(Config(model=cfg, data=DataConfig(eval_short_side=360))))
"""


def generated_clip(path: Path, seconds: float, fps: int) -> Path:
    """A smooth textured background with a red disc moving right and a blue square moving down, H.264."""
    h, w = SIZE
    n = int(round(seconds * fps))
    rng = np.random.default_rng(0)
    coarse = rng.uniform(60, 200, (h // 40 + 2, w // 40 + 2, 3))
    background = np.kron(coarse, np.ones((40, 40, 1)))[:h, :w].astype(np.uint8)
    yy, xx = np.mgrid[:h, :w]
    out = []
    for i in range(n):
        frame = background.copy()
        cx, cy = 80 + (w - 160) * i / max(n - 1, 1), h / 2
        frame[(yy - cy) ** 2 + (xx - cx) ** 2 <= 50 ** 2] = (220, 30, 30)
        top = int(40 + (h - 160) * i / max(n - 1, 1))
        frame[top : top + 80, w // 3 : w // 3 + 80] = (30, 60, 220)
        out.append(frame)
    return write_video(path, out, fps)


def timed_segmentation(loaded, clip: Path, sentences: list[str], out: Path) -> dict:
    source = open_video(clip)
    start = time.perf_counter()
    summary = write_segmentation(loaded, source, sentences, out, SegmentConfig(), "mp4")
    seconds = time.perf_counter() - start
    return {"sentences": len(sentences), "frames": summary["frames"], "seconds": seconds,
            "fps": summary["frames"] / seconds}


def timed_decode(clip: Path) -> dict:
    source = open_video(clip)
    start = time.perf_counter()
    n = sum(1 for _ in source.frames())
    seconds = time.perf_counter() - start
    return {"frames": n, "seconds": seconds, "fps": n / seconds}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--fps", type=int, default=30)
    p.add_argument("--cpu-frames", type=int, default=48, help="frames segmented on the CPU (the clip's first)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "segment.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from bifit.loading import load_model

    results = {"setup": {"clip": f"{SIZE[1]}x{SIZE[0]}, {args.seconds:g} s at {args.fps} fps "
                         f"({int(round(args.seconds * args.fps))} frames), H.264",
                         "model": "paper architecture (ResNet-50, hidden 256, 4/4 layers, 5 queries), random weights, "
                                  "roberta-base-sized random text encoder, float32",
                         "inference": "windows of 24 frames, short side 360, threshold 0.5 (bifit.segment defaults)",
                         "writes": "PNG masks, overlay .mp4, result.json per sentence",
                         "threads": args.threads, "torch": torch.__version__, "machine": platform.machine()},
               "reference": {"figure": None, "why": "the official code has no segment-your-own-video tool; no "
                                                    "published frames-per-second figure to compare with"},
               "devices": {}}
    with tempfile.TemporaryDirectory(prefix="bench-segment-") as tmp:
        tmp = Path(tmp)
        subprocess.run([sys.executable, "-c", WRITE_CHECKPOINT, str(tmp), *SENTENCES], check=True, cwd=REPO,
                       capture_output=True)
        full = generated_clip(tmp / "clip_10s.mp4", args.seconds, args.fps)
        # the CPU's clip: the first --cpu-frames frames of the same clip (same frames, same codec)
        frames = [f for _, f in zip(range(args.cpu_frames), open_video(full).frames())]
        head = write_video(tmp / "clip_head.mp4", frames, args.fps)
        results["decode_whole_clip"] = timed_decode(full)
        print(f"decode only: {results['decode_whole_clip']['fps']:.1f} frames/s "
              f"({results['decode_whole_clip']['frames']} frames)")
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
        if "cuda" not in devices:
            results["devices"]["cuda"] = {"measured": False, "why": "torch sees no GPU on this machine"}
        for device in devices:
            loaded = load_model(tmp / "paper_r50.pth", device=device)
            clip = head if device == "cpu" else full
            runs = []
            for k in (1, 2):
                run = timed_segmentation(loaded, clip, SENTENCES[:k], tmp / f"out_{device}_{k}")
                runs.append(run)
                print(f"{device}: {run['sentences']} sentence(s), {run['frames']} frames in {run['seconds']:.1f} s: "
                      f"{run['fps']:.3f} frames/s end to end")
            results["devices"][device] = {"measured": True, "frames_segmented": runs[0]["frames"],
                                          "whole_clip": device != "cpu", "runs": runs,
                                          "fps_one_sentence": runs[0]["fps"], "fps_two_sentences": runs[1]["fps"]}
            del loaded
    print("reference: none (the official code has no such tool; no published figure)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
