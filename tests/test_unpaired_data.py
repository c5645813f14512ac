"""Unpaired rows (TRL's {prompt, completion, label} format): reading plain-text and conversational rows,
a paired file unpaired in TRL's row order, KTO's KL completions formed as TRL forms them, the batch they
make in every layout, and bad input (missing or non-boolean labels, files mixing shapes, one class only)."""

from __future__ import annotations

import numpy as np
import pytest

from jaxdpo.config import ConfigError
from jaxdpo.data import ExampleKind, PairBatcher, UnpairedExamples, load_preference_data
from jaxdpo.data.examples import kl_partners, pairs_of_origin
from jaxdpo.data.formats import UNPAIR_CHUNK, unpair_order
from tests.data_helpers import data_config, make_tokenizer, write_jsonl

UNPAIRED = ExampleKind.UNPAIRED
PAIRS = [{"prompt": "What color is the sky?", "chosen": "The sky is blue.", "rejected": "The cat sat."},
         {"prompt": "2+2=", "chosen": "4", "rejected": "5"},
         {"prompt": "Where is Paris?", "chosen": "Paris is in France.", "rejected": "On the mat."}]
ROWS = [{"prompt": "What color is the sky?", "completion": "The sky is blue.", "label": True},
        {"prompt": "2+2=", "completion": "5", "label": False},
        {"prompt": [{"role": "user", "content": "Where is Paris?"}],
         "completion": [{"role": "assistant", "content": "In France."}], "label": True}]


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def load(tokenizer, path, **overrides):
    return load_preference_data(data_config(train_files=path, eval_files="", **overrides), tokenizer, log=None,
                                kind=UNPAIRED)


def test_unpaired_rows_plain_and_conversational_keep_order_label_and_source(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "u.jsonl", ROWS)
    rows, _, report = load(tokenizer, path)
    assert rows.labels == [True, False, True]
    assert rows.source == [(path, 1), (path, 2), (path, 3)]
    assert (report["train"]["examples"], report["train"]["examples_are"]) == (3, "unpaired rows")
    # a plain-text row is tokenized as TRL's KTOTrainer does: prompt + completion + EOS, whole
    assert tokenizer.decode(np.concatenate([rows.prompt_ids[1], rows.completion_ids[1]])) == "<bos>2+2=5<eos>"
    # a conversational row through the chat template, the completion after the generation prompt
    assert tokenizer.decode(rows.completion_ids[2]) == "In France.<|end|>"


def test_a_paired_file_is_unpaired_in_trls_row_order(tmp_path, tokenizer):
    from datasets import Dataset
    from trl.data_utils import unpair_preference_dataset

    pairs = [dict(prompt=f"q{i}?", chosen=f"yes {i}", rejected=f"no {i}") for i in range(UNPAIR_CHUNK + 5)]
    trl = unpair_preference_dataset(Dataset.from_list(pairs))
    order = unpair_order(len(pairs))
    assert [(pairs[i]["prompt"], pairs[i]["chosen" if d else "rejected"], d) for i, d in order] == list(
        zip(trl["prompt"], trl["completion"], trl["label"]))

    path = write_jsonl(tmp_path / "p.jsonl", PAIRS)
    rows, _, _ = load(tokenizer, path)
    assert rows.labels == [True] * 3 + [False] * 3
    assert rows.source == [(path, r) for r in (1, 2, 3, 1, 2, 3)]  # both rows of a pair name its line
    assert pairs_of_origin(rows).tolist() == [[0, 3], [1, 4], [2, 5]]


def test_kl_partners_cycle_by_one_within_chunks_as_trl_does():
    from datasets import Dataset

    for n, chunk in ((7, 3), (8, 4), (5, 1), (4, 8)):
        trl = Dataset.from_dict({"c": list(range(n))}).map(
            lambda b: {"kl": [b["c"][-1]] + b["c"][:-1]}, batched=True, batch_size=chunk)
        assert kl_partners(n, chunk).tolist() == trl["kl"], (n, chunk)


def test_unpaired_examples_batch_in_every_layout_with_labels_and_kl_rows(tmp_path, tokenizer):
    rows, _, _ = load(tokenizer, write_jsonl(tmp_path / "u.jsonl", ROWS))
    with_kl = UnpairedExamples(rows, max_length=64, kl_chunk=3)
    prompt, own, kl = with_kl[1]
    assert np.array_equal(own, rows.completion_ids[1]) and np.array_equal(kl, rows.completion_ids[0])
    sums = {}
    for layout, length in (("padded", 64), ("prefix_shared", 96), ("packed", 96)):
        batcher = PairBatcher(with_kl, layout=layout, row_length=length, batch_size=3, micro_batch_size=3,
                              seed=0, shuffle=False)
        (batch,) = batcher.train_batch(0)
        assert batch["label"].tolist() == [1, 0, 1]
        scored = [(int((batch["pair_index"] == p)[batch["side"] == s].sum())) for p in range(3) for s in (1, 2)]
        sums[layout] = scored
    assert sums["padded"] == sums["prefix_shared"] == sums["packed"]
    assert sums["padded"][2:4] == [len(rows.completion_ids[1]), len(rows.completion_ids[0])]
    # without KL rows an example is one completion: one padded row each
    (single,) = PairBatcher(UnpairedExamples(rows, max_length=64, kl_chunk=None), layout="padded", row_length=64,
                            batch_size=3, micro_batch_size=3, seed=0, shuffle=False).train_batch(0)
    assert single["input_ids"].shape[0] == 3 and not (single["side"] == 2).any()


def test_shuffle_false_batches_follow_the_data_order(tmp_path, tokenizer):
    rows, _, _ = load(tokenizer, write_jsonl(tmp_path / "p.jsonl", PAIRS))
    batcher = PairBatcher(UnpairedExamples(rows, max_length=64, kl_chunk=2), layout="padded", row_length=64,
                          batch_size=2, micro_batch_size=2, seed=0, shuffle=False)
    assert [batcher.step_indices(s).tolist() for s in range(4)] == [[0, 1], [2, 3], [4, 5], [0, 1]]


@pytest.mark.parametrize("row, reason", [
    ({"prompt": "2+2=", "completion": "4"}, r"u\.jsonl, row 2, key 'label'.*missing_label"),
    ({"prompt": "2+2=", "completion": "4", "label": 1}, r"u\.jsonl, row 2, key 'label'.*wrong_label.*int 1"),
    ({"prompt": "2+2=", "completion": "4", "label": "true"}, r"row 2, key 'label'.*wrong_label.*str"),
])
def test_a_bad_label_is_one_line_naming_file_row_and_key_or_is_skipped_and_counted(tmp_path, tokenizer, row, reason):
    path = write_jsonl(tmp_path / "u.jsonl", [ROWS[0], row, ROWS[1]])
    with pytest.raises(ConfigError, match=reason) as info:
        load(tokenizer, path)
    assert "\n" not in str(info.value)
    rows, _, report = load(tokenizer, path, on_bad_row="skip")
    assert len(rows) == 2 and sum(report["train"]["dropped"].values()) == 1


def test_a_file_mixing_pairs_and_unpaired_rows_is_refused(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "m.jsonl", [PAIRS[0], ROWS[0]])
    with pytest.raises(ConfigError, match=r"m\.jsonl mixes pairs and unpaired rows: row 2 is unpaired"):
        load(tokenizer, path, on_bad_row="skip")


def test_unpaired_rows_need_both_labels_and_a_pair_loss_refuses_them(tmp_path, tokenizer):
    only_good = write_jsonl(tmp_path / "g.jsonl", [ROWS[0], ROWS[2]])
    with pytest.raises(ConfigError, match=r"g\.jsonl.*no undesirable \(label false\) row"):
        load(tokenizer, only_good)
    with pytest.raises(ConfigError, match=r"g\.jsonl, row 1 is an unpaired row.*takes pairs"):
        load_preference_data(data_config(train_files=only_good, eval_files=""), tokenizer, log=None)


def test_unpaired_rows_come_back_from_the_tokenized_cache(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "u.jsonl", ROWS)
    first, _, _ = load(tokenizer, path, use_cache=True, cache_dir=str(tmp_path / "cache"))
    again, _, report = load(tokenizer, path, use_cache=True, cache_dir=str(tmp_path / "cache"))
    assert report["train"]["sources"][0]["cached"]
    assert again.labels == first.labels and again.source == first.source
    assert all(np.array_equal(a, b) for a, b in zip(again.completion_ids, first.completion_ids))
