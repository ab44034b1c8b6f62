"""Offline stand-in for ``roberta-base``: a byte-level BPE tokenizer trained on the benchmark's expressions and a tiny
RoBERTa encoder pretrained on those expressions (``bifit.synthetic.text_pretraining``), saved so that ``AutoTokenizer.from_pretrained(path)`` and
``AutoModel.from_pretrained(path)`` load them exactly like the real checkpoint.

The tokenizer follows RoBERTa conventions: byte-level pre-tokenisation without a prefix space, ``<s> ... </s>``
framing, special ids ``<s>``=0, ``<pad>``=1, ``</s>``=2, ``<unk>``=3, ``<mask>``=4. The encoder weights are a pure
function of ``TinyTextEncoderConfig.seed`` (the global RNG state is restored afterwards). ``transformers`` is
imported lazily so that importing :mod:`bifit.data` stays cheap in DataLoader workers.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from bifit.config import check, int_in
from bifit.data.collate import normalize_text
from bifit.data.ytvos import expressions_path, read_videos
from bifit.fsutil import staged_folder
from bifit.synthetic.text_pretraining import TextPretrainingConfig, pretrain_text_encoder

SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")  # ids 0..4
ASSETS_MARKER = "bifit_text_encoder.json"

# Common English words so that the vocabulary covers more than the synthetic templates.
FILLER_WORDS = """
a an the this that these those it its he she they them his her their one two three four five first second last
person man woman boy girl child people dog cat horse bird fish car truck bus train boat bike motorbike airplane
ball hand head face arm leg hat shirt jacket dress window door table chair bed wall floor road street tree grass
water sky cloud sun light shadow edge corner side front back middle center top bottom near far next behind under
over above below between around across along through into onto from with without while during before after
is are was were be being been has have had do does did can could will would should may might must
move moves moving moved walk walks walking run runs running jump jumps jumping turn turns turning stand stands
standing sit sits sitting hold holds holding look looks looking go goes going come comes coming stop stops
slow slowly fast quickly big small large little tiny huge long short tall wide narrow round flat bright dark
white black gray grey brown pink red green blue yellow purple orange cyan violet golden silver
circle square triangle diamond rectangle star oval shape object thing item part piece
left right up down upward downward upwards downwards leftmost rightmost topmost lowest highest closest farthest
and or but not only also very more most less least other another same different each every all some any both
""".split()


@dataclass(frozen=True)
class TinyTextEncoderConfig:
    vocab_size: int = 1000  # BPE target; a small corpus may stop earlier
    min_frequency: int = 1
    hidden_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    intermediate_size: int = 256
    max_position_embeddings: int = 64  # RoBERTa offsets positions by pad_id + 1, so 62 tokens fit
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    seed: int = 0
    # pretraining on the corpus (bifit.synthetic.text_pretraining): masked-language modelling and bag of words from
    # <s> (with a reconstruction weight > 0 also the sentence's tokens in order from <s>), so that the stand-in, like
    # roberta-base, arrives with a first token that summarises the sentence; 0 steps = none
    pretrain_steps: int = 400
    pretrain_batch_size: int = 64
    pretrain_lr: float = 1e-3
    pretrain_reconstruction_weight: float = 0.0

    def __post_init__(self):
        self.validate()

    def validate(self, where: str = "TinyTextEncoderConfig"):
        ranges = {
            "vocab_size": (len(SPECIAL_TOKENS) + 256, 1_000_000),
            "min_frequency": (1, 1_000_000),
            "hidden_size": (8, 8192),
            "num_hidden_layers": (1, 48),
            "num_attention_heads": (1, 128),
            "intermediate_size": (8, 32768),
            "max_position_embeddings": (8, 8192),
            "seed": (0, 2**32 - 1),
            "pretrain_steps": (0, 1_000_000),
            "pretrain_batch_size": (1, 1_000_000),
        }
        for name, (lo, hi) in ranges.items():
            check(int_in(getattr(self, name), lo, hi), f"{where}.{name}", f"an int in [{lo}, {hi}]", getattr(self, name))
        check(self.hidden_size % self.num_attention_heads == 0, f"{where}.hidden_size",
              f"a multiple of num_attention_heads={self.num_attention_heads}", self.hidden_size)
        check(isinstance(self.pretrain_lr, int | float) and 0 < self.pretrain_lr < 1, f"{where}.pretrain_lr",
              "a float in (0, 1)", self.pretrain_lr)
        check(isinstance(self.pretrain_reconstruction_weight, int | float) and self.pretrain_reconstruction_weight >= 0,
              f"{where}.pretrain_reconstruction_weight", "a float >= 0", self.pretrain_reconstruction_weight)
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            check(0.0 <= getattr(self, name) < 1.0, f"{where}.{name}", "a float in [0, 1)", getattr(self, name))

    @property
    def model_max_length(self) -> int:
        return self.max_position_embeddings - 2


def expression_corpus(ytvos_root, splits: Sequence[str] = ("train",)) -> list[str]:
    """Normalised expressions of ``meta_expressions/<split>`` for each split (train only by default)."""
    corpus = []
    for split in splits:
        for video in read_videos(expressions_path(ytvos_root, split)).values():
            corpus.extend(normalize_text(e["exp"]) for e in video["expressions"].values())
    return corpus


def train_tokenizer(corpus: Iterable[str], cfg: TinyTextEncoderConfig = TinyTextEncoderConfig()):
    """Byte-level BPE trained on ``corpus`` + filler words, wrapped as a RoBERTa tokenizer."""
    from transformers import RobertaTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = list(corpus) + [" ".join(FILLER_WORDS)] + FILLER_WORDS
    bpe.train_from_iterator(texts, trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tokenizer = RobertaTokenizerFast(vocab=model["vocab"], merges=merges, model_max_length=cfg.model_max_length)
    ids = [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
    if ids != list(range(len(SPECIAL_TOKENS))):
        raise RuntimeError(f"tokenizer special token ids {dict(zip(SPECIAL_TOKENS, ids))}, expected 0..4 in order")
    return tokenizer


def build_text_encoder(cfg: TinyTextEncoderConfig, vocab_size: int):
    """A randomly initialised ``RobertaModel`` (with pooler) whose weights depend only on ``cfg.seed``."""
    from transformers import RobertaConfig, RobertaModel

    config = RobertaConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings,
        hidden_dropout_prob=cfg.hidden_dropout_prob,
        attention_probs_dropout_prob=cfg.attention_probs_dropout_prob,
        type_vocab_size=1,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = RobertaModel(config)
    return model.eval()


def write_text_encoder_assets(out_dir, corpus: Iterable[str], cfg: TinyTextEncoderConfig = TinyTextEncoderConfig(),
                              overwrite: bool = False) -> Path:
    """Train the tokenizer, build the encoder and ``save_pretrained`` both into ``out_dir`` (atomic rename).

    A folder written earlier with the same config and corpus is kept as is; a non-empty folder not written here is
    refused unless ``overwrite=True``.
    """
    out_dir = Path(out_dir)
    corpus = list(corpus)
    marker = {"generator": "bifit.synthetic.text_encoder", "config": asdict(cfg),
              "corpus_sha256": _corpus_digest(corpus)}
    existing = _read_marker(out_dir)
    if existing is not None and {k: v for k, v in existing.items() if k != "pretraining"} == marker:
        return out_dir
    if out_dir.exists() and any(out_dir.iterdir()) and existing is None and not overwrite:
        raise FileExistsError(f"{out_dir}: exists, is not empty and has no {ASSETS_MARKER}; pass overwrite=True")
    with staged_folder(out_dir) as tmp:
        tokenizer = train_tokenizer(corpus, cfg)
        model = build_text_encoder(cfg, vocab_size=len(tokenizer))
        pretraining = pretrain_text_encoder(model, tokenizer, corpus, TextPretrainingConfig(
            steps=cfg.pretrain_steps, batch_size=cfg.pretrain_batch_size, lr=float(cfg.pretrain_lr),
            reconstruction_weight=float(cfg.pretrain_reconstruction_weight), seed=cfg.seed))
        marker["pretraining"] = pretraining
        tokenizer.save_pretrained(tmp)
        model.save_pretrained(tmp)
        (tmp / ASSETS_MARKER).write_text(json.dumps(marker, indent=1) + "\n")
    return out_dir


def _corpus_digest(corpus: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(corpus).encode()).hexdigest()


def _read_marker(out_dir: Path) -> dict | None:
    try:
        return json.loads((out_dir / ASSETS_MARKER).read_text())
    except (OSError, json.JSONDecodeError):
        return None
