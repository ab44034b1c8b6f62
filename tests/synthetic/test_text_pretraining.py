"""Pretraining of the stand-in text encoder: the first token learns to summarise the sentence."""

import itertools

import pytest
import torch

from bifit.synthetic import text_encoder as tea
from bifit.synthetic.text_pretraining import (
    TextPretrainingConfig,
    bag_of_words,
    mask_tokens,
    pretrain_text_encoder,
)

COLOURS, SHAPES, MOTIONS = ("red", "blue", "green", "yellow"), ("circle", "square", "triangle"), ("up", "down", "left")
CORPUS = [f"the {c} {s} moving {m}" for c, s, m in itertools.product(COLOURS, SHAPES, MOTIONS)]
TINY = tea.TinyTextEncoderConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=64, max_position_embeddings=32, seed=3, pretrain_steps=0)


@pytest.fixture(scope="module")
def tokenizer():
    return tea.train_tokenizer(CORPUS, TINY)


def first_token_spread(encoder, tokenizer) -> float:
    """Mean distance of the sentences' <s> features from their mean, relative to the features' size."""
    enc = tokenizer(CORPUS, padding="longest", return_tensors="pt")
    with torch.no_grad():
        first = encoder(**enc).last_hidden_state[:, 0]
    return ((first - first.mean(0)).norm(dim=1).mean() / first.norm(dim=1).mean()).item()


def test_pretraining_makes_the_first_token_a_sentence_summary(tokenizer):
    encoder = tea.build_text_encoder(TINY, len(tokenizer))
    before = first_token_spread(encoder, tokenizer)
    stats = pretrain_text_encoder(encoder, tokenizer, CORPUS, TextPretrainingConfig(steps=300, batch_size=16,
                                                                                   lr=3e-3, seed=0))
    after = first_token_spread(encoder, tokenizer)
    assert stats["steps"] == 300 and stats["sentences"] == len(CORPUS)
    assert stats["bag_of_words_f1"] > 0.6, stats  # the <s> feature tells which words the sentence holds (chance ~0.1)
    assert stats["mlm_accuracy"] > 0.5  # chance over ~10 content words is ~0.1
    assert after > 2 * before, (before, after, stats)


def test_pretraining_is_deterministic_and_leaves_the_global_rng_alone(tokenizer):
    states = []
    for _ in range(2):
        torch.manual_seed(123)
        encoder = tea.build_text_encoder(TINY, len(tokenizer))
        pretrain_text_encoder(encoder, tokenizer, CORPUS, TextPretrainingConfig(steps=5, batch_size=8, seed=1))
        states.append((encoder.state_dict(), torch.rand(1)))
    (a, ra), (b, rb) = states
    assert all(torch.equal(a[k], b[k]) for k in a) and torch.equal(ra, rb)


def test_masking_and_bag_of_words_targets():
    ids = torch.tensor([[0, 7, 8, 9, 2, 1], [0, 9, 9, 2, 1, 1]])
    att = (ids != 1).long()
    target = bag_of_words(ids, att, vocab=12)
    assert target[0].nonzero().flatten().tolist() == [7, 8, 9] and target[1].nonzero().flatten().tolist() == [9]
    masked, labels = mask_tokens(ids, att, vocab=12, prob=0.999, generator=torch.Generator().manual_seed(0))
    words = (ids >= 5) & att.bool()
    assert torch.equal(labels[words], ids[words]) and (labels[~words] == -100).all()  # specials never predicted
    assert torch.equal(masked[~words], ids[~words])


def test_bad_settings_name_the_field():
    with pytest.raises(ValueError, match="TextPretrainingConfig.mask_prob"):
        TextPretrainingConfig(mask_prob=1.5)
    with pytest.raises(ValueError, match="TinyTextEncoderConfig.pretrain_lr"):
        tea.TinyTextEncoderConfig(pretrain_lr=0)
