"""Experiment trackers behind the metrics logger: Weights & Biases (`logging.wandb`) and MLflow
(`logging.mlflow`), optional extras (`pip install 'jaxdpo[wandb]'`, `'jaxdpo[mlflow]'`).

A tracker receives what metrics.jsonl receives, at the same step (`metrics`), tables of rows (`table`: the
samples during training), paths of outputs (`output`: the final export, recorded as a path, not uploaded)
and the run's config once. Only process 0 builds trackers (the logger is disabled elsewhere). The run id of
each tracker is kept in WORKDIR/trackers.json, so a resumed run continues the same W&B and MLflow run.
Everything else follows each library's own environment variables (WANDB_API_KEY, WANDB_MODE, WANDB_DIR,
MLFLOW_TRACKING_URI, MLFLOW_TRACKING_TOKEN, ...); a config key left empty defers to them.
"""

from __future__ import annotations

import json
import math
import os
import uuid

from jaxdpo.errors import ConfigError

IDS_FILE = "trackers.json"
WANDB_MODES = ("", "online", "offline", "disabled")
_MLFLOW_PARAM_CHARS = 6000  # MLflow's limit on one param value


class Tracker:
    """The interface the metrics logger writes through; each method does nothing unless overridden."""

    def metrics(self, step: int, record: dict[str, float]) -> None: ...

    def table(self, step: int, name: str, rows: list[dict]) -> None: ...

    def output(self, name: str, path: str) -> None: ...

    def where(self) -> str:
        return type(self).__name__

    def close(self) -> None: ...


def check_config(logging_cfg) -> None:
    """The `logging` section: a known W&B mode, and the package of each enabled tracker installed."""
    if logging_cfg.wandb.mode not in WANDB_MODES:
        raise ConfigError(f"logging.wandb.mode = {logging_cfg.wandb.mode!r} must be one of "
                          f"{', '.join(repr(m) for m in WANDB_MODES)}")
    for key, package, extra in (("wandb", "wandb", "wandb"), ("mlflow", "mlflow", "mlflow")):
        if logging_cfg[key].enabled and not _installed(package):
            raise ConfigError(f"logging.{key}.enabled is set but {package} is not installed: "
                              f"pip install 'jaxdpo[{extra}]'")


def _installed(package: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(package) is not None


def from_config(config) -> list[Tracker]:
    """The trackers `config.logging` enables, each opened on its run (continued when WORKDIR has its id)."""
    flat = _flatten(config.to_dict())
    trackers = []
    if config.logging.wandb.enabled:
        trackers.append(WandbTracker(config.logging.wandb, config.workdir, flat))
    if config.logging.mlflow.enabled:
        trackers.append(MlflowTracker(config.logging.mlflow, config.workdir, flat))
    return trackers


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return flat


def _run_ids(workdir: str) -> dict:
    try:
        with open(os.path.join(workdir, IDS_FILE)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _keep_run_id(workdir: str, tracker: str, run_id: str) -> None:
    ids = _run_ids(workdir) | {tracker: run_id}
    with open(os.path.join(workdir, IDS_FILE), "w") as f:
        json.dump(ids, f, indent=2)


def _default_name(workdir: str) -> str:
    return os.path.basename(os.path.abspath(workdir))


class WandbTracker(Tracker):
    """A W&B run: metrics with `step=`, samples as `wandb.Table`s, the export path in the run summary."""

    def __init__(self, settings, workdir: str, flat_config: dict):
        import wandb

        run_id = _run_ids(workdir).get("wandb") or uuid.uuid4().hex[:12]
        self._wandb = wandb
        self._run = wandb.init(
            project=settings.project or os.environ.get("WANDB_PROJECT") or "jaxdpo",
            entity=settings.entity or None, name=settings.name or os.environ.get("WANDB_NAME") or _default_name(workdir),
            mode=settings.mode or None, dir=os.environ.get("WANDB_DIR") or workdir, id=run_id, resume="allow",
            config=flat_config, settings=wandb.Settings(quiet=True, console="off"))
        _keep_run_id(workdir, "wandb", run_id)

    def metrics(self, step: int, record: dict[str, float]) -> None:
        self._run.log(dict(record), step=step)

    def table(self, step: int, name: str, rows: list[dict]) -> None:
        flat = [_flatten(row) for row in rows]
        columns = list(flat[0]) if flat else []
        data = [[_cell(row.get(c)) for c in columns] for row in flat]
        self._run.log({name: self._wandb.Table(columns=columns, data=data)}, step=step)

    def output(self, name: str, path: str) -> None:
        self._run.summary[f"outputs/{name}"] = os.path.abspath(path)

    def where(self) -> str:
        return f"W&B        run {self._run.id} ({self._run.settings.mode}), files in {os.path.dirname(self._run.dir)}"

    def close(self) -> None:
        self._run.finish()


class MlflowTracker(Tracker):
    """An MLflow run: the config as params (a fresh run only: MLflow's params cannot change), metrics with
    `step=`, samples as JSON artifacts `<name>/step_<N>.json`, the export path as a tag."""

    def __init__(self, settings, workdir: str, flat_config: dict):
        import mlflow

        self._mlflow = mlflow
        self._client = mlflow.MlflowClient(tracking_uri=settings.tracking_uri or None)
        run_id = _run_ids(workdir).get("mlflow")
        if run_id is None:
            experiment = settings.experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or "jaxdpo"
            found = self._client.get_experiment_by_name(experiment)
            experiment_id = found.experiment_id if found else self._client.create_experiment(experiment)
            run_id = self._client.create_run(experiment_id, run_name=settings.run_name or _default_name(workdir)).info.run_id
            params = [mlflow.entities.Param(k, str(v)[:_MLFLOW_PARAM_CHARS]) for k, v in flat_config.items()]
            self._client.log_batch(run_id, params=params)
            _keep_run_id(workdir, "mlflow", run_id)
        self._run_id = run_id

    def metrics(self, step: int, record: dict[str, float]) -> None:
        import time

        now = int(time.time() * 1000)
        metrics = [self._mlflow.entities.Metric(k, float(v), now, int(step)) for k, v in record.items()]
        self._client.log_batch(self._run_id, metrics=metrics)

    def table(self, step: int, name: str, rows: list[dict]) -> None:
        self._client.log_dict(self._run_id, rows, f"{name}/step_{int(step)}.json")

    def output(self, name: str, path: str) -> None:
        self._client.set_tag(self._run_id, f"outputs/{name}", os.path.abspath(path))

    def where(self) -> str:
        return f"MLflow     run {self._run_id} at {self._client.tracking_uri}"

    def close(self) -> None:
        self._client.set_terminated(self._run_id)


def _cell(value):
    """A table cell W&B can show: numbers and strings as they are, anything else (messages) as JSON."""
    if isinstance(value, (str, int)) or (isinstance(value, float) and math.isfinite(value)):
        return value
    return json.dumps(value, ensure_ascii=False)
