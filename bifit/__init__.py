"""BIFIT for referring video object segmentation. ``bifit.load_model`` loads a trained model (ours or an official
BIFIT/ReferFormer file) with the architecture it was trained with (:mod:`bifit.loading`); its ``segment(video,
sentences)`` segments a user's video (:mod:`bifit.segment`, also ``python -m bifit.segment`` and the web page
``python -m bifit.app``)."""

from __future__ import annotations

__all__ = ["load_model"]


def __getattr__(name: str):
    # imported on first use: `import bifit.config` (the pipeline's settings) stays free of torch
    if name == "load_model":
        from bifit.loading import load_model

        return load_model
    raise AttributeError(f"module 'bifit' has no attribute {name!r}")
