"""Referring expressions: the candidate descriptions of an object, the choice among them, and their wording."""

from __future__ import annotations

import itertools

import numpy as np

from bifit.synthetic.config import ATTRIBUTES, EXTREME_TO_RELATION
from bifit.synthetic.scene import Description, Scene, attribute_matches, is_unambiguous


def candidate_descriptions(scene: Scene, obj_id: int) -> list[Description]:
    """Every unambiguous description of ``obj_id`` built from attribute subsets, extremes and relations."""
    target = scene.by_id(obj_id)
    values = {"size": target.size, "colour": target.colour, "shape": target.shape, "motion": target.direction}
    out = []
    refs = [d for o in scene.objects if o.obj_id != obj_id for d in _reference_descriptions(scene, o.obj_id)]
    for k in range(0, len(ATTRIBUTES) + 1):
        for subset in itertools.combinations(ATTRIBUTES, k):
            base = Description(**{a: values[a] for a in subset})
            group = attribute_matches(scene, base)
            if k and group == [obj_id]:
                out.append(base)
            if len(group) >= 2:  # "the leftmost ..." only makes sense among several
                out.extend(Description(**base.attributes(), extreme=e) for e in EXTREME_TO_RELATION)
            for ref in refs:  # relations may over-specify: "the small blue square left of the circle"
                if obj_id in attribute_matches(scene, ref) or len(ref.attributes()) > 2:
                    continue
                for relation in ("left", "right", "above", "below"):
                    out.append(Description(**base.attributes(), relation=relation, ref=ref))
    return [d for d in out if is_unambiguous(scene, d, obj_id)]


def _reference_descriptions(scene: Scene, obj_id: int) -> list[Description]:
    """Static one- or two-attribute descriptions that pick ``obj_id`` alone (used as relation anchors)."""
    o = scene.by_id(obj_id)
    values = {"size": o.size, "colour": o.colour, "shape": o.shape}
    out = []
    for k in (1, 2):
        for subset in itertools.combinations(values, k):
            d = Description(**{a: values[a] for a in subset})
            if attribute_matches(scene, d) == [obj_id]:
                out.append(d)
    return out


def description_kind(desc: Description) -> str:
    if desc.relation is not None:
        return "relation"
    if desc.extreme is not None:
        return "position"
    return "motion" if desc.motion is not None else "attribute"


def choose_descriptions(rng, candidates: list[Description], k: int,
                        kind_weights: dict[str, float] | None = None) -> list[Description]:
    """Up to ``k`` distinct descriptions, cycling over kinds in a random order and preferring short ones.
    kind_weights: the order is drawn without replacement with these weights (None: all equal); kinds of weight 0
    are never chosen."""
    by_kind: dict[str, list[Description]] = {}
    for d in candidates:
        kind = description_kind(d)
        if kind_weights is None or kind_weights[kind] > 0:
            by_kind.setdefault(kind, []).append(d)
    if not by_kind:
        return []
    names = sorted(by_kind)
    weights = np.asarray([1.0 if kind_weights is None else kind_weights[n] for n in names])
    kinds = [str(x) for x in rng.choice(names, size=len(names), replace=False, p=weights / weights.sum())]
    chosen: list[Description] = []
    while len(chosen) < k and any(by_kind.values()):
        for kind in kinds:
            pool = by_kind[kind]
            if not pool or len(chosen) == k:
                continue
            lengths = np.asarray([len(d.attributes()) + (d.ref is not None) for d in pool], dtype=np.float64)
            weights = np.exp(-0.8 * lengths)
            chosen.append(pool.pop(int(rng.choice(len(pool), p=weights / weights.sum()))))
    return chosen


MOTION_PHRASES = {
    "left": ("moving left", "moving to the left", "that moves left", "going left"),
    "right": ("moving right", "moving to the right", "that moves right", "going right"),
    "up": ("moving up", "moving upwards", "that moves up", "going up"),
    "down": ("moving down", "moving downwards", "that moves down", "going down"),
}
EXTREME_PREFIX = {"left": "leftmost", "right": "rightmost", "top": "topmost", "bottom": "lowest"}
EXTREME_SUFFIX = {"left": ("on the left",), "right": ("on the right",), "top": ("at the top",),
                  "bottom": ("at the bottom",)}
RELATION_PHRASES = {
    "left": ("left of", "to the left of"),
    "right": ("right of", "to the right of"),
    "above": ("above",),
    "below": ("below", "under"),
}


def noun_phrase(rng, desc: Description) -> str:
    words = [w for w in (desc.size, desc.colour) if w]
    words.append(desc.shape or str(rng.choice(["object", "shape"])))
    return " ".join(words)


def phrase(rng, desc: Description) -> str:
    """English text for a description, e.g. "the small blue square to the left of the circle"."""
    np_ = noun_phrase(rng, desc)
    suffix = ""
    if desc.extreme is not None:
        if desc.motion is not None or rng.random() < 0.5:
            np_ = f"{EXTREME_PREFIX[desc.extreme]} {np_}"
        else:
            suffix = " " + str(rng.choice(EXTREME_SUFFIX[desc.extreme]))
    parts = [f"the {np_}"]
    relation = None
    if desc.relation is not None:
        relation = f"{rng.choice(RELATION_PHRASES[desc.relation])} the {noun_phrase(rng, desc.ref)}"
    if desc.motion is not None and relation is not None:
        parts.append(f"that moves {desc.motion} and is {relation}")
    elif desc.motion is not None:
        parts.append(str(rng.choice(MOTION_PHRASES[desc.motion])))
    elif relation is not None:
        parts.append(relation)
    return " ".join(parts) + suffix


