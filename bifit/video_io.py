"""Reading the videos a user brings and writing overlay videos: one place for every file format of
``python -m bifit.segment``, the Python API and the web demo.

Inputs (:func:`open_video`): a video file (.mp4, .avi, .mov, .webm, .mkv, .m4v; decoded with PyAV, frame by frame,
so a long video is never held in memory), a folder of frames (sorted naturally: ``2.jpg`` before ``10.jpg``), a
single image, or an in-memory uint8 array [T, H, W, 3]. Every input is probed when opened (readable, at least one
frame, one frame size) so that bad input fails before a model is loaded; the error names the file and what was
expected.

Outputs (:class:`VideoWriter`): H.264 in .mp4 (what players expect) or VP9 in .webm (what every browser plays), at a
given frame rate. Both need even sides (4:2:0 chroma): an odd-sized frame gets one more row or column, a copy of
its last one.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".webm", ".mkv", ".m4v")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
DEFAULT_FPS = Fraction(24)  # a frame folder or an image does not record one
WRITERS = {".mp4": ("libx264", {"crf": "18", "preset": "veryfast"}),
           ".webm": ("libvpx-vp9", {"crf": "32", "b": "0", "deadline": "realtime", "cpu-used": "8"})}


class VideoInputError(ValueError):
    """An input that cannot be segmented; the message names the file and what was expected."""


def natural_key(name: str) -> list:
    """Sort key that orders the digit runs of a name by value: "2.jpg" < "10.jpg", "f2_b" < "f10_a"."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part.lower()) for part in re.split(r"(\d+)", name)]


def _rgb(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"))


def read_image(path: Path) -> np.ndarray:
    """An image file -> RGB uint8 [H, W, 3]."""
    try:
        with Image.open(path) as img:
            return _rgb(img)
    except (UnidentifiedImageError, OSError) as err:
        raise VideoInputError(f"{path}: not a readable image ({err})") from None


@dataclass
class VideoSource:
    """A probed input: where its frames come from, their size and rate. ``frames()`` yields RGB uint8 [H, W, 3]
    in order (a video file is decoded again on every call, never held in memory)."""

    kind: str  # "video" | "frames" | "image" | "array"
    path: Path | None
    size: tuple[int, int]  # (H, W) of every frame
    fps: Fraction
    num_frames: int | None  # None: the container does not say (known once decoded)
    frame_files: list[Path] = field(default_factory=list)  # kind "frames" / "image"
    array: np.ndarray | None = None  # kind "array": [T, H, W, 3] uint8

    @property
    def name(self) -> str:
        return "array" if self.path is None else self.path.name

    def frame_name(self, index: int) -> str:
        """The output name of frame `index`: the file's stem for frames and images, else its zero-padded index."""
        return self.frame_files[index].stem if self.frame_files else f"{index:05d}"

    def frames(self) -> Iterator[np.ndarray]:
        if self.kind == "array":
            yield from self.array
        elif self.kind in ("frames", "image"):
            for path in self.frame_files:
                yield self._checked(read_image(path), path.name)
        else:
            yield from self._decoded()

    def _checked(self, rgb: np.ndarray, where: str) -> np.ndarray:
        if rgb.shape[:2] != self.size:
            raise VideoInputError(f"{self.path}: frame {where} is {rgb.shape[1]}x{rgb.shape[0]}, expected every "
                                  f"frame at {self.size[1]}x{self.size[0]} (the first frame's size)")
        return rgb

    def _decoded(self) -> Iterator[np.ndarray]:
        import av

        try:
            with av.open(str(self.path)) as container:
                stream = container.streams.video[0]
                stream.thread_type = "AUTO"  # frame-parallel decoding (frames still come out in order)
                for i, frame in enumerate(container.decode(stream)):
                    yield self._checked(frame.to_ndarray(format="rgb24"), f"#{i}")
        except av.error.FFmpegError as err:
            raise VideoInputError(f"{self.path}: decoding failed ({err})") from None


def _probe_video(path: Path) -> VideoSource:
    import av

    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError) as err:
        raise VideoInputError(f"{path}: not a readable video ({err}); expected a video file "
                              f"({', '.join(VIDEO_SUFFIXES)})") from None
    with container:
        if not container.streams.video:
            raise VideoInputError(f"{path}: has no video stream (streams: "
                                  f"{[s.type for s in container.streams] or 'none'})")
        stream = container.streams.video[0]
        try:
            first = next(iter(container.decode(stream)), None)
        except av.error.FFmpegError as err:
            raise VideoInputError(f"{path}: its first frame cannot be decoded ({err})") from None
        if first is None:
            raise VideoInputError(f"{path}: the video has no frames")
        rate = stream.average_rate or stream.guessed_rate or DEFAULT_FPS
        return VideoSource("video", path, (first.height, first.width), Fraction(rate), stream.frames or None)


def _probe_files(kind: str, path: Path, files: list[Path], fps: Fraction) -> VideoSource:
    first = read_image(files[0])
    return VideoSource(kind, path, first.shape[:2], fps, len(files), frame_files=files)


def open_video(video, fps: float | Fraction | None = None) -> VideoSource:
    """Probe `video`: a video file, a folder of frames, an image file, or a uint8 array [T, H, W, 3].

    fps: the frame rate of a frame folder, an image or an array (default 24); a video file's own rate is used."""
    rate = Fraction(fps).limit_denominator(1001) if fps else DEFAULT_FPS
    if fps is not None and rate <= 0:
        raise VideoInputError(f"fps: expected a positive frame rate, got {fps}")
    if isinstance(video, np.ndarray):
        if video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] != 3 or len(video) == 0:
            raise VideoInputError(f"video array: expected uint8 [T, H, W, 3] with T >= 1, got {video.dtype} "
                                  f"{list(video.shape)}")
        return VideoSource("array", None, video.shape[1:3], rate, len(video), array=video)
    path = Path(video)
    if path.is_dir():
        files = sorted((p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")),
                       key=lambda p: natural_key(p.name))
        if not files:
            raise VideoInputError(f"{path}: a folder with no frames (expected image files: "
                                  f"{', '.join(IMAGE_SUFFIXES)})")
        return _probe_files("frames", path, files, rate)
    if not path.exists():
        raise VideoInputError(f"{path}: no such file or folder")
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return _probe_files("image", path, [path], rate)
    if path.suffix.lower() not in VIDEO_SUFFIXES:
        raise VideoInputError(f"{path}: unknown kind of input {path.suffix!r}; expected a video "
                              f"({', '.join(VIDEO_SUFFIXES)}), a folder of frames or an image "
                              f"({', '.join(IMAGE_SUFFIXES)})")
    if path.stat().st_size == 0:
        raise VideoInputError(f"{path}: the file is empty")
    return _probe_video(path)


class VideoWriter:
    """Frames (RGB uint8 [H, W, 3], one size) -> a .mp4 (H.264) or .webm (VP9) file at `fps`."""

    def __init__(self, path: Path, fps: Fraction, size: tuple[int, int], threads: int = 0):
        import av

        self.path = Path(path)
        suffix = self.path.suffix.lower()
        if suffix not in WRITERS:
            raise ValueError(f"{self.path}: cannot write {suffix!r} videos; expected one of {sorted(WRITERS)}")
        codec, options = WRITERS[suffix]
        self.size = size
        self.container = av.open(str(self.path), "w")
        self.stream = self.container.add_stream(codec, rate=Fraction(fps).limit_denominator(65535))
        self.stream.height, self.stream.width = (s + s % 2 for s in size)
        self.stream.pix_fmt = "yuv420p"
        self.stream.options = {**options, "threads": str(threads)}
        self.frames = 0

    def write(self, rgb: np.ndarray) -> None:
        import av

        if rgb.shape[:2] != self.size:
            raise ValueError(f"{self.path}: frame {self.frames} is {rgb.shape[1]}x{rgb.shape[0]}, expected "
                             f"{self.size[1]}x{self.size[0]}")
        h, w = rgb.shape[:2]
        if h % 2 or w % 2:  # 4:2:0 needs even sides: repeat the last row / column
            rgb = np.pad(rgb, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
        for packet in self.stream.encode(frame):
            self.container.mux(packet)
        self.frames += 1

    def close(self) -> None:
        if self.container is None:
            return
        try:
            for packet in self.stream.encode():  # flush
                self.container.mux(packet)
        finally:
            self.container.close()
            self.container = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def write_video(path: Path, frames, fps: float | Fraction = DEFAULT_FPS) -> Path:
    """Frames [T, H, W, 3] uint8 -> a video file (.mp4 or .webm)."""
    frames = list(frames)
    with VideoWriter(path, Fraction(fps), frames[0].shape[:2]) as writer:
        for rgb in frames:
            writer.write(rgb)
    return Path(path)


def read_video(path: Path) -> np.ndarray:
    """Every frame of a video file -> [T, H, W, 3] uint8 (a test and example helper: holds them all)."""
    return np.stack(list(open_video(path).frames()))
