import math

import pytest
import torch

from bifit.config import Config, ConfigError, LossConfig, ModelConfig
from bifit.models.criterion import build_criterion, token_category_loss
from tests.conftest import tiny_batch, tiny_model


def test_loss_is_the_cross_entropy_on_the_tokens_the_mask_covers():
    # a 2 x 4 token map over an 8 x 16 mask grid; frame 0: the referent covers the top-left token fully and the
    # next one by a quarter (not labelled); frame 1: no referent
    masks = torch.zeros(1, 2, 8, 16)
    masks[0, 0, :4, :5] = 1
    logits = torch.zeros(1, 2, 2, 4, 3)
    target = [{"category": torch.tensor(2)}]
    assert token_category_loss(logits, target, masks).item() == pytest.approx(math.log(3), abs=1e-6)
    right = logits.clone()
    right[0, 0, 0, 0, 2] = 20.0
    assert token_category_loss(right, target, masks).item() < 1e-6
    wrong = logits.clone()
    wrong[0, 0, 0, 0, 1] = 20.0
    assert token_category_loss(wrong, target, masks).item() == pytest.approx(20.0, abs=1e-3)
    # the unlabelled token and the empty frame do not count, whatever they predict
    elsewhere = right.clone()
    elsewhere[0, 0, 0, 1, 0] = 50.0
    elsewhere[0, 1, :, :, 0] = 50.0
    assert token_category_loss(elsewhere, target, masks).item() < 1e-6


def test_targets_without_a_category_contribute_nothing():
    masks = torch.ones(2, 1, 4, 4)
    logits = torch.zeros(2, 1, 2, 2, 4, requires_grad=True)
    logits_data = logits.detach().clone()
    logits_data[1] = 30.0  # the second target (no category) would be wrong everywhere
    both = [{"category": torch.tensor(1)}, {}]
    assert token_category_loss(logits_data, both, masks).item() == pytest.approx(math.log(4), abs=1e-6)
    none = token_category_loss(logits, [{}, {}], masks)
    assert none.item() == 0.0
    none.backward()  # still in the graph
    assert logits.grad is not None and logits.grad.abs().sum() == 0


def test_head_is_trained_only_with_its_coefficient_and_absent_in_eval():
    model = tiny_model(token_category_classes=4)
    assert model.token_category_head.weight.shape == (4, 64)
    images, mask, ids, attn, sizes, targets = tiny_batch(b=2, t=2)
    for i, target in enumerate(targets):
        target["category"] = torch.tensor(i + 1)
    model.train()
    out = model(images, mask, ids, attn, sizes)
    assert out["token_category_logits"].shape == (2, 2, 8, 12, 4)  # the stride-8 level of 64 x 96 frames
    criterion = build_criterion(Config(model=model.cfg, loss=LossConfig(token_category_coef=2.0)))
    losses = criterion(out, targets)
    assert torch.isfinite(losses["loss_token_category"]) and losses["loss_token_category"] > 0
    assert criterion.weight_dict["loss_token_category"] == 2.0
    losses["loss_token_category"].backward()  # this term alone: it trains the head and shapes the features below
    assert model.token_category_head.weight.grad.abs().sum() > 0
    assert model.input_proj[0][0].weight.grad.abs().sum() > 0
    assert model.backbone.body.layer2[0].conv1.weight.grad.abs().sum() > 0
    assert "loss_token_category" not in build_criterion(Config(model=model.cfg))(out, targets)
    with torch.no_grad():
        assert "token_category_logits" not in model.eval()(images, mask, ids, attn, sizes)
    assert not any("token_category" in k for k in tiny_model().state_dict())


def test_config_requires_the_head_for_the_loss_and_the_data_categories_count():
    ok = Config(model=ModelConfig(token_category_classes=4), loss=LossConfig(token_category_coef=1.0))
    ok.data.categories = "synthetic"
    ok.validate()
    with pytest.raises(ConfigError, match="model.token_category_classes"):
        Config(loss=LossConfig(token_category_coef=1.0)).validate()
    with pytest.raises(ConfigError, match=r"65 \(the number of categories of data.categories: ytvos\)"):
        Config(model=ModelConfig(token_category_classes=4)).validate()
