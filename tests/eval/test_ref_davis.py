"""Ref-DAVIS17 engine: the merge rule, per-clip query selection in 24-frame-style windows, and a full run of a
tiny model on the synthetic Ref-DAVIS17 checked against an independent re-scoring of the written PNGs."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from bifit.data.davis import ref_davis_videos
from bifit.eval.davis import evaluate_ref_davis
from bifit.eval.ref_davis import (
    evaluate_ref_davis_model,
    merge_into,
    merge_probabilities,
    predict_label_maps,
)
from tests.conftest import tiny_model
from tests.eval.fakes import WordTokenizer, prepared_ref_davis


def test_running_merge_equals_the_reference_argmax():
    g = torch.Generator().manual_seed(0)
    for k in (1, 2, 5):
        probs = [(torch.rand(3, 7, 9, generator=g) * 10).round() / 10 for _ in range(k)]  # many exact ties
        best, labels = torch.full((3, 7, 9), 0.1), torch.zeros((3, 7, 9), dtype=torch.uint8)
        for i, p in enumerate(probs):
            merge_into(best, labels, p, i + 1)
        ref = merge_probabilities(probs)
        assert torch.equal(labels, ref)
    # p >= 0.5 is foreground (0.5 itself included), ties go to the lower object, below 0.5 never wins
    p1, p2, p3 = (torch.tensor([[[0.5, 0.7, 0.49, 0.2]]]), torch.tensor([[[0.5, 0.8, 0.3, 0.2]]]),
                  torch.tensor([[[0.4, 0.8, 0.45, 0.2]]]))
    assert merge_probabilities([p1, p2, p3]).tolist() == [[[1, 2, 0, 0]]]


class FakeTokenizer:
    """Captions "k a" -> token ids [k, a]."""

    model_max_length = 10**30

    def __call__(self, captions, **_):
        ids = torch.tensor([[int(w) for w in c.split()] for c in captions])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


class FakeModel(torch.nn.Module):
    """Two queries with spatially constant masks. Query 0 scores 0.9 on frames < 4 (0.1 after), query 1 scores
    0.95 on frames >= 4 (0.1 before): over 8 frames query 1 wins on average, over 4-frame clips each half picks
    its own. Query 0's mask logit is ``q0[k][a]``, query 1's is -4 (background)."""

    def __init__(self, q0):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.q0 = q0
        self.clip_lengths = []

    def encode_visual(self, clip, mask):
        frame_index = clip[0, :, 0, 0, 0].round().long()  # frame i is filled with the value i
        self.clip_lengths.append(clip.shape[1])
        return SimpleNamespace(frames=frame_index, repeat=lambda n, f=frame_index: SimpleNamespace(frames=f))

    def forward(self, images, image_mask, input_ids, attention_mask, sizes, with_aux, visual):
        b, t = input_ids.shape[0], len(visual.frames)
        h, w = int(sizes[0, 0]) // 4, int(sizes[0, 1]) // 4
        early = (visual.frames < 4).float()
        s0 = 0.9 * early + 0.1 * (1 - early)
        s1 = 0.1 * early + 0.95 * (1 - early)
        scores = torch.stack([s0, s1], -1)[None].repeat(b, 1, 1)  # [b, t, 2]
        logits = torch.logit(scores)[..., None]
        masks = torch.full((b, t, 2, h, w), -4.0)
        for i, (k, a) in enumerate(input_ids.tolist()):
            masks[i, :, 0] = self.q0[k][a]
        return {"pred_logits": logits, "pred_masks": masks}


def frames_tensor(t: int, h: int = 16, w: int = 32) -> torch.Tensor:
    return torch.arange(t, dtype=torch.float32)[:, None, None, None].expand(t, 3, h, w).clone()


def test_query_is_chosen_per_clip_and_objects_merged():
    # object 0: strong (p = 0.95); object 1: p = 0.98 for annotator 1 only, else background; object 2: p = 0.5
    q0 = [[3.0, 3.0, 3.0, 3.0], [-3.0, 4.0, -3.0, -3.0], [0.0, 0.0, 0.0, 0.0]]
    captions = [[f"{k} {a}" for a in range(4)] for k in range(3)]
    model = FakeModel(q0)
    labels = predict_label_maps(model, FakeTokenizer(), frames_tensor(10), captions, (16, 32), clip_length=4,
                                batch=5)
    assert model.clip_lengths == [4, 4, 2] and labels.shape == (4, 10, 16, 32) and labels.dtype == np.uint8
    # clip [0, 4): query 0 chosen; frames 4..9: query 1 (background) in both later clips
    assert (labels[[0, 2, 3], :4] == 1).all() and (labels[1, :4] == 2).all()
    assert (labels[:, 4:] == 0).all()
    whole = predict_label_maps(FakeModel(q0), FakeTokenizer(), frames_tensor(8), captions, (16, 32),
                               clip_length=8, batch=3)
    assert (whole == 0).all()  # over the whole clip query 1 has the higher mean score
    # object 2 alone at p = 0.5 is foreground (>= 0.5)
    only2 = predict_label_maps(FakeModel([[-3.0] * 4, [-3.0] * 4, [0.0] * 4]), FakeTokenizer(), frames_tensor(4),
                               captions, (16, 32), clip_length=24)
    assert (only2 == 3).all()


# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return prepared_ref_davis(tmp_path_factory.mktemp("davis"), num_val_videos=2, frames_per_video=5)


def test_tiny_model_run_matches_rescoring_of_the_written_pngs(prepared, tmp_path):
    raw, root = prepared
    model = tiny_model(seed=1).eval()
    result = evaluate_ref_davis_model(model, WordTokenizer(), root, tmp_path, short_side=64, clip_length=3,
                                      batch=6, progress=False)
    metrics = result.metrics()
    videos = ref_davis_videos(root)
    assert metrics["num_sequences"] == 2 and metrics["num_expressions"] == 4 * sum(v.num_objects for v in videos)
    assert all(np.isfinite(metrics[k]) and 0 <= metrics[k] <= 1 for k in ("jf", "j", "f", "anno_3_jf"))
    assert metrics["jf"] == pytest.approx(np.mean([metrics[f"anno_{a}_jf"] for a in range(4)]), abs=1e-12)
    # no per-expression score: the unsupervised GT ids are not the objects the expressions refer to
    assert [k for k in metrics if "per_expression" in k] == [] and not hasattr(result, "expressions")
    # independent path: read the written palette PNGs and the GT of the untouched DAVIS tree
    rescored = {}
    for v in videos:
        gt = np.stack([np.array(Image.open(raw / f"DAVIS/Annotations_unsupervised/480p/{v.name}/{f}.png"))
                       for f in v.frames])
        preds = [np.stack([np.array(Image.open(tmp_path / f"anno_{a}/{v.name}/{f}.png")) for f in v.frames])
                 for a in range(4)]
        rescored[v.name] = (gt, preds)
    ref = evaluate_ref_davis(rescored)
    np.testing.assert_allclose(result.final, ref.final, rtol=0, atol=1e-12)
    np.testing.assert_allclose(result.per_annotator, ref.per_annotator, rtol=0, atol=1e-12)
    header = (tmp_path / "anno_0/global_results-val.csv").read_text().splitlines()[0]
    assert header == "J&F-Mean,J-Mean,J-Recall,J-Decay,F-Mean,F-Recall,F-Decay"
    assert set(result.per_sequence()) == {v.name for v in videos}


def test_corrupt_frame_is_named_or_skipped_and_recorded(prepared, tmp_path):
    import json
    import shutil

    from bifit.data.ytvos import SampleError
    from tests.eval.fakes import BackgroundModel

    _, root = prepared
    copy = shutil.copytree(root, tmp_path / "prepared")
    bad = copy / "valid/JPEGImages/bmx-trees/00002.jpg"
    bad.unlink()
    bad.write_bytes(b"not a jpeg")  # replaces the hard link, the original stays intact
    with pytest.raises(SampleError, match=r"00002.jpg: corrupt or unreadable image .*\[video bmx-trees frame 00002\]"):
        evaluate_ref_davis_model(BackgroundModel(), WordTokenizer(), copy, short_side=64, progress=False)
    result = evaluate_ref_davis_model(BackgroundModel(), WordTokenizer(), copy, tmp_path / "out", short_side=64,
                                      skip_bad_samples=True, progress=False)
    assert list(result.sequences) == ["blackswan"] and result.metrics()["num_skipped_sequences"] == 1
    skipped = json.loads((tmp_path / "out/skipped_samples.json").read_text())
    assert skipped == [{"file": str(bad), "id": "video bmx-trees frame 00002", "reason": skipped[0]["reason"]}]
    # background everywhere: every GT object present in the first frame scores J = 0 (empty predictions)
    assert result.metrics()["j"] == 0.0
