"""The preference-loss family, as pure functions of per-pair logprob sums and lengths.

Formulas: ../shared/LOSSES.md. Per pair i: policy sums `pc, pr` (chosen, rejected), reference sums
`rc, rr`, completion lengths `nc, nr`. Log-ratios lc = pc - rc, lr = pr - rr, D = lc - lr.

`preference_loss` returns SUMS over the valid pairs of a micro-batch; the training step divides by
the number of valid pairs in the whole global batch, so the mean is exact under gradient
accumulation and padding pairs (pair_valid == 0) contribute nothing, not even NaN gradients.
"""

from __future__ import annotations

import difflib
import math

import jax
import jax.numpy as jnp

from jaxdpo.errors import ConfigError

LOSS_NAMES = ("sigmoid", "ipo", "hinge", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard",
              "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sigmoid_norm", "simpo",
              "orpo")
REFERENCE_FREE = {"simpo", "orpo"}
BATCH_LEVEL = {"aot", "aot_unpaired"}

# Names other libraries and papers use, for the unknown-loss error message.
OTHER_NAMES = {
    "dpo": "DPO's loss is 'sigmoid'; ",
    "cdpo": "conservative DPO is 'sigmoid' with loss.label_smoothing > 0; ",
    "slic": "SLiC's loss is 'hinge'; ",
    "rpo": "RPO is 'sigmoid' with loss.nll_coef > 0; ",
    "sft": "the SFT/NLL term is loss.nll_coef, not a loss type; ",
    "nll": "the SFT/NLL term is loss.nll_coef, not a loss type; ",
}

# Label smoothing (eps) ranges of the losses that use it; (low, high, low_inclusive, high_inclusive).
LABEL_SMOOTHING_RANGES = {
    "sigmoid": (0.0, 0.5, True, True),
    "aot": (0.0, 0.5, True, True),
    "aot_unpaired": (0.0, 0.5, True, True),
    "robust": (0.0, 0.5, True, False),  # 1/(1-2 eps) blows up at 0.5
    "exo_pair": (0.0, 0.5, False, True),  # log(eps) needs eps > 0
}

# ORPO's log odds need a mean logprob m < 0; fp32 log-softmax can round to exactly 0 (and padding
# pairs have m = 0/1 = 0), where log(1 - e^m) = -inf. Clamp just below 0.
_MAX_MEAN_LOGPROB = -1e-6


def _float(x):
    """As a JAX float array: float32 unless the input is already wider (float64 tests)."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _mean(total, count):
    """total / count with count clamped to >= 1: padding pairs (count 0, total 0) give 0, not NaN."""
    return total / jnp.maximum(count, 1.0)


def _log1mexp(x):
    """log(1 - exp(x)) for x < 0, accurate everywhere (Maechler 2012): expm1 near 0, log1p far."""
    # Both branches are finite for x < 0, so the unselected one cannot poison the gradient.
    near_zero = x > -math.log(2.0)
    x_near = jnp.where(near_zero, x, -1.0)
    x_far = jnp.where(near_zero, -1.0, x)
    return jnp.where(near_zero, jnp.log(-jnp.expm1(x_near)), jnp.log1p(-jnp.exp(x_far)))


def _log_odds(mean_logprob):
    """log(p / (1-p)) with p = exp(m), computed as m - log(1 - exp(m))."""
    m = jnp.minimum(mean_logprob, _MAX_MEAN_LOGPROB)
    return m - _log1mexp(m)


def _smoothed_sigmoid(logits, eps):
    """-(1-eps)·s(z) - eps·s(-z): DPO's loss with label smoothing (cDPO)."""
    return -(1.0 - eps) * jax.nn.log_sigmoid(logits) - eps * jax.nn.log_sigmoid(-logits)


def _sorted_valid_first(values, valid):
    """Sort `values` ascending with invalid entries moved to the end (their values zeroed first,
    so garbage on padding pairs can neither reorder the valid ones nor produce NaN)."""
    clean = jnp.where(valid, values, 0.0)
    # Sort key: invalid entries get +inf so they land at the end; the permutation carries no
    # gradient, the gather below does.
    order = jnp.argsort(jax.lax.stop_gradient(jnp.where(valid, clean, jnp.inf)))
    return clean[order]


def pair_losses(name, pc, pr, rc, rr, nc, nr, *, beta, label_smoothing=0.0, ipo_length_normalize=True,
                gamma=0.5, lambda_=0.1, discopop_tau=0.05, valid=None):
    """Per-pair loss [P] of the loss `name` (see LOSSES.md).

    rc, rr may be None for the reference-free losses (simpo, orpo). The batch-level losses (aot,
    aot_unpaired) sort over the pairs given; the training step gives them the whole global batch
    however it is split into micro-batches, eval groups of train.batch_size pairs (jaxdpo/training/step.py).
    `valid` ([P] 0/1, default all valid) keeps padding pairs out of that sort, and their entries then
    sit at the end (the caller masks them).
    """
    if name not in LOSS_NAMES:
        raise ValueError(f"unknown preference loss {name!r}; known losses: {', '.join(LOSS_NAMES)}")
    if name not in REFERENCE_FREE and (rc is None or rr is None):
        raise ValueError(f"loss {name!r} needs reference logprobs (rc, rr), got None; only "
                         f"{sorted(REFERENCE_FREE)} are reference-free")
    eps = label_smoothing
    pc, pr, nc, nr = (_float(x) for x in (pc, pr, nc, nr))

    if name == "simpo":
        return -jax.nn.log_sigmoid(beta * (_mean(pc, nc) - _mean(pr, nr)) - gamma)
    if name == "orpo":
        nll_chosen = -_mean(pc, nc)
        log_odds_ratio = _log_odds(_mean(pc, nc)) - _log_odds(_mean(pr, nr))
        return nll_chosen - lambda_ * jax.nn.log_sigmoid(log_odds_ratio)

    rc, rr = _float(rc), _float(rr)
    lc, lr = pc - rc, pr - rr
    margin = lc - lr  # D

    if name == "sigmoid":
        return _smoothed_sigmoid(beta * margin, eps)
    if name == "ipo":
        if ipo_length_normalize:
            # The IPO paper's D uses length-averaged logprobs; the sum form is OpenRLHF's / ROLL's.
            margin = _mean(lc, nc) - _mean(lr, nr)
        return (margin - 1.0 / (2.0 * beta)) ** 2
    if name == "hinge":
        return jax.nn.relu(1.0 - beta * margin)
    if name == "robust":
        z = beta * margin
        return (-(1.0 - eps) * jax.nn.log_sigmoid(z) + eps * jax.nn.log_sigmoid(-z)) / (1.0 - 2.0 * eps)
    if name == "exo_pair":
        z = beta * margin
        return (jax.nn.sigmoid(z) * (jax.nn.log_sigmoid(z) - math.log(1.0 - eps))
                + jax.nn.sigmoid(-z) * (jax.nn.log_sigmoid(-z) - math.log(eps)))
    if name == "nca_pair":
        return (-jax.nn.log_sigmoid(beta * lc) - 0.5 * jax.nn.log_sigmoid(-beta * lc)
                - 0.5 * jax.nn.log_sigmoid(-beta * lr))
    if name == "bco_pair":
        return -jax.nn.log_sigmoid(beta * lc) - jax.nn.log_sigmoid(-beta * lr)
    if name == "sppo_hard":
        return (lc - 1.0 / (2.0 * beta)) ** 2 + (lr + 1.0 / (2.0 * beta)) ** 2
    if name in BATCH_LEVEL:
        valid = jnp.ones(pc.shape, bool) if valid is None else jnp.asarray(valid) > 0
        if name == "aot":
            aligned = _sorted_valid_first(pc - pr, valid) - _sorted_valid_first(rc - rr, valid)
        else:
            aligned = _sorted_valid_first(lc, valid) - _sorted_valid_first(lr, valid)
        return _smoothed_sigmoid(beta * aligned, eps)
    if name == "apo_zero":
        return (1.0 - jax.nn.sigmoid(beta * lc)) + jax.nn.sigmoid(beta * lr)
    if name == "apo_down":
        return jax.nn.sigmoid(beta * lc) + (1.0 - jax.nn.sigmoid(beta * margin))
    if name == "discopop":
        z = beta * margin
        log_modulation = jax.nn.log_sigmoid(z / discopop_tau)  # log m
        # m·exp(-z) as exp(log m - z): the naive product is inf·0 = NaN for very negative z.
        return -(1.0 - jax.nn.sigmoid(z / discopop_tau)) * jax.nn.log_sigmoid(z) + jnp.exp(log_modulation - z)
    if name == "sigmoid_norm":
        return -jax.nn.log_sigmoid(beta * (_mean(pc, nc) - _mean(pr, nr) - (_mean(rc, nc) - _mean(rr, nr))))
    raise AssertionError(f"loss {name!r} is listed in LOSS_NAMES but has no formula")


def _get(cfg, key, default):
    """Reads a key from an ml_collections ConfigDict, a dict, or any object with attributes."""
    if isinstance(cfg, dict):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def loss_types(loss_cfg) -> tuple[str, ...]:
    """`loss.types` as a tuple of names; a string is read as comma-separated names."""
    types = _get(loss_cfg, "types", ("sigmoid",))
    if isinstance(types, str):
        types = [t for t in types.replace(" ", "").split(",") if t]
    return tuple(types)


def loss_weights(loss_cfg) -> tuple[float, ...]:
    """`loss.weights` as floats; empty or missing means weight 1 for every loss type."""
    weights = _get(loss_cfg, "weights", None)
    if weights is None or (not isinstance(weights, str) and len(weights) == 0):
        return (1.0,) * len(loss_types(loss_cfg))
    if isinstance(weights, (int, float)):
        weights = (weights,)
    if isinstance(weights, str):
        weights = [w for w in weights.replace(" ", "").split(",") if w]
    return tuple(float(w) for w in weights)


def uses_nll(loss_cfg) -> bool:
    return _get(loss_cfg, "nll_coef", 0.0) != 0.0 or "orpo" in loss_types(loss_cfg)


def preference_loss(loss_cfg, pc, pr, rc, rr, nc, nr, valid):
    """(loss_sum, metric_sums): sums over the valid pairs of the weighted loss and the metrics.

    loss = sum_k weights[k] * pair_losses(types[k]) + nll_coef * nll, nll = -pc/nc per pair.
    Divide both by the global number of valid pairs. metric_sums holds "loss", "rewards/chosen",
    "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected"
    and "nll" when the NLL is used (nll_coef != 0 or ORPO).
    """
    valid = jnp.asarray(valid) > 0
    beta = float(_get(loss_cfg, "beta", 0.1))
    params = dict(
        beta=beta,
        label_smoothing=float(_get(loss_cfg, "label_smoothing", 0.0)),
        ipo_length_normalize=bool(_get(loss_cfg, "ipo_length_normalize", True)),
        gamma=float(_get(loss_cfg, "gamma", 0.5)),
        lambda_=float(_get(loss_cfg, "lambda_", 0.1)),
        discopop_tau=float(_get(loss_cfg, "discopop_tau", 0.05)),
    )
    types, weights = loss_types(loss_cfg), loss_weights(loss_cfg)
    if len(types) != len(weights):
        raise ConfigError(f"loss.weights has {len(weights)} entries but loss.types has {len(types)} "
                          f"({', '.join(types)}); give one weight per loss type")
    pc, pr, nc, nr = (_float(x) for x in (pc, pr, nc, nr))

    # Padding pairs may hold garbage (NaN from a cache, nc = 0, ...). Replace their inputs with
    # harmless values BEFORE the math: masking only the output would still send NaN into the
    # gradient (0 * NaN = NaN in the backward pass).
    def clean(x):
        return None if x is None else jnp.where(valid, _float(x), 0.0)

    pc, pr, rc, rr = clean(pc), clean(pr), clean(rc), clean(rr)
    nc, nr = jnp.where(valid, nc, 1.0), jnp.where(valid, nr, 1.0)

    per_pair = jnp.zeros_like(pc)
    for name, weight in zip(types, weights):
        per_pair = per_pair + weight * pair_losses(name, pc, pr, rc, rr, nc, nr, valid=valid, **params)
    nll = -_mean(pc, nc)  # mean NLL over the chosen completion's tokens
    nll_coef = float(_get(loss_cfg, "nll_coef", 0.0))
    if nll_coef != 0.0:
        per_pair = per_pair + nll_coef * nll

    if not needs_reference(loss_cfg):
        # Reference-free losses have no log-ratio, whatever reference the run has; like TRL's
        # CPO/SimPO trainer, report beta * (length-averaged) policy logprobs as the rewards.
        chosen_rewards, rejected_rewards = beta * _mean(pc, nc), beta * _mean(pr, nr)
    else:
        chosen_rewards, rejected_rewards = beta * (pc - rc), beta * (pr - rr)

    def valid_sum(x):
        return jnp.sum(jnp.where(valid, x, 0.0))

    loss_sum = valid_sum(per_pair)
    metric_sums = {
        "loss": loss_sum,
        "rewards/chosen": valid_sum(chosen_rewards),
        "rewards/rejected": valid_sum(rejected_rewards),
        "rewards/margins": valid_sum(chosen_rewards - rejected_rewards),
        # Strict: a policy equal to its reference scores 0, not 0.5.
        "rewards/accuracies": valid_sum((chosen_rewards > rejected_rewards).astype(pc.dtype)),
        "logps/chosen": valid_sum(pc),
        "logps/rejected": valid_sum(pr),
    }
    if uses_nll(loss_cfg):
        metric_sums["nll"] = valid_sum(nll)
    return loss_sum, metric_sums


def is_batch_level(loss_cfg) -> bool:
    """True when some loss in loss.types couples the pairs of a batch (aot sorts over it): the train step
    then computes the whole global batch's logprobs before any gradient (jaxdpo/training/step.py)."""
    return any(name in BATCH_LEVEL for name in loss_types(loss_cfg))


def needs_reference(loss_cfg) -> bool:
    """True when some loss in loss.types uses reference logprobs."""
    return any(name not in REFERENCE_FREE for name in loss_types(loss_cfg))


def _in_range(value, low, high, low_inclusive, high_inclusive):
    above = value >= low if low_inclusive else value > low
    below = value <= high if high_inclusive else value < high
    return above and below


def validate_loss_config(loss_cfg, *, has_reference: bool = True) -> None:
    """Raises ConfigError (one sentence: key, value, allowed range) for a bad `loss` config.
    `has_reference`: whether the run's reference gives logprobs (reference.mode 'none' gives none)."""
    types = loss_types(loss_cfg)
    if not types:
        raise ConfigError("loss.types is empty; name at least one loss, e.g. ('sigmoid',)")
    for name in types:
        if name not in LOSS_NAMES:
            close = difflib.get_close_matches(str(name), LOSS_NAMES, n=1)
            hint = OTHER_NAMES.get(str(name).lower()) or (f"did you mean {close[0]!r}? " if close else "")
            raise ConfigError(f"loss.types has unknown loss {name!r}; {hint}"
                              f"known losses: {', '.join(LOSS_NAMES)}")
    try:
        weights = loss_weights(loss_cfg)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"loss.weights={_get(loss_cfg, 'weights', None)!r} must be a list of "
                          f"numbers, one per loss type ({error})") from None
    if len(weights) != len(types):
        raise ConfigError(f"loss.weights={tuple(weights)} has {len(weights)} entries but loss.types="
                          f"{types} has {len(types)}; give one weight per loss type")
    if not all(math.isfinite(w) for w in weights):
        raise ConfigError(f"loss.weights={tuple(weights)} must be finite numbers")

    beta = _get(loss_cfg, "beta", 0.1)
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
        raise ConfigError(f"loss.beta={beta!r} must be a finite number > 0 (typical: 0.01 to 0.5)")

    eps = float(_get(loss_cfg, "label_smoothing", 0.0))
    if "ipo" in types and eps != 0.0:
        raise ConfigError(f"loss.label_smoothing={eps} is not defined for loss 'ipo'; set it to 0")
    for name in types:
        if name in LABEL_SMOOTHING_RANGES:
            low, high, low_inc, high_inc = LABEL_SMOOTHING_RANGES[name]
            if not _in_range(eps, low, high, low_inc, high_inc):
                interval = f"{'[' if low_inc else '('}{low}, {high}{']' if high_inc else ')'}"
                hint = "; use a small value such as 1e-3" if name == "exo_pair" else ""
                raise ConfigError(f"loss.label_smoothing={eps} is outside {interval}, the range "
                                  f"allowed for loss {name!r}{hint}")
    if eps != 0.0 and not any(name in LABEL_SMOOTHING_RANGES for name in types):
        raise ConfigError(f"loss.label_smoothing={eps} has no effect on loss.types={types}; set it "
                          f"to 0 or use one of {', '.join(LABEL_SMOOTHING_RANGES)}")

    nll_coef = float(_get(loss_cfg, "nll_coef", 0.0))
    if not (math.isfinite(nll_coef) and nll_coef >= 0):
        raise ConfigError(f"loss.nll_coef={nll_coef} must be >= 0 (0 turns the NLL term off)")
    tau = float(_get(loss_cfg, "discopop_tau", 0.05))
    if "discopop" in types and not (math.isfinite(tau) and tau > 0):
        raise ConfigError(f"loss.discopop_tau={tau} must be > 0 (default 0.05)")
    lambda_ = float(_get(loss_cfg, "lambda_", 0.1))
    if "orpo" in types and not (math.isfinite(lambda_) and lambda_ >= 0):
        raise ConfigError(f"loss.lambda_={lambda_} must be >= 0 (ORPO's odds-ratio weight, default 0.1)")

    if not has_reference and needs_reference(loss_cfg):
        needing = [name for name in types if name not in REFERENCE_FREE]
        raise ConfigError(f"reference.mode='none' but loss.types includes {', '.join(needing)}, which "
                          f"need a reference model; use a reference mode (device, host, cached, "
                          f"lora_base) or only reference-free losses ({', '.join(sorted(REFERENCE_FREE))})")
