"""RefCOCO / RefCOCO+ / RefCOCOg: the refer release (``refs(<splitBy>).p`` + ``instances.json``) converted to the
COCO-format files the RefCOCO loaders read.

    convert_refcoco(raw_root, out_root, dataset) -> summary dict

Reads ``raw_root/<dataset>/instances.json`` (COCO annotations of the images the dataset uses) and
``raw_root/<dataset>/refs(<splitBy>).p`` (splitBy ``unc`` for refcoco and refcoco+, ``umd`` for refcocog) and
writes ``out_root/<dataset>/`` (replaced as a whole, only once complete)::

    instances_<dataset>_<split>.json   one file per split (unc: train, val, testA, testB; umd: train, val, test)
    conversion.json                    the returned summary (counts per split, the source files)

Each split file is COCO format with one "image" per **sentence**: ``file_name``, ``height``, ``width`` (of the COCO
image), ``original_id`` (the COCO image id), ``id`` (0, 1, ... in the split), ``caption`` (the sentence's ``sent``,
the refer toolkit's cleaned text; ``raw`` where a sentence has no ``sent``) and ``dataset_name``; and exactly one
annotation per image: ``segmentation``, ``area``, ``iscrowd``, ``bbox``, ``category_id`` (copied from the COCO
annotation the ref names), ``id`` (equal to the image's), ``original_id`` (the COCO annotation id) and
``image_id``. ``categories`` is copied from ``instances.json``. Refs and sentences keep the release's order.

The refs file is a Python 2 pickle. It is read with :class:`RestrictedUnpickler`, never with ``pickle.load``: its
``find_class`` refuses every global, so only plain containers, strings and numbers can be built, and a file that
tries to import anything (the way a pickle runs code) raises :class:`UnsafePickleError` naming the file and the
global. Python 2 ``str`` values arrive as bytes and are decoded as UTF-8 (Latin-1 where that fails).

Problems (a ref naming an annotation or image ``instances.json`` lacks, a split outside the splitBy's list, a file
name that is not one path component, missing keys) raise :class:`ConversionError` naming the file and the ref.
Sentences whose text is empty are left out and counted (``empty_sentences``).
"""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

from bifit.fsutil import component_problem, staged_folder
from bifit.prepare.sources import REFCOCO_SPLIT_BY as SPLIT_BY

SPLITS = {"unc": ("train", "val", "testA", "testB"), "umd": ("train", "val", "test")}
INSTANCES_NAME = "instances.json"
SUMMARY_NAME = "conversion.json"
REF_KEYS = ("ref_id", "ann_id", "image_id", "split", "sentences")


def refs_name(split_by: str) -> str:
    return f"refs({split_by}).p"


def split_file(dataset: str, split: str) -> str:
    """``instances_<dataset>_<split>.json``, the converter's output name."""
    return f"instances_{dataset}_{split}.json"


class UnsafePickleError(ValueError):
    """A pickle that asks to import something (the way a pickle runs code): refused, nothing was imported."""


class ConversionError(ValueError):
    """The refer release is inconsistent; the message names the file and the ref."""


# ----------------------------------------------------------------------------------------------------------------
# reading the refs pickle safely


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that builds plain data only: dicts, lists, tuples, strings, bytes, numbers, booleans, None.

    Every global (``GLOBAL``/``STACK_GLOBAL``, the copyreg extension codes) goes through :meth:`find_class`, which
    refuses it, so no callable can be reached and nothing is imported or called. Persistent ids are refused too.
    """

    def __init__(self, file, source: str = "<pickle>", **kwargs):
        super().__init__(file, **kwargs)
        self.source = source

    def find_class(self, module, name):
        raise UnsafePickleError(
            f"{self.source}: refused to unpickle: the pickle asks to import {module}.{name}; only plain containers, "
            "strings and numbers are accepted (a pickle that imports can run code), so this is not a refer "
            "release file; download it again from its official source")

    def persistent_load(self, pid):
        raise UnsafePickleError(f"{self.source}: refused to unpickle: the pickle uses a persistent id ({pid!r}); "
                                "only plain containers, strings and numbers are accepted")


def _text(value: bytes) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value.decode("latin-1")


def _plain(obj):
    """Python 2 strings (bytes here) decoded to str, recursively."""
    if isinstance(obj, bytes):
        return _text(obj)
    if isinstance(obj, dict):
        return {_plain(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_plain(v) for v in obj)
    return obj


def restricted_loads(data: bytes, source: str = "<pickle>"):
    """Unpickle plain data from ``data`` (see :class:`RestrictedUnpickler`); Python 2 strings become str."""
    try:
        return _plain(RestrictedUnpickler(io.BytesIO(data), source, encoding="bytes").load())
    except UnsafePickleError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError,
            OverflowError, RecursionError) as err:
        raise ConversionError(f"{source}: not a readable pickle ({type(err).__name__}: {err})") from err


def load_refs(path) -> list[dict]:
    """The refs of a ``refs(<splitBy>).p`` file: a list of dicts (checked), read without running any code."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{path}: missing refer annotation file; it comes in the dataset's zip from "
                                "https://github.com/lichengunc/refer (see bifit/prepare/sources.py)") from err
    refs = restricted_loads(data, str(path))
    if not isinstance(refs, list) or not all(isinstance(r, dict) for r in refs):
        raise ConversionError(f"{path}: expected a list of ref dicts, got {type(refs).__name__}")
    return refs


def dump_refs(refs: list[dict], path) -> None:
    """Write refs as the release does: a protocol-2 pickle of plain data (used by the synthetic writer)."""
    Path(path).write_bytes(pickle.dumps(refs, protocol=2))


# ----------------------------------------------------------------------------------------------------------------
# conversion


def _read_instances(path: Path) -> tuple[dict, dict, list]:
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{path}: missing COCO instances file of the refer release; it comes in the "
                                "dataset's zip from https://github.com/lichengunc/refer") from err
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConversionError(f"{path}: not a readable JSON file ({err})") from err
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "annotations")):
        raise ConversionError(f"{path}: expected a COCO instances object with 'images' and 'annotations' lists")
    try:
        images = {img["id"]: img for img in data["images"]}
        anns = {ann["id"]: ann for ann in data["annotations"]}
    except (KeyError, TypeError) as err:
        raise ConversionError(f"{path}: an image or annotation entry without an 'id' ({err!r})") from err
    return images, anns, data.get("categories", [])


def _sentence_text(sentence) -> str:
    if not isinstance(sentence, dict):
        return ""
    text = sentence.get("sent", sentence.get("raw"))
    return text.strip() if isinstance(text, str) else ""


def _check_ref(ref: dict, where: str, splits: tuple[str, ...], images: dict, anns: dict) -> None:
    missing = [k for k in REF_KEYS if k not in ref]
    if missing:
        raise ConversionError(f"{where}: missing key(s) {missing}")
    if ref["split"] not in splits:
        raise ConversionError(f"{where}: split {ref['split']!r} is not one of {list(splits)}")
    if not isinstance(ref["sentences"], list):
        raise ConversionError(f"{where}: 'sentences' is {type(ref['sentences']).__name__}, expected a list")
    ann = anns.get(ref["ann_id"])
    if ann is None:
        raise ConversionError(f"{where}: annotation {ref['ann_id']} is not in {INSTANCES_NAME}")
    if ann.get("image_id") != ref["image_id"]:
        raise ConversionError(f"{where}: annotation {ref['ann_id']} belongs to image {ann.get('image_id')}, the ref "
                              f"names image {ref['image_id']}")
    image = images.get(ref["image_id"])
    if image is None:
        raise ConversionError(f"{where}: image {ref['image_id']} is not in {INSTANCES_NAME}")
    problem = component_problem(image.get("file_name"))
    if problem:
        raise ConversionError(f"{where}: image {ref['image_id']} has file_name {image.get('file_name')!r}, which "
                              f"cannot be a file name ({problem})")
    for key in ("segmentation", "area", "bbox", "category_id"):
        if key not in ann:
            raise ConversionError(f"{where}: annotation {ref['ann_id']} lacks {key!r}")


def convert_refcoco(raw_root, out_root, dataset: str, split_by: str | None = None) -> dict:
    """Convert ``raw_root/<dataset>`` to ``out_root/<dataset>/instances_<dataset>_<split>.json`` (see the module
    docstring). ``split_by`` defaults to the dataset's official one (``SPLIT_BY``)."""
    problem = component_problem(dataset)
    if problem:
        raise ValueError(f"dataset name {dataset!r} cannot be a folder name ({problem})")
    split_by = split_by or SPLIT_BY.get(dataset)
    if split_by not in SPLITS:
        raise ValueError(f"{dataset}: unknown splitBy {split_by!r}; expected one of {sorted(SPLITS)} (the official "
                         f"ones: {SPLIT_BY})")
    raw_dir, out_dir = Path(raw_root) / dataset, Path(out_root) / dataset
    if out_dir.resolve() == raw_dir.resolve():
        raise ValueError(f"{out_dir}: the output folder is the release folder itself, which the conversion would "
                         "replace; write to another out_root (the loaders take the annotation root separately)")
    refs_path, instances_path = raw_dir / refs_name(split_by), raw_dir / INSTANCES_NAME
    images, anns, categories = _read_instances(instances_path)
    refs = load_refs(refs_path)
    splits = SPLITS[split_by]
    out = {s: {"images": [], "annotations": []} for s in splits}
    counts = {s: {"refs": 0, "sentences": 0, "coco_images": set()} for s in splits}
    empty = 0
    for n, ref in enumerate(refs):
        where = f"{refs_path}: ref {ref.get('ref_id', f'#{n}')}"
        _check_ref(ref, where, splits, images, anns)
        split, image, ann = ref["split"], images[ref["image_id"]], anns[ref["ann_id"]]
        counts[split]["refs"] += 1
        counts[split]["coco_images"].add(image["id"])
        for sentence in ref["sentences"]:
            caption = _sentence_text(sentence)
            if not caption:
                empty += 1
                continue
            entries = out[split]
            new_id = len(entries["images"])
            entries["images"].append({
                "file_name": image["file_name"], "height": image["height"], "width": image["width"],
                "original_id": image["id"], "id": new_id, "caption": caption, "dataset_name": dataset})
            entries["annotations"].append({
                "segmentation": ann["segmentation"], "area": ann["area"], "iscrowd": ann.get("iscrowd", 0),
                "bbox": ann["bbox"], "category_id": ann["category_id"], "id": new_id, "original_id": ann["id"],
                "image_id": new_id})
            counts[split]["sentences"] += 1
    summary = {
        "dataset": dataset, "split_by": split_by, "refs_file": refs_name(split_by), "instances_file": INSTANCES_NAME,
        "splits": {s: {"refs": c["refs"], "sentences": c["sentences"], "coco_images": len(c["coco_images"])}
                   for s, c in counts.items()},
        "empty_sentences": empty,
    }
    Path(out_root).mkdir(parents=True, exist_ok=True)
    with staged_folder(out_dir) as tmp:
        for split in splits:
            info = {"description": f"{dataset} {split} ({split_by} split), one image entry per sentence",
                    "dataset": dataset, "split": split, "split_by": split_by}
            (tmp / split_file(dataset, split)).write_text(
                json.dumps({"info": info, "images": out[split]["images"], "annotations": out[split]["annotations"],
                            "categories": categories}) + "\n")
        (tmp / SUMMARY_NAME).write_text(json.dumps(summary, indent=1) + "\n")
    return summary
