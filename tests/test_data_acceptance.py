"""Acceptance: fixture files in the shapes of public preference sets, bad rows, mixing, cache, hub names."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from jaxdpo.config import ConfigError
from jaxdpo.data import (
    format_report,
    load_preference_data,
    make_batch,
    mix_sources,
    row_length,
)
from jaxdpo.data.tokenize import TokenizedPairs
from tests.data_helpers import data_config, make_tokenizer, visible_contexts

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "data")
BOS, EOS, ASSISTANT, END = 1, 2, 5, 6


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def enc(tokenizer):
    return lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]


def load(tokenizer, name, **overrides):
    overrides = {"max_length": 128, "max_prompt_length": 96, **overrides}  # the fixtures fit whole
    cfg = data_config(train_files=os.path.join(FIXTURES, name), eval_files="", **overrides)
    return load_preference_data(cfg, tokenizer, log=None)


def ids(pairs, i):
    return tuple(x.tolist() for x in pairs[i])


def test_hh_implicit_prompt(tokenizer, enc):
    train, evals, report = load(tokenizer, "hh.jsonl")
    assert evals is None and report["train"]["kept"] == 3
    prompt, chosen, rejected = ids(train, 0)
    assert prompt == [BOS] + enc("\n\nHuman: What color is the sky?\n\nAssistant:")
    assert chosen == enc(" The sky is blue.") + [EOS] and rejected == enc(" I don't know.") + [EOS]
    # multi-turn: earlier turns stay in the prompt, the completions are the final answers
    prompt, chosen, rejected = ids(train, 1)
    assert prompt == [BOS] + enc("\n\nHuman: hello there\n\nAssistant: hi, how can I help?"
                                 "\n\nHuman: What is 2+2?\n\nAssistant:")
    assert chosen == enc(" 2+2=4") + [EOS] and rejected == enc(" 2+2 is 5") + [EOS]
    # the padded rows of pair 0, exactly
    p, c, r = ids(train, 0)
    b = make_batch([train[0]], layout="padded", row_length=128, num_pairs=1)
    np.testing.assert_array_equal(b["input_ids"][0, :len(p) + len(c)], p + c)
    np.testing.assert_array_equal(b["input_ids"][1, :len(p) + len(r)], p + r)
    assert (b["input_ids"][0, len(p) + len(c):] == 0).all()
    np.testing.assert_array_equal(np.flatnonzero(b["side"][0]), np.arange(len(p) - 1, len(p) + len(c) - 1))
    np.testing.assert_array_equal(b["targets"][0, len(p) - 1:len(p) + len(c) - 1], c)
    np.testing.assert_array_equal(b["side"][1, len(p) - 1:len(p) + len(r) - 1], [2] * len(r))


def test_ultrafeedback_explicit_prompt_with_repeated_user_turn(tokenizer, enc):
    train, _, report = load(tokenizer, "ultrafeedback.jsonl")
    assert report["train"]["prefix_mismatch"] == 0 and len(train) == 2
    prompt, chosen, rejected = ids(train, 0)
    assert prompt == enc("<bos><|user|>What color is the sky?<|end|><|assistant|>")
    assert prompt[0] == BOS and prompt[-1] == ASSISTANT and prompt.count(BOS) == 1
    assert chosen == enc("The sky is blue.") + [END] and rejected == enc("It is green.") + [END]


def test_trl_standard(tokenizer, enc):
    train, _, _ = load(tokenizer, "trl_standard.jsonl")
    assert ids(train, 0) == ([BOS] + enc("The sky is"), enc(" blue.") + [EOS], enc(" green.") + [EOS])
    assert ids(train, 1) == ([BOS] + enc("2+2="), enc("4") + [EOS], enc("5") + [EOS])
    # implicit prompt: the shared text up to the word that differs; the completion keeps its space
    assert ids(train, 2) == ([BOS] + enc("The cat sat on the"), enc(" mat.") + [EOS], enc(" hat.") + [EOS])


def test_trl_conversational_system_multiturn_implicit(tokenizer, enc):
    train, _, report = load(tokenizer, "trl_conversational.jsonl")
    assert report["train"]["kept"] == 3 and report["train"]["prefix_mismatch"] == 0
    assert ids(train, 0) == (enc("<bos><|system|>Be brief.<|end|><|user|>What color is the sky?<|end|><|assistant|>"),
                             enc("Blue.<|end|>"), enc("Green.<|end|>"))
    assert ids(train, 1)[0] == enc("<bos><|user|>hello there<|end|><|assistant|>hi, how can I help?<|end|>"
                                   "<|user|>What is 2+2?<|end|><|assistant|>")
    assert ids(train, 1)[1:] == (enc("4") + [END], enc("5") + [END])
    assert ids(train, 2) == (enc("<bos><|user|>Capital of France?<|end|><|assistant|>"),
                             enc("Paris.<|end|>"), enc("Lyon.<|end|>"))


def test_truncation_on_real_rows(tokenizer, enc):
    full, _, _ = load(tokenizer, "hh.jsonl")
    p, c, r = ids(full, 1)
    keep_end, _, _ = load(tokenizer, "hh.jsonl", max_prompt_length=6, max_length=9, truncation="keep_end")
    assert ids(keep_end, 1) == ([BOS] + p[-5:], c[:3], r[:3])
    keep_start, _, _ = load(tokenizer, "hh.jsonl", max_prompt_length=6, max_length=9, truncation="keep_start")
    assert ids(keep_start, 1) == (p[:6], c[:3], r[:3])
    # prompt leaves no room for a completion: every pair is dropped and counted, and nothing is left
    with pytest.raises(ConfigError, match="no training pairs left.*truncated_to_empty"):
        load(tokenizer, "hh.jsonl", max_prompt_length=8, max_length=8)


def test_layouts_agree_on_fixture_data(tokenizer):
    train, _, _ = load(tokenizer, "trl_conversational.jsonl")
    pairs = [train[i] for i in range(len(train))]
    cfg = data_config()
    seen = [visible_contexts(make_batch(pairs, layout=layout, row_length=row_length(pairs, layout, cfg),
                                        num_pairs=4)) for layout in ("padded", "prefix_shared", "packed")]
    assert seen[0] == seen[1] == seen[2] and len(seen[0]) == 6


# ---------------------------------------------------------------------------------------------- bad rows
def test_bad_rows_error_names_file_row_and_reason(tokenizer):
    with pytest.raises(ConfigError, match=r"bad_rows\.jsonl, row 2\): invalid_json") as info:
        load(tokenizer, "bad_rows.jsonl", on_bad_row="error")
    assert "on_bad_row=skip" in str(info.value)


def test_bad_row_error_names_the_key(tokenizer, tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n"
                    + json.dumps({"prompt": "a", "chosen": "b"}) + "\n")
    cfg = data_config(train_files=str(path), eval_files="")
    with pytest.raises(ConfigError, match=r"rows\.jsonl, row 2, key 'rejected'\): missing_key"):
        load_preference_data(cfg, tokenizer, log=None)


def test_bad_rows_skip_counts_each_kind(tokenizer, tmp_path):
    lines = []
    train, _, report = load_preference_data(
        data_config(train_files=os.path.join(FIXTURES, "bad_rows.jsonl"), eval_files="", on_bad_row="skip"),
        tokenizer, workdir=str(tmp_path), log=lines.append)
    assert len(train) == 2 and [row for _, row in train.source] == [1, 9]
    assert report["train"]["dropped"] == {
        "empty_completion": 1, "identical_completions": 1, "invalid_json": 1, "missing_key": 1,
        "undecodable_text": 1, "unknown_role": 1, "wrong_type": 1}
    assert report["train"]["rows"] == 9 and report["train"]["kept"] == 2
    assert json.loads((tmp_path / "data_report.json").read_text()) == report
    table = lines[0]
    assert "bad_rows.jsonl" in table and "invalid_json=1" in table and "unknown_role=1" in table
    print(table)


# ---------------------------------------------------------------------------------------------- sources
def _write_rows(path, n, tag):
    path.write_text("".join(json.dumps({"prompt": f"{tag} {i}?", "chosen": "yes", "rejected": "no"}) + "\n"
                            for i in range(n)))


def test_weighted_mixing_and_max_samples(tokenizer, tmp_path):
    _write_rows(tmp_path / "a.jsonl", 10, "cat")
    _write_rows(tmp_path / "b.jsonl", 3, "dog")
    spec = f"{tmp_path}/a.jsonl@0.75, {tmp_path}/b.jsonl@0.25"
    train, _, report = load_preference_data(data_config(train_files=spec, eval_files="", max_samples=8),
                                            tokenizer, log=None, seed=1)
    files = [os.path.basename(f) for f, _ in train.source]
    assert (files.count("a.jsonl"), files.count("b.jsonl"), report["train"]["pairs"]) == (6, 2, 8)
    again, _, _ = load_preference_data(data_config(train_files=spec, eval_files="", max_samples=8),
                                       tokenizer, log=None, seed=1)
    assert again.source == train.source
    # without max_samples the total is kept and the small source is repeated (upsampled) to its share
    train, _, _ = load_preference_data(data_config(train_files=spec, eval_files=""), tokenizer, log=None)
    files = [os.path.basename(f) for f, _ in train.source]
    assert (files.count("a.jsonl"), files.count("b.jsonl")) == (10, 3)
    with pytest.raises(ConfigError, match="every entry a weight"):
        load_preference_data(data_config(train_files=f"{tmp_path}/a.jsonl@0.5,{tmp_path}/b.jsonl",
                                         eval_files=""), tokenizer, log=None)


def test_mix_sources_upsamples():
    part = lambda n, tag: TokenizedPairs([np.array([1])] * n, [np.array([2])] * n, [np.array([3])] * n,
                                         [(tag, i) for i in range(n)])
    mixed = mix_sources([part(4, "a"), part(2, "b")], [0.5, 0.5], 10, seed=0)
    tags = [t for t, _ in mixed.source]
    assert (tags.count("a"), tags.count("b")) == (5, 5)
    assert sorted(r for t, r in mixed.source if t == "b") == [0, 0, 0, 1, 1] or \
        sorted(r for t, r in mixed.source if t == "b") == [0, 0, 1, 1, 1]


def test_hub_name_offline_fails_at_once(tokenizer, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(ConfigError, match="HF_DATASETS_OFFLINE.*save_to_disk"):
        load_preference_data(data_config(train_files="Anthropic/hh-rlhf:default:train", eval_files=""),
                             tokenizer, log=None)


def test_eval_files_and_report_table(tokenizer):
    cfg = data_config(train_files=os.path.join(FIXTURES, "hh.jsonl"),
                      eval_files=os.path.join(FIXTURES, "trl_standard.jsonl"))
    train, evals, report = load_preference_data(cfg, tokenizer, log=None)
    assert (len(train), len(evals), report["eval"]["pairs"]) == (3, 3, 3)
    table = format_report(report).splitlines()
    assert table[0].split()[:4] == ["split", "source", "rows", "kept"]
    assert table[-1].split()[-1] == "3" and table[-1].startswith("eval")


# ---------------------------------------------------------------------------------------------- cache
def test_cache_reuses_and_invalidates(tokenizer, tmp_path):
    path = tmp_path / "rows.jsonl"
    _write_rows(path, 4, "cat")
    cfg = data_config(train_files=str(path), eval_files="", use_cache=True, cache_dir=str(tmp_path / "cache"))
    first, _, r1 = load_preference_data(cfg, tokenizer, log=None)
    second, _, r2 = load_preference_data(cfg, tokenizer, log=None)
    assert [s["cached"] for s in (r1["train"]["sources"][0], r2["train"]["sources"][0])] == [False, True]
    assert [ids(first, i) for i in range(4)] == [ids(second, i) for i in range(4)]
    assert second.source == first.source and second[0][0].dtype == np.int32
    cfg.max_length = 32  # another length setting is another entry
    assert not load_preference_data(cfg, tokenizer, log=None)[2]["train"]["sources"][0]["cached"]
    _write_rows(path, 5, "dog")  # rewriting the file invalidates it
    third, _, r3 = load_preference_data(cfg, tokenizer, log=None)
    assert not r3["train"]["sources"][0]["cached"] and len(third) == 5
    assert len(os.listdir(tmp_path / "cache" / "tokenized")) == 3


def test_tokenizer_without_bos(tmp_path, enc):
    # GPT-2/Qwen-style: no BOS is added to text; completions still end with exactly one EOS.
    tok = make_tokenizer(add_bos=False)
    tok.bos_token = None
    train, _, _ = load_preference_data(data_config(train_files=os.path.join(FIXTURES, "trl_standard.jsonl"),
                                                   eval_files=""), tok, log=None)
    assert ids(train, 1) == (enc("2+2="), enc("4") + [EOS], enc("5") + [EOS])
    # an empty prompt still needs a last token to predict the first answer token from: EOS stands in
    from jaxdpo.data.formats import normalize_row
    from jaxdpo.data.tokenize import make_spec, tokenize_pair

    spec = make_spec(tok)
    assert tokenize_pair(spec, normalize_row({"chosen": "Yes", "rejected": "No"})) == (
        [EOS], enc("Yes") + [EOS], enc("No") + [EOS], 0)
