"""Batch padding, text normalisation and tokenisation, and the offline text encoder."""

import json

import pytest
import torch

from bifit.data.collate import collate_fn, normalize_text, pad_clips, padded_size, tokenize
from bifit.synthetic import text_encoder as tea

CORPUS = [
    "the small blue square left of the circle",
    "the red triangle moving up",
    "the leftmost large green diamond",
    "the object that moves down and is above the purple circle",
]
TINY_TEXT = tea.TinyTextEncoderConfig(vocab_size=400, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=64, max_position_embeddings=32, seed=5)


def sample(t, h, w, caption):
    return torch.randn(t, 3, h, w), {"caption": caption, "size": torch.tensor([h, w])}


def test_padding_to_multiples_of_32():
    clips = [torch.randn(2, 3, 100, 150), torch.randn(2, 3, 90, 170)]
    images, mask = pad_clips(clips)
    assert images.shape == (2, 2, 3, 128, 192) and mask.shape == (2, 2, 128, 192) and mask.dtype == torch.bool
    assert torch.equal(images[0, :, :, :100, :150], clips[0]) and torch.equal(images[1, :, :, :90, :170], clips[1])
    assert not images[0, :, :, 100:].any() and not images[0, :, :, :, 150:].any()  # zero padding bottom/right
    assert not mask[0, :, :100, :150].any() and mask[0, :, 100:].all() and mask[0, :, :, 150:].all()
    assert mask[1].sum() == 2 * (128 * 192 - 90 * 170)
    assert padded_size([(96, 160)]) == (96, 160) and padded_size([(97, 1), (3, 161)]) == (128, 192)


def test_collate_fn_batch():
    batch = collate_fn([sample(3, 64, 96, "the red circle"), sample(3, 70, 90, "the left square")])
    assert batch.images.shape == (2, 3, 3, 96, 96) and batch.image_mask.shape == (2, 3, 96, 96)
    assert batch.captions == ["the red circle", "the left square"]
    assert [t["size"].tolist() for t in batch.targets] == [[64, 96], [70, 90]]
    images, image_mask, captions, targets = batch  # also unpacks as a tuple
    assert images is batch.images


def test_mismatched_clip_lengths_raise():
    with pytest.raises(ValueError, match=r"same number of frames T, got \[2, 3\]"):
        pad_clips([torch.zeros(2, 3, 8, 8), torch.zeros(3, 3, 8, 8)])


def test_normalize_text():
    assert normalize_text("  The  Small\tBLUE\nsquare ") == "the small blue square"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return tea.write_text_encoder_assets(tmp_path_factory.mktemp("text") / "tiny-roberta", CORPUS, TINY_TEXT)


def test_tokenize_pads_to_longest(assets):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(assets)
    assert (tok.bos_token_id, tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert tok.convert_tokens_to_ids("<mask>") == 4
    ids, attn = tokenize(tok, ["The  Red triangle", "the small blue square left of the circle"])
    assert ids.shape == attn.shape and ids.shape[0] == 2 and attn[1].all()
    n = int(attn[0].sum())
    assert ids[0, 0] == 0 and ids[0, n - 1] == 2 and (ids[0, n:] == 1).all() and not attn[0, n:].any()
    same, _ = tokenize(tok, ["The  Red triangle"])
    assert torch.equal(same[0], ids[0, :n])
    lower, _ = tokenize(tok, ["the red triangle"])  # the text as given: normalising is the loader's choice
    assert tok.decode(ids[0], skip_special_tokens=True) == "The  Red triangle" and not torch.equal(lower[0], same[0])
    assert tok.decode(ids[1], skip_special_tokens=True) == "the small blue square left of the circle"
    long_ids, _ = tokenize(tok, [" ".join(["circle"] * 100)])
    assert long_ids.shape[1] == TINY_TEXT.model_max_length  # truncated to the position-embedding limit


def test_text_encoder_loads_like_roberta_base(assets):
    from transformers import AutoModel, AutoTokenizer

    tok, model = AutoTokenizer.from_pretrained(assets), AutoModel.from_pretrained(assets)
    assert type(model).__name__ == "RobertaModel" and model.config.model_type == "roberta"
    assert model.config.hidden_size == 32 and model.config.vocab_size == len(tok)
    ids, attn = tokenize(tok, CORPUS)
    with torch.no_grad():
        out = model.eval()(input_ids=ids, attention_mask=attn)
    assert out.last_hidden_state.shape == (4, ids.shape[1], 32) and out.pooler_output.shape == (4, 32)
    from bifit.synthetic.text_pretraining import TextPretrainingConfig, pretrain_text_encoder

    encoder = tea.build_text_encoder(TINY_TEXT, len(tok))
    initial = {k: v.clone() for k, v in encoder.state_dict().items()}
    pretrain_text_encoder(encoder, tok, CORPUS, TextPretrainingConfig(
        steps=TINY_TEXT.pretrain_steps, batch_size=TINY_TEXT.pretrain_batch_size, lr=TINY_TEXT.pretrain_lr,
        seed=TINY_TEXT.seed))
    built, loaded = encoder.state_dict(), model.state_dict()
    assert all(torch.equal(built[k], loaded[k]) for k in built)  # weights are a function of the seed and corpus
    assert not torch.equal(initial["embeddings.word_embeddings.weight"], loaded["embeddings.word_embeddings.weight"])


def test_weights_depend_only_on_seed():
    torch.manual_seed(123)
    a = tea.build_text_encoder(TINY_TEXT, 300).state_dict()
    state = torch.random.get_rng_state()
    b = tea.build_text_encoder(TINY_TEXT, 300).state_dict()
    assert torch.equal(state, torch.random.get_rng_state())  # the global RNG is left alone
    c = tea.build_text_encoder(tea.TinyTextEncoderConfig(**{**TINY_TEXT.__dict__, "seed": 6}), 300).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["embeddings.word_embeddings.weight"], c["embeddings.word_embeddings.weight"])


def test_assets_idempotent_and_refuse_foreign(assets, tmp_path):
    stamp = (assets / "tokenizer.json").stat().st_mtime_ns
    assert tea.write_text_encoder_assets(assets, CORPUS, TINY_TEXT) == assets
    assert (assets / "tokenizer.json").stat().st_mtime_ns == stamp
    assert json.loads((assets / tea.ASSETS_MARKER).read_text())["config"]["seed"] == 5
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "x").write_text("x")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        tea.write_text_encoder_assets(foreign, CORPUS, TINY_TEXT)


@pytest.mark.parametrize(("field", "value", "expected"), [
    ("hidden_size", 30, "multiple of num_attention_heads=4"),
    ("num_hidden_layers", 0, r"\[1, 48\]"),
    ("vocab_size", 100, r"\[261, 1000000\]"),
])
def test_text_config_validation(field, value, expected):
    with pytest.raises(ValueError, match=rf"TinyTextEncoderConfig\.{field}: expected .*{expected}"):
        tea.TinyTextEncoderConfig(**{field: value})


def test_assets_from_benchmark_corpus_are_deterministic(tmp_path):
    from transformers import AutoTokenizer

    from bifit.synthetic.config import SyntheticConfig
    from bifit.synthetic.ytvos import generate_benchmark

    cfg = SyntheticConfig(num_train_videos=2, num_valid_videos=1, num_test_videos=0, frames_per_video=4,
                          height=96, width=160)
    generate_benchmark(cfg, tmp_path / "bench", progress=False)
    corpus = tea.expression_corpus(tmp_path / "bench")
    assert len(corpus) >= 2 * 3 * cfg.expressions_per_object and all(c == normalize_text(c) for c in corpus)
    a = tea.write_text_encoder_assets(tmp_path / "a", corpus, TINY_TEXT)
    b = tea.write_text_encoder_assets(tmp_path / "b", corpus, TINY_TEXT)
    for name in ("tokenizer.json", "model.safetensors", "config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    tok = AutoTokenizer.from_pretrained(a)
    ids, _ = tokenize(tok, corpus)
    assert not (ids == tok.unk_token_id).any()
    assert [tok.decode(row, skip_special_tokens=True) for row in ids] == corpus
