"""bifit.segment: every input kind gives the masks of the same frames, several sentences share one visual encoding
per window, windows that cover the clip equal the whole-video pass, the command line writes masks, an overlay video
and scores (nothing half-written on failure), and the checkpoint may be an official file or an MLflow run id."""

import argparse
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import bifit
from bifit.checkpoint import CheckpointError, save_checkpoint, to_official_state_dict
from bifit.config import Config, DataConfig, to_dict
from bifit.segment import DEFAULT_WINDOW, SegmentError, main
from bifit.video_io import read_video, write_video
from tests.conftest import REPO
from tests.segment_fixtures import *  # noqa: F403 (the fixtures checkpoint, clip, loaded)
from tests.segment_fixtures import CLIP_FRAMES, CLIP_H, CLIP_W, SHORT_SIDE


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.text == y.text
        np.testing.assert_array_equal(x.masks, y.masks)
        np.testing.assert_allclose(x.frame_scores, y.frame_scores, rtol=0, atol=1e-6)


def test_api_returns_bool_masks_at_the_original_size_and_per_frame_scores(loaded, clip):
    rgb, texts = clip
    result = loaded.segment(rgb, texts[:2])
    assert [r.text for r in result] == texts[:2]
    for r in result:
        assert r.masks.shape == (CLIP_FRAMES, CLIP_H, CLIP_W) and r.masks.dtype == bool
        assert r.frame_scores.shape == (CLIP_FRAMES,) and ((r.frame_scores > 0) & (r.frame_scores < 1)).all()
        assert r.frame_indices == list(range(CLIP_FRAMES)) and r.settings["short_side"] == SHORT_SIDE
        # the window's score is the mean of its per-frame scores (one window: the clip)
        assert r.windows[0]["score"] == pytest.approx(float(r.frame_scores.mean()), abs=1e-6)
    assert 0 < result[0].masks.mean() < 1  # random weights, but not a trivial mask
    assert not np.array_equal(result[0].masks, result[1].masks)  # the sentence matters


def test_every_input_kind_segments_the_same_frames(loaded, clip, tmp_path):
    rgb, texts = clip
    texts = texts[:1]
    reference = loaded.segment(rgb, texts)
    # a frame folder (PNG: lossless) named so that text order would be wrong: 0, 2, ..., 10
    (tmp_path / "frames").mkdir()
    names = ["0", "2", "4", "10"]
    for name, frame in zip(names, rgb):
        Image.fromarray(frame).save(tmp_path / "frames" / f"{name}.png")
    folder = loaded.segment(tmp_path / "frames", texts)
    _assert_same(folder, reference)
    assert [folder[0].source.frame_name(i) for i in folder[0].frame_indices] == names
    # a single image: one frame
    single = loaded.segment(tmp_path / "frames" / "4.png", texts)
    _assert_same(single, loaded.segment(rgb[2:3], texts))
    # an mp4 (lossy): the masks of its decoded frames
    write_video(tmp_path / "clip.mp4", rgb, fps=6)
    _assert_same(loaded.segment(tmp_path / "clip.mp4", texts), loaded.segment(read_video(tmp_path / "clip.mp4"),
                                                                              texts))


def test_sentences_share_one_visual_encoding_per_window(loaded, clip, monkeypatch):
    rgb, texts = clip
    calls = []
    encode = loaded.model.encode_visual
    monkeypatch.setattr(loaded.model, "encode_visual", lambda *a, **k: calls.append(a[0].shape) or encode(*a, **k))
    together = loaded.segment(rgb, texts[:2], window=3)
    assert [tuple(s[:2]) for s in calls] == [(1, 3), (1, 1)]  # two windows, two sentences, two encodings
    alone = [loaded.segment(rgb, [t], window=3)[0] for t in texts[:2]]
    _assert_same(together, alone)


def test_windows_covering_the_clip_equal_the_whole_video_and_windows_equal_the_official_clip_inference(
        loaded, clip):
    from bifit.data.transforms import make_video_eval_transform
    from bifit.inference import predict_video

    rgb, texts = clip
    texts = texts[:1]
    whole = loaded.segment(rgb, texts, window=None)
    assert DEFAULT_WINDOW >= CLIP_FRAMES and loaded.segment(rgb, texts)[0].windows == whole[0].windows
    _assert_same(loaded.segment(rgb, texts, window=CLIP_FRAMES), whole)
    windowed = loaded.segment(rgb, texts, window=3)
    assert [(w["start"], w["end"]) for w in windowed[0].windows] == [(0, 3), (3, 4)]
    # the same as the Ref-DAVIS-style windowed pass over the whole clip at once
    frames, _ = make_video_eval_transform(SHORT_SIDE)([Image.fromarray(f) for f in rgb], {})
    preds = predict_video(loaded.model, loaded.tokenizer, frames, texts, (CLIP_H, CLIP_W), window=3)
    for r, p in zip(windowed, preds):
        np.testing.assert_array_equal(r.masks, p.masks.numpy())
        assert [w["query"] for w in r.windows] == p.queries
        np.testing.assert_allclose([w["score"] for w in r.windows], p.scores, atol=1e-6)


def test_every_samples_frames(loaded, clip):
    rgb, texts = clip
    result = loaded.segment(rgb, texts[:1], every=2, fps=6)
    assert result[0].frame_indices == [0, 2] and result[0].fps == 3
    _assert_same(result, loaded.segment(rgb[::2], texts[:1]))


def test_bad_api_input(loaded, clip):
    rgb, texts = clip
    with pytest.raises(SegmentError, match=r"text #2: expected a sentence, got '  ' \(empty\)"):
        loaded.segment(rgb, ["the dog", "  "])
    with pytest.raises(SegmentError, match="expected one or more sentences, got none"):
        loaded.segment(rgb, [])
    with pytest.raises(bifit.config.ConfigError, match=r"segment.every: expected an integer >= 1, got 0"):
        loaded.segment(rgb, texts[:1], every=0)
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['stride'\]"):
        loaded.segment(rgb, texts[:1], stride=2)


def test_command_line_writes_masks_overlay_and_scores(loaded, checkpoint, clip, tmp_path, capsys):
    rgb, texts = clip
    write_video(tmp_path / "walk.mp4", rgb, fps=6)
    out = tmp_path / "out"
    code = main([str(tmp_path / "walk.mp4"), "--text", texts[0], "--text", texts[1], "--checkpoint", str(checkpoint),
                 "--out", str(out), "--window", "3", "--device", "cpu", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    api = loaded.segment(tmp_path / "walk.mp4", texts[:2], window=3)
    summary = json.loads((out / "segmentation.json").read_text())
    assert summary["frames"] == CLIP_FRAMES and summary["window"] == 3 and summary["fps"] == 6
    assert [e["text"] for e in summary["expressions"]] == texts[:2]
    for e, r in zip(summary["expressions"], api):
        folder = out / e["folder"]
        assert e["folder"].startswith(("00_", "01_"))
        pngs = sorted((folder / "masks").iterdir())
        assert [p.stem for p in pngs] == [f"{i:05d}" for i in range(CLIP_FRAMES)]
        masks = np.stack([np.asarray(Image.open(p)) for p in pngs])
        assert masks.shape == (CLIP_FRAMES, CLIP_H, CLIP_W) and set(np.unique(masks)) <= {0, 255}
        np.testing.assert_array_equal(masks == 255, r.masks)
        record = json.loads((folder / "result.json").read_text())
        np.testing.assert_allclose([f["score"] for f in record["frames"]], r.frame_scores, atol=1e-6)
        assert [f["area"] for f in record["frames"]] == r.masks.sum((1, 2)).tolist()
        assert [w["query"] for w in record["windows"]] == [w["query"] for w in r.windows]
        overlay = read_video(folder / "overlay.mp4")
        assert overlay.shape == (CLIP_FRAMES, CLIP_H, CLIP_W, 3)  # readable, one frame per mask
        assert overlay[:, :3].mean() < 40  # the dark band the sentence is written on
    # result.save writes what the command line writes
    api[0].save(tmp_path / "saved")
    for name in ("00000", "00003"):
        assert np.array_equal(np.asarray(Image.open(tmp_path / "saved" / "masks" / f"{name}.png")),
                              np.asarray(Image.open(out / summary["expressions"][0]["folder"] / "masks" / f"{name}.png")))
    assert read_video(tmp_path / "saved" / "overlay.mp4").shape[0] == CLIP_FRAMES
    printed = capsys.readouterr().out
    assert f"{CLIP_FRAMES} frames of walk.mp4 segmented" in printed


def _no_partial_left(parent):
    return [p.name for p in parent.iterdir() if ".partial" in p.name] == []


def test_command_line_refuses_bad_input_and_leaves_nothing_half_written(checkpoint, clip, tmp_path, capsys,
                                                                         monkeypatch):
    rgb, texts = clip
    write_video(tmp_path / "walk.mp4", rgb, fps=6)
    args = ["--checkpoint", str(checkpoint), "--device", "cpu", "--no-progress"]

    def run(*extra):
        code = main([*extra, *args])
        return code, capsys.readouterr().err

    code, err = run(str(tmp_path / "walk.mp4"), "--text", "", "--out", str(tmp_path / "a"))
    assert code == 2 and "text #1: expected a sentence, got '' (empty)" in err
    (tmp_path / "empty.mp4").write_bytes(b"")
    code, err = run(str(tmp_path / "empty.mp4"), "--text", "x", "--out", str(tmp_path / "a"))
    assert code == 2 and "empty.mp4: the file is empty" in err
    (tmp_path / "junk.avi").write_bytes(b"RIFF junk" * 50)
    code, err = run(str(tmp_path / "junk.avi"), "--text", "x", "--out", str(tmp_path / "a"))
    assert code == 2 and "junk.avi: not a readable video" in err
    (tmp_path / "noframes").mkdir()
    code, err = run(str(tmp_path / "noframes"), "--text", "x", "--out", str(tmp_path / "a"))
    assert code == 2 and "noframes: a folder with no frames" in err
    # a checkpoint of another architecture than its saved configuration says
    obj = torch.load(checkpoint, weights_only=True)
    obj["config"]["model"]["num_queries"] = 3
    torch.save(obj, tmp_path / "other.pth")
    code, err = main([str(tmp_path / "walk.mp4"), "--text", "x", "--out", str(tmp_path / "a"), "--checkpoint",
                      str(tmp_path / "other.pth"), "--device", "cpu"]), capsys.readouterr().err
    assert code == 2 and "other.pth: does not match the model" in err and "query_embed" in err
    assert not (tmp_path / "a").exists() and _no_partial_left(tmp_path)
    # an existing output folder: refused, then replaced with --overwrite
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "old.txt").write_text("earlier run")
    code, err = run(str(tmp_path / "walk.mp4"), "--text", texts[0], "--out", str(tmp_path / "a"))
    assert code == 2 and "the output folder exists" in err and "--overwrite" in err
    assert (tmp_path / "a" / "old.txt").exists()
    code, _ = run(str(tmp_path / "walk.mp4"), "--text", texts[0], "--out", str(tmp_path / "a"), "--overwrite")
    assert code == 0 and not (tmp_path / "a" / "old.txt").exists() and (tmp_path / "a" / "segmentation.json").exists()
    # a failure in the middle of the video: no output folder, no temporary folder
    from bifit import inference

    real, calls = inference.predict_video, []

    def failing(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory (simulated)")
        return real(*a, **k)

    monkeypatch.setattr(inference, "predict_video", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        main([str(tmp_path / "walk.mp4"), "--text", texts[0], "--out", str(tmp_path / "b"), "--window", "2", *args])
    assert not (tmp_path / "b").exists() and _no_partial_left(tmp_path)


OFFICIAL_ARGS = dict(  # official opts.py names of a tiny model, as an official training file's `args` holds them
    lr=1e-4, lr_backbone=1e-5, backbone="resnet18", dilation=False, two_stage=False, with_box_refine=True,
    hidden_dim=32, nheads=4, enc_layers=1, dec_layers=2, query_enc_layers=1, dim_feedforward=64, dropout=0.1,
    num_feature_levels=4, enc_n_points=4, dec_n_points=4, num_queries=2, mask_dim=32, controller_layers=3,
    dynamic_mask_channels=8, rel_coord=True, aux_loss=True, binary=True, freeze_text_encoder=True)


def test_official_checkpoint_built_from_the_recipe(loaded, clip, tmp_path, capsys):
    """An official-format file (official key names, `args`), its weights from the key-name recipe: segmented at the
    official 360 short side and threshold 0.5, with the masks of the same weights saved in our format."""
    from bifit.loading import model_config_from_official_args
    from bifit.models import build_model
    from bifit.recipe import recipe_state_dict

    rgb, texts = clip
    text_encoder = loaded.config.text_encoder
    cfg = model_config_from_official_args(OFFICIAL_ARGS, text_encoder=text_encoder)
    shapes = {k: tuple(v.shape) for k, v in to_official_state_dict(build_model(cfg).state_dict()).items()}
    torch.save({"model": recipe_state_dict(shapes), "args": argparse.Namespace(**OFFICIAL_ARGS), "epoch": 5},
               tmp_path / "ytvos_r18.pth")
    official = bifit.load_model(tmp_path / "ytvos_r18.pth", {"text_encoder": text_encoder}, device="cpu")
    assert official.official
    result = official.segment(rgb[:1], texts[:1])
    assert result[0].settings["short_side"] == 360 and result[0].settings["threshold"] == 0.5
    assert result[0].masks.shape == (1, CLIP_H, CLIP_W)
    save_checkpoint(tmp_path / "ours.pth", official.model, to_dict(Config(model=official.config,
                                                                          data=DataConfig(eval_short_side=360))))
    _assert_same(result, bifit.load_model(tmp_path / "ours.pth", device="cpu").segment(rgb[:1], texts[:1]))
    # released weights without `args`: the command line says how to name the architecture
    torch.save(recipe_state_dict(shapes), tmp_path / "bare.pth")
    Image.fromarray(rgb[0]).save(tmp_path / "frame.png")
    code = main([str(tmp_path / "frame.png"), "--text", texts[0], "--checkpoint", str(tmp_path / "bare.pth"),
                 "--text-encoder", text_encoder, "--out", str(tmp_path / "out"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "bare.pth: a bare state dict does not record its architecture" in err
    assert "(here: --architecture paper" in err


def test_mlflow_run_id_names_the_checkpoint(checkpoint, clip, tmp_path, monkeypatch, capsys):
    from mlflow.tracking import MlflowClient

    import pipeline.run_checkpoint as run_checkpoint

    rgb, texts = clip
    monkeypatch.setattr(run_checkpoint, "DOWNLOADS", str(tmp_path / "downloads"))  # absolute: not in the repo
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("seg", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(exp, run_name="train").info.run_id
    (tmp_path / "logged").mkdir()
    (tmp_path / "logged" / "bifit.pth").write_bytes(checkpoint.read_bytes())
    client.log_artifact(run_id, str(tmp_path / "logged" / "bifit.pth"), "model")
    for spec in (run_id, f"runs:/{run_id}"):
        by_run = bifit.load_model(spec, device="cpu", tracking_uri=uri)
        assert by_run.checkpoint["untrained"] is True
    assert (tmp_path / "downloads" / run_id / "bifit.pth").read_bytes() == checkpoint.read_bytes()
    # trained on another machine: the text encoder the checkpoint records is not here; the run's logged model has it
    from pipeline import tracking

    moved = torch.load(checkpoint, weights_only=True)
    text_encoder = moved["config"]["model"]["text_encoder"]
    moved["config"]["model"]["text_encoder"] = str(tmp_path / "elsewhere" / "text-encoder")
    (tmp_path / "moved").mkdir()
    torch.save(moved, tmp_path / "moved" / "bifit.pth")
    moved_run = client.create_run(exp, run_name="train-elsewhere").info.run_id
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # active_run sets it: restored after the test
    with tracking.active_run(uri, moved_run):
        tracking.log_artifact(tmp_path / "moved" / "bifit.pth", "model")
        tracking.log_bifit_model(tmp_path / "moved" / "bifit.pth", text_encoder)
    by_moved_run = bifit.load_model(moved_run, device="cpu", tracking_uri=uri)
    assert by_moved_run.config.text_encoder.endswith(f"{moved_run}/bifit/artifacts/text_encoder")
    assert by_moved_run.tokenizer("the orange object")["input_ids"] == by_run.tokenizer("the orange object")["input_ids"]
    direct = bifit.load_model(checkpoint, device="cpu").model.state_dict()
    assert all(torch.equal(v, direct[k]) for k, v in by_run.model.state_dict().items())
    code = main([str(tmp_path / "logged" / "bifit.pth").replace("bifit.pth", "") + "missing.mp4", "--text", "x",
                 "--checkpoint", run_id, "--tracking-uri", uri])
    assert code == 2 and "missing.mp4: no such file or folder" in capsys.readouterr().err
    write_video(tmp_path / "walk.mp4", rgb, fps=6)
    assert main([str(tmp_path / "walk.mp4"), "--text", texts[0], "--checkpoint", run_id, "--tracking-uri", uri,
                 "--out", str(tmp_path / "out"), "--device", "cpu", "--no-progress"]) == 0
    assert json.loads((tmp_path / "out" / "segmentation.json").read_text())["checkpoint"] == run_id
    unknown = "0123456789abcdef0123456789abcdef"
    with pytest.raises(CheckpointError, match=rf"MLflow run {unknown} \(store sqlite:///.*\): .*not found"):
        bifit.load_model(unknown, device="cpu", tracking_uri=uri)


def test_the_library_still_imports_no_mlflow_ray_or_dvc():
    code = ("import sys, bifit, bifit.segment, bifit.app, bifit.video_io, bifit.example_clip\n"
            "bifit.load_model\n"
            "print(sorted(m for m in ('mlflow', 'ray', 'dvc', 'pipeline') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
