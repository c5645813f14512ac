"""Preference data: layouts (exact arrays), their agreement, the batcher, tokenization and loading."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from jaxdpo.config import ConfigError
from jaxdpo.data import PairBatcher, load_preference_data, make_batch, row_length
from jaxdpo.data.formats import BadRow, normalize_row
from jaxdpo.data.loading import load_rows
from jaxdpo.data.tokenize import make_spec, tokenize_pair, truncate
from tests.data_helpers import data_config, make_tokenizer, visible_contexts


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


# ---------------------------------------------------------------------------------------------- layouts
PAIR_A = ([1, 10, 11], [20, 21, 2], [30, 2])  # prompt, chosen, rejected (2 = EOS)
PAIR_B = ([1, 12], [22, 2], [31, 32, 33, 2])


def test_padded_layout_exact():
    b = make_batch([PAIR_A], layout="padded", row_length=8, num_pairs=2, pad_id=0)
    assert {k: v.shape for k, v in b.items()} == {**{k: (4, 8) for k in (
        "input_ids", "positions", "segment_ids", "branch_ids", "targets", "pair_index", "side")}, "pair_valid": (2,)}
    np.testing.assert_array_equal(b["input_ids"][0], [1, 10, 11, 20, 21, 2, 0, 0])
    np.testing.assert_array_equal(b["input_ids"][2], [1, 10, 11, 30, 2, 0, 0, 0])  # rejected rows follow
    np.testing.assert_array_equal(b["positions"][0], [0, 1, 2, 3, 4, 5, 0, 0])
    np.testing.assert_array_equal(b["segment_ids"][2], [1, 1, 1, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(b["branch_ids"][0], [0, 0, 0, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(b["branch_ids"][2], [0, 0, 0, 2, 2, 0, 0, 0])
    np.testing.assert_array_equal(b["targets"][0], [10, 11, 20, 21, 2, 0, 0, 0])
    np.testing.assert_array_equal(b["pair_index"][0], [-1, -1, 0, 0, 0, -1, -1, -1])
    np.testing.assert_array_equal(b["side"][0], [0, 0, 1, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(b["side"][2], [0, 0, 2, 2, 0, 0, 0, 0])
    np.testing.assert_array_equal(b["pair_valid"], [1, 0])
    assert (b["segment_ids"][[1, 3]] == 0).all() and (b["pair_index"][[1, 3]] == -1).all()


def test_prefix_shared_layout_exact():
    b = make_batch([PAIR_A], layout="prefix_shared", row_length=10, num_pairs=1)
    # prompt[:-1] | prompt[-1] + chosen | prompt[-1] + rejected
    np.testing.assert_array_equal(b["input_ids"][0], [1, 10, 11, 20, 21, 2, 11, 30, 2, 0])
    np.testing.assert_array_equal(b["positions"][0], [0, 1, 2, 3, 4, 5, 2, 3, 4, 0])
    np.testing.assert_array_equal(b["branch_ids"][0], [0, 0, 1, 1, 1, 1, 2, 2, 2, 0])
    np.testing.assert_array_equal(b["segment_ids"][0], [1, 1, 1, 1, 1, 1, 1, 1, 1, 0])
    np.testing.assert_array_equal(b["targets"][0], [10, 11, 20, 21, 2, 0, 30, 2, 0, 0])
    np.testing.assert_array_equal(b["pair_index"][0], [-1, -1, 0, 0, 0, -1, 0, 0, -1, -1])
    np.testing.assert_array_equal(b["side"][0], [0, 0, 1, 1, 1, 0, 2, 2, 0, 0])


def test_packed_layout_exact():
    # lengths (P+C+R+1): A = 9, B = 9, C = 5; row 12 -> FFD puts A alone, B alone + C? 9+5 > 12: three rows,
    # rounded up to row_multiple=2 -> 4 rows. With row 14: [A, C], [B].
    pair_c = ([1], [40, 2], [41])
    b = make_batch([PAIR_A, PAIR_B, pair_c], layout="packed", row_length=14, num_pairs=4, row_multiple=1)
    assert b["input_ids"].shape == (2, 14)
    np.testing.assert_array_equal(b["input_ids"][0], [1, 10, 11, 20, 21, 2, 11, 30, 2, 1, 40, 2, 1, 41])
    np.testing.assert_array_equal(b["segment_ids"][0], [1] * 9 + [2] * 5)
    np.testing.assert_array_equal(b["positions"][0], [0, 1, 2, 3, 4, 5, 2, 3, 4, 0, 1, 2, 0, 1])
    np.testing.assert_array_equal(b["branch_ids"][0], [0, 0, 1, 1, 1, 1, 2, 2, 2, 1, 1, 1, 2, 2])
    np.testing.assert_array_equal(b["pair_index"][0], [-1, -1, 0, 0, 0, -1, 0, 0, -1, 2, 2, -1, 2, -1])
    np.testing.assert_array_equal(b["side"][0], [0, 0, 1, 1, 1, 0, 2, 2, 0, 1, 1, 0, 2, 0])
    np.testing.assert_array_equal(b["input_ids"][1, :9], [1, 12, 22, 2, 12, 31, 32, 33, 2])
    np.testing.assert_array_equal(b["pair_index"][1, :9], [-1, 1, 1, -1, 1, 1, 1, 1, -1])
    np.testing.assert_array_equal(b["pair_valid"], [1, 1, 1, 0])
    b = make_batch([PAIR_A, PAIR_B, pair_c], layout="packed", row_length=12, num_pairs=3, row_multiple=2)
    assert b["input_ids"].shape == (4, 12)
    assert (b["segment_ids"][3] == 0).all()


def random_pairs(n: int, seed: int, max_len: int = 6):
    rng = np.random.default_rng(seed)
    return [tuple(rng.integers(3, 300, size=rng.integers(1, max_len + 1)) for _ in range(3)) for _ in range(n)]


def test_layouts_agree_on_what_each_pair_sees():
    pairs = random_pairs(7, seed=3)
    cfg = data_config(max_length=12)
    results = []
    for layout in ("padded", "prefix_shared", "packed"):
        t = row_length(pairs, layout, cfg)
        b = make_batch(pairs, layout=layout, row_length=t, num_pairs=8, row_multiple=2)
        results.append(visible_contexts(b))
    assert results[0] == results[1] == results[2]
    assert sorted(results[0]) == [(p, s) for p in range(7) for s in (1, 2)]
    # scored tokens per side are the completion lengths
    for p, (_, c, r) in enumerate(pairs):
        assert sum(results[0][(p, 1)].values()) == len(c) and sum(results[0][(p, 2)].values()) == len(r)


def test_row_length():
    pairs = [PAIR_A, PAIR_B]  # P+C+R+1 = 9 for both
    cfg = data_config(max_length=8)
    assert row_length(pairs, "padded", cfg) == 8
    assert row_length(pairs, "prefix_shared", cfg) == 16
    assert row_length(pairs, "packed", cfg) == 16
    cfg.pack_length = 40
    assert row_length(pairs, "packed", cfg) == 40
    cfg.pack_length = 8
    with pytest.raises(ConfigError, match="pack_length"):
        row_length(pairs, "packed", cfg)


# ---------------------------------------------------------------------------------------------- batcher
def test_batcher_deterministic_and_covers_epoch():
    pairs = random_pairs(20, seed=0)
    make = lambda **kw: PairBatcher(pairs, layout="padded", row_length=12, batch_size=8, micro_batch_size=4,
                                    seed=5, **kw)
    batcher = make()
    assert batcher.steps_per_epoch == 2
    first = batcher.train_batch(3)
    assert len(first) == 2 and first[0]["input_ids"].shape == (8, 12)
    again = make().train_batch(3)  # a fresh batcher (a resumed run) gives the same data
    for x, y in zip(first, again):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    epoch0 = np.concatenate([batcher.step_indices(s) for s in range(2)])
    assert len(set(epoch0.tolist())) == 16
    assert not np.array_equal(batcher.step_indices(0), batcher.step_indices(2))  # epoch 1 reshuffles
    np.testing.assert_array_equal(make(shuffle=False).step_indices(1), np.arange(8, 16))


@pytest.mark.parametrize("layout", ["padded", "prefix_shared", "packed"])
def test_batcher_process_slices_make_the_global_batch(layout):
    pairs = random_pairs(24, seed=1)
    t = row_length(pairs, layout, data_config(max_length=12))
    full = PairBatcher(pairs, layout=layout, row_length=t, batch_size=12, micro_batch_size=6, seed=1)
    parts = [PairBatcher(pairs, layout=layout, row_length=t, batch_size=12, micro_batch_size=6, seed=1,
                         process_index=i, process_count=3, row_multiple=2) for i in range(3)]
    for micro in range(2):
        want = visible_contexts(full.train_batch(4)[micro])
        got = {}
        shapes = set()
        for i, part in enumerate(parts):
            b = part.train_batch(4)[micro]
            shapes.add(b["input_ids"].shape)
            assert b["pair_valid"].tolist() == [1, 1]
            got.update({(p + 2 * i, s): v for (p, s), v in visible_contexts(b).items()})
        assert got == want
        assert len(shapes) == 1  # every process builds the same shape, even packed
    for part in parts:  # the micro-batches of one step stack (one shape), even packed
        assert len({m["input_ids"].shape for m in part.train_batch(4)}) == 1


def test_eval_batches_cover_every_pair_once():
    pairs = random_pairs(10, seed=2)
    batcher = PairBatcher(pairs, layout="prefix_shared", row_length=24, batch_size=4, micro_batch_size=4, seed=0)
    batches = list(batcher.eval_batches())
    assert len(batches) == 3 == batcher.num_eval_batches()
    assert [b["pair_valid"].tolist() for b in batches] == [[1] * 4, [1] * 4, [1, 1, 0, 0]]
    np.testing.assert_array_equal(batches[2]["input_ids"][0, :len(pairs[8][0]) - 1], pairs[8][0][:-1])


def test_batcher_rejects_uneven_shards():
    with pytest.raises(ConfigError, match="micro_batch_size"):
        PairBatcher(random_pairs(8, 0), layout="padded", row_length=8, batch_size=8, micro_batch_size=3, seed=0)
    with pytest.raises(ConfigError, match="batch shards"):
        PairBatcher(random_pairs(8, 0), layout="prefix_shared", row_length=8, batch_size=6, micro_batch_size=3,
                    seed=0, row_multiple=2)


# ---------------------------------------------------------------------------------------------- formats
def test_normalize_explicit_and_implicit():
    p = normalize_row({"prompt": "2+2=", "chosen": "4", "rejected": "5"})
    assert (p.prompt, p.chosen, p.rejected, p.conversational) == ("2+2=", "4", "5", False)
    hh = normalize_row({"chosen": "\n\nHuman: hi\n\nAssistant: I can help.",
                        "rejected": "\n\nHuman: hi\n\nAssistant: I won't."})
    assert (hh.prompt, hh.chosen, hh.rejected) == ("\n\nHuman: hi\n\nAssistant:", " I can help.", " I won't.")
    plain = normalize_row({"chosen": "The sky is blue", "rejected": "The sky is green"})
    assert (plain.prompt, plain.chosen, plain.rejected) == ("The sky is", " blue", " green")
    word = normalize_row({"chosen": "The cat sat", "rejected": "The car sat"})
    assert (word.prompt, word.chosen, word.rejected) == ("The", " cat sat", " car sat")
    nothing_shared = normalize_row({"chosen": "Yes", "rejected": "No"})
    assert (nothing_shared.prompt, nothing_shared.chosen, nothing_shared.rejected) == ("", "Yes", "No")
    user = {"role": "user", "content": "hi"}
    conv = normalize_row({"chosen": [user, {"role": "assistant", "content": "hello"}],
                          "rejected": [user, {"role": "assistant", "content": "go"}]})
    assert conv.prompt == [user] and conv.chosen == [{"role": "assistant", "content": "hello"}]
    uf = normalize_row({"prompt": "hi", "chosen": [user, {"role": "assistant", "content": "a"}],
                        "rejected": [user, {"role": "assistant", "content": "b"}]})
    assert uf.prompt == [user] and uf.rejected == [{"role": "assistant", "content": "b"}]


@pytest.mark.parametrize("row, reason, key", [
    ({"prompt": "q", "chosen": "a"}, "missing_key", "rejected"),
    ({"prompt": "q", "chosen": 3, "rejected": "b"}, "wrong_type", "chosen"),
    ({"prompt": "q", "chosen": " ", "rejected": "b"}, "empty_completion", "chosen"),
    ({"prompt": "q", "chosen": "a", "rejected": "a"}, "identical_completions", "rejected"),
    ({"prompt": "q", "chosen": [{"role": "robot", "content": "a"}], "rejected": "b"}, "unknown_role", "chosen"),
    ({"prompt": "q", "chosen": "a\ud800", "rejected": "b"}, "undecodable_text", "chosen"),
])
def test_normalize_bad_rows(row, reason, key):
    with pytest.raises(BadRow) as info:
        normalize_row(row)
    assert (info.value.reason, info.value.key) == (reason, key)


# ---------------------------------------------------------------------------------------------- tokenize
def test_tokenize_standard_bos_once_eos_once(tokenizer):
    spec = make_spec(tokenizer)
    assert (spec.bos_id, spec.eos_id, spec.adds_bos) == (1, 2, True)
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]
    p, c, r, mismatch = tokenize_pair(spec, normalize_row({"prompt": "2+2=", "chosen": "4", "rejected": "5<eos>"}))
    assert p == [1] + enc("2+2=") and c == enc("4") + [2] and r == enc("5") + [2] and mismatch == 0
    p2, *_ = tokenize_pair(spec, normalize_row({"prompt": "<bos>2+2=", "chosen": "4", "rejected": "5"}))
    assert p2 == p  # BOS never doubled


def test_tokenize_conversation(tokenizer):
    spec = make_spec(tokenizer)
    user = {"role": "user", "content": "hi"}
    pair = normalize_row({"prompt": [{"role": "system", "content": "be kind"}, user],
                          "chosen": [{"role": "assistant", "content": "hello"}],
                          "rejected": [{"role": "assistant", "content": "no"}]})
    p, c, r, mismatch = tokenize_pair(spec, pair)
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]
    assert p == enc("<bos><|system|>be kind<|end|><|user|>hi<|end|><|assistant|>")
    assert p[0] == 1 and p[-1] == 5 and p.count(1) == 1
    assert c == enc("hello") + [6] and r == enc("no") + [6] and mismatch == 0


def test_prefix_mismatch_is_counted_and_handled(tokenizer):
    # A generation prompt that ends inside a word ("Th"): BPE merges "The" once the answer follows, so
    # the prompt ids are not a prefix of the conversation ids; the completion is then the text after
    # the rendered prompt, tokenized on its own.
    template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>Th{% endif %}")
    spec = make_spec(tokenizer, template)
    pair = normalize_row({"prompt": [{"role": "user", "content": "hi"}],
                          "chosen": [{"role": "assistant", "content": "The cat"}],
                          "rejected": [{"role": "assistant", "content": "The sky"}]})
    p, c, r, mismatch = tokenize_pair(spec, pair)
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]
    full = enc("<|user|>hi<|assistant|>The cat")
    assert full[:len(p)] != p and mismatch == 2
    assert p == enc("<|user|>hi<|assistant|>Th") and c == enc("e cat") and r == enc("e sky")


def test_truncation_modes():
    prompt, chosen, rejected = [1, 10, 11, 12, 13], [20, 21, 22, 2], [30, 2]
    kw = dict(max_length=6, max_prompt_length=3, bos_id=1)
    assert truncate(prompt, chosen, rejected, truncation="keep_end", **kw) == ([1, 12, 13], [20, 21, 22], [30, 2])
    assert truncate(prompt, chosen, rejected, truncation="keep_start", **kw) == ([1, 10, 11], [20, 21, 22], [30, 2])
    assert truncate(prompt, chosen, rejected, truncation="keep_end", max_length=3, max_prompt_length=3,
                    bos_id=1) is None


# ---------------------------------------------------------------------------------------------- loading
ROWS = [{"prompt": "2+2=", "chosen": "4", "rejected": "5"}, {"prompt": "sky?", "chosen": "blue", "rejected": "red"}]


def test_load_every_file_kind(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (tmp_path / "b.json").write_text(json.dumps(ROWS))
    (tmp_path / "c.json").write_text(json.dumps({"data": ROWS}))
    (tmp_path / "d.csv").write_text("prompt,chosen,rejected\n2+2=,4,5\nsky?,blue,red\n")
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "e.parquet")
    with pa.OSFile(str(tmp_path / "f.arrow"), "wb") as sink, pa.ipc.new_stream(sink, pa.Table.from_pylist(ROWS).schema) as w:
        w.write_table(pa.Table.from_pylist(ROWS))
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    for spec in ["a.jsonl", "b.json", "c.json", "d.csv", "e.parquet", "f.arrow", "saved"]:
        rows = load_rows(str(tmp_path / spec))
        assert [r.data for r in rows] == ROWS, spec
        assert [r.row for r in rows] == [1, 2]
    both = load_rows(f"{tmp_path}/a.jsonl, {tmp_path}/*.parquet")
    assert [(os.path.basename(r.file), r.row) for r in both] == [("a.jsonl", 1), ("a.jsonl", 2),
                                                                  ("e.parquet", 1), ("e.parquet", 2)]
    with pytest.raises(ConfigError, match="does not exist"):
        load_rows(str(tmp_path / "missing.jsonl"))


def test_load_preference_data_end_to_end(tmp_path, tokenizer):
    rows = [{"prompt": f"What is {i}+{i}?", "chosen": f"It is {2 * i}.", "rejected": "No idea."} for i in range(10)]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = data_config(train_files=str(path), eval_files="", eval_fraction=0.2)
    train, evals, report = load_preference_data(cfg, tokenizer, workdir=str(tmp_path / "run"), seed=0)
    assert (len(train), len(evals)) == (8, 2)
    assert sorted(train.source + evals.source) == [(str(path), i) for i in range(1, 11)]
    assert report["train"]["rows"] == 10 and report["eval"]["kept"] == 2
    assert json.loads((tmp_path / "run" / "data_report.json").read_text()) == report
    p, c, r = train[0]
    assert p[0] == 1 and c[-1] == 2 and r[-1] == 2 and p.dtype == np.int32
    again, evals2, _ = load_preference_data(cfg, tokenizer, seed=0)
    assert again.source == train.source and evals2.source == evals.source


def test_eval_batches_per_process():
    pairs = random_pairs(5, seed=4)
    got = []
    for i in range(2):
        b = PairBatcher(pairs, layout="padded", row_length=16, batch_size=4, micro_batch_size=4, seed=0,
                        process_index=i, process_count=2, row_multiple=2)
        got.append([(x["pair_valid"].tolist(), x["input_ids"][:2, 0].tolist()) for x in b.eval_batches()])
    first = lambda p: int(pairs[p][0][0])
    assert got[0] == [([1, 1], [first(0), first(1)]), ([1, 0], [first(4), 0])]
    assert got[1] == [([1, 1], [first(2), first(3)]), ([0, 0], [0, 0])]


def test_sources_and_hub_names(tmp_path):
    from jaxdpo.data.loading import Source, is_hub_name, parse_sources

    assert parse_sources("a.jsonl@0.7, b.jsonl@0.3") == [Source("a.jsonl", 0.7), Source("b.jsonl", 0.3)]
    assert parse_sources("data@v2.jsonl") == [Source("data@v2.jsonl")]  # an '@' in a file name is no weight
    with pytest.raises(ConfigError, match="weights must be > 0"):
        parse_sources("a.jsonl@0")
    assert is_hub_name("Anthropic/hh-rlhf") and is_hub_name("trl-lib/ultrafeedback_binarized:default:test")
    assert is_hub_name("hf:imdb") and not is_hub_name("data/train.jsonl") and not is_hub_name("data/*.jsonl")
    (tmp_path / "owner").mkdir()
    (tmp_path / "owner" / "x.jsonl").write_text(json.dumps(ROWS[0]) + "\n")
    assert not is_hub_name(str(tmp_path / "owner"))  # an existing local path always wins


def test_csv_cells_holding_conversations(tmp_path):
    messages = json.dumps([{"role": "assistant", "content": "4"}]).replace('"', '""')
    (tmp_path / "c.csv").write_text(f'prompt,chosen,rejected\n2+2=,"{messages}",5\n')
    (row,) = load_rows(str(tmp_path / "c.csv"))
    assert row.data == {"prompt": "2+2=", "chosen": [{"role": "assistant", "content": "4"}], "rejected": "5"}


def test_packed_micro_batches_of_a_step_share_one_shape():
    short, long = ([1], [40, 2], [41]), PAIR_A  # 5 and 9 tokens
    batcher = PairBatcher([short, short, long, long], layout="packed", row_length=10, batch_size=4,
                          micro_batch_size=2, seed=0, shuffle=False)
    first, second = batcher.train_batch(0)
    assert first["input_ids"].shape == second["input_ids"].shape == (2, 10)  # alone, the first needs 1 row
    np.testing.assert_array_equal(first["segment_ids"], [[1] * 5 + [2] * 5, [0] * 10])
    assert [b["input_ids"].shape[0] for b in batcher.eval_batches()] == [1, 2]  # eval batches are not stacked
