"""AdamW with linear warmup + cosine decay, global-norm clipping, no weight decay on norms and biases.

Two counters: the train state's `step` is the data position (batches consumed, a skipped non-finite step
included), and the optimizer's own count is the number of updates applied. The schedule (and Adam's bias
correction) follows the optimizer's count, so a skipped step takes no place in the schedule: the next
good step gets the rate the bad one would have had, and `train/lr` logs the rate applied
(`applied_updates`). A run with k skipped steps ends k places short of the schedule's end.
"""

import math
import numbers

import jax
import optax

from jaxdpo.errors import ConfigError

# Every numeric `optim` key: (low, high, low_inclusive, high_inclusive, what the range is in words).
# All must be finite: inf passes a sign test, and NaN fails every comparison, so `grad_clip > 0` would
# read NaN as "clipping off".
RANGES = {
    "lr": (0.0, math.inf, False, False, "positive"),
    "eps": (0.0, math.inf, False, False, "positive"),
    "weight_decay": (0.0, math.inf, True, False, ">= 0"),
    "grad_clip": (0.0, math.inf, True, False, ">= 0 (0 = no clipping)"),
    "warmup_steps": (0, math.inf, True, False, ">= 0"),
    "min_lr_ratio": (0.0, 1.0, True, True, "in [0, 1]"),
    "b1": (0.0, 1.0, True, False, "in [0, 1)"),
    "b2": (0.0, 1.0, True, False, "in [0, 1)"),
}


def _in_range(value, low, high, low_inclusive, high_inclusive) -> bool:
    above = value >= low if low_inclusive else value > low
    below = value <= high if high_inclusive else value < high
    return above and below


def check_config(optim_cfg) -> None:
    """ConfigError naming the first `optim` key that is not a finite number in its range."""
    for key, (low, high, low_inclusive, high_inclusive, words) in RANGES.items():
        value = optim_cfg[key]
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ConfigError(f"optim.{key} = {value!r} must be a number {words}")
        if not (math.isfinite(value) and _in_range(value, low, high, low_inclusive, high_inclusive)):
            raise ConfigError(f"optim.{key} = {value} must be {words} and finite")
    if not isinstance(optim_cfg.warmup_steps, numbers.Integral):
        raise ConfigError(f"optim.warmup_steps = {optim_cfg.warmup_steps!r} must be a whole number of steps")


def learning_rate_schedule(optim_cfg, total_steps: int) -> optax.Schedule:
    warmup = min(optim_cfg.warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=optim_cfg.lr,
        warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=optim_cfg.lr * optim_cfg.min_lr_ratio,
    )


def _path_names(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def weight_decay_mask(params):
    """True where weight decay applies: everything but norm scales and biases (as HF/TRL do).

    Decided by name, not rank: stacked layers give a norm scale a [layers, dim] shape that a
    rank test would mistake for a matrix."""
    def decays(path, _):
        name = _path_names(path).lower()
        return not ("norm" in name or "bias" in name)
    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(optim_cfg, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = learning_rate_schedule(optim_cfg, total_steps)
    parts = []
    if optim_cfg.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(optim_cfg.grad_clip))
    parts.append(optax.adamw(schedule, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
                             weight_decay=optim_cfg.weight_decay, mask=weight_decay_mask))
    return optax.chain(*parts), schedule


def applied_updates(opt_state, default):
    """The optimizer's count of applied updates (the schedule's position), from `make_optimizer`'s state;
    `default` for an optimizer that keeps no schedule state (a plain optax transformation in tests)."""
    counts = [s.count for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByScheduleState))
              if isinstance(s, optax.ScaleByScheduleState)]
    return counts[0] if counts else default
