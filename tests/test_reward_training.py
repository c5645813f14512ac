"""Reward models trained here (objective = "reward_model", jaxdpo/training/objectives.py): the first step's
loss equals TRL 1.16 RewardTrainer's on the same model and pairs (padded and prefix_shared, with
center_rewards_coefficient, and with a data file's margin column in both layouts; a bad margin is one line naming
file and row), the export is a
*ForSequenceClassification dir whose transformers scores equal the trained scorer's and that the reward-model
judge reads, LoRA exports merged with the score head, a causal LM gets a new head in one line, and an
on-policy round judged by a trained reward model runs end to end."""

import json
import os

import jax
import numpy as np
import pytest
import torch
import transformers

from jaxdpo import config as config_lib
from jaxdpo.errors import ConfigError
from jaxdpo.models import reward_model
from jaxdpo.training.objectives import RewardObjective
from tests.helpers import memoized_trainings

CENTER = 0.01
REWARD = {"objective": "reward_model", "reference.mode": "none", "data.shuffle": False, "train.steps": 2,
          "reward_model.center_rewards_coefficient": CENTER}


@pytest.fixture(scope="module")
def classifier(assets, tmp_path_factory):
    """The tiny assets' Llama as a LlamaForSequenceClassification with a random score head."""
    path = str(tmp_path_factory.mktemp("classifier"))
    tokenizer = transformers.AutoTokenizer.from_pretrained(assets["model"])
    torch.manual_seed(3)
    model = transformers.LlamaForSequenceClassification.from_pretrained(assets["model"], num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def train(assets, tmp_path_factory):
    return memoized_trainings(assets, tmp_path_factory)


def pair_ids(run, indices) -> list[tuple[list[int], list[int]]]:
    """(prompt + chosen, prompt + rejected) token ids of the run's train pairs at `indices`."""
    out = []
    for i in indices:
        prompt, chosen, rejected = run.data.train_pairs[int(i)]
        out.append((list(prompt) + list(chosen), list(prompt) + list(rejected)))
    return out


def trl_first_loss(model_dir, tokenizer, pairs, tmp_path, margins=None) -> float:
    """TRL 1.16 RewardTrainer.compute_loss on one batch of pre-tokenized pairs."""
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    rows = [{"chosen_ids": c, "rejected_ids": r} | ({} if margins is None else {"margin": float(m)})
            for (c, r), m in zip(pairs, margins if margins is not None else [None] * len(pairs))]
    model = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32)
    args = RewardConfig(output_dir=str(tmp_path / "trl"), report_to=[], center_rewards_coefficient=CENTER,
                        per_device_train_batch_size=len(rows), use_cpu=True)
    trainer = RewardTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    with torch.no_grad():
        return float(trainer.compute_loss(model, trainer.data_collator(rows)))


def hf_scores(model_dir, rows: list[list[int]], pad_id: int) -> np.ndarray:
    """transformers' scores of token lists, right-padded with `pad_id`."""
    model = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32).eval()
    length = max(map(len, rows))
    ids = torch.tensor([r + [pad_id] * (length - len(r)) for r in rows])
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=(ids != pad_id).long()).logits[:, 0].numpy()


@pytest.mark.parametrize("layout", ["padded", "prefix_shared"])
def test_first_step_loss_equals_trl_reward_trainer(train, classifier, layout, tmp_path):
    run, records = train(layout, {**REWARD, "model.path": classifier, "data.layout": layout})
    first = next(r for r in records if "train/loss" in r)
    assert first["step"] == 1
    pairs = pair_ids(run, run.data.batcher.step_indices(0))
    expected = trl_first_loss(classifier, run.data.tokenizer, pairs, tmp_path)
    assert first["train/loss"] == pytest.approx(expected, abs=1e-5)
    for key in ("train/accuracy", "train/margin", "train/mean_reward"):
        assert np.isfinite(first[key]), key
    final_eval = [r for r in records if "eval/accuracy" in r][-1]
    assert 0.0 <= final_eval["eval/accuracy"] <= 1.0 and "eval/margin" in final_eval


def with_margins(source: str, target, margins) -> str:
    """`source`'s rows written to `target` with a `margin` column (None: that row's key left out)."""
    with open(source) as f:
        rows = [json.loads(line) for line in f]
    with open(target, "w") as f:
        for row, margin in zip(rows, margins):
            f.write(json.dumps(row if margin is None else dict(row, margin=margin)) + "\n")
    return str(target)


@pytest.mark.parametrize("layout", ["padded", "prefix_shared"])
def test_a_margin_column_in_the_data_shifts_the_loss_as_trl(train, classifier, assets, layout, tmp_path_factory):
    margins = np.round(np.linspace(-1.0, 2.0, 64), 3).tolist()
    data = with_margins(assets["train"], tmp_path_factory.mktemp("margins") / "train.jsonl", margins)
    run, records = train(f"margin-{layout}", {**REWARD, "model.path": classifier, "data.layout": layout,
                                              "data.train_files": data, "train.steps": 1})
    indices = run.data.batcher.step_indices(0)
    batch_margins = [margins[run.data.train_pairs.source[int(i)][1] - 1] for i in indices]  # rows are 1-based
    assert len(set(batch_margins)) > 1
    expected = trl_first_loss(classifier, run.data.tokenizer, pair_ids(run, indices),
                              tmp_path_factory.mktemp("trl"), margins=batch_margins)
    without = trl_first_loss(classifier, run.data.tokenizer, pair_ids(run, indices), tmp_path_factory.mktemp("trl"))
    first = next(r for r in records if "train/loss" in r)
    assert first["train/loss"] == pytest.approx(expected, abs=1e-5) and abs(expected - without) > 1e-2


def test_a_bad_or_missing_margin_is_one_line_naming_file_and_row(assets, tiny_config, tmp_path):
    from jaxdpo.data import load_preference_data

    tokenizer = transformers.AutoTokenizer.from_pretrained(assets["model"])
    good = [0.5] * 64
    for name, margins, message in [("text", good[:2] + ["big"] + good[3:], r"row 3, key 'margin'\): bad_margin"),
                                   ("nan", good[:4] + [float("nan")] + good[5:], r"row 5, key 'margin'\): bad_margin"),
                                   ("missing", good[:1] + [None] + good[2:], r"row 2, key 'margin'\): missing_margin")]:
        data = with_margins(assets["train"], tmp_path / f"{name}.jsonl", margins)
        with pytest.raises(ConfigError, match=f"{name}.jsonl, {message}") as info:
            load_preference_data(tiny_config(tmp_path / name, **{"data.train_files": data}).data, tokenizer, log=None)
        assert "\n" not in str(info.value)
    data = with_margins(assets["train"], tmp_path / "good.jsonl", np.arange(64) / 8)
    config = tiny_config(tmp_path / "good", **{"data.train_files": data, "data.eval_files": ""})
    fresh, _, report = load_preference_data(config.data, tokenizer, log=None)
    cached, _, cached_report = load_preference_data(config.data, tokenizer, log=None)
    assert not report["train"]["sources"][0]["cached"] and cached_report["train"]["sources"][0]["cached"]
    assert fresh.margins == cached.margins == [(row - 1) / 8 for _, row in fresh.source]


def test_the_export_scores_as_transformers_and_the_judge_reads_it(train, classifier):
    run, _ = train("padded", {**REWARD, "model.path": classifier, "data.layout": "padded"})
    hf_dir = os.path.join(run.config.workdir, "hf")
    with open(os.path.join(hf_dir, "config.json")) as f:
        exported = json.load(f)
    pad_id = run.data.tokenizer.pad_token_id
    assert exported["architectures"] == ["LlamaForSequenceClassification"] and exported["pad_token_id"] == pad_id
    micro = run.data.batcher.train_batch(0)[0]
    objective = RewardObjective(center_rewards_coefficient=0.0, score_pad_id=pad_id)
    values = objective.make_values(run.policy.graphdef, num_pairs=len(micro["pair_valid"]))(
        jax.device_get(run.state["params"]), run.policy.frozen, None, micro)
    trained = np.stack([values["reward_chosen"], values["reward_rejected"]], axis=1).reshape(-1)
    rows = [ids for pair in pair_ids(run, run.data.batcher.step_indices(0)) for ids in pair]
    np.testing.assert_allclose(hf_scores(hf_dir, rows, pad_id), trained, atol=1e-4)
    judge = reward_model.RewardModel(hf_dir, batch_size=8)
    np.testing.assert_allclose(judge.score_token_ids(rows), trained, atol=1e-4)


def test_lora_on_a_causal_lm_gets_a_new_head_and_exports_it_merged(train, assets, capsys):
    run, records = train("lora", {**REWARD, "lora.rank": 4, "data.layout": "padded"})
    out = capsys.readouterr().out
    assert out.count("has no score head (a causal LM): score head [32, 1] initialised N(0, 0.02^2)") == 1
    hf_dir = os.path.join(run.config.workdir, "hf")
    assert sorted(os.listdir(run.config.workdir)).count("hf_adapter") == 0
    pad_id = run.data.tokenizer.pad_token_id
    micro = run.data.batcher.train_batch(1)[0]
    objective = RewardObjective(center_rewards_coefficient=0.0, score_pad_id=pad_id)
    params = jax.device_get(run.state["params"])
    assert any("score" in str(path) for path, _ in jax.tree_util.tree_leaves_with_path(params))  # the head trains
    values = objective.make_values(run.policy.graphdef, num_pairs=len(micro["pair_valid"]))(
        params, run.policy.frozen, None, micro)
    trained = np.stack([values["reward_chosen"], values["reward_rejected"]], axis=1).reshape(-1)
    rows = [ids for pair in pair_ids(run, run.data.batcher.step_indices(1)) for ids in pair]
    np.testing.assert_allclose(hf_scores(hf_dir, rows, pad_id), trained, atol=1e-4)
    first = next(r for r in records if "train/loss" in r)
    assert first["train/loss"] == pytest.approx(np.log(2), abs=0.05)  # a small random head: rewards near 0


def test_reward_model_settings_are_one_line_errors(tiny_config, tmp_path):
    for overrides, message in [({"data.layout": "packed"}, "padded or prefix_shared"),
                               ({"train.sample_every": 5}, "does not generate"),
                               ({"reward_model.center_rewards_coefficient": -1.0}, "must be a number >= 0"),
                               ({"loss.types": ("kto",)}, "trains on preference pairs"),
                               ({"lora.rank": 4, "lora.base_dtype": "nf4"}, "over a float base")]:
        with pytest.raises(ConfigError, match=message) as info:
            config_lib.validate(tiny_config(tmp_path, **{**REWARD, **overrides}))
        assert "\n" not in str(info.value)


def test_an_online_round_judged_by_a_trained_reward_model(train, classifier, assets, tiny_config, tmp_path):
    from jaxdpo.online.rounds import read_jsonl, run_online

    run, _ = train("padded", {**REWARD, "model.path": classifier, "data.layout": "padded"})
    config = tiny_config(tmp_path / "online", **{
        "judge.reward_model": os.path.join(run.config.workdir, "hf"), "online.rounds": 1,
        "online.prompts": assets["train"], "online.prompts_per_round": 16, "online.samples_per_prompt": 2,
        "online.max_new_tokens": 8, "train.steps": 1, "lora.rank": 4})
    config_lib.validate(config)
    last = run_online(config)
    assert last is not None and not last.preempted
    audit = read_jsonl(str(tmp_path / "online" / "rounds" / "0.samples.jsonl"))
    assert len(audit) == 16 and all(len(row["scores"]) == 2 and None not in row["scores"] for row in audit)
    pairs = read_jsonl(str(tmp_path / "online" / "rounds" / "0.jsonl"))
    assert len(pairs) >= 8 and all(row["chosen_score"] > row["rejected_score"] for row in pairs)


def test_a_preempted_reward_model_run_resumes_to_the_uninterrupted_weights(assets, classifier, tmp_path,
                                                                           monkeypatch):
    from jaxdpo.training.loop import train_and_evaluate
    from tests.helpers import assert_bit_equal
    from tests.tiny_assets import tiny_run_config

    overrides = {**REWARD, "model.path": classifier, "train.steps": 3}
    whole = train_and_evaluate(tiny_run_config(assets, str(tmp_path / "whole"), **overrides))
    stopped = str(tmp_path / "stopped")
    monkeypatch.setenv("JAXDPO_FAULT", "SIGTERM@stopped/checkpoints/2")  # a preemption after step 2
    assert train_and_evaluate(tiny_run_config(assets, stopped, **overrides)).preempted
    resumed = train_and_evaluate(tiny_run_config(assets, stopped, **overrides))
    assert not resumed.preempted
    assert_bit_equal(jax.device_get(resumed.state["params"]), jax.device_get(whole.state["params"]))
    rows = [[5, 6, 7, 2], [9, 3, 2]]
    np.testing.assert_array_equal(hf_scores(os.path.join(stopped, "hf"), rows, pad_id=0),
                                  hf_scores(str(tmp_path / "whole" / "hf"), rows, pad_id=0))


def test_the_demo_config_is_a_valid_reward_model_run(monkeypatch):
    from configs import dpo
    from configs import reward_model as demo

    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # its paths are the repo's
    config = demo.get_config()
    config_lib.check_schema(config, dpo.get_config(), source="configs/reward_model.py")
    config_lib.validate(config)
    assert config.objective == "reward_model" and config.reference.mode == "none"
