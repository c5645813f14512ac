"""W&B (offline mode) and MLflow (local file store) runs of a tiny DPO training: every metric of
metrics.jsonl at its step, read back from the W&B run file and the MLflow store; a resume continues the
same runs. jaxdpo/training/trackers.py."""

import glob
import json
import math
import os
import struct

import pytest

from jaxdpo.errors import ConfigError
from jaxdpo.training import trackers
from jaxdpo.training.loop import train_and_evaluate
from jaxdpo.training.metrics import read_metrics
from tests.tiny_assets import tiny_run_config

pytest.importorskip("wandb")
pytest.importorskip("mlflow")

_BLOCK, _HEADER, _FILE_HEADER = 32768, 7, 7  # the LevelDB log format of W&B's run-<id>.wandb files


def wandb_records(path: str):
    """The protobuf records of a W&B offline run file (LevelDB log blocks: FULL, or FIRST/MIDDLE/LAST)."""
    from wandb.proto import wandb_internal_pb2

    with open(path, "rb") as f:
        data = f.read()
    pos, chunks = _FILE_HEADER, b""
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + _HEADER])
        if kind == 0:
            break
        payload, pos = data[pos + _HEADER:pos + _HEADER + length], pos + _HEADER + length
        chunks = payload if kind in (1, 2) else chunks + payload
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            yield record


def wandb_history(run_dir: str) -> dict[int, dict]:
    """{step: {metric: value}} of the history records of the run in `run_dir` (tables left out)."""
    (run_file,) = glob.glob(os.path.join(run_dir, "run-*.wandb"))
    history = {}
    for record in wandb_records(run_file):
        if record.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            values = {k: v for k, v in items.items() if not k.startswith(("_", "samples/"))}
            history.setdefault(items["_step"], {}).update(values)
    return history


def samples_table_rows(run_dir: str, step: int) -> int:
    """Rows of the `samples` table the W&B run logged at `step`."""
    (run_file,) = glob.glob(os.path.join(run_dir, "run-*.wandb"))
    for record in wandb_records(run_file):
        if record.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            if items["_step"] == step and "samples/nrows" in items:
                return items["samples/nrows"]
    return 0


def jsonl_series(workdir: str) -> dict[int, dict]:
    series = {}
    for record in read_metrics(workdir):
        step = record.pop("step")
        series.setdefault(step, {}).update({k: float(v) for k, v in record.items()})
    return series


@pytest.fixture()
def tracked_config(assets, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps its file store behind this switch
    monkeypatch.setenv("WANDB_SILENT", "true")
    store = f"file:{tmp_path / 'mlruns'}"
    workdir = str(tmp_path / "run")

    def config(**overrides):
        return tiny_run_config(assets, workdir, **{
            "train.steps": 4, "train.log_every": 1, "train.eval_every": 2, "train.save_every": 2,
            "train.sample_every": 2, "train.sample_prompts": 2, "sampling.max_new_tokens": 4,
            "logging.wandb.enabled": True, "logging.wandb.mode": "offline", "logging.wandb.project": "tiny",
            "logging.mlflow.enabled": True, "logging.mlflow.tracking_uri": store,
            "logging.mlflow.experiment": "tiny", **overrides})
    return config, workdir, store


def mlflow_history(store: str, run_id: str, keys) -> dict[int, dict]:
    import mlflow

    client, history = mlflow.MlflowClient(tracking_uri=store), {}
    for key in keys:
        for metric in client.get_metric_history(run_id, key):
            history.setdefault(metric.step, {})[key] = metric.value
    return history


def assert_same_series(got: dict[int, dict], expected: dict[int, dict]):
    assert sorted(got) == sorted(expected)
    for step, record in expected.items():
        assert set(got[step]) == set(record), step
        for key, value in record.items():
            assert got[step][key] == value or (math.isnan(value) and math.isnan(got[step][key])), (step, key)


def test_every_metric_reaches_wandb_and_mlflow_at_its_step(tracked_config):
    config, workdir, store = tracked_config
    train_and_evaluate(config(**{"train.steps": 2}))
    expected = jsonl_series(workdir)
    assert {"train/loss", "eval/loss", "train/pairs_per_s"} <= set().union(*expected.values())
    ids = json.load(open(os.path.join(workdir, trackers.IDS_FILE)))
    (run_dir,) = glob.glob(os.path.join(workdir, "wandb", f"offline-run-*-{ids['wandb']}"))
    assert_same_series(wandb_history(run_dir), expected)
    keys = set().union(*expected.values())
    assert_same_series(mlflow_history(store, ids["mlflow"], keys), expected)
    assert samples_table_rows(run_dir, step=2) == 2  # the samples of step 2 as a W&B table
    import mlflow

    logged = mlflow.MlflowClient(tracking_uri=store).download_artifacts(ids["mlflow"], "samples/step_2.json")
    assert [row["prompt_index"] for row in json.load(open(logged))] == [0, 1]

    # The resume (train.steps 2 -> 4) continues both runs; the MLflow history then holds all four steps.
    train_and_evaluate(config())
    assert json.load(open(os.path.join(workdir, trackers.IDS_FILE))) == ids
    expected = jsonl_series(workdir)
    assert max(expected) == 4 and expected[2]["resume/train.steps"] == 4
    assert_same_series(mlflow_history(store, ids["mlflow"], set().union(*expected.values())), expected)
    assert len(glob.glob(os.path.join(workdir, "wandb", f"offline-run-*-{ids['wandb']}"))) == 2  # one per process


def test_unknown_mode_and_missing_package_are_one_line(assets, tmp_path, monkeypatch):
    config = tiny_run_config(assets, str(tmp_path), **{"logging.wandb.mode": "cloud"})
    with pytest.raises(ConfigError, match="logging.wandb.mode = 'cloud' must be one of"):
        trackers.check_config(config.logging)
    monkeypatch.setattr(trackers, "_installed", lambda package: package != "mlflow")
    config = tiny_run_config(assets, str(tmp_path), **{"logging.mlflow.enabled": True})
    with pytest.raises(ConfigError, match=r"logging.mlflow.enabled is set but mlflow is not installed: "
                                          r"pip install 'jaxdpo\[mlflow\]'"):
        trackers.check_config(config.logging)


def test_on_policy_rounds_reach_mlflow_as_metrics_and_sample_tables(assets, tmp_path, monkeypatch):
    """The rounds' own records (pairs, ties, win rate) at steps 1..R and each round's judged samples as a
    table, in the run opened in the online WORKDIR (each round's training logs to a run of its own)."""
    import mlflow

    from jaxdpo.online.rounds import run_online

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    store, workdir = f"file:{tmp_path / 'mlruns'}", str(tmp_path / "online")
    run_online(tiny_run_config(assets, workdir, **{
        "train.steps": 1, "train.save_every": 1, "data.eval_files": "", "sampling.max_new_tokens": 4,
        "judge.function": "tests.judge_functions:shorter", "judge.prompts": 2, "online.rounds": 2,
        "online.prompts_per_round": 8, "online.samples_per_prompt": 2, "online.max_new_tokens": 4,
        "online.prompts": assets["train"], "logging.mlflow.enabled": True,
        "logging.mlflow.tracking_uri": store, "logging.mlflow.experiment": "online"}))
    expected = jsonl_series(workdir)
    assert sorted(expected) == [1, 2] and "online/pairs" in expected[1]
    run_id = json.load(open(os.path.join(workdir, trackers.IDS_FILE)))["mlflow"]
    assert_same_series(mlflow_history(store, run_id, set().union(*expected.values())), expected)
    client = mlflow.MlflowClient(tracking_uri=store)
    for r in (0, 1):
        rows = json.load(open(client.download_artifacts(run_id, f"rounds/samples/step_{r + 1}.json")))
        audit = [json.loads(line) for line in open(os.path.join(workdir, "rounds", f"{r}.samples.jsonl"))]
        assert [(row["completion"], row["score"]) for row in rows] == [
            (c, s) for a in audit for c, s in zip(a["completions"], a["scores"])]
