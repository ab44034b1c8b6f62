"""RefCOCO/+/g through the pipeline stages at toy size: download (synthetic copy) -> preprocess (refer conversion)
-> evaluate (the three val splits, MLflow) -> summary; and a refs pickle that imports something stops preprocess."""

import csv
import json
import os
import pickle
import shutil

import pytest
import yaml

from tests.pipeline.test_chain import _params

IMAGE_DATASETS = ("refcoco", "refcoco+", "refcocog")
SYNTHETIC = {"seed": 3, "num_train_images": 1, "num_val_images": 2, "num_test_images": 1, "frames_per_video": 4,
             "expressions_per_object": 1}


def _refcoco_params(tmp, root, prepared=None):
    path = _params(tmp)
    raw = yaml.safe_load(path.read_text())
    raw["datasets"] = {"prepared": str(prepared or tmp / "prepared"), "status": str(tmp / "status"),
                       "refcoco": {"root": str(root), "checkpoint": str(tmp / "models/tiny.pth"),
                                   "datasets": list(IMAGE_DATASETS), "synthetic": SYNTHETIC}}
    raw["eval"]["batch_expressions"] = 8
    raw["text_encoder_assets"]["pretrain_steps"] = 0  # an untrained encoder will do: the numbers are not judged
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    import pipeline.config
    from bifit.checkpoint import save_checkpoint
    from bifit.config import to_dict
    from bifit.data.collate import normalize_text
    from bifit.models import build_model
    from bifit.synthetic import write_text_encoder_assets
    from pipeline import download, evaluate_dataset, preprocess, summary
    from pipeline.config import load_pipeline_config

    tmp = tmp_path_factory.mktemp("refcoco")
    params = _refcoco_params(tmp, tmp / "eval/coco")
    with pytest.MonkeyPatch.context() as mp:  # the toy params' MLflow store, whatever the shell has set
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.setattr(pipeline.config, "USER_MLFLOW_TRACKING_URI", None)
        cfg = load_pipeline_config(params)
        report = download.download(cfg, "refcoco", progress=False)
        # the tiny text encoder, its vocabulary from the synthetic RefCOCO sentences
        corpus = [normalize_text(s["sent"]) for d in IMAGE_DATASETS for r in _refs(tmp / "eval/coco", d)
                  for s in r["sentences"]]
        write_text_encoder_assets(tmp / "synthetic/te", corpus, cfg.text_encoder_assets)
        prepared = preprocess.preprocess(cfg, "refcoco", progress=False)
        save_checkpoint(tmp / "models/tiny.pth", build_model(cfg.model), to_dict(cfg), epoch=0)
        metrics = evaluate_dataset.evaluate_dataset(cfg, "refcoco")
        text = summary.main(["--params", str(params)])
    return tmp, cfg, report, prepared, metrics, text


def _refs(root, dataset):
    from bifit.prepare.refcoco import SPLIT_BY, load_refs, refs_name

    return load_refs(root / dataset / refs_name(SPLIT_BY[dataset]))


def _val_sentences(report, dataset):
    return report["synthetic"]["datasets"][dataset]["val"]["sentences"]


def test_download_writes_and_verifies_the_synthetic_copy_once(stages):
    from pipeline import download

    tmp, cfg, report, _, _, _ = stages
    status = json.loads((tmp / "status/refcoco.json").read_text())
    assert status["ok"] is True and status["problems"] == [] and status["source"] == "synthetic"
    assert status["found"]["train2014"]["count"] == 1 + 2 + 2 * 1  # train + val + testA + testB images
    assert status["found"]["refcoco+/refs(unc).p"] and status["found"]["refcocog/refs(umd).p"]
    assert all(_val_sentences(report, d) >= 2 for d in IMAGE_DATASETS)  # at least one sentence per val image
    sums = (tmp / "status/refcoco.sha256").read_text()
    assert "  refcocog/instances.json\n" in sums
    stamp = (tmp / "eval/coco/refcoco/instances.json").stat().st_mtime_ns
    text = (tmp / "status/refcoco.json").read_text()
    download.download(cfg, "refcoco", progress=False)  # same config: not generated again, same report
    assert (tmp / "eval/coco/refcoco/instances.json").stat().st_mtime_ns == stamp
    assert (tmp / "status/refcoco.json").read_text() == text


def test_preprocess_converts_every_dataset(stages):
    tmp, _, report, prepared, _, _ = stages
    index = json.loads((tmp / "prepared/refcoco/index.json").read_text())
    assert index == prepared
    assert index["raw_root"] == os.path.relpath(tmp / "eval/coco", tmp / "prepared")
    assert list(index["datasets"]) == list(IMAGE_DATASETS)
    assert index["datasets"]["refcocog"]["split_by"] == "umd"
    assert set(index["datasets"]["refcocog"]["splits"]) == {"train", "val", "test"}
    assert set(index["datasets"]["refcoco+"]["splits"]) == {"train", "val", "testA", "testB"}
    for dataset in IMAGE_DATASETS:
        for split, counts in report["synthetic"]["datasets"][dataset].items():
            ann = json.loads((tmp / f"prepared/refcoco/{dataset}/instances_{dataset}_{split}.json").read_text())
            assert len(ann["images"]) == len(ann["annotations"]) == counts["sentences"], (dataset, split)
            assert index["datasets"][dataset]["splits"][split]["sentences"] == counts["sentences"]
            assert index["datasets"][dataset]["splits"][split]["refs"] == counts["refs"]
    assert not list((tmp / "prepared").glob(".*partial*"))


def test_evaluation_writes_per_dataset_metrics_plot_and_mlflow(stages):
    import mlflow
    from mlflow.tracking import MlflowClient

    tmp, _, report, _, metrics, _ = stages
    assert json.loads((tmp / "metrics/refcoco.json").read_text()) == metrics
    for dataset in IMAGE_DATASETS:
        m = metrics[dataset]
        assert 0 <= m["overall_iou"] <= 1 and 0 <= m["mean_iou"] <= 1
        assert all(0 <= m[f"P@{k}"] <= 1 for k in (0.5, 0.6, 0.7, 0.8, 0.9))
        assert m["num_samples"] == _val_sentences(report, dataset) and m["num_skipped"] == 0
        assert (tmp / f"refcoco_val/{dataset}/per_sample.csv").is_file()  # next to paths.predictions
    for key in ("overall_iou", "mean_iou"):  # unweighted mean over the datasets
        assert metrics[key] == pytest.approx(sum(metrics[d][key] for d in IMAGE_DATASETS) / 3)
    assert metrics["averaged_over"] == list(IMAGE_DATASETS)
    assert metrics["num_samples"] == sum(_val_sentences(report, d) for d in IMAGE_DATASETS)
    assert metrics["device"] in ("cpu", "cuda") and metrics["amp"] is False
    with (tmp / "plots/refcoco_precision.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 5 and list(rows[0]) == ["iou_threshold", *IMAGE_DATASETS]  # a column per dataset
    for row in rows:
        for dataset in IMAGE_DATASETS:
            assert float(row[dataset]) == pytest.approx(metrics[dataset][f"P@{row['iou_threshold']}"])
    assert [float(r["iou_threshold"]) for r in rows] == [0.5, 0.6, 0.7, 0.8, 0.9]
    mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
    runs = MlflowClient().search_runs([e.experiment_id for e in MlflowClient().search_experiments()])
    [run] = [r for r in runs if r.info.run_name == "evaluate-refcoco"]
    logged = run.data.metrics
    assert logged["refcoco_refcocoplus_overall_iou"] == pytest.approx(metrics["refcoco+"]["overall_iou"])
    assert logged["refcoco_refcocog_P@0.5".replace("@", "_")] == pytest.approx(metrics["refcocog"]["P@0.5"])
    assert logged["refcoco_mean_iou"] == pytest.approx(metrics["mean_iou"])
    assert not [k for k in logged if "+" in k or "averaged_over" in k]
    assert run.data.params["refcoco_eval_amp"] == "False"


def test_mlflow_names_flatten_nested_metrics():
    from pipeline.evaluate_dataset import mlflow_metrics

    assert mlflow_metrics("refcoco", {"refcoco+": {"overall_iou": 0.5, "num_samples": 4, "note": "x"},
                                      "mean_iou": 0.25, "amp": False, "device": "cpu", "averaged_over": ["a"]}) \
        == {"refcoco_refcocoplus_overall_iou": 0.5, "refcoco_refcocoplus_num_samples": 4, "refcoco_mean_iou": 0.25}
    assert mlflow_metrics("a2d", {"mAP 0.5:0.95": 0.3}) == {"a2d_mAP 0.5:0.95": 0.3}  # the store renames ":"


def test_summary_rows_per_dataset_without_paper_numbers(stages):
    tmp, _, _, _, metrics, text = stages
    assert (tmp / "metrics/summary.md").read_text() == text
    for dataset, title in (("refcoco", "RefCOCO val"), ("refcoco+", "RefCOCO+ val"), ("refcocog", "RefCOCOg val")):
        ours = f"{100 * metrics[dataset]['overall_iou']:.1f}"
        assert f"| {title} | Overall IoU | {ours} |  |  | synthetic (not comparable) |" in text
        assert f"| {title} | Mean IoU | {100 * metrics[dataset]['mean_iou']:.1f} |  |  |" in text
        assert f"| {title} | P@0.5 | " in text
    assert "BIFIT reports no RefCOCO numbers" in text
    # the other evaluations did not run here: listed as missing, never filled in
    assert text.count("| missing |") == 5 and "metrics/a2d.json is missing" in text


def test_summary_lists_a_missing_refcoco_file(tmp_path):
    from pipeline import summary
    from pipeline.config import load_pipeline_config

    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"paths": {"metrics": str(tmp_path / "metrics")}}))
    text = summary.render(*summary.summary_rows(load_pipeline_config(tmp_path / "params.yaml")))
    assert "| RefCOCO/+/g val | (no metrics file) | missing |" in text
    assert "metrics/refcoco.json is missing: run `dvc repro evaluate@refcoco`" in text


class _Imports:
    """Unpickling this runs a shell command (what a malicious refs file would do)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_refs_pickle_that_imports_stops_preprocess(stages, tmp_path):
    from bifit.prepare.refcoco import UnsafePickleError
    from pipeline import preprocess
    from pipeline.config import load_pipeline_config

    tmp = stages[0]
    root = shutil.copytree(tmp / "eval/coco", tmp_path / "coco")
    refs = root / "refcoco+/refs(unc).p"
    marker = tmp_path / "ran"
    refs.write_bytes(pickle.dumps([{"ref_id": 0, "payload": _Imports(marker)}], protocol=2))
    cfg = load_pipeline_config(_refcoco_params(tmp_path, root, prepared=tmp_path / "prepared"))
    with pytest.raises(UnsafePickleError, match="refused to unpickle") as err:
        preprocess.preprocess(cfg, "refcoco", progress=False)
    assert str(refs) in str(err.value) and "system" in str(err.value)
    assert not marker.exists()  # nothing was run
    # all or nothing: the refcoco conversion that succeeded first is not left behind, nor a partial folder
    assert not (tmp_path / "prepared/refcoco").exists()
    assert not list((tmp_path / "prepared").glob(".*"))
