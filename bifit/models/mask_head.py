"""Dynamic-convolution mask head with relative coordinates (CondInst style, one instance per query)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    """Linear layers with ReLU between them (keys `layers.{i}`)."""

    def __init__(self, input_dim, hidden_dim, output_dim, num_layers):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims, dims[1:] + [output_dim]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = F.relu(layer(x)) if i < len(self.layers) - 1 else layer(x)
        return x


class DynamicMaskHead(nn.Module):
    """Generates per-query conv weights (controller) and applies them to the mask features.

    The dynamic convs are 1x1 with widths (hidden_dim + 2) -> c -> c -> 1 for c = dynamic_mask_channels
    and ReLU between them; the 2 extra input channels are the pixel offsets (x, y) from the query's
    box centre to each mask-feature location.
    """

    def __init__(self, hidden_dim, channels=8, controller_layers=3, rel_coord=True, feat_stride=4):
        super().__init__()
        self.rel_coord, self.feat_stride, self.channels = rel_coord, feat_stride, channels
        in_ch = hidden_dim + 2 if rel_coord else hidden_dim  # the mask features have hidden_dim channels
        self.weight_sizes = [(channels, in_ch), (channels, channels), (1, channels)]
        num_params = sum(o * i for o, i in self.weight_sizes) + sum(o for o, _ in self.weight_sizes)
        self.controller = MLP(hidden_dim, hidden_dim, num_params, controller_layers)

    def split_params(self, params: torch.Tensor):
        """params [n, p] -> weights [n, o, i] and biases [n, o] for each of the three convs."""
        sizes = [o * i for o, i in self.weight_sizes] + [o for o, _ in self.weight_sizes]
        chunks = params.split(sizes, dim=1)
        weights = [c.reshape(-1, o, i) for c, (o, i) in zip(chunks[:3], self.weight_sizes)]
        return weights, list(chunks[3:])

    def forward(self, hs, centres, mask_features, image_sizes, num_frames):
        """hs [(b t), q, c]; centres [(b t), q, 2] normalised (x, y); mask_features [(b t), m, h, w];
        image_sizes [b, 2] (h, w) of the unpadded input. Returns mask logits [b, t, q, h, w].
        """
        bt, q, _ = hs.shape
        _, m, h, w = mask_features.shape
        weights, biases = self.split_params(self.controller(hs).flatten(0, 1))
        w1 = weights[0].view(bt, q, self.channels, -1)
        # first conv, feature part: [(b t), q, o, m] x [(b t), m, (h w)] -> [(b t), q, o, (h w)]
        x = torch.einsum("nqom,nmp->nqop", w1[..., :m], mask_features.flatten(2))
        if self.rel_coord:
            # pixel offsets centre - location, locations at (stride j + stride/2, stride i + stride/2)
            scale = image_sizes.flip(-1).to(hs.dtype).repeat_interleave(num_frames, 0)  # [(b t), 2] (w, h)
            centres_px = centres * scale[:, None, :]  # [(b t), q, 2]
            s = self.feat_stride
            xs = torch.arange(0, w * s, s, dtype=torch.float32, device=hs.device).to(hs.dtype) + s // 2
            ys = torch.arange(0, h * s, s, dtype=torch.float32, device=hs.device).to(hs.dtype) + s // 2
            wx, wy = w1[..., m], w1[..., m + 1]  # [(b t), q, o]
            rel_x = centres_px[..., 0, None] - xs  # [(b t), q, w]
            rel_y = centres_px[..., 1, None] - ys  # [(b t), q, h]
            x = x.view(bt, q, self.channels, h, w)
            x = x + wx[..., None, None] * rel_x[:, :, None, None, :] + wy[..., None, None] * rel_y[:, :, None, :, None]
            x = x.flatten(3)
        x = F.relu(x + biases[0].view(bt, q, -1, 1))
        x = F.relu(torch.einsum("nqoi,nqip->nqop", weights[1].view(bt, q, self.channels, -1), x)
                   + biases[1].view(bt, q, -1, 1))
        x = torch.einsum("nqoi,nqip->nqop", weights[2].view(bt, q, 1, -1), x) + biases[2].view(bt, q, 1, 1)
        return x.view(bt // num_frames, num_frames, q, h, w)
