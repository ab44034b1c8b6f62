"""bifit.video_io: every input kind read in order at its size and rate, bad input refused naming the file, and
videos written that read back with the same frame count, size and rate."""

from fractions import Fraction

import numpy as np
import pytest
from PIL import Image

from bifit.video_io import VideoInputError, VideoWriter, natural_key, open_video, read_video, write_video


def _frames(t=5, h=48, w=64):
    yy, xx = np.mgrid[:h, :w]
    base = np.stack([xx * 255 // w, yy * 255 // h, np.full_like(xx, 90)], -1).astype(np.uint8)  # smooth: codable
    out = []
    for i in range(t):
        frame = base.copy()
        frame[10:30, 4 + 6 * i : 20 + 6 * i] = (230, 40, 40)  # a red block moving right
        out.append(frame)
    return np.stack(out)


def test_natural_order():
    names = ["10.jpg", "2.jpg", "1.jpg", "frame_10_b.png", "frame_9_a.png", "Frame_9_b.png"]
    assert sorted(names, key=natural_key) == ["1.jpg", "2.jpg", "10.jpg", "frame_9_a.png", "Frame_9_b.png",
                                              "frame_10_b.png"]


def test_frame_folder_is_read_in_natural_order_at_its_size(tmp_path):
    frames = _frames()
    for i, rgb in enumerate(frames):  # 0, 2, ..., 8 -- and 10 would sort before 2 as text
        Image.fromarray(rgb).save(tmp_path / f"{2 * i if i < 4 else 10}.png")
    (tmp_path / "notes.txt").write_text("not a frame")
    (tmp_path / ".hidden.png").write_bytes(b"")
    src = open_video(tmp_path, fps=12)
    assert (src.kind, src.size, src.fps, src.num_frames) == ("frames", (48, 64), Fraction(12), 5)
    assert [src.frame_name(i) for i in range(5)] == ["0", "2", "4", "6", "10"]
    np.testing.assert_array_equal(np.stack(list(src.frames())), frames)


def test_single_image_and_array(tmp_path):
    frames = _frames(2)
    Image.fromarray(frames[0]).save(tmp_path / "one.png")
    src = open_video(tmp_path / "one.png")
    assert (src.kind, src.num_frames, src.fps, src.frame_name(0)) == ("image", 1, Fraction(24), "one")
    np.testing.assert_array_equal(next(src.frames()), frames[0])
    arr = open_video(frames, fps=Fraction(30000, 1001))
    assert arr.kind == "array" and arr.fps == Fraction(30000, 1001) and arr.frame_name(1) == "00001"
    assert open_video(frames, fps=12.5).fps == Fraction(25, 2)


@pytest.mark.parametrize("suffix,codec", [(".mp4", "libx264"), (".webm", "libvpx-vp9"), (".avi", "mpeg4"),
                                          (".mov", "libx264")])
def test_video_files_of_each_container_decode_every_frame(tmp_path, suffix, codec):
    import av

    frames = _frames(7, 45, 63)  # odd sides
    path = tmp_path / f"clip{suffix}"
    if suffix in (".mp4", ".webm"):
        write_video(path, frames, fps=10)
    else:
        with av.open(str(path), "w") as container:
            stream = container.add_stream(codec, rate=10)
            stream.width, stream.height, stream.pix_fmt = 64, 46, "yuv420p"
            for rgb in frames:
                padded = np.pad(rgb, ((0, 1), (0, 1), (0, 0)), mode="edge")
                for packet in stream.encode(av.VideoFrame.from_ndarray(padded, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
    src = open_video(path)
    assert src.kind == "video" and src.fps == Fraction(10)
    decoded = np.stack(list(src.frames()))
    assert len(decoded) == 7
    if suffix in (".mp4", ".webm"):  # our writer keeps the odd size: the padded row / column is not part of it
        assert src.size == (46, 64)  # the container's even size
        err = np.abs(decoded[:, :45, :63].astype(int) - frames.astype(int)).mean()
        assert err < 25, f"{suffix}: mean abs error {err} after lossy coding"


def test_bad_inputs_are_named(tmp_path):
    with pytest.raises(VideoInputError, match=r"none.mp4: no such file or folder"):
        open_video(tmp_path / "none.mp4")
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(VideoInputError, match=r"empty.mp4: the file is empty"):
        open_video(tmp_path / "empty.mp4")
    (tmp_path / "text.mp4").write_text("not a video at all" * 100)
    with pytest.raises(VideoInputError, match=r"text.mp4: not a readable video"):
        open_video(tmp_path / "text.mp4")
    (tmp_path / "x.pdf").write_text("%PDF")
    with pytest.raises(VideoInputError, match=r"x.pdf: unknown kind of input '.pdf'"):
        open_video(tmp_path / "x.pdf")
    (tmp_path / "frames").mkdir()
    with pytest.raises(VideoInputError, match=r"frames: a folder with no frames"):
        open_video(tmp_path / "frames")
    Image.new("RGB", (64, 48)).save(tmp_path / "frames" / "1.png")
    Image.new("RGB", (32, 48)).save(tmp_path / "frames" / "2.png")
    with pytest.raises(VideoInputError, match=r"frames: frame 2.png is 32x48, expected every frame at 64x48"):
        list(open_video(tmp_path / "frames").frames())
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    with pytest.raises(VideoInputError, match=r"broken.jpg: not a readable image"):
        open_video(tmp_path / "broken.jpg")
    with pytest.raises(VideoInputError, match=r"expected uint8 \[T, H, W, 3\]"):
        open_video(np.zeros((0, 4, 4, 3), np.uint8))
    # a file with sound and no picture
    import av

    with av.open(str(tmp_path / "audio.mp4"), "w") as container:
        stream = container.add_stream("aac", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 8000
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)
    with pytest.raises(VideoInputError, match=r"audio.mp4: has no video stream \(streams: \['audio'\]\)"):
        open_video(tmp_path / "audio.mp4")


def test_writer_keeps_rate_and_count(tmp_path):
    frames = _frames(9)
    with VideoWriter(tmp_path / "o.webm", Fraction(30000, 1001), (48, 64)) as writer:
        for rgb in frames:
            writer.write(rgb)
        with pytest.raises(ValueError, match=r"o.webm: frame 9 is 32x48, expected 64x48"):
            writer.write(np.zeros((48, 32, 3), np.uint8))
    src = open_video(tmp_path / "o.webm")
    assert src.fps == Fraction(30000, 1001) and read_video(tmp_path / "o.webm").shape == (9, 48, 64, 3)
    with pytest.raises(ValueError, match=r"o.gif: cannot write '.gif' videos"):
        VideoWriter(tmp_path / "o.gif", Fraction(10), (48, 64))
