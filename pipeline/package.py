"""DVC stage `package`: the Ref-YouTube-VOS submission zip (`Annotations/<video>/<exp_id>/<frame>.png`).

    python -m pipeline.package [--params params.yaml]

Before the zip is written, the predictions are checked against the valid expressions file: every
expression and every listed frame present, each PNG single-channel 8-bit with values {0, 255} at the
original frame size.
"""

from __future__ import annotations

import argparse
import logging
import os
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from bifit.data import inference_expressions
from pipeline.config import load_pipeline_config, resolve

log = logging.getLogger("pipeline.package")


class SubmissionError(ValueError):
    pass


def check_predictions(pred_dir: Path, data_root: Path, split: str = "valid") -> list[tuple[Path, str]]:
    """Every (png path, archive name) of the submission; raises SubmissionError listing what is wrong."""
    problems, files = [], []
    for e in inference_expressions(data_root, split):
        size = None
        jpeg_dir = data_root / split / "JPEGImages" / e.video
        for frame in e.frames:
            png = pred_dir / e.video / e.exp_id / f"{frame}.png"
            if not png.is_file():
                problems.append(f"missing {png}")
                continue
            with Image.open(png) as im:
                if im.mode != "L":
                    problems.append(f"{png}: mode {im.mode}, expected L (8-bit single channel)")
                    continue
                if size is None:
                    with Image.open(jpeg_dir / f"{frame}.jpg") as frame_im:
                        size = frame_im.size
                if im.size != size:
                    problems.append(f"{png}: size {im.size}, expected the frame size {size}")
                values = set(np.unique(np.asarray(im)).tolist())
                if not values <= {0, 255}:
                    problems.append(f"{png}: values {sorted(values)[:5]}, expected only 0 and 255")
            files.append((png, f"Annotations/{e.video}/{e.exp_id}/{frame}.png"))
    if problems:
        raise SubmissionError(f"{len(problems)} problem(s) in {pred_dir}:\n  " + "\n  ".join(problems[:20]))
    return files


def write_zip(files: list[tuple[Path, str]], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".partial")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for path, name in files:
            zf.write(path, name)
    os.replace(tmp, out)


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = load_pipeline_config(args.params)
    files = check_predictions(resolve(cfg.paths.predictions), Path(cfg.data.root))
    write_zip(files, resolve(cfg.paths.submission))
    log.info("wrote %s (%d masks)", resolve(cfg.paths.submission), len(files))
    return resolve(cfg.paths.submission)


if __name__ == "__main__":
    main()
