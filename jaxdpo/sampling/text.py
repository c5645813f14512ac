"""Text in, text out around the sampling engine (jaxdpo.sampling.generate), for the CLI and samples during
training: prompts (strings or chat messages) to token ids fitted to the model's positions, the ids that end
a completion, and sampled ids back to text cut at stop strings, with each completion's summed logprob."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import NamedTuple

from jaxdpo.data.layouts import pad_id_of
from jaxdpo.errors import ConfigError
from jaxdpo.sampling.generate import SamplingSettings, completion_logprobs, generate
from jaxdpo.sampling.prompts import PromptRoom

def encode_prompt(tokenizer, prompt) -> list[int]:
    """A string (tokenized with the tokenizer's special tokens, e.g. BOS) or a list of {"role", "content"}
    messages (rendered with the chat template and the generation prompt) -> token ids. Quiet about lengths
    over the tokenizer's maximum: `encode_prompts` checks them against the model's positions."""
    if isinstance(prompt, str):
        return list(tokenizer(prompt, add_special_tokens=True, verbose=False)["input_ids"])
    text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


class EncodedPrompts(NamedTuple):
    ids: list[list[int]]  # each prompt's tokens, as they will be sampled
    cut: int  # how many prompts were cut to fit the model's positions


def encode_prompts(tokenizer, prompts: Sequence, room: PromptRoom, max_new_tokens: int) -> EncodedPrompts:
    """Each prompt's ids (`encode_prompt`), cut or refused by `room` where they and max_new_tokens exceed
    the model's positions."""
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    fitted = room.fit(encoded, max_new_tokens, tokenizer.bos_token_id)
    return EncodedPrompts(fitted, sum(len(a) < len(b) for a, b in zip(fitted, encoded)))


def stop_ids(tokenizer, model_config, model_dir: str = "") -> list[int]:
    """Every id that ends a completion: the eos_token_id (an id or a list) of `model_dir`'s
    generation_config.json when it has one, the model config's, and the tokenizer's EOS."""
    ids = set()
    for value in (generation_config(model_dir).get("eos_token_id"), model_config.eos_token_id,
                  tokenizer.eos_token_id):
        if value is not None:
            ids.update([value] if isinstance(value, int) else value)
    if not ids:
        raise ConfigError("neither the tokenizer nor the model's configs name an EOS token; completions could "
                          "only stop at max_new_tokens")
    return sorted(ids)


def generation_config(model_dir: str) -> dict:
    """A model directory's generation_config.json ({} when it has none, or no directory is given)."""
    path = os.path.join(model_dir, "generation_config.json") if model_dir else ""
    if not path or not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def truncate_at_stop(tokenizer, ids: list[int], stop_strings: Sequence[str]) -> tuple[str, list[int], bool]:
    """(text, ids, stopped): the text decoded without special tokens and cut before the first stop string,
    and the shortest prefix of ids whose text contains that stop string (the ids keep the stop string, as
    an EOS id is kept)."""
    text = tokenizer.decode(ids, skip_special_tokens=True)
    hits = [text.find(s) for s in stop_strings if s and s in text]
    if not hits:
        return text, ids, False
    cut = min(hits)
    stop = next(s for s in stop_strings if s and text.find(s) == cut)
    end = next(n for n in range(1, len(ids) + 1)
               if stop in tokenizer.decode(ids[:n], skip_special_tokens=True)[cut:])
    return text[:cut], ids[:end], True


def completions_with_logprobs(graphdef, states, tokenizer, prompt_ids: Sequence[Sequence[int]],
                              settings: SamplingSettings, *, eos_ids: Sequence[int], stop_strings: Sequence[str] = (),
                              batch_size: int | None = None, on_batch=None) -> list[dict]:
    """Sample one completion per prompt (its ids from `encode_prompts`). Returns one dict per prompt:
    `prompt_ids`, `completion` (text, cut at a stop string), `completion_ids` (through the EOS or stop
    string), `logprob` (the summed logprob of completion_ids under these params) and `finished` (ended by
    an EOS id or a stop string). For samples during training: call it with the policy's (graphdef,
    states); score the result under the reference with `completion_logprobs`."""
    pad_id = pad_id_of(tokenizer)
    raw = generate(graphdef, states, prompt_ids, settings, eos_ids=eos_ids, pad_id=pad_id, batch_size=batch_size,
                   on_batch=on_batch)
    rows = []
    for ids, completion in zip(prompt_ids, raw):
        text, kept, stopped = truncate_at_stop(tokenizer, completion.ids, stop_strings)
        logprob = completion.logprob if len(kept) == len(completion.ids) else None
        rows.append({"prompt_ids": list(ids), "completion": text, "completion_ids": kept,
                     "finished": completion.finished or stopped, "logprob": logprob})
    missing = [i for i, r in enumerate(rows) if r["logprob"] is None]  # cut at a stop string: rescore
    if missing:
        scores = completion_logprobs(graphdef, states, [rows[i]["prompt_ids"] for i in missing],
                                     [rows[i]["completion_ids"] for i in missing], pad_id=pad_id)
        for i, score in zip(missing, scores):
            rows[i]["logprob"] = float(score)
    return rows
