"""DVC stage `download@<dataset>`: get the raw files of one benchmark and verify them before anything else runs.

    python -m pipeline.download --dataset {ytvos,davis,a2d,jhmdb,refcoco} [--params params.yaml] [--fetch]

`datasets.<name>.source: synthetic` writes the tiny generated copy in the official on-disk format to the dataset
root (Ref-YouTube-VOS: the `generate` stage already did; Ref-DAVIS17: the three official zips, then extracted like
real downloads; A2D/JHMDB: the .h5/.mat/.mp4/.png files and the MTTR JSONs; RefCOCO/+/g: the COCO `train2014/`
images and each refer dataset's `instances.json` and `refs(<splitBy>).p`). `source: real` prints exactly which
files to place where (bifit/prepare/sources.py), fetches the publicly fetchable ones with `--fetch` (resuming
partial downloads), extracts the archives that are present, in the listed order (bifit/prepare/archive.py: refuses
absolute paths, `..`, links leaving the root, size bombs, and never overwrites a different file, except a
documentation file such as `DAVIS/README.md` that an earlier official archive extracted: the later archive's copy
wins, as with the official `unzip` instructions, with a warning) and verifies the layout (expected files, exact
counts where the release fixes them and minimums where copies differ, line counts; SHA-256 of the files in
`datasets.<name>.pins` when set).

Always writes `<datasets.status>/<name>.json` (what was found and expected, the documentation files an archive
replaced; deterministic, so an unchanged dataset does not invalidate later stages) and
`<datasets.status>/<name>.sha256` (the checksums of the metadata files, in the sha256sum format
`datasets.<name>.pins` accepts). Exits non-zero, listing every problem and the instructions,
when the data is incomplete. Re-running is cheap: extraction and checksums are recorded and skipped when done.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path

from bifit.prepare.archive import ArchiveError, extract
from bifit.prepare.manifest import ManifestError, checksums, read_pins, verify, with_pins
from bifit.prepare.sources import (
    SOURCES,
    TITLES,
    FetchError,
    fetch,
    instructions,
    real_manifest,
    synthetic_manifest,
)
from pipeline.config import DATASET_NAMES, PipelineConfig, load_pipeline_config, resolve

log = logging.getLogger("pipeline.download")


def dataset_root(cfg: PipelineConfig, name: str) -> Path:
    if name == "ytvos":
        return Path(cfg.data.root)  # the training set (resolved by load_pipeline_config)
    return resolve(getattr(cfg.datasets, name).root)


def synthetic_config(cfg: PipelineConfig, name: str):
    return cfg.synthetic if name == "ytvos" else getattr(cfg.datasets, name).synthetic


def _clear_extracted(root: Path) -> None:
    """Remove what earlier synthetic zips were extracted to (only called for our own synthetic folder)."""
    for top in ("DAVIS", "davis_text_annotations", ".extracted"):
        shutil.rmtree(root / top, ignore_errors=True)


def write_synthetic(cfg: PipelineConfig, name: str, root: Path, progress: bool = True) -> dict:
    """Generate the synthetic copy of ``name`` at ``root`` (idempotent) and extract its archives."""
    syn = synthetic_config(cfg, name)
    if name == "ytvos":
        from bifit.synthetic.ytvos import read_manifest

        manifest = read_manifest(root)
        if manifest is None:
            raise FileNotFoundError(f"{root}: no synthetic Ref-YouTube-VOS here; it is written by the generate stage "
                                    "(python -m pipeline.generate), which runs before this one")
        return {"generated": False, **manifest["summary"]}
    if name == "davis":
        from bifit.synthetic.davis import archive_names, generate_ref_davis

        summary = generate_ref_davis(syn, root, progress=progress)
        if summary["generated"]:
            _clear_extracted(root)
        replaced, order = {}, [root / a for a in archive_names()]
        for archive in order:  # the official order: the later zip's documentation files win
            report = extract(archive, root, progress=progress, official_order=order)
            if report.replaced:
                replaced[archive.name] = report.replaced
        return {**summary, "replaced": replaced}
    if name == "a2d":
        from bifit.synthetic.a2d import generate_a2d

        return generate_a2d(syn, root, progress=progress)
    if name == "refcoco":
        from bifit.synthetic.refcoco import generate_refcoco

        # left alone when the manifest records the same generator version and config; a non-empty folder
        # without our manifest is refused (never overwritten: it may be someone's real data)
        return generate_refcoco(syn, root, progress=progress)
    from bifit.synthetic.jhmdb import generate_jhmdb

    return generate_jhmdb(syn, root, progress=progress)


def official_order(name: str, root: Path, extract_to: str) -> list[Path]:
    """The archives of ``name`` extracted into the same folder, in the order of the official instructions."""
    return [root / f.dest for f in SOURCES[name] if f.extract_to == extract_to]


def get_real(name: str, root: Path, fetch_missing: bool, progress: bool = True) -> dict:
    """Fetch (optionally) and extract what is present of the real files of ``name``."""
    done = {"fetched": [], "extracted": [], "missing": [], "replaced": {}}
    for f in SOURCES[name]:  # the official order: a later archive's documentation files win
        path = root / f.dest
        if not path.exists() and f.url and fetch_missing:
            fetch(f.url, path, progress=progress)
            done["fetched"].append(f.name)
        if f.is_archive:
            if path.is_file():
                report = extract(path, root / f.extract_to, progress=progress,
                                 official_order=official_order(name, root, f.extract_to))
                done["extracted"].append(f.name)
                if report.replaced:
                    done["replaced"][f.name] = report.replaced
            else:
                done["missing"].append(f.name)
    return done


def download(cfg: PipelineConfig, name: str, fetch_missing: bool = False, progress: bool = True) -> dict:
    """Run the stage for one dataset; returns the status report (raises ManifestError on an incomplete set)."""
    if name not in DATASET_NAMES:
        raise KeyError(f"--dataset: expected one of {', '.join(DATASET_NAMES)}, got {name!r}")
    settings = getattr(cfg.datasets, name)
    root = dataset_root(cfg, name)
    status_dir = resolve(cfg.datasets.status)
    status_dir.mkdir(parents=True, exist_ok=True)
    report: dict = {"dataset": name, "title": TITLES[name], "source": settings.source}
    if settings.source == "synthetic":
        summary = write_synthetic(cfg, name, root, progress)
        report["synthetic"] = {k: v for k, v in summary.items() if k not in ("seconds", "generated", "root")}
        manifest = synthetic_manifest(name, synthetic_config(cfg, name))
    else:
        root.mkdir(parents=True, exist_ok=True)
        print(instructions(name, root))
        report["obtained"] = get_real(name, root, fetch_missing, progress)
        manifest = real_manifest(name)
    if settings.pins:
        manifest = with_pins(manifest, read_pins(resolve(settings.pins)))
    cache = status_dir / f"{name}.checksum-cache.json"  # not in the data folder: generate's output for ytvos
    result = verify(manifest, root, cache)
    report.update(ok=result.ok, problems=result.problems, found=result.checked)
    files = [e.path for e in manifest.items if e.kind == "file" and (root / e.path).is_file()]
    sums = checksums(root, files, cache)
    report["sha256"] = sums
    (status_dir / f"{name}.json").write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
    (status_dir / f"{name}.sha256").write_text("".join(f"{h}  {p}\n" for p, h in sorted(sums.items())))
    hint = "" if settings.source == "synthetic" else instructions(name, root)
    result.raise_if_bad(hint)
    return report


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--dataset", required=True, choices=DATASET_NAMES)
    parser.add_argument("--fetch", action="store_true", help="download the publicly fetchable files (source: real)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = load_pipeline_config(args.params)
    try:
        report = download(cfg, args.dataset, fetch_missing=args.fetch)
    except (ManifestError, ArchiveError, FetchError, FileExistsError, FileNotFoundError) as err:
        log.error("%s", err)
        sys.exit(1)
    log.info("%s (%s): %s verified", report["title"], report["source"], dataset_root(cfg, args.dataset))
    return report


if __name__ == "__main__":
    main()
