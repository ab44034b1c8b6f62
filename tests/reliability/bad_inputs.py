"""The bad-input corpus: each case breaks a copy of the toy benchmark, a params file or a checkpoint, built in a
temporary folder (no committed binaries). `tests/reliability/test_bad_inputs.py` runs every case and checks its
message; `bench/reliability.py` runs them again to print the table of outcomes."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

EXP_JSON = "meta_expressions/train/meta_expressions.json"
META_JSON = "train/meta.json"


@dataclass(frozen=True)
class DatasetCase:
    name: str
    breaks: Callable[[Path], str]  # breaks the copy at `root`; returns the video it broke
    message: str  # regular expression the error (or the recorded skip) must match; {root} is the copy
    stage: str  # "listing" (found when the dataset is built) or "loading" (found when a clip is read)


def _first_video(root: Path) -> str:
    return sorted(json.loads((root / EXP_JSON).read_text())["videos"])[0]


def _edit_json(root: Path, rel: str, edit: Callable[[dict, str], None]) -> str:
    path = root / rel
    data = json.loads(path.read_text())
    vid = _first_video(root)
    edit(data["videos"], vid)
    path.write_text(json.dumps(data))
    return vid


def _frames(root: Path, vid: str, kind: str = "JPEGImages", ext: str = "jpg") -> list[Path]:
    return sorted((root / "train" / kind / vid).glob(f"*.{ext}"))


def truncated_jpeg(root: Path) -> str:
    vid = _first_video(root)
    for f in _frames(root, vid):
        f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 3])
    return vid


def png_wrong_size(root: Path) -> str:
    vid = _first_video(root)
    for f in _frames(root, vid, "Annotations", "png"):
        with Image.open(f) as png:
            small = png.resize((png.width // 2, png.height // 2), Image.NEAREST)
        small.save(f)
    return vid


def frames_of_different_sizes(root: Path) -> str:
    """Every frame after the first is narrower than the one before (its annotation too): no clip can be stacked."""
    vid = _first_video(root)
    pairs = zip(_frames(root, vid), _frames(root, vid, "Annotations", "png"))
    for i, (jpg, png_path) in enumerate(pairs):
        if i == 0:
            continue
        for path, resample in ((jpg, Image.BILINEAR), (png_path, Image.NEAREST)):
            with Image.open(path) as im:
                im.load()
                small = im.resize((im.width - 8 * i, im.height), resample)
            small.save(path)
    return vid


def png_wrong_mode(root: Path) -> str:
    vid = _first_video(root)
    for f in _frames(root, vid, "Annotations", "png"):
        with Image.open(f) as png:
            rgb = png.convert("RGB")
        rgb.save(f)
    return vid


def object_without_mask(root: Path) -> str:
    """The annotation PNGs never contain the object's id (meta.json gives no frame list to tell it early)."""
    vid = _first_video(root)
    obj = json.loads((root / EXP_JSON).read_text())["videos"][vid]["expressions"]["0"]["obj_id"]
    for f in _frames(root, vid, "Annotations", "png"):
        with Image.open(f) as png:
            ids = np.array(png)
            palette = png.getpalette()
        ids[ids == int(obj)] = 0
        out = Image.fromarray(ids, mode="P")
        out.putpalette(palette)
        out.save(f)
    _edit_json(root, META_JSON, lambda v, vid: v[vid]["objects"][obj].pop("frames", None))
    return vid


def video_id_outside_the_root(root: Path) -> str:
    """A video id that, used as a folder name, would read (and at inference write) two levels above the dataset."""
    outside = "../../outside"
    _edit_json(root, EXP_JSON, lambda v, vid: v.__setitem__(outside, v.pop(vid)))
    return outside


def non_utf8_text(root: Path) -> str:
    path = root / EXP_JSON
    vid = _first_video(root)
    text = path.read_text().replace('"exp": "', '"exp": "caf\u00e9 ', 1)
    path.write_bytes(text.encode("latin-1"))
    return vid


CORRUPT_DATASETS = [
    DatasetCase("truncated JPEG", truncated_jpeg,
                r"JPEGImages/{vid}/\d+\.jpg: corrupt or unreadable image .*\[video {vid} exp_id", "loading"),
    DatasetCase("annotation PNG of the wrong size", png_wrong_size,
                r"Annotations/{vid}/\d+\.png: annotation is \d+x\d+ \(WxH\), expected the frame size", "loading"),
    DatasetCase("frames of one video at different resolutions", frames_of_different_sizes,
                r"JPEGImages/{vid}/\d+\.jpg: frame is \d+x\d+ \(WxH\), the clip's frame \d+ is \d+x\d+; a video's "
                r"frames must share one size \[video {vid} exp_id \d+ obj_id \d+ frame \d+\]", "loading"),
    DatasetCase("annotation PNG of the wrong mode", png_wrong_mode,
                r"Annotations/{vid}/\d+\.png: expected a palette \('P'\) or 'L' PNG, got mode 'RGB'", "loading"),
    DatasetCase("video without 'frames'", lambda r: _edit_json(r, EXP_JSON, lambda v, vid: v[vid].pop("frames")),
                r"meta_expressions\.json: 'frames' must be a list of frame-name strings, found missing "
                r"\[video {vid}\]", "listing"),
    DatasetCase("'frames' of the wrong type", lambda r: _edit_json(
        r, EXP_JSON, lambda v, vid: v[vid].update(frames="00000")),
                r"meta_expressions\.json: 'frames' must be a list of frame-name strings, found a str "
                r"\[video {vid}\]", "listing"),
    DatasetCase("'expressions' of the wrong type", lambda r: _edit_json(
        r, EXP_JSON, lambda v, vid: v[vid].update(expressions=[])),
                r"meta_expressions\.json: 'expressions' must map exp_id strings to objects, found a list "
                r"\[video {vid}\]", "listing"),
    DatasetCase("expression without 'exp'", lambda r: _edit_json(
        r, EXP_JSON, lambda v, vid: v[vid]["expressions"]["0"].pop("exp")),
                r"meta_expressions\.json: 'exp' must be a string, found it missing \[video {vid} exp_id 0", "listing"),
    DatasetCase("'obj_id' of the wrong type", lambda r: _edit_json(
        r, EXP_JSON, lambda v, vid: v[vid]["expressions"]["0"].update(obj_id=1.5)),
                r"meta_expressions\.json: 'obj_id' must be the object's integer id .*found 1\.5 "
                r"\[video {vid} exp_id 0", "listing"),
    DatasetCase("empty expression", lambda r: _edit_json(
        r, EXP_JSON, lambda v, vid: v[vid]["expressions"]["0"].update(exp="  \t ")),
                r"meta_expressions\.json: empty expression \('exp' has no words\) \[video {vid} exp_id 0", "listing"),
    DatasetCase("expression with a lone surrogate", lambda r: _edit_json(
        r, EXP_JSON, lambda v, vid: v[vid]["expressions"]["0"].update(exp="the \ud800 cat")),
                r"meta_expressions\.json: 'exp' is not valid Unicode text \(lone surrogate escape\)", "listing"),
    DatasetCase("video id with path separators", video_id_outside_the_root,
                r"meta_expressions\.json: video id '\.\./\.\./outside' cannot be a folder name \(it contains a path "
                r"separator\); ids and frame names in the metadata become paths \[video \.\./\.\./outside\]", "listing"),
    DatasetCase("frame name climbing out of the video folder", lambda r: _edit_json(
        r, EXP_JSON, lambda v, vid: v[vid]["frames"].__setitem__(0, "..")),
                r"meta_expressions\.json: frame name '\.\.' cannot be a file name \('\.\.' names a folder itself\); ids "
                r"and frame names in the metadata become paths \[video {vid}\]", "listing"),
    DatasetCase("exp_id with a path separator", lambda r: _edit_json(
        r, EXP_JSON, lambda v, vid: v[vid]["expressions"].__setitem__("x/../../y", v[vid]["expressions"].pop("0"))),
                r"meta_expressions\.json: exp_id 'x/\.\./\.\./y' cannot be a folder name \(it contains a path "
                r"separator\); predictions are written to <video>/<exp_id>/ \[video {vid} exp_id x/\.\./\.\./y", "listing"),
    DatasetCase("video with zero frames", lambda r: _edit_json(r, EXP_JSON, lambda v, vid: v[vid].update(frames=[])),
                r"meta_expressions\.json: video has zero frames \('frames' is empty\) \[video {vid}\]", "listing"),
    DatasetCase("expression -> object id missing from meta.json", lambda r: _edit_json(
        r, EXP_JSON, lambda v, vid: v[vid]["expressions"]["0"].update(obj_id="42")),
                r"train/meta\.json: expression refers to an object missing from meta\.json "
                r"\[video {vid} exp_id 0 obj_id 42\]", "listing"),
]
# data the official loader trains on: its clips have no valid frame and are redrawn (counted, warned), not errors
ACCEPTED_DATASETS = [
    DatasetCase("expression -> object id without a mask", object_without_mask,
                r"redrawing Ref-YouTube-VOS sample \d+ \(counted in redrawn_samples\): .*Annotations/{vid}: object id "
                r"\d+ has no mask in any annotation PNG of the video \[video {vid} exp_id \d+ obj_id \d+ frames",
                "loading"),
    DatasetCase("object with an empty frame list in meta.json", lambda r: _edit_json(
        r, META_JSON, lambda v, vid: [o.update(frames=[]) for o in v[vid]["objects"].values()]),
                r"train/meta\.json: object \d+ has an empty frame list \[video {vid} exp_id \d+ obj_id \d+\]; its "
                r"clips will be redrawn", "listing"),
]
# whole-file problems: no sample can be read, so they are errors even with data.skip_bad_samples
FATAL_DATASETS = [
    DatasetCase("non-UTF-8 meta_expressions.json", non_utf8_text,
                r"meta_expressions\.json: not valid UTF-8 text \(byte 0xe9 at offset \d+\); the metadata JSON files "
                r"must be UTF-8", "listing"),
    DatasetCase("meta_expressions.json that is not JSON", lambda r: (r / EXP_JSON).write_text('{"videos": {') and "",
                r"meta_expressions\.json: invalid JSON", "listing"),
    DatasetCase("meta_expressions.json without 'videos'", lambda r: (r / EXP_JSON).write_text('{"video": {}}') and "",
                r"meta_expressions\.json: expected a top-level 'videos' object", "listing"),
]


def broken_copy(bench: Path, dest: Path, case: DatasetCase) -> tuple[Path, str]:
    """A copy of the benchmark at `dest` broken by `case`; returns (root, the message regex for this copy)."""
    root = Path(shutil.copytree(bench, dest))
    vid = case.breaks(root)
    return root, case.message.format(vid=vid, root=root)


# ---------------------------------------------------------------------------------------------------------------
# params.yaml: (name, the sections to change, the message regex); each must be rejected before Ray starts

BAD_PARAMS = [
    ("unknown key", {"train": {"epoch": 3}}, r"train: unknown key\(s\) \['epoch'\]"),
    ("unknown section", {"trian": {"epochs": 3}}, r"top level: unknown key\(s\) \['trian'\]"),
    ("wrong type", {"ray": {"num_workers": "two"}}, r"ray\.num_workers: expected an integer, got 'two'"),
    ("wrong type (bool for int)", {"train": {"epochs": True}}, r"train\.epochs: expected an integer, got True"),
    ("out of range", {"train": {"lr_gamma": 2.0}}, r"train\.lr_gamma: expected a float in \(0, 1\], got 2\.0"),
    ("out of range (workers)", {"ray": {"num_workers": 0}}, r"ray\.num_workers: expected an integer >= 1, got 0"),
    ("not a choice", {"model": {"backbone": "vgg16"}}, r"model\.backbone: expected one of 'resnet18'"),
    ("dilation with a BasicBlock ResNet", {"model": {"dilation": True}},
     r"model\.dilation: expected false with model\.backbone 'resnet18'"),
    ("CUDA kernels without GPU workers", {"model": {"msda_backend": "cuda"}},
     r"model\.msda_backend: expected 'auto', 'cpu' or 'pytorch' while ray\.use_gpu is false"),
    ("obsolete key with another value than it could hold", {"model": {"mask_dim": 64}},
     r"model\.mask_dim: expected equal to model\.hidden_dim \(32\), got 64"),
    ("a video dataset the train stage cannot train on", {"data": {"dataset": "davis"}},
     r"data\.dataset: expected .*'ytvos'.*'a2d'.*got 'davis'"),
    ("auxiliary loss with one decoder layer", {"model": {"dec_layers": 1}},
     r"model\.dec_layers: expected >= 2 when aux_loss is on, got 1"),
    ("an infinite learning rate", {"train": {"lr": float("inf")}}, r"train\.lr: expected a finite number, got inf"),
    ("a NaN loss weight", {"loss": {"dice_loss_coef": float("nan")}}, r"loss\.dice_loss_coef: expected a finite number, got nan"),
    ("endless restarts", {"ray": {"max_failures": -1}},
     r"ray\.max_failures: expected an integer >= 0 \(restarts after a lost worker\), got -1"),
]
# valid on paper, impossible here: found by the driver's preflight, still before Ray starts
BAD_PARAMS_PREFLIGHT = [
    ("GPU workers on a machine without GPUs", {"ray": {"use_gpu": True}},
     r"ray\.use_gpu: true asks for 2 GPU worker\(s\) \(ray\.num_workers\) on a local Ray, but this machine has 0"),
    ("a text encoder folder that does not exist", {"model": {"text_encoder": "data/no-such-folder/tiny-roberta"}},
     r"model\.text_encoder: .*data/no-such-folder/tiny-roberta does not exist; expected a local folder written by "
     r"save_pretrained or a hub id"),
    ("a text encoder folder without config.json", {"model": {"text_encoder": "tests"}},
     r"model\.text_encoder: .*tests has no config\.json"),
    ("a mistyped hub id", {"model": {"text_encoder": "roberta-bsae"}},
     r"model\.text_encoder: 'roberta-bsae' is neither a local folder nor a hub model transformers can load here"),
    ("backbone weights that are not there", {"model": {"backbone_weights": "weights/resnet18-missing.pth"}},
     r"model\.backbone_weights: expected a weights file \(torchvision ResNet or official Swin/Video-Swin release\), "
     r"but .*resnet18-missing\.pth does not exist"),
    ("A2D-Sentences training before preprocess@a2d",
     {"data": {"dataset": "a2d", "expressions_per_clip": 1, "batch_grouping": "none"},
      "datasets": {"prepared": "/no/such/folder/prepared"}},
     r"data\.dataset: a2d trains on the A2D-Sentences train split, but /no/such/folder/prepared/a2d/index_train\.json "
     r"does not exist; run `dvc repro preprocess@a2d` first"),
    ("a batch larger than the data", {"train": {"batch_size": 1000}},
     r"train\.batch_size: \d+ training samples in .* cannot fill one step of train\.batch_size \(1000\) x "
     r"ray\.num_workers \(2\)"),
]


# ---------------------------------------------------------------------------------------------------------------
# checkpoints


class RunsCode:
    """Unpickling this writes a file: a stand-in for a pickle that runs arbitrary code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "code ran"))


def code_running_checkpoint(path: Path, marker: Path) -> None:
    import torch

    torch.save({"format": "bifit-checkpoint-v1", "config": {}, "model": {}, "payload": RunsCode(marker)}, path)
