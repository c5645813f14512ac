"""What goes into training from the user's files: content digests key the caches and the
resume check, damaged cache entries are rebuilt, column handling (prompt_key, CSV cells), BOS of an
empty conversational prompt, and plain-text and conversational rows tokenized exactly as TRL 1.16's DPOTrainer
tokenizes them."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from jaxdpo.config import ConfigError
from jaxdpo.data import PairBatcher, load_preference_data
from jaxdpo.data.formats import normalize_row
from jaxdpo.data.loading import load_rows
from jaxdpo.data.tokenize import make_spec, tokenize_pair
from jaxdpo.preference import reference_cache
from tests.data_helpers import data_config, make_tokenizer, write_jsonl
from tests.helpers import damage

ROWS = [{"prompt": "What color is the sky?", "chosen": "The sky is blue.", "rejected": "The cat sat."},
        {"prompt": "2+2=", "chosen": "4", "rejected": "5"},
        {"prompt": "Where is Paris?", "chosen": "Paris is in France.", "rejected": "On the mat."}]


# " The" follows a question often enough here to become one token, "ĠThe"
TRL_CORPUS = ["What color is the sky? The sky is blue.", "Is it late? The cat sat on the mat.",
              "Where is Paris? The city is in France."] * 5


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


# ------------------------------------------------------------------------------ content identity
def test_a_same_size_rewrite_with_the_old_mtime_is_not_served_from_the_cache(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    cfg = data_config(train_files=path, use_cache=True, cache_dir=str(tmp_path / "cache"))
    first, _, report = load_preference_data(cfg, tokenizer, log=None)
    stat = os.stat(path)
    # chosen and rejected swapped: the same bytes in another order, then the old mtime put back (cp -p)
    write_jsonl(path, [{"prompt": r["prompt"], "rejected": r["chosen"], "chosen": r["rejected"]} for r in ROWS])
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert os.stat(path).st_size == stat.st_size
    second, _, report2 = load_preference_data(cfg, tokenizer, log=None)
    assert not report2["train"]["sources"][0]["cached"]
    assert [list(c) for c in second.chosen_ids] == [list(r) for r in first.rejected_ids]
    digest = report["train"]["sources"][0]["files"][0]["sha256"]
    assert len(digest) == 64 and digest != report2["train"]["sources"][0]["files"][0]["sha256"]


def test_the_cache_follows_the_content_not_the_spelling_of_the_path(tmp_path, tokenizer, monkeypatch):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    cfg = data_config(train_files=path, eval_files="", use_cache=True, cache_dir=str(tmp_path / "cache"))
    load_preference_data(cfg, tokenizer, log=None)
    monkeypatch.chdir(tmp_path)
    train, _, report = load_preference_data(data_config(train_files="d.jsonl", eval_files="", use_cache=True,
                                                        cache_dir=str(tmp_path / "cache")), tokenizer, log=None)
    assert report["train"]["sources"][0]["cached"]
    assert {f for f, _ in train.source} == {"d.jsonl"}  # rows named as this run spells the file


def test_resume_identity_compares_content_and_names_the_changed_file(tmp_path, tokenizer, monkeypatch):
    from jaxdpo.data.identity import check_unchanged, data_identity

    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    _, _, saved_report = load_preference_data(data_config(train_files=path, eval_files=""), tokenizer, log=None)
    monkeypatch.chdir(tmp_path)
    _, _, relative_report = load_preference_data(data_config(train_files="d.jsonl", eval_files=""), tokenizer, log=None)
    check_unchanged(data_identity(saved_report), data_identity(relative_report), where="ckpt")  # 17: accepted
    write_jsonl(path, [{"prompt": r["prompt"], "rejected": r["chosen"], "chosen": r["rejected"]} for r in ROWS])
    _, _, swapped_report = load_preference_data(data_config(train_files="d.jsonl", eval_files=""), tokenizer, log=None)
    with pytest.raises(ConfigError, match=r"data file 'd.jsonl' .*changed") as info:
        check_unchanged(data_identity(saved_report), data_identity(swapped_report), where="ckpt")
    assert "\n" not in str(info.value)


def test_file_digest_streams_in_chunks(tmp_path):
    import hashlib

    from jaxdpo.data.identity import file_digest

    blob = np.random.default_rng(0).bytes(3 * 1024 * 1024 + 17)
    (tmp_path / "big.bin").write_bytes(blob)
    assert file_digest(str(tmp_path / "big.bin"), chunk_bytes=1 << 20) == hashlib.sha256(blob).hexdigest()


# ------------------------------------------------------------------------------ damaged cache entries
@pytest.mark.parametrize("how", ["empty", "truncated", "bad_crc"])
def test_a_damaged_tokenized_entry_is_reported_and_rebuilt(tmp_path, tokenizer, how):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    cfg = data_config(train_files=path, eval_files="", use_cache=True, cache_dir=str(tmp_path / "cache"))
    first, _, _ = load_preference_data(cfg, tokenizer, log=None)
    (entry,) = [os.path.join(r, n) for r, _, ns in os.walk(tmp_path / "cache") for n in ns if n.endswith(".npz")]
    damage(entry, how)
    lines = []
    again, _, report = load_preference_data(cfg, tokenizer, log=lines.append)
    assert not report["train"]["sources"][0]["cached"]
    assert [list(p) for p in again.chosen_ids] == [list(p) for p in first.chosen_ids]
    (line,) = [line for line in lines if "is damaged" in line]
    assert entry in line and "\n" not in line
    _, _, third = load_preference_data(cfg, tokenizer, log=None)
    assert third["train"]["sources"][0]["cached"]  # rebuilt


@pytest.mark.parametrize("how", ["empty", "truncated", "bad_crc"])
def test_a_damaged_reference_entry_reads_as_missing(tmp_path, how):
    path = str(tmp_path / "ref.npz")
    values = np.arange(1000, dtype=np.float32)
    reference_cache.save(path, values, -values, {"k": 1})
    assert reference_cache.load(path, 1000)[0][7] == 7
    damage(path, how)
    problems = []
    assert reference_cache.load(path, 1000, on_damage=problems.append) is None
    assert len(problems) == 1 and path in problems[0]


# ------------------------------------------------------------------------------ prompt_key
def test_a_prompt_key_naming_no_column_is_an_error(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    with pytest.raises(ConfigError, match=r"d\.jsonl.*data\.prompt_key='question'"):
        load_preference_data(data_config(train_files=path, prompt_key="question"), tokenizer, log=None)
    hh = write_jsonl(tmp_path / "hh.jsonl", [{"chosen": "Human: hi Assistant: hello", "rejected":
                                              "Human: hi Assistant: go away"}])
    train, _, _ = load_preference_data(data_config(train_files=hh), tokenizer, log=None)  # default key: implicit
    assert len(train) == 1


# ------------------------------------------------------------------------------ CSV cells
def test_csv_cells_are_message_lists_only_when_they_are(tmp_path):
    messages = json.dumps([{"role": "assistant", "content": "4"}]).replace('"', '""')
    (tmp_path / "c.csv").write_text('prompt,chosen,rejected\n'
                                    f'"[2, 3, 5]","{messages}",5\n'
                                    '"{""a"": 1}","[not json","[1]"\n')
    first, second = load_rows(str(tmp_path / "c.csv"))
    assert first.data == {"prompt": "[2, 3, 5]", "chosen": [{"role": "assistant", "content": "4"}], "rejected": "5"}
    assert first.error is None
    # the chosen column holds conversations, so a cell there that is not one is a bad row
    assert second.error == "wrong_type" and "chosen" in second.detail


def test_csv_numbers_in_brackets_train_as_text(tmp_path, tokenizer):
    (tmp_path / "c.csv").write_text('prompt,chosen,rejected\nNext primes?,"[2, 3, 5]","[4, 6]"\n')
    train, _, _ = load_preference_data(data_config(train_files=str(tmp_path / "c.csv")), tokenizer, log=None)
    assert len(train) == 1


# ------------------------------------------------------------------------------ BOS of an empty prompt
def test_empty_conversational_prompt_gets_bos_once(tokenizer):
    spec = make_spec(tokenizer)  # its template starts with {{ bos_token }}
    pair = normalize_row({"prompt": [], "chosen": [{"role": "assistant", "content": "hello"}],
                          "rejected": [{"role": "assistant", "content": "no"}]})
    prompt, chosen, rejected, _ = tokenize_pair(spec, pair)
    ids = list(prompt) + list(chosen)
    assert ids.count(spec.bos_id) == 1 and prompt[0] == spec.bos_id
    assert spec.bos_id not in chosen and spec.bos_id not in rejected


# ------------------------------------------------------------------------------ rows tokenized as TRL 1.x
def trl_tokenized(tokenizer, row: dict, output_dir) -> tuple[list[int], list[int], list[int]]:
    """The prompt, chosen and rejected ids TRL 1.16's DPOTrainer trains on for `row`: a trainer is built on
    a one-layer random Llama (tokenizing happens in its constructor) and its train dataset is read back."""
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import DPOConfig, DPOTrainer

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    args = DPOConfig(output_dir=str(output_dir), report_to=[], use_cpu=True, bf16=False, save_strategy="no",
                     max_length=None)
    trainer = DPOTrainer(model=LlamaForCausalLM(config), ref_model=LlamaForCausalLM(config), args=args,
                         train_dataset=Dataset.from_list([row]), processing_class=tokenizer)
    (tokenized,) = trainer.train_dataset
    return tokenized["prompt_ids"], tokenized["chosen_ids"], tokenized["rejected_ids"]


def assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


@pytest.mark.parametrize("add_bos", [True, False])
@pytest.mark.parametrize("row", [
    {"prompt": "What color is the sky? ", "chosen": "The sky is blue.", "rejected": "The cat sat."},
    {"prompt": "What color is the sky?", "chosen": " The sky is blue.", "rejected": " The cat sat.<eos>"},
    {"prompt": "2+2=", "chosen": "4", "rejected": "5"},
    {"prompt": "Paris is the capital of Fr", "chosen": "ance.", "rejected": "ench fries."},
    {"prompt": [{"role": "user", "content": "What color is the sky?"}],
     "chosen": assistant("The sky is blue."), "rejected": assistant("The cat sat.")},
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2="},
                {"role": "assistant", "content": "4"}, {"role": "user", "content": "Where is Paris?"}],
     "chosen": assistant("Paris is in France."), "rejected": assistant("On the mat.")},
])
def test_rows_tokenize_as_trl(row, add_bos, tmp_path):
    tokenizer = make_tokenizer(add_bos=add_bos, corpus=TRL_CORPUS)
    prompt, chosen, rejected, _ = tokenize_pair(make_spec(tokenizer), normalize_row(row))
    assert (list(prompt), list(chosen), list(rejected)) == trl_tokenized(tokenizer, row, tmp_path)


def test_a_prompt_ending_in_a_space_keeps_the_space_on_the_completion():
    tokenizer = make_tokenizer(corpus=TRL_CORPUS)
    spec = make_spec(tokenizer)
    prompt, chosen, _, _ = tokenize_pair(spec, normalize_row(
        {"prompt": "What color is the sky? ", "chosen": "The sky is blue.", "rejected": "The cat sat."}))
    tokens = tokenizer.convert_ids_to_tokens
    assert tokens(list(prompt))[-1] == "?" and tokens(list(chosen))[0] == "ĠThe"


# ------------------------------------------------------------------------------ fewer pairs than a batch
def test_fewer_pairs_than_one_batch_names_the_key_and_the_file(tmp_path, tokenizer):
    from jaxdpo.data import require_full_batch

    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    train, _, _ = load_preference_data(data_config(train_files=path, eval_files=""), tokenizer, log=None)
    batcher = PairBatcher(train, layout="padded", row_length=64, batch_size=8, micro_batch_size=8, seed=0)
    with pytest.raises(ConfigError, match=r"train\.batch_size=8.*3 pairs.*d\.jsonl") as info:
        require_full_batch(batcher)
    assert "\n" not in str(info.value)
