"""One `LossSpec` per preference loss: its formula and everything the trainer asks about it.

Formulas: ../shared/LOSSES.md. Per pair i: policy sums `pc, pr` (chosen, rejected), reference sums
`rc, rr`, completion lengths `nc, nr`. Log-ratios lc = pc - rc, lr = pr - rr, D = lc - lr.

Unpaired losses (KTO, LOSSES.md "Unpaired and grouped examples") take per-row values (`UnpairedValues`):
row j's completion sums `logps, ref_logps`, its label (desirable or not), and the sums of its KL completion
(another row's completion after its prompt), from which the batch's KL estimate z0 comes.

Groups of N scored completions (LOSSES.md "Groups of N completions") take `GroupValues` [P, N]; loss.group
says how: `all_pairs` applies the pair losses of loss.types to every ordered pair of different scores
(losses.py), `plackett_luce` is the formula `plackett_luce` here.

`LOSSES` (name -> spec) is the one list of losses. The valid names, which losses need a reference or
see the whole batch, the label-smoothing ranges, the `loss` section of configs/dpo.py
(`config_defaults`) and the resume fingerprint's loss keys (`CONFIG_KEYS`) all come from it. Adding a
loss means writing its formula and its spec here (DEVELOPING.md, "Adding a loss").
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxdpo.data.formats import ExampleKind  # what an example is: a pair, or an unpaired row (data/examples.py)


def _finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclasses.dataclass(frozen=True)
class Check:
    """A condition on a setting's value, and its words in the error message ("must be <words>")."""

    holds: Callable[[Any], bool]
    words: str


POSITIVE = Check(lambda value: _finite_number(value) and value > 0, "> 0")
NON_NEGATIVE = Check(lambda value: _finite_number(value) and value >= 0, ">= 0")


@dataclasses.dataclass(frozen=True)
class Setting:
    """One `loss.<key>` config key: its default (whose type every value is converted to), what it means,
    and an optional check of its value."""

    key: str
    default: Any
    doc: str
    check: Check | None = None

    def problem(self, value) -> str | None:
        """One sentence naming the key when `value` fails the check, else None."""
        if self.check is None or self.check.holds(value):
            return None
        return f"loss.{self.key}={value!r} must be {self.check.words} ({self.doc}; default {self.default!r})"


@dataclasses.dataclass(frozen=True)
class SmoothingRange:
    """The label smoothing (eps) a loss allows; the point [0, 0] means smoothing is not defined for it."""

    low: float
    high: float
    low_inclusive: bool = True
    high_inclusive: bool = True
    hint: str = ""  # appended to the out-of-range message

    def contains(self, eps: float) -> bool:
        above = eps >= self.low if self.low_inclusive else eps > self.low
        below = eps <= self.high if self.high_inclusive else eps < self.high
        return above and below

    def problem(self, eps: float, loss_name: str) -> str | None:
        """One sentence when `eps` is outside the range, else None."""
        if self.contains(eps):
            return None
        if self.high == 0.0:
            return f"loss.label_smoothing={eps} is not defined for loss {loss_name!r}; set it to 0"
        interval = (f"{'[' if self.low_inclusive else '('}{self.low}, {self.high}"
                    f"{']' if self.high_inclusive else ')'}")
        return (f"loss.label_smoothing={eps} is outside {interval}, the range allowed for loss "
                f"{loss_name!r}{self.hint}")


# ----- config keys ---------------------------------------------------------------------------------
TYPES = Setting("types", ("sigmoid",), "the losses to combine, see LOSSES.md / README for the family")
WEIGHTS = Setting("weights", (1.0,), "one weight per loss type")
BETA = Setting("beta", 0.1, "the KL weight, typical: 0.01 to 0.5",
               Check(POSITIVE.holds, "a finite number > 0"))
NLL_COEF = Setting("nll_coef", 0.0, "RPO: adds nll_coef * NLL of the chosen completion; 0 turns it off",
                   NON_NEGATIVE)
GROUP_RULES = ("all_pairs", "plackett_luce")
GROUP = Setting("group", "", "how a group of N scored completions becomes a loss: all_pairs (loss.types over every "
                "pair of different scores) or plackett_luce (DPO under the Plackett-Luce ranking); empty: the "
                "examples are pairs or unpaired rows",
                Check(lambda value: value in ("", *GROUP_RULES), f"one of {('', *GROUP_RULES)}"))
COMMON_SETTINGS = (TYPES, WEIGHTS, BETA, NLL_COEF, GROUP)  # read whatever the loss types are

LABEL_SMOOTHING = Setting("label_smoothing", 0.0, "cDPO / robust / exo_pair / aot epsilon")
IPO_LENGTH_NORMALIZE = Setting("ipo_length_normalize", True, "IPO on length-averaged log-ratios")
GAMMA = Setting("gamma", 0.5, "SimPO target margin, already multiplied into the logit: -s(beta*d - gamma)")
LAMBDA = Setting("lambda_", 0.1, "ORPO's odds-ratio weight", NON_NEGATIVE)
DISCOPOP_TAU = Setting("discopop_tau", 0.05, "DiscoPOP's modulation temperature", POSITIVE)
DESIRABLE_WEIGHT = Setting("desirable_weight", 1.0, "KTO / apo_zero_unpaired: weight of the desirable rows' losses",
                           NON_NEGATIVE)
UNDESIRABLE_WEIGHT = Setting("undesirable_weight", 1.0, "KTO / apo_zero_unpaired: weight of the undesirable "
                             "rows' losses", NON_NEGATIVE)

UP_TO_HALF = SmoothingRange(0.0, 0.5)
NO_SMOOTHING = SmoothingRange(0.0, 0.0)


@dataclasses.dataclass(frozen=True)
class PairValues:
    """The per-pair values [P] of a (micro-)batch that a pair loss reads. Without a reference `rc, rr` and
    the log-ratios `lc, lr, margin` (D) are None; `valid` (bool) marks the real pairs, for the losses that
    sort over the batch. Build one per formula call (`of`): log-ratios shared by several losses would
    change the order of the gradient's sums, and so its last bits."""

    pc: jax.Array
    pr: jax.Array
    rc: jax.Array | None
    rr: jax.Array | None
    nc: jax.Array
    nr: jax.Array
    valid: jax.Array
    lc: jax.Array | None
    lr: jax.Array | None
    margin: jax.Array | None

    @classmethod
    def of(cls, pc, pr, rc, rr, nc, nr, valid) -> PairValues:
        if rc is None or rr is None:
            return cls(pc, pr, rc, rr, nc, nr, valid, None, None, None)
        lc, lr = pc - rc, pr - rr
        return cls(pc, pr, rc, rr, nc, nr, valid, lc, lr, lc - lr)


@dataclasses.dataclass(frozen=True)
class UnpairedValues:
    """The per-row values [P] of unpaired rows: the completion's policy and reference logprob sums, its
    length, `desirable` (bool label) and `valid` (bool); `kl_logps, ref_kl_logps`: the same sums of the row's
    KL completion (None when no loss of the run estimates KL)."""

    logps: jax.Array
    ref_logps: jax.Array
    lengths: jax.Array
    desirable: jax.Array
    valid: jax.Array
    kl_logps: jax.Array | None
    ref_kl_logps: jax.Array | None

    @property
    def logratio(self) -> jax.Array:
        return self.logps - self.ref_logps

    def kl(self) -> jax.Array:
        """KTO's reference point z0 (TRL 1.16): the mean over the valid rows of the KL completions'
        policy-minus-reference logprob sums, detached, clamped at 0."""
        diff = jnp.where(self.valid, self.kl_logps - self.ref_kl_logps, 0.0)
        mean_kl = jnp.sum(diff) / jnp.maximum(jnp.sum(self.valid), 1)
        return jnp.maximum(jax.lax.stop_gradient(mean_kl), 0.0)


@dataclasses.dataclass(frozen=True)
class GroupValues:
    """The per-group values [P, N] of groups of N scored completions: each completion's policy and reference
    logprob sums (`ref_logps` None without a reference), its length and score; `present` (bool) marks the
    completions a group has (groups may be smaller than N), `valid` [P] the real groups.

    Ranking rule: a higher score ranks higher; tied completions share a rank."""

    logps: jax.Array
    ref_logps: jax.Array | None
    lengths: jax.Array
    scores: jax.Array
    present: jax.Array
    valid: jax.Array

    def _member(self) -> jax.Array:
        return self.present & self.valid[:, None]

    def better(self) -> jax.Array:
        """[P, N, N] bool: completion i of a group scores strictly higher than its completion k (an ordered
        pair of all_pairs; ties form none)."""
        member = self._member()
        return member[:, :, None] & member[:, None, :] & (self.scores[:, :, None] > self.scores[:, None, :])

    def ranked_above_last(self) -> jax.Array:
        """[P, N] bool: completions with some completion of their group scored below them (every rank but the
        last), the ones a Plackett-Luce term is written for."""
        return jnp.any(self.better(), axis=2)

    def rankable(self) -> jax.Array:
        """[P] bool: groups with two different scores (all-tied groups carry no preference)."""
        return jnp.any(self.ranked_above_last(), axis=1)


def plackett_luce(v: GroupValues, *, beta) -> jax.Array:
    """Per-group loss [P] of DPO under the Plackett-Luce model, u = beta * (policy - reference) logprob sums:
    -sum over completions i above the last rank of [u_i - logsumexp of u over the completions ranked at or
    below i]. Tied completions share a rank: each is in the others' denominators (Breslow's rule), and the
    lowest-ranked ones write no term. For N = 2 with different scores it is sigmoid DPO, -log s(u_c - u_r)."""
    u = beta * (v.logps - v.ref_logps)
    member = v.present & v.valid[:, None]
    # A completion is always in its own denominator, so every logsumexp is over a non-empty set (finite,
    # with a finite gradient) even on absent completions and padding groups, whose terms are dropped.
    at_or_below = (member[:, None, :] & (v.scores[:, None, :] <= v.scores[:, :, None])) | jnp.eye(
        u.shape[1], dtype=bool)[None]
    denominators = jax.nn.logsumexp(jnp.where(at_or_below, u[:, None, :], -jnp.inf), axis=2)
    return -jnp.sum(jnp.where(v.ranked_above_last(), u - denominators, 0.0), axis=1)


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """A preference loss. `formula(values, *, beta, **settings)` -> per-example loss [P], given the
    values of `settings` (the `loss.<key>` config keys it reads besides beta). `batch_level`: the formula
    couples the examples of a batch, so the training step hands it the whole global batch.
    `label_smoothing`: the eps range it allows; None = it ignores loss.label_smoothing."""

    name: str
    formula: Callable[..., jax.Array]
    needs_reference: bool = True
    batch_level: bool = False
    label_smoothing: SmoothingRange | None = None
    settings: tuple[Setting, ...] = ()
    includes_nll: bool = False  # the formula holds the chosen NLL, so the "nll" metric is reported
    example_kind: ExampleKind = ExampleKind.PAIR
    kl_rows: bool = False  # unpaired: each row also carries its KL completion (KTO's mismatched pairs)

    def __post_init__(self):
        allows_eps = self.label_smoothing is not None and self.label_smoothing.high > 0
        if self.reads_label_smoothing != allows_eps:
            raise ValueError(f"loss {self.name!r}: a loss reads loss.label_smoothing exactly when its "
                             f"label_smoothing range allows a value above 0")

    @property
    def reads_label_smoothing(self) -> bool:
        return LABEL_SMOOTHING in self.settings


# ----- numerics shared by the formulas --------------------------------------------------------------
# ORPO's log odds need a mean logprob m < 0; fp32 log-softmax can round to exactly 0 (and padding
# pairs have m = 0/1 = 0), where log(1 - e^m) = -inf. Clamp just below 0.
_MAX_MEAN_LOGPROB = -1e-6


def mean(total, count):
    """total / count with count clamped to >= 1: padding pairs (count 0, total 0) give 0, not NaN."""
    return total / jnp.maximum(count, 1.0)


def _log1mexp(x):
    """log(1 - exp(x)) for x < 0, accurate everywhere (Maechler 2012): expm1 near 0, log1p far."""
    # Both branches are finite for x < 0, so the unselected one cannot poison the gradient.
    near_zero = x > -math.log(2.0)
    x_near = jnp.where(near_zero, x, -1.0)
    x_far = jnp.where(near_zero, -1.0, x)
    return jnp.where(near_zero, jnp.log(-jnp.expm1(x_near)), jnp.log1p(-jnp.exp(x_far)))


def log_odds(mean_logprob):
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


# ----- the formulas (LOSSES.md), one per loss -------------------------------------------------------
def _sigmoid(v: PairValues, *, beta, label_smoothing):
    return _smoothed_sigmoid(beta * v.margin, label_smoothing)


def _ipo(v: PairValues, *, beta, ipo_length_normalize):
    # The IPO paper's D uses length-averaged logprobs; the sum form is OpenRLHF's / ROLL's.
    margin = mean(v.lc, v.nc) - mean(v.lr, v.nr) if ipo_length_normalize else v.margin
    return (margin - 1.0 / (2.0 * beta)) ** 2


def _hinge(v: PairValues, *, beta):
    return jax.nn.relu(1.0 - beta * v.margin)


def _robust(v: PairValues, *, beta, label_smoothing):
    z, eps = beta * v.margin, label_smoothing
    return (-(1.0 - eps) * jax.nn.log_sigmoid(z) + eps * jax.nn.log_sigmoid(-z)) / (1.0 - 2.0 * eps)


def _exo_pair(v: PairValues, *, beta, label_smoothing):
    z, eps = beta * v.margin, label_smoothing
    return (jax.nn.sigmoid(z) * (jax.nn.log_sigmoid(z) - math.log(1.0 - eps))
            + jax.nn.sigmoid(-z) * (jax.nn.log_sigmoid(-z) - math.log(eps)))


def _nca_pair(v: PairValues, *, beta):
    return (-jax.nn.log_sigmoid(beta * v.lc) - 0.5 * jax.nn.log_sigmoid(-beta * v.lc)
            - 0.5 * jax.nn.log_sigmoid(-beta * v.lr))


def _bco_pair(v: PairValues, *, beta):
    return -jax.nn.log_sigmoid(beta * v.lc) - jax.nn.log_sigmoid(-beta * v.lr)


def _sppo_hard(v: PairValues, *, beta):
    return (v.lc - 1.0 / (2.0 * beta)) ** 2 + (v.lr + 1.0 / (2.0 * beta)) ** 2


def _aot(v: PairValues, *, beta, label_smoothing):
    aligned = _sorted_valid_first(v.pc - v.pr, v.valid) - _sorted_valid_first(v.rc - v.rr, v.valid)
    return _smoothed_sigmoid(beta * aligned, label_smoothing)


def _aot_unpaired(v: PairValues, *, beta, label_smoothing):
    aligned = _sorted_valid_first(v.lc, v.valid) - _sorted_valid_first(v.lr, v.valid)
    return _smoothed_sigmoid(beta * aligned, label_smoothing)


def _apo_zero(v: PairValues, *, beta):
    return (1.0 - jax.nn.sigmoid(beta * v.lc)) + jax.nn.sigmoid(beta * v.lr)


def _apo_down(v: PairValues, *, beta):
    return jax.nn.sigmoid(beta * v.lc) + (1.0 - jax.nn.sigmoid(beta * v.margin))


def _discopop(v: PairValues, *, beta, discopop_tau):
    z = beta * v.margin
    log_modulation = jax.nn.log_sigmoid(z / discopop_tau)  # log m
    # m·exp(-z) as exp(log m - z): the naive product is inf·0 = NaN for very negative z.
    return -(1.0 - jax.nn.sigmoid(z / discopop_tau)) * jax.nn.log_sigmoid(z) + jnp.exp(log_modulation - z)


def _sigmoid_norm(v: PairValues, *, beta):
    return -jax.nn.log_sigmoid(beta * (mean(v.pc, v.nc) - mean(v.pr, v.nr) - (mean(v.rc, v.nc) - mean(v.rr, v.nr))))


def _simpo(v: PairValues, *, beta, gamma):
    return -jax.nn.log_sigmoid(beta * (mean(v.pc, v.nc) - mean(v.pr, v.nr)) - gamma)


def _orpo(v: PairValues, *, beta, lambda_):
    del beta  # ORPO's loss has no beta; it scales only the reported rewards
    nll_chosen = -mean(v.pc, v.nc)
    log_odds_ratio = log_odds(mean(v.pc, v.nc)) - log_odds(mean(v.pr, v.nr))
    return nll_chosen - lambda_ * jax.nn.log_sigmoid(log_odds_ratio)


def _kto(v: UnpairedValues, *, beta, desirable_weight, undesirable_weight):
    z0 = v.kl()
    desirable = desirable_weight * (1.0 - jax.nn.sigmoid(beta * (v.logratio - z0)))
    undesirable = undesirable_weight * (1.0 - jax.nn.sigmoid(beta * (z0 - v.logratio)))
    return jnp.where(v.desirable, desirable, undesirable)


def _apo_zero_unpaired(v: UnpairedValues, *, beta, desirable_weight, undesirable_weight):
    desirable = desirable_weight * (1.0 - jax.nn.sigmoid(beta * v.logratio))
    undesirable = undesirable_weight * jax.nn.sigmoid(beta * v.logratio)
    return jnp.where(v.desirable, desirable, undesirable)


CLASS_WEIGHTS = (DESIRABLE_WEIGHT, UNDESIRABLE_WEIGHT)
LOSS_SPECS = (
    LossSpec("sigmoid", _sigmoid, label_smoothing=UP_TO_HALF, settings=(LABEL_SMOOTHING,)),
    LossSpec("ipo", _ipo, label_smoothing=NO_SMOOTHING, settings=(IPO_LENGTH_NORMALIZE,)),
    LossSpec("hinge", _hinge),
    LossSpec("robust", _robust, settings=(LABEL_SMOOTHING,),
             label_smoothing=SmoothingRange(0.0, 0.5, high_inclusive=False)),  # 1/(1-2 eps) blows up at 0.5
    LossSpec("exo_pair", _exo_pair, settings=(LABEL_SMOOTHING,),  # log(eps) needs eps > 0
             label_smoothing=SmoothingRange(0.0, 0.5, low_inclusive=False, hint="; use a small value such as 1e-3")),
    LossSpec("nca_pair", _nca_pair),
    LossSpec("bco_pair", _bco_pair),
    LossSpec("sppo_hard", _sppo_hard),
    LossSpec("aot", _aot, batch_level=True, label_smoothing=UP_TO_HALF, settings=(LABEL_SMOOTHING,)),
    LossSpec("aot_unpaired", _aot_unpaired, batch_level=True, label_smoothing=UP_TO_HALF,
             settings=(LABEL_SMOOTHING,)),
    LossSpec("apo_zero", _apo_zero),
    LossSpec("apo_down", _apo_down),
    LossSpec("discopop", _discopop, settings=(DISCOPOP_TAU,)),
    LossSpec("sigmoid_norm", _sigmoid_norm),
    LossSpec("simpo", _simpo, needs_reference=False, settings=(GAMMA,)),
    LossSpec("orpo", _orpo, needs_reference=False, settings=(LAMBDA,), includes_nll=True),
    # z0 averages the KL rows of the whole global batch, so KTO is batch-level: exact for any split
    LossSpec("kto", _kto, batch_level=True, settings=CLASS_WEIGHTS, example_kind=ExampleKind.UNPAIRED,
             kl_rows=True),
    LossSpec("apo_zero_unpaired", _apo_zero_unpaired, settings=CLASS_WEIGHTS, example_kind=ExampleKind.UNPAIRED),
)
LOSSES: dict[str, LossSpec] = {spec.name: spec for spec in LOSS_SPECS}


def _all_settings() -> tuple[Setting, ...]:
    """The common settings, then each loss's own in registry order, once each (a key two losses read
    must be one Setting, so it has one default)."""
    found: dict[str, Setting] = {}
    for setting in (*COMMON_SETTINGS, *(s for spec in LOSS_SPECS for s in spec.settings)):
        if found.setdefault(setting.key, setting) != setting:
            raise ValueError(f"loss.{setting.key} is declared twice with different defaults or docs")
    return tuple(found.values())


SETTINGS = _all_settings()
CONFIG_KEYS = tuple(f"loss.{setting.key}" for setting in SETTINGS)  # every key of the `loss` section


def config_defaults() -> dict[str, Any]:
    """The `loss` config section: every key with its default."""
    return {setting.key: setting.default for setting in SETTINGS}
