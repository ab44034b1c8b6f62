"""A generated clip to try ``bifit.segment`` and the web demo on, with nothing downloaded.

    python -m bifit.example_clip example/                          # example/clip.mp4 + example/expressions.txt
    python -m bifit.example_clip example/ --untrained-checkpoint   # + example/untrained.pth (random weights)

The clip is a video of the embedded synthetic benchmark (coloured shapes that move and occlude each other on a
textured background, at its 128x224 size, the validation split's generator), so the model that ``make demo``
trains (``models/bifit.pth``) segments it; ``expressions.txt`` holds its generated referring sentences, one a line.

``--untrained-checkpoint`` also writes a small model with **random weights** (and its text encoder, tokenizer
trained on the sentences) in our checkpoint format: it runs every command end to end, but its masks mean nothing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from bifit.config import Config, DataConfig, ModelConfig, to_dict

CLIP_NAME = "clip.mp4"
EXPRESSIONS_NAME = "expressions.txt"
UNTRAINED_NAME = "untrained.pth"
FPS = 6  # Ref-YouTube-VOS's released frames are every 5th of 30 fps video


def example_clip(frames: int = 24, index: int = 0, height: int = 128, width: int = 224) -> tuple[np.ndarray, list[str]]:
    """(RGB uint8 [frames, height, width, 3], its referring sentences)."""
    from bifit.synthetic.config import SyntheticConfig
    from bifit.synthetic.video import make_video

    video = make_video(SyntheticConfig(frames_per_video=frames, height=height, width=width), "valid", index)
    return video.rgb, [text for _, _, text in video.expressions]


def untrained_model_config(text_encoder: str) -> ModelConfig:
    """The embedded default's architecture at its smallest (ResNet-18, 64 channels, one query)."""
    return ModelConfig(backbone="resnet18", backbone_norm="batch_norm", text_encoder=text_encoder, hidden_dim=64,
                       nheads=4, enc_layers=1, dec_layers=2, dim_feedforward=128, dropout=0.0, num_queries=1,
                       sentence_source="text", msda_backend="pytorch")


def write_untrained_checkpoint(path: Path, sentences: list[str], seed: int = 0) -> Path:
    """A random-weight model in our checkpoint format, its text encoder in ``<path stem>-text-encoder/``."""
    import torch

    from bifit.checkpoint import save_checkpoint
    from bifit.models import build_model
    from bifit.synthetic.text_encoder import TinyTextEncoderConfig, write_text_encoder_assets

    path = Path(path)
    encoder = write_text_encoder_assets(path.with_name(f"{path.stem}-text-encoder"), sentences, TinyTextEncoderConfig(
        vocab_size=300, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        pretrain_steps=0), overwrite=True)
    cfg = untrained_model_config(str(encoder.resolve()))
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    save_checkpoint(path, model, to_dict(Config(model=cfg, data=DataConfig(eval_short_side=128))), epoch=0,
                    untrained=True)
    return path


def write_example(folder: Path, frames: int = 24, untrained_checkpoint: bool = False) -> dict:
    """clip.mp4 and expressions.txt (and untrained.pth) in `folder`; returns their paths and the sentences."""
    from bifit.video_io import write_video

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rgb, sentences = example_clip(frames)
    out = {"clip": write_video(folder / CLIP_NAME, rgb, FPS), "sentences": sentences}
    (folder / EXPRESSIONS_NAME).write_text("\n".join(sentences) + "\n")
    out["expressions"] = folder / EXPRESSIONS_NAME
    if untrained_checkpoint:
        out["checkpoint"] = write_untrained_checkpoint(folder / UNTRAINED_NAME, sentences)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bifit.example_clip", description=__doc__.split("\n\n")[0])
    p.add_argument("folder", type=Path)
    p.add_argument("--frames", type=int, default=24)
    p.add_argument("--untrained-checkpoint", action="store_true",
                   help=f"also write {UNTRAINED_NAME}: a small model with random weights (its masks mean nothing)")
    args = p.parse_args(argv)
    out = write_example(args.folder, args.frames, args.untrained_checkpoint)
    print(f"{out['clip']}: {args.frames} frames at {FPS} fps")
    print(f"{out['expressions']}: " + "; ".join(out["sentences"][:3]) + " ...")
    if "checkpoint" in out:
        print(f"{out['checkpoint']}: random weights (masks mean nothing; models/bifit.pth from `make demo` is trained)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
