"""Ref-DAVIS17 -> Ref-YouTube-VOS-style layout, as the official converter writes it, non-destructive.

    convert_ref_davis(raw_root, out_root) -> summary

``raw_root`` holds the extracted downloads (``DAVIS/`` and ``davis_text_annotations/``). The reference
tool *moves* the sequence folders out of ``DAVIS/`` (so the zip has to be extracted a second time);
here every frame and annotation is hard-linked (copied where links are impossible), so ``DAVIS/`` stays intact
and can be used by the evaluator as it is. ``out_root`` receives (replaced atomically)::

    train/JPEGImages/<seq>/*.jpg  train/Annotations/<seq>/*.png  train/meta.json      the 60 train sequences
    valid/JPEGImages/<seq>/*.jpg  valid/Annotations/<seq>/*.png  valid/meta.json      the 30 val sequences
    meta_expressions/{train,valid}/meta_expressions.json
    index.json          the val sequence list (ImageSets order), frames and (H, W) per sequence, object and
                        expression counts, the raw root: loaders read this and never list folders
    summary.json        counts and every irregularity found (unknown videos, truncated annotators, ...)

Rules of the reference converter, reproduced exactly:

- lines end at LF, CR LF or CR (Python's text-mode reading), never at the other characters that
  ``str.splitlines`` breaks on (U+0085, which is byte 0x85 in the latin-1 files, U+2028, U+001C, ...);
- text lines are ``<video> <obj_id> "<sentence>"``: the first two whitespace tokens, then the rest joined with
  single spaces minus its first and last characters (the quotes); annotator 1 files are UTF-8, annotator 2 files
  latin-1; ``clasic-car``, ``dog-scale``, ``motor-bike`` are renamed ``classic-car``, ``dogs-scale``, ``motorbike``;
- within a video the entries of each file are sorted by obj_id **as strings** ("10" before "2");
- the four files are zipped per video and stop at the shortest list; object k gets exp ids 4k + a for annotator
  column a = 0..3 (annotator 1 first-frame, annotator 1 full-video, annotator 2 first-frame, annotator 2
  full-video), each ``{"exp", "obj_id"}`` with the obj_id of that column's entry;
- ``frames`` is the sorted list of jpg stems of the sequence; ``meta.json`` objects are "1".."n" with the
  categories of ``DAVIS/davis_semantics.json`` and no frame lists; the unsupervised annotations are used.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from bifit.fsutil import component_problem, staged_folder
from bifit.prepare.sources import DAVIS_TEXT_PAGE

log = logging.getLogger(__name__)

ANNOTATION_FILES = ("Davis17_annot1.txt", "Davis17_annot1_full_video.txt", "Davis17_annot2.txt",
                    "Davis17_annot2_full_video.txt")
ANNOTATION_ENCODINGS = ("utf-8", "utf-8", "latin-1", "latin-1")
RENAMES = {"clasic-car": "classic-car", "dog-scale": "dogs-scale", "motor-bike": "motorbike"}
SPLITS = {"train": "train", "valid": "val"}  # output split -> ImageSets list
NUM_ANNOTATORS = 4
JPEG_DIR = Path("DAVIS") / "JPEGImages" / "480p"
ANNOTATION_DIR = Path("DAVIS") / "Annotations_unsupervised" / "480p"
IMAGESETS_DIR = Path("DAVIS") / "ImageSets" / "2017"
SEMANTICS_JSON = Path("DAVIS") / "davis_semantics.json"
TEXT_DIR = Path("davis_text_annotations")
INDEX_NAME = "index.json"


class ConversionError(ValueError):
    """Bad Ref-DAVIS17 input: the message names the file, the line or sequence and what was expected."""


@dataclass(frozen=True)
class TextEntry:
    video: str
    obj_id: str
    sentence: str


def parse_annotation_line(line: str, path, number: int) -> TextEntry | None:
    """One line of a Davis17_annot*.txt file (None for a blank line)."""
    tokens = line.split()  # as the reference: U+0085 inside a sentence is whitespace here and becomes a space
    if not tokens:
        return None
    if len(tokens) < 3:
        raise ConversionError(f"{path}:{number}: expected '<video> <obj_id> \"<sentence>\"', got {line.strip()!r}")
    video = RENAMES.get(tokens[0], tokens[0])
    for what, value in (("video", video), ("obj_id", tokens[1])):
        if why := component_problem(value):
            raise ConversionError(f"{path}:{number}: {what} {value!r} cannot be a folder name ({why}); it becomes a "
                                  "path of the converted dataset")
    return TextEntry(video, tokens[1], " ".join(tokens[2:])[1:-1])


def annotation_lines(text: str) -> list[str]:
    """Lines as the reference's text-mode ``readlines`` gives them: split at newlines only, not at U+0085 etc."""
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")


def read_annotation_file(path, encoding: str) -> dict[str, list[TextEntry]]:
    """video -> entries sorted by obj_id as strings (stable: repeated ids keep their file order)."""
    path = Path(path)
    try:
        text = path.read_bytes().decode(encoding)
    except FileNotFoundError as err:
        raise ConversionError(f"{path}: missing Ref-DAVIS17 text annotation file (from "
                              f"davis_text_annotations.zip: download it by hand from {DAVIS_TEXT_PAGE} and "
                              "extract it in the dataset root)") from err
    except UnicodeDecodeError as err:
        raise ConversionError(f"{path}: not valid {encoding} ({err})") from err
    by_video: dict[str, list[TextEntry]] = {}
    for number, line in enumerate(annotation_lines(text), 1):
        entry = parse_annotation_line(line, path, number)
        if entry is not None:
            by_video.setdefault(entry.video, []).append(entry)
    return {v: sorted(entries, key=lambda e: e.obj_id) for v, entries in by_video.items()}


def video_expressions(columns: list[list[TextEntry]]) -> tuple[dict[str, dict], int]:
    """The four annotator lists of one video -> ({exp_id: {"exp", "obj_id"}}, number of objects)."""
    objects = min(len(c) for c in columns)
    expressions = {}
    for k in range(objects):
        for a, column in enumerate(columns):
            expressions[str(NUM_ANNOTATORS * k + a)] = {"exp": column[k].sentence, "obj_id": column[k].obj_id}
    return expressions, objects


def read_split_list(raw_root: Path, name: str) -> list[str]:
    path = raw_root / IMAGESETS_DIR / f"{name}.txt"
    if not path.is_file():
        raise ConversionError(f"{path}: missing DAVIS split list (from DAVIS-2017-Unsupervised-trainval-480p.zip)")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def read_semantics(raw_root: Path) -> dict[str, dict[str, str]]:
    path = raw_root / SEMANTICS_JSON
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as err:
        raise ConversionError(f"{path}: missing (from DAVIS-2017_semantics-480p.zip)") from err
    except json.JSONDecodeError as err:
        raise ConversionError(f"{path}: invalid JSON ({err})") from err
    if not isinstance(data, dict):
        raise ConversionError(f"{path}: expected an object mapping sequences to {{'1': category, ...}}")
    return data


def link_or_copy(src: Path, dst: Path) -> str:
    try:
        os.link(src, dst)
        return "link"
    except OSError:
        shutil.copy2(src, dst)
        return "copy"


def _mirror_sequence(raw_root: Path, out_split: Path, seq: str, counts: dict) -> list[str]:
    """Link the frames and annotations of ``seq``; returns the sorted frame stems."""
    jpg_src, png_src = raw_root / JPEG_DIR / seq, raw_root / ANNOTATION_DIR / seq
    if not jpg_src.is_dir():
        raise ConversionError(f"{jpg_src}: missing frames of sequence {seq!r} (listed in ImageSets)")
    if not png_src.is_dir():
        raise ConversionError(f"{png_src}: missing unsupervised annotations of sequence {seq!r}")
    frames = sorted(p.stem for p in jpg_src.iterdir() if p.suffix == ".jpg")
    if not frames:
        raise ConversionError(f"{jpg_src}: no .jpg frames in sequence {seq!r}")
    for sub, src, ext in (("JPEGImages", jpg_src, ".jpg"), ("Annotations", png_src, ".png")):
        dst = out_split / sub / seq
        dst.mkdir(parents=True)
        for p in sorted(src.iterdir()):
            if p.suffix == ext:
                counts[link_or_copy(p, dst / p.name)] += 1
    return frames


def _frame_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as img:
        return img.height, img.width


def convert_ref_davis(raw_root, out_root, *, progress: bool = True) -> dict:
    """Convert ``raw_root`` (the extracted downloads) into ``out_root`` (module docstring); returns the summary."""
    raw_root, out_root = Path(raw_root).resolve(), Path(out_root)
    start = time.perf_counter()
    columns = [read_annotation_file(raw_root / TEXT_DIR / f, enc)
               for f, enc in zip(ANNOTATION_FILES, ANNOTATION_ENCODINGS)]
    semantics = read_semantics(raw_root)
    split_lists = {out: read_split_list(raw_root, name) for out, name in SPLITS.items()}
    listed = {s for seqs in split_lists.values() for s in seqs}
    summary: dict = {"dataset": "ref_davis17", "raw_root": str(raw_root), "irregularities": []}
    notes = summary["irregularities"]
    unknown = sorted({v for c in columns for v in c} - listed)
    if unknown:
        notes.append(f"text annotations name {len(unknown)} video(s) not in ImageSets/2017 (ignored): {unknown}")
    counts = {"link": 0, "copy": 0}
    index = {"dataset": "ref_davis17", "raw_root": os.path.relpath(raw_root, out_root.resolve()),
             "sequences": {}, "val": split_lists["valid"], "train": split_lists["train"]}
    with staged_folder(out_root) as tmp:
        total = sum(len(s) for s in split_lists.values())
        with tqdm(total=total, desc="convert Ref-DAVIS17", unit="video", disable=not progress) as bar:
            for out_split, seqs in split_lists.items():
                metas, meta_objects = {}, {}
                for seq in seqs:
                    frames = _mirror_sequence(raw_root, tmp / out_split, seq, counts)
                    per_column = [c.get(seq, []) for c in columns]
                    lengths = [len(c) for c in per_column]
                    if len(set(lengths)) > 1:
                        notes.append(f"{seq}: annotator lists of lengths {lengths}; kept the first {min(lengths)} "
                                     "objects (zip stops at the shortest, as in the reference converter)")
                    if max(lengths) == 0:
                        notes.append(f"{seq}: no referring expressions in the text annotations")
                    expressions, n_obj = video_expressions(per_column)
                    mismatched = [k for k in range(n_obj) if len({c[k].obj_id for c in per_column}) > 1]
                    if mismatched:
                        notes.append(f"{seq}: the annotators' obj_ids differ for object position(s) {mismatched}")
                    metas[seq] = {"expressions": expressions, "frames": frames}
                    if seq not in semantics:
                        raise ConversionError(f"{raw_root / SEMANTICS_JSON}: no categories for sequence {seq!r}")
                    ghosts = sorted({e["obj_id"] for e in expressions.values()} - set(semantics[seq]))
                    if ghosts:
                        notes.append(f"{seq}: expressions refer to object(s) {ghosts} missing from "
                                     f"{SEMANTICS_JSON} (kept: the protocol matches objects by Hungarian assignment)")
                    meta_objects[seq] = {"objects": {str(i + 1): {"category": semantics[seq][key]}
                                                     for i, key in enumerate(semantics[seq])}}
                    h, w = _frame_size(raw_root / JPEG_DIR / seq / f"{frames[0]}.jpg")
                    index["sequences"][seq] = {"split": out_split, "frames": frames, "size": [h, w],
                                               "objects": n_obj, "expressions": len(expressions)}
                    bar.update(1)
                _dump(tmp / "meta_expressions" / out_split / "meta_expressions.json", {"videos": metas})
                _dump(tmp / out_split / "meta.json", {"videos": meta_objects})
                summary[f"{out_split}_videos"] = len(seqs)
                summary[f"{out_split}_expressions"] = sum(len(m["expressions"]) for m in metas.values())
        summary.update(files_linked=counts["link"], files_copied=counts["copy"],
                       seconds=round(time.perf_counter() - start, 3))
        _dump(tmp / INDEX_NAME, index)
        _dump(tmp / "summary.json", summary)
    for note in notes:
        log.warning("Ref-DAVIS17 conversion: %s", note)
    return summary


def _dump(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n")


