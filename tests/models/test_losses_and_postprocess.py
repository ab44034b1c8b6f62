import math

import torch

from bifit.config import Config, ModelConfig
from bifit.models.criterion import build_criterion, dice_loss, sigmoid_focal_loss
from bifit.models.matcher import VideoMatcher, pad_and_subsample_masks
from bifit.models.postprocess import a2d_masks, select_best_query, video_masks


def test_focal_and_dice_against_hand_computation():
    logits = torch.tensor([[0.0, 2.0]])
    targets = torch.tensor([[1.0, 0.0]])
    p = 1 / (1 + math.exp(-2.0))
    # element 0: p_t=0.5, ce=log2, alpha_t=0.25; element 1: p_t=1-p, ce=-log(1-p), alpha_t=0.75
    e0 = 0.25 * math.log(2) * 0.5**2
    e1 = 0.75 * -math.log(1 - p) * p**2
    assert abs(sigmoid_focal_loss(logits, targets, 1.0).item() - (e0 + e1) / 2) < 1e-6
    dice = 1 - (2 * 0.5 + 1) / (0.5 + p + 1 + 1)
    assert abs(dice_loss(logits, targets, 2.0).item() - dice / 2) < 1e-6


def test_target_masks_are_padded_to_32_and_subsampled_at_offset_2():
    m = torch.zeros(1, 40, 50)
    m[0, 2, 6] = 1
    out = pad_and_subsample_masks([m])
    assert out.shape == (1, 1, 16, 16)  # 64x64 padded, every 4th row/col from 2
    assert out[0, 0, 0, 1] == 1 and out.sum() == 1


def _outputs_with_perfect_query(q_star=2, t=2, q=4, h=8, w=8):
    logits = torch.full((1, t, q, 1), -3.0)
    logits[0, :, q_star] = 3.0
    boxes = torch.full((1, t, q, 4), 0.2)
    boxes[0, :, q_star] = torch.tensor([0.5, 0.5, 0.5, 0.5])
    masks = torch.full((1, t, q, h, w), -5.0)
    masks[0, :, q_star, 2:6, 2:6] = 5.0
    target_mask = torch.zeros(t, 4 * h, 4 * w)
    target_mask[:, 8:24, 8:24] = 1
    target = dict(labels=torch.zeros(t, dtype=torch.long), boxes=torch.tensor([[0.5, 0.5, 0.5, 0.5]] * t),
                  masks=target_mask, valid=torch.ones(t, dtype=torch.long), size=torch.tensor([4 * h, 4 * w]))
    return dict(pred_logits=logits, pred_boxes=boxes, pred_masks=masks), [target]


def test_matcher_picks_the_query_that_fits_and_losses_are_small_for_it():
    outputs, targets = _outputs_with_perfect_query()
    assert VideoMatcher()(outputs, targets).tolist() == [2]
    cfg = Config(model=ModelConfig(aux_loss=False))
    losses = build_criterion(cfg)(outputs, targets)
    assert losses["loss_bbox"].item() == 0 and abs(losses["loss_giou"].item()) < 1e-6
    assert losses["loss_dice"].item() < 0.01
    # moving the best query elsewhere changes the match
    outputs2, _ = _outputs_with_perfect_query(q_star=0)
    assert VideoMatcher()(outputs2, targets).tolist() == [0]


def test_matcher_costs_every_clip_at_once():
    first, targets = _outputs_with_perfect_query(q_star=2)
    second, more = _outputs_with_perfect_query(q_star=1)
    batch = {k: torch.cat([first[k], second[k]]) for k in first}
    matched = VideoMatcher()(batch, targets + more)
    assert matched.tolist() == [2, 1] and matched.dtype == torch.long
    more[0]["valid"] = torch.tensor([0, 0])  # a clip without a valid frame has no class cost, still matched
    assert VideoMatcher()(batch, targets + more).tolist() == [2, 1]


def test_invalid_frames_only_change_the_class_term():
    outputs, targets = _outputs_with_perfect_query()
    crit = build_criterion(Config(model=ModelConfig(aux_loss=False)))
    base = crit(outputs, targets)
    targets[0]["valid"] = torch.tensor([1, 0])
    changed = crit(outputs, targets)
    assert changed["loss_ce"] != base["loss_ce"]
    # boxes and masks still use both frames; num_boxes halves from 2 to 1, so they double
    torch.testing.assert_close(changed["loss_dice"], 2 * base["loss_dice"])


def test_best_query_by_mean_score_and_upsampled_thresholding():
    logits = torch.tensor([[[[0.0], [0.5]], [[3.0], [0.6]]]])  # [b=1, t=2, q=2, 1]: q0 wins on the mean only
    assert select_best_query(logits).tolist() == [0]
    masks = torch.full((1, 2, 2, 4, 6), -4.0)
    masks[0, :, 0, :2, :3] = 4.0
    out = dict(pred_logits=logits, pred_masks=masks)
    binary, probs, best, score = video_masks(out, image_size=(16, 24), orig_size=(32, 48))
    assert best == 0 and binary.shape == (2, 32, 48)
    assert binary[:, :14, :22].all() and not binary[:, 18:, :].any()
    assert abs(score - (torch.sigmoid(torch.tensor(0.0)) + torch.sigmoid(torch.tensor(3.0))).item() / 2) < 1e-6
    a2d = a2d_masks(masks[0, 0], image_size=(12, 20), orig_size=(24, 40))
    assert a2d.shape == (2, 24, 40) and a2d[0, :14, :22].all() and not a2d[1].any()
