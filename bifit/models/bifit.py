"""BIFIT: the full referring video object segmentation network.

images [b, t, 3, H, W] + expression tokens [b, l] -> per frame and query: a class logit, a box
and mask logits at 1/4 resolution, for the last decoder layer and (aux) every earlier one.

Intermediates (resized text, per-level fusion, sentence, transformer outputs, mask features) are the
outputs of named submodules: capture them with `bifit.models.diagnostics.capture`.
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from bifit.models.backbone import VisualBackbone
from bifit.models.deformable_transformer import DeformableTransformer
from bifit.models.mask_head import MLP, DynamicMaskHead
from bifit.models.pixel_decoder import CrossModalFPNDecoder
from bifit.models.position_encoding import sine_position_1d, sine_position_2d
from bifit.models.text_encoder import FeatureResizer, text_hidden_size
from bifit.models.vl_interaction import VisionLanguageInteraction


@dataclass
class VisualFeatures:
    """Text-independent features of a batch of clips: backbone res2, every level's mask and position,
    and the projected transformer inputs (all [(b t), ...])."""

    num_frames: int
    res2: torch.Tensor
    masks: list[torch.Tensor]
    poses: list[torch.Tensor]
    srcs: list[torch.Tensor]
    src_masks: list[torch.Tensor]
    src_poses: list[torch.Tensor]

    def repeat(self, n: int) -> VisualFeatures:
        """The same clip(s) n times over the batch: [(b t), ...] -> [(n b t), ...]."""
        def rep(x):
            return x.repeat(n, *([1] * (x.dim() - 1)))

        return VisualFeatures(self.num_frames, rep(self.res2), *[[rep(x) for x in xs] for xs in (
            self.masks, self.poses, self.srcs, self.src_masks, self.src_poses)])


def _resize_mask(mask: torch.Tensor, size) -> torch.Tensor:
    """[n, H, W] bool -> [n, h, w] bool, nearest."""
    return F.interpolate(mask[None].float(), size=size).to(torch.bool)[0]



# cuDNN's fused attention builds an execution plan for every new shape (several ms of host time per call), and
# token lengths and frame sizes change from step to step; the flash and memory-efficient kernels need no plan.
_CUDA_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def attention_kernels(device: torch.device):
    """The scaled-dot-product attention kernels the model may use on `device` (a context manager)."""
    return sdpa_kernel(_CUDA_ATTENTION) if device.type == "cuda" else contextlib.nullcontext()


class BIFIT(nn.Module):
    def __init__(self, cfg, text_encoder: nn.Module):
        """cfg: a `bifit.config.ModelConfig`; text_encoder: a Hugging Face encoder module."""
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_dim
        self.num_queries = cfg.num_queries
        self.backbone = VisualBackbone(cfg.backbone, cfg.train_backbone, cfg.dilation, cfg.backbone_weights,
                                       cfg.backbone_norm, cfg.backbone_trainable_layers)
        self.text_encoder = text_encoder
        if cfg.freeze_text_encoder:
            self.text_encoder.requires_grad_(False)
        if cfg.bidirectional_vl and getattr(self.text_encoder, "pooler", None) is not None:
            self.text_encoder.pooler.requires_grad_(False)  # unused: the sentence is built from the text
        self.resizer = FeatureResizer(text_hidden_size(text_encoder), d, dropout=0.1)
        self.vl_interaction = VisionLanguageInteraction(
            d, cfg.nheads, bidirectional=cfg.bidirectional_vl,
            sentence_source=cfg.sentence_source if cfg.bidirectional_vl else "encoder")

        channels = self.backbone.num_channels
        projs = [nn.Sequential(nn.Conv2d(c, d, 1), nn.GroupNorm(32, d)) for c in channels[-3:]]
        in_ch = channels[-1]
        for _ in range(cfg.num_feature_levels - 3):
            projs.append(nn.Sequential(nn.Conv2d(in_ch, d, 3, stride=2, padding=1), nn.GroupNorm(32, d)))
            in_ch = d
        self.input_proj = nn.ModuleList(projs)
        self.query_embed = nn.Embedding(cfg.num_queries, d)
        self.transformer = DeformableTransformer(
            d_model=d, nhead=cfg.nheads, num_encoder_layers=cfg.enc_layers, num_decoder_layers=cfg.dec_layers,
            dim_feedforward=cfg.dim_feedforward, dropout=cfg.dropout, num_feature_levels=cfg.num_feature_levels,
            enc_n_points=cfg.enc_n_points, dec_n_points=cfg.dec_n_points, inter_frame_layers=cfg.inter_frame_layers,
            query_reference=cfg.query_reference,
        )
        class_embed = nn.Linear(d, cfg.num_classes)
        bbox_embed = MLP(d, d, 4, 3)
        self.class_embed = nn.ModuleList(copy.deepcopy(class_embed) for _ in range(cfg.dec_layers))
        self.bbox_embed = nn.ModuleList(copy.deepcopy(bbox_embed) for _ in range(cfg.dec_layers))
        self.pixel_decoder = CrossModalFPNDecoder(channels[0], d, cfg.dim_feedforward, cfg.nheads, cfg.dropout)
        self.mask_head = DynamicMaskHead(d, cfg.dynamic_mask_channels, cfg.controller_layers, cfg.rel_coord)
        # not in the official model: the category of the object under each token of the finest encoder level
        self.token_category_head = nn.Linear(d, cfg.token_category_classes) if cfg.token_category_classes else None
        self._reset_head_parameters()

    def _reset_head_parameters(self):
        prior = -math.log((1 - 0.01) / 0.01)
        for head in self.class_embed:
            nn.init.constant_(head.bias, prior)
        for head in self.bbox_embed:
            nn.init.zeros_(head.layers[-1].weight)
            nn.init.zeros_(head.layers[-1].bias)
            nn.init.constant_(head.layers[-1].bias[2:], -2.0)
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.zeros_(proj[0].bias)
        for layer in self.mask_head.controller.layers:
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)
        for name, p in self.pixel_decoder.named_parameters():
            if "cross_attn" in name and p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def encode_text(self, input_ids, attention_mask):
        """-> text features [b, l, c], text padding mask [b, l] (True = pad), and the encoder's pooled
        sentence [b, c] where the sentence feature comes from it, else None."""
        encoded = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask)
        text = self.resizer(encoded.last_hidden_state)
        pooled = None
        if self.vl_interaction.needs_encoder_sentence:
            pooled = self.resizer(encoded.pooler_output)
        return text, attention_mask.ne(1), pooled

    def encode_visual(self, images, image_mask, valid_indices=None) -> VisualFeatures:
        """The text-independent part: backbone levels, their masks and positions, projected inputs."""
        b, t = images.shape[:2]
        dtype = images.dtype
        rows = torch.arange(b, device=images.device)
        if valid_indices is not None and not self.backbone.temporal:
            # only the annotated frame continues; a per-frame backbone needs only that frame, so select before it
            images, image_mask = images[rows, valid_indices][:, None], image_mask[rows, valid_indices][:, None]
            t = 1
        images, image_mask = images.flatten(0, 1), image_mask.flatten(0, 1)
        feats = self.backbone(images, t)  # res2..res5, [(b t), c_l, h_l, w_l]
        if valid_indices is not None and self.backbone.temporal:
            # a clip-level backbone (Video-Swin) sees every frame; frame b*t + valid_indices[b] continues
            keep = rows * t + valid_indices
            feats, image_mask, t = [f[keep] for f in feats], image_mask[keep], 1
        masks = [_resize_mask(image_mask, f.shape[-2:]) for f in feats]
        poses = [sine_position_2d(m, self.cfg.hidden_dim // 2, dtype=dtype) for m in masks]
        srcs = [proj(f) for proj, f in zip(self.input_proj, feats[-3:])]
        src_masks, src_poses = masks[-3:], poses[-3:]
        extra_in = feats[-1]
        for proj in self.input_proj[len(srcs):]:
            src = proj(extra_in)
            m = _resize_mask(image_mask, src.shape[-2:])
            srcs.append(src)
            src_masks.append(m)
            src_poses.append(sine_position_2d(m, self.cfg.hidden_dim // 2, dtype=dtype))
            extra_in = src
        return VisualFeatures(t, feats[0], masks, poses, srcs, src_masks, src_poses)

    def _visual_per_expression(self, visual: VisualFeatures, num_expressions: int) -> VisualFeatures:
        """k expressions per clip, expression-major: the clips' features repeated k times."""
        clips = visual.res2.shape[0] // visual.num_frames
        if num_expressions == clips:
            return visual
        if num_expressions % clips:
            raise ValueError(f"BIFIT: {num_expressions} expressions for {clips} clips; "
                             "expected a multiple (k per clip)")
        return visual.repeat(num_expressions // clips)

    def forward(self, images, image_mask, input_ids, attention_mask, image_sizes, valid_indices=None,
                with_aux: bool = True, visual: VisualFeatures | None = None):
        """images [b, t, 3, H, W]; image_mask [b, t, H, W] (True = padding); input_ids, attention_mask [b, l];
        image_sizes [b, 2] unpadded (h, w); valid_indices [b] (A2D: the one annotated frame of each clip).
        visual: precomputed `encode_visual` output (e.g. one video shared by several expressions, repeated).
        """
        with attention_kernels(input_ids.device):
            return self._forward(images, image_mask, input_ids, attention_mask, image_sizes, valid_indices, with_aux,
                                 visual)

    def _forward(self, images, image_mask, input_ids, attention_mask, image_sizes, valid_indices, with_aux, visual):
        if visual is None:
            visual = self.encode_visual(images, image_mask, valid_indices)
        b, t, q = input_ids.shape[0], visual.num_frames, self.num_queries
        visual = self._visual_per_expression(visual, b)
        text, text_mask, encoder_sentence = self.encode_text(input_ids, attention_mask)
        text_seq = text.transpose(0, 1)  # [b, l, c] -> [l, b, c]
        text_pos = sine_position_1d(text_mask, self.cfg.hidden_dim, dtype=visual.res2.dtype)
        srcs, sentence = self.vl_interaction(visual.srcs, visual.src_masks, visual.src_poses, text_seq, text_mask,
                                             text_pos, t, encoder_sentence)
        queries = sentence[:, None, None].expand(b, t, q, -1).reshape(b * t, q, -1)  # [b, c] -> [(b t), q, c]
        frame_sentence = sentence[:, None].expand(b, t, -1).reshape(b * t, -1)  # [b, c] -> [(b t), c]
        out = self.transformer(srcs, visual.src_masks, visual.src_poses, queries, self.query_embed.weight, t,
                               self.bbox_embed, frame_sentence)
        mask_features = self.pixel_decoder(visual.res2, out["memory"], visual.masks, visual.poses, text_seq, text_mask,
                                           text_pos, t)
        outputs = self._predict(out, mask_features, image_sizes, b, t, with_aux)
        if self.token_category_head is not None and self.training:
            finest = out["memory"][0]  # [(b t), c, h, w]
            logits = self.token_category_head(finest.permute(0, 2, 3, 1))  # [(b t), h, w, k]
            outputs["token_category_logits"] = logits.view(b, t, *logits.shape[1:])  # [b, t, h, w, k]
        return outputs

    def _predict(self, out, mask_features, image_sizes, b: int, t: int, with_aux: bool):
        """The heads on the decoder output: per level [b, t, q, ...] logits, boxes and masks."""
        q = self.num_queries
        levels = range(len(out["hs"])) if with_aux else [len(out["hs"]) - 1]
        per_level = []
        for lvl in levels:
            hs = out["hs"][lvl]
            per_level.append({
                "pred_logits": self.class_embed[lvl](hs).view(b, t, q, -1),
                "pred_boxes": out["boxes"][lvl].view(b, t, q, 4),
                "pred_masks": self.mask_head(hs, out["references"][lvl][..., :2], mask_features, image_sizes, t),
            })
        outputs = dict(per_level[-1])
        outputs["aux_outputs"] = per_level[:-1]
        if out["referent_map"] is not None:
            outputs["referent_map"] = out["referent_map"].view(b, t, *out["referent_map"].shape[-2:])
        if not self.training and len(out["references"]) > 1:
            outputs["reference_points"] = out["references"][-2][..., :2].reshape(b, t, q, 2)
        return outputs
