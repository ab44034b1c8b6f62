"""A tiny synthetic RefCOCO / RefCOCO+ / RefCOCOg release in the official refer format.

Each image is one frame of a synthetic video (:func:`bifit.synthetic.video.make_video`): the moving shapes frozen
in a still. Its expressions come from the scene model evaluated on that frame alone: motion words are dropped (a
still shows none), and the spatial terms ("the leftmost ...", "... left of the circle") are decided on the frame's
geometry. A still is a scene holding that frame twice, because a spatial relation in a video needs two co-visible
frames before it counts as clear; with the frame repeated it holds or fails exactly as it does in that frame.
Every expression picks out exactly one object of its still: all other objects present in the image (even barely
visible ones) fail it clearly. The three datasets share the images, as the real ones share COCO images, and
differ like the real ones: RefCOCO+ has no location words (attributes only), RefCOCOg uses the UMD splits.

Written under ``root`` (the refer layout plus the COCO train2014 folder)::

    train2014/COCO_train2014_<image_id:012d>.jpg
    <dataset>/instances.json       COCO instances of the dataset's images: every object with a visible pixel,
                                   segmentation as uncompressed RLE ({"size": [h, w], "counts": [...]})
    <dataset>/refs(<splitBy>).p    the refs, a protocol-2 pickle of plain data (refcoco, refcoco+: unc;
                                   refcocog: umd)
    synthetic_stills.json          per image: the source video and frame, the objects, the parsed descriptions
    SYNTHETIC_REFCOCO.json         manifest: generator version, config and counts

:func:`bifit.prepare.refcoco.convert_refcoco` turns each dataset into its ``instances_<dataset>_<split>.json``
files, exactly as it does the real release. Differences from the real data: the segmentations are exact
uncompressed RLEs where COCO has polygons (both decode with pycocotools), the categories are the shapes, and the
UNC testA/testB split (people / other objects in the real data) is only a split of the test images in two.

Deterministic in ``SyntheticRefCOCOConfig.seed``: image i is drawn from generators seeded by (seed, i).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from bifit.config import check, int_in
from bifit.prepare.refcoco import INSTANCES_NAME, SPLIT_BY, SPLITS, dump_refs, refs_name
from bifit.synthetic.a2d import dump_json, write_dataset
from bifit.synthetic.config import SYNTHETIC_CATEGORIES, SyntheticConfig
from bifit.synthetic.expressions import candidate_descriptions, choose_descriptions, phrase
from bifit.synthetic.scene import Description, Scene, SceneObject
from bifit.synthetic.video import make_video

GENERATOR_VERSION = 2  # 2: expression kinds drawn as in the Ref-YouTube-VOS generator's version 2
MANIFEST_NAME = "SYNTHETIC_REFCOCO.json"
STILLS_NAME = "synthetic_stills.json"
IMAGE_DIR = "train2014"
CATEGORY_IDS = {name: i + 1 for i, name in enumerate(SYNTHETIC_CATEGORIES)}  # COCO ids start at 1
UNC_TO_UMD = {"train": "train", "val": "val", "testA": "test", "testB": "test"}


@dataclass(frozen=True)
class SyntheticRefCOCOConfig:
    seed: int = 4
    num_train_images: int = 12
    num_val_images: int = 4
    num_test_images: int = 2  # in each of testA and testB (refcocog's test split holds both)
    datasets: tuple[str, ...] = ("refcoco", "refcoco+", "refcocog")
    frames_per_video: int = 6  # length of the synthetic video each still is taken from
    height: int = 96  # multiples of 32 (the scene generator's grid)
    width: int = 128
    expressions_per_object: int = 2  # sentences per ref (fewer when an object has fewer distinct ones)
    jpeg_quality: int = 90
    max_attempts: int = 20  # videos tried per image before giving up (a video's every frame may lack refs)

    def __post_init__(self):
        object.__setattr__(self, "datasets", tuple(self.datasets))
        self.validate()

    @property
    def num_images(self) -> int:
        return self.num_train_images + self.num_val_images + 2 * self.num_test_images

    def validate(self, where: str = "SyntheticRefCOCOConfig"):
        for name, lo, hi in (("seed", 0, 2**32 - 1), ("num_train_images", 1, 100_000),
                             ("num_val_images", 1, 100_000), ("num_test_images", 1, 100_000),
                             ("frames_per_video", 4, 1000), ("height", 96, 2048), ("width", 96, 2048),
                             ("expressions_per_object", 1, 6), ("jpeg_quality", 50, 100), ("max_attempts", 1, 1000)):
            check(int_in(getattr(self, name), lo, hi), f"{where}.{name}", f"an int in [{lo}, {hi}]",
                  getattr(self, name))
        for name in ("height", "width"):
            check(getattr(self, name) % 32 == 0, f"{where}.{name}", "a multiple of 32 in [96, 2048]",
                  getattr(self, name))
        check(len(self.datasets) > 0 and len(set(self.datasets)) == len(self.datasets)
              and all(d in SPLIT_BY for d in self.datasets), f"{where}.datasets",
              f"a non-empty list of distinct names among {list(SPLIT_BY)}", self.datasets)

    def scene_config(self) -> SyntheticConfig:
        return SyntheticConfig(seed=self.seed, num_train_videos=self.num_images, num_valid_videos=1,
                               num_test_videos=0, frames_per_video=self.frames_per_video, height=self.height,
                               width=self.width, max_objects=4, expressions_per_object=self.expressions_per_object)

    def unc_split(self, index: int) -> str:
        """The UNC split of image ``index``: train images first, then val, testA, testB."""
        bounds = np.cumsum([self.num_train_images, self.num_val_images, self.num_test_images])
        return ("train", "val", "testA", "testB")[int(np.searchsorted(bounds, index, side="right"))]


# ----------------------------------------------------------------------------------------------------------------
# stills


def still_scene(scene: Scene, t: int, min_visible_pixels: int) -> Scene:
    """Frame ``t`` of a video scene as a scene of its own: the objects with a visible pixel in that frame, the
    frame held twice (so spatial relations are decided on this frame's geometry alone)."""
    ids = scene.id_maps[t]
    present = [o for o in scene.objects if (ids == o.obj_id).any()]
    objects = [replace(o, centres=np.repeat(o.centres[t : t + 1], 2, axis=0)) for o in present]
    still = Scene(scene.height, scene.width, objects, id_maps=np.stack([ids, ids]))
    still.visible = np.stack([(still.id_maps == o.obj_id).sum(axis=(1, 2)) >= min_visible_pixels
                              for o in objects], 1) if objects else np.zeros((2, 0), dtype=bool)
    return still


def still_descriptions(still: Scene, obj_id: int) -> list[Description]:
    """Unambiguous descriptions of ``obj_id`` in a still: the scene model's, without motion."""
    return [d for d in candidate_descriptions(still, obj_id) if d.motion is None]


def for_dataset(descriptions: list[Description], dataset: str) -> list[Description]:
    """RefCOCO+ has no location terms (attributes only); the others take every description."""
    if dataset == "refcoco+":
        return [d for d in descriptions if d.extreme is None and d.relation is None]
    return list(descriptions)


def object_sentences(rng, descriptions: list[Description], k: int) -> list[tuple[Description, str]]:
    """Up to ``k`` (description, text) pairs with distinct texts, chosen among ``descriptions``."""
    chosen = choose_descriptions(rng, list(descriptions), k)
    out, texts = [], set()
    for i in range(k if chosen else 0):
        desc = chosen[i % len(chosen)]
        for _ in range(8):  # re-phrase a reused description until the text differs
            text = phrase(rng, desc)
            if text not in texts:
                texts.add(text)
                out.append((desc, text))
                break
    return out


@dataclass
class Still:
    index: int
    image_id: int
    split: str  # UNC split
    video_id: str
    frame: int
    scene: Scene  # the frame held twice (still_scene)
    rgb: np.ndarray  # [H, W, 3] uint8
    sentences: dict[str, dict[int, list[tuple[Description, str]]]] = field(default_factory=dict)  # dataset ->
    # obj_id -> sentences (objects without any are left out)

    @property
    def file_name(self) -> str:
        return f"COCO_train2014_{self.image_id:012d}.jpg"


def make_still(cfg: SyntheticRefCOCOConfig, index: int) -> Still:
    """Image ``index``: a frame of a synthetic video where every dataset has at least one referred object."""
    scene_cfg = cfg.scene_config()
    rng = np.random.default_rng([cfg.seed, 17, index])
    for attempt in range(cfg.max_attempts):
        video = make_video(scene_cfg, "train", index + attempt * cfg.num_images)
        for t in rng.permutation(scene_cfg.frames_per_video):
            still = still_scene(video.scene, int(t), scene_cfg.min_visible_pixels)
            candidates = {o.obj_id: still_descriptions(still, o.obj_id)
                          for o, v in zip(still.objects, still.visible[0]) if v}
            sentences = {}
            for dataset in cfg.datasets:
                per_object = {o: object_sentences(rng, for_dataset(c, dataset), cfg.expressions_per_object)
                              for o, c in candidates.items()}
                sentences[dataset] = {o: s for o, s in per_object.items() if s}
            if all(sentences.values()):
                return Still(index, index + 1, cfg.unc_split(index), video.video_id, int(t), still,
                             video.rgb[int(t)], sentences)
    raise RuntimeError(f"synthetic RefCOCO image {index}: no frame with a referable object for every dataset in "
                       f"max_attempts={cfg.max_attempts} videos")


# ----------------------------------------------------------------------------------------------------------------
# the refer files


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO uncompressed RLE of an (H, W) mask: run lengths in column-major order, starting with a 0-run."""
    flat = np.asarray(mask, dtype=bool).reshape(-1, order="F")
    change = np.flatnonzero(np.diff(flat.astype(np.int8))) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0] + counts
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": [int(c) for c in counts]}


def coco_annotation(mask: np.ndarray, ann_id: int, image_id: int, category: str) -> dict:
    ys, xs = np.where(mask.any(1))[0], np.where(mask.any(0))[0]
    x1, y1 = float(xs[0]), float(ys[0])
    return {"id": ann_id, "image_id": image_id, "category_id": CATEGORY_IDS[category],
            "segmentation": uncompressed_rle(mask), "area": float(mask.sum()), "iscrowd": 0,
            "bbox": [x1, y1, float(xs[-1]) - x1 + 1.0, float(ys[-1]) - y1 + 1.0]}


def _write(cfg: SyntheticRefCOCOConfig, root: Path, progress: bool) -> dict:
    images, annotations, ann_ids = [], [], {}  # (image_id, obj_id) -> ann_id
    refs = {d: [] for d in cfg.datasets}
    stills_record = {}
    sent_id = {d: 0 for d in cfg.datasets}
    (root / IMAGE_DIR).mkdir(parents=True)
    for index in tqdm(range(cfg.num_images), desc="synthetic RefCOCO images", unit="image", disable=not progress):
        still = make_still(cfg, index)
        Image.fromarray(still.rgb).save(root / IMAGE_DIR / still.file_name, quality=cfg.jpeg_quality)
        images.append({"id": still.image_id, "file_name": still.file_name, "height": cfg.height, "width": cfg.width})
        objects = []
        for o in still.scene.objects:
            ann_ids[(still.image_id, o.obj_id)] = ann_id = len(annotations) + 1
            annotations.append(coco_annotation(still.scene.id_maps[0] == o.obj_id, ann_id, still.image_id, o.shape))
            objects.append({"obj_id": o.obj_id, "ann_id": ann_id, "colour": o.colour, "shape": o.shape,
                            "size": o.size, "radius": o.radius, "depth": o.depth,
                            "centre": o.centres[0].tolist()})
        record = {"video": still.video_id, "frame": still.frame, "split": still.split, "objects": objects,
                  "refs": {}}
        for dataset, per_object in still.sentences.items():
            split = still.split if SPLIT_BY[dataset] == "unc" else UNC_TO_UMD[still.split]
            record["refs"][dataset] = []
            for obj_id, sentences in sorted(per_object.items()):
                ann_id = ann_ids[(still.image_id, obj_id)]
                ids = list(range(sent_id[dataset], sent_id[dataset] + len(sentences)))
                sent_id[dataset] += len(sentences)
                ref_id = len(refs[dataset])
                refs[dataset].append({
                    "ref_id": ref_id, "ann_id": ann_id, "image_id": still.image_id, "split": split,
                    "category_id": CATEGORY_IDS[still.scene.by_id(obj_id).shape],
                    "file_name": f"COCO_train2014_{still.image_id:012d}_{ann_id}.jpg",  # like the release's
                    "sent_ids": ids,
                    "sentences": [{"tokens": text.split(), "raw": text, "sent": text, "sent_id": i}
                                  for i, (_, text) in zip(ids, sentences)]})
                record["refs"][dataset].append({"ref_id": ref_id, "obj_id": obj_id, "ann_id": ann_id,
                                                "sentences": [{"sent": text, "description": d.to_dict()}
                                                              for d, text in sentences]})
        stills_record[str(still.image_id)] = record
    categories = [{"id": i, "name": name, "supercategory": "shape"} for name, i in CATEGORY_IDS.items()]
    summary = {"images": cfg.num_images, "annotations": len(annotations), "datasets": {}}
    for dataset in cfg.datasets:
        folder = root / dataset
        folder.mkdir()
        used = {r["image_id"] for r in refs[dataset]}
        dump_json({"info": {"description": f"synthetic {dataset} (bifit.synthetic.refcoco)"},
                   "images": [i for i in images if i["id"] in used],
                   "annotations": [a for a in annotations if a["image_id"] in used],
                   "categories": categories}, folder / INSTANCES_NAME)
        dump_refs(refs[dataset], folder / refs_name(SPLIT_BY[dataset]))
        summary["datasets"][dataset] = {
            split: {"refs": sum(r["split"] == split for r in refs[dataset]),
                    "sentences": sum(len(r["sentences"]) for r in refs[dataset] if r["split"] == split)}
            for split in SPLITS[SPLIT_BY[dataset]]}
    (root / STILLS_NAME).write_text(json.dumps(stills_record, indent=1) + "\n")
    return summary


def generate_refcoco(cfg: SyntheticRefCOCOConfig, root, progress: bool = True, overwrite: bool = False) -> dict:
    """Write the synthetic refer release to ``root`` (idempotent, atomic; see
    :func:`bifit.synthetic.a2d.write_dataset`) and return its counts."""
    config = json.loads(json.dumps(asdict(cfg)))
    return write_dataset(Path(root), MANIFEST_NAME, "bifit.synthetic.refcoco", GENERATOR_VERSION, config,
                         lambda tmp: _write(cfg, tmp, progress), overwrite)


def load_stills(root) -> dict:
    """The ``synthetic_stills.json`` sidecar: image id (str) -> {video, frame, split, objects, refs}."""
    return json.loads((Path(root) / STILLS_NAME).read_text())


def still_from_record(record: dict, id_map: np.ndarray, min_visible_pixels: int) -> Scene:
    """Rebuild a still's :class:`Scene` from its sidecar record and its id map [H, W] (e.g. from the annotations)."""
    objects = [SceneObject(o["obj_id"], o["colour"], o["shape"], o["size"], o["radius"], "none", "inside",
                           o["depth"], np.repeat(np.asarray([o["centre"]], dtype=np.float64), 2, axis=0))
               for o in record["objects"]]
    scene = Scene(id_map.shape[0], id_map.shape[1], objects, id_maps=np.stack([id_map, id_map]))
    scene.visible = np.stack([(scene.id_maps == o.obj_id).sum(axis=(1, 2)) >= min_visible_pixels
                              for o in objects], 1)
    return scene
