"""Both notebooks run top to bottom with papermill on CPU, on toy data and untrained toy checkpoints."""

import json
import re

import pytest
import yaml
from PIL import Image

from tests.conftest import REPO
from tests.pipeline.test_chain import _params

VARIANTS = {"inter_frame_layers=0": 0, "inter_frame_layers=1": 1}


def _checkpoint(cfg, path, seed, inter_frame_layers):
    import torch

    from bifit.checkpoint import save_checkpoint
    from bifit.config import to_dict
    from bifit.models import build_model

    cfg.model.inter_frame_layers = inter_frame_layers
    torch.manual_seed(seed)
    save_checkpoint(path, build_model(cfg.model), to_dict(cfg), epoch=0)
    return path


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """Toy benchmark, a toy params.yaml, untrained checkpoints and a fake sweep (2 variants x 2 seeds) in MLflow."""
    from mlflow.tracking import MlflowClient

    from pipeline import generate
    from pipeline.config import load_pipeline_config

    tmp = tmp_path_factory.mktemp("notebooks")
    params = _params(tmp)
    raw = yaml.safe_load(params.read_text())
    raw["tune"] = {"experiment": "toy-ablations"}
    params.write_text(yaml.safe_dump(raw))
    generate.main(["--params", str(params)])
    cfg = load_pipeline_config(params)
    single = _checkpoint(cfg, tmp / "single.pth", 0, 1)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp}/mlflow.db")
    exp = client.create_experiment("toy-ablations", artifact_location=(tmp / "artifacts").as_uri())
    parent = client.create_run(exp, run_name="sweep-toy", tags={"kind": "sweep"}).info.run_id
    for name, layers in VARIANTS.items():
        for seed in (0, 1):
            ckpt = _checkpoint(cfg, tmp / f"{name}-{seed}.pth", seed, layers)
            rid = client.create_run(exp, run_name=f"{name} seed={seed}", tags={
                "mlflow.parentRunId": parent, "kind": "trial", "variant": name, "seed": str(seed),
                "checkpoint": str(ckpt)}).info.run_id
            for m, v in {"ytvos_jf": 0.1 + 0.2 * layers + 0.05 * seed, "ytvos_j": 0.1, "ytvos_f": 0.2,
                         "ytvos_jf_shuffled": 0.05}.items():
                client.log_metric(rid, m, v)
            client.set_terminated(rid)
    return tmp, params, cfg, single, parent


def _run(notebook, out_nb, parameters, tmp, monkeypatch):
    """Execute with papermill in a kernel that sees only the toy MLflow store."""
    import papermill

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    parameters = {**parameters, "tracking_uri": f"sqlite:///{tmp}/mlflow.db"}
    papermill.execute_notebook(str(REPO / "notebooks" / notebook), str(out_nb), parameters=parameters,
                               cwd=str(REPO / "notebooks"), kernel_name="python3", progress_bar=False)
    return json.loads(out_nb.read_text())


def _text(nb) -> str:
    parts = []
    for cell in nb["cells"]:
        for o in cell.get("outputs", []):
            parts.append("".join(o.get("text", "")) + "".join(o.get("data", {}).get("text/plain", "")))
    return "\n".join(parts)


def test_qualitative_notebook_writes_overlay_gif(toy, monkeypatch):
    tmp, params, cfg, single, _ = toy
    import torch

    nb = _run("qualitative.ipynb", tmp / "qualitative.out.ipynb", dict(
        checkpoint=str(single), params=str(params), out_dir=str(tmp / "qual"), max_frames=3, amp=True), tmp,
        monkeypatch)
    text = _text(nb)
    assert "chosen query" in text and "J&F" in text and "referred query, (x, y) per frame" in text
    # device None: params.yaml eval.device (auto); amp given: bfloat16 autocast
    assert f"parameters; on {'cuda' if torch.cuda.is_available() else 'cpu'}" in text and ", amp True" in text
    gifs = list((tmp / "qual").glob("*.gif"))
    assert len(gifs) == 1
    with Image.open(gifs[0]) as gif:
        assert gif.n_frames == 3
        assert gif.size[0] > 2 * cfg.synthetic.width  # prediction and ground truth side by side
    images = [o for c in nb["cells"] for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) >= 4  # overlay grid, query scores, reference points, the two expressions
    # the two-expression table: each caption's J against both objects, then the overlap of the two masks
    table = re.search(r"J vs object (\d+)\s+J vs object (\d+)\n'[^']+'\s+([\d.]+)\s+([\d.]+)\n'[^']+'\s+([\d.]+)\s+"
                      r"([\d.]+)\noverlap of the two predicted masks \(IoU\): ([\d.]+)", text)
    assert table and table[1] != table[2], text
    assert all(0 <= float(v) <= 1 for v in table.groups()[2:])


def test_qualitative_notebook_custom_expression_from_mlflow_run(toy, monkeypatch):
    """The checkpoint given as an MLflow run id, and a sentence typed by the user (no ground truth then)."""
    from mlflow.tracking import MlflowClient

    tmp, params, cfg, single, parent = toy
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp}/mlflow.db")
    child = client.search_runs([client.get_run(parent).info.experiment_id],
                               "tags.variant = 'inter_frame_layers=1' and tags.seed = '0'")[0]
    nb = _run("qualitative.ipynb", tmp / "custom.out.ipynb", dict(
        checkpoint=child.info.run_id, params=str(params), out_dir=str(tmp / "custom"), max_frames=2,
        custom_expression="the red circle on the left"), tmp, monkeypatch)
    text = _text(nb)
    assert "'the red circle on the left'" in text and "J&F" not in text
    assert [p.name.endswith("_custom.gif") for p in (tmp / "custom").glob("*.gif")] == [True]


def test_ablations_notebook_plots_variants_and_disputed_frames(toy, monkeypatch):
    tmp, params, cfg, _, parent = toy
    nb = _run("ablations.ipynb", tmp / "ablations.out.ipynb", dict(
        params=str(params), sweep="latest", out_dir=str(tmp / "abl"), max_frames=4, top_k=2), tmp, monkeypatch)
    text = _text(nb)
    assert "4 finished trial runs" in text
    assert "frames where the variants disagree most" in text
    for name in VARIANTS:
        assert f"{name}: J&F" in text
    assert (tmp / "abl/metrics_per_variant.png").stat().st_size > 1000
    gifs = list((tmp / "abl").glob("variants_*.gif"))
    assert len(gifs) == 1
    with Image.open(gifs[0]) as gif:
        assert gif.n_frames == 4
        assert gif.size[0] > 3 * cfg.synthetic.width  # two variants and the ground truth side by side
