import math

import pytest
import torch

from bifit.config import Config, LossConfig
from bifit.models.criterion import build_criterion
from bifit.models.referent_map import ReferentMap, referent_map_loss, token_centres
from tests.conftest import tiny_batch, tiny_model


def test_token_centres_are_normalised_by_the_unpadded_region():
    # 2 x 4 grid; the second frame's right half and bottom row are padding (valid ratio w 0.5, h 0.5)
    centres = token_centres(2, 4, torch.tensor([[1.0, 1.0], [0.5, 0.5]]))
    assert centres.shape == (2, 8, 2)
    assert torch.allclose(centres[0, 0], torch.tensor([0.125, 0.25]))
    assert torch.allclose(centres[0, 7], torch.tensor([0.875, 0.75]))
    # token (row 0, column 1) is the last valid one of frame 1: its centre is at x 0.75, y 0.5 of the valid part
    assert torch.allclose(centres[1, 1], torch.tensor([0.75, 0.5]))
    assert (centres[1, 2:4, 0] > 1).all()  # padded columns lie beyond 1


def test_start_point_is_the_centre_of_the_token_matching_the_sentence_and_ignores_padding():
    torch.manual_seed(0)
    d = 8
    module = ReferentMap(d)
    with torch.no_grad():
        module.token_proj.weight.copy_(torch.eye(d) * 100)
        module.sentence_proj.weight.copy_(torch.eye(d))
        module.token_proj.bias.zero_()
        module.sentence_proj.bias.zero_()
    sentence = torch.zeros(1, d)
    sentence[0, 3] = 1.0
    tokens = torch.zeros(1, 8, d)
    tokens[0, 6, 3] = 1.0  # the token that matches the sentence
    tokens[0, 7, 3] = 5.0  # matches better, but is padding
    padding = torch.zeros(1, 8, dtype=torch.bool)
    padding[0, 7] = True
    centres = token_centres(2, 4, torch.ones(1, 2))
    point, logits = module(tokens, sentence, padding, centres)
    assert torch.allclose(point[0], centres[0, 6], atol=1e-3)
    assert logits[0, 7] < -1e30
    # another sentence (a channel no token has) spreads the map: the point moves to the mean of the valid centres
    other = torch.zeros(1, d)
    other[0, 0] = 1.0
    point, _ = module(tokens, other, padding, centres)
    assert torch.allclose(point[0], centres[0, :7].mean(0), atol=1e-5)


def test_map_loss_is_the_cross_entropy_against_the_mask_and_skips_absent_referents():
    masks = torch.zeros(1, 2, 4, 8)
    masks[0, 0, :2, :2] = 1  # frame 0: the referent covers the top-left token of a 2 x 4 map
    # frame 1: no referent (it left the frame)
    uniform = torch.zeros(1, 2, 2, 4)
    loss = referent_map_loss(uniform, masks, torch.tensor(1.0))
    assert loss.item() == pytest.approx(math.log(8), abs=1e-5)  # frame 0 only
    peaked = uniform.clone()
    peaked[0, 0, 0, 0] = 10.0
    wrong = uniform.clone()
    wrong[0, 0, 1, 3] = 10.0
    assert referent_map_loss(peaked, masks, torch.tensor(1.0)) < 1e-3
    assert referent_map_loss(wrong, masks, torch.tensor(1.0)) > 9.0
    # num_boxes divides the sum like the other terms
    assert referent_map_loss(uniform, masks, torch.tensor(2.0)).item() == pytest.approx(math.log(8) / 2, abs=1e-5)


def test_text_guided_queries_start_where_the_sentence_points_and_the_map_is_trained():
    model = tiny_model(query_reference="text_guided")
    keys = model.state_dict().keys()
    assert not any(k.startswith("transformer.reference_points.") for k in keys)
    assert "transformer.referent_map.token_proj.weight" in keys
    criterion = build_criterion(Config(model=model.cfg, loss=LossConfig(referent_map_coef=1.0)))
    images, mask, ids, attn, sizes, targets = tiny_batch(b=2, t=2)
    model.train()
    out = model(images, mask, ids, attn, sizes)
    assert out["referent_map"].shape[:2] == (2, 2)
    losses = criterion(out, targets)
    assert torch.isfinite(losses["loss_referent_map"]) and losses["loss_referent_map"] > 0
    criterion.weighted_total(losses).backward()
    assert model.transformer.referent_map.token_proj.weight.grad.abs().sum() > 0
    # without the coefficient there is no map term (the map still trains through the first layer's boxes)
    assert "loss_referent_map" not in build_criterion(Config(model=model.cfg))(out, targets)


def _start_points(model, sentences):
    """The queries' start points [expressions, t, q, 2] of one clip decoded with every sentence."""
    images, mask, ids, attn, sizes, _ = tiny_batch(b=1, t=2)
    ids = torch.cat([ids] * len(sentences))
    for i, sentence in enumerate(sentences):
        ids[i, 1:3] = torch.tensor(sentence)
    starts = []
    hook = model.transformer.decoder.register_forward_pre_hook(lambda m, a: starts.append(a[2]))
    with torch.no_grad():
        model.eval()(images.expand(len(sentences), *images.shape[1:]),
                     mask.expand(len(sentences), *mask.shape[1:]), ids, attn.expand(len(sentences), -1),
                     sizes.expand(len(sentences), -1))
    hook.remove()
    return starts[0].reshape(len(sentences), 2, -1, 2)


def test_only_the_text_guided_start_point_depends_on_the_expression():
    sentences = [[5, 6], [9, 11]]
    guided = _start_points(tiny_model(query_reference="text_guided"), sentences)
    assert not torch.allclose(guided[0], guided[1])
    learned = _start_points(tiny_model(), sentences)
    assert torch.equal(learned[0], learned[1])


@pytest.mark.parametrize("query_reference", ["learned", "text_guided"])
def test_describe_video_reports_the_start_point_map_of_a_text_guided_model(query_reference):
    from bifit.qualitative import describe_video
    from tests.eval.fakes import WordTokenizer

    model = tiny_model(query_reference=query_reference)
    details = describe_video(model, WordTokenizer(), torch.randn(2, 3, 64, 96), "a b", (64, 96))
    if query_reference == "learned":
        assert details.referent_map is None
    else:
        assert details.referent_map.shape == (2, 8, 12)  # the stride-8 level of a 64 x 96 frame
        assert details.referent_map.sum(axis=(1, 2)) == pytest.approx([1.0, 1.0], abs=1e-5)
