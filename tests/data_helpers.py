"""A tiny tokenizer, a data config and the attention-rule oracle the data tests share (a helper module)."""

from __future__ import annotations

import collections
import json

import ml_collections
import numpy as np

CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
SPECIALS = ["<pad>", "<bos>", "<eos>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CORPUS = ["What color is the sky? The sky is blue.", "Human: hello there Assistant: hi, how can I help?",
          "Paris is the capital of France.", "2+2=4 and 2+2 is not 5", "The cat sat on the mat."] * 3


def write_jsonl(path, rows) -> str:
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


def make_tokenizer(add_bos: bool = True, corpus: list[str] = CORPUS):
    """A byte-level BPE of ~300 ids; ids 0..6 are SPECIALS in order; BOS is added to plain text."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def data_config(**overrides) -> ml_collections.ConfigDict:
    from configs import dpo

    c = dpo.get_config().data
    c.max_length, c.max_prompt_length = 64, 32
    c.use_cache = False  # tests that exercise the cache turn it on with a temporary cache_dir
    for k, v in overrides.items():
        c[k] = v
    return c


def visible_contexts(batch) -> dict[tuple[int, int], collections.Counter]:
    """Per (pair, side): multiset of (what the scored query sees, its target), by the DEVELOPING.md rule.

    What a query sees is the tuple of (position, token) of every key it may attend to, so equal
    multisets mean a model computes the same logprob sums for the pair in both batches.
    """
    out: dict[tuple[int, int], collections.Counter] = collections.defaultdict(collections.Counter)
    for r in range(batch["input_ids"].shape[0]):
        seg, br = batch["segment_ids"][r], batch["branch_ids"][r]
        for q in np.flatnonzero(batch["side"][r] > 0):
            keys = [k for k in range(q + 1) if seg[k] == seg[q] != 0 and (br[k] == 0 or br[k] == br[q])]
            context = tuple((int(batch["positions"][r, k]), int(batch["input_ids"][r, k])) for k in keys)
            key = (int(batch["pair_index"][r, q]), int(batch["side"][r, q]))
            out[key][(context, int(batch["targets"][r, q]))] += 1
    return dict(out)
