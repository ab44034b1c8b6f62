"""Pretraining of the tiny stand-in text encoder on the benchmark's expressions.

`roberta-base` arrives pretrained: its first token already summarises the sentence, which BIFIT relies on (the
sentence feature that conditions the queries is pooled from the fused first token). A randomly initialised
encoder has a first token that barely depends on the sentence, and a from-scratch segmentation model then learns
to ignore language. So the stand-in is pretrained on the generated corpus with two objectives:

- masked-language modelling (RoBERTa's: 15% of the word tokens, 80% `<mask>` / 10% random / 10% kept), which
  makes the token features contextual;
- bag of words from the first token: a multi-label prediction of which vocabulary ids occur in the sentence,
  which makes the `<s>` feature a summary of the sentence.

Deterministic for a given seed (the global RNG state is restored afterwards).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bifit.config import check

NUM_SPECIAL = 5  # <s>, <pad>, </s>, <unk>, <mask>: ids 0..4 (bifit.synthetic.text_encoder.SPECIAL_TOKENS)
MASK_ID = 4


@dataclass(frozen=True)
class TextPretrainingConfig:
    steps: int = 400
    batch_size: int = 64
    lr: float = 1e-3
    mask_prob: float = 0.15
    seed: int = 0

    def __post_init__(self):
        self.validate()

    def validate(self, where: str = "TextPretrainingConfig"):
        check(isinstance(self.steps, int) and self.steps >= 0, f"{where}.steps", "an int >= 0", self.steps)
        check(isinstance(self.batch_size, int) and self.batch_size >= 1, f"{where}.batch_size", "an int >= 1",
              self.batch_size)
        check(self.lr > 0, f"{where}.lr", "a float > 0", self.lr)
        check(0 < self.mask_prob < 1, f"{where}.mask_prob", "a float in (0, 1)", self.mask_prob)


class PretrainingHeads(nn.Module):
    """Token logits for masked-language modelling and bag-of-words logits from the first token."""

    def __init__(self, hidden: int, vocab: int):
        super().__init__()
        self.mlm = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.LayerNorm(hidden), nn.Linear(hidden, vocab))
        self.bag_of_words = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, vocab))


def mask_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, vocab: int, prob: float, generator):
    """RoBERTa masking of word tokens -> (masked ids, labels with -100 where not predicted)."""
    words = (input_ids >= NUM_SPECIAL) & attention_mask.bool()
    chosen = words & (torch.rand(input_ids.shape, generator=generator) < prob)
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))
    draw = torch.rand(input_ids.shape, generator=generator)
    masked = torch.where(chosen & (draw < 0.8), torch.full_like(input_ids, MASK_ID), input_ids)
    random_ids = torch.randint(NUM_SPECIAL, vocab, input_ids.shape, generator=generator)
    masked = torch.where(chosen & (draw >= 0.8) & (draw < 0.9), random_ids, masked)
    return masked, labels


def bag_of_words(input_ids: torch.Tensor, attention_mask: torch.Tensor, vocab: int) -> torch.Tensor:
    """[b, l] ids -> [b, vocab] 0/1 targets: which word ids occur in each sentence."""
    target = torch.zeros(input_ids.shape[0], vocab)
    keep = (input_ids >= NUM_SPECIAL) & attention_mask.bool()
    rows = torch.arange(input_ids.shape[0])[:, None].expand_as(input_ids)
    target[rows[keep], input_ids[keep]] = 1.0
    return target


def pretrain_text_encoder(encoder, tokenizer, corpus: list[str], cfg: TextPretrainingConfig) -> dict:
    """Train `encoder` (a Hugging Face RobertaModel) in place on `corpus`; returns final losses and accuracies."""
    if cfg.steps == 0 or not corpus:
        return {"steps": 0}
    enc = tokenizer(sorted(set(corpus)), padding="longest", return_tensors="pt")
    ids, att = enc["input_ids"], enc["attention_mask"]
    vocab, hidden = encoder.config.vocab_size, encoder.config.hidden_size
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        generator = torch.Generator().manual_seed(cfg.seed)
        heads = PretrainingHeads(hidden, vocab)
        params = list(encoder.parameters()) + list(heads.parameters())
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
        encoder.train()
        heads.train()
        for _ in range(cfg.steps):
            batch = torch.randint(0, ids.shape[0], (min(cfg.batch_size, ids.shape[0]),), generator=generator)
            b_ids, b_att = ids[batch], att[batch]
            masked, labels = mask_tokens(b_ids, b_att, vocab, cfg.mask_prob, generator)
            states = encoder(input_ids=masked, attention_mask=b_att).last_hidden_state  # [b, l, c]
            mlm = F.cross_entropy(heads.mlm(states).flatten(0, 1), labels.flatten(), ignore_index=-100)
            clean = encoder(input_ids=b_ids, attention_mask=b_att).last_hidden_state[:, 0]  # [b, c]
            bow = F.binary_cross_entropy_with_logits(heads.bag_of_words(clean), bag_of_words(b_ids, b_att, vocab))
            loss = mlm + bow
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        encoder.eval()
        heads.eval()
        with torch.no_grad():
            masked, labels = mask_tokens(ids, att, vocab, cfg.mask_prob, generator)
            logits = heads.mlm(encoder(input_ids=masked, attention_mask=att).last_hidden_state)
            picked = labels != -100
            mlm_acc = (logits.argmax(-1)[picked] == labels[picked]).float().mean().item()
            predicted = heads.bag_of_words(encoder(input_ids=ids, attention_mask=att).last_hidden_state[:, 0]) > 0
            target = bag_of_words(ids, att, vocab).bool()
            hits = (predicted & target).sum().item()
            f1 = 2 * hits / max(predicted.sum().item() + target.sum().item(), 1)
    return {"steps": cfg.steps, "loss_mlm": mlm.item(), "loss_bag_of_words": bow.item(),
            "mlm_accuracy": mlm_acc, "bag_of_words_f1": f1, "sentences": int(ids.shape[0])}
