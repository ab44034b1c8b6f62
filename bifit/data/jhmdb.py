"""JHMDB-Sentences loader (eval samples built as the official loader builds them) over the index written by
:mod:`bifit.prepare.jhmdb`. Evaluation only (BIFIT evaluates the A2D model zero-shot).

One sample per entry of the released metadata: the frames c - T//2 .. c + (T+1)//2 - 1 clamped into
[1, video_total_frames] and sorted, read as ``<frame_dir>/<i:05d>.png`` (RGB), and the target of frame c:
``boxes`` [1, 4], ``masks`` [1, H, W] bool, ``valid`` [1], ``valid_indices`` [1], ``frames_idx`` [T] (1-based),
``caption``, ``orig_size``, ``size``, ``image_id`` (``v_<video>_f_<frame>``); no ``labels`` (the official JHMDB
loader has none).

A missing or corrupt frame PNG or a missing mask raises :class:`~bifit.data.ytvos.SampleError` naming the file
and the image id; with ``skip_bad_samples`` the sample is recorded and a :class:`bifit.data.a2d.SkippedSample` is returned
in its place (see :class:`bifit.data.a2d.CentredClipDataset`).
"""

from __future__ import annotations

from bifit.data.a2d import CentredClipDataset, centred_window
from bifit.data.ytvos import SampleError, load_image


class JHMDBDataset(CentredClipDataset):
    dataset_name = "JHMDB-Sentences"
    with_labels = False

    def __init__(self, root, num_frames: int = 6, transforms=None, skip_bad_samples: bool = False, raw_root=None):
        super().__init__(root, "index.json", num_frames, transforms, train=False, skip_bad_samples=skip_bad_samples,
                         raw_root=raw_root)

    def load_clip(self, sample: dict):
        frame_dir = self.raw_root / sample["frame_dir"]
        centre = sample["frame_idx"]
        positions = centred_window(centre, 1, sample["total_frames"], self.num_frames)
        clip = [load_image(frame_dir / f"{i:05d}.png", f"{sample['image_id']} frame {i}") for i in positions]
        for i, img in zip(positions, clip):
            if img.size != clip[0].size:
                raise SampleError(frame_dir / f"{i:05d}.png", sample["image_id"],
                                  f"frame is {img.size[0]}x{img.size[1]} (WxH), expected {clip[0].size[0]}x"
                                  f"{clip[0].size[1]} like frame {positions[0]}")
        return clip, positions, positions.index(centre)
