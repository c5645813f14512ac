"""On-policy DPO rounds (jaxdpo/online/rounds.py): draws as pure functions of (seed, round, index), the rounds'
files, and a run stopped mid-round (SIGKILL in training, SIGTERM in training, SIGKILL between a round's
samples and its pairs) that ends bit-identical to an uninterrupted run.

The end-to-end runs are `python -m jaxdpo.train` processes on 2 simulated devices (fsdp) with a tiny Llama and a
function judge (shorter completions win: tiny random models give distinct scores). JAXDPO_FAULT
(jaxdpo/training/faults.py) makes a process signal itself at an exact point: after a round's checkpoint
save, or before a round's pairs file is written.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from jaxdpo import errors
from jaxdpo.judging.pairs import form_pairs
from jaxdpo.online import rounds as online
from tests.helpers import assert_win_rate_metrics
from tests.processes import jax_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROUNDS = 3
ONLINE = {"train.steps": 2, "train.save_every": 1, "train.log_every": 1, "train.keep_checkpoints": 2,
          "sampling.max_new_tokens": 8, "judge.function": "tests.judge_functions:shorter", "judge.prompts": 4,
          "online.rounds": ROUNDS, "online.prompts_per_round": 16, "online.samples_per_prompt": 2,
          "online.max_new_tokens": 8, "judge.correct_score": -24.0}
TIMING_KEYS = ("train/pairs_per_s", "train/tokens_per_s", "online/seconds_sample", "online/seconds_judge",
               "online/seconds_train", "online/seconds_other")

def test_round_prompts_are_a_pure_function_of_seed_and_round():
    rounds = [online.round_prompt_indices(10, 4, seed=3, round_index=r) for r in range(5)]
    again = [online.round_prompt_indices(10, 4, seed=3, round_index=r) for r in (4, 2, 0, 3, 1)]
    assert all(np.array_equal(rounds[r], a) for r, a in zip((4, 2, 0, 3, 1), again))  # any order, same draws
    visited = np.concatenate(rounds)  # 20 prompts = two epochs, each a permutation of the 10
    assert sorted(visited[:10]) == list(range(10)) and sorted(visited[10:]) == list(range(10))
    assert not np.array_equal(online.round_prompt_indices(10, 4, seed=4, round_index=0), rounds[0])
    assert len({online.round_seed(0, r) for r in range(8)}) == 8


def test_pairs_are_reproducible_under_the_seed_and_ties_are_counted():
    scores = np.array([[1.0, 1.0, 0.0, 0.0], [2.0, 2.0, 2.0, 2.0], [0.5, 1.0, 1.0, 0.0], [3.0, 1.0, 3.0, 1.0]])
    first = form_pairs(scores, seed=7, round_index=2)
    for _ in range(3):
        again = form_pairs(scores, seed=7, round_index=2)
        assert all(np.array_equal(getattr(first, f), getattr(again, f)) for f in ("prompt_index", "chosen_index",
                                                                                   "rejected_index"))
    assert first.ties == 1 and list(first.prompt_index) == [0, 2, 3]
    assert all(scores[p, c] == scores[p].max() and scores[p, r] == scores[p].min()
               for p, c, r in zip(first.prompt_index, first.chosen_index, first.rejected_index))
    draws = {tuple(form_pairs(scores, seed=s, round_index=2).chosen_index) for s in range(16)}
    assert len(draws) > 1  # ties among the best are broken by the seed, not always the same way


def test_a_round_trains_its_pairs_from_its_starting_policy(tiny_config, tmp_path):
    config = tiny_config(tmp_path / "run", **{"online.rounds": 2, "lora.rank": 4})
    round_1 = online.round_config(config, 1)
    assert round_1.workdir == str(tmp_path / "run" / "rounds" / "1")
    assert round_1.data.train_files == str(tmp_path / "run" / "rounds" / "1.jsonl") and not round_1.data.eval_files
    assert round_1.model.path == config.model.path and not round_1.train.export_hf  # the policy comes from memory
    assert round_1.online.rounds == 0 and not round_1.reference.path
    initial = online.round_config(tiny_config(tmp_path / "full", **{"online.reference": "initial"}), 1)
    assert initial.reference.path == config.model.path
    assert config.workdir == str(tmp_path / "run") and config.online.rounds == 2  # the run's config is unchanged


def test_bad_online_settings_are_one_line_errors(tiny_config, tmp_path, assets):
    from jaxdpo import config as config_lib
    from jaxdpo.errors import ConfigError

    base = {"online.rounds": 1, "online.prompts": assets["train"], "judge.function": "tests.judge_functions:shorter"}
    for overrides, message in [({"judge.function": ""}, "needs a judge"),
                               ({"online.samples_per_prompt": 1}, "must be >= 2"),
                               ({"online.reference": "base"}, "not one of"),
                               ({"online.reference": "initial", "lora.rank": 4}, "with LoRA")]:
        with pytest.raises(ConfigError, match=message):
            config_lib.validate(tiny_config(tmp_path, **{**base, **overrides}))


def _run(assets, workdir, fault=None):
    os.makedirs(workdir, exist_ok=True)
    overrides = {**ONLINE, "online.prompts": assets["train"], "online.eval_prompts": assets["eval"]}
    config_file = str(workdir) + "_config.py"
    with open(config_file, "w") as f:
        f.write(textwrap.dedent(f"""
            import sys
            sys.path.insert(0, {REPO!r})
            from tests.tiny_assets import tiny_run_config

            def get_config():
                return tiny_run_config({assets!r}, {str(workdir)!r}, **{overrides!r})
        """))
    command = [sys.executable, "-m", "jaxdpo.train", "--config=" + config_file]
    env = dict(os.environ, **({"JAXDPO_FAULT": fault} if fault else {}), **jax_env(devices=2))
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def _outcome(workdir) -> dict[str, bytes]:
    """Every file that says what the run did: the rounds' files, the final policy's weights, the metrics
    (wall-clock rates removed)."""
    rounds = os.path.join(workdir, "rounds")
    out = {name: open(os.path.join(rounds, name), "rb").read() for name in sorted(os.listdir(rounds))
           if name.endswith((".jsonl", ".done", ".json"))}
    out["final"] = open(os.path.join(rounds, str(ROUNDS - 1), "hf", "model.safetensors"), "rb").read()
    for name, path in [("metrics", workdir)] + [(f"metrics{r}", os.path.join(rounds, str(r))) for r in range(ROUNDS)]:
        with open(os.path.join(path, "metrics.jsonl")) as f:
            records = [json.loads(line) for line in f if line.strip()]
        out[name] = json.dumps([{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]).encode()
    return out


@pytest.fixture(scope="module")
def uninterrupted(assets, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("online") / "uninterrupted")
    result = _run(assets, workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir, _outcome(workdir)


def test_rounds_files_metrics_and_win_rate(uninterrupted):
    workdir, _ = uninterrupted
    rounds = os.path.join(workdir, "rounds")
    for r in range(ROUNDS):
        pairs = online.read_jsonl(os.path.join(rounds, f"{r}.jsonl"))
        audit = online.read_jsonl(os.path.join(rounds, f"{r}.samples.jsonl"))
        assert len(audit) == ONLINE["online.prompts_per_round"] and len(pairs) >= 8
        assert all(len(row["completions"]) == len(row["scores"]) == 2 for row in audit)
        by_prompt = {row["prompt_index"]: row for row in audit}
        for pair in pairs:  # the best against the worst of that prompt's samples, with their scores
            scores = by_prompt[pair["prompt_index"]]["scores"]
            assert pair["chosen_score"] == max(scores) > pair["rejected_score"] == min(scores)
            assert pair["chosen_score"] == -len(pair["chosen"]) and pair["rejected_score"] == -len(pair["rejected"])
        assert json.loads(open(os.path.join(rounds, f"{r}.done")).read())["trained"]
        assert os.path.isdir(os.path.join(rounds, str(r), "checkpoints"))
    records = online.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    assert [r["step"] for r in records] == list(range(ROUNDS + 1))
    for record in records:  # step 0: the initial policy; step r + 1: round r's policy, against the initial one
        name = "initial" if record["step"] == 0 else str(record["step"] - 1)
        judged = online.read_jsonl(os.path.join(rounds, f"{name}.eval.jsonl"))
        assert len(judged) == 4
        assert all(row[side + "_score"] == -len(row[side]) for row in judged for side in ("policy", "reference"))
        assert_win_rate_metrics(record, [row["policy_score"] for row in judged],
                                [row["reference_score"] for row in judged])
    assert all(r["online/pairs"] + r["online/ties"] + r["online/blank"] == 16 for r in records[1:])


def test_rounds_measure_greedy_accuracy_under_the_judge(uninterrupted):
    """eval/greedy_correct per round: the share of held-out greedy answers whose judge score (minus their
    length) reaches judge.correct_score; the answers, scores and verdicts in rounds/<name>.greedy.jsonl."""
    workdir, _ = uninterrupted
    records = online.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    for record in records:
        name = "initial" if record["step"] == 0 else str(record["step"] - 1)
        answers = online.read_jsonl(os.path.join(workdir, "rounds", f"{name}.greedy.jsonl"))
        assert len(answers) == ONLINE["judge.prompts"]
        assert all(row["score"] == -len(row["answer"]) and row["right"] == (row["score"] >= -24.0) for row in answers)
        assert record["eval/greedy_correct"] == pytest.approx(np.mean([row["right"] for row in answers]))


def test_a_run_stopped_mid_round_ends_bit_identical(uninterrupted, assets, tmp_path):
    workdir = str(tmp_path / "stopped")
    stops = [("SIGKILL@rounds/0/checkpoints/1", -signal.SIGKILL),  # in round 0's training, after step 1's save
             ("SIGTERM@rounds/1/checkpoints/1", errors.EXIT_PREEMPTED),  # preempted in round 1: saves, exits 75
             ("SIGKILL@rounds/2.jsonl", -signal.SIGKILL)]  # round 2's samples written, its pairs not yet
    for fault, status in stops:
        result = _run(assets, workdir, fault)
        assert result.returncode == status, (fault, result.stderr[-3000:])
        assert ("SIGTERM received" in result.stderr) == fault.startswith("SIGTERM")
    assert not os.path.exists(os.path.join(workdir, "rounds", "2.jsonl"))
    assert os.path.exists(os.path.join(workdir, "rounds", "2.samples.jsonl"))
    result = _run(assets, workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 round(s) already done" in result.stdout
    outcome, expected = _outcome(workdir), uninterrupted[1]
    assert sorted(outcome) == sorted(expected)
    for name in expected:
        assert outcome[name] == expected[name], name


def test_sample_cli_on_an_online_workdir_samples_the_last_rounds_policy(uninterrupted, tmp_path):
    from jaxdpo import sample

    workdir, _ = uninterrupted
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("w1 w2 w3", "w4 w5")))
    flags = [f"--prompts={prompts}", "--max_new_tokens=6", "--temperature=0"]
    assert sample.main([f"--model={workdir}", *flags, f"--output={tmp_path / 'workdir.jsonl'}"]) == 0
    final = os.path.join(workdir, "rounds", str(ROUNDS - 1), "hf")
    assert sample.main([f"--model={final}", *flags, f"--output={tmp_path / 'final.jsonl'}"]) == 0
    assert (tmp_path / "workdir.jsonl").read_text() == (tmp_path / "final.jsonl").read_text()


LORA_ROUNDS = {**ONLINE, "online.rounds": 2, "lora.rank": 4, "data.eval_files": ""}


@pytest.fixture(scope="module")
def lora_rounds(assets, tmp_path_factory):
    """Two LoRA rounds in this process, with the jitted train step's and sampler's cache sizes at each round's
    end (a retrace or a recompile grows them)."""
    from jaxdpo.sampling import generate
    from tests.tiny_assets import tiny_run_config

    workdir, cache_sizes = str(tmp_path_factory.mktemp("lora_rounds")), []
    built = []
    finish_round, build_steps = online.finish_round, online.build.build_steps

    def counting_build_steps(*args, **kwargs):
        built.append(build_steps(*args, **kwargs))
        return built[-1]

    def finish_and_count(*args, **kwargs):
        cache_sizes.append((built[-1].train_step._cache_size(), generate._run_jitted._cache_size()))
        finish_round(*args, **kwargs)

    overrides = {**LORA_ROUNDS, "online.prompts": assets["train"]}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(online, "finish_round", finish_and_count)
        patch.setattr(online.build, "build_steps", counting_build_steps)
        online.run_online(tiny_run_config(assets, workdir, **overrides))
    return workdir, overrides, len(built), cache_sizes


def test_round_two_reuses_the_compiled_steps_and_sampler_and_only_the_last_round_exports(lora_rounds):
    workdir, _, steps_built, cache_sizes = lora_rounds
    assert steps_built == 1 and cache_sizes[0][0] == 1
    assert cache_sizes[1] == cache_sizes[0]  # round 1 traced and compiled nothing new
    rounds = os.path.join(workdir, "rounds")
    assert not os.path.exists(os.path.join(rounds, "0", "hf"))
    assert os.path.isfile(os.path.join(rounds, "1", "hf", "model.safetensors"))
    assert online.final_policy(workdir) == os.path.join(rounds, "1", "hf")
    records = online.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    assert all(set(TIMING_KEYS[2:]) <= set(r) for r in records[1:])


def test_a_later_lora_rounds_checkpoint_is_refused_on_model_paths_base(lora_rounds):
    """Round 1's adapters were trained on a base with round 0's folded in, held in memory only: building
    that checkpoint on model.path's weights would be another model, so it is a one-line error; round 0's
    adapters sit on model.path's weights and build."""
    from jaxdpo.checkpoint.saved_policy import build_model, locate, read_params
    from jaxdpo.errors import ConfigError

    workdir, _, _, _ = lora_rounds
    first, second = (read_params(*locate(os.path.join(workdir, "rounds", r))[:2]) for r in ("0", "1"))
    assert first[1]["lora_rounds_in_base"] == 0 and second[1]["lora_rounds_in_base"] == 1
    _, settings = build_model(*first)
    assert settings.rank == LORA_ROUNDS["lora.rank"]
    with pytest.raises(ConfigError, match=r"trained on model.path with 1 earlier on-policy round\(s\)' adapters "
                                          r"folded in.*sample the run's WORKDIR"):
        build_model(*second)


def test_a_lora_run_extended_by_a_round_rebuilds_the_folded_base_bit_identically(lora_rounds, assets, tmp_path):
    from tests.tiny_assets import tiny_run_config

    workdir, overrides, _, _ = lora_rounds
    extended = str(tmp_path / "extended")
    online.run_online(tiny_run_config(assets, extended, **{**overrides, "online.rounds": 1}))
    online.run_online(tiny_run_config(assets, extended, **overrides))  # rebuilds round 1's start from round 0
    final = os.path.join("rounds", "1", "hf", "model.safetensors")
    assert open(os.path.join(extended, final), "rb").read() == open(os.path.join(workdir, final), "rb").read()
