"""Groups of N scored completions of one prompt (loss.group): all_pairs and plackett_luce against the pair
losses they generalize, one shared row against separate rows, the group data's bad rows, and a tiny run."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxdpo.data.formats import ExampleKind
from jaxdpo.data.tokenize import TokenizedGroups
from jaxdpo.errors import ConfigError
from jaxdpo.preference import losses

PAIR_CASES = [("sigmoid", {}), ("ipo", {}), ("hinge", {}), ("simpo", {"gamma": 0.3}), ("orpo", {}),
              ("sigmoid", {"label_smoothing": 0.1}), ("sigmoid", {"nll_coef": 0.5})]


def _pair_values(num: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 9, (2, num)).astype(np.float32)
    logps = (-rng.uniform(0.2, 3.0, (2, num)) * lengths).astype(np.float32)
    ref = logps + rng.normal(0, 0.5, (2, num)).astype(np.float32)
    return dict(pc=logps[0], pr=logps[1], rc=ref[0], rr=ref[1], nc=lengths[0], nr=lengths[1])


def _as_groups(v: dict) -> dict:
    """Each pair as the group (chosen, rejected), scores (1, 0)."""
    num = len(v["pc"])
    return dict(logps=np.stack([v["pc"], v["pr"]], 1), ref_logps=np.stack([v["rc"], v["rr"]], 1),
                lengths=np.stack([v["nc"], v["nr"]], 1), group_scores=np.tile([[1.0, 0.0]], (num, 1)),
                group_mask=np.ones((num, 2), np.int32))


def _loss_cfg(types, group="", **settings):
    return dict(types=(types,), weights=(1.0,), beta=0.1, group=group, **settings)


@pytest.mark.parametrize("types,settings", PAIR_CASES)
def test_all_pairs_of_two_completions_is_the_pair_loss(types, settings):
    values, valid = _pair_values(6), np.array([1, 1, 1, 1, 1, 0])
    pair_sum, pair_metrics = losses.example_loss(_loss_cfg(types, **settings), values, valid)
    group_cfg = _loss_cfg(types, group="all_pairs", **settings)
    group_sum, group_metrics = losses.example_loss(group_cfg, _as_groups(values), valid)
    count = losses.example_count(group_cfg, dict(_as_groups(values), pair_valid=valid))
    assert float(count) == 5.0
    assert float(group_sum) == pytest.approx(float(pair_sum), rel=1e-6, abs=1e-6)
    pair_means = losses.metric_means(_loss_cfg(types, **settings), pair_metrics, 5.0)
    group_means = losses.metric_means(group_cfg, group_metrics, count)
    for key, value in pair_means.items():
        assert float(group_means[key]) == pytest.approx(float(value), rel=1e-6, abs=1e-6), key


def test_plackett_luce_of_two_completions_is_sigmoid_dpo():
    values, valid = _pair_values(7, seed=3), np.ones(7)
    pair_sum, _ = losses.example_loss(_loss_cfg("sigmoid"), values, valid)
    pl_sum, _ = losses.example_loss(_loss_cfg("sigmoid", group="plackett_luce"), _as_groups(values), valid)
    assert float(pl_sum) == pytest.approx(float(pair_sum), rel=1e-6)
    grad_pair = jax.grad(lambda pc: losses.example_loss(_loss_cfg("sigmoid"), dict(values, pc=pc), valid)[0])(
        jnp.asarray(values["pc"]))
    groups = _as_groups(values)
    grad_pl = jax.grad(lambda lp: losses.example_loss(_loss_cfg("sigmoid", group="plackett_luce"),
                                                      dict(groups, logps=lp), valid)[0])(jnp.asarray(groups["logps"]))
    np.testing.assert_allclose(grad_pl[:, 0], grad_pair, rtol=1e-5, atol=1e-7)


def _plackett_luce_by_hand(u, scores) -> float:
    """The stated rule, written as loops: ranks by score, ties share a rank, every completion above the last
    rank writes u_i - log sum_{m ranked at or below i} exp(u_m)."""
    total = 0.0
    for i in range(len(u)):
        if not any(scores[k] < scores[i] for k in range(len(u))):
            continue
        below = [u[m] for m in range(len(u)) if scores[m] <= scores[i]]
        total -= u[i] - math.log(sum(math.exp(x) for x in below))
    return total


def test_plackett_luce_ranks_by_score_with_shared_ranks_and_counts():
    scores = np.array([[0.5, 2.0, 0.5, -1.0], [3.0, 1.0, 2.0, 0.0], [1.0, 1.0, 0.0, 0.0], [4.0, 4.0, 4.0, 0.0]],
                      np.float32)
    mask = np.array([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], np.int32)  # sizes 4, 3, 2, 4
    rng = np.random.default_rng(5)
    logps, ref = rng.normal(-5, 1, (4, 4)).astype(np.float32), rng.normal(-5, 1, (4, 4)).astype(np.float32)
    values = dict(logps=logps, ref_logps=ref, lengths=np.full((4, 4), 3.0, np.float32), group_scores=scores,
                  group_mask=mask)
    cfg = _loss_cfg("sigmoid", group="plackett_luce")
    loss_sum, metrics = losses.example_loss(cfg, values, np.ones(4))
    u = 0.1 * (logps - ref)
    expected = sum(_plackett_luce_by_hand(u[g, :mask[g].sum()], scores[g, :mask[g].sum()]) for g in range(4))
    assert float(loss_sum) == pytest.approx(expected, rel=1e-5)
    # group 2 is all tied: no term, not counted; pairs: 5 + 3 + 0 + 3 ordered pairs of different scores
    assert float(losses.example_count(cfg, dict(values, pair_valid=np.ones(4)))) == 3.0
    assert float(metrics["count/pairs"]) == 11.0
    assert float(losses.example_count(_loss_cfg("sigmoid", group="all_pairs"),
                                      dict(values, pair_valid=np.ones(4)))) == 11.0


# ----- one shared row against separate rows, through the model --------------------------------------
def _groups(sizes, seed=0) -> TokenizedGroups:
    rng = np.random.default_rng(seed)
    groups = TokenizedGroups.empty()
    for i, n in enumerate(sizes):
        prompt = rng.integers(1, 97, rng.integers(3, 10))
        completions = [rng.integers(1, 97, rng.integers(1, 8)) for _ in range(n)]
        scores = rng.integers(0, 3, n).astype(np.float32)  # ties on purpose
        groups.append(prompt, completions, scores, ("file", i))
    return groups


def _loss_and_grads(groups, layout: str, loss_cfg):
    from jaxdpo.data.batcher import PairBatcher
    from jaxdpo.data.layouts import row_length
    from jaxdpo.models.config import ModelConfig
    from jaxdpo.models.decoder import Decoder
    from jaxdpo.preference.reference import DeviceReference
    from jaxdpo.training.objectives import PreferenceObjective
    from jaxdpo.training.step import make_micro_loss

    config = ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=8)
    graphdef, params, frozen = nnx.split(Decoder(config, rngs=nnx.Rngs(0)), nnx.Param, ...)
    _, reference_params, _ = nnx.split(Decoder(config, rngs=nnx.Rngs(1)), nnx.Param, ...)

    class Cfg(dict):
        __getattr__ = dict.get
    length = row_length(groups, layout, Cfg(max_length=24, pack_length=96))
    batcher = PairBatcher(groups, layout=layout, row_length=length, batch_size=len(groups),
                          micro_batch_size=len(groups), seed=0, shuffle=False)
    batch = batcher.train_batch(0)[0]
    objective = PreferenceObjective(loss_cfg, reference=DeviceReference(reference_params), chunk_size=8)
    micro_loss = make_micro_loss(graphdef, objective=objective, num_pairs=len(groups))
    total = jnp.maximum(losses.example_count(loss_cfg, batch), 1.0)
    (loss, metrics), grads = jax.value_and_grad(micro_loss, has_aux=True)(params, frozen, reference_params, batch,
                                                                          total)
    return float(loss), metrics, grads, batch


@pytest.mark.parametrize("group", ["all_pairs", "plackett_luce"])
def test_a_group_in_one_shared_row_equals_its_completions_in_padded_rows(group):
    groups = _groups([4, 2, 3, 4, 3])
    cfg = _loss_cfg("sigmoid", group=group)
    base_loss, base_metrics, base_grads, padded = _loss_and_grads(groups, "padded", cfg)
    assert padded["input_ids"].shape[0] == 4 * len(groups)  # N rows per group, N = the largest
    assert base_loss > 0
    for layout in ("grouped", "packed"):
        loss, metrics, grads, batch = _loss_and_grads(groups, layout, cfg)
        assert batch["branch_ids"].max() == 4
        assert loss == pytest.approx(base_loss, abs=1e-5)
        for key in ("rewards/margins", "count/pairs", "logps/chosen"):
            assert float(metrics[key]) == pytest.approx(float(base_metrics[key]), abs=1e-5)
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(base_grads)):
            np.testing.assert_allclose(a, b, atol=1e-5)


# ----- data -------------------------------------------------------------------------------------------
def _write(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


GOOD = {"prompt": "What color is the cat?", "completions": ["The cat is red.", "No idea.", "Red!"],
        "scores": [2, 0, 1.5]}


@pytest.mark.parametrize("row,key,words", [
    ({"prompt": "Hi?", "completions": ["Yes."], "scores": [1]}, "completions", "at least 2"),
    ({"prompt": "Hi?", "completions": ["Yes.", "No."], "scores": [1, float("nan")]}, "scores", "finite"),
    ({"prompt": "Hi?", "completions": ["Yes.", "No."], "scores": [1, "2"]}, "scores", "finite"),
    ({"prompt": "Hi?", "completions": ["Yes.", "No.", "Maybe."], "scores": [1, 0]}, "scores", "2 scores for 3"),
])
def test_bad_groups_are_one_line_or_skipped_and_counted(assets, tiny_config, tmp_path, row, key, words):
    from transformers import AutoTokenizer

    from jaxdpo.data import load_preference_data

    path = _write(tmp_path / "groups.jsonl", [GOOD, row, GOOD])
    config = tiny_config(str(tmp_path / "run"), **{"data.train_files": path, "data.eval_files": ""})
    tokenizer = AutoTokenizer.from_pretrained(assets["model"])
    with pytest.raises(ConfigError) as error:
        load_preference_data(config.data, tokenizer, log=None, kind=ExampleKind.GROUP)
    message = str(error.value)
    assert "\n" not in message and f"{path}" in message and "row 2" in message and repr(key) in message
    assert words in message
    config.data.on_bad_row = "skip"
    train, _, report = load_preference_data(config.data, tokenizer, workdir=str(tmp_path / "run"), log=None,
                                            kind=ExampleKind.GROUP)
    assert len(train) == 2 and train.completions == 3 and sum(report["train"]["dropped"].values()) == 1
    again, _, again_report = load_preference_data(config.data, tokenizer, log=None, kind=ExampleKind.GROUP)
    assert again_report["train"]["sources"][0]["cached"]  # the tokenized cache holds groups too
    for i in range(len(train)):
        assert [x.tolist() for x in again[i]] == [x.tolist() for x in train[i]]
        np.testing.assert_array_equal(again.scores[i], train.scores[i])
    with open(tmp_path / "run" / "data_report.json") as f:
        assert json.load(f)["train"]["examples_are"] == "groups"


def test_group_losses_refuse_what_they_cannot_take(tiny_config, tmp_path):
    from jaxdpo.config import validate

    def refused(match, **overrides):
        with pytest.raises(ConfigError, match=match):
            validate(tiny_config(str(tmp_path), **overrides))

    refused("sigmoid DPO over a ranking", **{"loss.group": "plackett_luce", "loss.types": ("ipo",),
                                             "loss.weights": (1.0,)})
    refused("coupling the pairs", **{"loss.group": "all_pairs", "loss.types": ("aot",)})
    refused("cannot serve groups", **{"loss.group": "all_pairs", "reference.mode": "cached"})
    refused("loss.group='best_of'", **{"loss.group": "best_of"})
    online = {"online.rounds": 1, "online.prompts": tiny_config(str(tmp_path)).data.train_files,
              "judge.function": "tests.judge_functions:shorter"}
    refused("online.pairs = 'every'", **online, **{"online.pairs": "every"})
    refused("set loss.group", **online, **{"online.pairs": "group"})
    validate(tiny_config(str(tmp_path), **online, **{"online.pairs": "group", "loss.group": "plackett_luce"}))


def test_splash_refuses_groups_in_one_row_and_xla_keeps_them():
    from jaxdpo.ops.attention import make_attention_mask, select_backend

    backend, why = select_backend("splash", platform="tpu", layout="grouped", dtype=jnp.bfloat16, head_dim=64,
                                  groups=True)
    assert backend == "xla" and "two apart" in why
    assert select_backend("cudnn", platform="gpu", layout="grouped", dtype=jnp.bfloat16, head_dim=64,
                          groups=True)[0] == "xla"
    # branches 1..4 after a shared prompt: each sees the prompt and itself only
    branch = jnp.array([[0, 0, 1, 1, 2, 3, 3, 4]])
    mask = make_attention_mask(jnp.ones_like(branch), branch, jnp.arange(8)[None])[0, 0]
    for q in range(8):
        for k in range(q + 1):
            assert bool(mask[q, k]) == (int(branch[0, k]) in (0, int(branch[0, q])))


def test_a_tiny_run_trains_on_groups(tiny_config, tmp_path):
    from jaxdpo.training.loop import train_and_evaluate
    from jaxdpo.training.metrics import read_metrics
    from tests.tiny_assets import preference_rows

    rows = [{"prompt": p["prompt"], "completions": [p["chosen"], p["rejected"], p["chosen"] + " Sure."][:2 + i % 2],
             "scores": [1.0, 0.0, 0.5][:2 + i % 2]} for i, p in enumerate(preference_rows(16, seed=3))]
    path = _write(tmp_path / "groups.jsonl", rows)
    config = tiny_config(str(tmp_path / "run"), **{
        "data.train_files": path, "data.eval_files": path, "data.layout": "grouped", "loss.group": "all_pairs",
        "data.shuffle": False, "train.steps": 2, "train.eval_every": 2, "train.export_hf": False})
    train_and_evaluate(config)
    records = read_metrics(str(tmp_path / "run"))
    train = [r for r in records if "train/loss" in r]
    evals = [r for r in records if "eval/loss" in r]
    assert len(train) == 2 and all(np.isfinite(r["train/loss"]) for r in train)
    assert train[0]["train/count/pairs"] == 4 * 1 + 4 * 3  # rows 0..7: groups of 2 and 3 in turn
    assert evals and np.isfinite(evals[-1]["eval/loss"])


# ----- on-policy rounds: every judged answer --------------------------------------------------------
def test_online_rounds_write_every_pair_or_one_group_per_prompt(assets, tiny_config, tmp_path):
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from jaxdpo.data import load_preference_data
    from jaxdpo.online import rounds

    prompts = ["What color is the cat?", "What color is the dog?", "What color is the fox?"]
    completions = [["Red.", "Blue.", " ", "Red!"], ["Gray.", "Gold.", "Pink.", "Black."],
                   ["Green.", "White.", "Red.", "Gray."]]
    scores = np.array([[1.0, 0.0, 2.0, 1.0], [1.0, 1.0, 1.0, 1.0], [np.nan, 3.0, 1.0, np.nan]])
    pairs = rounds.every_pair_rows(prompts, completions, scores)  # blanks and unscored samples take no part
    assert [(r["prompt_index"], r["chosen"], r["rejected"]) for r in pairs] == [
        (0, "Red.", "Blue."), (0, "Red!", "Blue."), (2, "White.", "Red.")]
    groups = rounds.group_rows(prompts, completions, scores)  # the all-tied prompt carries no preference
    assert groups == [{"prompt": prompts[0], "completions": ["Red.", "Blue.", "Red!"], "scores": [1.0, 0.0, 1.0],
                       "prompt_index": 0},
                      {"prompt": prompts[2], "completions": ["White.", "Red."], "scores": [3.0, 1.0],
                       "prompt_index": 2}]
    config = SimpleNamespace(seed=0, online=SimpleNamespace(pairs="group"))
    assert rounds.round_rows(config, 0, prompts, completions, scores) == groups
    path = _write(tmp_path / "round.jsonl", groups)
    data_cfg = tiny_config(str(tmp_path / "run"), **{"data.train_files": path, "data.eval_files": ""}).data
    train, _, _ = load_preference_data(data_cfg, AutoTokenizer.from_pretrained(assets["model"]), log=None,
                                       kind=ExampleKind.GROUP)
    assert len(train) == 2 and [len(c) for c in train.completion_ids] == [3, 2]
