"""Where the four benchmarks (and the RefCOCO/+/g image data ReferFormer pretrains on) come from and what a complete download
looks like (all paths relative to the dataset root).

For every dataset: the files to obtain (:class:`SourceFile`: a direct URL when the file is publicly fetchable,
otherwise the page to download it from by hand, and where to put it), the archives among them and the folder
they are extracted into, and the manifest of the expected layout after extraction (:func:`real_manifest`: exact
counts where the release fixes the number, minimums where official copies legitimately differ).
:func:`synthetic_manifest` is the same layout at the size of the generated copy.
:func:`instructions` renders the "place these files there" text printed by the download stage.

The URLs are the ones the official docs and MTTR's preparation script give; several are reported dead or moved
(the JHMDB release files, the Ref-YouTube-VOS competition). Nothing here downloads; :func:`fetch` does, only for
files with a URL and only when asked.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from bifit.prepare.manifest import Expect, Manifest


@dataclass(frozen=True)
class SourceFile:
    name: str  # file name as downloaded
    dest: str  # where it goes, relative to the dataset root
    page: str  # where to get it (registration / Google Drive / project page)
    url: str | None = None  # direct URL when publicly fetchable
    extract_to: str | None = None  # archives: folder (relative to the root) they are extracted into
    note: str = ""

    @property
    def is_archive(self) -> bool:
        return self.extract_to is not None


YTVOS_PAGE = "https://competitions.codalab.org/competitions/29139#participate-get_data (free sign-up)"
DAVIS_PAGE = "https://davischallenge.org/davis2017/code.html"
DAVIS_TEXT_PAGE = ("https://www.mpi-inf.mpg.de/departments/computer-vision-and-machine-learning/research/"
                   "video-segmentation/video-object-segmentation-with-language-referring-expressions")
A2D_PAGE = "https://kgavrilyuk.github.io/publication/actor_action/"
A2D_JSON_PAGE = "https://drive.google.com/drive/folders/1qYsJEGQxhKM99HSp6bkS11G-85f5NSB-?usp=sharing (MTTR JSON files)"
JHMDB_JSON_PAGE = "https://drive.google.com/drive/folders/1lzn4W9m8wF2cFfu7Zdde4nI215yU2CKb?usp=sharing (MTTR JSON files)"
COCO_PAGE = "https://cocodataset.org/#download"
REFER_PAGE = "https://github.com/lichengunc/refer (its README links the refcoco, refcoco+ and refcocog zips)"
COCO_TRAIN2014_IMAGES = 82783  # exact: the COCO 2014 train set
REFCOCO_SPLIT_BY = {"refcoco": "unc", "refcoco+": "unc", "refcocog": "umd"}  # the refs file each dataset uses

SOURCES: dict[str, list[SourceFile]] = {
    "ytvos": [
        SourceFile("train.zip", "downloads/train.zip", YTVOS_PAGE, extract_to=".",
                   note="train/JPEGImages, train/Annotations (and train/meta.json, which this archive often lacks)"),
        SourceFile("meta.json (train)", "train/meta.json", YTVOS_PAGE,
                   note="only when train.zip lacks it: download meta.json for train from the same page"),
        SourceFile("valid.zip", "downloads/valid.zip", YTVOS_PAGE, extract_to=".",
                   note="valid/JPEGImages: the 202 valid videos (copies with all 507 of the valid meta also pass)"),
        SourceFile("meta_expressions (train, valid, test)", "meta_expressions/{train,valid,test}/meta_expressions.json",
                   YTVOS_PAGE, note="all three are needed: valid = valid meta minus test meta (202 videos)"),
    ],
    "davis": [
        SourceFile("DAVIS-2017-Unsupervised-trainval-480p.zip", "DAVIS-2017-Unsupervised-trainval-480p.zip",
                   DAVIS_PAGE, url="https://data.vision.ee.ethz.ch/csergi/share/davis/"
                                   "DAVIS-2017-Unsupervised-trainval-480p.zip", extract_to="."),
        SourceFile("DAVIS-2017_semantics-480p.zip", "DAVIS-2017_semantics-480p.zip", DAVIS_PAGE,
                   url="https://data.vision.ee.ethz.ch/csergi/share/davis/DAVIS-2017_semantics-480p.zip",
                   extract_to="."),
        SourceFile("davis_text_annotations.zip", "davis_text_annotations.zip", DAVIS_TEXT_PAGE, extract_to="."),
    ],
    "a2d": [
        SourceFile("A2D_main_1_0.tar.bz", "A2D_main_1_0.tar.bz", A2D_PAGE,
                   url="https://web.eecs.umich.edu/~jjcorso/bigshare/A2D_main_1_0.tar.bz", extract_to=".",
                   note="Release/clips320H/*.mp4 and Release/videoset.csv"),
        SourceFile("a2d_annotation_with_instances.zip", "a2d_annotation_with_instances.zip", A2D_PAGE + " (Google Drive)",
                   extract_to="text_annotations", note="text_annotations/a2d_annotation_with_instances/<video>/*.h5"),
        SourceFile("a2d_annotation.txt", "text_annotations/a2d_annotation.txt", A2D_PAGE,
                   url="https://kgavrilyuk.github.io/actor_action/a2d_annotation.txt"),
        SourceFile("a2d_missed_videos.txt", "text_annotations/a2d_missed_videos.txt", A2D_PAGE,
                   url="https://kgavrilyuk.github.io/actor_action/a2d_missed_videos.txt"),
        SourceFile("a2d_sentences_single_frame_train_annotations.json",
                   "a2d_sentences_single_frame_train_annotations.json", A2D_JSON_PAGE),
        SourceFile("a2d_sentences_single_frame_test_annotations.json",
                   "a2d_sentences_single_frame_test_annotations.json", A2D_JSON_PAGE),
        SourceFile("a2d_sentences_test_annotations_in_coco_format.json",
                   "a2d_sentences_test_annotations_in_coco_format.json", A2D_JSON_PAGE),
    ],
    "jhmdb": [
        SourceFile("Rename_Images.tar.gz", "Rename_Images.tar.gz", A2D_PAGE,
                   url="http://files.is.tue.mpg.de/jhmdb/Rename_Images.tar.gz", extract_to=".",
                   note="reported dead (2025); a third-party full copy is linked in ReferDINO issue #9"),
        SourceFile("puppet_mask.zip", "puppet_mask.zip", A2D_PAGE, url="http://files.is.tue.mpg.de/jhmdb/puppet_mask.zip",
                   extract_to="."),
        SourceFile("jhmdb_annotation.txt", "jhmdb_annotation.txt", A2D_PAGE,
                   url="https://kgavrilyuk.github.io/actor_action/jhmdb_annotation.txt"),
        SourceFile("jhmdb_sentences_samples_metadata.json", "jhmdb_sentences_samples_metadata.json", JHMDB_JSON_PAGE,
                   note="the released file fixes the benchmark (3 frames per video): never regenerate it"),
        SourceFile("jhmdb_sentences_gt_annotations_in_coco_format.json",
                   "jhmdb_sentences_gt_annotations_in_coco_format.json", JHMDB_JSON_PAGE),
    ],
    # ReferFormer's layout (data/coco): train2014/ plus one folder per refer dataset; the refer zips unpack into
    # refcoco/, refcoco+/, refcocog/ (bifit.prepare.refcoco converts them)
    "refcoco": [
        SourceFile("train2014.zip", "train2014.zip", COCO_PAGE, url="http://images.cocodataset.org/zips/train2014.zip",
                   extract_to=".", note="train2014/*.jpg, the 82,783 COCO 2014 train images (about 13 GB)"),
        *(SourceFile(f"{d}.zip", f"{d}.zip", REFER_PAGE, extract_to=".",
                     note=f"{d}/instances.json and {d}/refs({s}).p (the zip's other refs files are not used)")
          for d, s in REFCOCO_SPLIT_BY.items()),
    ],
}

TITLES = {"ytvos": "Ref-YouTube-VOS", "davis": "Ref-DAVIS17", "a2d": "A2D-Sentences", "jhmdb": "JHMDB-Sentences",
          "refcoco": "RefCOCO/+/g"}

YTVOS_TRAIN_VIDEOS = 3471  # exact: train.zip is one fixed set, all listed in the train meta_expressions
YTVOS_VALID_VIDEOS = 202  # minimum: valid.zip holds these 202, other copies all 507 of the valid meta
DAVIS_SEQUENCES = 90  # minimum: other DAVIS 2017 zips (test-dev, ...) unzip into the same folders; only the
# sequences of train.txt / val.txt are read
TRAIN_META_MISSING = (f"train.zip is known to lack it: it is distributed separately on {YTVOS_PAGE}, next to the "
                      "train archive's JPEGImages/Annotations; download meta.json for train from that page and place "
                      "it at {path}")


def real_manifest(name: str) -> Manifest:
    """The expected layout of the released data after extraction (exact counts only where the release fixes
    them; the ImageSets lists and the annotation/CSV files are single released files)."""
    if name == "ytvos":
        items = [Expect(f"meta_expressions/{s}/meta_expressions.json", source="meta_expressions")
                 for s in ("train", "valid", "test")]
        items += [Expect("train/meta.json", source="train.zip or the competition page",
                         if_missing=TRAIN_META_MISSING),
                  Expect("train/JPEGImages", "dir", count=YTVOS_TRAIN_VIDEOS, entries="dirs", source="train.zip"),
                  Expect("train/Annotations", "dir", count=YTVOS_TRAIN_VIDEOS, entries="dirs", source="train.zip"),
                  Expect("valid/JPEGImages", "dir", min_count=YTVOS_VALID_VIDEOS, entries="dirs",
                         source="valid.zip")]
    elif name == "davis":
        z, s, t = ("DAVIS-2017-Unsupervised-trainval-480p.zip", "DAVIS-2017_semantics-480p.zip",
                   "davis_text_annotations.zip")
        items = [Expect("DAVIS/ImageSets/2017/train.txt", lines=60, source=z),
                 Expect("DAVIS/ImageSets/2017/val.txt", lines=30, source=z),
                 Expect("DAVIS/JPEGImages/480p", "dir", min_count=DAVIS_SEQUENCES, entries="dirs", source=z),
                 Expect("DAVIS/Annotations_unsupervised/480p", "dir", min_count=DAVIS_SEQUENCES, entries="dirs",
                        source=z),
                 Expect("DAVIS/davis_semantics.json", source=s)]
        items += [Expect(f"davis_text_annotations/{f}", source=t) for f in (
            "Davis17_annot1.txt", "Davis17_annot1_full_video.txt", "Davis17_annot2.txt",
            "Davis17_annot2_full_video.txt")]
    elif name == "a2d":
        items = [Expect("Release/videoset.csv", lines=3782, source="A2D_main_1_0.tar.bz"),
                 Expect("Release/clips320H", "dir", min_count=3700, pattern="*.mp4", entries="files",
                        source="A2D_main_1_0.tar.bz"),
                 Expect("text_annotations/a2d_annotation_with_instances", "dir", min_count=1, entries="dirs",
                        source="a2d_annotation_with_instances.zip"),
                 Expect("text_annotations/a2d_annotation.txt", lines=6656, source="a2d_annotation.txt"),
                 Expect("text_annotations/a2d_missed_videos.txt", source="a2d_missed_videos.txt")]
        items += [Expect(f.dest, source=f.page) for f in SOURCES["a2d"] if f.name.endswith(".json")]
    elif name == "jhmdb":
        items = [Expect("Rename_Images", "dir", min_count=1, entries="dirs", source="Rename_Images.tar.gz"),
                 Expect("puppet_mask", "dir", min_count=1, entries="dirs", source="puppet_mask.zip"),
                 Expect("jhmdb_annotation.txt", lines=929, source="jhmdb_annotation.txt")]
        items += [Expect(f.dest, source=f.page) for f in SOURCES["jhmdb"] if f.name.endswith(".json")]
    elif name == "refcoco":
        items = [Expect("train2014", "dir", count=COCO_TRAIN2014_IMAGES, pattern="*.jpg", entries="files",
                        source="train2014.zip")]
        items += _refer_files(REFCOCO_SPLIT_BY, with_source=True)
    else:
        raise KeyError(f"unknown dataset {name!r}; expected one of {sorted(SOURCES)}")
    return Manifest(TITLES[name], items)


def _refer_files(datasets: dict[str, str], with_source: bool) -> list[Expect]:
    """instances.json and refs(<splitBy>).p of each refer dataset (name -> splitBy)."""
    return [Expect(f"{d}/{f}", source=f"{d}.zip from {REFER_PAGE}" if with_source else "")
            for d, s in datasets.items() for f in ("instances.json", f"refs({s}).p")]


def synthetic_manifest(name: str, cfg) -> Manifest:
    """The official layout at the size of the generated copy (``cfg``: that dataset's synthetic config)."""
    if name == "ytvos":
        n_train, n_valid = cfg.num_train_videos, cfg.num_valid_videos + cfg.num_test_videos
        items = [Expect(f"meta_expressions/{s}/meta_expressions.json") for s in ("train", "valid", "test")]
        items += [Expect("train/meta.json"), Expect("SYNTHETIC_BENCHMARK.json"),
                  Expect("train/JPEGImages", "dir", count=n_train, entries="dirs"),
                  Expect("train/Annotations", "dir", count=n_train, entries="dirs"),
                  Expect("valid/JPEGImages", "dir", count=n_valid, entries="dirs")]
    elif name == "davis":
        total = cfg.num_train_videos + cfg.num_val_videos
        items = [Expect("DAVIS/ImageSets/2017/train.txt", lines=cfg.num_train_videos),
                 Expect("DAVIS/ImageSets/2017/val.txt", lines=cfg.num_val_videos),
                 Expect("DAVIS/JPEGImages/480p", "dir", count=total, entries="dirs"),
                 Expect("DAVIS/Annotations_unsupervised/480p", "dir", count=total, entries="dirs"),
                 Expect("DAVIS/davis_semantics.json"), Expect("SYNTHETIC_DAVIS.json")]
        items += [Expect(f"davis_text_annotations/{f}") for f in (
            "Davis17_annot1.txt", "Davis17_annot1_full_video.txt", "Davis17_annot2.txt",
            "Davis17_annot2_full_video.txt")]
    elif name == "a2d":
        items = [e for e in real_manifest("a2d").items if e.kind == "file" and e.lines is None]
        items += [Expect("Release/videoset.csv"), Expect("text_annotations/a2d_annotation.txt"),
                  Expect("Release/clips320H", "dir", count=cfg.num_train_videos + cfg.num_test_videos,
                         pattern="*.mp4", entries="files"),
                  Expect("text_annotations/a2d_annotation_with_instances", "dir",
                         count=cfg.num_train_videos + cfg.num_test_videos, entries="dirs"),
                  Expect("SYNTHETIC_A2D.json")]
    elif name == "jhmdb":
        items = [Expect("Rename_Images", "dir", min_count=1, entries="dirs"),
                 Expect("puppet_mask", "dir", min_count=1, entries="dirs"),
                 Expect("jhmdb_annotation.txt", lines=cfg.num_videos + 1), Expect("SYNTHETIC_JHMDB.json")]
        items += [Expect(f.dest) for f in SOURCES["jhmdb"] if f.name.endswith(".json")]
    elif name == "refcoco":
        items = [Expect("train2014", "dir", count=cfg.num_images, pattern="*.jpg", entries="files"),
                 Expect("SYNTHETIC_REFCOCO.json")]
        items += _refer_files({d: REFCOCO_SPLIT_BY[d] for d in cfg.datasets}, with_source=False)
    else:
        raise KeyError(f"unknown dataset {name!r}; expected one of {sorted(SOURCES)}")
    return Manifest(f"{TITLES[name]} (synthetic)", items)


def instructions(name: str, root) -> str:
    """What to download and where to put it, for the real data of ``name``."""
    root = Path(root)
    lines = [f"{TITLES[name]}: place these files under {root} (then run the download stage again):"]
    for f in SOURCES[name]:
        how = f"fetchable: {f.url}" if f.url else f"by hand from {f.page}"
        extract = f"; extracted into {root / f.extract_to} by the download stage" if f.is_archive else ""
        note = f" [{f.note}]" if f.note else ""
        lines.append(f"  - {f.name} -> {root / f.dest} ({how}{extract}){note}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# fetching


class FetchError(RuntimeError):
    pass


def fetch(url: str, dest, *, timeout: float = 60.0, chunk: int = 1 << 20, progress: bool = True) -> Path:
    """Download ``url`` to ``dest``, resuming a previous partial download (``<dest>.partial``) with an HTTP Range
    request. An existing ``dest`` is kept as it is (idempotent). The file appears under its name only when
    complete (the size the server announced, when it announced one)."""
    dest = Path(dest)
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".partial")
    have = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            status = getattr(resp, "status", 200)
            if have and status != 206:  # the server ignored the range: start again
                have = 0
            length = resp.headers.get("Content-Length")
            total = have + int(length) if length is not None else None
            with part.open("ab" if have else "wb") as out, tqdm(total=total, initial=have, unit="B",
                                                               unit_scale=True, desc=dest.name,
                                                               disable=not progress) as bar:
                while block := resp.read(chunk):
                    out.write(block)
                    bar.update(len(block))
    except (urllib.error.URLError, OSError) as err:
        raise FetchError(f"{url}: download failed ({err}); the partial file {part} is kept and the next run "
                         "resumes it") from err
    size = part.stat().st_size
    if total is not None and size != total:
        raise FetchError(f"{url}: got {size} bytes of {total}; the partial file {part} is kept for resuming")
    os.replace(part, dest)
    return dest
