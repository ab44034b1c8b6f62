"""The summary table: paper numbers beside ours (x 100), labels, missing files and the server-only case."""

import json

import yaml

from pipeline import summary
from pipeline.config import load_pipeline_config


def _cfg(tmp_path, **datasets):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"paths": {"metrics": str(tmp_path / "metrics")},
                                                          "datasets": datasets}))
    return load_pipeline_config(tmp_path / "params.yaml")


def test_rows_compare_with_the_paper_and_flag_synthetic_data(tmp_path):
    cfg = _cfg(tmp_path, davis={"source": "real", "root": "data/ref-davis", "checkpoint": "ytvos_r50.pth"})
    m = tmp_path / "metrics"
    m.mkdir()
    (m / "davis.json").write_text(json.dumps({"jf": 0.612, "j": 0.571, "f": 0.653, "eval_seconds": 41.2,
                                              "per_expression_jf": 0.3}))  # stale key of older versions
    (m / "a2d.json").write_text(json.dumps({"overall_iou": 0.75, "mean_iou": 0.676, "mAP 0.5:0.95": 0.5,
                                            "best-query-only mAP 0.5:0.95": 0.45, "P@0.5": 0.8, "P@0.9": 0.1}))
    rows, notes = summary.summary_rows(cfg)
    text = summary.render(rows, notes)
    assert "| Ref-DAVIS17 val (4 annotators averaged) | J&F | 61.2 | 60.5 | +0.7 | real | ytvos_r50.pth | 41 s |" in text
    assert "| A2D-Sentences test | mAP (all queries: the paper's protocol) | 50.0 | 52.4 | -2.4 | synthetic" in text
    assert "| A2D-Sentences test | mAP (best query only: not the paper's protocol) | 45.0 |  |  |" in text
    for name in ("ytvos", "ytvos_proxy", "jhmdb", "refcoco"):
        assert f"metrics/{name}.json is missing: run `dvc repro evaluate@{name}`" in text
    assert text.count("| missing |") == 4
    assert ("- Ref-DAVIS17: unsupervised protocol (Hungarian matching), mean of 4 annotator runs; no per-expression "
            "score") in text
    assert "30.0" not in text and "per-expression" not in text.replace("no per-expression score", "")


def test_real_ytvos_without_ground_truth_points_to_the_server(tmp_path):
    cfg = _cfg(tmp_path, ytvos={"source": "real"})
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics/ytvos.json").write_text(json.dumps({"num_videos": 202, "scored_locally": 0}))
    text = summary.render(*summary.summary_rows(cfg))
    assert "| Ref-YouTube-VOS valid | J&F | server only | 59.9 |" in text
    assert "submit outputs/submission_ytvos.zip" in text
