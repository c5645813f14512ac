"""A reward model: a Hugging Face `*ForSequenceClassification` checkpoint (Llama, Mistral, Qwen2/3,
Gemma 1/2/3) as jaxdpo's Decoder plus its `score` head, read at the last non-pad token.

transformers' rule (`GenericForSequenceClassification.forward`), which this module reproduces:
`logits = score(final-normed hidden states)`, read per row at the RIGHTMOST position whose id is not
`pad_token_id` (any padding side; 0 if every id is the pad id). Without a `pad_token_id`, transformers
reads position -1 and refuses batches of more than one row; here each row is read at its last real token
(the same position for the one unpadded row transformers accepts). Note the rule looks at ids, not at the
attention mask: where `pad_token_id == eos_token_id`, a text that ends with EOS is read at the token before.

Scoring runs in buckets: rows are sorted by length and cut into batches of a fixed number of rows, each
padded (on the right) to a power-of-two length, so only a handful of shapes ever compile. Texts longer
than `max_length` tokens keep their last `max_length` tokens (the score is read at the end).

Dimension letters: b batch, t time, d model, l labels.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxdpo.errors import ConfigError
from jaxdpo.judging import failures
from jaxdpo.models.hf_io import from_pretrained_classifier, place_on_mesh
from jaxdpo.parallel.sharding import batch_axis_size

MIN_BUCKET = 32


def last_token_index(input_ids: np.ndarray, attention_mask: np.ndarray, pad_token_id: int | None) -> np.ndarray:
    """[B] position the score is read at, by transformers' rule (see the module docstring)."""
    if pad_token_id is None:
        t = input_ids.shape[-1]
        return (t - 1 - np.argmax(attention_mask[:, ::-1] > 0, axis=-1)).astype(np.int32)
    not_pad = (input_ids != pad_token_id).astype(np.int32)
    return np.argmax(np.arange(input_ids.shape[-1], dtype=np.int32) * not_pad, axis=-1).astype(np.int32)


def bucket_length(length: int, max_length: int) -> int:
    """The padded length of a batch whose longest row has `length` tokens: the next power of two, at least
    MIN_BUCKET, at most `max_length`."""
    return int(min(max_length, max(MIN_BUCKET, 1 << max(0, length - 1).bit_length())))


def score_rows(graphdef, state, head_dl, input_ids, positions, segment_ids, last_index):
    """[B] float32 scores: the decoder's final hidden state at `last_index` of each row, times the head."""
    model = nnx.merge(graphdef, state)
    hidden_btd = model.hidden_states(input_ids, positions, segment_ids)
    last_bd = jnp.take_along_axis(hidden_btd, last_index[:, None, None], axis=1)[:, 0]
    scores_bl = jnp.einsum("bd,dl->bl", last_bd, head_dl.astype(model.dtype), preferred_element_type=jnp.float32)
    return scores_bl[:, 0]


def padded_inputs(input_ids: np.ndarray, attention_mask: np.ndarray, pad_token_id: int | None) -> dict:
    """Model inputs for a padded batch (either side): positions count real tokens from 0, segment id 1 on
    real tokens and 0 on padding (so padding is never attended), and the read position of each row."""
    mask = (np.asarray(attention_mask) > 0).astype(np.int32)
    return {"input_ids": np.asarray(input_ids, np.int32),
            "positions": np.maximum(np.cumsum(mask, axis=-1) - 1, 0).astype(np.int32),
            "segment_ids": mask,
            "last_index": last_token_index(np.asarray(input_ids), mask, pad_token_id)}


def right_padded(rows: Sequence[Sequence[int]], num_rows: int, length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, mask) [num_rows, length] for token lists, right-padded. Rows past len(rows) hold one pad
    token (so every row attends to something) and are dropped after scoring."""
    ids = np.full((num_rows, length), pad_id, np.int32)
    mask = np.zeros((num_rows, length), np.int32)
    mask[:, 0] = 1
    for r, row in enumerate(rows):
        ids[r, :len(row)] = row
        mask[r, :len(row)] = 1
    return ids, mask


class RewardModel:
    """A `*ForSequenceClassification` checkpoint loaded on `mesh` (sharded like the policy), in `dtype`.

    `score(prompts, completions)` is the Judge interface (jaxdpo.judging.judges). On several hosts every process
    calls it with the same inputs (each places its own shards of the global batch) and gets every score. A prompt is a string (scored
    text: prompt + completion, tokenized with the tokenizer's special tokens) or a message list (scored
    text: the checkpoint's chat template over the messages plus an assistant turn with the completion).
    """

    def __init__(self, path: str, *, dtype=jnp.float32, param_dtype=None, mesh=None, batch_size: int = 8,
                 max_length: int | None = None):
        from transformers import AutoTokenizer

        if not os.path.isdir(path):
            raise ConfigError(f"reward model {path!r} is not a directory (expected a Hugging Face "
                              f"*ForSequenceClassification checkpoint dir)")
        try:
            model, self.head = from_pretrained_classifier(path, dtype, param_dtype=param_dtype, mesh=mesh)
        except (ValueError, FileNotFoundError, KeyError) as e:
            raise ConfigError(f"reward model: {e}") from None
        num_labels = self.head.shape[1]
        if num_labels != 1:
            raise ConfigError(f"reward model {path!r}: score head has num_labels={num_labels}; a reward model "
                              f"gives one score (num_labels=1)")
        self.name = f"reward_model:{path}"
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.pad_token_id = model.config.pad_token_id
        self.mesh = mesh
        self.max_length = int(max_length or model.config.max_position)
        ways = 1 if mesh is None else batch_axis_size(mesh)
        self.batch_rows = -(-batch_size // ways) * ways  # every device of the batch axes gets whole rows
        self.graphdef, self.state = nnx.split(model)
        out_sharding = None if mesh is None else NamedSharding(mesh, PartitionSpec())  # every host reads all
        self._score_rows = jax.jit(functools.partial(score_rows, self.graphdef), out_shardings=out_sharding)

    # -- scoring --------------------------------------------------------------------------------------
    def score_padded(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """[B] float32 scores of one padded batch (padding on either side), as transformers gives them."""
        inputs = padded_inputs(input_ids, attention_mask, self.pad_token_id)
        logical = {"input_ids": ("batch", "seq"), "positions": ("batch", "seq"), "segment_ids": ("batch", "seq"),
                   "last_index": ("batch",)}
        placed = {k: place_on_mesh(v, logical[k], self.mesh) for k, v in inputs.items()}
        with _mesh_context(self.mesh):
            scores = self._score_rows(self.state, self.head, placed["input_ids"], placed["positions"],
                                      placed["segment_ids"], placed["last_index"])
        return np.asarray(scores, np.float32)

    def score_token_ids(self, rows: Sequence[Sequence[int]]) -> np.ndarray:
        """[N] float32 scores of token lists, in their order; bucketed by length (see the module docstring)."""
        rows = [list(r)[-self.max_length:] for r in rows]
        if any(not r for r in rows):
            raise ValueError("score_token_ids: an empty token list has nothing to read a score at")
        order = np.argsort([len(r) for r in rows], kind="stable")
        pad_id = self.pad_token_id if self.pad_token_id is not None else 0
        scores = np.zeros(len(rows), np.float32)
        for start in range(0, len(rows), self.batch_rows):
            chosen = order[start:start + self.batch_rows]
            batch = [rows[i] for i in chosen]
            length = bucket_length(max(len(r) for r in batch), self.max_length)
            ids, mask = right_padded(batch, self.batch_rows, length, pad_id)
            scores[chosen] = self.score_padded(ids, mask)[:len(batch)]
        return scores

    def encode(self, prompt: str | list[dict], completion: str) -> list[int]:
        """The token ids the reward model scores for one (prompt, completion)."""
        if isinstance(prompt, str):
            return list(self.tokenizer(prompt + completion)["input_ids"])
        if not self.tokenizer.chat_template:
            raise ConfigError(f"{self.name}: its tokenizer has no chat template, so it cannot score "
                              f"conversational prompts (give plain-text prompts)")
        messages = list(prompt) + [{"role": "assistant", "content": completion}]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def score(self, prompts: Sequence[str | list[dict]], completions: Sequence[str]) -> np.ndarray:
        """[N] float64 scores, one per (prompt, completion); NaN for a sample that could not be encoded
        (jaxdpo.judging.failures: one line, skipped)."""
        ids = failures.each_or_skipped(self.name, prompts, completions, lambda i, p, c: self.encode(p, c))
        scores = np.full(len(ids), np.nan, np.float64)
        encoded = [i for i, row in enumerate(ids) if row is not None]
        if encoded:
            scores[encoded] = self.score_token_ids([ids[i] for i in encoded])
        return scores


def _mesh_context(mesh):
    return contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)
