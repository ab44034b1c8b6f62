"""The scene model: objects with trajectories, and descriptions that must pick out exactly one of them."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from bifit.synthetic.config import ATTRIBUTES, EXTREME_TO_RELATION, RELATION_MARGIN


@dataclass
class SceneObject:
    obj_id: int
    colour: str
    shape: str
    size: str
    radius: float
    direction: str
    mode: str  # "inside" | "exit" | "enter" | "cross"
    depth: int = 0  # paint order, larger is in front
    centres: np.ndarray = field(default=None, repr=False)  # [T, 2] (x, y)
    rgb: tuple[int, int, int] = (0, 0, 0)


@dataclass
class Scene:
    height: int
    width: int
    objects: list[SceneObject]
    id_maps: np.ndarray = field(default=None, repr=False)  # [T, H, W] uint8, visible object id per pixel
    visible: np.ndarray = field(default=None, repr=False)  # [T, N] bool, >= min_visible_pixels visible
    pair_cache: dict = field(default_factory=dict, repr=False)

    def by_id(self, obj_id: int) -> SceneObject:
        return next(o for o in self.objects if o.obj_id == obj_id)

    def index(self, obj_id: int) -> int:
        return next(i for i, o in enumerate(self.objects) if o.obj_id == obj_id)


@dataclass(frozen=True)
class Description:
    """Structured referring expression. Attribute fields are equality tests; ``extreme`` ("left", "right", "top",
    "bottom") selects the extreme object among those matching the attributes; ``relation`` ("left", "right",
    "above", "below") relates the target to the object picked by ``ref`` (attributes only)."""

    size: str | None = None
    colour: str | None = None
    shape: str | None = None
    motion: str | None = None
    extreme: str | None = None
    relation: str | None = None
    ref: Description | None = None

    def attributes(self) -> dict:
        return {a: getattr(self, a) for a in ATTRIBUTES if getattr(self, a) is not None}

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if v is not None and k != "ref"}
        if self.ref is not None:
            d["ref"] = self.ref.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Description:
        d = dict(d)
        ref = d.pop("ref", None)
        return cls(**d, ref=cls.from_dict(ref) if ref is not None else None)


HOLDS, FAILS, UNCLEAR = 1, -1, 0


def pair_state(scene: Scene, a: int, b: int, relation: str) -> int:
    """Whether object ``a`` is ``relation`` of object ``b`` in every frame where both are visible."""
    key = (a, b, relation)
    if key not in scene.pair_cache:
        scene.pair_cache[key] = _pair_state(scene, a, b, relation)
    return scene.pair_cache[key]


def _pair_state(scene: Scene, a: int, b: int, relation: str) -> int:
    ia, ib = scene.index(a), scene.index(b)
    frames = scene.visible[:, ia] & scene.visible[:, ib]
    if frames.sum() < 2:
        return UNCLEAR
    ca, cb = scene.objects[ia].centres[frames], scene.objects[ib].centres[frames]
    axis, sign = {"left": (0, 1), "right": (0, -1), "above": (1, 1), "below": (1, -1)}[relation]
    gap = sign * (cb[:, axis] - ca[:, axis])  # positive where the relation holds
    margin = RELATION_MARGIN * (scene.width if axis == 0 else scene.height)
    if np.all(gap >= margin):
        return HOLDS
    if np.all(gap <= -margin):
        return FAILS
    return UNCLEAR


def attribute_matches(scene: Scene, desc: Description) -> list[int]:
    want = desc.attributes()
    return [o.obj_id for o in scene.objects if all(getattr(o, "direction" if k == "motion" else k) == v
                                                   for k, v in want.items())]


def spatial_state(scene: Scene, desc: Description, obj_id: int, group: list[int]) -> int:
    """State of the spatial part of ``desc`` for ``obj_id`` (HOLDS when there is none)."""
    if desc.relation is not None:
        refs = resolve(scene, desc.ref)
        if len(refs) != 1 or refs[0] == obj_id:
            return UNCLEAR
        return pair_state(scene, obj_id, refs[0], desc.relation)
    if desc.extreme is not None:
        relation = EXTREME_TO_RELATION[desc.extreme]
        states = [pair_state(scene, obj_id, other, relation) for other in group if other != obj_id]
        if any(s == FAILS for s in states):
            return FAILS
        return HOLDS if all(s == HOLDS for s in states) else UNCLEAR
    return HOLDS


def resolve(scene: Scene, desc: Description) -> list[int]:
    """Ids of the objects ``desc`` may refer to: those not clearly ruled out. Unambiguous iff exactly one remains and
    its description clearly holds (see :func:`is_unambiguous`)."""
    group = attribute_matches(scene, desc)
    return [o for o in group if spatial_state(scene, desc, o, group) != FAILS]


def is_unambiguous(scene: Scene, desc: Description, obj_id: int) -> bool:
    group = attribute_matches(scene, desc)
    return resolve(scene, desc) == [obj_id] and spatial_state(scene, desc, obj_id, group) == HOLDS


