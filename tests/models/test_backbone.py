import pytest
import torch
import torchvision
from torchvision.models._utils import IntermediateLayerGetter

from bifit.models.backbone import VisualBackbone


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_folded_frozen_bn_equals_torchvision_eval_and_loads_local_weights(tmp_path, name):
    torch.manual_seed(0)
    ref = getattr(torchvision.models, name)(weights=None)
    for m in ref.modules():  # non-trivial BN statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    ref.eval()
    torch.save(ref.state_dict(), tmp_path / f"{name}.pth")  # torchvision format, incl. fc.* and num_batches
    ours = VisualBackbone(name, train_backbone=True, weights_path=str(tmp_path / f"{name}.pth")).eval()
    getter = IntermediateLayerGetter(ref, {f"layer{i}": f"res{i + 1}" for i in range(1, 5)})
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        expected = list(getter(x).values())
        got = ours(x)
    assert [tuple(g.shape) for g in got] == [tuple(e.shape) for e in expected]
    for g, e in zip(got, expected):
        # same affine maps; only float32 rounding differs (relative to the activation scale)
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5 * e.abs().max().item())


def test_missing_weights_file_names_the_key(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.backbone_weights"):
        VisualBackbone("resnet18", True, weights_path=str(tmp_path / "nope.pth"))


def test_unknown_backbone_is_rejected():
    with pytest.raises(ValueError, match="model.backbone"):
        VisualBackbone("vgg16", True)
