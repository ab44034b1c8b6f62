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
    reconstruction_targets,
    sentence_spread,
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


# two sentences of the same words in another order: a bag of words cannot tell them apart
SWAPPED = [f"the {a} circle left of the {b} square" for a, b in itertools.permutations(COLOURS, 2)]


def first_tokens(encoder, tokenizer, sentences):
    enc = tokenizer(sentences, padding="longest", return_tensors="pt")
    with torch.no_grad():
        return encoder(**enc).last_hidden_state[:, 0]


@pytest.mark.parametrize("weight", [0.0, 1.0])
def test_reconstruction_tells_word_order_and_spreads_the_first_token(weight):
    corpus = CORPUS + SWAPPED
    tokenizer = tea.train_tokenizer(corpus, TINY)
    encoder = tea.build_text_encoder(TINY, len(tokenizer))
    stats = pretrain_text_encoder(encoder, tokenizer, corpus, TextPretrainingConfig(
        steps=600, batch_size=16, lr=3e-3, reconstruction_weight=weight, seed=0))
    encoder.eval()
    spread = sentence_spread(first_tokens(encoder, tokenizer, corpus))
    assert stats["first_token_mean_cosine"] == pytest.approx(spread["first_token_mean_cosine"], abs=1e-5)
    if weight:  # most sentences recovered word by word (chance: none), features far apart
        assert stats["reconstruction_exact"] > 0.5, stats
        assert spread["first_token_mean_cosine"] < 0.5, spread
    else:  # no reconstruction head, and the features share a large common part
        assert "reconstruction_exact" not in stats and "loss_reconstruction" not in stats, stats
        assert spread["first_token_mean_cosine"] > 0.6, spread


def test_reconstruction_targets_are_the_tokens_after_the_first():
    ids = torch.tensor([[0, 7, 8, 2, 1], [0, 9, 2, 1, 1]])
    att = (ids != 1).long()
    assert reconstruction_targets(ids, att, 5).tolist() == [[7, 8, 2, -100, -100], [9, 2, -100, -100, -100]]
    assert reconstruction_targets(ids, att, 2).tolist() == [[7, 8], [9, 2]]


def test_sentence_spread_of_equal_and_orthogonal_features():
    assert sentence_spread(torch.ones(4, 3)) == pytest.approx({"first_token_mean_cosine": 1.0,
                                                               "first_token_specific_energy": 0.0})
    spread = sentence_spread(torch.eye(3))
    assert spread["first_token_mean_cosine"] == pytest.approx(0.0)
    assert spread["first_token_specific_energy"] == pytest.approx(2 / 3)  # each row minus the mean (1/3, 1/3, 1/3)


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
    with pytest.raises(ValueError, match="TinyTextEncoderConfig.pretrain_reconstruction_weight"):
        tea.TinyTextEncoderConfig(pretrain_reconstruction_weight=-1)
