"""A2D-Sentences loader (DATASETS_AND_EVAL.md sections 1.3, 1.7, 4.4 and 4.5) over the index written by
:mod:`bifit.data.a2d_preprocess`.

One sample per entry of the single-frame JSON: a T-frame clip of ``Release/clips320H/<video>.mp4`` (decoded with
PyAV, like torchvision's ``read_video``) around the annotated frame f = frame_idx - 1, and the target of that one
frame (section 1.3): ``labels`` [1] (0), ``boxes`` [1, 4], ``masks`` [1, H, W] bool, ``valid`` [1],
``valid_indices`` [1] (the position of f in the clip), ``frames_idx`` [T] (0-based), ``caption``, ``orig_size``,
``size``, ``image_id`` (string ``v_<video>_f_<frame>_i_<instance>``).

- training (``train=True``): the clip is sampled around f with the algorithm of section 1.7; a sample whose
  annotated frame is invalid after the transforms is replaced by a random other sample (as the reference does);
- evaluation: the window f - T//2 .. f + (T+1)//2 - 1 clamped into the video, sorted; deterministic, nothing is
  replaced (an empty GT mask is a sample like any other; the reference's redraw, pitfall 17, is not copied).

Bad data (a corrupt or truncated video, an annotated frame beyond the decoded frames, a missing mask PNG, a mask
whose size differs from the frames) raises :class:`~bifit.data.ytvos.SampleError` naming the file and the
image id. With ``skip_bad_samples`` it is recorded in ``dataset.skipped`` (``{"file", "id", "reason",
"index"}``): training serves the next sample instead; evaluation returns a :class:`SkippedSample` carrying
the record, which :func:`collate_skipping` separates from the batch (the engine scores the remaining samples and
writes the records). DataLoader workers hold copies of the dataset, so ``skipped`` is per process; the records
travel with the SkippedSample items.
"""

from __future__ import annotations

import json
import logging
import random as _random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from bifit.data.a2d_preprocess import read_mask_png
from bifit.data.collate import VideoBatch, collate_fn, normalize_text
from bifit.data.transforms import Compose, Normalize
from bifit.data.ytvos import SampleError, bounding_box, sample_clip_indices

log = logging.getLogger(__name__)


def centred_window(centre: int, first: int, last: int, num_frames: int) -> list[int]:
    """Eval clip: centre - T//2 .. centre + (T+1)//2 - 1, each clamped into [first, last], sorted (4.5, 5.4)."""
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


def read_video_frames(path: Path, sample_id: str) -> list[np.ndarray]:
    """Every frame of a video as RGB uint8 [H, W, 3] arrays, in decoding order."""
    import av

    try:
        with av.open(str(path)) as container:
            frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    except FileNotFoundError as err:
        raise SampleError(path, sample_id, "missing video file") from err
    except (av.error.FFmpegError, OSError, ValueError, IndexError) as err:
        raise SampleError(path, sample_id, f"corrupt or unreadable video ({err})") from err
    if not frames:
        raise SampleError(path, sample_id, "the video has no decodable frame")
    return frames


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
                return imgs, target
            idx = self.rng.randint(0, len(self) - 1)  # annotated frame invalid after augmentation: redraw
        raise RuntimeError(f"{self.index_path}: no loadable sample with a valid annotated frame after "
                           f"max_retries={self.max_retries} attempts (last: {self.samples[idx]['image_id']})")

    def _record_skip(self, err: SampleError, index: int) -> dict:
        record = {**err.record(), "index": index}
        if not any(r["index"] == index for r in self.skipped):
            self.skipped.append(record)
            log.warning("skipping bad %s sample %d: %s", self.dataset_name, index, err)
        return record

    def load_clip(self, sample: dict) -> tuple[list[Image.Image], list[int], int]:
        """(frames of the clip, their frame indices, position of the annotated frame in the clip)."""
        raise NotImplementedError

    def load(self, sample: dict):
        """Load and transform one sample (raises SampleError on bad files)."""
        iid = sample["image_id"]
        clip, frames_idx, position = self.load_clip(sample)
        mask_path = self.root / sample["mask"]
        mask = read_mask_png(mask_path, iid)
        w, h = clip[0].size
        if mask.shape != (h, w):
            raise SampleError(mask_path, iid, f"mask is {mask.shape[1]}x{mask.shape[0]} (WxH) but the frames are "
                                              f"{w}x{h}")
        box = torch.tensor([bounding_box(mask) if mask.any() else (0, 0, 0, 0)], dtype=torch.float32)  # [1, 4]
        box[:, 0::2].clamp_(min=0, max=w)
        box[:, 1::2].clamp_(min=0, max=h)
        target = {
            "frames_idx": torch.tensor(frames_idx, dtype=torch.long),
            "boxes": box,
            "masks": torch.from_numpy(mask)[None].float(),  # [1, H, W]
            "valid": torch.tensor([int(mask.any())], dtype=torch.int32),
            "caption": normalize_text(sample["query"]),
            "orig_size": torch.tensor([h, w]),
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
        self._cache: tuple[Path, list[np.ndarray]] | None = None

    def video_frames(self, path: Path, sample_id: str) -> list[np.ndarray]:
        if self._cache is None or self._cache[0] != path:
            self._cache = None
            self._cache = (path, read_video_frames(path, sample_id))
        return self._cache[1]

    def load_clip(self, sample: dict):
        path = self.raw_root / sample["video_file"]
        frames = self.video_frames(path, sample["image_id"])
        length, anchor = len(frames), sample["frame_idx"] - 1
        if not 0 <= anchor < length:
            raise SampleError(path, sample["image_id"], f"annotated frame {sample['frame_idx']} (1-based) is beyond "
                                                        f"the {length} decoded frames (truncated video?)")
        if self.train:
            positions = sample_clip_indices(anchor, length, self.num_frames, self.rng)
        else:
            positions = centred_window(anchor, 0, length - 1, self.num_frames)
        return [Image.fromarray(frames[p]) for p in positions], positions, positions.index(anchor)
