"""The four benchmarks at toy size through the pipeline stages: download (synthetic and real paths), preprocess,
evaluate (five evaluations with MLflow), summary."""

import json
import shutil

import pytest
import yaml

from tests.pipeline.test_chain import _params

DATASETS = {
    "prepared": "{tmp}/prepared",
    "status": "{tmp}/status",
    "ytvos_proxy": {"fraction": 0.4, "checkpoint": "{tmp}/models/tiny.pth"},
    "ytvos": {"checkpoint": "{tmp}/models/tiny.pth"},
    "davis": {"root": "{tmp}/eval/ref-davis", "checkpoint": "{tmp}/models/tiny.pth", "clip_length": 4,
              "synthetic": {"num_train_videos": 1, "num_val_videos": 1, "frames_per_video": 4, "height": 96,
                            "width": 128}},
    "a2d": {"root": "{tmp}/eval/a2d_sentences", "checkpoint": "{tmp}/models/tiny.pth",
            "synthetic": {"num_train_videos": 1, "num_test_videos": 2, "frames_per_video": 6, "annotated_frames": 1}},
    "jhmdb": {"root": "{tmp}/eval/jhmdb_sentences", "checkpoint": "{tmp}/models/tiny.pth",
              "synthetic": {"num_videos": 2, "frames_per_video": 6}},
}


def _dataset_params(tmp, **changes):
    path = _params(tmp)
    raw = yaml.safe_load(path.read_text())
    datasets = json.loads(json.dumps(DATASETS).replace("{tmp}", str(tmp)))
    for key, value in changes.items():
        datasets[key] = {**datasets[key], **value}
    raw["datasets"] = datasets
    raw["train"]["batch_size"] = 2
    raw["eval"]["batch_expressions"] = 24
    raw["synthetic"].update(num_train_videos=3, num_valid_videos=1, num_test_videos=1)
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    from bifit.checkpoint import save_checkpoint
    from bifit.config import to_dict
    from bifit.models import build_model
    from pipeline import download, evaluate_dataset, generate, preprocess, summary
    from pipeline.config import load_pipeline_config

    tmp = tmp_path_factory.mktemp("datasets")
    params = _dataset_params(tmp)
    generate.main(["--params", str(params)])
    cfg = load_pipeline_config(params)
    reports = {n: download.download(cfg, n, progress=False) for n in ("ytvos", "davis", "a2d", "jhmdb")}
    prepared = {n: preprocess.preprocess(cfg, n, progress=False) for n in ("ytvos", "davis", "a2d", "jhmdb")}
    save_checkpoint(tmp / "models/tiny.pth", build_model(cfg.model), to_dict(cfg), epoch=0)
    metrics = {n: evaluate_dataset.evaluate_dataset(cfg, n) for n in
               ("ytvos", "ytvos_proxy", "davis", "a2d", "jhmdb")}
    text = summary.main(["--params", str(params)])
    return tmp, params, cfg, reports, prepared, metrics, text


def test_download_verifies_and_is_idempotent(stages):
    from pipeline import download

    tmp, _, cfg, reports, _, _, _ = stages
    assert all(r["ok"] and r["problems"] == [] for r in reports.values())
    assert reports["davis"]["found"]["DAVIS/JPEGImages/480p"] == {"count": 2, "expected": {"count": 2}}
    # both DAVIS zips carry DAVIS/README.md: extracted in the official order, the later zip's copy is kept
    assert reports["davis"]["synthetic"]["replaced"] == {"DAVIS-2017_semantics-480p.zip": ["DAVIS/README.md",
                                                                                          "DAVIS/SOURCES.md"]}
    assert (tmp / "eval/ref-davis/DAVIS/README.md").read_text().startswith("# DAVIS-2017_semantics-480p.zip")
    status = (tmp / "status/davis.json").read_text()
    stamp = (tmp / "eval/ref-davis/DAVIS/davis_semantics.json").stat().st_mtime_ns
    again = download.download(cfg, "davis", progress=False)
    assert (tmp / "status/davis.json").read_text() == status  # deterministic report: DVC sees no change
    assert (tmp / "eval/ref-davis/DAVIS/davis_semantics.json").stat().st_mtime_ns == stamp
    assert again["synthetic"]["val"] == reports["davis"]["synthetic"]["val"]
    sums = (tmp / "status/davis.sha256").read_text().splitlines()
    assert any(line.endswith("  davis_text_annotations/Davis17_annot2.txt") for line in sums)


def test_download_writes_nothing_into_the_data_it_verifies(stages):
    """The Ref-YouTube-VOS folder is the generate stage's DVC output: a file written into it (the checksum cache)
    would make every later `dvc repro` see generate's output changed and run it again."""
    from pipeline import download
    from pipeline.config import resolve

    tmp, _, cfg, _, _, _, _ = stages
    for name in ("ytvos", "davis", "a2d", "jhmdb"):
        root = download.dataset_root(cfg, name)
        assert not list(root.rglob(".bifit_checksums.json")), name
        assert (resolve(cfg.datasets.status) / f"{name}.checksum-cache.json").is_file()
    root = download.dataset_root(cfg, "ytvos")
    before = sorted((p.relative_to(root), p.stat().st_mtime_ns) for p in root.rglob("*"))
    download.download(cfg, "ytvos", progress=False)
    assert sorted((p.relative_to(root), p.stat().st_mtime_ns) for p in root.rglob("*")) == before


def test_real_source_prints_instructions_extracts_and_reports_every_problem(stages, tmp_path, capsys):
    from bifit.prepare.manifest import ManifestError
    from pipeline import download
    from pipeline.config import load_pipeline_config

    tmp, _, _, _, _, _, _ = stages
    real = tmp_path / "ref-davis"
    params = _dataset_params(tmp_path, davis={"source": "real", "root": str(real)})
    cfg = load_pipeline_config(params)
    with pytest.raises(ManifestError) as err:
        download.download(cfg, "davis", progress=False)
    out = capsys.readouterr().out
    assert f"davis_text_annotations.zip -> {real / 'davis_text_annotations.zip'} (by hand from https://www.mpi-inf" in out
    assert "DAVIS-2017-Unsupervised-trainval-480p.zip (fetchable: https://" in out
    assert f"{real / 'DAVIS/ImageSets/2017/val.txt'}: missing file" in str(err.value)
    status = json.loads((tmp_path / "status/davis.json").read_text())
    assert status["ok"] is False and len(status["problems"]) == len(err.value.problems) >= 9
    # with the (synthetic) zips placed as instructed they are extracted, and the counts are checked
    for name in ("DAVIS-2017-Unsupervised-trainval-480p.zip", "DAVIS-2017_semantics-480p.zip",
                 "davis_text_annotations.zip"):
        shutil.copy(tmp / "eval/ref-davis" / name, real / name)
    with pytest.raises(ManifestError) as err:
        download.download(cfg, "davis", progress=False)
    problems = "\n".join(err.value.problems)
    assert (real / "DAVIS/davis_semantics.json").is_file()
    assert "1 non-empty lines, expected 30" in problems  # val.txt: fixed by the release
    assert "2 sub-folders matching '*', expected at least 90" in problems  # more when test-dev is unzipped too
    assert "missing file" not in problems
    status = json.loads((tmp_path / "status/davis.json").read_text())
    assert status["obtained"]["replaced"] == {"DAVIS-2017_semantics-480p.zip": ["DAVIS/README.md",
                                                                                "DAVIS/SOURCES.md"]}


def _ytvos_zip(path, videos: dict[str, int]):
    """An archive with ``count`` empty video folders under each given folder (the official layout)."""
    import zipfile

    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        for folder, count in videos.items():
            for i in range(count):
                zf.writestr(zipfile.ZipInfo(f"{folder}/{i:010x}/"), b"")
    return path


def test_real_ytvos_download_as_the_official_archives_ship_it(tmp_path):
    from bifit.prepare.manifest import ManifestError
    from bifit.prepare.sources import YTVOS_PAGE
    from pipeline import download
    from pipeline.config import load_pipeline_config

    root = tmp_path / "ref-youtube-vos"
    _ytvos_zip(root / "downloads/train.zip", {"train/JPEGImages": 3471, "train/Annotations": 3471})  # no meta.json
    _ytvos_zip(root / "downloads/valid.zip", {"valid/JPEGImages": 202})  # the valid videos only, not all 507
    for split in ("train", "valid", "test"):
        (root / f"meta_expressions/{split}").mkdir(parents=True)
        (root / f"meta_expressions/{split}/meta_expressions.json").write_text('{"videos": {}}')
    params = _dataset_params(tmp_path, ytvos={"source": "real"})
    raw = yaml.safe_load(params.read_text())
    raw["data"]["root"] = str(root)
    params.write_text(yaml.safe_dump(raw))
    cfg = load_pipeline_config(params)
    with pytest.raises(ManifestError) as err:
        download.download(cfg, "ytvos", progress=False)
    [problem] = err.value.problems  # only meta.json, and it says where to get it
    assert problem.startswith(f"{root / 'train/meta.json'}: missing file")
    assert f"on {YTVOS_PAGE}, next to the train archive's JPEGImages/Annotations" in problem
    assert problem.endswith(f"download meta.json for train from that page and place it at {root / 'train/meta.json'}")
    assert json.loads((tmp_path / "status/ytvos.json").read_text())["problems"] == [problem]
    (root / "train/meta.json").write_text('{"videos": {}}')
    report = download.download(cfg, "ytvos", progress=False)
    assert report["ok"] and report["obtained"]["extracted"] == ["train.zip", "valid.zip"]
    status = json.loads((tmp_path / "status/ytvos.json").read_text())
    assert status["found"]["valid/JPEGImages"] == {"count": 202, "expected": {"min_count": 202}}
    assert status["found"]["train/JPEGImages"] == {"count": 3471, "expected": {"count": 3471}}


def test_preprocess_outputs(stages):
    tmp, _, _, _, prepared, _, _ = stages
    assert prepared["ytvos"]["proxy_videos"] == 1 and prepared["ytvos"]["valid_videos"] == 1
    assert (tmp / "prepared/ytvos/proxy_videos.txt").read_text().count("\n") == 1
    assert prepared["davis"]["valid_videos"] == 1 and (tmp / "prepared/davis/index.json").is_file()
    assert prepared["a2d"]["test_samples"] >= 2 and (tmp / "prepared/a2d/index_test.json").is_file()
    assert prepared["jhmdb"]["skipped"] == 0 and (tmp / "prepared/jhmdb/index.json").is_file()


def test_evaluations_write_metrics_plots_predictions_and_mlflow(stages):
    import mlflow
    import torch
    from mlflow.tracking import MlflowClient

    tmp, _, cfg, _, _, metrics, _ = stages
    auto_device = "cuda" if torch.cuda.is_available() else "cpu"  # eval.device: auto in the toy params
    for name, m in metrics.items():
        assert json.loads((tmp / f"metrics/{name}.json").read_text()) == m
        assert m["eval_seconds"] >= 0
        assert (m["device"], m["amp"]) == (auto_device, False)  # how the numbers were computed
    assert {"jf", "j", "f", "jf_shuffled"} <= set(metrics["ytvos"])
    assert metrics["ytvos_proxy"]["num_videos"] == 1 and metrics["ytvos_proxy"]["held_out_of_training"] == 1
    assert {"jf", "anno_0_jf", "anno_3_f"} <= set(metrics["davis"])
    assert not [k for k in metrics["davis"] if "per_expression" in k]  # unsupervised ids: no per-expression score
    assert not (tmp / "davis_valid/per_expression.csv").exists()
    assert {"mAP 0.5:0.95", "best-query-only mAP 0.5:0.95", "overall_iou", "P@0.9"} <= set(metrics["a2d"])
    assert metrics["jhmdb"]["num_samples"] == 6
    assert all(0 <= metrics[n][k] <= 1 for n in ("ytvos", "ytvos_proxy", "davis") for k in ("jf", "j", "f"))
    assert len(list((tmp / "pred").rglob("*.png"))) > 0  # paths.predictions of the toy params
    assert (tmp / "davis_valid/anno_3").is_dir() and (tmp / "a2d_test/per_sample.csv").is_file()
    assert (tmp / "plots/davis_per_video.csv").read_text().startswith("video,jf\n")
    assert (tmp / "plots/a2d_precision.csv").read_text().splitlines()[1].startswith("0.5,")
    mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
    runs = MlflowClient().search_runs([e.experiment_id for e in MlflowClient().search_experiments()])
    logged = {k for r in runs for k in r.data.metrics}
    assert {"davis_jf", "a2d_mAP 0.5_0.95", "jhmdb_overall_iou", "ytvos_proxy_jf", "ytvos_jf"} <= logged
    params = {k: v for r in runs for k, v in r.data.params.items()}
    assert {params[f"{n}_eval_device"] for n in metrics} == {auto_device}
    assert {params[f"{n}_eval_amp"] for n in metrics} == {"False"}


def test_evaluation_logs_to_the_training_run_else_to_a_new_run(tmp_path, monkeypatch, caplog):
    """log_to_mlflow without an evaluation: `<name>_` metrics, eval settings and files into the training run the
    checkpoint records; a run id the store does not know: a new `evaluate-<name>` run, with a warning."""
    import logging

    from pipeline import evaluate_dataset, tracking
    from pipeline.config import load_pipeline_config, resolve
    from tests.pipeline.test_tune import _hermetic_mlflow

    _hermetic_mlflow(monkeypatch)
    cfg = load_pipeline_config(_dataset_params(tmp_path))
    uri, where = cfg.mlflow.resolved_uri(), resolve(cfg.mlflow.artifact_location)
    c = tracking.client(uri)
    training = tracking.create_run(uri, cfg.mlflow.experiment, where, "train-x", {"model.hidden_dim": 32},
                                   {"stage": "train"})
    plot = tmp_path / "plots/a2d_precision.csv"
    plot.parent.mkdir()
    plot.write_text("iou_threshold,precision\n")
    metrics = {"mAP 0.5:0.95": 0.25, "P@0.5": 0.5, "num_samples": 6, "device": "cpu", "amp": False,
               "eval_seconds": 1.5, "overall_iou": float("nan")}
    assert evaluate_dataset.log_to_mlflow(cfg, "a2d", metrics, training, tmp_path / "m.pth",
                                          [plot, tmp_path / "absent.json"]) == training
    run = c.get_run(training)
    assert run.info.status == "FINISHED"
    assert run.data.metrics == {"a2d_mAP 0.5_0.95": 0.25, "a2d_P_0.5": 0.5, "a2d_num_samples": 6.0,
                                "a2d_eval_seconds": 1.5}
    assert run.data.params == {"model.hidden_dim": "32", "a2d_eval_device": "cpu", "a2d_eval_amp": "False"}
    assert tracking.artifact_paths(c, training, "eval/a2d") == ["eval/a2d/a2d_precision.csv"]

    caplog.set_level(logging.WARNING)
    new = evaluate_dataset.log_to_mlflow(cfg, "ytvos_proxy", {"jf": 0.5, "device": "cpu", "amp": True}, "0123abcd",
                                         tmp_path / "m.pth", [])
    assert f"training run 0123abcd not in {uri}" in caplog.text and "logging to a new run" in caplog.text
    run = c.get_run(new)
    assert (run.info.run_name, run.info.status) == ("evaluate-ytvos_proxy", "FINISHED")
    assert run.info.experiment_id == c.get_run(training).info.experiment_id
    assert run.data.params == {"checkpoint": str(tmp_path / "m.pth"), "dataset": "ytvos_proxy",
                               "source": "synthetic", "ytvos_proxy_eval_device": "cpu",
                               "ytvos_proxy_eval_amp": "True"}
    assert run.data.metrics == {"ytvos_proxy_jf": 0.5}


def test_summary_table(stages):
    _, _, _, _, _, metrics, text = stages
    assert "| Ref-DAVIS17 val (4 annotators averaged) | J&F | " in text
    assert "- Ref-DAVIS17: unsupervised protocol (Hungarian matching), mean of 4 annotator runs" in text
    assert f"{100 * metrics['davis']['jf']:.1f} | 60.5 | " in text
    assert "mAP (all queries: the paper's protocol)" in text and "synthetic (not comparable)" in text
    # header + ytvos, proxy, davis, a2d, jhmdb rows, and refcoco's "missing" row (not evaluated here)
    assert text.count("\n| ") == 4 + 3 + 3 + 6 + 6 + 1 + 1


def test_real_ytvos_writes_masks_for_the_server_and_the_package_stage_zips_them(stages, tmp_path, monkeypatch):
    import zipfile

    import bifit.data.ytvos as ytvos
    from pipeline import evaluate_dataset, package
    from pipeline.config import load_pipeline_config

    tmp, _, _, _, _, _, _ = stages
    root = shutil.copytree(tmp / "synthetic/ref-youtube-vos", tmp_path / "ref-youtube-vos")
    meta_path = root / "meta_expressions/valid/meta_expressions.json"
    meta = json.loads(meta_path.read_text())
    for video in meta["videos"].values():  # the real valid meta has no obj_id: no local ground truth
        for exp in video["expressions"].values():
            exp.pop("obj_id", None)
    meta_path.write_text(json.dumps(meta))
    params = _dataset_params(tmp_path, ytvos={"source": "real", "checkpoint": str(tmp / "models/tiny.pth")})
    raw = yaml.safe_load(params.read_text())
    raw["data"]["root"] = str(root)
    raw["model"]["text_encoder"] = str(tmp / "synthetic/te")
    params.write_text(yaml.safe_dump(raw))
    cfg = load_pipeline_config(params)
    monkeypatch.setattr(ytvos, "NUM_VALID_VIDEOS", 1)  # the real competition split has 202 valid videos
    metrics = evaluate_dataset.evaluate_dataset(cfg, "ytvos", use_mlflow=False)
    assert metrics["scored_locally"] == 0 and "jf" not in metrics and metrics["num_videos"] == 1
    zip_path = package.main(["--params", str(params)])
    with zipfile.ZipFile(zip_path) as zf:
        names = zf.namelist()
    n_frames = sum(len(v["frames"]) * len(v["expressions"]) for k, v in meta["videos"].items()
                   if k in ytvos.inference_videos(root, "valid"))
    assert len(names) == n_frames and all(n.startswith("Annotations/") for n in names)
    monkeypatch.setattr(ytvos, "NUM_VALID_VIDEOS", 202)
    with pytest.raises(ValueError, match="1 valid videos after filtering, expected 202"):
        evaluate_dataset.evaluate_dataset(cfg, "ytvos", use_mlflow=False)


def test_official_checkpoint_files_are_loaded_for_evaluation(stages, tmp_path):
    import torch

    from bifit.checkpoint import load_checkpoint, to_official_state_dict
    from pipeline.evaluate_dataset import load_eval_model

    tmp, _, cfg, _, _, _, _ = stages
    ours = load_checkpoint(tmp / "models/tiny.pth")["model"]
    # released weights without args: built with the model section of params.yaml (the paper overlay for real ones)
    torch.save({"model": to_official_state_dict(ours), "epoch": 9}, tmp_path / "ytvos_r50.pth")
    loaded = load_eval_model(cfg, tmp_path / "ytvos_r50.pth")
    assert loaded.official and loaded.checkpoint == {"epoch": 9} and "mlflow_run_id" not in loaded.checkpoint
    state = loaded.model.state_dict()
    assert all(torch.equal(state[k].cpu(), v) for k, v in ours.items())  # on eval.device (auto: a GPU if any)
    with pytest.raises(FileNotFoundError, match="none.pth: file not found") as err:
        load_eval_model(cfg, tmp_path / "none.pth")
    assert "datasets.<name>.checkpoint" in "".join(err.value.__notes__)
