"""Swin and Video-Swin backbones: shapes, strides and channels of every variant, per-frame Video-Swin outputs,
official release files (ImageNet / Kinetics, incl. the temporal patch-embedding sum), the official checkpoint key
map, rejected option combinations, and parity with the official bodies (tests/golden/backbones_public.pt)."""

from __future__ import annotations

import io
import itertools
import math
import typing
from contextlib import redirect_stdout

import pytest
import torch

from bifit import parity
from bifit.checkpoint import load_official, official_to_ours, to_official_state_dict
from bifit.config import ConfigError, ModelConfig, from_dict
from bifit.models.backbone import BACKBONES, VisualBackbone, swin_trainable_prefixes
from bifit.models.swin import (
    SWIN_VARIANTS,
    relative_position_index,
    shifted_window_mask,
    window_partition,
    window_reverse,
)
from bifit.models.video_swin import VIDEO_SWIN_VARIANTS
from bifit.recipe import recipe_tensor
from tests.conftest import tiny_model

CHANNELS = {"t": (96, 192, 384, 768), "s": (96, 192, 384, 768), "b": (128, 256, 512, 1024),
            "l": (192, 384, 768, 1536)}
# parameters of the bodies (millions): the published model sizes less the classifier
PARAMS_M = {"swin_t_p4w7": 27.52, "swin_s_p4w7": 48.84, "swin_b_p4w7": 86.75, "swin_l_p4w7": 195.00,
            "video_swin_t_p4w7": 27.84, "video_swin_s_p4w7": 49.50, "video_swin_b_p4w7": 87.63}
SWINS = [*SWIN_VARIANTS, *VIDEO_SWIN_VARIANTS]
TINY = dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4))


@pytest.fixture
def tiny_swins(monkeypatch):
    """swin_t_p4w7 / video_swin_t_p4w7 built with 16 channels (same code, names and key layout; fast)."""
    monkeypatch.setitem(SWIN_VARIANTS, "swin_t_p4w7", TINY)
    monkeypatch.setitem(VIDEO_SWIN_VARIANTS, "video_swin_t_p4w7", TINY)


def test_config_choices_are_the_backbones():
    hint = typing.get_type_hints(ModelConfig)["backbone"]
    assert typing.get_args(hint) == BACKBONES
    with pytest.raises(ConfigError, match="model.backbone: expected one of .*'video_swin_b_p4w7'"):
        from_dict(ModelConfig, {"backbone": "swin_x"}, "model")


@pytest.mark.parametrize("name", SWINS)
def test_every_variant_has_the_official_channels_and_strides(name):
    """Shapes only (meta tensors: no memory, no compute); an input that is not a multiple of 32 is padded."""
    with torch.device("meta"):
        backbone = VisualBackbone(name, train_backbone=True)
        outs = backbone(torch.empty(4, 3, 50, 70), 2)
    size = CHANNELS[name.split("_")[-2]]
    assert backbone.num_channels == size and backbone.strides == (4, 8, 16, 32)
    assert [tuple(o.shape) for o in outs] == [(4, c, math.ceil(50 / s), math.ceil(70 / s))
                                             for c, s in zip(size, (4, 8, 16, 32))]
    assert round(sum(p.numel() for p in backbone.parameters()) / 1e6, 2) == PARAMS_M[name]


@pytest.mark.parametrize("name", ["swin_t_p4w7", "video_swin_t_p4w7"])
def test_real_forward_at_a_padded_size(tiny_swins, name):
    """Patch embedding, windows and merging all pad (50x70: 13x18 tokens, then 7x9, 4x5, 2x3)."""
    torch.manual_seed(0)
    backbone = VisualBackbone(name, train_backbone=False).eval()
    with torch.no_grad():
        outs = backbone(torch.randn(2, 3, 50, 70), 2)
    assert [tuple(o.shape) for o in outs] == [(2, 16, 13, 18), (2, 32, 7, 9), (2, 64, 4, 5), (2, 128, 2, 3)]
    assert all(torch.isfinite(o).all() for o in outs)


def test_video_swin_mixes_frames_within_a_clip_only(tiny_swins):
    """[(b t), 3, H, W]: each clip of t frames is encoded jointly and comes back per frame; clips stay apart.
    10 frames exceed the 8-frame window, so the temporal padding and shift run too."""
    torch.manual_seed(0)
    backbone = VisualBackbone("video_swin_t_p4w7", train_backbone=False).eval()
    x = torch.randn(2 * 10, 3, 32, 32)
    y = x.clone()
    y[3] += 1.0  # clip 0, frame 3
    with torch.no_grad():
        a, b = backbone(x, 10), backbone(y, 10)
    assert [tuple(o.shape) for o in a] == [(20, 16, 8, 8), (20, 32, 4, 4), (20, 64, 2, 2), (20, 128, 1, 1)]
    for fa, fb in zip(a, b):
        assert torch.equal(fa[10:], fb[10:])  # the other clip is untouched
        assert (fa[0] - fb[0]).abs().max() > 1e-4  # frame 0 of the same clip sees frame 3
    per_frame = VisualBackbone("swin_t_p4w7", train_backbone=False).eval()
    with torch.no_grad():
        assert torch.equal(per_frame(x)[1][0], per_frame(y)[1][0])  # the image Swin does not mix frames


def test_window_helpers_against_their_definitions():
    x = torch.arange(2 * 6 * 14 * 3, dtype=torch.float32).view(2, 6, 14, 3)
    w = window_partition(x, (3, 7))
    assert w.shape == (2 * 2 * 2, 21, 3) and torch.equal(w[1], x[0, :3, 7:].reshape(21, 3))
    assert torch.equal(window_reverse(w, (3, 7), (6, 14)), x)
    # relative position index: row-major index of the shifted offset
    win = (2, 3, 3)
    coords = list(itertools.product(*[range(v) for v in win]))
    idx = relative_position_index(win)
    for i, j in [(0, 0), (5, 11), (17, 2)]:
        d = [a - b + v - 1 for a, b, v in zip(coords[i], coords[j], win)]
        assert idx[i, j] == (d[0] * 5 + d[1]) * 5 + d[2]
    # shifted-window mask: tokens of one window from different regions (per axis [0,g-w), [g-w,g-s), [g-s,g)) mask
    mask = shifted_window_mask((14, 14), (7, 7), (3, 3), "cpu", torch.float32)
    assert mask.shape == (4, 49, 49) and not mask[0].any()
    region = [0 if r < 7 else 1 if r < 11 else 2 for r in range(7, 14)]  # rows/cols of the last window
    ids = [region[i // 7] * 3 + region[i % 7] for i in range(49)]
    assert all((mask[3, i, j] == -100.0) == (ids[i] != ids[j]) for i in range(49) for j in range(49))


def test_bad_combinations_name_the_key():
    with pytest.raises(ValueError, match="model.dilation"):
        VisualBackbone("swin_t_p4w7", True, dilation=True)
    with pytest.raises(ValueError, match="model.backbone_norm"):
        VisualBackbone("video_swin_t_p4w7", True, norm="batch_norm")
    for key, value in (("dilation", True), ("backbone_norm", "group_norm")):
        with pytest.raises(ConfigError, match=f"model.{key}: expected .*'swin_b_p4w7'"):
            ModelConfig(backbone="swin_b_p4w7", **{key: value}).validate()
    ModelConfig(backbone="video_swin_s_p4w7", backbone_trainable_layers=5).validate()


@pytest.mark.parametrize("video", [False, True])
def test_trainable_layers_count_stages_from_the_top(tiny_swins, video):
    name = "video_swin_t_p4w7" if video else "swin_t_p4w7"
    merge = "downsamples.{}." if video else "layers.{}.downsample."

    def trainable(k):
        body = VisualBackbone(name, True, trainable_layers=k).body
        return {n for n, p in body.named_parameters() if p.requires_grad}

    assert trainable(0) == set() and not VisualBackbone(name, False).body.patch_embed.proj.weight.requires_grad
    top = trainable(1)
    assert top and all(n.startswith(("layers.3.", "norm3.", merge.format(2))) for n in top)
    assert any(n.startswith(merge.format(2)) for n in top)
    assert trainable(5) == {n for n, _ in VisualBackbone(name, True).body.named_parameters()}
    assert swin_trainable_prefixes(3, video)[-1] == merge.format(0)


def _random_like(state):
    g = torch.Generator().manual_seed(0)
    return {k: (torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()) for k, v in state.items()}


def test_imagenet_swin_release_loads(tiny_swins, tmp_path):
    """The ImageNet layout: {"model": ...} with the classifier, the final norm and the shifted blocks' masks; no
    per-stage norms (they keep their identity initialisation, as in the official code)."""
    own = VisualBackbone("swin_t_p4w7", True).body.state_dict()
    release = {k: v for k, v in _random_like(own).items() if not k.startswith("norm")}
    release.update({"norm.weight": torch.ones(128), "norm.bias": torch.zeros(128), "head.weight": torch.ones(10, 128),
                    "head.bias": torch.zeros(10), "layers.0.blocks.1.attn_mask": torch.zeros(4, 49, 49)})
    torch.save({"model": release}, tmp_path / "swin_tiny_patch4_window7_224.pth")
    body = VisualBackbone("swin_t_p4w7", True, weights_path=str(tmp_path / "swin_tiny_patch4_window7_224.pth")).body
    for k, v in body.state_dict().items():
        if k.startswith("norm"):
            assert torch.equal(v, torch.ones_like(v) if k.endswith("weight") else torch.zeros_like(v))
        else:
            assert torch.equal(v, release[k]), k

    del release["layers.2.blocks.0.mlp.fc1.weight"]
    release["layers.0.blocks.0.attn.relative_position_bias_table"] = torch.zeros(23 * 23, 1)  # a window-12 file
    torch.save({"model": release}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"model.backbone_weights: .*bad.pth.*layers.2.blocks.0.mlp.fc1.weight.*"
                                         r"relative_position_bias_table: file \(529, 1\)"):
        VisualBackbone("swin_t_p4w7", True, weights_path=str(tmp_path / "bad.pth"))
    with pytest.raises(FileNotFoundError, match="model.backbone_weights"):
        VisualBackbone("swin_t_p4w7", True, weights_path=str(tmp_path / "nope.pth"))


def test_kinetics_video_swin_release_loads_with_the_temporal_sum(tiny_swins, tmp_path):
    """The Kinetics layout: {"state_dict": {"backbone.*", "cls_head.*"}}, `layers.{i}.downsample`, the final norm,
    and a 2x4x4 patch embedding that the official code sums over time into 1x4x4."""
    own = VisualBackbone("video_swin_t_p4w7", True).body.state_dict()
    release = {}
    for k, v in _random_like(own).items():
        if k.startswith("downsamples."):
            i, rest = k[len("downsamples."):].split(".", 1)
            k = f"layers.{i}.downsample.{rest}"
        release["backbone." + k] = v
    release["backbone.patch_embed.proj.weight"] = torch.randn(16, 3, 2, 4, 4)
    release.update({"backbone.norm.weight": torch.ones(128), "backbone.norm.bias": torch.zeros(128),
                    "cls_head.fc_cls.weight": torch.ones(400, 128), "cls_head.fc_cls.bias": torch.zeros(400)})
    torch.save({"meta": {"epoch": 30}, "state_dict": release}, tmp_path / "swin_tiny_patch244_window877.pth")
    body = VisualBackbone("video_swin_t_p4w7", True,
                          weights_path=str(tmp_path / "swin_tiny_patch244_window877.pth")).body
    got = body.state_dict()
    assert torch.allclose(got["patch_embed.proj.weight"],
                          release["backbone.patch_embed.proj.weight"].sum(2, keepdim=True))
    assert torch.equal(got["downsamples.1.reduction.weight"], release["backbone.layers.1.downsample.reduction.weight"])
    assert torch.equal(got["layers.3.blocks.1.mlp.fc2.bias"], release["backbone.layers.3.blocks.1.mlp.fc2.bias"])
    release["backbone.layers.3.downsample.reduction.weight"] = torch.zeros(256, 512)  # no merging after stage 4
    torch.save({"state_dict": release}, tmp_path / "extra.pth")
    with pytest.raises(ValueError, match=r"model.backbone_weights: .*unexpected \['downsamples.3.reduction.weight'"):
        VisualBackbone("video_swin_t_p4w7", True, weights_path=str(tmp_path / "extra.pth"))


@pytest.mark.parametrize("name", ["swin_t_p4w7", "video_swin_t_p4w7"])
def test_official_checkpoint_key_map_round_trip(tiny_swins, tmp_path, name):
    """An official BIFIT/ReferFormer state dict with a (Video-)Swin body (`backbone.0.body.*`, the body's own names)
    filled by the recipe loads strictly through the key map and gives the recipe's values back."""
    model = tiny_model(backbone=name)
    own = model.state_dict()
    official = to_official_state_dict(own)
    body_keys = {k[len("backbone.0.body."):] for k in official if k.startswith("backbone.0.body.")}
    assert {"patch_embed.proj.weight", "layers.0.blocks.1.attn.relative_position_index", "layers.3.blocks.1.mlp.fc2.bias",
            "downsamples.2.norm.weight" if name.startswith("video") else "norm3.bias"} <= body_keys
    assert {k for k in own if k.startswith("backbone.")} == {official_to_ours("backbone.0.body." + k) for k in body_keys}
    filled = {k: recipe_tensor(k, tuple(v.shape), v.dtype) if v.is_floating_point() else v.clone()
              for k, v in official.items()}
    torch.save({"model": filled, "epoch": 3}, tmp_path / "official.pth")
    fresh = tiny_model(seed=1, backbone=name)
    assert load_official(tmp_path / "official.pth", fresh) == {"epoch": 3}
    loaded = to_official_state_dict(fresh.state_dict())
    assert loaded.keys() == filled.keys() and all(torch.equal(loaded[k], v) for k, v in filled.items())


@pytest.mark.parametrize("name", ["swin_t_p4w7", "video_swin_t_p4w7"])
def test_bifit_runs_on_swin_features(tiny_swins, name):
    """The body feeds the transformer (levels 8/16/32 + a stride-2 conv of the last) and the pixel decoder
    (stride 4); A2D's one annotated frame is selected after a clip backbone (Video-Swin sees the whole clip)."""
    from tests.conftest import tiny_batch

    model = tiny_model(backbone=name).eval()
    assert [p[0].in_channels for p in model.input_proj] == [32, 64, 128, 128]
    assert model.pixel_decoder.adapter_1.in_channels == 16
    images, mask, ids, attn, sizes, _ = tiny_batch(b=1, t=3, h=64, w=96)
    with torch.no_grad():
        out = model(images, mask, ids, attn, sizes)
        assert out["pred_masks"].shape == (1, 3, 3, 16, 24) and torch.isfinite(out["pred_masks"]).all()
        one = model.encode_visual(images, mask, valid_indices=torch.tensor([1]))
        feats = model.backbone(images.flatten(0, 1), 3)
    assert one.num_frames == 1 and torch.allclose(one.res2, feats[0][1:2], atol=1e-5)


def _run_parity_cli(path) -> tuple[int, str]:
    out = io.StringIO()
    with redirect_stdout(out):
        rc = parity.main([str(path)])
    return rc, out.getvalue()


def test_parity_with_the_official_bodies(golden_dir):
    """`python -m bifit.parity tests/golden/backbones_public.pt`, in process."""
    rc, out = _run_parity_cli(golden_dir / "backbones_public.pt")
    assert rc == 0, out
    for name in ("swin_t_p4w7", "video_swin_t_p4w7"):
        for level in range(4):
            assert f"{name}  f32 {level}" in out and f"{name}  f64 {level}" in out, out
    assert out.count("ok ") == 16 and "parity ok" in out


def test_parity_fails_on_a_perturbed_backbone_golden(golden_dir, tmp_path):
    golden = torch.load(golden_dir / "backbones_public.pt", weights_only=True)
    del golden["backbones"]["swin_t_p4w7"]
    golden["backbones"]["video_swin_t_p4w7"]["outputs_f64"]["2"][0, 0, 0, 0] += 2e-6
    torch.save(golden, tmp_path / "any_name.pt")
    rc, out = _run_parity_cli(tmp_path / "any_name.pt")
    assert rc == 1 and "FAIL" in out.split("f64 2")[0].splitlines()[-1]
    golden["backbones"]["video_swin_t_p4w7"]["config"]["window_size"] = [8, 12, 12]
    torch.save(golden, tmp_path / "other.pt")
    rc, out = _run_parity_cli(tmp_path / "other.pt")
    assert rc == 1 and "window_size: golden (8, 12, 12), ours (8, 7, 7)" in out
