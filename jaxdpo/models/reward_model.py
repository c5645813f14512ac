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

Training one (jaxdpo/training/objectives.py, objective = "reward_model"): a `Scorer` is the Decoder plus a
trainable `ScoreHead`; `pair_rewards` reads each completion of a training batch where transformers would read
the exported model (the rightmost token of prompt + completion whose id is not `score_pad_id`), in any
layout that keeps a completion's tokens together (padded, prefix_shared); `save_scorer` writes the
`*ForSequenceClassification` directory, with `pad_token_id` set so that transformers reads the same token.

Dimension letters: b batch, t time, d model, l labels, p pairs.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxdpo.errors import ConfigError
from jaxdpo.judging import failures
from jaxdpo.models import families
from jaxdpo.models import lora as lora_lib
from jaxdpo.models.decoder import Decoder
from jaxdpo.models.hf_io import (
    SCORE_HEAD,
    from_pretrained_classifier,
    from_pretrained_scorer,
    place_on_mesh,
    save_pretrained,
)
from jaxdpo.parallel.sharding import batch_axis_size, logical_to_mesh_axes

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


# ---- training a reward model -------------------------------------------------------------------------------

class ScoreHead(nnx.Param):
    """The score head [D, 1]: trains with the decoder, and under LoRA with the adapters (PEFT's
    modules_to_save=["score"], as TRL's RewardTrainer advises)."""


class Scorer(nnx.Module):
    """A decoder and its score head: the model the reward-model objective trains."""

    def __init__(self, decoder: Decoder, head):
        self.decoder = decoder
        self.score = ScoreHead(head, out_sharding=logical_to_mesh_axes(("embed", None)),
                               eager_sharding=not jax.sharding.get_abstract_mesh().empty)

    @property
    def config(self):
        return self.decoder.config


def score_pad_id(tokenizer) -> int | None:
    """The id transformers skips when it looks for a row's last token: the tokenizer's pad token, else its EOS
    (TRL's RewardTrainer pads with EOS then); None when it has neither (the last token is read)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def read_positions(batch, *, num_pairs: int, score_pad_id: int | None) -> jax.Array:
    """[2, P] flat indices (row * T + t) of the token each pair's chosen (side 1) and rejected (side 2)
    completion is scored at: the rightmost of its prompt's last token and its completion tokens whose id is
    not `score_pad_id`. A scored position t holds a token of the completion's sequence and predicts
    `targets[t]`, which sits at t + 1 of the same row: together they are exactly those tokens."""
    r, t = batch["input_ids"].shape
    flat = jnp.arange(r * t, dtype=jnp.int32).reshape(r, t)

    def readable(ids, index):
        return index if score_pad_id is None else jnp.where(ids != score_pad_id, index, -1)

    candidate = jnp.maximum(readable(batch["input_ids"], flat), readable(batch["targets"], flat + 1))
    side = batch["side"]
    slot = jnp.where(side > 0, batch["pair_index"] * 2 + side - 1, 2 * num_pairs)  # out of range: dropped
    last = jax.ops.segment_max(candidate.reshape(-1), slot.reshape(-1), num_segments=2 * num_pairs)
    return jnp.maximum(last, 0).reshape(num_pairs, 2).T  # padding pairs read token 0 and are masked


def pair_rewards(graphdef, states, batch, *, num_pairs: int, score_pad_id: int | None,
                 lora_dropout_key=None) -> tuple[jax.Array, jax.Array]:
    """([P], [P]) float32 rewards of each pair's chosen and rejected completion under the scorer `states`."""
    model = nnx.merge(graphdef, *states)
    kwargs = {} if lora_dropout_key is None else {"lora_dropout_key": lora_dropout_key}
    hidden_btd = model.decoder.hidden_states(batch["input_ids"], batch["positions"], batch["segment_ids"],
                                             batch["branch_ids"], **kwargs)
    index_2p = read_positions(batch, num_pairs=num_pairs, score_pad_id=score_pad_id)
    read_2pd = jnp.take(hidden_btd.reshape(-1, hidden_btd.shape[-1]), index_2p, axis=0)
    rewards = jnp.einsum("spd,dl->spl", read_2pd, model.score[...].astype(read_2pd.dtype),
                         preferred_element_type=jnp.float32)[..., 0]
    return rewards[0], rewards[1]


def _head_init_std(path: str) -> float:
    """transformers initialises a new score head N(0, initializer_range^2)."""
    with open(os.path.join(path, "config.json")) as f:
        return float(json.load(f).get("initializer_range", 0.02))


def load_scorer(path: str, *, seed: int, log, **decoder_fields) -> Scorer:
    """The scorer of `path`: a *ForSequenceClassification checkpoint's decoder and head, or a causal LM's
    decoder with a new head (said in one line through `log`). `decoder_fields` as hf_io.from_pretrained_scorer."""
    decoder, head = from_pretrained_scorer(path, **decoder_fields)
    if head is None:
        std = _head_init_std(path)
        width = decoder.config.hidden_size
        log(f"  model      {path} has no score head (a causal LM): score head [{width}, 1] initialised N(0, {std:g}^2)")
        value = std * jax.random.normal(jax.random.key(seed), (width, 1), jnp.float32)
        head = place_on_mesh(np.asarray(value).astype(np.dtype(decoder.param_dtype)), ("embed", None),
                             decoder_fields.get("mesh"))
    elif head.shape[1] != 1:
        raise ConfigError(f"{path}: score head has num_labels={head.shape[1]}; a reward model gives one score")
    return Scorer(decoder, head)


def classifier_architecture(causal_architecture: str) -> str:
    return causal_architecture.removesuffix("ForCausalLM") + "ForSequenceClassification"


def save_scorer(model: Scorer, out_dir: str, tokenizer, *, lora=None) -> None:
    """Write the scorer as a `*ForSequenceClassification` dir (adapters merged in under LoRA) that
    transformers and `RewardModel` load, reading the token `pair_rewards` read. Every process calls it."""
    decoder = model.decoder if lora is None else lora_lib.merge_adapters(model.decoder, lora)
    if tokenizer.pad_token_id is None:  # transformers finds a row's last token by the pad id (score_pad_id)
        tokenizer.pad_token = tokenizer.eos_token
    causal = families.config_to_hf(decoder.config, "float32")["architectures"][0]
    updates = {"architectures": [classifier_architecture(causal)], "id2label": {"0": "LABEL_0"},
               "label2id": {"LABEL_0": 0}, "pad_token_id": score_pad_id(tokenizer)}
    save_pretrained(decoder, out_dir, tokenizer=tokenizer, extra_tensors={SCORE_HEAD: model.score[...].T},
                    config_updates=updates)
