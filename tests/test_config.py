import pytest

from bifit.config import ConfigError, flatten, load_config, to_dict
from tests.conftest import REPO


def _write(tmp_path, text):
    p = tmp_path / "params.yaml"
    p.write_text(text)
    return p


def test_repository_params_load():
    """params.yaml carries the pipeline's sections too, so it loads through the pipeline's config class."""
    from pipeline.config import PipelineConfig

    cfg = load_config(REPO / "params.yaml", cls=PipelineConfig)
    assert cfg.model.hidden_dim % cfg.model.nheads == 0


def test_library_config_rejects_pipeline_sections_by_name(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['ray'\]"):
        load_config(_write(tmp_path, "ray:\n  num_workers: 2\n"))


@pytest.mark.parametrize("text,message", [
    ("model:\n  hiden_dim: 256\n", "model: unknown key(s) ['hiden_dim']"),
    ("model:\n  hidden_dim: '256'\n", "model.hidden_dim: expected an integer, got '256'"),
    ("model:\n  dropout: 1.5\n", "model.dropout: expected a float in [0, 1)"),
    ("model:\n  backbone: vgg\n", "model.backbone: expected one of 'resnet18'"),
    ("model:\n  inter_frame_layers: -1\n", "model.inter_frame_layers: expected an integer >= 0"),
    ("model:\n  hidden_dim: 100\n", "model.hidden_dim: expected a multiple of model.nheads"),
    ("model:\n  aux_loss: yes please\n", "model.aux_loss: expected true or false"),
    ("train:\n  lr_drop: [6, x]\n", "train.lr_drop[1]: expected an integer"),
    ("train:\n  lr: 0\n", "train.lr: expected a float > 0"),
    ("data:\n  max_size: 100\n", "data.max_size: expected >= the largest train scale"),
    ("data:\n  expressions_per_clip: 0\n", "data.expressions_per_clip: expected an integer >= 1"),
])
def test_invalid_values_name_the_file_and_key(tmp_path, text, message):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value) and message in str(err.value)


def test_ints_accepted_for_floats_and_flatten(tmp_path):
    cfg = load_config(_write(tmp_path, "train:\n  lr: 1\n  clip_max_norm: 2\nmodel:\n  dropout: 0\n"))
    assert type(cfg.train.lr) is float and cfg.train.lr == 1.0
    assert type(cfg.train.clip_max_norm) is float and type(cfg.model.dropout) is float
    flat = flatten(to_dict(cfg))
    assert flat["train.lr"] == 1.0 and flat["model.dropout"] == 0.0
    assert flat["model.hidden_dim"] == cfg.model.hidden_dim and "model" not in flat
    assert not any(isinstance(v, dict) for v in flat.values())


def test_not_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(_write(tmp_path, "- 1\n- 2\n"))
