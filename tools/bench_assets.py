"""The synthetic workload of tools/bench.py: model shapes, a word-token tokenizer, a random model of a shape
in Hugging Face format (so jaxdpo and TRL train the same weights), and pairs or groups of word-token rows
with lengths drawn around given means."""

from __future__ import annotations

import random

SHAPES = {  # hidden, layers, heads, kv_heads, intermediate, vocab (+ family and tied embeddings)
    "llama-20m": dict(hidden=384, layers=6, heads=6, kv_heads=2, intermediate=1024, vocab=16000),
    "llama-tiny": dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=1000),
    "llama-150m": dict(hidden=768, layers=12, heads=12, kv_heads=4, intermediate=2048, vocab=32000),
    # Qwen2.5-0.5B's shape (q/k/v biases, tied embeddings, a 151,936-token vocabulary), random weights.
    "qwen2.5-0.5b": dict(hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864, vocab=151936,
                         family="qwen2", tie=True),
    # head_dim 64: the smallest heads whose o_proj contracted dim holds a quantization block (--base-dtypes)
    "llama-tiny-head64": dict(hidden=128, layers=2, heads=2, kv_heads=1, intermediate=256, vocab=96),
    "qwen2-tiny": dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=1000, family="qwen2",
                       tie=True),
}
SPECIALS = ["<pad>", "<s>", "</s>"]


def make_tokenizer(out_dir: str, vocab: int):
    """A word-level tokenizer: "w<i>" is token i + len(SPECIALS), so synthetic lengths are exact."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {tok: i for i, tok in enumerate(SPECIALS)}
    words.update({f"w{i}": i + len(SPECIALS) for i in range(vocab - len(SPECIALS))})
    tok = Tokenizer(models.WordLevel(words, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(out_dir)
    return fast


def make_model(out_dir: str, tokenizer, shape: dict, seed: int = 0) -> int:
    import torch
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    torch.manual_seed(seed)
    config_class, model_class = {"llama": (LlamaConfig, LlamaForCausalLM),
                                 "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[shape.get("family", "llama")]
    config = config_class(vocab_size=shape["vocab"], hidden_size=shape["hidden"],
                          intermediate_size=shape["intermediate"], num_hidden_layers=shape["layers"],
                          num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
                          max_position_embeddings=32768, tie_word_embeddings=shape.get("tie", False),
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id)
    model = model_class(config).to(torch.float32)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return sum(p.numel() for p in model.parameters())


def synthetic_rows(n: int, vocab: int, prompt_len: int, completion_len: int, jitter: float, seed: int):
    """Pairs whose lengths are uniform in mean*(1 +- jitter); tokens are random words."""
    rng = random.Random(seed)
    top = vocab - len(SPECIALS)

    def text(mean):
        k = max(1, round(mean * (1 + rng.uniform(-jitter, jitter))))
        return " ".join(f"w{rng.randrange(top)}" for _ in range(k))

    return [{"prompt": text(prompt_len), "chosen": " " + text(completion_len),
             "rejected": " " + text(completion_len)} for _ in range(n)]


def synthetic_groups(n: int, answers: int, vocab: int, prompt_len: int, completion_len: int, jitter: float,
                     seed: int) -> list[dict]:
    """Groups of `answers` completions with distinct scores (a random order), lengths as synthetic_rows."""
    rng = random.Random(seed)
    pairs = synthetic_rows(n * answers, vocab, prompt_len, completion_len, jitter, seed)
    groups = []
    for g in range(n):
        scores = [float(x) for x in rng.sample(range(answers), answers)]
        groups.append({"prompt": pairs[g * answers]["prompt"],
                       "completions": [pairs[g * answers + i]["chosen"] for i in range(answers)], "scores": scores})
    return groups


def pairs_of_groups(groups: list[dict]) -> list[dict]:
    """Every pair of different scores of each group, in group order: what all_pairs trains on."""
    return [{"prompt": g["prompt"], "chosen": g["completions"][i], "rejected": g["completions"][k]}
            for g in groups for i in range(len(g["scores"])) for k in range(len(g["scores"]))
            if g["scores"][i] > g["scores"][k]]
