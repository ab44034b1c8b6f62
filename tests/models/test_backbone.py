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


@pytest.mark.parametrize("norm", ["batch_norm", "group_norm"])
def test_trainable_norms_keep_torchvision_names_and_train_the_stem_when_asked(tmp_path, norm):
    ref = torchvision.models.resnet18(weights=None)
    torch.save(ref.state_dict(), tmp_path / "r18.pth")
    ours = VisualBackbone("resnet18", True, norm=norm, trainable_layers=5)
    assert isinstance(ours.body.layer1[0].bn1, torch.nn.BatchNorm2d if norm == "batch_norm" else torch.nn.GroupNorm)
    trainable = {n.split(".")[0] for n, p in ours.body.named_parameters() if p.requires_grad}
    assert trainable == {"conv1", "bn1", "layer1", "layer2", "layer3", "layer4"}
    if norm == "batch_norm":  # the same state-dict keys: ImageNet files load into the trainable-BN body too
        VisualBackbone("resnet18", True, weights_path=str(tmp_path / "r18.pth"), norm=norm)
    # normalised activations: a scaled input gives the same features (an unnormalised body scales with it)
    x = torch.rand(2, 3, 64, 96)
    ours.eval() if norm == "group_norm" else ours.train()
    with torch.no_grad():
        a, b = ours(x)[-1], ours(10 * x)[-1]
    assert (a - b).abs().max() < 0.05 * a.abs().max()


@pytest.mark.parametrize("layers, expected", [(0, set()), (1, {"layer4"}), (3, {"layer2", "layer3", "layer4"}),
                                              (4, {"layer1", "layer2", "layer3", "layer4"})])
def test_trainable_layers_follow_torchvision_order(layers, expected):
    ours = VisualBackbone("resnet18", True, trainable_layers=layers)
    assert {n.split(".")[0] for n, p in ours.body.named_parameters() if p.requires_grad} == expected
    with pytest.raises(ValueError, match="model.backbone_trainable_layers"):
        VisualBackbone("resnet18", True, trainable_layers=6)


def test_unknown_norm_is_rejected():
    with pytest.raises(ValueError, match="model.backbone_norm"):
        VisualBackbone("resnet18", True, norm="layer_norm")
