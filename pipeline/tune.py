"""Sweep stage `tune`: the module ablations on Ray Tune, one MLflow child run per trial.

    python -m pipeline.tune [--params params.yaml]        # or: dvc repro sweeps/dvc.yaml

Every combination of `tune.grid` (default: model.inter_frame_layers {0, 1, 2} x model.bidirectional_vl
{false, true}) is a variant; every variant is trained once per `tune.seeds` entry. A trial is a Ray Tune
function trainable that launches the train stage's Ray Train `TorchTrainer` (pipeline.train.run_training,
`tune.num_workers` x `tune.cpus_per_worker`, `tune.trial_overrides` as the training budget), then evaluates
the final checkpoint on the Ref-YouTube-VOS valid split (bifit.eval.ytvos.evaluate_valid) and reports J&F, J, F,
the shuffled-expression control, wall time and parameter count. `tune.max_concurrent_trials` run at once;
Ray starts locally unless RAY_ADDRESS (or ray.address) names a cluster.

Resume: a finished trial writes `<tune.storage_path>/results/<trial key>.json` (the key hashes the trial's
training and evaluation settings); a rerun reports stored trials without training them again, and an
unfinished trial resumes from its newest epoch checkpoint (`<tune.storage_path>/train/<training hash>/`).

Outputs (`tune.results_dir`): trials.csv (every trial), variants.csv (mean and std over seeds per variant),
results.md (both tables), summary.json (the DVC metrics). MLflow (`tune.experiment`): a parent run for the
sweep and one child run per trial tagged with `variant`, `seed` and every searched key.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

from bifit.config import ConfigError, flatten, from_dict, to_dict
from bifit.report import format_mean_std, group_rows, markdown_table, write_csv
from pipeline import tracking
from pipeline.config import PipelineConfig, load_pipeline_config, resolve

log = logging.getLogger("pipeline.tune")
YTVOS_METRICS = ("jf", "j", "f", "jf_shuffled", "jf_gain_over_shuffled")
LABELS = {"jf": "J&F", "j": "J", "f": "F", "jf_shuffled": "J&F shuffled", "jf_gain_over_shuffled": "J&F gain"}
RESULT_FORMAT = "bifit-tune-trial-v1"


# ---------------------------------------------------------------------------------------------------------------
# the plan: variants x seeds -> validated trial configurations


@dataclass
class TrialSpec:
    variant: dict  # searched key -> value
    seed: int
    cfg: PipelineConfig  # the trial's full settings
    key: str  # hash of the training and evaluation settings (the results store key)

    @property
    def name(self) -> str:
        return variant_name(self.variant)


def _short(key: str, keys) -> str:
    """'model.inter_frame_layers' -> 'inter_frame_layers' unless two searched keys end the same."""
    last = key.rsplit(".", 1)[-1]
    return last if sum(k.rsplit(".", 1)[-1] == last for k in keys) == 1 else key


def _value_text(value) -> str:
    return str(value).lower() if isinstance(value, bool) else json.dumps(value) if isinstance(value, list) else str(value)


def variant_name(variant: dict) -> str:
    """{'model.inter_frame_layers': 0, 'model.bidirectional_vl': True} -> 'inter_frame_layers=0 bidirectional_vl=true'."""
    return " ".join(f"{_short(k, variant)}={_value_text(v)}" for k, v in variant.items())


def grid_variants(grid: dict) -> list[dict]:
    """The cartesian product of the grid, first key slowest."""
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def trial_config(cfg: PipelineConfig, variant: dict, seed: int) -> PipelineConfig:
    """The base settings with the trial budget, the variant, the seed and the per-trial Ray resources."""
    d = to_dict(cfg)
    for key, value in {**cfg.tune.trial_overrides, **variant, "train.seed": seed}.items():
        section, _, name = key.partition(".")
        d[section][name] = value
    storage = resolve(cfg.tune.storage_path)
    d["ray"].update(num_workers=cfg.tune.num_workers, cpus_per_worker=cfg.tune.cpus_per_worker,
                    use_gpu=cfg.tune.use_gpu, storage_path=str(storage / "ray-train"))
    d["paths"]["runs"] = str(storage)  # the run folders: <storage>/train/<training hash>
    d["mlflow"]["experiment"] = cfg.tune.experiment
    return from_dict(PipelineConfig, d).validate()


def eval_identity(cfg: PipelineConfig) -> dict:
    """The eval settings that decide a trial's numbers. Not `device` (it changes float rounding, not the method);
    `amp` only when on, so the keys of results computed before it existed (all float32) stay valid."""
    settings = {k: v for k, v in to_dict(cfg.eval).items() if k not in ("device", "amp")}
    return {**settings, "amp": True} if cfg.eval.amp else settings


def trial_key(cfg: PipelineConfig) -> str:
    evaluation = {"eval": eval_identity(cfg), "eval_short_side": cfg.data.eval_short_side,
                  "benchmark": cfg.tune.benchmark, "max_expressions": cfg.tune.eval_max_expressions}
    blob = json.dumps({"training": cfg.training_dict(), "evaluation": evaluation}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def plan_trials(cfg: PipelineConfig, source: str = "params.yaml") -> list[TrialSpec]:
    """Every (variant, seed), validated before Ray starts: a bad combination names the grid key and value."""
    trials = []
    for variant in grid_variants(cfg.tune.grid):
        for seed in cfg.tune.seeds:
            try:
                tcfg = trial_config(cfg, variant, seed)
            except ConfigError as err:
                raise ConfigError(f"{source}: tune.grid: the variant {variant_name(variant)} (seed {seed}) is not a "
                                  f"valid configuration: {err}") from None
            trials.append(TrialSpec(variant, seed, tcfg, trial_key(tcfg)))
    return trials


def check_eval_device(cfg: PipelineConfig, source: str = "params.yaml") -> None:
    """On a local Ray the trials evaluate on this machine: eval.device cuda without a GPU here stops the sweep
    before Ray starts. On a cluster each trial checks its own node before training."""
    if cfg.ray.resolved_address():
        return
    from bifit.inference import resolve_device

    resolve_device(cfg.eval.device, f"{source}: eval.device")


def sweep_hash(cfg: PipelineConfig) -> str:
    """Identifies the sweep: the base training settings, evaluation, the grid, the seeds and the trial budget
    (not the resources: rerunning with another concurrency continues the same sweep; the train stage's `ray`
    section, which the trials replace with tune.num_workers etc., neither: those are in each trial's key)."""
    t = cfg.tune
    what = {"grid": t.grid, "seeds": t.seeds, "trial_overrides": t.trial_overrides,
            "benchmark": t.benchmark, "eval_max_expressions": t.eval_max_expressions, "experiment": t.experiment}
    training = {k: v for k, v in cfg.training_dict().items() if k != "ray"}
    blob = json.dumps({"training": training, "eval": eval_identity(cfg), "tune": what},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------------------------------------------
# the results store (finished trials)


def result_path(cfg: PipelineConfig, key: str) -> Path:
    return resolve(cfg.tune.storage_path) / "results" / f"{key}.json"


def read_result(path: Path) -> dict | None:
    """A stored finished trial, or None when absent; an unreadable file is reported and ignored."""
    if not path.exists():
        return None
    try:
        result = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        log.warning("%s: unreadable trial result (%s); the trial runs again", path, err)
        return None
    if result.get("format") != RESULT_FORMAT or not isinstance(result.get("metrics"), dict):
        log.warning("%s: not a %s file; the trial runs again", path, RESULT_FORMAT)
        return None
    return result


def write_result(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1, default=str) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------------
# MLflow


def _store(cfg: PipelineConfig) -> dict:
    """The sweep's tracking store, experiment and artifact location (the `uri, experiment, artifact_location`
    arguments of the pipeline.tracking sweep functions)."""
    return {"uri": cfg.mlflow.resolved_uri(), "experiment": cfg.tune.experiment,
            "artifact_location": resolve(cfg.mlflow.artifact_location)}


def _trial_tags(spec: TrialSpec) -> dict:
    """A trial run's own tags: variant, seed, trial key, training hash and every searched key's value."""
    return {"variant": spec.name, "seed": str(spec.seed), "trial_key": spec.key,
            "config_hash": spec.cfg.training_hash(), **{k: _value_text(v) for k, v in spec.variant.items()}}


def trial_metrics(result: dict) -> dict:
    """A stored trial's MLflow metrics: `<benchmark>_<metric>`, wall time, parameter count, final training loss."""
    prefix = result.get("benchmark", "ytvos")
    return {**{f"{prefix}_{k}": v for k, v in result["metrics"].items()}, "wall_seconds": result["wall_seconds"],
            "num_parameters": result["num_parameters"], "final_train_loss": result["train_loss"]}


def start_parent_run(cfg: PipelineConfig, sweep: str, folder: Path) -> str:
    """The sweep's MLflow run (reused, and marked running again, when the sweep resumes)."""
    id_file = folder / "mlflow_parent_run_id"
    if id_file.exists():
        run_id = id_file.read_text().strip()
        tracking.set_status(cfg.mlflow.resolved_uri(), run_id, "RUNNING")
        return run_id
    params = {"grid": json.dumps(cfg.tune.grid), "seeds": json.dumps(cfg.tune.seeds),
              "trial_overrides": json.dumps(cfg.tune.trial_overrides),
              "benchmark": cfg.tune.benchmark, "eval_max_expressions": str(cfg.tune.eval_max_expressions)}
    run_id = tracking.create_sweep_run(**_store(cfg), sweep=sweep, params=params)
    folder.mkdir(parents=True, exist_ok=True)
    id_file.write_text(run_id)
    return run_id


def start_child_run(spec: TrialSpec, parent_run_id: str, sweep: str, folder: Path) -> str:
    """The trial's MLflow run, a child of the sweep's run; its id file makes run_training log into it."""
    id_file = folder / "mlflow_run_id"
    if id_file.exists():
        return id_file.read_text().strip()
    cfg = spec.cfg
    run_id = tracking.create_trial_run(**_store(cfg), parent_run_id=parent_run_id, sweep=sweep,
                                       run_name=f"{spec.name} seed={spec.seed}",
                                       params=flatten(cfg.training_dict()), tags=_trial_tags(spec))
    folder.mkdir(parents=True, exist_ok=True)
    id_file.write_text(run_id)
    return run_id


# ---------------------------------------------------------------------------------------------------------------
# one trial (runs inside a Ray Tune trial actor)


def train_and_evaluate(spec: TrialSpec, parent_run_id: str, sweep: str) -> dict:
    """Train through the train stage's Ray Train code, evaluate, store and log the result."""
    import torch

    from bifit.inference import inference_settings, resolve_device
    from pipeline.evaluate_dataset import load_eval_model
    from pipeline.train import run_dir, run_training

    cfg = spec.cfg
    # evaluated in this trial actor; Ray reserves no GPU for it (its workers hold them while training), but it
    # sees the node's GPUs: eval.device auto uses one when there is one, cuda without one fails before training
    device = resolve_device(cfg.eval.device)
    folder = run_dir(cfg)
    run_id = start_child_run(spec, parent_run_id, sweep, folder)
    uri = cfg.mlflow.resolved_uri()
    t0 = time.time()
    with tracking.run_status(uri, run_id, finish=False):  # FAILED when anything here raises
        out = run_training(cfg)
        torch.set_num_threads(cfg.ray.num_workers * cfg.ray.cpus_per_worker)
        loaded = load_eval_model(cfg, Path(out["final"]["path"]), device)
        model = loaded.model
        metrics, per_video = evaluate_trial(cfg, model, loaded.tokenizer, folder)
        tracking.log_eval_settings(uri, run_id, cfg.tune.benchmark, inference_settings(model, cfg.eval.amp))
    result = {
        "format": RESULT_FORMAT, "key": spec.key, "variant": spec.name, "grid": spec.variant, "seed": spec.seed,
        "benchmark": cfg.tune.benchmark, "metrics": metrics, "per_video_jf": per_video,
        "train_loss": float(out["final"]["metrics"].get("train_loss", math.nan)),
        "train_steps": int(out["final"]["metrics"].get("train_steps", 0)),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "num_trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "wall_seconds": time.time() - t0, "checkpoint": out["final"]["path"], "mlflow_run_id": run_id,
        "training_hash": cfg.training_hash(), "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    tracking.log_trial_result(uri, run_id, trial_metrics(result), result["checkpoint"])
    write_result(result_path(cfg, spec.key), result)
    return result


def evaluate_trial(cfg: PipelineConfig, model, tokenizer, folder: Path) -> tuple[dict, dict | None]:
    """(metrics, J&F per video or None) on `tune.benchmark`; ytvos: the first `tune.eval_max_expressions`. Runs
    where the model is, with `eval.amp`; the metrics record both (`device`, `amp`)."""
    from bifit.eval.ytvos import evaluate_valid, inference_options
    from bifit.inference import inference_settings

    name = cfg.tune.benchmark
    if name == "ytvos":
        metrics, result = evaluate_valid(model, tokenizer, Path(cfg.data.root), seed=cfg.train.seed,
                                         max_expressions=cfg.tune.eval_max_expressions, **inference_options(cfg))
        per_video = result.per_video()
    else:
        from pipeline.evaluate_dataset import EVALUATORS

        metrics = EVALUATORS[name](cfg, model, tokenizer, folder / f"eval-{name}", folder / f"eval-{name}.csv")
        per_video = None
    return {**metrics, **inference_settings(model, cfg.eval.amp)}, per_video


def metric_names(benchmark: str, results: list[dict]) -> list[str]:
    """The table's metric columns: J&F, J, F and the shuffled control for ytvos, else every numeric metric."""
    if benchmark == "ytvos":
        return list(YTVOS_METRICS)
    names: list[str] = []
    for r in results:
        for k, v in r["metrics"].items():
            if (isinstance(v, int | float) and not isinstance(v, bool) and k not in names
                    and not k.startswith("num_") and not k.endswith("_seconds")):
                names.append(k)
    return names


def child_run_of_sweep(spec: TrialSpec, result: dict, parent_run_id: str, sweep: str, folder: Path) -> str:
    """The trial's child run under this sweep's parent. A trial stored by another sweep (other seeds or grid,
    same trial settings) gets a child run here too, recording the stored result (tag `reused_from`)."""
    links = folder / "child_runs.json"
    linked = json.loads(links.read_text()) if links.exists() else {}
    uri = spec.cfg.mlflow.resolved_uri()
    for run_id in (result["mlflow_run_id"], linked.get(spec.key)):
        if run_id is not None and tracking.is_child_of(uri, run_id, parent_run_id):
            return run_id
    prefix, metrics = result.get("benchmark", "ytvos"), result["metrics"]
    params = flatten(spec.cfg.training_dict())
    # how the stored result was evaluated (absent from results stored before it was recorded)
    params.update({f"{prefix}_eval_{k}": str(metrics[k]) for k in ("device", "amp") if k in metrics})
    run_id = tracking.create_trial_run(**_store(spec.cfg), parent_run_id=parent_run_id, sweep=sweep,
                                       run_name=f"{spec.name} seed={spec.seed}", params=params,
                                       tags={**_trial_tags(spec), "reused_from": result["mlflow_run_id"]})
    tracking.log_trial_result(uri, run_id, trial_metrics(result), result["checkpoint"])
    linked[spec.key] = run_id
    links.write_text(json.dumps(linked, indent=1))
    return run_id


def run_trial(config: dict, specs: dict, parent_run_id: str, sweep: str) -> None:
    """The Ray Tune function trainable: `config` holds the searched values and the seed."""
    import ray.tune

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    spec = specs[_config_id(config)]
    stored = read_result(result_path(spec.cfg, spec.key))
    if stored is not None:
        print(f"[bifit] {spec.name} seed {spec.seed}: finished earlier (trial {spec.key}), not trained again",
              flush=True)
        result, reused = stored, True
    else:
        result, reused = train_and_evaluate(spec, parent_run_id, sweep), False
    ray.tune.report({**{k: v for k, v in result["metrics"].items() if isinstance(v, (int, float))},
                     "train_loss": result["train_loss"], "wall_seconds": result["wall_seconds"],
                     "num_parameters": result["num_parameters"], "reused": reused, "trial_key": spec.key})


def _config_id(config: dict) -> str:
    return json.dumps(config, sort_keys=True, default=str)


# ---------------------------------------------------------------------------------------------------------------
# driver


def run_sweep(cfg: PipelineConfig, ray_init_kwargs: dict | None = None, source: str = "params.yaml") -> dict:
    """Plan, run the missing trials on Ray Tune, write the tables. Returns {"trials", "variants", "failed", ...}."""
    trials = plan_trials(cfg, source)  # every bad value is reported before Ray starts
    check_eval_device(cfg, source)
    sweep = sweep_hash(cfg)
    storage = resolve(cfg.tune.storage_path)
    sweep_dir = storage / "sweeps" / sweep
    parent_run_id = start_parent_run(cfg, sweep, sweep_dir)
    (sweep_dir / "plan.json").write_text(json.dumps(
        [{"variant": t.name, "grid": t.variant, "seed": t.seed, "key": t.key} for t in trials], indent=1))
    todo = [t for t in trials if read_result(result_path(t.cfg, t.key)) is None]
    log.info("sweep %s: %d variants x %d seeds = %d trials, %d already finished; MLflow parent run %s "
             "(experiment %s)", sweep, len(trials) // len(cfg.tune.seeds), len(cfg.tune.seeds), len(trials),
             len(trials) - len(todo), parent_run_id, cfg.tune.experiment)

    t0 = time.time()
    errors: dict[str, str] = {}
    if todo:
        errors = _run_tuner(cfg, trials, parent_run_id, sweep, storage, ray_init_kwargs)
    results, failed = [], []
    for t in trials:
        result = read_result(result_path(t.cfg, t.key))
        if result is None:
            failed.append({"variant": t.name, "seed": t.seed, "key": t.key,
                           "error": errors.get(t.key, "no result stored (see the Ray Tune log)")})
            continue
        result["mlflow_run_id"] = child_run_of_sweep(t, result, parent_run_id, sweep, sweep_dir)
        results.append(result)
    names = metric_names(cfg.tune.benchmark, results)
    rows = [trial_row(r, cfg.tune.grid, names) for r in results]
    variants = group_rows(rows, "variant", [*names, "train_loss", "wall_seconds", "num_parameters"],
                          keep=list(cfg.tune.grid))
    out_dir = resolve(cfg.tune.results_dir)
    write_tables(cfg, sweep, rows, variants, failed, out_dir, names)
    _finish_parent_run(cfg, parent_run_id, out_dir, variants, failed, names)
    log.info("sweep %s: %d trials in the table, %d failed, %.0f s; tables in %s", sweep, len(rows), len(failed),
             time.time() - t0, out_dir)
    return {"trials": rows, "variants": variants, "failed": failed, "sweep": sweep, "parent_run_id": parent_run_id,
            "out_dir": out_dir}


def _run_tuner(cfg, trials, parent_run_id, sweep, storage, ray_init_kwargs) -> dict[str, str]:
    import ray
    import ray.tune

    specs = {_config_id({**t.variant, "seed": t.seed}): t for t in trials}
    tc = cfg.tune
    address = cfg.ray.resolved_address()
    started_here = not ray.is_initialized()
    if started_here:
        kwargs = dict(ray_init_kwargs or {})
        if address:
            kwargs["address"] = address
        else:  # per running trial: its driver (evaluates) + the Ray Train workers
            kwargs.setdefault("num_cpus", tc.max_concurrent_trials * (1 + tc.num_workers * tc.cpus_per_worker))
        kwargs.setdefault("include_dashboard", False)
        # every trial and Ray Train worker logs to the driver's MLflow store, whatever their inherited environment
        runtime_env = kwargs.setdefault("runtime_env", {})
        runtime_env.setdefault("env_vars", {})["MLFLOW_TRACKING_URI"] = cfg.mlflow.resolved_uri()
        ray.init(**kwargs)
    try:
        trainable = ray.tune.with_resources(
            ray.tune.with_parameters(run_trial, specs=specs, parent_run_id=parent_run_id, sweep=sweep), {"cpu": 1})
        param_space = {k: ray.tune.grid_search(v) for k, v in tc.grid.items()}
        param_space["seed"] = ray.tune.grid_search(list(tc.seeds))
        tuner = ray.tune.Tuner(
            trainable, param_space=param_space,
            tune_config=ray.tune.TuneConfig(max_concurrent_trials=tc.max_concurrent_trials),
            run_config=ray.tune.RunConfig(name=f"sweep-{sweep}", storage_path=str(storage / "ray-tune"),
                                          failure_config=ray.tune.FailureConfig(max_failures=tc.max_failures)),
        )
        grid = tuner.fit()
    finally:
        if started_here:
            ray.shutdown()
    errors = {}
    for result in grid:
        if result.error is not None:
            spec = specs.get(_config_id({k: result.config[k] for k in [*tc.grid, "seed"]}))
            if spec is not None:
                errors[spec.key] = str(result.error).strip().splitlines()[-1][:300]
    return errors


def trial_row(result: dict, grid: dict, names: list[str]) -> dict:
    """One table row of a stored trial."""
    m = result["metrics"]
    row = {"variant": result["variant"], **{k: result["grid"].get(k) for k in grid}, "seed": result["seed"]}
    row.update({k: float(m.get(k, math.nan)) for k in names})
    row.update(num_expressions=m.get("num_expressions"), train_loss=result["train_loss"],
               train_steps=result["train_steps"], num_parameters=result["num_parameters"],
               wall_seconds=result["wall_seconds"], mlflow_run_id=result["mlflow_run_id"], trial_key=result["key"],
               eval_device=m.get("device"), eval_amp=m.get("amp"))  # None: stored before they were recorded
    return row


def write_tables(cfg, sweep: str, rows: list[dict], variants: list[dict], failed: list[dict], out_dir: Path,
                 names: list[str]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    grid_keys = list(cfg.tune.grid)
    write_csv(out_dir / "trials.csv", rows)
    write_csv(out_dir / "variants.csv", variants)
    summary = {"sweep": sweep, "benchmark": cfg.tune.benchmark, "num_trials": len(rows), "num_failed": len(failed),
               "variants": {v["variant"]: {"n": v["n"], **{f"{m}_{s}": _json_float(v[f"{m}_{s}"])
                                                          for m in names for s in ("mean", "std")}}
                            for v in variants}}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out_dir / "results.md").write_text(results_markdown(cfg, sweep, rows, variants, failed, grid_keys, names))


def _json_float(x: float):
    return None if math.isnan(x) else round(x, 6)


def results_markdown(cfg, sweep, rows, variants, failed, grid_keys, names) -> str:
    short = [_short(k, grid_keys) for k in grid_keys]
    shown = names[:4]  # ytvos: J&F, J, F, J&F shuffled (every metric is in the CSV files)
    labels = [LABELS.get(m, m) for m in shown]
    if cfg.tune.benchmark == "ytvos":
        evaluation = (f"{rows[0]['num_expressions'] if rows else '?'} Ref-YouTube-VOS valid expressions "
                      f"(`{cfg.data.root}`)")
    else:
        evaluation = f"the `{cfg.tune.benchmark}` benchmark (pipeline/evaluate_dataset.py)"
    lines = [f"# Ablation sweep `{sweep}`\n",
             f"Grid: {', '.join(f'`{k}` {json.dumps(v)}' for k, v in cfg.tune.grid.items())}; seeds "
             f"{cfg.tune.seeds}; per-trial budget {json.dumps(cfg.tune.trial_overrides)}; evaluation on "
             f"{evaluation}. Mean ± sample standard deviation over seeds.\n",
             "## Per variant\n"]
    headers = short + ["seeds", *labels, "train loss", "parameters", "wall s"]
    lines.append(markdown_table(headers, [
        [*(v[k] for k in grid_keys), v["n"], *(format_mean_std(v[f"{m}_mean"], v[f"{m}_std"])
                                               for m in [*shown, "train_loss"]),
         f"{v['num_parameters_mean']:,.0f}", format_mean_std(v["wall_seconds_mean"], v["wall_seconds_std"], 0)]
        for v in variants]))
    lines.append("\n## Every trial\n")
    headers = short + ["seed", *labels, "train loss", "steps", "parameters", "wall s", "MLflow run"]
    lines.append(markdown_table(headers, [
        [*(r[k] for k in grid_keys), r["seed"], *(r[m] for m in shown), r["train_loss"],
         r["train_steps"], f"{r['num_parameters']:,}", f"{r['wall_seconds']:.0f}", r["mlflow_run_id"][:12]]
        for r in rows]))
    if failed:
        lines.append("\n## Failed trials\n")
        lines.append(markdown_table(["variant", "seed", "error"], [[f["variant"], f["seed"], f["error"]]
                                                                   for f in failed]))
    return "\n".join(lines)


def _finish_parent_run(cfg, run_id: str, out_dir: Path, variants: list[dict], failed: list[dict],
                       names: list[str]) -> None:
    """The tables, the best variant's headline metric (J&F on ytvos) and the failure count into the sweep's run,
    which ends FAILED when a trial failed, else FINISHED."""
    headline = "jf" if "jf" in names else (names[0] if names else None)
    best = None if headline is None else max((v for v in variants if not math.isnan(v[f"{headline}_mean"])),
                                             key=lambda v: v[f"{headline}_mean"], default=None)
    metrics, tags = {"num_failed_trials": len(failed)}, {}
    if best is not None:
        metrics[f"best_{headline}_mean"] = best[f"{headline}_mean"]
        tags["best_variant"] = best["variant"]
    tables = [out_dir / name for name in ("results.md", "trials.csv", "variants.csv", "summary.json")]
    tracking.finish_sweep_run(cfg.mlflow.resolved_uri(), run_id, tables, metrics, tags, failed=bool(failed))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default=str(resolve("params.yaml")))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = load_pipeline_config(args.params)
    out = run_sweep(cfg, source=args.params)
    print((out["out_dir"] / "results.md").read_text())
    if out["failed"]:
        raise SystemExit(f"{len(out['failed'])} trial(s) failed: "
                         + "; ".join(f"{f['variant']} seed {f['seed']}: {f['error']}" for f in out["failed"]))
    return out


if __name__ == "__main__":
    main()
