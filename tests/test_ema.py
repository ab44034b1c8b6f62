import pytest
import torch
from torch import nn

from bifit.ema import ModelEMA


def _model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    model[2].requires_grad_(False)  # frozen: copied, never averaged
    return model


def test_average_follows_the_formula_with_the_warm_up_decay():
    model = _model()
    ema = ModelEMA(model, decay=0.9)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model[0].weight.add_(1.0)
    model.train()(torch.randn(8, 3))  # moves the batch-norm statistics and its counter
    ema.update(model)
    d = min(0.9, 2 / 11)
    torch.testing.assert_close(ema.state["0.weight"], d * start["0.weight"] + (1 - d) * model[0].weight)
    torch.testing.assert_close(ema.state["1.running_mean"],
                               d * start["1.running_mean"] + (1 - d) * model[1].running_mean)
    assert ema.state["1.num_batches_tracked"].item() == 1  # integer buffers are copied
    assert torch.equal(ema.state["2.weight"], start["2.weight"])
    assert "2.weight" not in ema.averaged and "0.weight" in ema.averaged
    # after many updates the decay is the configured one
    ema.updates = 10_000
    assert ema.current_decay() == pytest.approx(0.9)


def test_constant_weights_stay_and_the_state_round_trips():
    model = _model()
    ema = ModelEMA(model, decay=0.99)
    for _ in range(5):
        ema.update(model)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(ema.state[k], v)
    saved = ema.state_dict()
    other = ModelEMA(_model(), decay=0.99)
    with torch.no_grad():
        other.state["0.weight"].zero_()
    other.load_state_dict(saved)
    assert other.updates == 5 and torch.equal(other.state["0.weight"], saved["model"]["0.weight"])
    with pytest.raises(KeyError, match="lacks"):
        other.load_state_dict({"updates": 1, "model": {}})
    with pytest.raises(ValueError, match="decay"):
        ModelEMA(model, decay=1.0)
