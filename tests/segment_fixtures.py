"""Fixtures shared by the segment, video and web-demo tests: a small generated clip with its sentences and a
random-weight checkpoint in our format (a test module imports them with `import *`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO

__all__ = ["checkpoint", "clip", "loaded"]  # the fixtures: `from tests.segment_fixtures import *`

CLIP_FRAMES, CLIP_H, CLIP_W = 4, 96, 128
SHORT_SIDE = 96  # the clip's own size: no resize, fast


@pytest.fixture(scope="session")
def clip() -> tuple[np.ndarray, list[str]]:
    """(RGB uint8 [4, 96, 128, 3] of the synthetic benchmark's generator, its generated sentences)."""
    from bifit.example_clip import example_clip

    return example_clip(CLIP_FRAMES, height=CLIP_H, width=CLIP_W)


# Written in a child process: training the tokenizer leaves the `tokenizers` thread pool spinning for seconds
# afterwards, which slowed every model call of the tests that followed by 10-50x on two cores.
WRITE_CHECKPOINT = """
import sys, torch
from bifit.example_clip import write_untrained_checkpoint
path = write_untrained_checkpoint(sys.argv[1], sys.argv[3:])
obj = torch.load(path, weights_only=True)
obj["config"]["data"]["eval_short_side"] = int(sys.argv[2])
torch.save(obj, path)
"""


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory, clip) -> Path:
    """Our checkpoint of a small random-weight model (evaluated at short side 96), its text encoder beside it."""
    path = tmp_path_factory.mktemp("ckpt") / "untrained.pth"
    subprocess.run([sys.executable, "-c", WRITE_CHECKPOINT, str(path), str(SHORT_SIDE), *clip[1]], check=True,
                   cwd=REPO, capture_output=True, timeout=300)
    return path


@pytest.fixture(scope="session")
def loaded(checkpoint):
    from bifit.loading import load_model

    return load_model(checkpoint, device="cpu")
