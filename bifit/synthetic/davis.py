"""A tiny synthetic Ref-DAVIS17 written as the three official downloads.

The scenes are the moving shapes of :mod:`bifit.synthetic` (same expression grammar, so the embedded text
encoder covers them). ``generate_ref_davis(cfg, folder)`` writes into ``folder``::

    DAVIS-2017-Unsupervised-trainval-480p.zip
        DAVIS/README.md, DAVIS/SOURCES.md                      documentation
        DAVIS/JPEGImages/480p/<seq>/00000.jpg ...            contiguous frames from 00000
        DAVIS/Annotations_unsupervised/480p/<seq>/00000.png   palette PNG: k = object k, 0 background, 255 void
        DAVIS/ImageSets/2017/train.txt, val.txt
    DAVIS-2017_semantics-480p.zip
        DAVIS/README.md, DAVIS/SOURCES.md                      the same names, other contents
        DAVIS/davis_semantics.json                             seq -> {"1": category, ...}
    davis_text_annotations.zip
        davis_text_annotations/Davis17_annot1.txt, Davis17_annot1_full_video.txt   (UTF-8)
        davis_text_annotations/Davis17_annot2.txt, Davis17_annot2_full_video.txt   (latin-1)
    SYNTHETIC_DAVIS.json                                        generator, config, SHA-256 of the three zips

so that the download stage (safe extraction) and the conversion of :mod:`bifit.prepare.davis` run on it as on
the real files. The quirks of the real release are reproduced on purpose:

- object ids are numbered in order of first appearance, so an object that enters after the first frame may lie
  beyond the first frame's largest id and is then not a GT object of the unsupervised protocol;
- a 1-pixel ring of void (255) around object 1 in every third frame;
- the text files spell three sequences wrongly (``clasic-car``, ``dog-scale``, ``motor-bike``) when sequences of
  those names exist (the first train sequences are named ``classic-car``, ``dogs-scale``, ``motorbike``);
- the annotator-2 files are latin-1 and one sentence holds a non-ASCII character (the first val sequence's
  first annotator-2 first-frame expression ends with "near the café");
- in the last train sequence annotator 2's full-video file lacks its last object, so the four lists have different
  lengths and the conversion keeps the shortest;
- both DAVIS zips carry top-level documentation files of the same names and different contents, so extracting
  them one after the other (as the official ``unzip`` instructions do) replaces the first zip's copies.

Each object gets four expressions: annotator 1 first-frame / full-video and annotator 2 first-frame / full-video
(the generator's descriptions, reused in turn when an object has fewer than four distinct ones).
Deterministic in ``SyntheticDavisConfig.seed``: the written zips are byte-identical across runs.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from bifit.config import check, int_in
from bifit.prepare.archive import sha256_file
from bifit.synthetic.config import SyntheticConfig
from bifit.synthetic.video import Video, make_video
from bifit.synthetic.ytvos import PALETTE

# 2: shared documentation files in the two DAVIS zips; 3: expression kinds drawn as in the Ref-YouTube-VOS
# generator's version 2
GENERATOR_VERSION = 3
MANIFEST_NAME = "SYNTHETIC_DAVIS.json"
GENERATOR = "bifit.synthetic.davis"
TRAINVAL_ZIP = "DAVIS-2017-Unsupervised-trainval-480p.zip"
SEMANTICS_ZIP = "DAVIS-2017_semantics-480p.zip"
TEXT_ZIP = "davis_text_annotations.zip"
ANNOTATION_FILES = ("Davis17_annot1.txt", "Davis17_annot1_full_video.txt", "Davis17_annot2.txt",
                    "Davis17_annot2_full_video.txt")
ANNOTATION_ENCODINGS = ("utf-8", "utf-8", "latin-1", "latin-1")
MISSPELLED = {"classic-car": "clasic-car", "dogs-scale": "dog-scale", "motorbike": "motor-bike"}
TRAIN_NAMES = ("classic-car", "dogs-scale", "motorbike", "bear", "boat", "bus", "car-turn", "dance-jump")
VAL_NAMES = ("blackswan", "bmx-trees", "camel", "cows", "dog", "goat", "judo", "libby")
VOID = 255
_ZIP_TIME = (2017, 1, 1, 0, 0, 0)
SHARED_DOCS = ("DAVIS/README.md", "DAVIS/SOURCES.md")  # in both DAVIS zips, with different contents


@dataclass(frozen=True)
class SyntheticDavisConfig:
    seed: int = 7
    num_train_videos: int = 2
    num_val_videos: int = 2
    frames_per_video: int = 26  # > 24 so BIFIT's 24-frame Ref-DAVIS inference clips are exercised
    height: int = 192  # multiples of 32 (the scene generator's grid); the real frames are 480 high
    width: int = 320
    jpeg_quality: int = 90

    def __post_init__(self):
        self.validate()

    def validate(self, where: str = "SyntheticDavisConfig"):
        for name, lo, hi in (("seed", 0, 2**32 - 1), ("num_train_videos", 1, 1000), ("num_val_videos", 1, 1000),
                             ("frames_per_video", 4, 1000), ("height", 96, 2048), ("width", 96, 2048),
                             ("jpeg_quality", 50, 100)):
            check(int_in(getattr(self, name), lo, hi), f"{where}.{name}", f"an int in [{lo}, {hi}]", getattr(self, name))
        for name in ("height", "width"):
            check(getattr(self, name) % 32 == 0, f"{where}.{name}", "a multiple of 32", getattr(self, name))

    def scene_config(self) -> SyntheticConfig:
        return SyntheticConfig(seed=self.seed, num_train_videos=self.num_train_videos,
                               num_valid_videos=self.num_val_videos, num_test_videos=0,
                               frames_per_video=self.frames_per_video, frame_stride=1, height=self.height,
                               width=self.width, expressions_per_object=4, jpeg_quality=self.jpeg_quality)


def sequence_names(split: str, count: int) -> list[str]:
    names = TRAIN_NAMES if split == "train" else VAL_NAMES
    return [names[i] if i < len(names) else f"{split}-synthetic-{i:03d}" for i in range(count)]


# ----------------------------------------------------------------------------------------------------------------
# one sequence


@dataclass
class DavisSequence:
    name: str
    rgb: np.ndarray  # [T, H, W, 3] uint8
    labels: np.ndarray  # [T, H, W] uint8: 0 background, k object k, 255 void
    categories: list[str]  # category of object k at index k - 1
    expressions: list[list[str]]  # per object k - 1: the four sentences (annotator 1 first/full, 2 first/full)


def first_appearance_order(video: Video) -> list[int]:
    """Generator object ids ordered by first visible frame (ties: by id)."""
    ids = video.scene.id_maps
    first = {o.obj_id: int(np.argmax((ids == o.obj_id).any(axis=(1, 2)))) if (ids == o.obj_id).any() else len(ids)
             for o in video.scene.objects}
    return sorted(first, key=lambda i: (first[i], i))


def void_ring(mask: np.ndarray) -> np.ndarray:
    """The 1-pixel inner boundary of a binary mask (pixels with a 4-neighbour outside it)."""
    inner = mask.copy()
    inner[1:] &= mask[:-1]
    inner[:-1] &= mask[1:]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return mask & ~inner


def make_sequence(cfg: SyntheticDavisConfig, split: str, index: int, name: str) -> DavisSequence:
    video = make_video(cfg.scene_config(), "train" if split == "train" else "valid", index)
    order = first_appearance_order(video)
    lut = np.zeros(256, dtype=np.uint8)
    for new, old in enumerate(order, 1):
        lut[old] = new
    labels = lut[video.scene.id_maps]
    for t in range(1, len(labels), 3):
        labels[t][void_ring(labels[t] == 1)] = VOID
    texts: dict[int, list[str]] = {}
    for obj_id, _, text in video.expressions:
        texts.setdefault(obj_id, []).append(text)
    expressions = [[texts[old][i % len(texts[old])] for i in range(4)] for old in order]
    categories = [video.scene.by_id(old).shape for old in order]
    return DavisSequence(name, video.rgb, labels, categories, expressions)


# ----------------------------------------------------------------------------------------------------------------
# writing


def _zip_entry(zf: zipfile.ZipFile, name: str, data: bytes, compress: bool) -> None:
    info = zipfile.ZipInfo(name, date_time=_ZIP_TIME)
    info.external_attr = 0o644 << 16
    zf.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED)


def _image_bytes(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def documentation(zip_name: str) -> dict[str, bytes]:
    """The shared documentation files of one DAVIS zip (contents differ between the zips, as in the release)."""
    readme, sources = SHARED_DOCS
    return {readme: f"# {zip_name}\n\nSynthetic stand-in for the DAVIS 2017 release notes.\n".encode(),
            sources: f"# Sources of {zip_name}\n\nGenerated by {GENERATOR}.\n".encode()}


def _write_documentation(zf: zipfile.ZipFile, zip_name: str) -> None:
    for name, data in documentation(zip_name).items():
        _zip_entry(zf, name, data, compress=True)


def annotation_lines(sequences: list[DavisSequence], column: int, last_train: str, first_val: str) -> list[str]:
    """One annotator file: ``<video> <obj_id> "<sentence>"`` per object, misspelled names as in the release."""
    lines = []
    for seq in sequences:
        n = len(seq.expressions)
        if column == 3 and seq.name == last_train and n > 1:
            n -= 1  # this annotator skipped the last object: the lists differ in length
        for k in range(n):
            text = seq.expressions[k][column]
            if column == 2 and seq.name == first_val and k == 0:
                text += " near the café"
            lines.append(f'{MISSPELLED.get(seq.name, seq.name)} {k + 1} "{text}"')
    return lines


def _write_zips(cfg: SyntheticDavisConfig, folder: Path, progress: bool) -> dict:
    splits = {"train": sequence_names("train", cfg.num_train_videos),
              "val": sequence_names("val", cfg.num_val_videos)}
    total = cfg.num_train_videos + cfg.num_val_videos
    sequences: list[DavisSequence] = []
    tmp = {n: folder / f".{n}.partial-{os.getpid()}" for n in (TRAINVAL_ZIP, SEMANTICS_ZIP, TEXT_ZIP)}
    try:
        with zipfile.ZipFile(tmp[TRAINVAL_ZIP], "w") as zf, \
                tqdm(total=total, desc="synthetic Ref-DAVIS17", unit="video", disable=not progress) as bar:
            _write_documentation(zf, TRAINVAL_ZIP)
            for split, names in splits.items():
                _zip_entry(zf, f"DAVIS/ImageSets/2017/{split}.txt", "".join(f"{n}\n" for n in sorted(names)).encode(),
                           compress=True)
            for split, names in splits.items():
                for index, name in enumerate(names):
                    seq = make_sequence(cfg, split, index, name)
                    for t in range(len(seq.rgb)):
                        jpg = _image_bytes(Image.fromarray(seq.rgb[t]), "JPEG", quality=cfg.jpeg_quality)
                        _zip_entry(zf, f"DAVIS/JPEGImages/480p/{name}/{t:05d}.jpg", jpg, compress=False)
                        png = Image.fromarray(seq.labels[t], mode="P")
                        png.putpalette(PALETTE)
                        _zip_entry(zf, f"DAVIS/Annotations_unsupervised/480p/{name}/{t:05d}.png",
                                   _image_bytes(png, "PNG"), compress=False)
                    sequences.append(seq)
                    bar.update(1)
        semantics = {s.name: {str(k + 1): c for k, c in enumerate(s.categories)} for s in sequences}
        with zipfile.ZipFile(tmp[SEMANTICS_ZIP], "w") as zf:
            _write_documentation(zf, SEMANTICS_ZIP)
            _zip_entry(zf, "DAVIS/davis_semantics.json", json.dumps(semantics, indent=1).encode(), compress=True)
        last_train = splits["train"][-1]
        with zipfile.ZipFile(tmp[TEXT_ZIP], "w") as zf:
            for column, (fname, enc) in enumerate(zip(ANNOTATION_FILES, ANNOTATION_ENCODINGS)):
                lines = annotation_lines(sequences, column, last_train, splits["val"][0])
                text = "\n".join(lines) + "\n"
                _zip_entry(zf, f"davis_text_annotations/{fname}", text.encode(enc), compress=True)
        for name, path in tmp.items():
            os.replace(path, folder / name)
    finally:
        for path in tmp.values():
            path.unlink(missing_ok=True)
    return {"train_videos": cfg.num_train_videos, "val_videos": cfg.num_val_videos,
            "objects": sum(len(s.categories) for s in sequences), "frames": total * cfg.frames_per_video,
            "train": splits["train"], "val": splits["val"]}


def read_manifest(folder) -> dict | None:
    try:
        manifest = json.loads((Path(folder) / MANIFEST_NAME).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return manifest if manifest.get("generator") == GENERATOR else None


def archive_names() -> tuple[str, str, str]:
    return TRAINVAL_ZIP, SEMANTICS_ZIP, TEXT_ZIP


def generate_ref_davis(cfg: SyntheticDavisConfig, folder, progress: bool = True) -> dict:
    """Write the three synthetic Ref-DAVIS17 zips and their manifest into ``folder``; returns the summary.

    Idempotent: when the manifest records this version and config and the zips still have the recorded
    SHA-256, nothing is written (``generated`` False). Existing zips with these names that this generator did not
    write (no manifest of ours) are never replaced: a FileExistsError names them.
    """
    folder = Path(folder)
    config = json.loads(json.dumps(asdict(cfg)))
    manifest = read_manifest(folder)
    if manifest and manifest["version"] == GENERATOR_VERSION and manifest["config"] == config and all(
            (folder / n).is_file() and sha256_file(folder / n) == h for n, h in manifest["sha256"].items()):
        return {**manifest["summary"], "generated": False}
    if manifest is None:
        foreign = [n for n in archive_names() if (folder / n).exists()]
        if foreign:
            raise FileExistsError(f"{folder}: {', '.join(foreign)} exist and were not written by {GENERATOR} (no "
                                  f"{MANIFEST_NAME}); refusing to replace real downloads with synthetic ones")
    folder.mkdir(parents=True, exist_ok=True)
    summary = _write_zips(cfg, folder, progress)
    sums = {n: sha256_file(folder / n) for n in archive_names()}
    (folder / MANIFEST_NAME).write_text(json.dumps({"generator": GENERATOR, "version": GENERATOR_VERSION,
                                                    "config": config, "sha256": sums, "summary": summary},
                                                   indent=1) + "\n")
    return {**summary, "generated": True}
