"""Settings of the synthetic Ref-YouTube-VOS benchmark and the vocabulary of its scenes (shapes, colours, sizes,
motions, relations)."""


from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from bifit.config import check, int_in

GENERATOR_VERSION = 2  # 2: the kinds of a video's expressions drawn with synthetic.kind_weights
MANIFEST_NAME = "SYNTHETIC_BENCHMARK.json"
SCENES_NAME = "synthetic_scenes.json"

COLOURS = {
    "red": (215, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 90, 225),
    "yellow": (235, 205, 35),
    "purple": (150, 60, 195),
    "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = ("small", "large")
SYNTHETIC_CATEGORIES = tuple(sorted(SHAPES))
DIRECTIONS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}
OPPOSITE_SIZE = {"small": "large", "large": "small"}
EXTREME_TO_RELATION = {"left": "left", "right": "right", "top": "above", "bottom": "below"}
SPLIT_CODES = {"train": 0, "valid": 1, "test": 2}
RELATION_MARGIN = 0.04  # fraction of the frame side a spatial relation must hold by, in every co-visible frame
ATTRIBUTES = ("size", "colour", "shape", "motion")
EXPRESSION_KINDS = ("attribute", "motion", "position", "relation")  # bifit.synthetic.expressions.description_kind


@dataclass(frozen=True)
class SyntheticConfig:
    seed: int = 0
    num_train_videos: int = 60
    num_valid_videos: int = 12
    num_test_videos: int = 3
    frames_per_video: int = 12
    frame_stride: int = 5  # frame names 00000, 00005, ... like the released every-5th-frame YTVOS frames
    height: int = 192
    width: int = 320
    min_objects: int = 3
    max_objects: int = 5
    expressions_per_object: int = 2
    # how often each kind of expression is chosen (relative weights; 0 = never): attribute "the small red circle",
    # motion "the red object moving left", position "the leftmost circle", relation "the circle above the square"
    kind_weights: dict[str, float] = field(default_factory=lambda: dict.fromkeys(EXPRESSION_KINDS, 1.0))
    small_radius: tuple[int, int] = (9, 12)
    large_radius: tuple[int, int] = (18, 24)
    min_visible_pixels: int = 20  # an object counts as present in a frame with at least this many visible pixels
    jpeg_quality: int = 90
    max_attempts: int = 200  # scene resamplings per video before giving up

    def __post_init__(self):
        object.__setattr__(self, "small_radius", tuple(self.small_radius))
        object.__setattr__(self, "large_radius", tuple(self.large_radius))
        self.validate()

    def validate(self, where: str = "SyntheticConfig"):
        for name, lo, hi in (("seed", 0, 2**32 - 1), ("num_train_videos", 1, 100_000),
                             ("num_valid_videos", 1, 100_000), ("num_test_videos", 0, 100_000),
                             ("frames_per_video", 4, 1000), ("frame_stride", 1, 100), ("height", 96, 2048),
                             ("width", 96, 2048), ("min_objects", 3, 8), ("max_objects", self.min_objects, 8),
                             ("expressions_per_object", 1, 6)):
            check(int_in(getattr(self, name), lo, hi), f"{where}.{name}", f"an int in [{lo}, {hi}]",
                  getattr(self, name))
            if name in ("height", "width"):
                check(getattr(self, name) % 32 == 0, f"{where}.{name}", "a multiple of 32 in [96, 2048]",
                      getattr(self, name))
        check(isinstance(self.kind_weights, dict) and set(self.kind_weights) == set(EXPRESSION_KINDS)
              and all(isinstance(w, int | float) and np.isfinite(w) and w >= 0 for w in self.kind_weights.values())
              and sum(self.kind_weights.values()) > 0, f"{where}.kind_weights",
              f"a weight >= 0 for each of {', '.join(EXPRESSION_KINDS)}, not all 0", self.kind_weights)
        limit = min(self.height, self.width) // 4
        for name in ("small_radius", "large_radius"):  # large: at least 1.4x the largest small radius
            pair = getattr(self, name)
            lo = 3 if name == "small_radius" else int(np.ceil(1.4 * self.small_radius[1]))
            check(len(pair) == 2 and all(int_in(v, lo, limit) for v in pair) and pair[0] <= pair[1],
                  f"{where}.{name}", f"(min, max) ints with {lo} <= min <= max <= {limit}", pair)
        for name, lo, hi in (("min_visible_pixels", 1, int(np.pi * self.small_radius[0] ** 2 / 2)),
                             ("jpeg_quality", 50, 100), ("max_attempts", 1, 100_000)):
            check(int_in(getattr(self, name), lo, hi), f"{where}.{name}", f"an int in [{lo}, {hi}]",
                  getattr(self, name))


