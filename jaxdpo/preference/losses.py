"""The `loss` config section at work: the losses of `loss.types` weighted and summed, their metrics, and
the section's checks. Each loss itself (formula, reference, settings) is a `LossSpec` in loss_specs.py.

`example_loss` is the step's entry: per-example slot sums (pc, pr, nc, nr, rc, rr, and `label` for unpaired
rows; logps, lengths, ref_logps [P, N] and group_scores, group_mask for groups: jaxdpo/data/examples.py) ->
`preference_loss` for pairs, `unpaired_loss` for unpaired rows, `group_loss` for groups. `example_count`
is what the step divides by: valid pairs or rows, and for groups the pairs all_pairs compares or the
groups plackett_luce ranks.
`metric_means` turns the metric sums into the logged means. `preference_loss` returns SUMS over the valid
pairs of a micro-batch; the training step divides by
the number of valid pairs in the whole global batch, so the mean is exact under gradient
accumulation and padding pairs (pair_valid == 0) contribute nothing, not even NaN gradients.
"""

from __future__ import annotations

import difflib
import math

import jax
import jax.numpy as jnp

from jaxdpo.errors import ConfigError
from jaxdpo.preference.loss_specs import (
    BETA, DESIRABLE_WEIGHT, GROUP, LABEL_SMOOTHING, LOSS_SPECS, LOSSES, NLL_COEF, TYPES, UNDESIRABLE_WEIGHT, WEIGHTS,
    ExampleKind, GroupValues, LossSpec, PairValues, Setting, UnpairedValues, mean, plackett_luce,
)

LOSS_NAMES = tuple(LOSSES)
PAIR_LOSS_NAMES = tuple(spec.name for spec in LOSS_SPECS if spec.example_kind is ExampleKind.PAIR)
REFERENCE_FREE = frozenset(spec.name for spec in LOSS_SPECS if not spec.needs_reference)
_LOSS_SETTING_KEYS = frozenset(setting.key for spec in LOSS_SPECS for setting in spec.settings)

# Names other libraries and papers use, for the unknown-loss error message.
OTHER_NAMES = {
    "dpo": "DPO's loss is 'sigmoid'; ",
    "cdpo": "conservative DPO is 'sigmoid' with loss.label_smoothing > 0; ",
    "slic": "SLiC's loss is 'hinge'; ",
    "rpo": "RPO is 'sigmoid' with loss.nll_coef > 0; ",
    "sft": "the SFT/NLL term is loss.nll_coef, not a loss type; ",
    "nll": "the SFT/NLL term is loss.nll_coef, not a loss type; ",
}


def _float(x):
    """As a JAX float array: float32 unless the input is already wider (float64 tests)."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _get(cfg, key, default):
    """Reads a key from an ml_collections ConfigDict, a dict, or any object with attributes."""
    if isinstance(cfg, dict):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def setting_value(loss_cfg, setting: Setting):
    """`loss.<setting.key>`, or its default when absent, as the default's type (float, bool)."""
    return type(setting.default)(_get(loss_cfg, setting.key, setting.default))


def loss_types(loss_cfg) -> tuple[str, ...]:
    """`loss.types` as a tuple of names; a string is read as comma-separated names."""
    types = _get(loss_cfg, TYPES.key, TYPES.default)
    if isinstance(types, str):
        types = [t for t in types.replace(" ", "").split(",") if t]
    return tuple(types)


def loss_weights(loss_cfg) -> tuple[float, ...]:
    """`loss.weights` as floats; empty or missing means weight 1 for every loss type."""
    weights = _get(loss_cfg, WEIGHTS.key, None)
    if weights is None or (not isinstance(weights, str) and len(weights) == 0):
        return (1.0,) * len(loss_types(loss_cfg))
    if isinstance(weights, (int, float)):
        weights = (weights,)
    if isinstance(weights, str):
        weights = [w for w in weights.replace(" ", "").split(",") if w]
    return tuple(float(w) for w in weights)


def loss_spec(name: str) -> LossSpec:
    """The spec of the loss `name`; ValueError for a name no spec has."""
    if name not in LOSSES:
        raise ValueError(f"unknown preference loss {name!r}; known losses: {', '.join(LOSS_NAMES)}")
    return LOSSES[name]


def _known_specs(loss_cfg) -> list[LossSpec]:
    """The specs of loss.types; an unknown name is left for validate_loss_config to report."""
    return [LOSSES[name] for name in loss_types(loss_cfg) if name in LOSSES]


def is_batch_level(loss_cfg) -> bool:
    """True when some loss in loss.types couples the pairs of a batch (aot sorts over it): the train step
    then computes the whole global batch's logprobs before any gradient (jaxdpo/training/step.py)."""
    return any(spec.batch_level for spec in _known_specs(loss_cfg))


def needs_reference(loss_cfg) -> bool:
    """True when some loss in loss.types uses reference logprobs."""
    return any(spec.needs_reference for spec in _known_specs(loss_cfg))


def uses_nll(loss_cfg) -> bool:
    """Whether the chosen NLL is in the objective (loss.nll_coef, or a loss holding it: ORPO)."""
    return setting_value(loss_cfg, NLL_COEF) != 0.0 or any(spec.includes_nll for spec in _known_specs(loss_cfg))


def _per_pair(spec: LossSpec, pairs: tuple, valid, *, beta: float, settings) -> jax.Array:
    """The spec's formula on `pairs` = (pc, pr, rc, rr, nc, nr) float arrays, given its settings by key."""
    pc, pr, rc, rr, nc, nr = pairs
    if spec.needs_reference and (rc is None or rr is None):
        raise ValueError(f"loss {spec.name!r} needs reference logprobs (rc, rr), got None; only "
                         f"{sorted(REFERENCE_FREE)} are reference-free")
    return spec.formula(PairValues.of(pc, pr, rc, rr, nc, nr, valid), beta=beta, **settings)


def pair_losses(name, pc, pr, rc, rr, nc, nr, *, beta, valid=None, **settings):
    """Per-pair loss [P] of the loss `name` (see LOSSES.md). `settings`: `loss.<key>` values by key
    (label_smoothing=0.1, gamma=1.0, ...); the loss reads its own, defaults fill the rest.

    rc, rr may be None for the reference-free losses (simpo, orpo). The batch-level losses (aot,
    aot_unpaired) sort over the pairs given; the training step gives them the whole global batch
    however it is split into micro-batches, eval groups of train.batch_size pairs (jaxdpo/training/step.py).
    `valid` ([P] 0/1, default all valid) keeps padding pairs out of that sort, and their entries then
    sit at the end (the caller masks them).
    """
    if not set(settings) <= _LOSS_SETTING_KEYS:
        raise TypeError(f"pair_losses got {sorted(set(settings) - _LOSS_SETTING_KEYS)}, which no loss reads; "
                        f"loss settings: {sorted(_LOSS_SETTING_KEYS)}")
    spec = loss_spec(name)
    pc, pr, nc, nr = (_float(x) for x in (pc, pr, nc, nr))
    rc, rr = (None if x is None else _float(x) for x in (rc, rr))
    valid = jnp.ones(pc.shape, bool) if valid is None else jnp.asarray(valid) > 0
    own = {setting.key: settings.get(setting.key, setting.default) for setting in spec.settings}
    return _per_pair(spec, (pc, pr, rc, rr, nc, nr), valid, beta=beta, settings=own)


def _padding_cleared(valid, pc, pr, rc, rr, nc, nr) -> tuple:
    """(pc, pr, rc, rr, nc, nr) as floats with harmless values on padding pairs: they may hold garbage (NaN
    from a cache, nc = 0, ...), and masking only the output would still send NaN into the gradient
    (0 * NaN = NaN in the backward pass)."""
    def clean(x, fill):
        return None if x is None else jnp.where(valid, _float(x), fill)

    return clean(pc, 0.0), clean(pr, 0.0), clean(rc, 0.0), clean(rr, 0.0), clean(nc, 1.0), clean(nr, 1.0)


def _weighted_losses(loss_cfg, pairs: tuple, valid, *, beta: float) -> jax.Array:
    """sum_k weights[k] * (loss types[k]) per pair, each loss given its settings from `loss_cfg`."""
    types, weights = loss_types(loss_cfg), loss_weights(loss_cfg)
    if len(types) != len(weights):
        raise ConfigError(f"loss.weights has {len(weights)} entries but loss.types has {len(types)} "
                          f"({', '.join(types)}); give one weight per loss type")
    per_pair = jnp.zeros_like(pairs[0])
    for name, weight in zip(types, weights):
        spec = loss_spec(name)
        settings = {setting.key: setting_value(loss_cfg, setting) for setting in spec.settings}
        per_pair = per_pair + weight * _per_pair(spec, pairs, valid, beta=beta, settings=settings)
    return per_pair


def _rewards(loss_cfg, pairs: tuple, beta: float) -> tuple[jax.Array, jax.Array]:
    """The implicit rewards of the chosen and rejected completions, as TRL logs them."""
    pc, pr, rc, rr, nc, nr = pairs
    if not needs_reference(loss_cfg):
        # Reference-free losses have no log-ratio, whatever reference the run has; like TRL's
        # CPO/SimPO trainer, report beta * (length-averaged) policy logprobs as the rewards.
        return beta * mean(pc, nc), beta * mean(pr, nr)
    return beta * (pc - rc), beta * (pr - rr)


def _metric_sums(pairs: tuple, valid, per_pair, chosen_rewards, rejected_rewards) -> dict[str, jax.Array]:
    pc, pr = pairs[:2]

    def valid_sum(x):
        return jnp.sum(jnp.where(valid, x, 0.0))

    return {
        "loss": valid_sum(per_pair),
        "rewards/chosen": valid_sum(chosen_rewards),
        "rewards/rejected": valid_sum(rejected_rewards),
        "rewards/margins": valid_sum(chosen_rewards - rejected_rewards),
        # Strict: a policy equal to its reference scores 0, not 0.5.
        "rewards/accuracies": valid_sum((chosen_rewards > rejected_rewards).astype(pc.dtype)),
        "logps/chosen": valid_sum(pc),
        "logps/rejected": valid_sum(pr),
    }


def preference_loss(loss_cfg, pc, pr, rc, rr, nc, nr, valid):
    """(loss_sum, metric_sums): sums over the valid pairs of the weighted loss and the metrics.

    loss = sum_k weights[k] * pair_losses(types[k]) + nll_coef * nll, nll = -pc/nc per pair.
    Divide both by the global number of valid pairs. metric_sums holds "loss", "rewards/chosen",
    "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected"
    and "nll" when the NLL is used (nll_coef != 0 or ORPO).
    """
    valid = jnp.asarray(valid) > 0
    pairs = _padding_cleared(valid, pc, pr, rc, rr, nc, nr)
    beta = setting_value(loss_cfg, BETA)
    per_pair = _weighted_losses(loss_cfg, pairs, valid, beta=beta)
    nll = -mean(pairs[0], pairs[4])  # mean NLL over the chosen completion's tokens: -pc/nc
    nll_coef = setting_value(loss_cfg, NLL_COEF)
    if nll_coef != 0.0:
        per_pair = per_pair + nll_coef * nll
    metric_sums = _metric_sums(pairs, valid, per_pair, *_rewards(loss_cfg, pairs, beta))
    if uses_nll(loss_cfg):
        metric_sums["nll"] = jnp.sum(jnp.where(valid, nll, 0.0))
    return metric_sums["loss"], metric_sums


# ----- unpaired rows -------------------------------------------------------------------------------
def group_rule(loss_cfg) -> str:
    """loss.group: "all_pairs", "plackett_luce", or "" when the examples are not groups."""
    return str(_get(loss_cfg, GROUP.key, GROUP.default) or "")


def example_kind(loss_cfg) -> ExampleKind:
    """What the run's examples are: groups when loss.group is set, else what the losses of loss.types take
    (validate_loss_config refuses a mix): pairs or unpaired rows."""
    if group_rule(loss_cfg):
        return ExampleKind.GROUP
    kinds = {spec.example_kind for spec in _known_specs(loss_cfg)}
    return kinds.pop() if len(kinds) == 1 else ExampleKind.PAIR


def needs_kl_rows(loss_cfg) -> bool:
    """Whether each unpaired row must carry its KL completion (a loss estimates KTO's KL term)."""
    return any(spec.kl_rows for spec in _known_specs(loss_cfg))


def _class_sums(values: UnpairedValues, beta: float) -> dict[str, jax.Array]:
    """Sums over the valid desirable ("chosen", as TRL's KTO names them) and undesirable ("rejected") rows."""
    sums = {}
    for name, member in (("chosen", values.valid & values.desirable), ("rejected", values.valid & ~values.desirable)):
        sums[f"rewards/{name}"] = jnp.sum(jnp.where(member, beta * values.logratio, 0.0))
        sums[f"logps/{name}"] = jnp.sum(jnp.where(member, values.logps, 0.0))
        sums[f"count/{name}"] = jnp.sum(member.astype(jnp.float32))
    return sums


def unpaired_loss(loss_cfg, values: UnpairedValues):
    """(loss_sum, metric_sums) over the valid rows: sum_k weights[k] * (loss types[k]) per row (each weighs
    its desirable and undesirable rows by loss.desirable_weight / undesirable_weight), summed; metric sums
    "loss", "kl" (z0 times the valid rows, so that it averages like the others), and per class rewards,
    logps and counts (`metric_means` divides those by their class's count)."""
    beta = setting_value(loss_cfg, BETA)
    per_row = jnp.zeros_like(values.logps)
    for name, weight in zip(loss_types(loss_cfg), loss_weights(loss_cfg)):
        spec = loss_spec(name)
        settings = {setting.key: setting_value(loss_cfg, setting) for setting in spec.settings}
        per_row = per_row + weight * spec.formula(values, beta=beta, **settings)
    rows = jnp.sum(values.valid.astype(jnp.float32))
    kl = values.kl() if values.kl_logps is not None else jnp.zeros((), jnp.float32)
    metric_sums = {"loss": jnp.sum(jnp.where(values.valid, per_row, 0.0)), "kl": kl * rows,
                   **_class_sums(values, beta)}
    return metric_sums["loss"], metric_sums


# ----- groups of N scored completions ---------------------------------------------------------------
def group_values(values: dict, valid) -> GroupValues:
    """The step's group sums (logps, lengths, ref_logps [P, N]) and the batch's group_scores, group_mask."""
    valid = jnp.asarray(valid) > 0
    present = (jnp.asarray(values["group_mask"]) > 0) & valid[:, None]
    clean = lambda x, fill: None if x is None else jnp.where(present, _float(x), fill)  # noqa: E731
    return GroupValues(clean(values["logps"], 0.0), clean(values.get("ref_logps"), 0.0),
                       clean(values["lengths"], 1.0), jnp.asarray(values["group_scores"], jnp.float32), present,
                       valid)


def _ordered_pairs(v: GroupValues) -> tuple[tuple, jax.Array]:
    """Every ordered pair (i better than k) of every group as pair values [P*N*N] (pc, pr, rc, rr, nc, nr) and
    their mask; the pairs that are not (i, k with s_i > s_k) hold harmless values and mask 0."""
    def pair_of(x):
        if x is None:
            return None, None
        n = x.shape[1]
        return (jnp.broadcast_to(x[:, :, None], (x.shape[0], n, n)).reshape(-1),
                jnp.broadcast_to(x[:, None, :], (x.shape[0], n, n)).reshape(-1))

    (pc, pr), (rc, rr), (nc, nr) = pair_of(v.logps), pair_of(v.ref_logps), pair_of(v.lengths)
    return (pc, pr, rc, rr, nc, nr), v.better().reshape(-1)


def group_loss(loss_cfg, values: GroupValues):
    """(loss_sum, metric_sums) of groups. all_pairs: the loss of `preference_loss` summed over every ordered
    pair of different scores; plackett_luce: the Plackett-Luce loss summed over the groups. Either way the
    pair metrics (rewards, accuracies, logps) are sums over those pairs, and "count/pairs", "count/groups"
    count the pairs and the rankable groups (`metric_means` divides by them)."""
    pairs, better = _ordered_pairs(values)
    _, metric_sums = preference_loss(loss_cfg, *pairs, better)
    rankable = values.rankable()
    if group_rule(loss_cfg) == "plackett_luce":
        per_group = plackett_luce(values, beta=setting_value(loss_cfg, BETA))
        metric_sums["loss"] = jnp.sum(jnp.where(rankable, per_group, 0.0))
    metric_sums["count/pairs"] = jnp.sum(better.astype(jnp.float32))
    metric_sums["count/groups"] = jnp.sum(rankable.astype(jnp.float32))
    return metric_sums["loss"], metric_sums


def example_count(loss_cfg, batch: dict) -> jax.Array:
    """What the loss of a batch (any leading axes) is a mean over: valid pairs or unpaired rows; for groups
    the ordered pairs of different scores (all_pairs) or the groups with two different scores (plackett_luce)."""
    valid = jnp.asarray(batch["pair_valid"]).reshape(-1)
    if example_kind(loss_cfg) is not ExampleKind.GROUP:
        return jnp.sum(valid).astype(jnp.float32)
    slots = batch["group_mask"].shape[-1]
    values = GroupValues(None, None, None, jnp.asarray(batch["group_scores"], jnp.float32).reshape(-1, slots),
                         (jnp.asarray(batch["group_mask"]) > 0).reshape(-1, slots), valid > 0)
    counted = values.rankable() if group_rule(loss_cfg) == "plackett_luce" else values.better()
    return jnp.sum(counted.astype(jnp.float32))


def example_loss(loss_cfg, values: dict, valid):
    """(loss_sum, metric_sums) of the per-example values the step computes: slot sums pc, pr (policy), rc, rr
    (reference), nc, nr (lengths), and `label` for unpaired rows, whose slot 2 is the KL completion; for
    groups the [P, N] sums of `group_values`."""
    kind = example_kind(loss_cfg)
    if kind is ExampleKind.GROUP:
        return group_loss(loss_cfg, group_values(values, valid))
    if kind is ExampleKind.PAIR:
        return preference_loss(loss_cfg, values["pc"], values["pr"], values["rc"], values["rr"], values["nc"],
                               values["nr"], valid)
    valid = jnp.asarray(valid) > 0
    pc, pr, rc, rr, nc, _ = _padding_cleared(valid, *(values[k] for k in ("pc", "pr", "rc", "rr", "nc", "nr")))
    kl = needs_kl_rows(loss_cfg)
    return unpaired_loss(loss_cfg, UnpairedValues(pc, rc, nc, jnp.asarray(values["label"]) > 0, valid,
                                                  pr if kl else None, rr if kl else None))


_PER_CLASS = {"rewards/chosen": "count/chosen", "logps/chosen": "count/chosen",
              "rewards/rejected": "count/rejected", "logps/rejected": "count/rejected"}


def metric_means(loss_cfg, metric_sums: dict, count) -> dict:
    """The logged metrics from metric sums over `count` examples (`example_count`): means over the examples;
    for unpaired rows (TRL's KTO metrics) rewards and logps per class are means over that class's rows,
    margins their difference, and the counts stay counts; for groups the loss is over `count`, the pair
    metrics over the compared pairs."""
    kind = example_kind(loss_cfg)
    if kind is ExampleKind.PAIR:
        return {k: v / count for k, v in metric_sums.items()}
    if kind is ExampleKind.GROUP:
        pairs = jnp.maximum(metric_sums["count/pairs"], 1.0)
        return {k: v if k.startswith("count/") else v / (count if k == "loss" else pairs)
                for k, v in metric_sums.items()}
    means = {}
    for key, value in metric_sums.items():
        if key.startswith("count/"):
            means[key] = value
        elif key in _PER_CLASS:
            means[key] = value / jnp.maximum(metric_sums[_PER_CLASS[key]], 1.0)
        else:
            means[key] = value / count
    means["rewards/margins"] = means["rewards/chosen"] - means["rewards/rejected"]
    return means


def class_balance_warning(loss_cfg, num_desirable: int, num_undesirable: int) -> str | None:
    """TRL 1.16 KTOTrainer's warning when desirable and undesirable rows differ in number and neither weight
    lies in the range the KTO paper (eq. 8) recommends for them; None when the weights are fine."""
    if example_kind(loss_cfg) is not ExampleKind.UNPAIRED or num_desirable == num_undesirable:
        return None
    w_d, w_u = setting_value(loss_cfg, DESIRABLE_WEIGHT), setting_value(loss_cfg, UNDESIRABLE_WEIGHT)
    d, u = max(num_desirable, 1), max(num_undesirable, 1)
    d_low, d_high = round(u * w_u / d, 2), round(u * w_u / d * 1.33, 2)
    u_low, u_high = round(d * w_d / u / 1.33, 2), round(d * w_d / u, 2)
    if d_low <= w_d <= d_high or u_low <= w_u <= u_high:
        return None
    return (f"{num_desirable} desirable and {num_undesirable} undesirable rows, but loss.desirable_weight={w_d} and "
            f"loss.undesirable_weight={w_u} do not balance them; set EITHER desirable_weight in [{d_low}, {d_high}] "
            f"or undesirable_weight in [{u_low}, {u_high}] (not both)")


# ----- the `loss` section's checks ------------------------------------------------------------------
def _check_names(types: tuple[str, ...]) -> None:
    if not types:
        raise ConfigError("loss.types is empty; name at least one loss, e.g. ('sigmoid',)")
    for name in types:
        if name not in LOSSES:
            close = difflib.get_close_matches(str(name), LOSS_NAMES, n=1)
            hint = OTHER_NAMES.get(str(name).lower()) or (f"did you mean {close[0]!r}? " if close else "")
            raise ConfigError(f"loss.types has unknown loss {name!r}; {hint}"
                              f"known losses: {', '.join(LOSS_NAMES)}")


def _check_weights(loss_cfg, types: tuple[str, ...]) -> None:
    try:
        weights = loss_weights(loss_cfg)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"loss.weights={_get(loss_cfg, WEIGHTS.key, None)!r} must be a list of "
                          f"numbers, one per loss type ({error})") from None
    if len(weights) != len(types):
        raise ConfigError(f"loss.weights={tuple(weights)} has {len(weights)} entries but loss.types="
                          f"{types} has {len(types)}; give one weight per loss type")
    if not all(math.isfinite(w) for w in weights):
        raise ConfigError(f"loss.weights={tuple(weights)} must be finite numbers")


def _check_settings(loss_cfg, specs: list[LossSpec]) -> None:
    """beta, nll_coef and the settings the chosen losses read, each against its own check."""
    for setting in dict.fromkeys((BETA, NLL_COEF, GROUP, *(s for spec in specs for s in spec.settings))):
        problem = setting.problem(_get(loss_cfg, setting.key, setting.default))
        if problem:
            raise ConfigError(problem)


def _check_label_smoothing(loss_cfg, specs: list[LossSpec], types: tuple[str, ...]) -> None:
    eps = setting_value(loss_cfg, LABEL_SMOOTHING)
    for spec in specs:
        problem = None if spec.label_smoothing is None else spec.label_smoothing.problem(eps, spec.name)
        if problem:
            raise ConfigError(problem)
    if eps != 0.0 and not any(spec.reads_label_smoothing for spec in specs):
        users = [spec.name for spec in LOSS_SPECS if spec.reads_label_smoothing]
        raise ConfigError(f"loss.label_smoothing={eps} has no effect on loss.types={types}; set it "
                          f"to 0 or use one of {', '.join(users)}")


def _check_example_kinds(loss_cfg, specs: list[LossSpec]) -> None:
    kinds = {spec.example_kind for spec in specs}
    if len(kinds) > 1:
        by_kind = {kind.noun: [s.name for s in specs if s.example_kind is kind] for kind in kinds}
        raise ConfigError(f"loss.types mixes losses of pairs and of unpaired rows ({by_kind}); combine losses "
                          "of one kind")
    if kinds == {ExampleKind.UNPAIRED} and setting_value(loss_cfg, NLL_COEF) != 0.0:
        raise ConfigError(f"loss.nll_coef={setting_value(loss_cfg, NLL_COEF)} applies to pairs (the chosen "
                          "completion's NLL); set it to 0 with unpaired losses")


def _check_group(loss_cfg, specs: list[LossSpec], has_reference: bool) -> None:
    """Groups take the pair losses, none that couples the pairs of a batch; plackett_luce is DPO's own
    ranking loss (loss.types = sigmoid, no smoothing) and needs a reference."""
    rule = group_rule(loss_cfg)
    if not rule:
        return
    other = [s.name for s in specs if s.example_kind is not ExampleKind.PAIR or s.batch_level]
    if other:
        raise ConfigError(f"loss.group={rule!r} takes pair losses that score each pair alone; {', '.join(other)} "
                          "cannot (unpaired, or coupling the pairs of a batch)")
    if rule == "plackett_luce":
        plain_dpo = [s.name for s in specs] == ["sigmoid"] and setting_value(loss_cfg, LABEL_SMOOTHING) == 0.0
        if not plain_dpo or setting_value(loss_cfg, NLL_COEF) != 0.0:
            raise ConfigError(f"loss.group='plackett_luce' is sigmoid DPO over a ranking: set loss.types=('sigmoid',), "
                              f"loss.label_smoothing=0 and loss.nll_coef=0 (got types={loss_types(loss_cfg)})")
        if not has_reference:
            raise ConfigError("loss.group='plackett_luce' needs reference logprobs; use a reference mode other "
                              "than none")


def validate_loss_config(loss_cfg, *, has_reference: bool = True) -> None:
    """Raises ConfigError (one sentence: key, value, allowed range) for a bad `loss` config.
    `has_reference`: whether the run's reference gives logprobs (reference.mode 'none' gives none)."""
    types = loss_types(loss_cfg)
    _check_names(types)
    _check_weights(loss_cfg, types)
    specs = [LOSSES[name] for name in types]
    _check_settings(loss_cfg, specs)
    _check_label_smoothing(loss_cfg, specs, types)
    _check_example_kinds(loss_cfg, specs)
    _check_group(loss_cfg, specs, has_reference)
    needing = [spec.name for spec in specs if spec.needs_reference]
    if not has_reference and needing:
        raise ConfigError(f"reference.mode='none' but loss.types includes {', '.join(needing)}, which "
                          f"need a reference model; use a reference mode (device, host, cached, "
                          f"lora_base) or only reference-free losses ({', '.join(sorted(REFERENCE_FREE))})")
