"""bifit.load_model: the architecture a checkpoint was trained with (ours: its saved config; official files: their
args), not the current params.yaml; overrides of what does not change it; wrong files named."""

import argparse
import dataclasses

import pytest
import torch

from bifit import load_model
from bifit.checkpoint import CheckpointError, load_state_dict_strict, save_checkpoint, to_official_state_dict
from bifit.config import Config, ConfigError, to_dict
from bifit.loading import model_config_from_official_args
from bifit.models import build_model
from bifit.synthetic import text_encoder as tea
from tests.conftest import REPO, tiny_batch

CORPUS = ["the small blue square left of the circle", "the red triangle moving up", "a green diamond"]
OFFICIAL_ARGS = dict(  # official opts.py names (a tiny model), as an official training file's `args` holds them
    lr=5e-5, lr_backbone=1e-5, backbone="resnet18", dilation=False, two_stage=False, with_box_refine=True,
    hidden_dim=32, nheads=4, enc_layers=1, dec_layers=2, query_enc_layers=2, dim_feedforward=64, dropout=0.1,
    num_feature_levels=4, enc_n_points=4, dec_n_points=4, num_queries=2, mask_dim=32, controller_layers=3,
    dynamic_mask_channels=8, rel_coord=True, aux_loss=True, binary=True, freeze_text_encoder=True)


@pytest.fixture(scope="module")
def text_encoder(tmp_path_factory) -> str:
    cfg = tea.TinyTextEncoderConfig(vocab_size=300, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                    intermediate_size=64, max_position_embeddings=32, pretrain_steps=0)
    return str(tea.write_text_encoder_assets(tmp_path_factory.mktemp("te") / "text-encoder", CORPUS, cfg))


@pytest.fixture(scope="module")
def params_model(text_encoder):
    """The model section of the current params.yaml (with a text encoder that exists here)."""
    from pipeline.config import load_pipeline_config

    return dataclasses.replace(load_pipeline_config(REPO / "params.yaml").model, text_encoder=text_encoder)


def _outputs(model):
    images, mask, _, _, sizes, _ = tiny_batch(h=64, w=96)
    ids, attn = torch.tensor([[0, 5, 6, 7, 2]]), torch.ones(1, 5, dtype=torch.long)
    with torch.no_grad():
        return model(images, mask, ids, attn, sizes)["pred_masks"]


def _trained_elsewhere(params_model, path, text_encoder=None):
    """One of our checkpoints trained with another architecture than params.yaml's (and recording the text encoder
    `text_encoder`, default the one it was built with)."""
    trained = dataclasses.replace(params_model, hidden_dim=32, dec_layers=2, num_queries=2, inter_frame_layers=2,
                                  msda_backend="pytorch")
    torch.manual_seed(3)
    model = build_model(trained).eval()
    trained.text_encoder = text_encoder or trained.text_encoder
    save_checkpoint(path, model, to_dict(Config(model=trained)), epoch=4, mlflow_run_id="abc")
    return trained, model


def test_our_checkpoint_is_built_with_its_saved_architecture_not_params_yaml(params_model, tmp_path):
    trained, src = _trained_elsewhere(params_model, tmp_path / "ours.pth")
    assert (trained.hidden_dim, trained.num_queries) != (params_model.hidden_dim, params_model.num_queries)
    with pytest.raises(CheckpointError, match="ours.pth: does not match the model"):  # what the old loader did
        load_state_dict_strict(build_model(params_model), torch.load(tmp_path / "ours.pth")["model"],
                               f"checkpoint {tmp_path / 'ours.pth'}")
    loaded = load_model(tmp_path / "ours.pth", device="cpu")
    assert loaded.config == trained and not loaded.official and not loaded.model.training
    assert loaded.checkpoint["epoch"] == 4 and loaded.checkpoint["mlflow_run_id"] == "abc"
    assert "model" not in loaded.checkpoint and loaded.checkpoint["config"]["model"]["hidden_dim"] == 32
    assert next(loaded.model.parameters()).device == torch.device("cpu")
    torch.testing.assert_close(_outputs(loaded.model), _outputs(src), rtol=0, atol=0)
    assert loaded.tokenizer(["the red triangle"])["input_ids"][0][0] == 0  # <s>: the checkpoint's encoder's tokenizer


def test_a_text_encoder_missing_here_falls_back_and_overrides_change_only_non_architectural_settings(
        params_model, tmp_path):
    _trained_elsewhere(params_model, tmp_path / "moved.pth", text_encoder=str(tmp_path / "gone/text-encoder"))
    loaded = load_model(tmp_path / "moved.pth", {"msda_backend": "cpu"}, device=torch.device("cpu"),
                        text_encoder_fallback=params_model.text_encoder)
    assert loaded.config.text_encoder == params_model.text_encoder and loaded.config.msda_backend == "cpu"
    with pytest.raises(ValueError, match=r"\['num_queries'\] would change the architecture recorded in checkpoint "
                                         r".*moved.pth"):
        load_model(tmp_path / "moved.pth", {"num_queries": 5}, text_encoder_fallback=params_model.text_encoder)


def test_official_file_is_built_from_its_args(text_encoder, tmp_path):
    src_cfg = model_config_from_official_args(OFFICIAL_ARGS, text_encoder=text_encoder)
    assert (src_cfg.inter_frame_layers, src_cfg.num_queries, src_cfg.backbone) == (2, 2, "resnet18")
    torch.manual_seed(1)
    src = build_model(src_cfg).eval()
    state = to_official_state_dict(src.state_dict())
    assert "transformer.decoder.query_encoder_layers.1.linear1.weight" in state
    torch.save({"model": state, "args": argparse.Namespace(**OFFICIAL_ARGS), "epoch": 9}, tmp_path / "bifit_r18.pth")
    # the args name no text encoder (the official code loads roberta-base): a local copy is given instead
    loaded = load_model(tmp_path / "bifit_r18.pth", {"text_encoder": text_encoder}, device="cpu")
    assert loaded.official and loaded.config == dataclasses.replace(src_cfg, msda_backend="auto")
    assert loaded.checkpoint["epoch"] == 9 and loaded.checkpoint["args"].lr == 5e-5
    torch.testing.assert_close(_outputs(loaded.model), _outputs(src), rtol=0, atol=0)
    # args describing another architecture than the weights: every mismatch listed, the file named
    torch.save({"model": state, "args": argparse.Namespace(**{**OFFICIAL_ARGS, "query_enc_layers": 1})},
               tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match=r"other.pth: does not match the model\n.*unexpected keys: "
                                              r"transformer.decoder.inter_frame.layers.1"):
        load_model(tmp_path / "other.pth", {"text_encoder": text_encoder}, device="cpu")


def test_an_official_file_without_args_needs_its_architecture(text_encoder, tmp_path):
    src_cfg = model_config_from_official_args(OFFICIAL_ARGS, text_encoder=text_encoder)
    torch.save(to_official_state_dict(build_model(src_cfg).state_dict()), tmp_path / "bare.pth")
    with pytest.raises(CheckpointError, match=r"bare.pth: a bare state dict does not record its architecture"):
        load_model(tmp_path / "bare.pth", device="cpu")
    loaded = load_model(tmp_path / "bare.pth", device="cpu", architecture=src_cfg)
    assert loaded.official and loaded.config.inter_frame_layers == 2 and loaded.checkpoint == {}


def test_wrong_files_are_named(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"checkpoint .*none.pth: file not found"):
        load_model(tmp_path / "none.pth", device="cpu")
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match=r"notes.txt: refused or unreadable with weights_only=True"):
        load_model(tmp_path / "notes.txt", device="cpu")
    torch.save({"optimizer": {}, "epoch": 3}, tmp_path / "optimizer.pth")
    with pytest.raises(CheckpointError, match=r"optimizer.pth: expected a dict with a 'model' entry or a bare state "
                                              r"dict, found \['optimizer', 'epoch'\] \(neither a bifit-checkpoint-v1"):
        load_model(tmp_path / "optimizer.pth", device="cpu")
    torch.save({"format": "bifit-checkpoint-v1", "model": {}}, tmp_path / "no_config.pth")
    with pytest.raises(CheckpointError, match=r"no_config.pth: a bifit-checkpoint-v1 file without .* saved model "
                                              r"configuration"):
        load_model(tmp_path / "no_config.pth", device="cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="'cuda' asks for a GPU"):  # before the file is read
        load_model(tmp_path / "none.pth", device="cuda")
