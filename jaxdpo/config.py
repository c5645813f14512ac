"""Config checks that run before anything is compiled: a bad config is a one-line error, not a trace.

Two layers: `check_overrides` looks at the `--config.key=value` command-line overrides against the
loaded config file (unknown key with the nearest known one suggested, a value of the wrong type), and
`validate` looks at the finished config: the value ranges and choices of the schema here, then each
module's check of its own section (optimizer, data, model, LoRA, reference, loss, mesh, batch sizes).
"""

from __future__ import annotations

import difflib

from jaxdpo.errors import ConfigError

__all__ = ["ConfigError", "check_overrides", "check_schema", "validate"]


CHOICES = {
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.param_dtype": ("float32", "bfloat16", "float16"),
    "model.remat": ("none", "full", "dots_saveable"),
    "model.attention": ("xla", "cudnn", "splash", "auto"),  # jaxdpo.ops.attention.BACKENDS
    "data.truncation": ("keep_end", "keep_start"),
    "data.layout": ("padded", "prefix_shared", "grouped", "packed"),  # jaxdpo.data.layouts.LAYOUTS
    "data.on_bad_row": ("error", "skip"),
    "reference.mode": ("device", "host", "cached", "lora_base", "none"),
    "objective": ("preference", "reward_model"),  # jaxdpo.training.objectives.KINDS
    "lora.base_dtype": ("none", "int8", "nf4"),  # jaxdpo.models.quantize.BASE_DTYPES
}

POSITIVE = ("data.max_length", "train.batch_size", "train.micro_batch_size", "train.eval_batch_size",
            "train.log_every", "train.eval_every", "train.save_every", "train.keep_checkpoints",
            "train.max_bad_steps", "model.logprob_chunk")

NON_NEGATIVE = ("train.steps", "train.epochs", "data.max_prompt_length", "data.pack_length", "data.max_samples")

# Values that are fractions: (low, high, high_inclusive); low is always inclusive.
FRACTIONS = {"data.eval_fraction": (0.0, 1.0, False)}


def _get(config, dotted: str):
    value = config
    for part in dotted.split("."):
        value = value[part]
    return value


def _has(config, dotted: str) -> bool:
    try:
        _get(config, dotted)
        return True
    except (KeyError, AttributeError, TypeError):
        return False


# ----- command-line overrides -------------------------------------------------------------------------

def flat_keys(config, prefix: str = "") -> dict:
    """{'optim.lr': 5e-4, ...}: every leaf of a (nested) ConfigDict under its dotted key."""
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if hasattr(value, "items") and not isinstance(value, (str, bytes)):
            out.update(flat_keys(value, name + "."))
        else:
            out[name] = value
    return out


def nearest_key(key: str, known) -> str | None:
    """The known dotted key a typo most likely meant: closest full key, else closest leaf name anywhere."""
    known = sorted(known)
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if close:
        return close[0]
    leaf = key.rsplit(".", 1)[-1]
    by_leaf = {}
    for k in known:
        by_leaf.setdefault(k.rsplit(".", 1)[-1], k)
    close = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.75)
    return by_leaf[close[0]] if close else None


def _unknown_key(key: str, known) -> ConfigError:
    suggestion = nearest_key(key, known)
    hint = f" (did you mean '{suggestion}'?)" if suggestion else " (see the config reference in README.md)"
    return ConfigError(f"unknown config key '{key}'{hint}")


_TRUE, _FALSE = ("true", "t", "1", "yes"), ("false", "f", "0", "no")


def _parses_as(kind: type, raw: str) -> bool:
    try:
        if kind is bool:
            return raw.strip().lower() in _TRUE + _FALSE
        if kind is int:
            int(raw, 0) if raw.strip().lower().startswith(("0x", "0o", "0b")) else int(raw)
            return True
        if kind is float:
            float(raw)
            return True
    except ValueError:
        return False
    return True  # str, tuple, None-typed fields: anything is a value ml_collections can hold


def check_override(config, key: str, raw: str | None) -> None:
    """One `--config.<key>[=<raw>]` against the loaded config; raw None = a bare boolean flag."""
    known = flat_keys(config)
    if key not in known:
        if any(k.startswith(key + ".") for k in known):
            raise ConfigError(f"config key '{key}' is a group; set one of its keys, e.g. "
                              f"--config.{next(k for k in sorted(known) if k.startswith(key + '.'))}=...")
        raise _unknown_key(key, known)
    current = known[key]
    kind = type(current)
    if raw is None:
        if kind is not bool:
            raise ConfigError(f"config key '{key}' needs a value: --config.{key}=<{kind.__name__}>")
        return
    if kind in (bool, int, float) and not _parses_as(kind, raw):
        expected = "a bool (true or false)" if kind is bool else kind.__name__
        raise ConfigError(f"config key '{key}' expects {expected}, got {raw!r}")
    if kind is tuple and any(isinstance(v, str) for v in current) and "," in raw \
            and not raw.lstrip().startswith(("(", "[")):
        # absl reads 'a,b' for a tuple of strings as the one string 'a,b'.
        items = ", ".join(repr(part.strip()) for part in raw.split(","))
        raise ConfigError(f"config key '{key}' is a tuple of strings; write --config.{key}=\"({items})\"")


def config_overrides(argv) -> list[tuple[str, str | None]]:
    """[(key, raw value or None)] of every --config.<key> override in argv (absl's forms: `--config.k=v`,
    `--config.k v`, bare `--config.k` and `--noconfig.k` for booleans)."""
    overrides = []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        name = arg.lstrip("-")
        if not arg.startswith("-") or not (name.startswith("config.") or name.startswith("noconfig.")):
            continue
        negated = name.startswith("no")
        name = name.removeprefix("no").removeprefix("config.")
        if negated:
            overrides.append((name, "false"))
        elif "=" in name:
            key, raw = name.split("=", 1)
            overrides.append((key, raw))
        elif i < len(args) and not args[i].startswith("-"):
            overrides.append((name, args[i]))
            i += 1
        else:
            overrides.append((name, None))
    return overrides


def check_schema(config, schema, *, source: str) -> None:
    """A config file's keys against the default config's (`schema`): a key the trainer never reads is a typo."""
    known, given = flat_keys(schema), flat_keys(config)
    for key in sorted(set(given) - set(known)):
        if any(k.startswith(key + ".") for k in known):
            continue  # a group the file left empty
        suggestion = nearest_key(key, known)
        hint = f" (did you mean '{suggestion}'?)" if suggestion else ""
        raise ConfigError(f"{source} sets unknown config key '{key}'{hint}")
    for key in sorted(set(known) - set(given)):
        raise ConfigError(f"{source} has no key '{key}' (default {known[key]!r}); start the config from "
                          f"configs/dpo.py's get_config() and change what differs")


def check_overrides(config, argv) -> None:
    """ConfigError for the first command-line override that names no key or has the wrong type."""
    for key, raw in config_overrides(argv):
        check_override(config, key, raw)


# ----- the finished config ----------------------------------------------------------------------------

def _check_schema_values(config) -> None:
    """Choices, signs and ranges of single keys (the schema); cross-key rules belong to their modules."""
    for key, allowed in CHOICES.items():
        value = _get(config, key)
        if value not in allowed:
            close = difflib.get_close_matches(str(value), allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{key} = {value!r} is not one of {', '.join(allowed)}{hint}")
    for key in POSITIVE:
        if _has(config, key) and not _get(config, key) > 0:
            raise ConfigError(f"{key} = {_get(config, key)} must be positive")
    for key in NON_NEGATIVE:
        if _has(config, key) and _get(config, key) < 0:
            raise ConfigError(f"{key} = {_get(config, key)} must be >= 0")
    for key, (low, high, high_inclusive) in FRACTIONS.items():
        if not _has(config, key):
            continue
        value = _get(config, key)
        if not (low <= value <= high if high_inclusive else low <= value < high):
            raise ConfigError(f"{key} = {value} must be in [{low:g}, {high:g}{']' if high_inclusive else ')'}")


def validate(config) -> None:
    """Raise ConfigError for the first problem found, in words a user can act on."""
    # The owners of each section; imported here because they are heavy (jax) and this module is not.
    from jaxdpo import data
    from jaxdpo.data.batcher import check_batch_sizes
    from jaxdpo.judging import judges
    from jaxdpo.models import hf_io, lora
    from jaxdpo.online import rounds as online
    from jaxdpo.parallel import sequence_parallel, sharding
    from jaxdpo.preference import reference
    from jaxdpo.sampling import samples
    from jaxdpo.training import objectives, optim, trackers

    _check_schema_values(config)
    if config.train.steps <= 0 and config.train.epochs <= 0:
        raise ConfigError("set train.steps or train.epochs to a positive number")
    check_batch_sizes(config.train.batch_size, config.train.micro_batch_size)
    optim.check_config(config.optim)
    sharding.check_mesh_config(config.mesh)
    data.check_data_config(config.data)
    sequence_parallel.check_config(config)
    hf_io.check_model_config(config.model)
    lora_on = lora.check_config(config)
    reference.check_config(config, lora_on=lora_on)
    objectives.objective_kind(config).check_config(config, has_reference=reference.gives_logprobs(config, lora_on=lora_on))
    samples.check_config(config)
    judges.check_config(config)
    online.check_config(config, lora_on=lora_on)
    trackers.check_config(config.logging)
