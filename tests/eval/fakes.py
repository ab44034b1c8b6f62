"""Test doubles shared by the evaluation tests."""

import torch


class WordTokenizer:
    """Words -> ids 3..99 (stable hash), bos 0 / eos 2, padding 1; enough for a randomly initialised tiny text
    encoder (vocabulary 100, see tests.conftest.tiny_text_config)."""

    model_max_length = 32

    def __call__(self, captions, padding=None, truncation=None, max_length=None, return_tensors=None):
        rows = [[0] + [3 + sum(map(ord, word)) % 97 for word in c.split()][:30] + [2] for c in captions]
        n = max(len(r) for r in rows)
        ids = torch.ones((len(rows), n), dtype=torch.long)
        attn = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            attn[i, : len(r)] = 1
        return {"input_ids": ids, "attention_mask": attn}


class BackgroundModel(torch.nn.Module):
    """Predicts background everywhere (2 queries, constant logits): for tests where the values do not matter."""

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def encode_visual(self, clip, mask):
        t = clip.shape[1]

        class Visual:
            num_frames = t

            def repeat(self, n):
                return self

        return Visual()

    def forward(self, images, image_mask, input_ids, attention_mask, sizes, with_aux, visual):
        b, t = input_ids.shape[0], visual.num_frames
        h, w = -(-int(sizes[0, 0]) // 4), -(-int(sizes[0, 1]) // 4)
        return {"pred_logits": torch.zeros(b, t, 2, 1), "pred_masks": torch.full((b, t, 2, h, w), -4.0)}


def prepared_ref_davis(folder, num_val_videos: int, frames_per_video: int):
    """A synthetic Ref-DAVIS17 download (the three official zips) extracted and converted: (raw, prepared)."""
    from bifit.prepare.archive import extract
    from bifit.prepare.davis import convert_ref_davis
    from bifit.synthetic.davis import SyntheticDavisConfig, archive_names, generate_ref_davis

    raw = folder / "ref-davis"
    generate_ref_davis(SyntheticDavisConfig(seed=2, num_train_videos=1, num_val_videos=num_val_videos,
                                            frames_per_video=frames_per_video, height=96, width=128), raw,
                       progress=False)
    for name in archive_names():
        extract(raw / name, raw, progress=False)
    convert_ref_davis(raw, raw.parent / "prepared", progress=False)
    return raw, raw.parent / "prepared"
