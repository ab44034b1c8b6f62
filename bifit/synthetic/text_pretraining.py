"""Pretraining of the tiny stand-in text encoder on the benchmark's expressions.

`roberta-base` arrives pretrained: its first token already summarises the sentence, which BIFIT relies on (the
sentence feature that conditions the queries is pooled from the fused first token). A randomly initialised
encoder has a first token that barely depends on the sentence, and a from-scratch segmentation model then learns
to ignore language. So the stand-in is pretrained on the generated corpus with these objectives:

- masked-language modelling (RoBERTa's: 15% of the word tokens, 80% `<mask>` / 10% random / 10% kept), which
  makes the token features contextual;
- bag of words from the first token: a multi-label prediction of which vocabulary ids occur in the sentence,
  which makes the `<s>` feature a summary of the sentence;
- optionally (``reconstruction_weight`` > 0), sentence reconstruction from the first token: every word token,
  in order, predicted from `<s>` alone, so the summary also tells which words go together ("the red circle left
  of the blue square" is not "the blue circle left of the red square", which a bag of words confuses). It also
  spreads the `<s>` features apart (the other objectives leave them sharing a large common component; the
  returned statistics include their mean pairwise cosine). Measured on the embedded default, the segmentation
  model did not use language better with it (README), so it is off there.

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
    reconstruction_weight: float = 0.0
    seed: int = 0

    def __post_init__(self):
        self.validate()

    def validate(self, where: str = "TextPretrainingConfig"):
        check(isinstance(self.steps, int) and self.steps >= 0, f"{where}.steps", "an int >= 0", self.steps)
        check(isinstance(self.batch_size, int) and self.batch_size >= 1, f"{where}.batch_size", "an int >= 1",
              self.batch_size)
        check(self.lr > 0, f"{where}.lr", "a float > 0", self.lr)
        check(0 < self.mask_prob < 1, f"{where}.mask_prob", "a float in (0, 1)", self.mask_prob)
        check(self.reconstruction_weight >= 0, f"{where}.reconstruction_weight", "a float >= 0",
              self.reconstruction_weight)


class PretrainingHeads(nn.Module):
    """Token logits for masked-language modelling; bag-of-words logits and, with a `length`, the sentence's
    tokens in order from the first token."""

    def __init__(self, hidden: int, vocab: int, length: int | None = None):
        super().__init__()
        self.length = length
        self.mlm = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.LayerNorm(hidden), nn.Linear(hidden, vocab))
        self.bag_of_words = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, vocab))
        if length is not None:  # built only when used: its initialisation would shift the dropout's random draws
            self.reconstruction = nn.Sequential(nn.Linear(hidden, length * hidden), nn.GELU())
            self.reconstruction_vocab = nn.Linear(hidden, vocab)

    def reconstruct(self, first: torch.Tensor) -> torch.Tensor:
        """[b, c] -> [b, length, vocab] logits of the tokens after <s>."""
        return self.reconstruction_vocab(self.reconstruction(first).unflatten(-1, (self.length, -1)))


def reconstruction_targets(input_ids: torch.Tensor, attention_mask: torch.Tensor, length: int) -> torch.Tensor:
    """[b, l] ids -> [b, length] ids of the tokens after <s> (-100 at padding)."""
    targets = torch.where(attention_mask.bool(), input_ids, torch.full_like(input_ids, -100))[:, 1:1 + length]
    return F.pad(targets, (0, length - targets.shape[1]), value=-100)


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
    length = ids.shape[1] - 1 if cfg.reconstruction_weight > 0 else None  # None: no reconstruction objective
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        generator = torch.Generator().manual_seed(cfg.seed)
        heads = PretrainingHeads(hidden, vocab, length)
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
            if length is not None:
                rec = F.cross_entropy(heads.reconstruct(clean).flatten(0, 1),
                                      reconstruction_targets(b_ids, b_att, length).flatten(), ignore_index=-100)
                loss = loss + cfg.reconstruction_weight * rec
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
            first = encoder(input_ids=ids, attention_mask=att).last_hidden_state[:, 0]  # [n, c]
            predicted = heads.bag_of_words(first) > 0
            target = bag_of_words(ids, att, vocab).bool()
            hits = (predicted & target).sum().item()
            f1 = 2 * hits / max(predicted.sum().item() + target.sum().item(), 1)
            stats = {"steps": cfg.steps, "loss_mlm": mlm.item(), "loss_bag_of_words": bow.item(),
                     "mlm_accuracy": mlm_acc, "bag_of_words_f1": f1, **sentence_spread(first),
                     "sentences": int(ids.shape[0])}
            if length is not None:
                targets = reconstruction_targets(ids, att, length)
                exact = ((heads.reconstruct(first).argmax(-1) == targets) | (targets == -100)).all(1)
                stats.update(loss_reconstruction=rec.item(), reconstruction_exact=exact.float().mean().item())
    return stats


def sentence_spread(first: torch.Tensor) -> dict:
    """How much the first-token features [n, c] differ between sentences: their mean pairwise cosine and the
    share of their energy that is not the shared mean vector."""
    n = first.shape[0]
    unit = F.normalize(first, dim=-1)
    cosine = ((unit @ unit.T).sum() - n) / max(n * n - n, 1)
    specific = ((first - first.mean(0)) ** 2).sum() / (first ** 2).sum().clamp(min=1e-12)
    return {"first_token_mean_cosine": cosine.item(), "first_token_specific_energy": specific.item()}
