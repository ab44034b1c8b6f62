"""Parity check against golden files of the official implementation.

    python -m bifit.parity GOLDEN.pt [GOLDEN2.pt ...]

A model golden (`bifit-golden-v1`, e.g. tests/golden/official_public_slim.pt): the weights are rebuilt with the
key-name recipe, loaded into our model, every case is run in float32 (and float64 where the file
has `outputs_f64`), and the loss terms are recomputed on the float32 outputs. A deformable-attention
golden (`inputs`/`output`/`grads`): the core is run in float64 with gradients.
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
from bifit.recipe import recipe_state_dict, state_dict_sha256

TOL_F64 = 1e-6
TOL_F32 = {"pred_logits": 1e-4, "pred_boxes": 1e-4, "reference_points": 1e-4, "pred_masks": 1e-3}
TOL_LOSS = 1e-4
TOL_MSDA = 1e-10


def build_golden_model(meta: dict):
    from bifit.models import BIFIT
    from bifit.models.text_encoder import build_hf_text_encoder

    cfg = model_config_from_official_args(meta["model_args"], "golden meta.model_args", "<golden text_config>")
    model = BIFIT(cfg, build_hf_text_encoder(config=meta["text_config"]))
    shapes = {k: tuple(v) for k, v in meta["state_dict_shapes"].items()}
    official = recipe_state_dict(shapes)
    if "recipe_sha256" in meta and state_dict_sha256(official) != meta["recipe_sha256"]:
        raise ValueError("golden meta.recipe_sha256 does not match the recipe over meta.state_dict_shapes")
    load_state_dict_strict(model, convert_official_state_dict(official, "golden"), "golden state dict")
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


def check_file(path: Path) -> list[tuple[str, str, float, float]]:
    golden = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(golden, dict) and "cases" in golden and "meta" in golden:
        return check_model_golden(golden, path.name)
    if isinstance(golden, dict) and {"inputs", "output", "grads"} <= set(golden):
        return check_msda_golden(golden, path.stem)
    raise ValueError(f"{path}: not a model golden (meta + cases) nor a deformable-attention golden "
                     "(inputs + output + grads)")


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
