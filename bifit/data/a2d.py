"""A2D-Sentences loader (samples built as the official loader builds them) over the index written by
:mod:`bifit.prepare.a2d`.

One sample per entry of the single-frame JSON: a T-frame clip of ``Release/clips320H/<video>.mp4`` (decoded with
PyAV in presentation order, as torchvision's ``read_video`` returns it: :func:`read_video`) around the annotated
frame f = frame_idx - 1, and the target of that one frame: ``labels`` [1] (0), ``boxes`` [1, 4],
``masks`` [1, H, W] bool, ``valid`` [1], ``valid_indices`` [1] (the position of f in the clip), ``frames_idx`` [T]
(0-based), ``caption``, ``orig_size`` (the mask's size), ``size``, ``image_id`` (string
``v_<video>_f_<frame>_i_<instance>``).

- training (``train=True``): the clip is sampled around f as for Ref-YouTube-VOS
  (:func:`~bifit.data.ytvos.sample_clip_indices`); a sample whose annotated frame is invalid after the transforms
  is replaced by a random other sample (as the reference does), counted in ``dataset.redrawn`` and in
  ``target["redrawn_samples"]`` of the item served;
- evaluation: the window f - T//2 .. f + (T+1)//2 - 1 clamped into the video, sorted; deterministic, nothing is
  replaced (an empty GT mask is a sample like any other; the reference's redraw, which would leave that image id
  without a prediction, is not copied).

A mask whose size differs from the frames is resized to them with nearest neighbour, as the reference's
transforms do, and warned about (the preprocess stage records both sizes;
:func:`bifit.prepare.a2d.size_mismatches` counts them).
A frame that fails to decode is warned about and stands in as a copy of its neighbour (a context frame only).

Bad data (a missing, corrupt or truncated video, an annotated frame beyond the decoded frames or undecodable, a
missing mask PNG) raises :class:`~bifit.data.ytvos.SampleError` naming the file and the image id. With
``skip_bad_samples`` it is recorded in ``dataset.skipped`` (``{"file", "id", "reason", "index"}``): training
serves the next sample instead; evaluation returns a :class:`SkippedSample` carrying the record, which
:func:`collate_skipping` separates from the batch (the engine scores the remaining samples and writes the
records). DataLoader workers hold copies of the dataset, so ``skipped`` is per process; the records travel with
the SkippedSample items.
"""

from __future__ import annotations

import json
import logging
import random as _random
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as nnf
from PIL import Image
from torch.utils.data import Dataset

from bifit.data.collate import VideoBatch, collate_fn, normalize_text
from bifit.data.transforms import Compose, Normalize
from bifit.data.ytvos import REDRAWN_KEY, RedrawCounter, SampleError, bounding_box, sample_clip_indices
from bifit.prepare.a2d import read_mask_png

log = logging.getLogger(__name__)


def centred_window(centre: int, first: int, last: int, num_frames: int) -> list[int]:
    """Eval clip (A2D and JHMDB): centre - T//2 .. centre + (T+1)//2 - 1, each clamped into [first, last], sorted."""
    return sorted(min(max(i, first), last) for i in range(centre - num_frames // 2, centre + (num_frames + 1) // 2))


def read_index(path: Path) -> dict:
    """An index written by a preprocess stage: {"dataset", "split", "raw_root", "samples"}."""
    try:
        index = json.loads(Path(path).read_text())
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{path}: missing sample index; run the preprocess stage first") from err
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: invalid JSON ({err})") from err
    if not isinstance(index, dict) or not isinstance(index.get("samples"), list) or "raw_root" not in index:
        raise ValueError(f"{path}: expected an object with 'raw_root' and a 'samples' list (a preprocess index)")
    return index


@dataclass(frozen=True)
class DecodedVideo:
    """The frames of a video in presentation order, the official frame indexing (frame_idx - 1 is a position).

    ``undecodable``: positions whose packet failed to decode -> the reason; each holds a copy of the nearest
    decoded frame before it (after it for position 0), so later frames keep their positions.
    """

    frames: list[np.ndarray]
    undecodable: dict[int, str]


def decode_packets(path: Path, sample_id: str) -> tuple[dict[int, np.ndarray], dict[int, str]]:
    """(pts -> RGB frame, pts -> decode error) of the first video stream, packet by packet so that one bad
    packet loses one frame. A frame whose pts repeats replaces the earlier one, as the reference reader's
    pts-keyed dict does. A container error ends reading; what was decoded is kept (the reference does too)."""
    import av

    frames, failed = {}, {}
    try:
        with av.open(str(path)) as container:
            for packet in container.demux(container.streams.video[0]):
                try:
                    decoded = packet.decode()
                except av.error.FFmpegError as err:
                    if packet.pts is not None:  # the flush packet has none: nothing to place
                        failed[packet.pts] = str(err)
                    continue
                for frame in decoded:
                    frames[len(frames) if frame.pts is None else frame.pts] = frame.to_ndarray(format="rgb24")
    except FileNotFoundError as err:
        raise SampleError(path, sample_id, "missing video file") from err
    except (av.error.FFmpegError, OSError, ValueError, IndexError) as err:
        if not frames:
            raise SampleError(path, sample_id, f"corrupt or unreadable video ({err})") from err
        log.warning("%s: reading stopped after %d frames (%s); using the frames read [%s]", path, len(frames), err,
                    sample_id)
    return frames, failed


def read_video(path: Path, sample_id: str) -> DecodedVideo:
    """Every frame of a video as RGB uint8 [H, W, 3] arrays in presentation order, as the reference's
    ``torchvision.io.read_video(pts_unit="sec")`` returns them: sorted by pts, one frame per pts, frames before
    pts 0 left out (its start_pts is 0). A frame that fails to decode is warned about, naming the file and the
    frame, and stands in as a copy of its neighbour (see :class:`DecodedVideo`) instead of failing the video."""
    frames, failed = decode_packets(path, sample_id)
    order = sorted(pts for pts in set(frames) | set(failed) if pts >= 0)
    if not any(pts in frames for pts in order):
        raise SampleError(path, sample_id, "the video has no decodable frame")
    out, undecodable = [], {}
    for pos, pts in enumerate(order):
        if pts in frames:
            out.append(frames[pts])
            continue
        undecodable[pos] = f"frame {pos + 1} (pts {pts}) could not be decoded ({failed[pts]})"
        out.append(out[-1] if out else frames[next(p for p in order if p in frames)])
        log.warning("%s: %s; it holds a copy of its neighbour so later frames keep their numbers [%s]", path,
                    undecodable[pos], sample_id)
    return DecodedVideo(out, undecodable)


def read_video_frames(path: Path, sample_id: str) -> list[np.ndarray]:
    """The frames of :func:`read_video`."""
    return read_video(path, sample_id).frames


@dataclass(frozen=True)
class SkippedSample:
    """Returned in place of a bad eval sample when ``skip_bad_samples`` is set: {"file", "id", "reason", "index"}."""

    record: dict


def collate_skipping(batch) -> tuple[VideoBatch | None, list[dict]]:
    """(:func:`~bifit.data.collate.collate_fn` of the loaded samples or None, records of the skipped ones)."""
    kept = [b for b in batch if not isinstance(b, SkippedSample)]
    skipped = [b.record for b in batch if isinstance(b, SkippedSample)]
    return (collate_fn(kept) if kept else None), skipped


class CentredClipDataset(Dataset):
    """Shared by A2D and JHMDB: one annotated frame per sample, a T-frame clip around it, ``valid_indices``.

    Subclasses implement :meth:`load_clip` (the frames of the clip) and set ``dataset_name`` and ``with_labels``.
    ``root`` is the preprocess output; ``raw_root`` (default: the one recorded in the index, relative to ``root``)
    holds the videos or frames.
    """

    dataset_name = ""
    with_labels = True

    def __init__(self, root, index_name: str, num_frames: int = 6, transforms=None, train: bool = False,
                 skip_bad_samples: bool = False, rng=None, raw_root=None, max_retries: int = 100):
        if num_frames < 1:
            raise ValueError(f"{type(self).__name__}.num_frames: expected >= 1, got {num_frames}")
        self.root, self.num_frames, self.train = Path(root), num_frames, train
        self.index_path = self.root / index_name
        index = read_index(self.index_path)
        self.raw_root = Path(raw_root) if raw_root is not None else (self.root / index["raw_root"]).resolve()
        self.samples: list[dict] = index["samples"]
        if not self.samples:
            raise ValueError(f"{self.index_path}: no samples")
        self.transforms = transforms if transforms is not None else Compose([Normalize()])
        self.skip_bad_samples, self.rng, self.max_retries = skip_bad_samples, rng or _random, max_retries
        self.skipped: list[dict] = []
        self.redraws = RedrawCounter(log, self.dataset_name)
        self.resized_masks: set[str] = set()  # image ids whose mask was resized to the frame size (this process)

    @property
    def redrawn(self) -> int:
        """Training redraws in this process (DataLoader workers count their own; the items carry theirs)."""
        return self.redraws.count

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, idx: int):
        if not self.train:
            try:
                return self.load(self.samples[idx])
            except SampleError as err:
                if not self.skip_bad_samples:
                    raise
                return SkippedSample(self._record_skip(err, idx))
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
            if int(target["valid"][0]) == 1:
                target[REDRAWN_KEY] = redraws
                return imgs, target
            self.redraws.add(idx, partial(self.invalid_frame_reason, self.samples[idx]))
            redraws += 1
            idx = self.rng.randint(0, len(self) - 1)  # annotated frame invalid: redraw, as the reference does
        raise RuntimeError(f"{self.index_path}: no loadable sample with a valid annotated frame after "
                           f"max_retries={self.max_retries} attempts (last: {self.samples[idx]['image_id']})")

    def _record_skip(self, err: SampleError, index: int) -> dict:
        record = {**err.record(), "index": index}
        if not any(r["index"] == index for r in self.skipped):
            self.skipped.append(record)
            log.warning("skipping bad %s sample %d: %s", self.dataset_name, index, err)
        return record

    def invalid_frame_reason(self, sample: dict) -> str:
        why = "its mask is empty" if sample.get("empty") else "no valid box is left after the transforms"
        return f"the annotated frame {sample['frame_idx']} has no valid mask: {why} [{sample['image_id']}]"

    def fit_mask(self, mask: np.ndarray, frame_hw: tuple[int, int], path: Path, sample_id: str) -> np.ndarray:
        """The mask on the frames' grid. The reference resizes the frames and the mask of a sample together to
        one size computed from the frames, the mask with nearest neighbour; resizing it to the frame size here
        does the same and keeps every later transform consistent (``orig_size`` stays the mask's size, the GT's)."""
        if sample_id not in self.resized_masks:
            self.resized_masks.add(sample_id)
            log.warning("%s: mask is %dx%d (WxH) but the frames are %dx%d; resized to the frames with nearest "
                        "neighbour, as the reference's transforms do [%s]", path, mask.shape[1], mask.shape[0],
                        frame_hw[1], frame_hw[0], sample_id)
        resized = nnf.interpolate(torch.from_numpy(mask)[None, None].float(), size=frame_hw, mode="nearest")
        return resized[0, 0].numpy() > 0.5

    def load_clip(self, sample: dict) -> tuple[list[Image.Image], list[int], int]:
        """(frames of the clip, their frame indices, position of the annotated frame in the clip)."""
        raise NotImplementedError

    def load(self, sample: dict):
        """Load and transform one sample (raises SampleError on bad files)."""
        iid = sample["image_id"]
        clip, frames_idx, position = self.load_clip(sample)
        mask_path = self.root / sample["mask"]
        mask = read_mask_png(mask_path, iid)
        mask_h, mask_w = mask.shape
        w, h = clip[0].size
        if mask.shape != (h, w):
            mask = self.fit_mask(mask, (h, w), mask_path, iid)
        box = torch.tensor([bounding_box(mask) if mask.any() else (0, 0, 0, 0)], dtype=torch.float32)  # [1, 4]
        box[:, 0::2].clamp_(min=0, max=w)
        box[:, 1::2].clamp_(min=0, max=h)
        target = {
            "frames_idx": torch.tensor(frames_idx, dtype=torch.long),
            "boxes": box,
            "masks": torch.from_numpy(mask)[None].float(),  # [1, H, W]
            "valid": torch.tensor([int(mask.any())], dtype=torch.int32),
            "caption": normalize_text(sample["query"]),
            "orig_size": torch.tensor([mask_h, mask_w]),  # the GT's size: predictions are resized back to it
            "size": torch.tensor([h, w]),
            "valid_indices": torch.tensor([position], dtype=torch.long),
            "image_id": iid,
        }
        if self.with_labels:
            target["labels"] = torch.zeros(1, dtype=torch.long)
        imgs, target = self.transforms(clip, target)
        target["masks"] = target["masks"].bool()
        return imgs, target


class A2DDataset(CentredClipDataset):
    """A2D-Sentences samples of ``split`` ("train" or "test") from the preprocess output ``root``.

    ``train`` defaults to ``split == "train"`` (random clip sampling, train transforms expected); ``rng`` (clip
    sampling and redraws) defaults to the ``random`` module. The decoded frames of the last video are cached, and
    the index lists samples grouped by video, so a pass decodes each video about once.
    """

    dataset_name = "A2D-Sentences"

    def __init__(self, root, split: str = "test", num_frames: int = 6, transforms=None, train: bool | None = None,
                 skip_bad_samples: bool = False, rng=None, raw_root=None, max_retries: int = 100):
        if split not in ("train", "test"):
            raise ValueError(f"A2DDataset.split: expected 'train' or 'test', got {split!r}")
        super().__init__(root, f"index_{split}.json", num_frames, transforms,
                         split == "train" if train is None else train, skip_bad_samples, rng, raw_root, max_retries)
        self.split = split
        self._cache: tuple[Path, DecodedVideo] | None = None

    def video(self, path: Path, sample_id: str) -> DecodedVideo:
        if self._cache is None or self._cache[0] != path:
            self._cache = None
            self._cache = (path, read_video(path, sample_id))
        return self._cache[1]

    def load_clip(self, sample: dict):
        path = self.raw_root / sample["video_file"]
        video = self.video(path, sample["image_id"])
        frames, length, anchor = video.frames, len(video.frames), sample["frame_idx"] - 1
        if not 0 <= anchor < length:
            raise SampleError(path, sample["image_id"], f"annotated frame {sample['frame_idx']} (1-based) is beyond "
                                                        f"the {length} decoded frames (truncated video?)")
        if anchor in video.undecodable:  # a context frame may stand in; the annotated one may not
            raise SampleError(path, sample["image_id"], f"the annotated {video.undecodable[anchor]}")
        if self.train:
            positions = sample_clip_indices(anchor, length, self.num_frames, self.rng)
        else:
            positions = centred_window(anchor, 0, length - 1, self.num_frames)
        return [Image.fromarray(frames[p]) for p in positions], positions, positions.index(anchor)
