import itertools

import pytest
import torch

from bifit.checkpoint import load_checkpoint, load_state_dict_strict, save_checkpoint
from bifit.config import Config, to_dict
from bifit.models.criterion import build_criterion
from bifit.models.diagnostics import capture
from tests.conftest import tiny_batch, tiny_model, tiny_model_config

VARIANTS = list(itertools.product([0, 1, 2], [False, True]))


@pytest.mark.parametrize("inter_frame_layers,bidirectional_vl", VARIANTS)
def test_every_ablation_variant_builds_trains_and_reloads(tmp_path, inter_frame_layers, bidirectional_vl):
    model = tiny_model(inter_frame_layers=inter_frame_layers, bidirectional_vl=bidirectional_vl)
    keys = model.state_dict().keys()
    assert any(k.startswith("vl_interaction.vision_to_text.") for k in keys) == bidirectional_vl
    assert sum(k.startswith("transformer.decoder.inter_frame.layers.") and k.endswith("norm2.bias")
               for k in keys) == inter_frame_layers
    cfg = Config(model=model.cfg)
    criterion = build_criterion(cfg)
    images, mask, ids, attn, sizes, targets = tiny_batch(b=2, t=2)
    model.train()
    out = model(images, mask, ids, attn, sizes)
    assert out["pred_masks"].shape == (2, 2, 3, 16, 24) and len(out["aux_outputs"]) == 1
    losses = criterion(out, targets)
    total = criterion.weighted_total(losses)
    assert set(losses) == {f"loss_{k}{s}" for k in ("ce", "bbox", "giou", "mask", "dice") for s in ("", "_0")}
    assert torch.isfinite(total)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    before = model.query_embed.weight.detach().clone()
    total.backward()
    opt.step()
    assert not torch.equal(before, model.query_embed.weight)
    # the variant's own checkpoint loads back into a fresh model of the same variant
    save_checkpoint(tmp_path / "ckpt.pth", model, to_dict(cfg), epoch=0)
    ckpt = load_checkpoint(tmp_path / "ckpt.pth")
    assert ckpt["config"]["model"]["inter_frame_layers"] == inter_frame_layers
    fresh = tiny_model(seed=1, inter_frame_layers=inter_frame_layers, bidirectional_vl=bidirectional_vl)
    load_state_dict_strict(fresh, ckpt["model"], "ckpt")
    model.eval()
    fresh.eval()
    with torch.no_grad():
        a = model(images, mask, ids, attn, sizes)["pred_masks"]
        b = fresh(images, mask, ids, attn, sizes)["pred_masks"]
    assert torch.equal(a, b)


def test_inter_frame_module_mixes_information_across_frames():
    """With the module on, changing frame 1 changes frame 0's queries; with it off, frame 0 is unaffected
    except through clip-level fusion, so compare the decoder output directly."""
    from bifit.models.inter_frame import InterFrameInteraction

    torch.manual_seed(0)
    module = InterFrameInteraction(1, 32, 4, 64, 0.0).eval()
    x = torch.randn(2 * 3, 5, 32)  # [(b t), q, c] with b=2, t=3
    y = x.clone()
    y[1] += 1.0  # clip 0, frame 1
    out_x, out_y = module(x, 3), module(y, 3)
    assert not torch.allclose(out_x[0], out_y[0])  # clip 0, frame 0 sees frame 1
    assert torch.equal(out_x[3:], out_y[3:])  # clip 1 is untouched
    off = InterFrameInteraction(0, 32, 4, 64, 0.0)
    assert off(x, 3) is x


def test_valid_indices_equals_running_the_annotated_frame_alone():
    model = tiny_model().eval()
    images, mask, ids, attn, sizes, _ = tiny_batch(b=2, t=3)
    valid = torch.tensor([2, 0])
    with torch.no_grad():
        out = model(images, mask, ids, attn, sizes, valid_indices=valid)
        single = model(images[torch.arange(2), valid][:, None], mask[torch.arange(2), valid][:, None], ids, attn,
                       sizes)
    assert out["pred_masks"].shape == (2, 1, 3, 16, 24)
    torch.testing.assert_close(out["pred_masks"], single["pred_masks"])
    torch.testing.assert_close(out["pred_boxes"], single["pred_boxes"])


def test_padding_mask_reaches_the_dynamic_head_coordinates():
    """A padded clip's relative coordinates use its own unpadded size (targets' size)."""
    model = tiny_model().eval()
    images, mask, ids, attn, sizes, _ = tiny_batch(b=2, t=1, pad_last=True)
    with torch.no_grad():
        out = model(images, mask, ids, attn, sizes)
        sizes2 = sizes.clone()
        sizes2[1] = torch.tensor([64, 96])
        out2 = model(images, mask, ids, attn, sizes2)
    torch.testing.assert_close(out["pred_masks"][0], out2["pred_masks"][0])
    assert not torch.allclose(out["pred_masks"][1], out2["pred_masks"][1])


def test_text_resizer_width_follows_the_encoder_config():
    model = tiny_model()
    assert model.resizer.fc.in_features == 48  # tiny encoder's hidden size, not 768


def test_frozen_text_encoder_and_backbone_freezing_rules():
    model = tiny_model(freeze_text_encoder=True)
    assert not any(p.requires_grad for p in model.text_encoder.parameters())
    body = dict(model.backbone.body.named_parameters())
    assert not body["conv1.weight"].requires_grad and not body["layer1.0.conv1.weight"].requires_grad
    assert body["layer2.0.conv1.weight"].requires_grad
    frozen = tiny_model(train_backbone=False)
    assert not any(p.requires_grad for p in frozen.backbone.parameters())


def test_aux_loss_switch_decides_whether_earlier_decoder_layers_count():
    model = tiny_model(dec_layers=3).eval()
    images, mask, ids, attn, sizes, targets = tiny_batch(b=1, t=2)
    with torch.no_grad():
        out = model(images, mask, ids, attn, sizes)
    on = build_criterion(Config(model=tiny_model_config(dec_layers=3, aux_loss=True)))
    off = build_criterion(Config(model=tiny_model_config(dec_layers=3, aux_loss=False)))
    losses = on(out, targets)
    final_layer = {k: v for k, v in losses.items() if not k[-1].isdigit()}
    assert len(losses) == 3 * len(final_layer)  # the last layer and two earlier ones
    torch.testing.assert_close(off.weighted_total(losses), on.weighted_total(final_layer))
    assert on.weighted_total(losses) > off.weighted_total(losses) > 0


def test_sentence_source_text_mean_pools_the_unpadded_tokens():
    model = tiny_model(sentence_source="text_mean").eval()
    images, mask, ids, attn, sizes, _ = tiny_batch(b=2, t=2)
    attn[1, 3:] = 0  # the second expression is 3 tokens long
    ids[1, 3:] = 1
    with torch.no_grad(), capture(model, ["resizer", "vl_interaction.sentence_pool"]) as seen:
        model(images, mask, ids, attn, sizes)
        [text], [sentence] = seen["resizer"], seen["vl_interaction.sentence_pool"]  # [b, l, c], [b, c]
        pool = model.vl_interaction.sentence_pool.dense
        expected = torch.tanh(pool(torch.stack([text[0].mean(0), text[1, :3].mean(0)])))
    torch.testing.assert_close(sentence, expected)
    assert not torch.allclose(sentence[1], torch.tanh(pool(text[1].mean(0))))


@pytest.mark.parametrize("source", ["fused_text", "text"])
def test_sentence_source_picks_the_first_token_before_or_after_fusion(source):
    model = tiny_model(sentence_source=source).eval()
    images, mask, ids, attn, sizes, _ = tiny_batch(b=2, t=2)
    names = ["resizer", "vl_interaction.vision_to_text", "vl_interaction.sentence_pool"]
    with torch.no_grad(), capture(model, names) as seen:
        model(images, mask, ids, attn, sizes)
        fused_text = seen["vl_interaction.vision_to_text"]  # per feature level, [l, b, c]
        assert len(fused_text) == model.cfg.num_feature_levels
        fused_first = fused_text[-1][0]  # [l, b, c] -> [b, c]
        text_first = seen["resizer"][0][:, 0]  # [b, l, c] -> [b, c]
        [sentence] = seen["vl_interaction.sentence_pool"]  # [b, c]
        pool = model.vl_interaction.sentence_pool.dense
        expected = torch.tanh(pool(fused_first if source == "fused_text" else text_first))
        other = torch.tanh(pool(text_first if source == "fused_text" else fused_first))
    torch.testing.assert_close(sentence, expected)
    assert not torch.allclose(sentence, other)


def test_one_way_model_takes_the_encoders_pooled_sentence_and_hooks_go_on_exit():
    model = tiny_model(bidirectional_vl=False).eval()
    assert not any(k.startswith("vl_interaction.sentence_pool.") for k in model.state_dict())
    images, mask, ids, attn, sizes, _ = tiny_batch(b=2, t=2)
    names = ["resizer", "vl_interaction.text_to_vision", "vl_interaction.sentence_pool", "transformer",
             "pixel_decoder"]
    with torch.no_grad(), capture(model, names) as seen:
        out = model(images, mask, ids, attn, sizes)
    text, pooled = seen["resizer"]  # the token features [b, l, c], then the encoder's pooled sentence [b, c]
    assert text.shape[:2] == ids.shape and pooled.shape == (2, text.shape[-1])
    [sentence] = seen["vl_interaction.sentence_pool"]
    assert sentence is pooled
    assert len(seen["vl_interaction.text_to_vision"]) == model.cfg.num_feature_levels
    [transformer_out], [mask_features] = seen["transformer"], seen["pixel_decoder"]
    torch.testing.assert_close(out["pred_logits"].flatten(0, 1), model.class_embed[-1](transformer_out["hs"][-1]))
    assert mask_features.shape[0] == 2 * 2
    with torch.no_grad():
        model(images, mask, ids, attn, sizes)
    assert len(seen["resizer"]) == 2  # nothing recorded once the block is left
    assert not any(m._forward_hooks for m in model.modules())


def test_expressions_sharing_a_clip_equal_the_clip_repeated():
    """k expressions per clip (expression-major) give the outputs of the clip fed k times, backbone run once."""
    model = tiny_model().eval()
    images, mask, _, _, sizes, _ = tiny_batch(b=2, t=2, pad_last=True)
    _, _, ids, attn, _, _ = tiny_batch(b=6, t=2, seed=1)  # 3 expressions for each of the 2 clips
    calls = []
    model.backbone.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    with torch.no_grad():
        shared = model(images, mask, ids, attn, sizes.repeat(3, 1))
        repeated = model(images.repeat(3, 1, 1, 1, 1), mask.repeat(3, 1, 1, 1), ids, attn, sizes.repeat(3, 1))
    assert calls == [4, 12]  # (b t) frames through the backbone: once per clip, then once per expression
    assert shared["pred_masks"].shape == (6, 2, 3, 16, 24)
    torch.testing.assert_close(shared["pred_masks"], repeated["pred_masks"])
    torch.testing.assert_close(shared["pred_boxes"], repeated["pred_boxes"])
    assert not torch.allclose(shared["pred_masks"][0], shared["pred_masks"][2])  # same clip, other expression
    with pytest.raises(ValueError, match="multiple"):
        model(images, mask, ids[:5], attn[:5], sizes.repeat(3, 1)[:5])


def test_cuda_attention_avoids_the_cudnn_kernel_that_plans_per_shape():
    from bifit.models.bifit import attention_kernels

    before = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(True)
    try:
        with attention_kernels(torch.device("cuda")):
            assert not torch.backends.cuda.cudnn_sdp_enabled()
            assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
        assert torch.backends.cuda.cudnn_sdp_enabled()
        with attention_kernels(torch.device("cpu")):
            assert torch.backends.cuda.cudnn_sdp_enabled()  # CPU runs are left as they are
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)
