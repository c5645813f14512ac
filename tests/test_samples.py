"""Samples during training (train.sample_every) and the judge's win rate at each eval, in an offline run."""

import glob
import json
import os
import types

import pytest

from jaxdpo import config as config_lib
from jaxdpo.errors import ConfigError
from jaxdpo.sampling import samples
from tests import judge_functions
from tests.helpers import assert_win_rate_metrics

# samples of every judged prompt: samples.jsonl holds the completions the win rate judged at each eval
WATCHED = {"train.steps": 2, "train.eval_every": 2, "train.sample_every": 2, "train.sample_prompts": 4,
           "sampling.max_new_tokens": 8, "judge.function": "tests.judge_functions:shorter", "judge.prompts": 4}


def _read(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def watched_run(assets, tmp_path_factory):
    from jaxdpo.training.loop import train_and_evaluate
    from tests.tiny_assets import tiny_run_config

    workdir = str(tmp_path_factory.mktemp("watched") / "run")
    config = tiny_run_config(assets, workdir, **WATCHED)
    config_lib.validate(config)
    train_and_evaluate(config)
    return config


def test_samples_side_by_side_with_logprobs_and_implicit_reward(watched_run):
    records = _read(os.path.join(watched_run.workdir, samples.SAMPLES_FILE))
    assert [(r["step"], r["prompt_index"]) for r in records] == [(step, i) for step in (0, 2) for i in range(4)]
    beta = watched_run.loss.beta
    for r in records:
        for side in ("policy", "reference"):
            s = r[side]
            assert isinstance(s["completion"], str)
            assert s["reward"] == pytest.approx(beta * (s["logp_policy"] - s["logp_reference"]), abs=1e-6)
            if r["step"] == 0:  # the policy is the reference: both models give every completion the same logprob
                assert s["logp_policy"] == s["logp_reference"] and s["reward"] == 0.0
    assert any(r[side]["reward"] != 0.0 for r in records if r["step"] == 2 for side in ("policy", "reference"))
    # the reference side is drawn once: the same texts at every step
    for key in ("completion", "logp_reference"):
        assert records[0]["reference"][key] == records[4]["reference"][key]
    header, *stored = _read(os.path.join(watched_run.workdir, samples.REFERENCE_FILE))
    assert len(stored) == 4 and len(header["prompts"]) == 4  # max(train.sample_prompts, judge.prompts)
    events = b"".join(open(p, "rb").read() for p in glob.glob(os.path.join(watched_run.workdir, "tensorboard", "*")))
    assert b"samples" in events and b"logp policy" in events  # the markdown table in tensorboard's text tab


def test_win_rate_at_each_eval_with_interval_and_judge_scores(watched_run):
    evals = [r for r in _read(os.path.join(watched_run.workdir, "metrics.jsonl")) if "eval/loss" in r]
    samples_by_step = {}
    for r in _read(os.path.join(watched_run.workdir, samples.SAMPLES_FILE)):
        samples_by_step.setdefault(r["step"], []).append(r)
    assert [r["step"] for r in evals] == [0, 2] and sorted(samples_by_step) == [0, 2]
    for r in evals:
        judged = samples_by_step[r["step"]]
        scores = {side: [judge_functions.shorter(s["prompt"], s[side]["completion"]) for s in judged]
                  for side in ("policy", "reference")}
        assert len(judged) == 4  # judge.prompts
        assert_win_rate_metrics(r, scores["policy"], scores["reference"])


def test_resume_reads_the_stored_reference_completions_and_rewrites_later_samples(watched_run, monkeypatch):
    from jaxdpo.training.loop import train_and_evaluate

    before = _read(os.path.join(watched_run.workdir, samples.SAMPLES_FILE))
    with open(os.path.join(watched_run.workdir, samples.SAMPLES_FILE), "a") as f:
        f.write(json.dumps({"step": 5, "written": "after the checkpoint, by a run that was killed"}) + "\n")
    monkeypatch.setattr(samples, "write_reference_rows", lambda *a: pytest.fail("reference completions redrawn"))
    extended = watched_run.copy_and_resolve_references()
    extended.train.steps, extended.train.sample_every = 3, 1  # neither is part of the resume fingerprint
    train_and_evaluate(extended)
    after = _read(os.path.join(watched_run.workdir, samples.SAMPLES_FILE))
    assert after[:8] == before and [r["step"] for r in after[8:]] == [3] * 4
    assert after[8]["reference"]["completion"] == before[0]["reference"]["completion"]


def test_off_builds_and_reads_nothing(tiny_config, tmp_path, monkeypatch):
    config = tiny_config(tmp_path)
    monkeypatch.setattr(samples.prompts_lib, "heldout_prompts", lambda *a: pytest.fail("prompts read"))
    no_eval = types.SimpleNamespace(eval_pairs=None, tokenizer=None)
    watch = samples.Watch.build(config, None, no_eval, policy=None, reference=None, start_step=0)
    assert watch.win_rate(None) == {} and watch.write_samples(0, None, None) is None


@pytest.mark.parametrize("overrides, message", [
    ({"judge.function": "tests.judge_functions:shorter", "judge.reward_model": "/nowhere"}, "both set"),
    ({"judge.function": "tests.judge_functions:nothing"}, "has no function"),
    ({"train.sample_every": -1}, "train.sample_every"),
    ({"sampling.temperature": -0.5}, "temperature"),
])
def test_bad_sampling_and_judge_settings_are_one_line_errors(tiny_config, tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        config_lib.validate(tiny_config(tmp_path, **overrides))
