"""Tiny local stand-ins for a hub model, tokenizer and preference dataset (nothing is downloaded).

`make_run_assets(root)` writes `root/model` (a random Llama checkpoint in Hugging Face format with its
tokenizer and chat template) and `root/data/{train,eval}.jsonl`, and returns their paths.
"""

from __future__ import annotations

import json
import os
import random

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]

ANIMALS = ["cat", "dog", "owl", "fox", "bee", "cow", "hen", "elk", "yak", "ant"]
COLORS = ["red", "blue", "green", "black", "white", "pink", "gray", "gold"]


def preference_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        animal, color = rng.choice(ANIMALS), rng.choice(COLORS)
        prompt = f"What color is the {animal}?"
        rows.append({
            "prompt": prompt,
            "chosen": f"The {animal} is {color}. Glad to help!",
            "rejected": f"No idea, go away.{' ' + rng.choice(ANIMALS) if rng.random() < 0.5 else ''}",
        })
    return rows


def make_tokenizer(out_dir: str, corpus: list[str], vocab_size: int = 300):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    return fast


def make_llama(out_dir: str, tokenizer, *, hidden: int = 32, layers: int = 2, tie: bool = False, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, tie_word_embeddings=tie,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return model


def make_run_assets(root: str, *, n_train: int = 64, n_eval: int = 16) -> dict[str, str]:
    train, evals = preference_rows(n_train, seed=1), preference_rows(n_eval, seed=2)
    data_dir, model_dir = os.path.join(root, "data"), os.path.join(root, "model")
    os.makedirs(data_dir, exist_ok=True)
    for name, rows in (("train", train), ("eval", evals)):
        with open(os.path.join(data_dir, f"{name}.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    corpus = [r[k] for r in train for k in ("prompt", "chosen", "rejected")]
    tokenizer = make_tokenizer(model_dir, corpus)
    make_llama(model_dir, tokenizer)
    return {"model": model_dir, "train": os.path.join(data_dir, "train.jsonl"),
            "eval": os.path.join(data_dir, "eval.jsonl")}


def tiny_run_config(assets: dict[str, str], workdir: str, **overrides):
    """configs/dpo.py pointed at the tiny assets, small enough for a test; overrides use dotted keys."""
    from configs import dpo

    c = dpo.get_config()
    c.workdir = workdir
    c.model.path = assets["model"]
    c.data.train_files = assets["train"]
    c.data.eval_files = assets["eval"]
    c.data.max_length = 48
    c.data.max_prompt_length = 24
    c.data.cache_dir = os.path.join(workdir, "cache")
    c.train.batch_size = 8
    c.train.micro_batch_size = 8
    c.train.eval_batch_size = 8
    c.train.steps = 3
    c.train.log_every = 1
    c.train.eval_every = 100
    c.train.save_every = 100
    c.optim.warmup_steps = 1
    c.optim.lr = 1e-3
    return set_overrides(c, overrides)


def set_overrides(config, overrides: dict):
    """Apply {"train.steps": 3, ...} to a ConfigDict (dotted keys, as on the command line)."""
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config
