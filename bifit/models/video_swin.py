"""Video-Swin backbone (`video_swin_{t,s,b}_p4w7`, the per-frame variant of the official code).

The clip is encoded jointly: 3-D patch embedding with patch 1x4x4 (no temporal downsampling), four stages of
3-D (shifted-)window attention with 8x7x7 windows (along an axis no longer than the window, the window is the
axis and the shift 0, so a clip of t <= 8 frames attends over all of them), patch merging between stages
(`downsamples.{i}`, none after the last). Each stage's output is taken before the merging, with no extra norm,
and returned per frame. The shared window machinery is in `bifit/models/swin.py`.

Kinetics releases store `layers.{i}.downsample.*` and a 2x4x4 `patch_embed.proj.weight`: `bifit.models.backbone`
moves the former to `downsamples.{i}` and sums the latter over time, as the official code does.

Notation (einops): b clips, t frames, c channels, (h w) token grid.
"""

from __future__ import annotations

import torch
from torch import nn

from bifit.models.swin import PatchEmbed, PatchMerging, SwinStage, drop_path_rates, init_swin_weights

# embed_dim, depths, num_heads of the Kinetics releases (window 8x7x7; the per-frame patch is 1x4x4)
VIDEO_SWIN_VARIANTS = {
    "video_swin_t_p4w7": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)),
    "video_swin_s_p4w7": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)),
    "video_swin_b_p4w7": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
}


class VideoSwinTransformer(nn.Module):
    """[(b t), 3, H, W] with t = num_frames -> per stage i: [(b t), c_i, H/4/2^i, W/4/2^i] (c_i = embed_dim * 2^i)."""

    def __init__(self, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), patch_size=(1, 4, 4),
                 window_size=(8, 7, 7), mlp_ratio=4.0, qkv_bias=True, qk_scale=None, drop_rate=0.0,
                 attn_drop_rate=0.0, drop_path_rate=0.2, patch_norm=True):
        super().__init__()
        if tuple(patch_size)[0] != 1:
            raise ValueError(f"video swin: patch_size {tuple(patch_size)}: per-frame outputs need a temporal patch of 1")
        self.patch_embed = PatchEmbed(tuple(patch_size), embed_dim, patch_norm)
        self.pos_drop = nn.Dropout(drop_rate)
        dprs = drop_path_rates(drop_path_rate, depths)
        self.layers = nn.ModuleList(
            SwinStage(embed_dim * 2 ** i, depths[i], num_heads[i], tuple(window_size), mlp_ratio, qkv_bias, qk_scale,
                      drop_rate, attn_drop_rate, dprs[i], downsample=False, shrink_window=True)
            for i in range(len(depths)))
        self.downsamples = nn.ModuleList(PatchMerging(embed_dim * 2 ** i) for i in range(len(depths) - 1))
        self.num_channels = [embed_dim * 2 ** i for i in range(len(depths))]
        init_swin_weights(self)

    def forward(self, x: torch.Tensor, num_frames: int) -> list[torch.Tensor]:
        bt, ch, hh, ww = x.shape
        if bt % num_frames:
            raise ValueError(f"video swin: {bt} frames are not clips of num_frames={num_frames}")
        x = x.view(bt // num_frames, num_frames, ch, hh, ww).transpose(1, 2)  # (b t) c h w -> b c t h w
        x = self.pos_drop(self.patch_embed(x))  # b t h w c
        outs = []
        for i, layer in enumerate(self.layers):
            x = layer(x)
            outs.append(x.flatten(0, 1).permute(0, 3, 1, 2).contiguous())  # b t h w c -> (b t) c h w
            if i < len(self.downsamples):
                x = self.downsamples[i](x)
        return outs
