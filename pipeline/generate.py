"""DVC stage `generate`: the embedded default benchmark (Ref-YouTube-VOS format) and the tiny text encoder.

    python -m pipeline.generate [--params params.yaml]
"""

from __future__ import annotations

import argparse
import json
import logging

from bifit.synthetic import expression_corpus, generate_benchmark, write_text_encoder_assets
from pipeline.config import load_pipeline_config, resolve

log = logging.getLogger("pipeline.generate")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = load_pipeline_config(args.params)
    ytvos_root = resolve(cfg.paths.synthetic_root) / "ref-youtube-vos"
    summary = generate_benchmark(cfg.synthetic, ytvos_root, progress=True, overwrite=False)
    te_dir = write_text_encoder_assets(resolve(cfg.paths.text_encoder_dir), expression_corpus(ytvos_root),
                                       cfg.text_encoder_assets)
    log.info("benchmark at %s (%s train / %s valid videos), text encoder at %s", ytvos_root,
             summary["train_videos"], summary["valid_videos"], te_dir)
    print(json.dumps({k: v for k, v in summary.items() if k != "root"}, indent=1))
    return summary


if __name__ == "__main__":
    main()
