"""Deformable transformer: encoder, decoder with iterative box refinement and inter-frame interaction."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bifit.models.box_ops import inverse_sigmoid
from bifit.models.inter_frame import InterFrameInteraction
from bifit.models.ms_deform_attn import MSDeformAttn
from bifit.models.referent_map import ReferentMap, token_centres


class DeformableEncoderLayer(nn.Module):
    def __init__(self, d_model, d_ffn, dropout, n_levels, n_heads, n_points):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src, pos, reference_points, spatial_shapes, level_start_index, padding_mask):
        attn = self.self_attn(src + pos, reference_points, src, spatial_shapes, level_start_index, padding_mask)
        src = self.norm1(src + self.dropout1(attn))
        ffn = self.linear2(self.dropout2(F.relu(self.linear1(src), inplace=True)))
        return self.norm2(src + self.dropout3(ffn))


class DeformableEncoder(nn.Module):
    def __init__(self, num_layers, **layer_kwargs):
        super().__init__()
        self.layers = nn.ModuleList(DeformableEncoderLayer(**layer_kwargs) for _ in range(num_layers))

    @staticmethod
    def reference_points(spatial_shapes: list[tuple[int, int]], valid_ratios: torch.Tensor) -> torch.Tensor:
        """Pixel centres of every level, normalised by the valid region: [n, s, l, 2] (x, y)."""
        valid_ratios = valid_ratios.float()
        refs = []
        for level, (h, w) in enumerate(spatial_shapes):
            ref_y, ref_x = torch.meshgrid(
                torch.linspace(0.5, h - 0.5, h, dtype=torch.float32, device=valid_ratios.device),
                torch.linspace(0.5, w - 0.5, w, dtype=torch.float32, device=valid_ratios.device),
                indexing="ij",
            )
            ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, level, 1] * h)
            ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, level, 0] * w)
            refs.append(torch.stack((ref_x, ref_y), -1))
        return torch.cat(refs, 1)[:, :, None] * valid_ratios[:, None]

    def forward(self, src, pos, spatial_shapes_list, spatial_shapes, level_start_index, valid_ratios, padding_mask):
        reference_points = self.reference_points(spatial_shapes_list, valid_ratios).to(src.dtype)
        for layer in self.layers:
            src = layer(src, pos, reference_points, spatial_shapes, level_start_index, padding_mask)
        return src


class DeformableDecoderLayer(nn.Module):
    def __init__(self, d_model, d_ffn, dropout, n_levels, n_heads, n_points):
        super().__init__()
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout3 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(self, tgt, query_pos, reference_points, memory, spatial_shapes, level_start_index, padding_mask):
        # tgt, query_pos [(b t), q, c]: intra-frame self-attention over the q queries of each frame
        qk = (tgt + query_pos).transpose(0, 1)
        attn = self.self_attn(qk, qk, tgt.transpose(0, 1), need_weights=False)[0].transpose(0, 1)
        tgt = self.norm2(tgt + self.dropout2(attn))
        attn = self.cross_attn(
            tgt + query_pos, reference_points, memory, spatial_shapes, level_start_index, padding_mask
        )
        tgt = self.norm1(tgt + self.dropout1(attn))
        ffn = self.linear2(self.dropout3(F.relu(self.linear1(tgt), inplace=True)))
        return self.norm3(tgt + self.dropout4(ffn))


class DeformableDecoder(nn.Module):
    """Decoder layers, each followed by inter-frame interaction and box refinement."""

    def __init__(self, num_layers, inter_frame_layers, d_model, d_ffn, dropout, n_heads, **layer_kwargs):
        super().__init__()
        self.layers = nn.ModuleList(
            DeformableDecoderLayer(d_model, d_ffn, dropout, n_heads=n_heads, **layer_kwargs) for _ in range(num_layers)
        )
        self.inter_frame = InterFrameInteraction(inter_frame_layers, d_model, n_heads, d_ffn, dropout)

    def forward(self, tgt, query_pos, reference_points, memory, spatial_shapes, level_start_index, valid_ratios,
                padding_mask, num_frames, bbox_embed):
        """Returns hs [L, (b t), q, c], refs [L, (b t), q, 4] (detached) and boxes [L, (b t), q, 4]."""
        hs, refs, boxes = [], [], []
        for lid, layer in enumerate(self.layers):
            if reference_points.shape[-1] == 4:
                ref_input = reference_points[:, :, None] * torch.cat([valid_ratios, valid_ratios], -1)[:, None]
            else:
                ref_input = reference_points[:, :, None] * valid_ratios[:, None]
            tgt = layer(tgt, query_pos, ref_input, memory, spatial_shapes, level_start_index, padding_mask)
            tgt = self.inter_frame(tgt, num_frames)
            delta = bbox_embed[lid](tgt)
            if reference_points.shape[-1] == 4:
                new_ref = (delta + inverse_sigmoid(reference_points)).sigmoid()
            else:
                new_ref = torch.cat([delta[..., :2] + inverse_sigmoid(reference_points), delta[..., 2:]], -1).sigmoid()
            hs.append(tgt)
            boxes.append(new_ref)
            reference_points = new_ref.detach()
            refs.append(reference_points)
        return torch.stack(hs), torch.stack(refs), torch.stack(boxes)


class DeformableTransformer(nn.Module):
    def __init__(self, d_model=256, nhead=8, num_encoder_layers=4, num_decoder_layers=4, dim_feedforward=2048,
                 dropout=0.1, num_feature_levels=4, enc_n_points=4, dec_n_points=4, inter_frame_layers=1,
                 query_reference="learned"):
        """query_reference: where the queries start: "learned" (official: Linear(query_pos)) or "text_guided"
        (the soft-argmax of a sentence-to-token map on the finest level, `bifit.models.referent_map`)."""
        super().__init__()
        self.d_model = d_model
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        common = dict(d_model=d_model, d_ffn=dim_feedforward, dropout=dropout, n_levels=num_feature_levels,
                      n_heads=nhead)
        self.encoder = DeformableEncoder(num_encoder_layers, n_points=enc_n_points, **common)
        self.decoder = DeformableDecoder(num_decoder_layers, inter_frame_layers, n_points=dec_n_points, **common)
        if query_reference == "learned":
            self.reference_points = nn.Linear(d_model, 2)
        elif query_reference == "text_guided":
            self.referent_map = ReferentMap(d_model)
        else:
            raise ValueError(f"query_reference {query_reference!r}: expected 'learned' or 'text_guided'")
        self.query_reference = query_reference
        self.reset_parameters()

    def reset_parameters(self):
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
        if self.query_reference == "learned":
            nn.init.zeros_(self.reference_points.bias)
        nn.init.normal_(self.level_embed)

    @staticmethod
    def valid_ratio(mask: torch.Tensor) -> torch.Tensor:
        """mask [n, h, w] -> [n, 2] (w, h): the unpadded fraction along each axis."""
        _, h, w = mask.shape
        valid_h = (~mask[:, :, 0]).sum(1)
        valid_w = (~mask[:, 0, :]).sum(1)
        return torch.stack([valid_w.float() / w, valid_h.float() / h], -1)

    def forward(self, srcs, masks, poses, tgt, query_pos, num_frames, bbox_embed, sentence=None):
        """srcs/poses [(b t), c, h, w] per level; masks [(b t), h, w]; tgt [(b t), q, c]; query_pos [q, c];
        sentence [(b t), c] (needed by the text-guided start point)."""
        shapes = [tuple(src.shape[-2:]) for src in srcs]
        # [(b t), c, h, w] -> [(b t), (h w), c], concatenated over levels: [(b t), s, c]
        src_flat = torch.cat([src.permute(0, 2, 3, 1).flatten(1, 2) for src in srcs], 1)
        mask_flat = torch.cat([mask.flatten(1) for mask in masks], 1)
        pos_flat = torch.cat(
            [pos.permute(0, 2, 3, 1).flatten(1, 2) + self.level_embed[lvl] for lvl, pos in enumerate(poses)], 1
        )
        spatial_shapes = torch.as_tensor(shapes, dtype=torch.long, device=src_flat.device)
        sizes = spatial_shapes.prod(1)
        level_start_index = torch.cat((sizes.new_zeros((1,)), sizes.cumsum(0)[:-1]))
        valid_ratios = torch.stack([self.valid_ratio(m) for m in masks], 1).to(src_flat.dtype)  # [(b t), l, 2]
        memory = self.encoder(src_flat, pos_flat, shapes, spatial_shapes, level_start_index, valid_ratios, mask_flat)

        query_pos = query_pos[None].expand(tgt.shape[0], -1, -1)
        referent_map = None
        if self.query_reference == "learned":
            init_reference = self.reference_points(query_pos).sigmoid()  # [(b t), q, 2]
        else:
            if sentence is None:
                raise ValueError("query_reference 'text_guided' needs the sentence feature")
            h0, w0 = shapes[0]
            point, logits = self.referent_map(memory[:, : h0 * w0], sentence, mask_flat[:, : h0 * w0],
                                              token_centres(h0, w0, valid_ratios[:, 0]))
            init_reference = point[:, None].expand(-1, tgt.shape[1], -1)  # [(b t), 2] -> [(b t), q, 2]
            referent_map = logits.view(-1, h0, w0)  # [(b t), h0, w0]
        hs, refs, boxes = self.decoder(tgt, query_pos, init_reference, memory, spatial_shapes, level_start_index,
                                       valid_ratios, mask_flat, num_frames, bbox_embed)
        # the first three levels of memory back to maps [(b t), c, h, w] for the pixel decoder
        memory_maps = [
            m.reshape(m.shape[0], h, w, -1).permute(0, 3, 1, 2)
            for m, (h, w) in zip(memory.split([h * w for h, w in shapes], 1)[:-1], shapes[:-1])
        ]
        return dict(hs=hs, init_reference=init_reference, references=refs, boxes=boxes, memory=memory_maps,
                    referent_map=referent_map)
