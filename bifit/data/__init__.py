"""Data layer: the Ref-YouTube-VOS loader, clip transforms, batching, the embedded synthetic benchmark and the
offline tiny text encoder (see DATASETS_AND_EVAL.md sections 1, 2 and 9)."""

from bifit.data.collate import VideoBatch, collate_fn, normalize_text, pad_clips, tokenize
from bifit.data.synthetic import SYNTHETIC_CATEGORIES, SyntheticConfig, generate_benchmark
from bifit.data.text_encoder_assets import (
    TinyTextEncoderConfig,
    expression_corpus,
    train_tokenizer,
    write_text_encoder_assets,
)
from bifit.data.transforms import (
    PAPER_EVAL_SHORT_SIDE,
    PAPER_RESIZE,
    SYNTHETIC_EVAL_SHORT_SIDE,
    SYNTHETIC_RESIZE,
    ResizeConfig,
    make_eval_transforms,
    make_train_transforms,
    make_video_eval_transform,
)
from bifit.data.ytvos import (
    YTVOS_CATEGORIES,
    Expression,
    SampleError,
    YTVOSDataset,
    inference_expressions,
    inference_videos,
    load_gt_masks,
    load_video,
    sample_clip_indices,
)

__all__ = [
    "PAPER_EVAL_SHORT_SIDE",
    "PAPER_RESIZE",
    "SYNTHETIC_CATEGORIES",
    "SYNTHETIC_EVAL_SHORT_SIDE",
    "SYNTHETIC_RESIZE",
    "YTVOS_CATEGORIES",
    "Expression",
    "ResizeConfig",
    "SampleError",
    "SyntheticConfig",
    "TinyTextEncoderConfig",
    "VideoBatch",
    "YTVOSDataset",
    "collate_fn",
    "expression_corpus",
    "generate_benchmark",
    "inference_expressions",
    "inference_videos",
    "load_gt_masks",
    "load_video",
    "make_eval_transforms",
    "make_train_transforms",
    "make_video_eval_transform",
    "normalize_text",
    "pad_clips",
    "sample_clip_indices",
    "tokenize",
    "train_tokenizer",
    "write_text_encoder_assets",
]
