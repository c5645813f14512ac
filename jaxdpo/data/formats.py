"""Normalize one raw row into a pair (prompt, chosen, rejected) or an unpaired row (prompt, completion, label).

Two formats, each with an explicit or an implicit prompt:
  standard:        strings.  {"prompt": "2+2=", "chosen": "4", "rejected": "5"}
  conversational:  lists of {"role", "content"} messages.
  explicit prompt: the prompt key is present.
  implicit prompt: no prompt key; the prompt is the shared prefix of chosen and rejected: whole
                   messages for conversations, text for strings (Anthropic HH style
                   "\\n\\nHuman: ...\\n\\nAssistant: ..."), cut at the last "Assistant:" turn so that the
                   completions are the final answers.
Mixed rows are lifted to conversations: a string prompt before message completions becomes a user
message (UltraFeedback stores the prompt string and repeats it as the first message of chosen and
rejected; that repeated turn is removed), a string completion after a message prompt becomes an
assistant message.

Unpaired rows (TRL's unpaired format) hold one completion and a boolean label, and an explicit prompt:
  {"prompt": "2+2=", "completion": "4", "label": true}   (strings or message lists, as above)
A pair may carry a `margin` (TRL RewardTrainer's optional column, a finite number the reward objective
subtracts from r_chosen - r_rejected); a file gives it for every pair or for none.
A file holds one shape or the other; `unpair` turns pairs into unpaired rows as TRL's
`unpair_preference_dataset` does.

Groups hold N >= 2 scored completions of one explicit prompt (N may differ between rows); a higher score is
a better completion, equal scores are ties:
  {"prompt": "2+2=", "completions": ["4", "5", "four"], "scores": [1.0, 0.0, 0.5]}
A pair feeding a group loss is the group (chosen, rejected) with scores (1, 0).

A row that cannot be normalized raises `BadRow(reason, key, detail)`; the caller turns it into a
ConfigError or a skip, following `data.on_bad_row`.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from typing import Any

from jaxdpo.errors import ConfigError

KNOWN_ROLES = ("system", "user", "assistant", "tool")
# The turn markers of the Anthropic HH text format; the last one in the shared prefix ends the prompt.
ASSISTANT_MARKERS = ("\n\nAssistant:", "Assistant:")

Messages = list[dict[str, str]]
# TRL's optional per-pair column: the reward objective wants r_chosen - r_rejected above it.
MARGIN_KEY = "margin"
# data.prompt_key's default: a file without that column has implicit prompts. Any other name is the
# user's statement that the column exists, so a file without it is an error, not implicit prompts.
DEFAULT_PROMPT_KEY = "prompt"


class BadRow(ValueError):
    """A row that cannot become a preference pair. `reason` is a short key used for counting."""

    def __init__(self, reason: str, key: str | None, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.key = key
        self.detail = detail


class ExampleKind(enum.Enum):
    """The shape of the examples a loss takes (loss_specs.LossSpec.example_kind) and the data feeds it:
    jaxdpo/data/examples.py."""

    PAIR = "pair"
    UNPAIRED = "unpaired"
    GROUP = "group"

    @property
    def noun(self) -> str:
        """How reports and messages count examples of this kind."""
        return {"pair": "pairs", "unpaired": "unpaired rows", "group": "groups"}[self.value]


@dataclasses.dataclass
class Pair:
    prompt: str | Messages
    chosen: str | Messages
    rejected: str | Messages

    @property
    def conversational(self) -> bool:
        return isinstance(self.chosen, list)


@dataclasses.dataclass
class LabelledCompletion:
    """One unpaired row: a prompt, one completion, and whether the completion is desirable."""

    prompt: str | Messages
    completion: str | Messages
    label: bool

    @property
    def conversational(self) -> bool:
        return isinstance(self.completion, list)


@dataclasses.dataclass
class ScoredGroup:
    """One group: a prompt, N >= 2 completions and their scores (higher is better, equal scores tie)."""

    prompt: str | Messages
    completions: list[str | Messages]
    scores: list[float]

    @property
    def conversational(self) -> bool:
        return any(isinstance(c, list) for c in self.completions)


# TRL's unpair_preference_dataset maps pairs in `datasets.map` batches of this many, each giving its
# chosen rows, then its rejected rows.
UNPAIR_CHUNK = 1000


def _check_text(value: str, key: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:  # lone surrogates from "\ud800" escapes in JSON
        raise BadRow("undecodable_text", key, f"text is not valid Unicode ({e})") from e
    return value


def _messages(value: Any, key: str) -> Messages:
    """Validate a list of messages; returns plain {"role", "content"} dicts (other fields dropped)."""
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise BadRow("wrong_type", key, f"message {i} must be an object with 'role' and 'content'")
        role, content = message["role"], message["content"]
        if role not in KNOWN_ROLES:
            raise BadRow("unknown_role", key, f"message {i} has role {role!r}; expected one of {KNOWN_ROLES}")
        if not isinstance(content, str):
            raise BadRow("wrong_type", key, f"message {i} content must be a string, "
                                            f"found {type(content).__name__}")
        out.append({"role": role, "content": _check_text(content, key)})
    return out


def text_or_messages(data: dict[str, Any], key: str) -> str | Messages:
    """data[key] checked as a prompt or completion: non-empty text, or a list of role/content messages."""
    if key not in data or data[key] is None:
        raise BadRow("missing_key", key, f"the row has no {key!r} (keys present: {sorted(data)})")
    value = data[key]
    if isinstance(value, str):
        return _check_text(value, key)
    if isinstance(value, list):
        return _messages(value, key)
    raise BadRow("wrong_type", key, f"{key!r} must be a string or a list of messages, "
                                    f"found {type(value).__name__}")


def check_prompt_key(rows, prompt_key: str) -> None:
    """ConfigError naming the file when a data.prompt_key set by the user names no column of it.

    `rows`: RawRow of one or more files; a column exists in a file when any of its rows has it."""
    if prompt_key == DEFAULT_PROMPT_KEY:
        return
    columns: dict[str, set] = {}
    for row in rows:
        if row.data is not None:
            columns.setdefault(row.file, set()).update(row.data)
    for file, keys in columns.items():
        if prompt_key not in keys:
            raise ConfigError(f"{file}: data.prompt_key={prompt_key!r} names no column of this file (columns: "
                              f"{sorted(keys)}); name the prompt column, or set data.prompt_key={DEFAULT_PROMPT_KEY!r} "
                              "for implicit prompts (the shared start of chosen and rejected)")


def files_with_margins(rows) -> set[str]:
    """The files among `rows` (RawRow) that have a margin column: any of their rows has the key."""
    return {row.file for row in rows if row.data is not None and MARGIN_KEY in row.data}


def pair_margin(data: dict[str, Any], *, has_column: bool) -> float:
    """A pair's margin: 0.0 in a file without the column; else its value, which must be a finite number
    (a missing one is an error too: TRL's column holds a margin for every pair)."""
    if not has_column:
        return 0.0
    value = data.get(MARGIN_KEY)
    if value is None:
        raise BadRow("missing_margin", MARGIN_KEY, f"other rows of this file have {MARGIN_KEY!r}; give every pair "
                                                   "one (0 for no margin), or remove the column")
    if not _finite_score(value):
        raise BadRow("bad_margin", MARGIN_KEY, f"{MARGIN_KEY!r} is {value!r}; it must be a finite number")
    return float(value)


def common_prefix_length(a: list | str, b: list | str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def split_text_prompt(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Implicit prompt of two strings: their shared prefix, cut after the last "Assistant:" marker.

    Without a marker the cut is at the last whitespace before they differ, so that whole words go to
    the completions and the completion (not the prompt) carries the space, as BPE tokenizers expect
    (" Paris", not "Paris"; "The cat" / "The car" split as "The" + " cat" / " car", not "The ca" + "t").
    """
    shared = chosen[:common_prefix_length(chosen, rejected)]
    cut = -1
    for marker in ASSISTANT_MARKERS:
        at = shared.rfind(marker)
        if at >= 0:
            cut = at + len(marker)
            break
    if cut < 0:
        cut = max((i for i, ch in enumerate(shared) if ch.isspace()), default=0)
    return chosen[:cut], chosen[cut:], rejected[cut:]


def split_message_prompt(chosen: Messages, rejected: Messages) -> tuple[Messages, Messages, Messages]:
    """Implicit prompt of two conversations: the messages they share, from the start."""
    n = common_prefix_length(chosen, rejected)
    # Keep at least the final turn in each completion, even if the final answers are equal (that
    # case is rejected below as identical completions, with a clear reason).
    n = min(n, len(chosen) - 1, len(rejected) - 1)
    return chosen[:n], chosen[n:], rejected[n:]


def _as_messages(value: str | Messages, role: str) -> Messages:
    return value if isinstance(value, list) else [{"role": role, "content": value}]


def normalize_row(data: dict[str, Any], *, prompt_key: str = "prompt", chosen_key: str = "chosen",
                  rejected_key: str = "rejected") -> Pair:
    """One raw row -> Pair, or BadRow naming the key and the reason."""
    chosen = text_or_messages(data, chosen_key)
    rejected = text_or_messages(data, rejected_key)
    has_prompt = prompt_key in data and data[prompt_key] is not None

    if not has_prompt:
        if isinstance(chosen, str) != isinstance(rejected, str):
            raise BadRow("wrong_type", rejected_key, f"{chosen_key!r} and {rejected_key!r} must both be "
                                                     "strings or both be message lists")
        if isinstance(chosen, str):
            prompt, chosen, rejected = split_text_prompt(chosen, rejected)
        else:
            prompt, chosen, rejected = split_message_prompt(chosen, rejected)
    else:
        prompt = text_or_messages(data, prompt_key)
        if isinstance(prompt, list) or isinstance(chosen, list) or isinstance(rejected, list):
            prompt = _as_messages(prompt, "user")
            chosen = _as_messages(chosen, "assistant")
            rejected = _as_messages(rejected, "assistant")
            # UltraFeedback-style rows repeat the prompt turns at the start of each completion.
            n = len(prompt)
            if chosen[:n] == prompt and rejected[:n] == prompt and len(chosen) > n and len(rejected) > n:
                chosen, rejected = chosen[n:], rejected[n:]

    for key, completion in ((chosen_key, chosen), (rejected_key, rejected)):
        empty = (not completion.strip()) if isinstance(completion, str) else (
            not completion or all(not m["content"].strip() for m in completion))
        if empty:
            raise BadRow("empty_completion", key, f"the {key!r} completion is empty (after removing the prompt)")
    if chosen == rejected:
        raise BadRow("identical_completions", rejected_key,
                     f"{chosen_key!r} and {rejected_key!r} are identical, so the pair carries no preference")
    return Pair(prompt, chosen, rejected)


def is_unpaired_row(data: dict[str, Any], *, completion_key: str, chosen_key: str, rejected_key: str) -> bool:
    """Whether a raw row is in the unpaired shape (it has the completion key and neither pair key)."""
    return completion_key in data and chosen_key not in data and rejected_key not in data


def _is_empty(completion: str | Messages) -> bool:
    if isinstance(completion, str):
        return not completion.strip()
    return not completion or all(not m["content"].strip() for m in completion)


def _label(data: dict[str, Any], label_key: str) -> bool:
    if label_key not in data or data[label_key] is None:
        raise BadRow("missing_label", label_key, f"the unpaired row has no {label_key!r} (keys present: "
                                                 f"{sorted(data)}); give it true (desirable) or false")
    value = data[label_key]
    if not isinstance(value, bool):
        raise BadRow("wrong_label", label_key, f"{label_key!r} must be true or false, found "
                                               f"{type(value).__name__} {value!r}")
    return value


def normalize_unpaired_row(data: dict[str, Any], *, prompt_key: str = "prompt", completion_key: str = "completion",
                           label_key: str = "label") -> LabelledCompletion:
    """One raw unpaired row -> LabelledCompletion, or BadRow naming the key and the reason. The prompt is
    explicit (there is no second completion to find a shared start with)."""
    if prompt_key not in data or data[prompt_key] is None:
        raise BadRow("missing_key", prompt_key, f"the unpaired row has no {prompt_key!r}; unpaired rows need "
                                                f"an explicit prompt (keys present: {sorted(data)})")
    prompt = text_or_messages(data, prompt_key)
    completion = text_or_messages(data, completion_key)
    label = _label(data, label_key)
    if isinstance(prompt, list) or isinstance(completion, list):
        prompt, completion = _as_messages(prompt, "user"), _as_messages(completion, "assistant")
    if _is_empty(completion):
        raise BadRow("empty_completion", completion_key, f"the {completion_key!r} completion is empty")
    return LabelledCompletion(prompt, completion, label)


def unpair_order(num_pairs: int) -> list[tuple[int, bool]]:
    """(pair index, desirable) of each unpaired row that `num_pairs` consecutive pairs become, in TRL's
    order: per chunk of UNPAIR_CHUNK pairs, every chosen completion (desirable), then every rejected one."""
    order = []
    for start in range(0, num_pairs, UNPAIR_CHUNK):
        chunk = range(start, min(start + UNPAIR_CHUNK, num_pairs))
        order += [(i, True) for i in chunk] + [(i, False) for i in chunk]
    return order


def unpair(pair: Pair, desirable: bool) -> LabelledCompletion:
    """One side of a pair as an unpaired row: chosen is desirable, rejected is not."""
    return LabelledCompletion(pair.prompt, pair.chosen if desirable else pair.rejected, desirable)


def is_group_row(data: dict[str, Any], *, completions_key: str) -> bool:
    """Whether a raw row is a group (it has the completions key)."""
    return completions_key in data


def _finite_score(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _group_scores(data: dict[str, Any], scores_key: str, count: int) -> list[float]:
    scores = data.get(scores_key)
    if not isinstance(scores, list):
        raise BadRow("missing_scores" if scores is None else "wrong_type", scores_key,
                     f"a group needs {scores_key!r}, a list of one number per completion (found "
                     f"{type(scores).__name__})")
    if len(scores) != count:
        raise BadRow("score_count", scores_key, f"{len(scores)} scores for {count} completions; give one score "
                                                "per completion")
    bad = [i for i, score in enumerate(scores) if not _finite_score(score)]
    if bad:
        raise BadRow("bad_score", scores_key, f"score {bad[0]} is {scores[bad[0]]!r}; scores must be finite numbers")
    return [float(score) for score in scores]


def normalize_group_row(data: dict[str, Any], *, prompt_key: str = "prompt", completions_key: str = "completions",
                        scores_key: str = "scores") -> ScoredGroup:
    """One raw group row -> ScoredGroup, or BadRow naming the key: fewer than 2 completions, an empty one,
    scores that are not one finite number per completion. The prompt is explicit."""
    if prompt_key not in data or data[prompt_key] is None:
        raise BadRow("missing_key", prompt_key, f"the group has no {prompt_key!r}; groups need an explicit prompt "
                                                f"(keys present: {sorted(data)})")
    prompt = text_or_messages(data, prompt_key)
    raw = data[completions_key]
    if not isinstance(raw, list) or len(raw) < 2:
        found = f"{len(raw)} completion(s)" if isinstance(raw, list) else type(raw).__name__
        raise BadRow("small_group", completions_key, f"{completions_key!r} must list at least 2 completions "
                                                     f"(found {found})")
    completions = [text_or_messages({completions_key: c}, completions_key) for c in raw]
    scores = _group_scores(data, scores_key, len(completions))
    if isinstance(prompt, list) or any(isinstance(c, list) for c in completions):
        prompt, completions = _as_messages(prompt, "user"), [_as_messages(c, "assistant") for c in completions]
    for i, completion in enumerate(completions):
        if _is_empty(completion):
            raise BadRow("empty_completion", completions_key, f"completion {i} is empty")
    return ScoredGroup(prompt, completions, scores)


def pair_as_group(pair: Pair) -> ScoredGroup:
    """A pair as a group of two: chosen scores 1, rejected 0."""
    return ScoredGroup(pair.prompt, [pair.chosen, pair.rejected], [1.0, 0.0])
