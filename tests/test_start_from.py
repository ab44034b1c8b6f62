"""bifit.loading.load_start_weights: a training run starting from another checkpoint (ours or an official file), the
class heads dropped as the official fine-tuning does, everything else loaded strictly."""

import argparse
import pickle

import pytest
import torch

from bifit.checkpoint import CheckpointError, save_checkpoint, to_official_state_dict
from bifit.config import Config, to_dict
from bifit.loading import BIFIT_ONLY_OFFICIAL, StartReport, load_start_weights
from tests.conftest import tiny_model, tiny_model_config

DEC_LAYERS = 2  # tiny_model_config's
CLASS_HEADS = [f"class_embed.{layer}.{name}" for layer in range(DEC_LAYERS) for name in ("weight", "bias")]
# our names of the modules ReferFormer lacks
BIFIT_ONLY = ("vl_interaction.vision_to_text.", "vl_interaction.sentence_pool.", "transformer.decoder.inter_frame.")


def _source(**overrides):
    """A tiny model whose every floating tensor differs from any fresh model's (a fresh class-head bias is a
    constant, the same for every seed)."""
    model = tiny_model(seed=0, **overrides).eval()
    with torch.no_grad():
        for value in model.state_dict().values():
            if value.is_floating_point():
                value.add_(torch.rand_like(value) + 0.5)
    return model


def _snapshot(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _save_ours(path, model_or_state, cfg=None):
    save_checkpoint(path, model_or_state, to_dict(Config(model=cfg or tiny_model_config())), epoch=7)


def _official_args(cfg) -> argparse.Namespace:
    """The official opts.py names of `cfg` (what an official training file's `args` holds)."""
    return argparse.Namespace(
        backbone=cfg.backbone, dilation=cfg.dilation, two_stage=False, with_box_refine=True, lr_backbone=1e-5,
        hidden_dim=cfg.hidden_dim, nheads=cfg.nheads, enc_layers=cfg.enc_layers, dec_layers=cfg.dec_layers,
        query_enc_layers=cfg.inter_frame_layers, dim_feedforward=cfg.dim_feedforward, dropout=cfg.dropout,
        num_feature_levels=cfg.num_feature_levels, enc_n_points=cfg.enc_n_points, dec_n_points=cfg.dec_n_points,
        num_queries=cfg.num_queries, mask_dim=cfg.hidden_dim, controller_layers=cfg.controller_layers,
        dynamic_mask_channels=cfg.dynamic_mask_channels, rel_coord=cfg.rel_coord, aux_loss=cfg.aux_loss,
        binary=True, freeze_text_encoder=True)


def _official_state(model, drop_bifit_only=False) -> dict:
    state = to_official_state_dict(model.state_dict())
    state["text_encoder.embeddings.position_ids"] = torch.arange(32)[None]  # as older official files hold
    if drop_bifit_only:
        state = {k: v for k, v in state.items() if not k.startswith(BIFIT_ONLY_OFFICIAL)}
    return state


def _check_started(dst, before: dict, src, report: StartReport, kept=()):
    """Every tensor but the class heads (and `kept`) is the source's; those are the destination's own init."""
    own_init = set(CLASS_HEADS) | set(kept)
    after, source = dst.state_dict(), src.state_dict()
    for key, value in after.items():
        expected = before[key] if key in own_init else source[key]
        assert torch.equal(value, expected), key
        if value.is_floating_point() and key in own_init:
            assert not torch.equal(value, source[key]), key  # really not the source's
    assert report.dropped == CLASS_HEADS and len(report.dropped) == 2 * DEC_LAYERS
    assert report.kept_initialisation == sorted(kept)
    assert report.loaded == len(after) - len(CLASS_HEADS) - len(kept)


def test_our_checkpoint_loads_all_but_the_class_heads(tmp_path):
    src = _source()
    _save_ours(tmp_path / "ours.pth", src)
    dst = tiny_model(seed=1)
    before = _snapshot(dst)
    assert all(not torch.equal(v, src.state_dict()[k]) for k, v in before.items() if v.is_floating_point())
    report = load_start_weights(dst, tmp_path / "ours.pth")
    _check_started(dst, before, src, report)
    assert report.kind == "ours" and report.path == tmp_path / "ours.pth"
    summary = report.summary()
    assert "our checkpoint" in summary and f"{report.loaded} tensors loaded" in summary
    assert "4 class-head tensors dropped" in summary and "class_embed.* 4" in summary
    assert "keep their initialisation" not in summary


@pytest.mark.parametrize("with_args", [True, False], ids=["official-training-file", "official-without-args"])
def test_official_file_loads_all_but_the_class_heads(tmp_path, with_args):
    src = _source()
    obj = {"model": _official_state(src), "epoch": 9}
    if with_args:
        obj["args"] = _official_args(tiny_model_config())
    torch.save(obj, tmp_path / "bifit.pth")
    dst = tiny_model(seed=1)
    before = _snapshot(dst)
    report = load_start_weights(dst, tmp_path / "bifit.pth")
    _check_started(dst, before, src, report)
    assert report.kind == "official"


def test_referformer_weights_leave_the_bifit_only_modules_initialised(tmp_path):
    src = _source()
    torch.save({"model": _official_state(src, drop_bifit_only=True)}, tmp_path / "referformer.pth")
    dst = tiny_model(seed=1)
    before = _snapshot(dst)
    kept = [k for k in before if k.startswith(BIFIT_ONLY)]
    assert {p for p in BIFIT_ONLY if any(k.startswith(p) for k in kept)} == set(BIFIT_ONLY)  # all three modules
    report = load_start_weights(dst, tmp_path / "referformer.pth")
    _check_started(dst, before, src, report, kept=kept)
    summary = report.summary()
    assert f"{len(kept)} tensors keep their initialisation" in summary and "ReferFormer-style" in summary
    assert "vl_interaction.sentence_pool.* 2" in summary and "transformer.decoder.inter_frame.layers.*" in summary


def test_a_file_with_some_bifit_only_modules_must_have_them_all(tmp_path):
    state = {k: v for k, v in _official_state(_source()).items() if not k.startswith("poolout_module.")}
    torch.save({"model": state}, tmp_path / "partial.pth")
    dst = tiny_model(seed=1)
    before = _snapshot(dst)
    with pytest.raises(ValueError, match=r"partial.pth: does not match the model\n  2 missing keys: "
                                         r"vl_interaction.sentence_pool.dense.bias, "
                                         r"vl_interaction.sentence_pool.dense.weight"):
        load_start_weights(dst, tmp_path / "partial.pth")
    assert all(torch.equal(v, before[k]) for k, v in dst.state_dict().items())  # nothing loaded


def test_an_unexpected_key_is_refused(tmp_path):
    state = dict(_source().state_dict(), **{"extra_head.weight": torch.zeros(2, 2)})
    _save_ours(tmp_path / "extra.pth", state)
    with pytest.raises(ValueError, match=r"extra.pth: does not match the model\n  1 unexpected keys: "
                                         r"extra_head.weight\n.*another architecture"):
        load_start_weights(tiny_model(seed=1), tmp_path / "extra.pth")


def test_another_architecture_is_refused_with_its_shapes(tmp_path):
    cfg = tiny_model_config(hidden_dim=32)
    _save_ours(tmp_path / "narrow.pth", tiny_model(seed=0, hidden_dim=32), cfg)
    dst = tiny_model(seed=1)
    before = _snapshot(dst)
    with pytest.raises(ValueError) as err:
        load_start_weights(dst, tmp_path / "narrow.pth")
    msg = str(err.value)
    assert "narrow.pth: does not match the model" in msg and " shape mismatches: " in msg and " ..." in msg  # first 20
    assert "bbox_embed.0.layers.0.weight: checkpoint (32, 32) vs model (64, 64)" in msg
    assert "the checkpoint was trained with another architecture" in msg
    assert "(hidden_dim: 32 in the file, 64 here)" in msg
    assert all(torch.equal(v, before[k]) for k, v in dst.state_dict().items())  # nothing loaded
    # one key of another shape, named with both shapes
    _save_ours(tmp_path / "queries.pth", tiny_model(seed=0, num_queries=4), tiny_model_config(num_queries=4))
    with pytest.raises(ValueError, match=r"queries.pth: does not match the model\n  1 shape mismatches: "
                                         r"query_embed.weight: checkpoint \(4, 64\) vs model \(3, 64\)\n  the "
                                         r"checkpoint was trained with another architecture than this model "
                                         r"\(num_queries: 4 in the file, 3 here\)"):
        load_start_weights(dst, tmp_path / "queries.pth")
    # an official file: the same refusal (its weights say it)
    torch.save({"model": _official_state(tiny_model(seed=0, num_queries=4))}, tmp_path / "queries_official.pth")
    with pytest.raises(ValueError, match=r"queries_official.pth: does not match the model\n  1 shape mismatches: "
                                         r"query_embed.weight: checkpoint \(4, 64\) vs model \(3, 64\)\n.*another "
                                         r"architecture"):
        load_start_weights(dst, tmp_path / "queries_official.pth")
    assert all(torch.equal(v, before[k]) for k, v in dst.state_dict().items())


def test_a_missing_key_is_refused(tmp_path):
    state = _source().state_dict()
    del state["query_embed.weight"]
    _save_ours(tmp_path / "missing.pth", state)
    with pytest.raises(ValueError, match=r"missing.pth: does not match the model\n  1 missing keys: "
                                         r"query_embed.weight\n"):
        load_start_weights(tiny_model(seed=1), tmp_path / "missing.pth")
    # the text encoder is not optional either
    state = {k: v for k, v in _official_state(_source()).items() if not k.startswith("text_encoder.")}
    torch.save({"model": state}, tmp_path / "no_text.pth")
    with pytest.raises(ValueError, match=r"no_text.pth: does not match the model\n  \d+ missing keys: text_encoder\."):
        load_start_weights(tiny_model(seed=1), tmp_path / "no_text.pth")


class _RunsCode:
    def __reduce__(self):
        return (print, ("ran",))


def test_files_that_are_not_checkpoints_get_the_loaders_errors(tmp_path):
    model = tiny_model(seed=1)
    with pytest.raises(FileNotFoundError, match=r"none.pth: file not found"):
        load_start_weights(model, tmp_path / "none.pth")
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match=r"notes.txt: refused or unreadable with weights_only=True"):
        load_start_weights(model, tmp_path / "notes.txt")
    with open(tmp_path / "evil.pth", "wb") as fh:
        pickle.dump({"model": {"x": _RunsCode()}}, fh, protocol=2)
    with pytest.raises(CheckpointError, match="evil.pth: refused or unreadable with weights_only=True"):
        load_start_weights(model, tmp_path / "evil.pth")
    torch.save({"optimizer": {}, "epoch": 3}, tmp_path / "optimizer.pth")
    with pytest.raises(CheckpointError, match=r"optimizer.pth: expected a dict with a 'model' entry or a bare state "
                                              r"dict, found \['optimizer', 'epoch'\] \(neither a bifit-checkpoint-v1"):
        load_start_weights(model, tmp_path / "optimizer.pth")
