import shutil
import subprocess
import sys

import torch

from bifit.recipe import recipe_state_dict, recipe_tensor, state_dict_sha256
from tests.conftest import REPO

MANIFEST_SHA = "31d1bd9885a2826d2e17f53e54481ca71bf82cf476c4f6b95319a01ff9772414"


def test_recipe_check_value_over_official_manifest(golden_dir):
    rows = [line.split("\t") for line in (golden_dir / "official_state_dict.tsv").read_text().splitlines()[1:]]
    shapes = {key: tuple(int(s) for s in shape.split(",")) for key, shape, _ in rows}
    assert len(shapes) == 822
    assert state_dict_sha256(recipe_state_dict(shapes)) == MANIFEST_SHA


def test_recipe_rules():
    # tied heads share the seed key; 1-D weights are norm scales around 1; small tensors draw with their shape
    a = recipe_tensor("transformer.decoder.bbox_embed.1.layers.0.bias", (256,))
    b = recipe_tensor("bbox_embed.1.layers.0.bias", (256,))
    assert torch.equal(a, b)
    scale = recipe_tensor("x.norm.weight", (512,))
    assert abs(scale.mean().item() - 1.0) < 0.02 and 0.08 < scale.std().item() < 0.12
    var = recipe_tensor("x.running_var", (1000,))
    assert var.min() >= 0.75 and var.max() < 1.25
    assert recipe_tensor("x.num_batches_tracked", (), torch.long).item() == 0


def _run_parity(path):
    return subprocess.run([sys.executable, "-m", "bifit.parity", str(path)], cwd=REPO, capture_output=True,
                          text=True, timeout=600)


def test_parity_cli_passes_on_public_goldens(golden_dir):
    res = _run_parity(golden_dir / "official_public_slim.pt")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "f64 pred_masks" in res.stdout and "loss total_weighted" in res.stdout
    res = _run_parity(golden_dir / "ms_deform_attn_public.pt")
    assert res.returncode == 0, res.stdout + res.stderr


def test_parity_cli_fails_on_a_perturbed_golden(golden_dir, tmp_path):
    golden = torch.load(golden_dir / "ms_deform_attn_public.pt", weights_only=True)
    golden["grads"]["sampling_locations"][0, 0, 0, 0, 0, 0] += 1e-6
    torch.save(golden, tmp_path / "bad.pt")
    res = _run_parity(tmp_path / "bad.pt")
    assert res.returncode == 1 and "FAIL" in res.stdout


def test_parity_cli_fails_on_a_perturbed_model_output(golden_dir, tmp_path):
    golden = torch.load(golden_dir / "official_public_slim.pt", weights_only=True)
    golden["cases"]["public"]["outputs"]["pred_logits"][0, 0, 0, 0] += 1e-3
    torch.save(golden, tmp_path / "bad_model.pt")
    res = _run_parity(tmp_path / "bad_model.pt")
    assert res.returncode == 1
    assert "FAIL" in res.stdout.split("f32 pred_logits")[0].splitlines()[-1]


def test_parity_cli_rejects_unknown_format(tmp_path):
    torch.save({"something": torch.zeros(1)}, tmp_path / "x.pt")
    shutil.copy(tmp_path / "x.pt", tmp_path / "y.pt")
    res = _run_parity(tmp_path / "y.pt")
    assert res.returncode == 1 and "not a model golden" in res.stdout
