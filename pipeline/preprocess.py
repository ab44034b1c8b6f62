"""DVC stage `preprocess@<dataset>`: turn the verified raw files into what the loaders read, with indices so that
no loader lists folders.

    python -m pipeline.preprocess --dataset {ytvos,davis,a2d,jhmdb,refcoco} [--params params.yaml]

Writes `<datasets.prepared>/<name>/` (replaced atomically):

- ytvos: `index.json` (train/valid/test video counts, the valid list = valid meta minus test meta, checked to be
  the 202 competition videos for the real data) and `proxy_videos.txt`, the fixed held-out list of the local
  proxy evaluation (bifit/eval/ytvos_proxy.py);
- davis: the Ref-YouTube-VOS-style layout of bifit/prepare/davis.py (non-destructive: hard links);
- a2d: bifit.prepare.a2d.preprocess (instance masks, COCO GT for mAP, indices, from the .h5 files);
- jhmdb: bifit.prepare.jhmdb.preprocess (puppet-mask GT, COCO GT, index, from the .mat files);
- refcoco: each dataset of `datasets.refcoco.datasets` converted by bifit.prepare.refcoco.convert_refcoco into
  `<dataset>/instances_<dataset>_<split>.json` (one entry per sentence) and `<dataset>/conversion.json`, plus
  `index.json` (refs, sentences and COCO images per dataset and split). The refs pickles are read by a restricted
  unpickler: one that tries to import anything stops the stage with an error naming the file. The images stay in
  the raw root's `train2014/`.

Bad samples raise with the file and id, or with `data.skip_bad_samples` are left out and listed in the output's
`skipped_samples.json`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

from bifit.fsutil import staged_folder
from pipeline.config import DATASET_NAMES, PipelineConfig, load_pipeline_config, resolve
from pipeline.download import dataset_root

log = logging.getLogger("pipeline.preprocess")


def prepared_root(cfg: PipelineConfig, name: str) -> Path:
    return resolve(cfg.datasets.prepared) / name


def prepare_ytvos(cfg: PipelineConfig, raw: Path, out: Path) -> dict:
    from bifit.data.ytvos import NUM_VALID_VIDEOS, expressions_path, inference_videos, read_videos
    from bifit.eval.ytvos_proxy import PROXY_LIST_NAME, proxy_videos, write_video_list

    real = cfg.datasets.ytvos.source == "real"
    valid = inference_videos(raw, "valid", expected_count=NUM_VALID_VIDEOS if real else None)
    train = read_videos(expressions_path(raw, "train"))
    proxy = proxy_videos(raw, cfg.datasets.ytvos_proxy.fraction)
    summary = {"dataset": "ref_youtube_vos", "raw_root": os.path.relpath(raw, out.parent.resolve()),
               "train_videos": len(train), "train_expressions": sum(len(v["expressions"]) for v in train.values()),
               "valid_videos": len(valid), "test_videos": len(read_videos(expressions_path(raw, "test"))),
               "proxy_videos": len(proxy), "proxy_fraction": cfg.datasets.ytvos_proxy.fraction}
    with staged_folder(out) as tmp:
        (tmp / "index.json").write_text(json.dumps({**summary, "valid": valid}, indent=1) + "\n")
        write_video_list(tmp / PROXY_LIST_NAME, proxy)
    return summary


def prepare_refcoco(cfg: PipelineConfig, raw: Path, out: Path) -> dict:
    """Convert every dataset of `datasets.refcoco.datasets` into `out/<dataset>/` (all or nothing)."""
    from bifit.prepare.refcoco import convert_refcoco

    datasets = list(cfg.datasets.refcoco.datasets)
    summary = {"dataset": "refcoco", "raw_root": os.path.relpath(raw, out.parent.resolve()), "datasets": {}}
    with staged_folder(out) as tmp:
        for dataset in datasets:
            converted = convert_refcoco(raw, tmp, dataset)
            summary["datasets"][dataset] = {k: converted[k] for k in ("split_by", "splits", "empty_sentences")}
            log.info("%s: %s", dataset, ", ".join(f"{s} {c['sentences']} sentences"
                                                  for s, c in converted["splits"].items()))
        (tmp / "index.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def preprocess(cfg: PipelineConfig, name: str, progress: bool = True) -> dict:
    if name not in DATASET_NAMES:
        raise KeyError(f"--dataset: expected one of {', '.join(DATASET_NAMES)}, got {name!r}")
    raw, out = dataset_root(cfg, name), prepared_root(cfg, name)
    out.parent.mkdir(parents=True, exist_ok=True)
    skip = cfg.data.skip_bad_samples
    if name == "ytvos":
        return prepare_ytvos(cfg, raw, out)
    if name == "davis":
        from bifit.prepare.davis import convert_ref_davis

        return convert_ref_davis(raw, out, progress=progress)
    if name == "refcoco":
        return prepare_refcoco(cfg, raw, out)
    if name == "a2d":
        from bifit.prepare.a2d import preprocess as prepare_a2d

        return prepare_a2d(raw, out, skip_bad_samples=skip, progress=progress)
    from bifit.prepare.jhmdb import preprocess as prepare_jhmdb

    return prepare_jhmdb(raw, out, skip_bad_samples=skip, progress=progress)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--dataset", required=True, choices=DATASET_NAMES)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = load_pipeline_config(args.params)
    summary = preprocess(cfg, args.dataset)
    log.info("%s prepared at %s", args.dataset, prepared_root(cfg, args.dataset))
    print(json.dumps({k: v for k, v in summary.items() if k != "irregularities"}, indent=1, default=str))
    return summary


if __name__ == "__main__":
    main()
