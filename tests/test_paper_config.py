"""The paper overlay is the paper configuration: params.yaml with params_paper.yaml (and each official recipe's
file stacked on it) equals, key by key, the official code's values.

Sources of the values below: the official BIFIT `opts` defaults and published commands (BIFIT vs ReferFormer
defaults, per-benchmark recipes), the official training transforms and inference protocols (Resize(360) at
inference, 24-frame Ref-DAVIS17 clips, the whole video in one pass for Ref-YouTube-VOS), and the official model's
modules (frozen-BN ResNet-50 with the stem and layer1 frozen, roberta-base frozen, sentence feature from the fused
text's first token)."""

import re

import pytest
import yaml

from bifit.config import Config, ConfigError, flatten, load_config, to_dict
from pipeline.config import PipelineConfig
from tests.conftest import REPO

OFFICIAL = {
    # model: ResNet-50 + roberta-base, deformable transformer 4/4, 5 queries, dynamic mask head
    "model.backbone": "resnet50", "model.train_backbone": True, "model.backbone_trainable_layers": 3,
    "model.backbone_norm": "frozen_batch_norm", "model.dilation": False, "model.text_encoder": "roberta-base",
    "model.freeze_text_encoder": True, "model.hidden_dim": 256, "model.nheads": 8, "model.enc_layers": 4,
    "model.dec_layers": 4, "model.dim_feedforward": 2048, "model.dropout": 0.1, "model.num_feature_levels": 4,
    "model.enc_n_points": 4, "model.dec_n_points": 4, "model.num_queries": 5, "model.num_classes": 1,
    "model.controller_layers": 3, "model.dynamic_mask_channels": 8, "model.rel_coord": True,
    "model.aux_loss": True, "model.inter_frame_layers": 1, "model.bidirectional_vl": True,
    "model.sentence_source": "fused_text", "model.query_reference": "learned",
    "model.token_category_classes": 0,
    # matcher and loss
    "matcher.cost_class": 2.0, "matcher.cost_bbox": 5.0, "matcher.cost_giou": 2.0, "matcher.cost_mask": 2.0,
    "matcher.cost_dice": 5.0, "loss.cls_loss_coef": 2.0, "loss.bbox_loss_coef": 5.0, "loss.giou_loss_coef": 2.0,
    "loss.mask_loss_coef": 2.0, "loss.dice_loss_coef": 5.0, "loss.focal_alpha": 0.25,
    "loss.referent_map_coef": 0.0, "loss.token_category_coef": 0.0,
    # data: Ref-YouTube-VOS, 6-frame clips, the official augmentation and inference size
    "data.dataset": "ytvos", "data.root": "data/ref-youtube-vos", "data.categories": "ytvos",
    "data.photometric": "official", "data.num_frames": 6,
    "data.train_scales": [288, 320, 352, 392, 416, 448, 480, 512], "data.max_size": 640,
    "data.crop_resize_scales": [400, 500, 600], "data.crop_min": 384, "data.crop_max": 600,
    "data.crop_probability": 0.5,
    "data.eval_short_side": 360, "data.skip_bad_samples": False, "data.batch_grouping": "none",
    "data.expressions_per_clip": 1,
    # train: AdamW, MultiStepLR stepped per epoch; the schedule is the recipe's (RECIPES below)
    "train.seed": 42, "train.lr": 5e-5, "train.lr_backbone": 1e-5, "train.lr_text_encoder": 1e-5,
    "train.lr_text_fusion": 5e-5, "train.lr_linear_proj_mult": 1.0, "train.weight_decay": 5e-4,
    "train.lr_gamma": 0.1, "train.clip_max_norm": 0.1, "train.max_steps_per_epoch": None,
    "train.ema_decay": 0.0,
    # inference
    "eval.threshold": 0.5, "eval.num_frames": None,
    # evaluation protocols and training data of the pipeline
    "datasets.davis.clip_length": 24,  # BIFIT (ReferFormer: 36)
    "datasets.ytvos_proxy.exclude_from_training": False,  # the official model trains on all 3,471 videos
    "datasets.ytvos.source": "real", "datasets.davis.source": "real", "datasets.a2d.source": "real",
    "datasets.jhmdb.source": "real", "datasets.davis.root": "data/ref-davis",
    "datasets.a2d.root": "data/a2d_sentences", "datasets.jhmdb.root": "data/jhmdb_sentences",
    "datasets.refcoco.source": "real", "datasets.refcoco.root": "data/coco",
    "datasets.refcoco.datasets": ("refcoco", "refcoco+", "refcocog"),
    # RefCOCO/+/g pretraining (ReferFormer's): single images, 2 per GPU, 12 epochs, drops at 8 and 10, text
    # encoder trained
    "pretrain.overrides.train.epochs": 12, "pretrain.overrides.train.lr_drop": [8, 10],
    "pretrain.overrides.train.max_steps_per_epoch": None, "pretrain.overrides.train.batch_size": 2,
    "pretrain.overrides.data.num_frames": 1, "pretrain.overrides.model.freeze_text_encoder": False,
    # one worker per GPU; BIFIT's GPU count is unpublished, the ReferFormer scripts use 8
    "ray.num_workers": 8, "ray.use_gpu": True,
}

# Settings of this implementation with no counterpart in the official code (they do not change the math).
IMPLEMENTATION_ONLY = {
    "model.backbone_weights": "a local file path, set by the user",
    "model.msda_backend": "which deformable-attention kernel computes the same function",
    "data.num_workers": "DataLoader processes",
    "train.amp": "bfloat16 autocast on GPU",
    "train.skip_nonfinite_batches": "a fault-tolerance switch",
    "train.deterministic": "deterministic CUDA kernels",
    "eval.batch_expressions": "expressions run together on one video's shared features",
    "eval.device": "where inference runs (auto: the GPU when there is one)",
    "eval.amp": "bfloat16 autocast at inference (off: float32, as the official inference)",
    "train.start_from": "a checkpoint path set by the user (the official --pretrained_weights)",
}

# The official recipes' schedules: overlay files (applied after params.yaml, in order) -> values.
RECIPES = {
    ("params_paper.yaml",): {  # from scratch: the opts defaults
        "train.recipe": "scratch", "train.epochs": 10, "train.lr_drop": [6, 8], "train.batch_size": 1},
    ("params_paper.yaml", "params_paper_finetune_ytvos.yaml"): {  # RefCOCO/+/g pretraining, then fine-tuning
        "train.recipe": "pretrain_finetune", "train.epochs": 6, "train.lr_drop": [3, 5], "train.batch_size": 1},
    ("params_paper.yaml", "params_paper_finetune_a2d.yaml"): {  # RefCOCO/+/g pretraining, then A2D-Sentences
        "data.dataset": "a2d", "train.recipe": "pretrain_finetune", "train.epochs": 6, "train.lr_drop": [3, 5],
        "train.batch_size": 2},
    ("params_paper.yaml", "params_paper_joint.yaml"): {  # joint Ref-YouTube-VOS + RefCOCO/+/g
        "train.recipe": "joint", "train.epochs": 12, "train.lr_drop": [8, 10], "train.batch_size": 1},
}
LIBRARY_SECTIONS = ("model", "matcher", "loss", "data", "train", "eval")


def _paper(overlays=("params_paper.yaml",)) -> dict:
    cfg = load_config(REPO / "params.yaml", overrides={"overlay": list(overlays)}, cls=PipelineConfig)
    return flatten(to_dict(cfg))


def _small_keys(text: str) -> list[str]:
    """Dotted keys of params.yaml lines marked [small] in their comment (nesting read from the indentation)."""
    stack: list[tuple[int, str]] = []
    keys = []
    for line in text.splitlines():
        m = re.match(r"^( *)([A-Za-z_][\w.+]*):(.*)$", line)  # dotted keys too (pretrain.overrides)
        if not m:
            continue
        indent, key, rest = len(m.group(1)), m.group(2), m.group(3)
        stack = [(i, k) for i, k in stack if i < indent] + [(indent, key)]
        if "[small]" in rest:
            keys.append(".".join(k for _, k in stack))
    return keys


def test_every_library_setting_has_an_official_value_or_is_implementation_only():
    settings = {k for k in flatten(to_dict(Config())) if k.split(".")[0] in LIBRARY_SECTIONS}
    schedule = set().union(*RECIPES.values())
    undecided = sorted(settings - set(OFFICIAL) - set(IMPLEMENTATION_ONLY) - schedule)
    assert not undecided, f"add these settings to OFFICIAL or IMPLEMENTATION_ONLY: {undecided}"
    assert not set(OFFICIAL) & set(IMPLEMENTATION_ONLY)


def test_paper_overlay_equals_the_official_values_key_by_key():
    merged = _paper()
    differ = {k: (merged.get(k, "<missing>"), v) for k, v in OFFICIAL.items() if merged.get(k, "<missing>") != v}
    assert not differ, "params.yaml + params_paper.yaml differ from the official code (ours, official): " + \
        "; ".join(f"{k}: {a!r} vs {b!r}" for k, a, b in ((k, *v) for k, v in differ.items()))


@pytest.mark.parametrize("overlays", list(RECIPES), ids=lambda o: "+".join(o))
def test_each_official_recipe_has_its_schedule(overlays):
    merged = _paper(overlays)
    expected = {**OFFICIAL, **RECIPES[overlays]}
    assert {k: merged[k] for k in expected} == expected


def test_every_small_setting_of_the_embedded_default_is_set_back_by_the_overlay():
    small = _small_keys((REPO / "params.yaml").read_text())
    assert "model.backbone" in small and "datasets.davis.clip_length" in small  # the parser reads nesting
    paper = flatten(yaml.safe_load((REPO / "params_paper.yaml").read_text()))
    missing = [k for k in small if k not in paper]
    assert not missing, f"params.yaml marks these [small] but params_paper.yaml has no paper value: {missing}"
    default = flatten(to_dict(load_config(REPO / "params.yaml", cls=PipelineConfig)))
    unchanged = [k for k in small if paper[k] == default[k]]
    assert not unchanged, f"marked [small] but equal to the paper value: {unchanged}"


def test_the_small_marker_parser_follows_nesting():
    text = "a:\n  b: 1  # [small] x\n  c:\n    d: 2 # [small]\ne: 3  # [small]\n"
    assert _small_keys(text) == ["a.b", "a.c.d", "e"]


def test_overlays_apply_in_order_and_bad_values_are_named(tmp_path):
    (tmp_path / "params.yaml").write_text("overlay: [one.yaml, two.yaml]\ntrain:\n  epochs: 3\n  lr: 1.0e-4\n")
    (tmp_path / "one.yaml").write_text("train:\n  epochs: 5\n  lr: 2.0e-4\n")
    (tmp_path / "two.yaml").write_text("train:\n  epochs: 7\n")
    cfg = load_config(tmp_path / "params.yaml")
    assert (cfg.train.epochs, cfg.train.lr) == (7, 2e-4)
    assert load_config(tmp_path / "params.yaml", overrides={"overlay": "one.yaml"}).train.epochs == 5
    with pytest.raises(ConfigError, match=r"params.yaml: overlay: expected null, a file name or a list"):
        load_config(tmp_path / "params.yaml", overrides={"overlay": [1]})
    with pytest.raises(ConfigError, match=r"overlay: cannot read .*three.yaml"):
        load_config(tmp_path / "params.yaml", overrides={"overlay": ["one.yaml", "three.yaml"]})
