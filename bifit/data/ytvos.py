"""Ref-YouTube-VOS loader (training and inference samples as the official code builds them).

Training: one sample per (video, expression, anchor frame f in {0, T, 2T, ...} < L), a clip sampled around the
anchor (:func:`sample_clip_indices`), the mask of every sampled frame is ``png == int(obj_id)``, the box its
tight xyxy extent with inclusive x2/y2, ``valid`` 1 where the mask is non-empty. A clip with no valid frame after
the transforms (the object cropped away, absent from the sampled frames, or in no annotation PNG at all) is
replaced by a random other sample, as in the reference; each redraw is counted (``dataset.redrawn`` in this
process, and ``target["redrawn_samples"]`` on the item served, which :func:`bifit.engine.train_one_epoch` sums) and
warned about once per sample.

Inference: the listed valid videos are the valid meta minus the test meta (the competition's valid meta also
lists the test videos, which cannot be scored); every expression of a video is run on the whole video, resized so
the shorter side is ``short_side`` (360 for real YTVOS). Its caption is the expression exactly as written in the
meta (capitals and spacing kept), as the official inference feeds it; only training captions are lower-cased and
whitespace-collapsed.

Bad data raises :class:`SampleError` naming the file, the sample id and the reason. With ``skip_bad_samples=True``
the dataset logs a warning, records ``{"file", "id", "reason", "index"}`` in ``dataset.skipped`` and serves the next
sample (index + 1, deterministic); broken expressions found while listing are left out of the samples and recorded
with ``index`` None. Note that DataLoader workers hold copies of the dataset, so ``skipped`` is per process; pass
``skip_log`` (a JSONL file) to collect every process's skips in one place (``read_skip_log`` reads it back).
Checked while listing: metadata that is not UTF-8, entries with missing keys or wrong types, videos with zero frames,
empty expressions, object ids absent from meta.json; while loading: missing, truncated or corrupt JPEGs, annotation
PNGs of the wrong mode or size. An object with an empty frame list in meta.json is listed (the reference does not
read that list) and its clips are redrawn.
"""

from __future__ import annotations

import json
import logging
import random as _random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from bifit.data.collate import normalize_text
from bifit.data.transforms import Compose, Normalize, make_video_eval_transform
from bifit.fsutil import component_problem
from bifit.prepare.sources import YTVOS_PAGE

log = logging.getLogger(__name__)

# YTVOS category ids 0..64, alphabetical (the official class list; used only by non-binary runs)
YTVOS_CATEGORIES = (
    "airplane", "ape", "bear", "bike", "bird", "boat", "bucket", "bus", "camel", "cat", "cow", "crocodile", "deer",
    "dog", "dolphin", "duck", "eagle", "earless_seal", "elephant", "fish", "fox", "frisbee", "frog", "giant_panda",
    "giraffe", "hand", "hat", "hedgehog", "horse", "knife", "leopard", "lion", "lizard", "monkey", "motorbike",
    "mouse", "others", "owl", "paddle", "parachute", "parrot", "penguin", "person", "plant", "rabbit", "raccoon",
    "sedan", "shark", "sheep", "sign", "skateboard", "snail", "snake", "snowboard", "squirrel", "surfboard",
    "tennis_racket", "tiger", "toilet", "train", "truck", "turtle", "umbrella", "whale", "zebra",
)  # fmt: skip
NUM_VALID_VIDEOS = 202  # the real competition's valid split after the test filter
REDRAWN_KEY = "redrawn_samples"  # in a training item's (first) target: the redraws it took, summed by the engine


class SampleError(RuntimeError):
    """A sample that cannot be loaded: ``file`` (path), ``sample_id`` (video/exp/obj/frame ids) and ``reason``."""

    def __init__(self, file, sample_id: str, reason: str, hint: str = ""):
        self.file, self.sample_id, self.reason, self.hint = str(file), sample_id, reason, hint
        super().__init__(f"{file}: {reason} [{sample_id}]" + (f"; {hint}" if hint else ""))

    def __reduce__(self):  # picklable with its fields, so the message survives the trip from a Ray worker
        return type(self), (self.file, self.sample_id, self.reason, self.hint)

    def record(self) -> dict:
        return {"file": self.file, "id": self.sample_id, "reason": self.reason}


# ----------------------------------------------------------------------------------------------------------------
# files


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_bytes().decode("utf-8"))
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{path}: missing Ref-YouTube-VOS metadata file") from err
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not valid UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start}); "
                         "the metadata JSON files must be UTF-8") from err
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: invalid JSON ({err})") from err


def read_skip_log(path) -> list[dict]:
    """The skips recorded in a ``skip_log`` file (one JSON object per line); the same skip recorded by several
    processes (ranks, DataLoader workers) is kept once."""
    path = Path(path)
    if not path.is_file():
        return []
    seen, out = set(), []
    for line in path.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            key = (rec.get("file"), rec.get("id"), rec.get("reason"), rec.get("index"))
            if key not in seen:
                seen.add(key)
                out.append(rec)
    return out


def expressions_path(root: Path, split: str) -> Path:
    return Path(root) / "meta_expressions" / split / "meta_expressions.json"


def read_videos(path: Path) -> dict:
    meta = read_json(path)
    if not isinstance(meta.get("videos"), dict):
        raise ValueError(f"{path}: expected a top-level 'videos' object mapping video ids to entries")
    return meta["videos"]


def load_image(path: Path, sample_id: str) -> Image.Image:
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except FileNotFoundError as err:
        raise SampleError(path, sample_id, "missing image file") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise SampleError(path, sample_id, f"corrupt or unreadable image ({err})") from err


def load_id_map(path: Path, sample_id: str, size_wh: tuple[int, int] | None = None) -> np.ndarray:
    """Annotation PNG as an integer id map [H, W] (palette index = object id, 0 = background)."""
    try:
        with Image.open(path) as png:
            if png.mode not in ("P", "L"):
                raise SampleError(path, sample_id, f"expected a palette ('P') or 'L' PNG, got mode {png.mode!r}")
            ids = np.array(png)
    except FileNotFoundError as err:
        raise SampleError(path, sample_id, "missing annotation PNG") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise SampleError(path, sample_id, f"corrupt or unreadable annotation PNG ({err})") from err
    if size_wh is not None and ids.shape != (size_wh[1], size_wh[0]):
        raise SampleError(path, sample_id, f"annotation is {ids.shape[1]}x{ids.shape[0]} (WxH), expected the "
                                           f"frame size {size_wh[0]}x{size_wh[1]}")
    return ids


def bounding_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Tight (x1, y1, x2, y2) of a non-empty mask, x2/y2 inclusive pixel indices."""
    rows, cols = np.any(mask, axis=1), np.any(mask, axis=0)
    y1, y2 = np.where(rows)[0][[0, -1]]
    x1, x2 = np.where(cols)[0][[0, -1]]
    return int(x1), int(y1), int(x2), int(y2)


# ----------------------------------------------------------------------------------------------------------------
# training samples


def sample_clip_indices(anchor: int, length: int, num_frames: int, rng=_random) -> list[int]:
    """Clip positions around ``anchor`` in a video of ``length`` frames, sampled as the official loaders do: the
    anchor, a neighbour 1-3 frames before and after, then random other frames; sorted, repeats allowed."""
    idx = [anchor]
    if num_frames != 1:
        before, after = rng.randint(1, 3), rng.randint(1, 3)
        idx += [max(0, anchor - before), min(length - 1, anchor + after)]
    if num_frames > 3:
        n_global = num_frames - len(idx)
        candidates = list(range(min(idx))) + list(range(max(idx), length))
        if len(candidates) > n_global:
            idx += rng.sample(candidates, n_global)
        elif length >= n_global:
            idx += rng.sample(range(length), n_global)
        else:  # all frames, plus random repeats (repeated passes when more than 2L are needed)
            extra = []
            while len(extra) < n_global - length:
                extra += rng.sample(range(length), min(length, n_global - length - len(extra)))
            idx += extra + list(range(length))
    return sorted(idx)[:num_frames]


class RedrawCounter:
    """Training redraws: a clip without a valid frame is replaced by a random other sample, as the reference
    does. Counts every redraw and warns once per sample index (a crop can miss the object on any epoch)."""

    def __init__(self, logger: logging.Logger, dataset_name: str):
        self.logger, self.dataset_name, self.count, self._warned = logger, dataset_name, 0, set()

    def add(self, index: int, reason: Callable[[], str]) -> None:
        """Count one redraw of sample ``index``; ``reason()`` (the video/frames and why) is built for the warning."""
        self.count += 1
        if index not in self._warned:
            self._warned.add(index)
            self.logger.warning("redrawing %s sample %d (counted in %s): %s", self.dataset_name, index, REDRAWN_KEY,
                                reason())


@dataclass(frozen=True)
class TrainSample:
    video: str
    exp_id: str
    caption: str
    obj_id: str
    category_id: int
    frames: tuple[str, ...]  # sorted frame names of the video
    anchor: int

    @property
    def sample_id(self) -> str:
        return f"video {self.video} exp_id {self.exp_id} obj_id {self.obj_id}"


def video_ids(root: Path, split: str, exclude_test: bool = True) -> list[str]:
    """Videos of ``meta_expressions/<split>``; for "valid" minus those of ``meta_expressions/test`` (the valid meta
    also lists the test videos, which cannot be scored)."""
    videos = read_videos(expressions_path(root, split))
    if split == "valid" and exclude_test:
        test_path = expressions_path(root, "test")
        if not test_path.is_file():
            raise FileNotFoundError(f"{test_path}: missing; the valid split is the valid meta minus the test meta "
                                    "(the competition's valid meta also lists the test videos), so the test "
                                    f"meta_expressions.json is required: download it from {YTVOS_PAGE} with the "
                                    "train and valid ones and put it there")
        return sorted(set(videos) - set(read_videos(test_path)))
    return list(videos)


def video_entry_problem(path: Path, vid: str, entry) -> SampleError | None:
    """A meta_expressions video entry must hold a non-empty list of frame names and a mapping of expressions."""
    sid = f"video {vid}"
    if why := component_problem(vid):
        return SampleError(path, sid, f"video id {vid!r} cannot be a folder name ({why}); ids and frame names in the "
                                      "metadata become paths")
    if not isinstance(entry, dict):
        return SampleError(path, sid, f"expected an object with 'frames' and 'expressions', got {type(entry).__name__}")
    frames = entry.get("frames")
    if not isinstance(frames, list) or not all(isinstance(f, str) for f in frames):
        what = "missing" if frames is None else f"a {type(frames).__name__}"
        return SampleError(path, sid, f"'frames' must be a list of frame-name strings, found {what}")
    if not frames:
        return SampleError(path, sid, "video has zero frames ('frames' is empty)")
    for frame in frames:
        if why := component_problem(frame):
            return SampleError(path, sid, f"frame name {frame!r} cannot be a file name ({why}); ids and frame names "
                                          "in the metadata become paths")
    if not isinstance(entry.get("expressions"), dict):
        what = "missing" if entry.get("expressions") is None else f"a {type(entry['expressions']).__name__}"
        return SampleError(path, sid, f"'expressions' must map exp_id strings to objects, found {what}")
    return None


def expression_problem(path: Path, sid: str, exp, need_obj_id: bool, exp_id: str = "0") -> SampleError | None:
    """An expression must be an object with a non-empty 'exp' string (and an 'obj_id' in training metas); its
    exp_id names the prediction folder, so it must be one path component."""
    if why := component_problem(exp_id):
        return SampleError(path, sid, f"exp_id {exp_id!r} cannot be a folder name ({why}); predictions are written "
                                      "to <video>/<exp_id>/")
    if not isinstance(exp, dict):
        return SampleError(path, sid, f"expected an object with 'exp', got {type(exp).__name__}")
    text = exp.get("exp")
    if not isinstance(text, str):
        return SampleError(path, sid, "'exp' must be a string, found " +
                           ("it missing" if text is None else f"a {type(text).__name__}"))
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return SampleError(path, sid, f"'exp' is not valid Unicode text (lone surrogate escape): {text!r}")
    if not normalize_text(text):
        return SampleError(path, sid, "empty expression ('exp' has no words)")
    obj_id = exp.get("obj_id")
    if need_obj_id and (isinstance(obj_id, bool) or not isinstance(obj_id, (str, int)) or not str(obj_id).isdigit()):
        return SampleError(path, sid, "'obj_id' must be the object's integer id as a string (the annotation "
                                      "palette index), found " + ("it missing" if obj_id is None else repr(obj_id)))
    return None


def list_train_samples(root: Path, split: str, num_frames: int, categories: Sequence[str]):
    """(samples, problems): one sample per (video, expression, anchor) plus SampleErrors for broken entries."""
    root = Path(root)
    exp_path, meta_path = expressions_path(root, split), root / split / "meta.json"
    expressions, objects_meta = read_videos(exp_path), read_videos(meta_path)
    category_ids = {c: i for i, c in enumerate(categories)}
    samples, problems = [], []
    for vid in video_ids(root, split):
        problem = video_entry_problem(exp_path, vid, expressions[vid])
        if problem:
            problems.append(problem)
            continue
        frames = tuple(sorted(expressions[vid]["frames"]))
        for exp_id, exp in expressions[vid]["expressions"].items():
            obj_id = str(exp.get("obj_id")) if isinstance(exp, dict) else "?"
            sid = f"video {vid} exp_id {exp_id} obj_id {obj_id}"
            problem = expression_problem(exp_path, sid, exp, need_obj_id=True, exp_id=exp_id)
            if problem:
                problems.append(problem)
                continue
            video_meta = objects_meta.get(vid)
            objects = video_meta.get("objects") if isinstance(video_meta, dict) else None
            if not isinstance(objects, dict) or obj_id not in objects or not isinstance(objects[obj_id], dict):
                problems.append(SampleError(meta_path, sid, "expression refers to an object missing from meta.json"))
                continue
            if objects[obj_id].get("frames") == []:  # the reference lists it; its clips are redrawn
                log.warning("%s: object %s has an empty frame list [%s]; its clips will be redrawn", meta_path,
                            obj_id, sid)
            category = objects[obj_id].get("category")
            if category not in category_ids:
                problems.append(SampleError(meta_path, sid, f"category {category!r} is not in the categories list "
                                                            f"({len(category_ids)} names); pass categories=..., e.g. "
                                                            "bifit.data.SYNTHETIC_CATEGORIES for the synthetic set"))
                continue
            for anchor in range(0, len(frames), num_frames):
                samples.append(TrainSample(vid, str(exp_id), normalize_text(exp["exp"]), obj_id,
                                           category_ids[category], frames, anchor))
    return samples, problems


class YTVOSDataset(Dataset):
    """Ref-YouTube-VOS training clips: ``(imgs [T, 3, H, W], target)``.

    ``target`` keys: ``frames_idx`` [T] long, ``labels`` [T] long and ``category`` [] long (category ids),
    ``boxes`` [T, 4] (normalised cxcywh after ``Normalize``), ``masks`` [T, H, W] bool, ``valid`` [T] int32,
    ``caption``, ``orig_size`` and ``size`` ([h, w] long), ``video``, ``exp_id``, ``obj_id``. ``transforms=None`` only normalises.
    ``categories`` defaults to the 65 YTVOS classes (use ``synthetic.SYNTHETIC_CATEGORIES`` for the embedded set).
    ``expressions_per_clip`` k > 1: every item is ``(imgs, [target] * k)``, the sampled expression first, then
    expressions of the same video about other objects seen in the clip (distinct objects first), all under the
    same clip, frames and augmentation; ``collate_fn`` batches them expression-major.
    ``rng`` (clip sampling and redraws) defaults to the ``random`` module, which PyTorch reseeds in every DataLoader
    worker; a ``random.Random`` passed here is copied into each worker with the same state. The training loader
    wraps the dataset in :class:`bifit.data.samplers.PerSampleSeeded`, which reseeds the ``random`` module (and
    NumPy, torch) per item from (seed, rank, epoch, index): keep the default for reproducible resumes.
    ``exclude_videos``: videos whose samples are not listed (e.g. the held-out videos of
    :mod:`bifit.eval.ytvos_proxy`); their metadata is still checked with the rest of the split.
    """

    def __init__(self, root, split: str = "train", num_frames: int = 6, transforms=None,
                 categories: Sequence[str] | None = None, skip_bad_samples: bool = False, rng=None,
                 max_retries: int = 100, skip_log: str | Path | None = None, expressions_per_clip: int = 1,
                 exclude_videos: Iterable[str] = ()):
        if num_frames < 1:
            raise ValueError(f"YTVOSDataset.num_frames: expected >= 1, got {num_frames}")
        if expressions_per_clip < 1:
            raise ValueError(f"YTVOSDataset.expressions_per_clip: expected >= 1, got {expressions_per_clip}")
        self.expressions_per_clip = expressions_per_clip
        self.root, self.split, self.num_frames = Path(root), split, num_frames
        self.transforms = transforms if transforms is not None else Compose([Normalize()])
        self.categories = tuple(categories if categories is not None else YTVOS_CATEGORIES)
        self.skip_bad_samples, self.rng, self.max_retries = skip_bad_samples, rng or _random, max_retries
        self.skipped: list[dict] = []
        self.redraws = RedrawCounter(log, "Ref-YouTube-VOS")
        self.skip_log = None if skip_log is None else Path(skip_log)  # every skip is also appended here (JSONL)
        self._skipped_keys: set[tuple] = set()
        self._has_mask: dict[tuple[str, str], bool] = {}
        listed, problems = list_train_samples(self.root, split, num_frames, self.categories)
        excluded = set(exclude_videos)
        self.samples = [s for s in listed if s.video not in excluded]
        if problems and not skip_bad_samples:
            first = problems[0]
            more = f"{len(problems) - 1} more problem(s) in this split; " if len(problems) > 1 else ""
            raise SampleError(first.file, first.sample_id, first.reason,
                              f"{more}data.skip_bad_samples: true skips such samples and records them")
        for err in problems:
            self._record_skip(err)
        if not self.samples:
            left_out = f" once the {len(excluded)} excluded videos are left out" if listed else ""
            raise ValueError(f"{expressions_path(self.root, split)}: no usable training samples{left_out}")
        self._by_video: dict[str, dict[str, TrainSample]] = {}  # video -> exp_id -> its first sample
        for s in self.samples:
            self._by_video.setdefault(s.video, {}).setdefault(s.exp_id, s)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def redrawn(self) -> int:
        """Redraws in this process (DataLoader workers count their own; the items carry theirs)."""
        return self.redraws.count

    def __getitem__(self, idx: int):
        redraws = 0
        for _ in range(self.max_retries):
            try:
                imgs, target = self.load(self.samples[idx])
            except SampleError as err:
                if not self.skip_bad_samples:
                    raise
                self._record_skip(err, idx)
                idx = (idx + 1) % len(self)
                continue
            first = target[0] if isinstance(target, list) else target
            if torch.any(first["valid"] == 1):
                first[REDRAWN_KEY] = redraws
                return imgs, target
            self.redraws.add(idx, partial(self.no_valid_frame_reason, self.samples[idx], first))
            redraws += 1
            idx = self.rng.randint(0, len(self) - 1)  # no valid frame: redraw, as the reference does
        raise RuntimeError(f"{self.root / self.split}: no loadable clip with a valid frame after "
                           f"max_retries={self.max_retries} attempts (last: {self.samples[idx].sample_id})")

    def _record_skip(self, err: SampleError, index: int | None = None) -> None:
        """Record once per dataset index: ``{"file", "id", "reason", "index"}`` (index None: found at listing)."""
        key = index if index is not None else (err.file, err.sample_id)
        if key in self._skipped_keys:
            return
        self._skipped_keys.add(key)
        self.skipped.append({**err.record(), "index": index})
        if self.skip_log is not None:  # one short line per write: appends from several processes stay whole
            self.skip_log.parent.mkdir(parents=True, exist_ok=True)
            with self.skip_log.open("a") as fh:
                fh.write(json.dumps({**err.record(), "index": index}) + "\n")
        log.warning("skipping bad Ref-YouTube-VOS sample%s: %s", "" if index is None else f" {index}", err)

    def no_valid_frame_reason(self, sample: TrainSample, target: dict) -> str:
        frames = [sample.frames[p] for p in target["frames_idx"].tolist()]
        where = (f"{self.root / self.split / 'Annotations' / sample.video}: object id {sample.obj_id} has no mask in "
                 "any annotation PNG of the video" if not self.object_has_mask(sample)
                 else "no frame of the clip has the object after the transforms")
        return f"{where} [{sample.sample_id} frames {frames}]"

    def object_has_mask(self, sample: TrainSample) -> bool:
        """Whether any annotation PNG of the video contains the object's id (cached; read only for the warning
        about a redrawn clip, to tell a clip that missed the object from an object without any mask)."""
        key = (sample.video, sample.obj_id)
        if key not in self._has_mask:
            self._has_mask[key] = any(
                bool((load_id_map(self.frame_paths(sample.video, f)[1], sample.sample_id) == int(sample.obj_id)).any())
                for f in sample.frames)
        return self._has_mask[key]

    def frame_paths(self, video: str, frame: str) -> tuple[Path, Path]:
        split_dir = self.root / self.split
        return split_dir / "JPEGImages" / video / f"{frame}.jpg", split_dir / "Annotations" / video / f"{frame}.png"

    def video_expressions(self, video: str) -> list[TrainSample]:
        """One sample per expression of ``video`` (its first anchor) among the listed samples, in listing order
        (an excluded video has none)."""
        return list(self._by_video.get(video, {}).values())

    def partner_expressions(self, sample: TrainSample, present: set[str]) -> list[TrainSample]:
        """``expressions_per_clip - 1`` other expressions of the video whose objects are in ``present``: one per
        other object first (random order), then the remaining expressions, repeated if there are too few."""
        need = self.expressions_per_clip - 1
        others = [s for s in self.video_expressions(sample.video) if s.exp_id != sample.exp_id and s.obj_id in present]
        if not others:
            return [sample] * need
        self.rng.shuffle(others)
        picked, seen_objects = [], {sample.obj_id}
        for s in others:  # distinct other objects first
            if s.obj_id not in seen_objects:
                picked.append(s)
                seen_objects.add(s.obj_id)
        picked += [s for s in others if s not in picked]
        return [picked[i % len(picked)] for i in range(need)]

    def load(self, sample: TrainSample):
        """Load and transform one sample (raises SampleError on bad files)."""
        positions = sample_clip_indices(sample.anchor, len(sample.frames), self.num_frames, self.rng)
        clip, id_maps = [], []
        for pos in positions:
            frame = sample.frames[pos]
            img_path, ann_path = self.frame_paths(sample.video, frame)
            sid = f"{sample.sample_id} frame {frame}"
            img = load_image(img_path, sid)
            if clip and img.size != clip[0].size:  # the clip is stacked into one tensor: name the odd frame
                first = sample.frames[positions[0]]
                raise SampleError(img_path, sid, f"frame is {img.size[0]}x{img.size[1]} (WxH), the clip's frame "
                                  f"{first} is {clip[0].size[0]}x{clip[0].size[1]}; a video's frames must share one "
                                  "size")
            clip.append(img)
            id_maps.append(load_id_map(ann_path, sid, img.size))
        group = [sample]
        if self.expressions_per_clip > 1:
            present = {str(i) for ids in id_maps for i in np.unique(ids) if i}
            group += self.partner_expressions(sample, present)
        w, h = clip[0].size
        masks, boxes, valid = [], [], []  # [(k t), ...]: expression-major
        for member in group:
            for ids in id_maps:
                mask = ids == int(member.obj_id)
                masks.append(torch.from_numpy(mask))
                valid.append(int(mask.any()))
                boxes.append(torch.tensor(bounding_box(mask) if mask.any() else (0, 0, 0, 0), dtype=torch.float32))
        t = len(positions)
        boxes = torch.stack(boxes)  # [(k t), 4] absolute xyxy
        boxes[:, 0::2].clamp_(min=0, max=w)
        boxes[:, 1::2].clamp_(min=0, max=h)
        target = {
            "frames_idx": torch.tensor(positions, dtype=torch.long),
            "labels": torch.full((t,), sample.category_id, dtype=torch.long),
            "category": torch.tensor(sample.category_id, dtype=torch.long),  # the token-category head's target
            "boxes": boxes,
            "masks": torch.stack(masks).float(),  # [(k t), H, W]
            "valid": torch.tensor(valid, dtype=torch.int32),
            "caption": sample.caption,
            "orig_size": torch.tensor([h, w]),
            "size": torch.tensor([h, w]),
            "video": sample.video,
            "exp_id": sample.exp_id,
            "obj_id": sample.obj_id,
        }
        if len(group) > 1:
            target["captions"] = [m.caption for m in group]
        imgs, target = self.transforms(clip, target)
        target["masks"] = target["masks"].bool()
        if len(group) == 1:
            return imgs, target
        return imgs, split_group_target(target, group, t)


def split_group_target(target: dict, group: list[TrainSample], t: int) -> list[dict]:
    """A transformed target holding k expressions' rows ([(k t), ...]) -> k ordinary targets."""
    out = []
    for i, member in enumerate(group):
        rows = slice(i * t, (i + 1) * t)
        own = {k: v for k, v in target.items() if k != "captions"}
        own.update(boxes=target["boxes"][rows], masks=target["masks"][rows], valid=target["valid"][rows],
                   caption=target["captions"][i], exp_id=member.exp_id, obj_id=member.obj_id,
                   labels=torch.full((t,), member.category_id, dtype=torch.long),
                   category=torch.tensor(member.category_id, dtype=torch.long))
        if "area" in target:
            own["area"] = target["area"][rows]
        out.append(own)
    return out


# ----------------------------------------------------------------------------------------------------------------
# inference (whole videos)


@dataclass(frozen=True)
class Expression:
    video: str
    exp_id: str
    caption: str  # as written in the meta: the official inference does not normalise
    frames: tuple[str, ...]  # frame names in meta order
    obj_id: str | None  # present in train metas and in the synthetic valid meta


def inference_videos(root, split: str = "valid", expected_count: int | None = None) -> list[str]:
    """Sorted videos to run inference on; for "valid" the valid meta minus the test meta.

    ``expected_count`` (e.g. ``NUM_VALID_VIDEOS`` for the real data) raises ValueError when the count differs.
    """
    videos = sorted(video_ids(root, split))
    if expected_count is not None and len(videos) != expected_count:
        raise ValueError(f"{expressions_path(root, split)}: {len(videos)} {split} videos after filtering, "
                         f"expected {expected_count}")
    return videos


def inference_expressions(root, split: str = "valid", videos: Sequence[str] | None = None) -> list[Expression]:
    """Every expression of every inference video, grouped by video (sorted) in meta order."""
    path = expressions_path(root, split)
    meta = read_videos(path)
    out = []
    for vid in videos if videos is not None else inference_videos(root, split):
        if vid not in meta:
            raise KeyError(f"{path}: no video {vid!r}")
        problem = video_entry_problem(path, vid, meta[vid]) or next(
            (p for e, x in meta[vid]["expressions"].items()
             if (p := expression_problem(path, f"video {vid} exp_id {e}", x, need_obj_id=False, exp_id=e))), None)
        if problem:
            raise problem
        for exp_id, exp in meta[vid]["expressions"].items():
            obj_id = exp.get("obj_id")
            out.append(Expression(vid, str(exp_id), exp["exp"], tuple(meta[vid]["frames"]),
                                  None if obj_id is None else str(obj_id)))
    return out


def load_video(root, video: str, frames: Sequence[str], split: str = "valid", short_side: int = 360):
    """All listed frames as one clip for inference: ``(imgs [T, 3, h, w], (H, W) original size)``.

    Frames are resized with torchvision ``Resize(short_side)`` semantics (no cap) and normalised; every frame must
    have the size of the first. Cache the result per video: every expression of a video uses the same clip.
    """
    paths = [Path(root) / split / "JPEGImages" / video / f"{f}.jpg" for f in frames]
    clip = [load_image(p, f"video {video} frame {f}") for p, f in zip(paths, frames)]
    for p, img in zip(paths, clip):
        if img.size != clip[0].size:
            raise SampleError(p, f"video {video}", f"frame is {img.size[0]}x{img.size[1]} (WxH), expected "
                                                   f"{clip[0].size[0]}x{clip[0].size[1]} like {paths[0].name}")
    w, h = clip[0].size
    imgs, _ = make_video_eval_transform(short_side)(clip, {})
    return imgs, (h, w)


def load_gt_masks(root, video: str, frames: Sequence[str], obj_id: str, split: str = "valid") -> torch.Tensor:
    """Ground-truth masks [T, H, W] bool of one object (``valid/Annotations`` exists for the synthetic set only)."""
    ann_dir = Path(root) / split / "Annotations" / video
    masks = [load_id_map(ann_dir / f"{f}.png", f"video {video} obj_id {obj_id} frame {f}") == int(obj_id)
             for f in frames]
    return torch.from_numpy(np.stack(masks))
