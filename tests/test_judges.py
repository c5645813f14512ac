"""Judges: the registry of judge kinds, the reward model against transformers' *ForSequenceClassification,
function judges, pair formation and win rate."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers
from jax.sharding import PartitionSpec

from configs import dpo
from jaxdpo.config import ConfigError
from jaxdpo.judging import judges
from jaxdpo.judging.function_judge import FunctionJudge
from jaxdpo.judging.pairs import form_pairs, pair_rows
from jaxdpo.judging.reward_model_judge import RewardModelJudge
from jaxdpo.judging.win_rate import win_rate
from jaxdpo.models.reward_model import RewardModel, bucket_length, last_token_index
from jaxdpo.online.phases import PhaseClock
from jaxdpo.online.rounds import ROUND_KEYS
from jaxdpo.parallel.sharding import make_mesh
from tests.hf_models import randomized
from tests.tiny_assets import make_tokenizer

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=8, max_position_embeddings=128, num_labels=1, pad_token_id=0)
CLASSIFIERS = {
    "llama": ("LlamaConfig", "LlamaForSequenceClassification", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForSequenceClassification", {}),
    "mistral_sliding": ("MistralConfig", "MistralForSequenceClassification", {"sliding_window": 4}),
    "gemma2": ("Gemma2Config", "Gemma2ForSequenceClassification", {
        "sliding_window": 4, "attn_logit_softcapping": 2.0, "final_logit_softcapping": 5.0,
        "query_pre_attn_scalar": 16}),
}
LENGTHS = (12, 9, 5, 1, 7)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def judge_config(**judge_keys):
    """configs/dpo.py's config with the given `judge.*` keys set."""
    config = dpo.get_config()
    for key, value in judge_keys.items():
        config.judge[key] = value
    return config


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    corpus = ["What color is the cat?", "The cat is red. Glad to help!", "No idea, go away."] * 4
    return make_tokenizer(str(tmp_path_factory.mktemp("tok")), corpus)


@pytest.fixture(scope="module")
def classifiers(tmp_path_factory, tokenizer):
    """case -> (torch model, checkpoint dir), built once per case."""
    cache = {}

    def get(case):
        if case not in cache:
            config_cls, model_cls, extra = CLASSIFIERS[case]
            config = getattr(transformers, config_cls)(vocab_size=len(tokenizer), **{**TINY, **extra})
            torch.manual_seed(0)
            model = randomized(getattr(transformers, model_cls)(config).eval())
            path = str(tmp_path_factory.mktemp(case))
            model.save_pretrained(path)
            tokenizer.save_pretrained(path)
            cache[case] = (model, path)
        return cache[case]

    return get


def ragged_batch(vocab: int, side: str):
    """Ids with real tokens in [1, vocab) (0 is the pad id), padded on `side`; the second row ends with
    the pad id as a real token, so the read position comes from the ids (transformers' rule)."""
    rng = np.random.default_rng(1)
    t = max(LENGTHS)
    ids, mask = np.zeros((len(LENGTHS), t), np.int64), np.zeros((len(LENGTHS), t), np.int64)
    for r, n in enumerate(LENGTHS):
        cols = slice(0, n) if side == "right" else slice(t - n, t)
        ids[r, cols] = rng.integers(1, vocab, n)
        mask[r, cols] = 1
    ids[1, (LENGTHS[1] - 1) if side == "right" else t - 1] = 0
    return ids, mask


def torch_scores(model, ids, mask) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask)).logits[:, 0].numpy()


@pytest.mark.parametrize("case", list(CLASSIFIERS))
def test_reward_model_matches_transformers(case, classifiers):
    hf_model, path = classifiers(case)
    reward_model = RewardModel(path, batch_size=2)
    vocab = hf_model.config.vocab_size
    for side in ("right", "left"):
        ids, mask = ragged_batch(vocab, side)
        expected, got = torch_scores(hf_model, ids, mask), reward_model.score_padded(ids, mask)
        assert np.abs(expected).max() > 0.2  # not a comparison of near-zero scores
        diff = float(np.abs(expected - got).max())
        print(f"{case} {side}-padded: max |score diff| = {diff:.2e}")
        assert diff < 1e-4
    # token lists, bucketed and batched 2 rows at a time (3 batches, rows sorted by length)
    ids, mask = ragged_batch(vocab, "right")
    rows = [list(ids[r, :n]) for r, n in enumerate(LENGTHS)]
    got = reward_model.score_token_ids(rows)
    singles = np.array([torch_scores(hf_model, np.array([row]), np.ones((1, len(row)), np.int64))[0] for row in rows])
    assert np.abs(got - singles).max() < 1e-4


def test_reward_model_sharded_on_mesh_and_text_scores(classifiers, tokenizer):
    hf_model, path = classifiers("llama")
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    reward_model = RewardModel(path, mesh=mesh, batch_size=3)
    assert reward_model.batch_rows == 4  # whole rows for each of the 4 batch shards
    q_proj = reward_model.state["layers"]["q_proj"][...]
    assert q_proj.sharding.spec == PartitionSpec(None, "fsdp", "tensor", None)
    prompts = ["What color is the cat?", [{"role": "user", "content": "What color is the cat?"}],
               "No idea"]
    completions = [" The cat is red.", "The cat is red. Glad to help!", ", go away."]
    got = reward_model.score(prompts, completions)
    texts = [prompts[0] + completions[0],
             tokenizer.apply_chat_template(prompts[1] + [{"role": "assistant", "content": completions[1]}],
                                           tokenize=False),
             prompts[2] + completions[2]]
    expected = []
    for text, special in zip(texts, (True, False, True)):
        enc = tokenizer(text, add_special_tokens=special, return_tensors="pt")
        expected.append(torch_scores(hf_model, enc["input_ids"], enc["attention_mask"])[0])
    assert got.dtype == np.float64 and np.abs(got - np.array(expected)).max() < 1e-4


def test_read_position_and_buckets():
    ids = np.array([[5, 6, 0, 0], [0, 0, 7, 8], [5, 0, 6, 0], [0, 0, 0, 0]])
    mask = np.array([[1, 1, 0, 0], [0, 0, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1]])
    assert last_token_index(ids, mask, pad_token_id=0).tolist() == [1, 3, 2, 0]
    assert last_token_index(ids, mask, pad_token_id=None).tolist() == [1, 3, 3, 3]
    assert [bucket_length(n, 100) for n in (1, 32, 33, 64, 65, 99)] == [32, 32, 64, 64, 100, 100]


def test_reward_model_errors(classifiers, tmp_path):
    with pytest.raises(ConfigError, match="not a directory"):
        RewardModel(str(tmp_path / "missing"))
    hf_model, path = classifiers("llama")
    causal = transformers.LlamaForCausalLM(hf_model.config)
    causal.save_pretrained(str(tmp_path / "causal"))
    with pytest.raises(ConfigError, match="no 'score.weight' tensor"):
        RewardModel(str(tmp_path / "causal"))


# ---- function judges --------------------------------------------------------------------------------

def test_function_judge_imports_once_and_scores(tmp_path, monkeypatch):
    (tmp_path / "my_rules.py").write_text(
        "CALLS = []\n"
        "def length(prompt, completion):\n"
        "    CALLS.append(prompt)\n"
        "    return len(completion)\n"
        "def bad(prompt, completion):\n"
        "    return 'high'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    judge = judges.make_judge(judge_config(function="my_rules:length"), mesh=None)
    assert isinstance(judge, FunctionJudge)
    assert judge.name == "my_rules:length"
    scores = judge.score(["p1", "p2"], ["abc", ""])
    assert scores.tolist() == [3.0, 0.0] and scores.dtype == np.float64
    import my_rules

    assert my_rules.CALLS == ["p1", "p2"]
    with pytest.raises(ConfigError, match=r"my_rules:bad returned 'high' for completion 0"):
        FunctionJudge("my_rules:bad").score(["p"], ["c"])


@pytest.mark.parametrize("spec, message", [
    ("no_colon", "expected 'module:function'"),
    ("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'"),
    ("jaxdpo.judging.rules:no_such_function", "has no function 'no_such_function'"),
    ("jaxdpo.judging.rules:MAX_WORDS", "is not callable"),
])
def test_function_judge_errors(spec, message):
    with pytest.raises(ConfigError, match=message) as info:
        FunctionJudge(spec)
    assert "\n" not in str(info.value)


def test_short_answer_rule():
    from jaxdpo.judging.rules import MAX_WORDS, short_answer

    assert short_answer("q", "") == 0.0
    assert short_answer("q", "Paris.") == 1.0 and short_answer("q", " w" * MAX_WORDS) == 1.0
    assert short_answer("q", " w" * (2 * MAX_WORDS)) == 0.5
    assert short_answer("q", " w" * (MAX_WORDS + 1)) > short_answer("q", " w" * (MAX_WORDS + 2))


# ---- the registry of judge kinds ---------------------------------------------------------------------

def test_the_config_selects_one_kind_or_none():
    assert judges.judge_kind(judge_config()) is None and judges.make_judge(judge_config(), mesh=None) is None
    assert not judges.is_configured(judge_config())
    assert judges.judge_kind(judge_config(function="a:b")) is FunctionJudge
    assert judges.judge_kind(judge_config(reward_model="/x")) is RewardModelJudge
    with pytest.raises(ConfigError, match=r"judge.function = 'a:b' and judge.reward_model = '/x' are both set; "
                                          r"set exactly one of them") as info:
        judges.judge_kind(judge_config(function="a:b", reward_model="/x"))
    assert "\n" not in str(info.value)
    config = judge_config(function="a:b")
    judges.clear_judge(config)
    assert not judges.is_configured(config)


def test_every_kind_declares_config_keys_that_exist_and_is_fingerprinted_by_the_rounds():
    defaults = dpo.get_config().judge
    for kind in judges.KINDS:
        assert kind.keys[0] == kind.selector and all(key in defaults for key in kind.keys), kind
        assert defaults[kind.selector] == "", kind  # no judge unless the user selects one
        assert f"judge.{kind.selector}" in ROUND_KEYS and f"judge.{kind.selector}" in judges.usage()



def test_only_the_judging_package_reads_judge_kind_keys():
    """Outside jaxdpo/judging, code asks the registry; a `config.judge.<kind key>` read elsewhere would be a
    second place that tells the kinds apart."""
    import ast

    kind_keys = {key for kind in judges.KINDS for key in kind.keys}
    package = os.path.join(REPO, "jaxdpo")
    readers = []
    for root, _, files in os.walk(package):
        if os.path.basename(root) == "judging":
            continue
        for name in (f for f in files if f.endswith(".py")):
            with open(os.path.join(root, name)) as f:
                tree = ast.parse(f.read())
            readers += [f"{os.path.relpath(os.path.join(root, name), REPO)}:{node.lineno}" for node in ast.walk(tree)
                        if isinstance(node, ast.Attribute) and node.attr in kind_keys
                        and isinstance(node.value, ast.Attribute) and node.value.attr == "judge"]
    assert readers == []

def test_reward_model_kind_checks_its_keys_and_builds_the_model(classifiers, tmp_path):
    _, path = classifiers("llama")
    with pytest.raises(ConfigError, match="judge.reward_model = .* is not a directory"):
        judges.check_config(judge_config(reward_model=str(tmp_path / "missing")))
    for key, value, message in [("batch_size", 0, "judge.batch_size = 0 must be a positive integer"),
                                ("max_length", -1, "judge.max_length = -1 must be an integer >= 0"),
                                ("prompts", 0, "judge.prompts = 0 must be positive")]:
        with pytest.raises(ConfigError, match=message):
            judges.check_config(judge_config(reward_model=path, **{key: value}))
    config = judge_config(reward_model=path, batch_size=3, max_length=64)
    judges.check_config(config)
    judge = judges.make_judge(config, mesh=None)
    assert isinstance(judge, RewardModel) and judge.name == f"reward_model:{path}"
    assert judge.max_length == 64 and judge.batch_rows == 3


def test_missing_judge_module_exits_2_in_one_line(assets, tmp_path):
    """The real CLI on the tiny assets: the config check imports the judge before anything is built."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-m", "jaxdpo.train", "--config=configs/dpo.py",
                           f"--config.workdir={tmp_path / 'run'}", f"--config.model.path={assets['model']}",
                           f"--config.data.train_files={assets['train']}", f"--config.data.eval_files={assets['eval']}",
                           "--config.judge.function=no_such_module:f"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.strip().splitlines() == [
        "jaxdpo: judge 'no_such_module:f': cannot import module 'no_such_module' (No module named "
        "'no_such_module'); is it on PYTHONPATH (the directory you run from is)?"]
    assert not os.path.exists(tmp_path / "run")  # nothing was built


# ---- pairs and win rate -------------------------------------------------------------------------------

def test_form_pairs_best_vs_worst_ties_dropped_and_deterministic():
    scores = np.array([
        [0.1, 0.9, 0.5, 0.3],  # best 1, worst 0
        [2.0, 2.0, 2.0, 2.0],  # all equal: dropped, counted
        [1.0, 3.0, 3.0, 0.0],  # best is a tie between 1 and 2, broken by (seed, round, prompt)
        [5.0, 1.0, 1.0, 1.0],  # worst is a tie between 1, 2, 3
    ])
    pairs = form_pairs(scores, seed=7, round_index=2)
    assert pairs.ties == 1
    assert pairs.prompt_index.tolist() == [0, 2, 3]
    assert pairs.chosen_index[0] == 1 and pairs.rejected_index[0] == 0
    assert pairs.chosen_index[1] in (1, 2) and pairs.rejected_index[1] == 3
    assert pairs.chosen_index[2] == 0 and pairs.rejected_index[2] in (1, 2, 3)
    again = form_pairs(scores, seed=7, round_index=2)
    for field in ("prompt_index", "chosen_index", "rejected_index"):
        assert getattr(again, field).tolist() == getattr(pairs, field).tolist()
    # a tie-break depends only on (seed, round, prompt index): prompt 2 alone, at index 2, picks the same
    alone = np.array([[0.0] * 4, [0.0] * 4, scores[2]])
    assert form_pairs(alone, seed=7, round_index=2).chosen_index.tolist() == [pairs.chosen_index[1]]
    draws = {int(form_pairs(scores, seed=s, round_index=r).chosen_index[1]) for s in range(8) for r in range(4)}
    assert draws == {1, 2}  # both tied completions get picked under some (seed, round)
    with pytest.raises(ValueError, match="k >= 2"):
        form_pairs(np.zeros((3, 1)), seed=0, round_index=0)
    with pytest.raises(ValueError, match="not finite"):  # NaN is a sample the judge failed on, inf a bug
        form_pairs(np.array([[0.0, np.inf]]), seed=0, round_index=0)


def test_pair_rows_for_the_round_file():
    scores = np.array([[0.0, 1.0], [1.0, 1.0]])
    pairs = form_pairs(scores, seed=0, round_index=0)
    rows = pair_rows(["p0", "p1"], [["a", "b"], ["c", "d"]], scores, pairs)
    assert rows == [{"prompt": "p0", "chosen": "b", "rejected": "a", "chosen_score": 1.0, "rejected_score": 0.0,
                     "prompt_index": 0}]
    json.dumps(rows)


def test_win_rate_on_a_known_example():
    policy = np.array([3.0, 2.0, 1.0, 5.0, 0.0, 4.0, 2.0, 2.0, 9.0, 1.0])
    reference = np.array([1.0, 2.0, 2.0, 1.0, 0.0, 1.0, 1.0, 3.0, 1.0, 1.0])
    result = win_rate(policy, reference)
    # 5 wins (0, 3, 5, 6, 8), 3 ties (1, 4, 9), 2 losses (2, 7): (5 + 1.5) / 10
    assert (result.wins, result.ties, result.losses, result.n) == (5, 3, 2, 10)
    assert result.win_rate == pytest.approx(0.65)
    # Wilson's bounds are the p with (0.65 - p)^2 = z^2 p (1 - p) / n: the roots of a quadratic
    z, n = 1.959963984540054, 10
    high, low = np.roots([1 + z * z / n, -(2 * 0.65 + z * z / n), 0.65 ** 2])
    assert result.low == pytest.approx(low) and result.high == pytest.approx(high)
    assert (round(result.low, 4), round(result.high, 4)) == (0.3537, 0.8631)
    assert result.policy_score == pytest.approx(2.9) and result.reference_score == pytest.approx(1.3)
    metrics = result.metrics("eval/")
    assert metrics["eval/win_rate"] == pytest.approx(0.65) and set(metrics) == {
        "eval/win_rate", "eval/win_rate_low", "eval/win_rate_high", "eval/judge_score_policy",
        "eval/judge_score_reference"}
    perfect = win_rate(np.ones(5), np.zeros(5))
    assert perfect.win_rate == 1.0 and perfect.high == 1.0 and 0.5 < perfect.low < 1.0


def test_correct_sum_rule_ranks_right_answers_first_then_shorter():
    from jaxdpo.judging.rules import correct_sum

    chat = [{"role": "system", "content": "Be brief. 1 + 1 = 2."}, {"role": "user", "content": "What is 59 + 63?"}]
    right, wrong = correct_sum(chat, "59 + 63 = 122."), correct_sum(chat, "59 + 63 = 111.")
    assert right == pytest.approx(1.1) and wrong == pytest.approx(0.1)
    long_right = correct_sum(chat, "To add 59 and 63 we " + "carefully " * 80 + "get 122")
    assert wrong < long_right < right  # correctness first, then brevity
    assert correct_sum(chat, "59 + 63 = 122. That's a total of 17.") == pytest.approx(1.1)  # the "=" answer
    assert correct_sum(chat, "59 + 63 = 78\n\nSo 122 is wrong.") == pytest.approx(0.1)
    assert correct_sum("What is -4+10?", "It is 6") == pytest.approx(1.1)
    assert correct_sum("What is 2 + 2?", "") == 0.0 and correct_sum("What is 2 + 2?", "four") == pytest.approx(0.1)
    with pytest.raises(ConfigError, match="asks for no sum"):
        correct_sum("Why is the sky blue?", "Rayleigh scattering.")


@pytest.mark.parametrize("question", ["What is 37 + 45?", "Compute 37 plus 45.", "Add 37 and 45.",
                                      "What's the sum of 37 and 45?", "Calculate 37 + 45.", "What is 37 plus 45?",
                                      "Find the sum of 37 and 45.", "37 + 45 = ?", "what is 45+37"])
def test_correct_sum_reads_every_phrasing_of_the_addition_prompts(question):
    from jaxdpo.judging.rules import asked_operands, correct_sum

    assert sorted(asked_operands([{"role": "user", "content": question}])) == [37, 45]
    assert correct_sum(question, "82") == pytest.approx(1.1) and correct_sum(question, "83") == pytest.approx(0.1)


def test_every_phrasing_of_the_prompt_tool_is_read_by_correct_sum():
    from jaxdpo.judging.rules import asked_operands
    from tools.make_addition_prompts import PHRASINGS

    assert all(asked_operands(phrasing.format(a=a, b=b)) == (a, b)
               for phrasing in PHRASINGS for a, b in [(10, 99), (58, 7)])


@pytest.mark.parametrize("answer, number", [
    ("37 + 45 = 82.", 82), ("The sum of 37 and 45 is 82.", 82), ("The answer is **82**.", 82),
    ("37 + 45 equals 82", 82), ("The answer is 37 + 45 = 82.", 82),  # "is 37 + ..." starts an expression
    ("We add 37 and 45, which results in 82. This is the sum of 37 and 45.", 82),
    ("37 + 45 = 82. 82 is 2 more than 80.", 82),  # the first stated number, not the rambling after it
    ("37 + 45 = 72\n\nSo 82 is wrong.", 72), ("I think 82", 82), ("45 and 37 make 82 in all", 82),
    ("eighty-two", None), ("", None)])
def test_correct_sum_takes_the_number_an_answer_states(answer, number):
    from jaxdpo.judging.rules import answer_number, correct_sum

    assert answer_number(answer) == number
    assert (correct_sum("Add 37 and 45.", answer) >= 1.0) == (number == 82)


def test_greedy_accuracy_thresholds_the_judges_scores():
    from jaxdpo.judging.greedy import share_correct

    assert share_correct(np.array([1.1, 0.1, 1.0, np.nan]), 1.0) == 0.5  # a score the judge failed on: not right
    assert share_correct(np.array([-3.0, -5.0]), -4.0) == 0.5 and np.isnan(share_correct(np.array([]), 1.0))


# ---- judge faults -----------------------------------------------------------------------------------------

def fussy(prompt, completion: str) -> float:
    """A rule with a bug: it divides by the completion's number of digits."""
    return 1.0 / sum(ch.isdigit() for ch in completion)


def test_a_judge_that_raises_skips_that_sample_in_one_line(capsys):
    judge = FunctionJudge("tests.test_judges:fussy")
    scores = judge.score(["What is 2+2?", "Name a colour.", "x" * 200], ["4", "blue", "12"])
    assert scores[0] == 1.0 and math.isnan(scores[1]) and scores[2] == 0.5
    out = capsys.readouterr().out
    assert out == ("judge tests.test_judges:fussy failed on prompt 'Name a colour.': ZeroDivisionError: float division "
                   "by zero; the sample is skipped\n")
    # a score that is not a finite number is still the user's error, in one line
    judge.function = lambda prompt, completion: float("nan")
    with pytest.raises(ConfigError, match=r"fussy returned nan for completion 0; it must return a finite number"):
        judge.score(["p"], ["c"])


def test_failed_samples_take_no_part_in_pairs_and_win_rates():
    nan = np.nan
    pairs = form_pairs(np.array([[1.0, nan, 3.0], [nan, nan, 2.0], [nan, 5.0, 5.0]]), seed=0, round_index=0)
    assert pairs.prompt_index.tolist() == [0] and pairs.chosen_index.tolist() == [2]
    assert pairs.rejected_index.tolist() == [0] and pairs.ties == 1 and pairs.unscored == 1
    result = win_rate(np.array([1.0, nan, 3.0, 0.0]), np.array([0.0, 1.0, nan, 1.0]))
    assert (result.n, result.wins, result.losses, result.unscored) == (2, 1, 1, 2)
    assert result.metrics()["eval/judge_unscored"] == 2
    assert "eval/judge_unscored" not in win_rate(np.ones(2), np.zeros(2)).metrics()


class _Sampler:
    """Completions '<prompt> answer <j>' (j counts the prompt's samples), no model."""

    def complete(self, states, prompts, settings):
        del states, settings
        return [{"completion": f"answer {j % 4}", "finished": True} for j, _ in enumerate(prompts)]


def _raises_on(bad: set):
    def score(prompt, completion):
        if prompt in bad or completion == "answer 3":
            raise RuntimeError(f"cannot judge {completion!r}\nsecond line")
        return float(completion[-1])
    return score


def test_a_round_counts_the_samples_its_judge_failed_on_and_stops_only_when_all_fail(tmp_path, capsys):
    from jaxdpo.online import rounds

    config = dpo.get_config()
    config.workdir = str(tmp_path)
    config.online.prompts_per_round, config.online.samples_per_prompt = 3, 4
    prompts = ["p0", "p1", "p2"]
    judge = FunctionJudge("tests.judge_functions:shorter")
    judge.name, judge.function = "rules:fragile", _raises_on({"p1"})
    rounds.sample_round(config, 0, prompts, judge, _Sampler(), states=None, clock=PhaseClock())
    summary = rounds.round_summary(config, 0)
    # p0, p2: answers 0..2 scored, answer 3 failed; p1: every sample failed
    assert summary["online/pairs"] == 2 and summary["online/ties"] == 0 and summary["online/blank"] == 0
    assert summary["online/judge_failed"] == 2 + 4 and summary["online/unscored_prompts"] == 1
    assert summary["online/score_mean"] == 1.0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 6 and all(line.startswith("judge rules:fragile failed on prompt '") for line in lines)
    assert ("judge rules:fragile failed on prompt 'p0': RuntimeError: cannot judge 'answer 3' second line; the "
            "sample is skipped") in lines
    line = rounds.round_line(0, summary)
    assert line.startswith("round 0: 2 pairs, 0 ties") and "6 samples skipped" in line
    audit = rounds.read_jsonl(str(tmp_path / "rounds" / "0.samples.jsonl"))
    assert all(row["scores"][3] is None for row in audit)
    judge.function = _raises_on(set(prompts))
    with pytest.raises(ConfigError, match="judge rules:fragile failed on every one of the 12 samples of round 1"):
        rounds.sample_round(config, 1, prompts, judge, _Sampler(), states=None, clock=PhaseClock())
    assert not (tmp_path / "rounds" / "1.jsonl").exists()
