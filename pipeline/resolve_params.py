"""DVC stage `resolve_params`: params.yaml with its overlay files applied, written out in full.

    python -m pipeline.resolve_params [--params params.yaml] [--out params.resolved.yaml]

params.yaml stays the one file a user edits; its `overlay` key names files merged on top (e.g. the paper
configuration, params_paper.yaml). The other stages read params.yaml the same way (pipeline/config.py), but
declare their DVC params from the file written here, so `dvc params diff`, `dvc exp show` and dvc.lock list every
value an overlay changes instead of only the one `overlay` key. The file holds every setting of every section
(defaults included, validated, paths as written: repository-relative) and can itself be loaded as a params file.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from bifit.config import load_config, to_dict
from pipeline.config import PipelineConfig

DEFAULT_OUT = "params.resolved.yaml"


def _plain(value):
    """Tuples as lists, recursively (YAML's safe dumper writes lists only)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


class _Dumper(yaml.SafeDumper):
    """Block style, one setting a line (readable diffs); a list of plain values on one line."""


def _represent_list(dumper, data):
    flow = all(not isinstance(v, (dict, list)) for v in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_Dumper.add_representer(list, _represent_list)


def resolved_params(params: str | Path) -> dict:
    """The settings `pipeline.config.load_pipeline_config(params)` runs with, as a plain mapping of sections,
    before its paths are made absolute."""
    return _plain(to_dict(load_config(params, cls=PipelineConfig)))


def overlay_of(params: str | Path):
    """The `overlay` value of a params file (null, a file or a list of files)."""
    return (yaml.safe_load(Path(params).read_text()) or {}).get("overlay")


def render(params: str | Path) -> str:
    overlay = overlay_of(params)
    header = (f"# Generated from {Path(params).name} (overlay: {json.dumps(overlay)}) by the DVC stage "
              "resolve_params\n# (python -m pipeline.resolve_params). Do not edit: edit params.yaml. "
              "Every setting the stages run with.\n")
    return header + yaml.dump(resolved_params(params), Dumper=_Dumper, sort_keys=False, width=120)


def write_resolved(params: str | Path, out: str | Path) -> Path:
    out = Path(out)
    text = render(params)
    if not out.exists() or out.read_text() != text:  # unchanged: leave the file (and its mtime) alone
        out.write_text(text)
    return out


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", default=None, help=f"default: {DEFAULT_OUT} next to --params")
    args = parser.parse_args(argv)
    params = Path(args.params)
    out = Path(args.out) if args.out else params.with_name(DEFAULT_OUT)
    path = write_resolved(params, out)
    print(f"{path}: {params.name} with overlay {json.dumps(overlay_of(params))} applied")
    return path


if __name__ == "__main__":
    main()
