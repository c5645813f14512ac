"""The bundled demo assets (assets/demo) load with transformers and their data is well formed."""

import json
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "assets", "demo")
MODEL_DIR = os.path.join(DEMO, "model")
TRAIN = os.path.join(DEMO, "data", "train.jsonl")
EVAL = os.path.join(DEMO, "data", "eval.jsonl")


def read_jsonl(path):
    rows = []
    with open(path) as f:
        for line_number, line in enumerate(f, 1):
            assert line.strip(), f"{path}:{line_number} is blank"
            rows.append(json.loads(line))
    return rows


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MODEL_DIR)


def test_data_files_have_the_three_string_keys():
    for path, (low, high) in ((TRAIN, (2000, 4000)), (EVAL, (200, 300))):
        rows = read_jsonl(path)
        assert low <= len(rows) <= high, f"{path}: {len(rows)} rows"
        for i, row in enumerate(rows):
            assert set(row) == {"prompt", "chosen", "rejected"}, f"{path} row {i}: {sorted(row)}"
            assert all(isinstance(row[k], str) and row[k] for k in row), f"{path} row {i}"
            assert row["chosen"] != row["rejected"], f"{path} row {i}: chosen == rejected"


def test_eval_prompts_are_held_out():
    train_prompts = {row["prompt"] for row in read_jsonl(TRAIN)}
    eval_prompts = [row["prompt"] for row in read_jsonl(EVAL)]
    assert not train_prompts & set(eval_prompts)
    # Not just new wrappers around a train question: the question itself (after the greeting
    # prefix and polite suffix) is new too.
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import make_demo_assets

    def core(prompt):
        for prefix in sorted(make_demo_assets.PROMPT_PREFIXES, key=len, reverse=True):
            if prefix and prompt.startswith(prefix):
                prompt = prompt[len(prefix):]
                break
        for suffix in sorted(make_demo_assets.PROMPT_SUFFIXES, key=len, reverse=True):
            if suffix and prompt.endswith(suffix):
                prompt = prompt[:-len(suffix)]
                break
        return prompt

    train_cores = {core(p) for p in train_prompts}
    assert not train_cores & {core(p) for p in eval_prompts}


def test_tokenizer_special_tokens_and_chat_template(tokenizer):
    assert tokenizer.bos_token == "<|bos|>" and tokenizer.eos_token == "<|eos|>"
    assert tokenizer.pad_token == "<|pad|>"
    assert len({tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}) == 3
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What color is snow?"}],
                                           add_generation_prompt=True, tokenize=False)
    assert prompt == "<|bos|><|user|>\nWhat color is snow?\n<|assistant|>\n"
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    # The trainer tokenizes prompt and completion apart; the completion ends in EOS and the
    # rendered full conversation is exactly prompt + response + EOS (+ a newline).
    full = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What color is snow?"},
         {"role": "assistant", "content": "Snow is white."}], tokenize=False)
    assert full == prompt + "Snow is white.<|eos|>\n"
    completion = tokenizer("Snow is white.", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(completion) == "Snow is white."
    assert tokenizer.eos_token_id not in completion


def test_model_loads_and_prefers_the_trained_format(tokenizer):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with open(os.path.join(MODEL_DIR, "config.json")) as f:
        raw_config = json.load(f)
    # transformers 5 format, which jaxdpo's importer reads.
    assert "rope_parameters" in raw_config and raw_config["dtype"] == "float32"
    assert raw_config["model_type"] == "llama"
    assert raw_config["vocab_size"] >= len(tokenizer)
    assert os.path.exists(os.path.join(MODEL_DIR, "model.safetensors"))
    total_bytes = sum(os.path.getsize(os.path.join(root, name))
                      for root, _, names in os.walk(DEMO) for name in names)
    assert total_bytes < 10 * 2**20, f"demo assets are {total_bytes / 2**20:.1f} MiB"

    config = AutoConfig.from_pretrained(MODEL_DIR)
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()
    assert config.num_hidden_layers == model.config.num_hidden_layers
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Anna lives in Oslo. Where does Anna live?"}],
        add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]

    def completion_logprob(text):
        completion = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = torch.tensor([prompt_ids + completion])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(input_ids=ids).logits[0, :-1], -1)
        targets = ids[0, 1:]
        per_token = logprobs.gather(-1, targets[:, None])[:, 0]
        return per_token[len(prompt_ids) - 1:].sum().item()

    # The SFT taught the answer format: an in-format answer is far likelier than word salad.
    in_format = completion_logprob("Anna lives in Oslo.")
    salad = completion_logprob("Oslo Oslo in lives Anna.")
    assert in_format > salad + 5.0, (in_format, salad)
    assert in_format > -10.0, in_format


def test_addition_prompts_are_the_tools_output_and_held_out_by_pair_of_numbers():
    """assets/online_addition is what tools/make_addition_prompts.py writes, and no pair of numbers {a, b} of
    a held-out prompt is asked in training, in either order (the judge's reading of the prompts)."""
    from jaxdpo.judging.rules import asked_operands
    from tools.make_addition_prompts import split_prompts

    folder = os.path.join(REPO, "assets", "online_addition")
    train_rows, eval_rows = split_prompts()
    assert read_jsonl(os.path.join(folder, "prompts.jsonl")) == train_rows
    assert read_jsonl(os.path.join(folder, "eval_prompts.jsonl")) == eval_rows
    train_pairs = {frozenset(asked_operands(row["prompt"])) for row in train_rows}
    eval_pairs = [frozenset(asked_operands(row["prompt"])) for row in eval_rows]
    assert len(train_pairs) == len(train_rows) == 1024 and len(set(eval_pairs)) == len(eval_rows) == 128
    assert not train_pairs & set(eval_pairs)
