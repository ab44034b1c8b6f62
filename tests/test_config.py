import copy

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


# ---------------------------------------------------------------------------------------------------------------
# validation: one way (`validate(where)` with `check`) for every configuration dataclass


def test_frozen_settings_are_validated_when_built_and_named_by_their_params_key(tmp_path):
    from bifit.synthetic.config import SyntheticConfig
    from pipeline.config import PipelineConfig

    with pytest.raises(ConfigError, match=r"^SyntheticConfig\.height: expected a multiple of 32 in \[96, 2048\], "
                                          r"got 100$"):
        SyntheticConfig(height=100)
    path = _write(tmp_path, "synthetic:\n  height: 100\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, cls=PipelineConfig)
    assert str(err.value) == (f"{path}: synthetic: SyntheticConfig.height: expected a multiple of 32 in [96, 2048], "
                              "got 100")
    path = _write(tmp_path, "datasets:\n  davis:\n    synthetic:\n      width: 100\n")
    with pytest.raises(ConfigError, match=r"datasets\.davis\.synthetic: SyntheticDavisConfig\.width: expected a "
                                          r"multiple of 32, got 100"):
        load_config(path, cls=PipelineConfig)


def test_every_configuration_dataclass_has_a_validate_method():
    import dataclasses
    import typing

    from bifit.data.transforms import ResizeConfig
    from bifit.synthetic.text_pretraining import TextPretrainingConfig
    from pipeline.config import PathsConfig, PipelineConfig

    def walk(cls):
        yield cls
        for tp in typing.get_type_hints(cls).values():
            if dataclasses.is_dataclass(tp):
                yield from walk(tp)

    classes = set(walk(PipelineConfig)) | {TextPretrainingConfig, ResizeConfig}
    assert len(classes) > 15
    # PathsConfig: free-form paths, nothing to check
    assert not [c.__name__ for c in classes if not hasattr(c, "validate") and c is not PathsConfig]


@pytest.mark.parametrize("section,key,good,bad,message", [
    ("model", "mask_dim", 256, 128, r"model\.mask_dim: expected equal to model\.hidden_dim \(256\), got 128"),
    ("loss", "mask_out_stride", 4, 8, r"loss\.mask_out_stride: expected 4 \(masks are predicted at 1/4\), got 8"),
])
def test_keys_of_earlier_versions_load_only_with_their_one_value(section, key, good, bad, message):
    """Configs saved in earlier checkpoints still carry model.mask_dim and loss.mask_out_stride."""
    from bifit.config import Config, from_dict

    saved = to_dict(Config())
    saved[section][key] = good
    assert to_dict(from_dict(Config, saved).validate()) == to_dict(Config())
    saved[section][key] = bad
    with pytest.raises(ConfigError, match=message):
        from_dict(Config, saved)


def test_data_crop_probability_is_a_probability():
    from bifit.config import Config, from_dict

    saved = to_dict(Config())
    saved["data"]["crop_probability"] = 0.0
    assert from_dict(Config, saved).validate().data.crop_probability == 0.0
    saved["data"]["crop_probability"] = -0.1
    with pytest.raises(ConfigError, match=r"data\.crop_probability: expected a float in \[0, 1\], got -0\.1"):
        from_dict(Config, saved).validate()


def test_data_dataset_is_a_choice_of_video_training_set():
    from bifit.config import Config, from_dict

    saved = to_dict(Config())
    saved["data"]["dataset"] = "a2d"
    assert from_dict(Config, saved).validate().data.dataset == "a2d"
    saved["data"]["expressions_per_clip"] = 3
    with pytest.raises(ConfigError, match=r"data\.dataset: expected 'ytvos' with expressions_per_clip > 1"):
        from_dict(Config, saved).validate()
    saved["data"].update(dataset="kinetics", expressions_per_clip=1)
    with pytest.raises(ConfigError, match=r"data\.dataset: expected one of"):
        from_dict(Config, saved)


# ---------------------------------------------------------------------------------------------------------------
# paths and the training hash


def test_resolve_is_relative_to_the_repository_unless_absolute(tmp_path):
    from pipeline.config import resolve

    assert resolve("runs/x") == REPO / "runs" / "x"
    assert resolve(tmp_path / "y") == tmp_path / "y"


def test_training_hash_ignores_the_deformable_attention_kernel():
    from pipeline.config import load_pipeline_config

    cfg = load_pipeline_config(REPO / "params.yaml")
    before = cfg.training_hash()
    for backend in ("cpu", "pytorch", "auto"):
        cfg.model.msda_backend = backend
        assert cfg.training_hash() == before
    assert "msda_backend" not in cfg.training_dict()["model"]
    cfg.model.inter_frame_layers += 1  # a setting that changes the model does change it
    assert cfg.training_hash() != before


def test_training_hash_follows_the_ray_settings_that_change_the_result():
    """Another world size, thread count (CPU) or device trains another model: a rerun must not resume the run
    folder of the old settings. Where and how robustly it runs does not change the model."""
    from pipeline.config import load_pipeline_config
    from pipeline.train import run_dir

    cfg = load_pipeline_config(REPO / "params.yaml")
    assert not cfg.ray.use_gpu
    before, folder = cfg.training_hash(), run_dir(cfg)
    for name, value in (("max_failures", cfg.ray.max_failures + 3), ("storage_path", "/elsewhere/ray"),
                        ("address", "ray://head:10001")):
        other = copy.deepcopy(cfg)
        setattr(other.ray, name, value)
        assert other.training_hash() == before and run_dir(other) == folder, name
    for name, value in (("num_workers", cfg.ray.num_workers + 1), ("cpus_per_worker", cfg.ray.cpus_per_worker + 1),
                        ("use_gpu", True)):
        other = copy.deepcopy(cfg)
        setattr(other.ray, name, value)
        assert other.training_hash() != before and run_dir(other) != folder, name
    gpu = copy.deepcopy(cfg)
    gpu.ray.use_gpu = True
    more_threads = copy.deepcopy(gpu)
    more_threads.ray.cpus_per_worker += 1  # on GPU workers the threads only feed the host side
    assert more_threads.training_hash() == gpu.training_hash()


def test_training_hash_follows_the_training_code(tmp_path, monkeypatch):
    """A code change makes DVC rerun the stage; the rerun must train anew, not resume (and report) the run folder
    the old code trained. Caches and files that are not source do not count."""
    import pipeline.config as pc

    for name in ("bifit/models/head.py", "bifit/engine.py", "ops/csrc/kernel.cu", "pipeline/train.py"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(f"# {name}\n")
    (tmp_path / "pipeline" / "tune.py").write_text("# not training code\n")
    monkeypatch.setattr(pc, "REPO", tmp_path)
    cfg = load_config(REPO / "params.yaml", cls=pc.PipelineConfig)
    before = cfg.training_hash()
    assert cfg.training_dict()["source"] == pc.source_digest()
    (tmp_path / "bifit" / "models" / "__pycache__").mkdir()
    (tmp_path / "bifit" / "models" / "__pycache__" / "head.cpython-311.pyc").write_bytes(b"\0")
    (tmp_path / "ops" / "README.md").write_text("notes\n")
    (tmp_path / "pipeline" / "tune.py").write_text("# still not training code\n")
    assert cfg.training_hash() == before
    for name in ("bifit/models/head.py", "ops/csrc/kernel.cu", "pipeline/train.py"):
        path = tmp_path / name
        original = path.read_text()
        path.write_text(original + "x = 1\n")
        assert cfg.training_hash() != before, name
        path.write_text(original)
        assert cfg.training_hash() == before, name
    (tmp_path / "bifit" / "models" / "head.py").rename(tmp_path / "bifit" / "models" / "heads.py")  # a renamed file
    assert cfg.training_hash() != before


def test_training_hash_is_the_same_in_two_checkouts(tmp_path, monkeypatch):
    """Moving the checkout resumes the same run folder: paths inside the repository are hashed relative to it."""
    import pipeline.config as pc
    from pipeline.config import PipelineConfig

    hashes = []
    for checkout in (tmp_path / "one", tmp_path / "elsewhere" / "two"):
        (checkout / "data" / "synthetic" / "text-encoder").mkdir(parents=True)
        monkeypatch.setattr(pc, "REPO", checkout)
        cfg = load_config(REPO / "params.yaml", cls=PipelineConfig).resolve_paths()
        cfg.model.backbone_weights = "models/resnet18.pth"
        cfg.resolve_paths()
        assert cfg.data.root == str(checkout / "data/synthetic/ref-youtube-vos")
        assert cfg.model.text_encoder == str(checkout / "data/synthetic/text-encoder")
        assert cfg.model.backbone_weights == str(checkout / "models/resnet18.pth")
        training = cfg.training_dict()
        assert (training["data"]["root"], training["model"]["text_encoder"]) == (
            "data/synthetic/ref-youtube-vos", "data/synthetic/text-encoder")
        hashes.append(cfg.training_hash())
    assert hashes[0] == hashes[1]
    cfg.data.root = str(tmp_path / "other-data")  # data outside the checkout: its absolute path counts
    assert cfg.training_hash() != hashes[1]
