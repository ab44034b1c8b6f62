"""The embedded default: procedurally generated copies of the four benchmarks in their official on-disk formats,
and the tiny text encoder saved with `save_pretrained`.

    config.py        settings and the scene vocabulary          scene.py        objects, descriptions, what they pick
    sampling.py      attributes and trajectories                render.py       masks, backgrounds, frames
    expressions.py   candidate descriptions and their wording   video.py        one video with its expressions
    ytvos.py         the Ref-YouTube-VOS writer (the main one)  davis.py, a2d.py, jhmdb.py   the other benchmarks
    text_encoder.py  the tiny text encoder's tokenizer, config  text_pretraining.py  its masked-LM pretraining
    refcoco.py       RefCOCO/+/g in the refer format: stills of the videos, expressions decided per still
"""

from bifit.synthetic.config import SYNTHETIC_CATEGORIES, SyntheticConfig
from bifit.synthetic.text_encoder import (
    TinyTextEncoderConfig,
    expression_corpus,
    train_tokenizer,
    write_text_encoder_assets,
)
from bifit.synthetic.ytvos import generate_benchmark

__all__ = [
    "SYNTHETIC_CATEGORIES",
    "SyntheticConfig",
    "TinyTextEncoderConfig",
    "expression_corpus",
    "generate_benchmark",
    "train_tokenizer",
    "write_text_encoder_assets",
]
