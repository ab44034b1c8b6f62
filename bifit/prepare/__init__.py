"""Turning the official downloads into what the loaders read: checking archives and on-disk releases against their
manifests (`sources`, `manifest`, `archive`), and the per-benchmark conversions (`davis`: Ref-DAVIS17 to the
Ref-YouTube-VOS layout; `a2d`, `jhmdb`: the frame and mask indexes and the COCO ground truth; `refcoco`: the
refer release's pickled refs, read with a restricted unpickler, to the COCO-format RefCOCO/+/g split files)."""
