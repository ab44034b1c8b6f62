"""Parity check against golden files of the official implementation.

    python -m bifit.parity GOLDEN.pt [GOLDEN2.pt ...]

A model golden (`bifit-golden-v1`, e.g. tests/golden/official_public_slim.pt): the weights are rebuilt with the
key-name recipe, loaded into our model, every case is run in float32 (and float64 where the file
has `outputs_f64`), and the loss terms are recomputed on the float32 outputs. A deformable-attention
golden (`inputs`/`output`/`grads`): the core is run in float64 with gradients.
A backbone golden (`backbones`: per `model.backbone` name its official constructor `config`, `strides`,
`num_channels`, `state_dict` manifest, `recipe_sha256`, `input`, `outputs` and `outputs_f64`, e.g.
tests/golden/backbones_public.pt): the body is built as `model.backbone: NAME` builds it (checked against the
recorded config, channels, strides and manifest), its floating-point entries are filled with the recipe under
the body's own key names (integer buffers keep the values the architecture computes), and it is run in float32
and float64 (tolerances 1e-4 and 1e-6).
Prints the max abs error per case and output; exits 1 when any error exceeds its tolerance.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from bifit.checkpoint import convert_official_state_dict, load_state_dict_strict
from bifit.config import Config
from bifit.loading import model_config_from_official_args
from bifit.recipe import recipe_state_dict, recipe_tensor, state_dict_sha256

TOL_F64 = 1e-6
TOL_F32 = {"pred_logits": 1e-4, "pred_boxes": 1e-4, "reference_points": 1e-4, "pred_masks": 1e-3}
TOL_LOSS = 1e-4
TOL_MSDA = 1e-10
TOL_BACKBONE = {torch.float32: 1e-4, torch.float64: 1e-6}


def build_golden_model(meta: dict):
    from bifit.models import BIFIT
    from bifit.models.text_encoder import build_hf_text_encoder

    cfg = model_config_from_official_args(meta["model_args"], "golden meta.model_args", "<golden text_config>")
    model = BIFIT(cfg, build_hf_text_encoder(config=meta["text_config"]))
    shapes = {k: tuple(v) for k, v in meta["state_dict_shapes"].items()}
    official = recipe_state_dict(shapes)
    if "recipe_sha256" in meta and state_dict_sha256(official) != meta["recipe_sha256"]:
        raise ValueError("golden meta.recipe_sha256 does not match the recipe over meta.state_dict_shapes")
    state = convert_official_state_dict(official, "golden")
    own = model.state_dict()  # integer buffers (a Swin body's relative_position_index) keep their computed values
    state.update({k: v for k, v in own.items() if k in state and not v.is_floating_point()})
    load_state_dict_strict(model, state, "golden state dict")
    return model.eval(), cfg


def _flatten_outputs(out: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    flat = {}
    for k, v in out.items():
        if isinstance(v, dict):
            flat.update(_flatten_outputs(v, f"{prefix}{k}."))
        elif isinstance(v, (list, tuple)):
            for i, item in enumerate(v):
                flat.update(_flatten_outputs(item, f"{prefix}{k}.{i}."))
        else:
            flat[prefix + k] = v
    return flat


def _run(model, inputs, targets, dtype):
    valid = [t["valid_indices"] for t in targets] if targets and "valid_indices" in targets[0] else None
    with torch.no_grad():
        return model.to(dtype)(
            inputs["images"].to(dtype), inputs["image_mask"], inputs["input_ids"], inputs["attention_mask"],
            inputs["size"], valid_indices=torch.cat([v.view(-1) for v in valid]) if valid else None,
        )


def check_model_golden(golden: dict, name: str) -> list[tuple[str, str, float, float]]:
    """Returns rows (case, quantity, max abs error, tolerance)."""
    from bifit.models.criterion import build_criterion

    model, cfg = build_golden_model(golden["meta"])
    full = Config(model=cfg)
    criterion = build_criterion(full)
    rows = []
    for case_name, case in golden["cases"].items():
        inputs, targets = case["inputs"], case.get("targets", [])
        out32 = _run(model, inputs, targets, torch.float32)
        flat = _flatten_outputs(out32)
        for key, ref in _flatten_outputs(case["outputs"]).items():
            tol = TOL_F32[key.rsplit(".", 1)[-1]]
            rows.append((case_name, f"f32 {key}", _maxerr(flat.get(key), ref, key), tol))
        if "outputs_f64" in case:
            flat64 = _flatten_outputs(_run(model, inputs, targets, torch.float64))
            for key, ref in _flatten_outputs(case["outputs_f64"]).items():
                rows.append((case_name, f"f64 {key}", _maxerr(flat64.get(key), ref, key), TOL_F64))
            model.float()
        if "losses" in case and targets:
            with torch.no_grad():
                losses = criterion(out32, targets)
                losses["total_weighted"] = criterion.weighted_total(losses)
            for key, ref in case["losses"].items():
                rows.append((case_name, f"loss {key}", _maxerr(losses.get(key), ref, key), TOL_LOSS))
    return rows


def _maxerr(ours, ref, key) -> float:
    if ours is None:
        return float("inf")
    if tuple(ours.shape) != tuple(ref.shape):
        print(f"  shape mismatch for {key}: ours {tuple(ours.shape)} vs golden {tuple(ref.shape)}")
        return float("inf")
    return (ours.double() - ref.double()).abs().max().item() if ref.numel() else 0.0


def check_msda_golden(golden: dict, name: str) -> list[tuple[str, str, float, float]]:
    """Every backend that runs here (the pure-PyTorch reference and the compiled CPU kernel)."""
    from ops import ms_deform_attn as msda
    from ops.build import BuildError

    inp, rows = golden["inputs"], []
    saved = msda.get_backend()
    try:
        for backend in ("pytorch", "cpu"):
            leaves = {k: inp[k].double().clone().requires_grad_(True)
                      for k in ("value", "sampling_locations", "attention_weights")}
            try:
                msda.set_backend(backend)
                out = msda.ms_deform_attn(leaves["value"], inp["spatial_shapes"], inp["level_start_index"],
                                          leaves["sampling_locations"], leaves["attention_weights"])
            except BuildError as err:
                print(f"  (backend {backend} not available here: {str(err).splitlines()[0]})")
                continue
            out.backward(inp["grad_output"].double())
            rows.append((name, f"{backend} output", _maxerr(out.detach(), golden["output"], "output"), TOL_MSDA))
            for k, ref in golden["grads"].items():
                rows.append((name, f"{backend} grad {k}", _maxerr(leaves[k].grad, ref, k), TOL_MSDA))
    finally:
        msda.set_backend(saved)
    return rows


BACKBONE_ENTRY_KEYS = {"config", "state_dict", "input", "outputs"}
# constructor arguments of the official bodies that do not change what an eval-mode forward computes
_BACKBONE_RUNTIME_ARGS = {"use_checkpoint", "pretrain_img_size", "drop_rate", "attn_drop_rate", "drop_path_rate",
                          "frozen_stages"}


def is_backbone_golden(golden) -> bool:
    """The backbone-golden layout: {"backbones": {name: {config, state_dict, input, outputs, ...}}, "meta"?}."""
    entries = golden.get("backbones") if isinstance(golden, dict) else None
    return isinstance(entries, dict) and bool(entries) and all(
        isinstance(e, dict) and BACKBONE_ENTRY_KEYS <= set(e) for e in entries.values())


def _official_body_args(name: str, config: dict) -> tuple[bool, dict]:
    """(video, our body's constructor arguments) from the official constructor arguments recorded in a golden."""
    video = name.startswith("video_swin") or isinstance(config.get("window_size"), (list, tuple))
    cfg = dict(config)
    if cfg.pop("ape", False):
        raise ValueError(f"golden {name}.config.ape: only ape=False (no absolute position embedding) is supported")
    if cfg.pop("in_chans", 3) != 3:
        raise ValueError(f"golden {name}.config.in_chans: only 3 input channels are supported")
    known = {"embed_dim", "depths", "num_heads", "window_size", "patch_size", "mlp_ratio", "qkv_bias", "qk_scale",
             "patch_norm"} | ({"out_indices"} if not video else set())
    unknown = sorted(set(cfg) - known - _BACKBONE_RUNTIME_ARGS)
    if unknown:
        raise ValueError(f"golden {name}.config: unsupported constructor argument(s) {unknown}")
    args = {k: (tuple(v) if isinstance(v, list) else v) for k, v in cfg.items() if k in known}
    return video, args


def _expected_official_args(name: str) -> dict:
    """The official constructor arguments of the body `model.backbone: name` builds (eval-relevant ones)."""
    from bifit.models.swin import SWIN_VARIANTS
    from bifit.models.video_swin import VIDEO_SWIN_VARIANTS

    if name in VIDEO_SWIN_VARIANTS:
        return {**VIDEO_SWIN_VARIANTS[name], "patch_size": (1, 4, 4), "window_size": (8, 7, 7), "mlp_ratio": 4.0,
                "qkv_bias": True, "qk_scale": None, "patch_norm": True}
    return {**SWIN_VARIANTS[name], "patch_size": 4, "window_size": 7, "mlp_ratio": 4.0, "qkv_bias": True,
            "qk_scale": None, "patch_norm": True, "out_indices": (0, 1, 2, 3)}


def build_backbone_golden_body(name: str, entry: dict):
    """(run(images, num_frames) -> levels, the module to cast (its `body`, or itself, is loaded), output names,
    note): the `model.backbone: name` backbone when `name` is one of ours (after checking the recorded config),
    else a body built from the recorded config."""
    from bifit.models.backbone import BACKBONES, VisualBackbone
    from bifit.models.swin import STRIDES, SwinTransformer
    from bifit.models.video_swin import VideoSwinTransformer

    video, args = _official_body_args(name, entry["config"])
    if name in BACKBONES:
        expected = _expected_official_args(name)
        wrong = [f"{k}: golden {args[k]!r}, ours {expected.get(k)!r}" for k in args if args[k] != expected.get(k)]
        if wrong:
            raise ValueError(f"golden {name}.config differs from what model.backbone {name!r} builds: "
                             + "; ".join(wrong))
        module = run = VisualBackbone(name, train_backbone=False)  # run(images, num_frames), as BIFIT calls it
        channels, note = module.num_channels, f"model.backbone {name}"
        outputs = [str(i) for i in range(len(channels))]
    else:
        module = VideoSwinTransformer(**args) if video else SwinTransformer(**args)
        run = (lambda x, t: module(x, t)) if video else (lambda x, t: module(x))
        channels, note = module.num_channels, f"{name} is not a model.backbone value: built from its config"
        outputs = [str(i) for i in (range(len(channels)) if video else module.out_indices)]
    for field, ours in (("num_channels", list(channels)), ("strides", list(STRIDES[:len(channels)]))):
        if field in entry and list(entry[field]) != ours:
            raise ValueError(f"golden {name}.{field} {list(entry[field])} differs from ours {ours}")
    return run, module, outputs, note


def check_backbone_golden(golden: dict, name: str) -> list[tuple[str, str, float, float]]:
    """Every backbone of a backbone golden, float32 and float64 (module docstring)."""
    rows = []
    for bname, entry in golden["backbones"].items():
        run, module, out_names, note = build_backbone_golden_body(bname, entry)
        body = getattr(module, "body", module)
        own = body.state_dict()
        manifest = {k: (tuple(int(s) for s in shape), getattr(torch, str(dtype).removeprefix("torch.")))
                    for k, shape, dtype in entry["state_dict"]}
        missing, unexpected = sorted(set(own) - set(manifest)), sorted(set(manifest) - set(own))
        shapes = [f"{k}: golden {manifest[k][0]} vs ours {tuple(own[k].shape)}" for k in own
                  if k in manifest and manifest[k][0] != tuple(own[k].shape)]
        if missing or unexpected or shapes:
            raise ValueError(f"golden {bname}.state_dict does not match our body: missing {missing[:8]}, unexpected "
                             f"{unexpected[:8]}, shapes {shapes[:4]}")
        state = {k: recipe_tensor(k, shape, dtype) if dtype.is_floating_point else own[k]
                 for k, (shape, dtype) in manifest.items()}
        floats = {k: v for k, v in state.items() if v.is_floating_point()}
        if "recipe_sha256" in entry and state_dict_sha256(floats) != entry["recipe_sha256"]:
            raise ValueError(f"golden {bname}.recipe_sha256 does not match the recipe over its state_dict manifest")
        load_state_dict_strict(body, state, f"golden {bname} state dict")
        module.eval()
        x = entry["input"]
        num_frames = int(entry.get("num_frames", entry["config"].get("num_frames", x.shape[0])))
        print(f"  {bname}: {note}; input {tuple(x.shape)}, num_frames {num_frames}")
        for dtype, key in ((torch.float32, "outputs"), (torch.float64, "outputs_f64")):
            if key not in entry:
                continue
            module.to(dtype)
            with torch.no_grad():
                ours = dict(zip(out_names, run(x.to(dtype), num_frames)))
            tag = "f32" if dtype == torch.float32 else "f64"
            for level, ref in entry[key].items():
                rows.append((bname, f"{tag} {level}", _maxerr(ours.get(str(level)), ref, level), TOL_BACKBONE[dtype]))
        module.float()
    return rows


def check_file(path: Path) -> list[tuple[str, str, float, float]]:
    golden = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(golden, dict) and "cases" in golden and "meta" in golden:
        return check_model_golden(golden, path.name)
    if isinstance(golden, dict) and {"inputs", "output", "grads"} <= set(golden):
        return check_msda_golden(golden, path.stem)
    if is_backbone_golden(golden):
        return check_backbone_golden(golden, path.stem)
    raise ValueError(f"{path}: not a model golden (meta + cases), a deformable-attention golden "
                     "(inputs + output + grads) nor a backbone golden (backbones: name -> config, state_dict, input, "
                     "outputs)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    failed = False
    for path in args.files:
        print(f"== {path}")
        try:
            rows = check_file(path)
        except (OSError, ValueError, KeyError, RuntimeError) as err:
            print(f"  ERROR: {type(err).__name__}: {err}")
            failed = True
            continue
        for case, qty, err, tol in rows:
            ok = err <= tol
            failed |= not ok
            print(f"  {'ok  ' if ok else 'FAIL'} {case:>12s}  {qty:<40s} max abs err {err:.3e}  (tol {tol:.0e})")
    print("PARITY FAILED" if failed else "parity ok")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
