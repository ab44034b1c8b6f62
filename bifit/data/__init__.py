"""Loaders of the four benchmarks as their official releases lay them out on disk, with the clip transforms,
batching and samplers the training and evaluation share. Preparing raw downloads lives in `bifit.prepare`, the
embedded synthetic benchmark in `bifit.synthetic`."""

from bifit.data.collate import VideoBatch, collate_fn, normalize_text, pad_clips, tokenize
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
    "SYNTHETIC_EVAL_SHORT_SIDE",
    "SYNTHETIC_RESIZE",
    "YTVOS_CATEGORIES",
    "Expression",
    "ResizeConfig",
    "SampleError",
    "VideoBatch",
    "YTVOSDataset",
    "collate_fn",
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
]
