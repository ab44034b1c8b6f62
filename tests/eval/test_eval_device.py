"""eval.device / eval.amp: settings, device resolution, the evaluate stage honouring them, and bfloat16 autocast
with float32 thresholding in every inference function (CPU; tests/eval/test_inference_cuda.py runs on a GPU)."""

import json
import logging
import re

import numpy as np
import pytest
import torch
import yaml

from bifit.config import ConfigError, load_config
from bifit.inference import float32_outputs, inference_autocast, predict_video, resolve_device
from tests.conftest import REPO, tiny_model
from tests.eval.fakes import BackgroundModel, WordTokenizer


def _no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


# ----------------------------------------------------------------------------------------------------------------
# settings and resolution


def test_defaults_and_bad_values_name_the_key():
    from pipeline.config import PipelineConfig

    def load(**overrides):
        return load_config(REPO / "params.yaml", overrides=overrides, cls=PipelineConfig)

    assert (load().eval.device, load().eval.amp) == ("auto", False)
    assert (load(**{"eval.device": "cpu", "eval.amp": True}).eval.amp) is True
    with pytest.raises(ConfigError, match=r"params.yaml: eval.device: expected one of 'auto', 'cpu', 'cuda', "
                                          r"got 'gpu'"):
        load(**{"eval.device": "gpu"})
    with pytest.raises(ConfigError, match=r"params.yaml: eval.amp: expected true or false, got 'yes'"):
        load(**{"eval.amp": "yes"})


def test_auto_is_cpu_without_a_gpu_and_cuda_with_one(monkeypatch):
    _no_gpu(monkeypatch)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cpu") == torch.device("cpu")


def test_cuda_without_a_gpu_is_refused_naming_the_key(monkeypatch):
    _no_gpu(monkeypatch)
    with pytest.raises(ConfigError, match=r"^eval.device: 'cuda' asks for a GPU but torch sees none .* set "
                                          r"eval.device to auto or cpu"):
        resolve_device("cuda")
    with pytest.raises(ConfigError, match=r"^p.yaml: eval.device: 'cuda' asks for a GPU"):
        resolve_device("cuda", "p.yaml: eval.device")
    with pytest.raises(ConfigError, match=r"^eval.device: expected one of auto, cpu, cuda, got 'tpu'"):
        resolve_device("tpu")


# ----------------------------------------------------------------------------------------------------------------
# the evaluate stages


def _toy_params(tmp_path, **eval_settings):
    from tests.pipeline.test_chain import _params

    path = _params(tmp_path)
    raw = yaml.safe_load(path.read_text())
    raw["eval"].update(eval_settings)
    path.write_text(yaml.safe_dump(raw))
    return path


def _fake_checkpoint_loading(monkeypatch, loaded: list):
    """bifit.load_model without files: one of our checkpoints recording the toy config, a tiny CPU model, the word
    tokenizer."""
    import transformers

    import bifit.loading
    import bifit.models
    from bifit.config import to_dict
    from bifit.loading import OUR_FORMAT
    from pipeline.config import PipelineConfig

    def safe_load(path):
        loaded.append(path)
        return {"format": OUR_FORMAT, "model": {}, "config": to_dict(PipelineConfig())}

    monkeypatch.setattr(bifit.loading, "safe_load", safe_load)
    monkeypatch.setattr(bifit.loading, "load_state_dict_strict", lambda *a: None)
    monkeypatch.setattr(bifit.models, "build_model", lambda cfg: tiny_model(seed=0))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: WordTokenizer())


@pytest.mark.parametrize("dataset", ["ytvos_proxy", "ytvos"])
def test_evaluate_stage_refuses_cuda_without_a_gpu_before_reading_the_checkpoint(tmp_path, monkeypatch, dataset):
    from pipeline import evaluate_dataset

    _no_gpu(monkeypatch)
    loaded = []
    _fake_checkpoint_loading(monkeypatch, loaded)
    params = _toy_params(tmp_path, device="cuda")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(params))}: eval.device: 'cuda' asks for a GPU"):
        evaluate_dataset.main(["--params", str(params), "--dataset", dataset])
    assert loaded == [] and not (tmp_path / "metrics").exists()


def test_evaluate_dataset_moves_the_model_to_the_resolved_device_and_records_it(tmp_path, monkeypatch):
    """The model's parameters are on eval.device when the evaluation runs ('meta' stands in for a GPU here), and
    the metrics file says where and how the numbers were computed."""
    import pipeline.evaluate_dataset as stage
    from pipeline.config import load_pipeline_config

    _fake_checkpoint_loading(monkeypatch, [])
    seen = []

    def evaluator(cfg, model, tokenizer, pred_dir, plot):
        seen.append(next(model.parameters()).device)
        return {"jf": 0.25}

    def resolve_device(name, key):
        assert (name, key) == ("cuda", "params.yaml: eval.device")
        return torch.device("meta")

    monkeypatch.setattr(stage, "resolve_device", resolve_device)
    monkeypatch.setitem(stage.EVALUATORS, "ytvos_proxy", evaluator)
    cfg = load_pipeline_config(_toy_params(tmp_path, device="cuda", amp=True))
    (tmp_path / "models").mkdir()
    (tmp_path / "models/bifit.pth").write_bytes(b"")  # the checkpoint file must exist; its loading is faked
    cfg.datasets.ytvos_proxy.checkpoint = str(tmp_path / "models/bifit.pth")
    metrics = stage.evaluate_dataset(cfg, "ytvos_proxy", use_mlflow=False)
    assert seen == [torch.device("meta")]
    saved = json.loads((tmp_path / "metrics/ytvos_proxy.json").read_text())
    assert saved == metrics and (saved["device"], saved["amp"], saved["jf"]) == ("meta", True, 0.25)


def test_mlflow_params_record_device_and_amp_and_a_rerun_otherwise_becomes_tags(tmp_path, caplog):
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import log_eval_settings

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    run_id = client.create_run(client.create_experiment("x", artifact_location=tmp_path.as_uri())).info.run_id
    caplog.set_level(logging.WARNING, logger="pipeline.tracking")
    log_eval_settings(uri, run_id, "davis", {"device": "cpu", "amp": False})
    log_eval_settings(uri, run_id, "davis", {"device": "cpu", "amp": False})  # the same values: no conflict
    assert "already records" not in caplog.text
    log_eval_settings(uri, run_id, "davis", {"device": "cuda", "amp": True})
    data = client.get_run(run_id).data
    assert {k: v for k, v in data.params.items() if k.startswith("davis_")} == {
        "davis_eval_device": "cpu", "davis_eval_amp": "False"}
    assert (data.tags["davis_eval_device"], data.tags["davis_eval_amp"]) == ("cuda", "True")
    assert "already records other evaluation settings" in caplog.text


# ----------------------------------------------------------------------------------------------------------------
# autocast in the inference functions


class BFloat16Model(BackgroundModel):
    """BackgroundModel whose outputs are bfloat16, as the real model's are under autocast, and which records
    whether each call ran under CPU bfloat16 autocast."""

    def __init__(self):
        super().__init__()
        self.autocast = []

    def _record(self):
        self.autocast.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)

    def encode_visual(self, clip, mask):
        self._record()
        return super().encode_visual(clip, mask)

    def forward(self, images, image_mask, input_ids, attention_mask, sizes, with_aux=False, visual=None):
        self._record()
        if visual is None:  # a whole-clip call (describe_video)
            visual = super().encode_visual(images, image_mask)
        out = super().forward(images, image_mask, input_ids, attention_mask, sizes, with_aux, visual)
        out["pred_boxes"] = torch.full((*out["pred_logits"].shape[:3], 4), 0.5)
        return {k: v.to(torch.bfloat16) for k, v in out.items()}


def _spy_on_masks(monkeypatch, module) -> list:
    """Record the dtypes of the logits that `module.video_masks` thresholds."""
    from bifit.models.postprocess import video_masks

    dtypes = []

    def spy(outputs, *args, **kwargs):
        dtypes.append((outputs["pred_logits"].dtype, outputs["pred_masks"].dtype))
        return video_masks(outputs, *args, **kwargs)

    monkeypatch.setattr(module, "video_masks", spy)
    return dtypes


def _run_predict_video(model, amp):
    return predict_video(model, WordTokenizer(), torch.zeros(4, 3, 32, 48), ["a b", "c"], (32, 48), window=2,
                         batch=1, amp=amp)


def _run_label_maps(model, amp):
    from bifit.eval.ref_davis import predict_label_maps

    return predict_label_maps(model, WordTokenizer(), torch.zeros(4, 3, 32, 48), [["a", "b"]], (32, 48),
                              clip_length=2, batch=1, amp=amp)


def _run_describe_video(model, amp):
    from bifit.qualitative import describe_video

    return describe_video(model, WordTokenizer(), torch.zeros(2, 3, 32, 48), "a b", (32, 48), amp=amp)


@pytest.mark.parametrize("module, run", [("bifit.inference", _run_predict_video),
                                         ("bifit.eval.ref_davis", _run_label_maps),
                                         ("bifit.qualitative", _run_describe_video)],
                         ids=["predict_video", "predict_label_maps", "describe_video"])
@pytest.mark.parametrize("amp", [False, True])
def test_amp_runs_the_model_under_bfloat16_autocast_and_thresholds_float32(monkeypatch, module, run, amp):
    import importlib

    dtypes = _spy_on_masks(monkeypatch, importlib.import_module(module))
    model = BFloat16Model()
    run(model, amp)
    assert model.autocast and all(a == amp for a in model.autocast)
    assert dtypes and set(dtypes) == {(torch.float32, torch.float32)}


def test_helpers_autocast_only_when_asked_and_upcast_only_floating_tensors():
    with inference_autocast(torch.device("cpu"), False):
        assert not torch.is_autocast_enabled("cpu")
    with inference_autocast(torch.device("cpu"), True):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        y = torch.nn.functional.linear(torch.ones(2, 3), torch.ones(4, 3))
    assert y.dtype == torch.bfloat16
    out = float32_outputs({"pred_masks": y, "ids": torch.ones(2, dtype=torch.long), "aux": [y]})
    assert out["pred_masks"].dtype == torch.float32 and out["ids"].dtype == torch.long and out["aux"][0] is y


def test_tiny_model_bfloat16_masks_agree_with_float32_on_cpu():
    """The real model under CPU autocast: the same query per window and nearly the same pixels (an untrained
    model's logits sit near the threshold, so a few pixels may flip; J&F on tiny data is too noisy to compare)."""
    torch.manual_seed(1)
    frames = torch.randn(3, 3, 64, 96)
    captions = ["red square left", "blue circle", "the big one"]
    model = tiny_model(seed=1).eval()
    fp32 = predict_video(model, WordTokenizer(), frames, captions, (64, 96), batch=2)
    bf16 = predict_video(model, WordTokenizer(), frames, captions, (64, 96), batch=2, amp=True)
    for a, b in zip(fp32, bf16):
        assert b.masks.dtype == torch.bool and b.masks.shape == (3, 64, 96) and b.masks.device.type == "cpu"
        assert 0.05 < a.masks.float().mean() < 0.95  # a mixed mask, so agreement means something
        assert a.queries == b.queries
        assert np.mean((a.masks == b.masks).numpy()) > 0.97
        assert b.scores == pytest.approx(a.scores, abs=2e-3)
