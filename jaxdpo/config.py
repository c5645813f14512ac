"""Config checks that run before anything is compiled: a bad config is a one-line error, not a trace."""

from __future__ import annotations

import os


class ConfigError(ValueError):
    """A problem with the user's config or inputs; train.py prints it in one line and exits non-zero."""


CHOICES = {
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.param_dtype": ("float32", "bfloat16", "float16"),
    "model.remat": ("none", "full", "dots_saveable"),
    "model.attention": ("xla", "cudnn", "splash"),
    "data.truncation": ("keep_end", "keep_start"),
    "data.layout": ("padded", "prefix_shared", "packed"),
    "data.on_bad_row": ("error", "skip"),
    "reference.mode": ("device", "host", "cached", "lora_base", "none"),
}

POSITIVE = ("data.max_length", "train.batch_size", "train.micro_batch_size", "train.eval_batch_size",
            "train.log_every", "train.eval_every", "train.save_every", "train.keep_checkpoints",
            "train.max_bad_steps", "model.logprob_chunk")


def _get(config, dotted: str):
    value = config
    for part in dotted.split("."):
        value = value[part]
    return value


def validate(config) -> None:
    """Raise ConfigError for the first problem found, in words a user can act on."""
    for key, allowed in CHOICES.items():
        value = _get(config, key)
        if value not in allowed:
            raise ConfigError(f"{key} = {value!r} is not one of {', '.join(allowed)}")
    for key in POSITIVE:
        value = _get(config, key)
        if value <= 0:
            raise ConfigError(f"{key} = {value} must be positive")
    if config.train.steps <= 0 and config.train.epochs <= 0:
        raise ConfigError("set train.steps or train.epochs to a positive number")
    if config.optim.lr <= 0:
        raise ConfigError(f"optim.lr = {config.optim.lr} must be positive")
    if not os.path.isdir(config.model.path):
        raise ConfigError(f"model.path = {config.model.path!r} is not a directory (a Hugging Face "
                          f"checkpoint directory with config.json and *.safetensors)")
    if not os.path.exists(os.path.join(config.model.path, "config.json")):
        raise ConfigError(f"model.path = {config.model.path!r} has no config.json")
    from jaxdpo import losses
    losses.validate_loss_config(config.loss, config.reference.mode)
