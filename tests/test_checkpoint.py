import argparse
import pickle

import pytest
import torch

from bifit.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_official,
    save_checkpoint,
    to_official_state_dict,
)
from tests.conftest import tiny_batch, tiny_model


def _official_file(path, model, legacy=True, extra=True):
    state = to_official_state_dict(model.state_dict())
    state["text_encoder.embeddings.position_ids"] = torch.arange(32)[None]  # transformers < 4.31 files
    obj = {"model": state}
    if extra:
        obj.update(optimizer={"state": {}, "param_groups": []}, lr_scheduler={"milestones": {6: 1}}, epoch=3,
                   args=argparse.Namespace(lr=5e-5, backbone="resnet50"))
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    return state


def test_official_names_and_tied_heads():
    state = to_official_state_dict(tiny_model().state_dict())
    assert "backbone.0.body.layer1.0.conv1.weight" in state
    assert "text_fusion_module.multihead_attn.in_proj_weight" in state
    assert "fusion_module.multihead_attn.in_proj_weight" in state
    assert "poolout_module.dense.weight" in state
    assert "transformer.decoder.query_encoder_layers.0.linear1.weight" in state
    assert "transformer.decoder.decoder_layers.0.cross_attn.value_proj.weight" in state
    assert "controller.layers.2.bias" in state
    assert torch.equal(state["transformer.decoder.bbox_embed.1.layers.2.bias"], state["bbox_embed.1.layers.2.bias"])


def test_load_official_legacy_file_with_args_and_position_ids(tmp_path):
    src = tiny_model(seed=0).eval()
    _official_file(tmp_path / "checkpoint0003.pth", src)
    dst = tiny_model(seed=1).eval()
    rest = load_official(tmp_path / "checkpoint0003.pth", dst)
    assert rest["epoch"] == 3 and rest["args"].backbone == "resnet50"
    images, mask, ids, attn, sizes, _ = tiny_batch()
    with torch.no_grad():
        torch.testing.assert_close(src(images, mask, ids, attn, sizes)["pred_masks"],
                                   dst(images, mask, ids, attn, sizes)["pred_masks"], rtol=0, atol=0)


def test_load_official_bare_state_dict(tmp_path):
    src = tiny_model(seed=0)
    torch.save(to_official_state_dict(src.state_dict()), tmp_path / "bare.pth")
    dst = tiny_model(seed=1)
    load_official(tmp_path / "bare.pth", dst)
    assert torch.equal(dst.query_embed.weight, src.query_embed.weight)


def test_mismatch_lists_missing_unexpected_and_shapes(tmp_path):
    src = tiny_model(inter_frame_layers=2)
    state = _official_file(tmp_path / "other.pth", src, extra=False)
    del state
    dst = tiny_model(inter_frame_layers=1, num_queries=4)
    with pytest.raises(CheckpointError) as err:
        load_official(tmp_path / "other.pth", dst)
    msg = str(err.value)
    assert "other.pth" in msg and "unexpected keys" in msg and "inter_frame.layers.1." in msg
    assert "query_embed.weight: checkpoint (3, 64) vs model (4, 64)" in msg


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickle_that_runs_code_is_refused(tmp_path):
    with open(tmp_path / "evil.pth", "wb") as fh:
        pickle.dump({"model": {"x": _Evil()}}, fh)
    with pytest.raises(CheckpointError, match="weights_only"):
        load_official(tmp_path / "evil.pth", tiny_model())


def test_our_checkpoint_records_config_and_rejects_foreign_files(tmp_path):
    model = tiny_model()
    save_checkpoint(tmp_path / "ours.pth", model, {"model": {"hidden_dim": 64}}, epoch=1)
    ckpt = load_checkpoint(tmp_path / "ours.pth")
    assert ckpt["config"]["model"]["hidden_dim"] == 64 and ckpt["epoch"] == 1
    assert not list(tmp_path.glob(".ours.pth.*"))  # no temporary left behind
    torch.save({"model": model.state_dict()}, tmp_path / "plain.pth")
    with pytest.raises(CheckpointError, match="not a bifit-checkpoint-v1 file"):
        load_checkpoint(tmp_path / "plain.pth")


def test_save_checkpoint_from_a_state_dict_with_training_entries(tmp_path):
    """A checkpoint read back can be written again (the train stage's final model, Ray's restored copy)."""
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters())
    save_checkpoint(tmp_path / "a.pth", model, {"model": {}}, epoch=2, optimizer=optimizer.state_dict())
    first = load_checkpoint(tmp_path / "a.pth")
    entries = {k: v for k, v in first.items() if k not in ("format", "model", "config")}
    save_checkpoint(tmp_path / "b.pth", first["model"], first["config"], **entries)
    second = load_checkpoint(tmp_path / "b.pth")
    assert set(second) == {"format", "model", "config", "epoch", "optimizer"} and second["epoch"] == 2
    assert second["optimizer"]["param_groups"] == optimizer.state_dict()["param_groups"]
    assert all(torch.equal(second["model"][k], v) for k, v in model.state_dict().items())
    with pytest.raises(TypeError, match="'format' is set by the function"):
        save_checkpoint(tmp_path / "c.pth", model, {}, format="other")
    assert not (tmp_path / "c.pth").exists()
