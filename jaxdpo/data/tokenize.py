"""Normalized pairs -> token ids of prompt, chosen and rejected, truncated the same way for every layout.

Standard (string) pairs: tokenized as TRL 1.x's DPOTrainer does, so ids and logps match it: EOS is
appended to each completion text unless it already ends with it, prompt and prompt+completion are
tokenized whole (BOS where the tokenizer adds one, never twice), and the completion starts where the
prompt's ids stop being a prefix of both. A prompt whose last characters merge into the completion's
first token (a trailing space) is counted as `prefix_mismatch`.

Conversational pairs: the prompt is rendered by the chat template with `add_generation_prompt=True`;
the completion ids are the ids of the whole conversation after the prompt ids. Templates that render
the prompt differently once an answer follows (e.g. ones that strip "thinking" blocks) break that prefix
property; such pairs are counted as `prefix_mismatch` and their completion is tokenized on its own,
from the text that follows the rendered prompt.

Truncation (TRL's meaning): `max_prompt_length` bounds the prompt (keep_end cuts it from the left,
keep_start from the right), then `max_length` bounds prompt + one completion, cutting the completion
from the right. A pair whose completion would become empty is dropped and counted.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import numpy as np

from jaxdpo.data.formats import BadRow, ExampleKind, Pair, common_prefix_length
from jaxdpo.errors import ConfigError


@dataclasses.dataclass
class TokenizedPairs:
    """Token ids of every pair, in order. `source[i]` = (file, row) the pair came from; `margins[i]` its
    margin (formats.pair_margin; all 0 when not given)."""

    prompt_ids: list[np.ndarray]
    chosen_ids: list[np.ndarray]
    rejected_ids: list[np.ndarray]
    source: list[tuple[str, int]]
    margins: list[float] = dataclasses.field(default_factory=list)

    def __post_init__(self):
        if not self.margins:
            self.margins = [0.0] * len(self.prompt_ids)

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.prompt_ids[i], self.chosen_ids[i], self.rejected_ids[i]

    def subset(self, indices: Sequence[int]) -> "TokenizedPairs":
        return TokenizedPairs([self.prompt_ids[i] for i in indices], [self.chosen_ids[i] for i in indices],
                              [self.rejected_ids[i] for i in indices], [self.source[i] for i in indices],
                              [self.margins[i] for i in indices])

    @classmethod
    def empty(cls) -> "TokenizedPairs":
        return cls([], [], [], [])

    @classmethod
    def concat(cls, parts: Sequence["TokenizedPairs"]) -> "TokenizedPairs":
        out = cls.empty()
        for part in parts:
            out.prompt_ids += part.prompt_ids
            out.chosen_ids += part.chosen_ids
            out.rejected_ids += part.rejected_ids
            out.source += part.source
            out.margins += part.margins
        return out

    def append(self, prompt, chosen, rejected, source, margin: float = 0.0) -> None:
        self.prompt_ids.append(np.asarray(prompt, np.int32))
        self.chosen_ids.append(np.asarray(chosen, np.int32))
        self.rejected_ids.append(np.asarray(rejected, np.int32))
        self.source.append(source)
        self.margins.append(float(margin))

    kind = ExampleKind.PAIR
    completions = 2  # an example is (prompt, chosen, rejected): jaxdpo/data/examples.py

    def example_arrays(self, indices: Sequence[int], size: int) -> dict[str, np.ndarray]:
        """`margin` [size] (float32; 0 on the padding pairs after `indices`): only the reward objective reads
        it (layouts.EXAMPLE_KEYS); a pair's preference is its order."""
        margin = np.zeros((size,), np.float32)
        margin[:len(indices)] = [self.margins[int(i)] for i in indices]
        return {"margin": margin}


@dataclasses.dataclass
class TokenizedRows:
    """Token ids of unpaired rows, in order: prompt, completion, label (True = desirable). A completion is
    kept up to max_length - 1 tokens (the most any prompt leaves): examples.UnpairedExamples cuts it to the
    room of the prompt it follows, its own or, in a KL row, another row's. `source[i]` = (file, row); the
    two rows of an unpaired pair share theirs."""

    prompt_ids: list[np.ndarray]
    completion_ids: list[np.ndarray]
    labels: list[bool]
    source: list[tuple[str, int]]

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def subset(self, indices: Sequence[int]) -> "TokenizedRows":
        return TokenizedRows([self.prompt_ids[i] for i in indices], [self.completion_ids[i] for i in indices],
                             [self.labels[i] for i in indices], [self.source[i] for i in indices])

    @classmethod
    def empty(cls) -> "TokenizedRows":
        return cls([], [], [], [])

    @classmethod
    def concat(cls, parts: Sequence["TokenizedRows"]) -> "TokenizedRows":
        out = cls.empty()
        for part in parts:
            out.prompt_ids += part.prompt_ids
            out.completion_ids += part.completion_ids
            out.labels += part.labels
            out.source += part.source
        return out

    def append(self, prompt, completion, label: bool, source) -> None:
        self.prompt_ids.append(np.asarray(prompt, np.int32))
        self.completion_ids.append(np.asarray(completion, np.int32))
        self.labels.append(bool(label))
        self.source.append(source)


@dataclasses.dataclass
class TokenizedGroups:
    """Token ids of groups, in order: prompt, its N >= 2 completions (N may differ between groups) and their
    scores. As batcher examples `[i]` is (prompt, *completions); `completions` is the largest N, the slots
    every batch of them has (jaxdpo/data/examples.py)."""

    prompt_ids: list[np.ndarray]
    completion_ids: list[list[np.ndarray]]
    scores: list[np.ndarray]
    source: list[tuple[str, int]]

    kind = ExampleKind.GROUP

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def __getitem__(self, i: int) -> tuple[np.ndarray, ...]:
        return (self.prompt_ids[i], *self.completion_ids[i])

    @property
    def completions(self) -> int:
        return max((len(c) for c in self.completion_ids), default=2)

    def subset(self, indices: Sequence[int]) -> "TokenizedGroups":
        return TokenizedGroups([self.prompt_ids[i] for i in indices], [self.completion_ids[i] for i in indices],
                               [self.scores[i] for i in indices], [self.source[i] for i in indices])

    @classmethod
    def empty(cls) -> "TokenizedGroups":
        return cls([], [], [], [])

    @classmethod
    def concat(cls, parts: Sequence["TokenizedGroups"]) -> "TokenizedGroups":
        out = cls.empty()
        for part in parts:
            out.prompt_ids += part.prompt_ids
            out.completion_ids += part.completion_ids
            out.scores += part.scores
            out.source += part.source
        return out

    def append(self, prompt, completions, scores, source) -> None:
        self.prompt_ids.append(np.asarray(prompt, np.int32))
        self.completion_ids.append([np.asarray(c, np.int32) for c in completions])
        self.scores.append(np.asarray(scores, np.float32))
        self.source.append(source)

    def example_arrays(self, indices: Sequence[int], size: int) -> dict[str, np.ndarray]:
        """`group_scores` [size, N] (float32) and `group_mask` [size, N] (1 where group i has completion k);
        zeros on the padding examples after `indices` and the slots after a smaller group's last."""
        slots = self.completions
        scores, mask = np.zeros((size, slots), np.float32), np.zeros((size, slots), np.int32)
        for row, i in enumerate(indices):
            n = len(self.scores[i])
            scores[row, :n], mask[row, :n] = self.scores[i], 1
        return {"group_scores": scores, "group_mask": mask}


@dataclasses.dataclass
class TokenizerSpec:
    """What tokenization needs to know about a tokenizer, worked out once."""

    tokenizer: object
    chat_template: str | None
    bos_id: int | None
    eos_id: int
    adds_bos: bool  # does the tokenizer put BOS before plain text (Llama, Gemma: yes; Qwen, GPT-2: no)


def resolve_chat_template(value: str) -> str | None:
    """`data.chat_template`: empty = the tokenizer's own; a path to a file; or the template itself."""
    if not value:
        return None
    path = os.path.expanduser(value)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    return value


def make_spec(tokenizer, chat_template: str = "") -> TokenizerSpec:

    if tokenizer.eos_token_id is None:
        raise ConfigError("the tokenizer has no EOS token; set eos_token in its tokenizer_config.json "
                          "(completions must end with EOS so the model learns to stop)")
    bos_id = tokenizer.bos_token_id
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    adds_bos = bos_id is not None and len(with_special) > 0 and with_special[0] == bos_id
    return TokenizerSpec(tokenizer, resolve_chat_template(chat_template), bos_id, tokenizer.eos_token_id,
                         adds_bos)


def _encode(spec: TokenizerSpec, text: str) -> list[int]:
    return list(spec.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def _render(spec: TokenizerSpec, messages, *, add_generation_prompt: bool) -> str:
    try:
        return spec.tokenizer.apply_chat_template(messages, tokenize=False, chat_template=spec.chat_template,
                                                  add_generation_prompt=add_generation_prompt)
    except ValueError as e:
        if spec.chat_template is None and getattr(spec.tokenizer, "chat_template", None) is None:

            raise ConfigError("the data is conversational but the tokenizer has no chat template; set "
                              "data.chat_template to a Jinja template (a file path or the template text)") from e
        raise
    except Exception as e:  # jinja errors (e.g. a template's raise_exception on role order)
        raise BadRow("template_error", None, f"the chat template failed on this conversation: {e}") from e


def _render_prompt(spec: TokenizerSpec, messages) -> str:
    # transformers renders no empty conversation: an empty prompt stays empty (tokenize_pair gives it BOS).
    return _render(spec, messages, add_generation_prompt=True) if messages else ""


def _start_token(spec: TokenizerSpec) -> int:
    # Every layout needs a last prompt token to predict the first completion token from; an empty
    # prompt gets the tokenizer's BOS, or EOS for tokenizers without one (GPT-2 uses it that way).
    return spec.bos_id if spec.bos_id is not None else spec.eos_id


def _encode_with_specials(spec: TokenizerSpec, text: str) -> list[int]:
    """Plain text as the tokenizer encodes it by default (BOS where it adds one), never with BOS twice
    when the text itself starts with the BOS string."""
    ids = list(spec.tokenizer(text)["input_ids"])
    if spec.adds_bos and ids[:2] == [spec.bos_id, spec.bos_id]:
        ids = ids[1:]
    return ids


def tokenize_standard(spec: TokenizerSpec, prompt_text: str,
                      completions: Sequence[str]) -> tuple[list[int], list[list[int]], int]:
    """TRL 1.x's DPOTrainer rule (and KTOTrainer's, for one completion), so that ids (and logps) are the
    same as there: EOS is appended to each completion text unless it already ends with it; prompt and
    prompt+completion are tokenized whole, and the completions start where the prompt's ids stop being a
    prefix of any of them. A prompt ending in a space thus gives '?' | 'ĠThe', not '?', 'Ġ' | 'The' (the space
    merges into the completion's first token). -> prompt ids, completion ids and 1 if the prompt's last ids
    merged so."""
    eos = spec.tokenizer.eos_token
    prompt = _encode_with_specials(spec, prompt_text)
    full = [_encode_with_specials(spec, prompt_text + (text if text.endswith(eos) else text + eos))
            for text in completions]
    shared = min(common_prefix_length(prompt, ids) for ids in full)
    return prompt[:shared], [ids[shared:] for ids in full], int(shared < len(prompt))


def tokenize_conversation(spec: TokenizerSpec, prompt_messages,
                          completions: Sequence) -> tuple[list[int], list[list[int]], int]:
    """-> prompt ids, completion ids and the number of completions whose prefix check failed."""
    prompt_text = _render_prompt(spec, prompt_messages)
    prompt = _encode(spec, prompt_text)
    mismatches = 0
    out = []
    keys = ("chosen", "rejected") if len(completions) == 2 else ("completion",) * len(completions)
    for key, messages in zip(keys, completions):
        full_text = _render(spec, prompt_messages + messages, add_generation_prompt=False)
        full = _encode(spec, full_text)
        if full[:len(prompt)] == prompt:
            out.append(full[len(prompt):])
            continue
        mismatches += 1
        if not full_text.startswith(prompt_text):
            raise BadRow("template_prefix_mismatch", key,
                         "the chat template renders the prompt differently when the answer follows, so the "
                         "completion cannot be separated; use a template that keeps earlier turns unchanged "
                         "(data.chat_template)")
        out.append(_encode(spec, full_text[len(prompt_text):]))
    return prompt, out, mismatches


def cut_prompt(prompt: list[int], limit: int, truncation: str, bos_id: int | None) -> list[int]:
    """The prompt cut to `limit` tokens: keep_end keeps its end (the question nearest the answer) and its
    BOS first (models were trained with it there and behave badly without it); keep_start keeps its start."""
    if len(prompt) <= limit:
        return prompt
    if truncation == "keep_end":
        keep_bos = bos_id is not None and prompt[0] == bos_id and limit > 1
        return ([bos_id] if keep_bos else []) + prompt[len(prompt) - (limit - keep_bos):]
    if truncation == "keep_start":
        return prompt[:limit]
    raise ConfigError(f"data.truncation={truncation!r}; use keep_end or keep_start")


def truncate(prompt: list[int], chosen: list[int], rejected: list[int], *, max_length: int,
             max_prompt_length: int, truncation: str, bos_id: int | None):
    """Apply the length limits; None when a completion would be left empty."""
    if max_prompt_length:
        prompt = cut_prompt(prompt, max_prompt_length, truncation, bos_id)
    room = max_length - len(prompt)
    if room <= 0:
        return None
    chosen, rejected = chosen[:room], rejected[:room]
    if not chosen or not rejected:
        return None
    return prompt, chosen, rejected


def tokenize_completions(spec: TokenizerSpec, prompt, completions: Sequence, *, conversational: bool,
                         keys: Sequence[str]):
    """-> (prompt, [completion ids], prefix_mismatches) before truncation; `keys` name the completions in
    errors."""
    tokenize = tokenize_conversation if conversational else tokenize_standard
    prompt_ids, completion_ids, mismatches = tokenize(spec, prompt, completions)
    if not prompt_ids:
        start = _start_token(spec)
        if all(ids[:1] == [start] for ids in completion_ids):  # the template's BOS, now the prompt's, once
            completion_ids = [ids[1:] for ids in completion_ids]
        prompt_ids = [start]
    for key, ids in zip(keys, completion_ids):
        if not ids:
            raise BadRow("empty_completion", key, "the completion has no tokens after the prompt")
    return prompt_ids, completion_ids, mismatches


def tokenize_pair(spec: TokenizerSpec, pair: Pair):
    """-> (prompt, chosen, rejected, prefix_mismatches) before truncation."""
    prompt, (chosen, rejected), mismatches = tokenize_completions(
        spec, pair.prompt, (pair.chosen, pair.rejected), conversational=pair.conversational,
        keys=("chosen", "rejected"))
    return prompt, chosen, rejected, mismatches


def truncate_row(prompt: list[int], completion: list[int], *, max_length: int, max_prompt_length: int,
                 truncation: str, bos_id: int | None):
    """An unpaired row's length limits: the prompt as for pairs; the completion kept up to max_length - 1
    (TokenizedRows). None when the prompt leaves no room (TRL drops such rows)."""
    if max_prompt_length:
        prompt = cut_prompt(prompt, max_prompt_length, truncation, bos_id)
    if max_length - len(prompt) <= 0:
        return None
    return prompt, completion[:max_length - 1]


def truncate_group(prompt: list[int], completions: Sequence[list[int]], *, max_length: int,
                   max_prompt_length: int, truncation: str, bos_id: int | None):
    """A group's length limits, those of pairs: the prompt cut first, then each completion to the room the
    prompt leaves in max_length. None when the prompt leaves no room."""
    if max_prompt_length:
        prompt = cut_prompt(prompt, max_prompt_length, truncation, bos_id)
    room = max_length - len(prompt)
    if room <= 0:
        return None
    return prompt, [completion[:room] for completion in completions]
