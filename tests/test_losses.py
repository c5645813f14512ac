"""Each loss against an independent numpy transcription of ../shared/LOSSES.md, plus the masking,
gradient-scale and config-validation behaviour of preference_loss / validate_loss_config, and what the
loss registry (loss_specs.LOSSES) decides: the config section and the resume fingerprint's loss keys."""

import inspect
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import cdpo, dpo, ipo
from jaxdpo.config import ConfigError
from jaxdpo.preference import loss_specs, losses


# ---- numpy reference, written from LOSSES.md (float64) -------------------------------------------
def np_logsig(x):
    return -np.logaddexp(0.0, -x)


def np_sig(x):
    return 1.0 / (1.0 + np.exp(-x))


def np_log_odds(mean_logprob):
    p = np.exp(mean_logprob)
    return np.log(p / (1.0 - p))


def np_loss(name, pc, pr, rc, rr, nc, nr, beta, eps=0.0, ipo_norm=True, gamma=0.5, lam=0.1, tau=0.05):
    lc, lr = pc - rc, pr - rr
    d = lc - lr
    if name == "sigmoid":
        return -(1 - eps) * np_logsig(beta * d) - eps * np_logsig(-beta * d)
    if name == "ipo":
        dn = (pc / nc - rc / nc) - (pr / nr - rr / nr) if ipo_norm else d
        return (dn - 1 / (2 * beta)) ** 2
    if name == "hinge":
        return np.maximum(0.0, 1 - beta * d)
    if name == "robust":
        return (-(1 - eps) * np_logsig(beta * d) + eps * np_logsig(-beta * d)) / (1 - 2 * eps)
    if name == "exo_pair":
        return (np_sig(beta * d) * (np_logsig(beta * d) - np.log(1 - eps))
                + np_sig(-beta * d) * (np_logsig(-beta * d) - np.log(eps)))
    if name == "nca_pair":
        return -np_logsig(beta * lc) - 0.5 * np_logsig(-beta * lc) - 0.5 * np_logsig(-beta * lr)
    if name == "bco_pair":
        return -np_logsig(beta * lc) - np_logsig(-beta * lr)
    if name == "sppo_hard":
        return (lc - 1 / (2 * beta)) ** 2 + (lr + 1 / (2 * beta)) ** 2
    if name == "aot":
        a = np.sort(pc - pr) - np.sort(rc - rr)
        return -(1 - eps) * np_logsig(beta * a) - eps * np_logsig(-beta * a)
    if name == "aot_unpaired":
        a = np.sort(lc) - np.sort(lr)
        return -(1 - eps) * np_logsig(beta * a) - eps * np_logsig(-beta * a)
    if name == "apo_zero":
        return (1 - np_sig(beta * lc)) + np_sig(beta * lr)
    if name == "apo_down":
        return np_sig(beta * lc) + (1 - np_sig(beta * d))
    if name == "discopop":
        z = beta * d
        m = np_sig(z / tau)
        return (1 - m) * (-np_logsig(z)) + m * np.exp(-z)
    if name == "sigmoid_norm":
        return -np_logsig(beta * (pc / nc - pr / nr - (rc / nc - rr / nr)))
    if name == "simpo":
        return -np_logsig(beta * (pc / nc - pr / nr) - gamma)
    if name == "orpo":
        return -pc / nc - lam * np_logsig(np_log_odds(pc / nc) - np_log_odds(pr / nr))
    raise KeyError(name)


def random_pairs(num_pairs=7, seed=0):
    rng = np.random.default_rng(seed)
    nc = rng.integers(1, 20, num_pairs).astype(np.float64)
    nr = rng.integers(1, 20, num_pairs).astype(np.float64)
    pc = -rng.uniform(0.2, 3.0, num_pairs) * nc
    pr = -rng.uniform(0.2, 3.0, num_pairs) * nr
    rc = pc + rng.normal(0, 2.0, num_pairs)
    rr = pr + rng.normal(0, 2.0, num_pairs)
    return pc, pr, rc, rr, nc, nr


FIXED_PAIRS = tuple(np.array(v, np.float64) for v in (
    [-10.0, -4.0, -30.0], [-12.0, -3.5, -20.0],  # pc, pr
    [-11.0, -4.0, -25.0], [-11.5, -5.0, -26.0],  # rc, rr
    [5.0, 2.0, 12.0], [6.0, 3.0, 9.0]))  # nc, nr

DEFAULT_EPS = {"exo_pair": 0.1}


@pytest.mark.parametrize("name", losses.PAIR_LOSS_NAMES)
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_each_loss_matches_numpy_float64(name, beta):
    eps = DEFAULT_EPS.get(name, 0.0)
    with jax.enable_x64(True):
        for inputs in (FIXED_PAIRS, random_pairs(seed=1), random_pairs(seed=2)):
            got = losses.pair_losses(name, *(jnp.asarray(x) for x in inputs), beta=beta, label_smoothing=eps)
            assert got.dtype == jnp.float64
            want = np_loss(name, *inputs, beta=beta, eps=eps)
            np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-9, err_msg=name)


@pytest.mark.parametrize("name,kwargs,np_kwargs", [
    ("sigmoid", dict(label_smoothing=0.2), dict(eps=0.2)),
    ("robust", dict(label_smoothing=0.3), dict(eps=0.3)),
    ("exo_pair", dict(label_smoothing=0.5), dict(eps=0.5)),
    ("aot", dict(label_smoothing=0.1), dict(eps=0.1)),
    ("aot_unpaired", dict(label_smoothing=0.1), dict(eps=0.1)),
    ("ipo", dict(ipo_length_normalize=False), dict(ipo_norm=False)),
    ("simpo", dict(gamma=1.3), dict(gamma=1.3)),
    ("orpo", dict(lambda_=0.7), dict(lam=0.7)),
    ("discopop", dict(discopop_tau=0.5), dict(tau=0.5)),
])
def test_loss_options_match_numpy(name, kwargs, np_kwargs):
    inputs = random_pairs(seed=5)
    with jax.enable_x64(True):
        got = losses.pair_losses(name, *(jnp.asarray(x) for x in inputs), beta=0.3, **kwargs)
    want = np_loss(name, *inputs, beta=0.3, **np_kwargs)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", losses.PAIR_LOSS_NAMES)
def test_float32_matches_numpy(name):
    eps = DEFAULT_EPS.get(name, 0.0)
    inputs = random_pairs(seed=3)
    got = losses.pair_losses(name, *(jnp.asarray(x, jnp.float32) for x in inputs), beta=0.1, label_smoothing=eps)
    assert got.dtype == jnp.float32
    want = np_loss(name, *(x.astype(np.float32).astype(np.float64) for x in inputs), beta=0.1, eps=eps)
    # fp32 has ~7 digits; the quadratic losses (ipo, sppo_hard) are O(100-1000) in size.
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=1e-5)


def test_reference_free_losses_accept_none_reference():
    pc, pr, _, _, nc, nr = random_pairs()
    for name in ("simpo", "orpo"):
        got = losses.pair_losses(name, pc, pr, None, None, nc, nr, beta=2.0)
        assert got.shape == pc.shape and np.all(np.isfinite(got))
    with pytest.raises(ValueError, match="needs reference logprobs"):
        losses.pair_losses("sigmoid", pc, pr, None, None, nc, nr, beta=0.1)


# ---- sanity facts -------------------------------------------------------------------------------
def test_policy_equal_reference_gives_ln2_zero_margin_zero_accuracy():
    pc, pr, _, _, nc, nr = (jnp.asarray(x, jnp.float32) for x in random_pairs())
    valid = jnp.ones(pc.shape)
    loss_sum, metrics = losses.preference_loss(dpo.get_config().loss, pc, pr, pc, pr, nc, nr, valid)
    num = float(valid.sum())
    assert abs(float(loss_sum) / num - math.log(2.0)) < 1e-6
    assert abs(float(loss_sum) / num - 0.6931471805599453) < 1e-6
    assert float(metrics["rewards/margins"]) == 0.0
    assert float(metrics["rewards/accuracies"]) == 0.0
    assert float(metrics["rewards/chosen"]) == 0.0
    np.testing.assert_allclose(float(metrics["logps/chosen"]), float(pc.sum()), rtol=1e-6)
    np.testing.assert_allclose(float(metrics["logps/rejected"]), float(pr.sum()), rtol=1e-6)
    assert "nll" not in metrics


@pytest.mark.parametrize("beta", [0.05, 0.1, 1.0])
def test_sigmoid_gradient_scales_with_beta_once(beta):
    # d/dpc of -log sigmoid(beta*D) at D = 0 is -beta * sigmoid(0) = -beta/2: a beta applied twice
    # would give -beta^2/2, a missing beta -1/2.
    pc, pr, _, _, nc, nr = (jnp.asarray(x, jnp.float32) for x in random_pairs())
    rc, rr = pc, pr  # the reference is a constant equal to the policy: D = 0
    grad_pair = jax.grad(lambda c: jnp.sum(losses.pair_losses("sigmoid", c, pr, rc, rr, nc, nr, beta=beta)))(pc)
    np.testing.assert_allclose(grad_pair, -beta / 2, rtol=1e-6)

    cfg = dpo.get_config().loss
    cfg.beta = beta
    valid = jnp.ones(pc.shape)
    grad_sum = jax.grad(lambda c: losses.preference_loss(cfg, c, pr, rc, rr, nc, nr, valid)[0])(pc)
    np.testing.assert_allclose(grad_sum, -beta / 2, rtol=1e-6)
    grad_rejected = jax.grad(lambda r: losses.preference_loss(cfg, pc, r, rc, rr, nc, nr, valid)[0])(pr)
    np.testing.assert_allclose(grad_rejected, beta / 2, rtol=1e-6)


def test_extreme_inputs_stay_finite():
    z = jnp.array([-2000.0, -50.0, 0.0, 50.0, 2000.0])
    zeros, ones = jnp.zeros_like(z), jnp.ones_like(z)
    for name in ("sigmoid", "robust", "discopop", "apo_down", "nca_pair", "bco_pair"):
        value, grad = jax.value_and_grad(
            lambda c: jnp.sum(losses.pair_losses(name, c, zeros, zeros, zeros, ones, ones, beta=0.1)))(z)
        assert np.isfinite(value) and np.all(np.isfinite(grad)), name
    # ORPO: mean logprob at exactly 0 (fp32 rounding of a certain token) and very negative.
    mean_lp = jnp.array([0.0, -1e-9, -1e-3, -0.5, -30.0])
    value, grad = jax.value_and_grad(
        lambda c: jnp.sum(losses.pair_losses("orpo", c, c - 1.0, None, None, ones, ones, beta=0.1)))(mean_lp)
    assert np.isfinite(value) and np.all(np.isfinite(grad))
    # The stable log odds equal the textbook form where that is accurate (float64).
    with jax.enable_x64(True):
        m = np.array([-1e-4, -0.1, -0.69, -0.7, -5.0, -30.0])
        np.testing.assert_allclose(np.asarray(loss_specs.log_odds(jnp.asarray(m))), np_log_odds(m), rtol=1e-9)


# ---- preference_loss: combination, masking, sums -------------------------------------------------
def test_weighted_combination_and_nll_match_numpy():
    cfg = dpo.get_config().loss
    cfg.types = ("sigmoid", "bco_pair", "ipo")
    cfg.weights = (0.8, 0.2, 0.05)
    cfg.beta = 0.2
    cfg.nll_coef = 0.3
    inputs = random_pairs(seed=9)
    valid = np.ones(len(inputs[0]))
    with jax.enable_x64(True):
        loss_sum, metrics = losses.preference_loss(cfg, *(jnp.asarray(x) for x in inputs), jnp.asarray(valid))
        loss_sum, metrics = float(loss_sum), {k: float(v) for k, v in metrics.items()}
    pc, pr, rc, rr, nc, nr = inputs
    want = (0.8 * np_loss("sigmoid", *inputs, beta=0.2) + 0.2 * np_loss("bco_pair", *inputs, beta=0.2)
            + 0.05 * np_loss("ipo", *inputs, beta=0.2) + 0.3 * (-pc / nc)).sum()
    np.testing.assert_allclose(loss_sum, want, rtol=1e-9)
    np.testing.assert_allclose(metrics["loss"], want, rtol=1e-9)
    np.testing.assert_allclose(metrics["nll"], (-pc / nc).sum(), rtol=1e-9)
    np.testing.assert_allclose(metrics["rewards/chosen"], (0.2 * (pc - rc)).sum(), rtol=1e-9)
    np.testing.assert_allclose(metrics["rewards/rejected"], (0.2 * (pr - rr)).sum(), rtol=1e-9)
    np.testing.assert_allclose(metrics["rewards/margins"], (0.2 * ((pc - rc) - (pr - rr))).sum(), rtol=1e-9)
    assert metrics["rewards/accuracies"] == float(((pc - rc) > (pr - rr)).sum())


def test_reference_free_rewards_use_beta_times_mean_logps():
    cfg = dpo.get_config().loss
    cfg.types, cfg.weights, cfg.beta, cfg.lambda_ = ("orpo",), (1.0,), 0.5, 0.2
    pc, pr, _, _, nc, nr = random_pairs(seed=4)
    with jax.enable_x64(True):
        loss_sum, metrics = losses.preference_loss(cfg, pc, pr, None, None, nc, nr, np.ones(len(pc)))
    np.testing.assert_allclose(float(loss_sum), np_loss("orpo", pc, pr, 0.0, 0.0, nc, nr, 0.5, lam=0.2).sum(),
                               rtol=1e-9)
    np.testing.assert_allclose(float(metrics["rewards/chosen"]), (0.5 * pc / nc).sum(), rtol=1e-9)
    np.testing.assert_allclose(float(metrics["nll"]), (-pc / nc).sum(), rtol=1e-9)  # ORPO reports its NLL


@pytest.mark.parametrize("name", sorted(losses.REFERENCE_FREE))
def test_reference_free_rewards_whatever_reference_is_given(name):
    """Handed reference logprobs anyway (a run whose reference mode gives them), a reference-free loss still
    reports beta * mean logprob, never log-ratios; a mix with a reference loss reports log-ratios."""
    cfg = dpo.get_config().loss
    cfg.types, cfg.weights, cfg.beta = (name,), (1.0,), 0.5
    pc, pr, rc, rr, nc, nr = random_pairs(seed=5)
    with jax.enable_x64(True):
        _, metrics = losses.preference_loss(cfg, pc, pr, rc, rr, nc, nr, np.ones(len(pc)))
        cfg.types, cfg.weights = (name, "sigmoid"), (1.0, 1.0)
        _, mixed = losses.preference_loss(cfg, pc, pr, rc, rr, nc, nr, np.ones(len(pc)))
    np.testing.assert_allclose(float(metrics["rewards/chosen"]), (0.5 * pc / nc).sum(), rtol=1e-9)
    np.testing.assert_allclose(float(metrics["rewards/rejected"]), (0.5 * pr / nr).sum(), rtol=1e-9)
    np.testing.assert_allclose(float(mixed["rewards/chosen"]), (0.5 * (pc - rc)).sum(), rtol=1e-9)


@pytest.mark.parametrize("name", losses.PAIR_LOSS_NAMES)
def test_padding_pairs_excluded_and_never_nan(name):
    cfg = dpo.get_config().loss
    cfg.types, cfg.weights, cfg.nll_coef = (name,), (1.0,), 0.1
    cfg.label_smoothing = DEFAULT_EPS.get(name, 0.0)
    pc, pr, rc, rr, nc, nr = (x.astype(np.float32) for x in random_pairs(num_pairs=5, seed=6))
    valid = np.array([1, 1, 1, 1, 1, 0, 0, 0], np.float32)
    pad = lambda x, fill: np.concatenate([x, np.full(3, fill, np.float32)])
    # Padding pairs: zero sums and zero lengths; the reference even holds NaN (e.g. from a cache).
    padded = (pad(pc, 0.0), pad(pr, 0.0), pad(rc, np.nan), pad(rr, np.nan), pad(nc, 0.0), pad(nr, 0.0))

    def total(pc_, pr_, inputs):
        return losses.preference_loss(cfg, pc_, pr_, *inputs, jnp.asarray(valid))

    loss_sum, metrics = total(jnp.asarray(padded[0]), jnp.asarray(padded[1]), padded[2:])
    ref_loss, ref_metrics = losses.preference_loss(cfg, pc, pr, rc, rr, nc, nr, np.ones(5, np.float32))
    np.testing.assert_allclose(float(loss_sum), float(ref_loss), rtol=1e-5, atol=1e-6)
    for key, value in ref_metrics.items():
        np.testing.assert_allclose(float(metrics[key]), float(value), rtol=1e-5, atol=1e-6, err_msg=key)

    grads = jax.grad(lambda a, b: total(a, b, padded[2:])[0], argnums=(0, 1))(
        jnp.asarray(padded[0]), jnp.asarray(padded[1]))
    for grad in grads:
        assert np.all(np.isfinite(grad)), (name, grad)
        np.testing.assert_array_equal(grad[5:], 0.0)


def test_aot_padding_pairs_stay_out_of_the_sort():
    pc, pr, rc, rr, nc, nr = (x.astype(np.float32) for x in random_pairs(num_pairs=4, seed=8))
    # Padding pair values that would sort first if they were sorted with the real ones.
    pad = lambda x: np.concatenate([x, np.float32([-1e4, -1e4])])
    valid = np.float32([1, 1, 1, 1, 0, 0])
    for name in ("aot", "aot_unpaired"):
        got = losses.pair_losses(name, *(pad(x) for x in (pc, pr, rc, rr, nc, nr)), beta=0.1, valid=valid)
        want = np_loss(name, *(x.astype(np.float64) for x in (pc, pr, rc, rr, nc, nr)), beta=0.1)
        np.testing.assert_allclose(np.asarray(got[:4]), want, rtol=1e-5)


def test_sums_add_up_across_micro_batches():
    # Gradient accumulation: two half batches' sums equal the whole batch's sum.
    cfg = ipo.get_config().loss
    inputs = [jnp.asarray(x, jnp.float32) for x in random_pairs(num_pairs=8, seed=10)]
    valid = jnp.asarray([1, 1, 1, 0, 1, 1, 1, 1], jnp.float32)
    whole, whole_metrics = losses.preference_loss(cfg, *inputs, valid)
    first, first_metrics = losses.preference_loss(cfg, *(x[:4] for x in inputs), valid[:4])
    second, second_metrics = losses.preference_loss(cfg, *(x[4:] for x in inputs), valid[4:])
    np.testing.assert_allclose(float(first + second), float(whole), rtol=1e-6)
    for key in whole_metrics:
        np.testing.assert_allclose(float(first_metrics[key] + second_metrics[key]), float(whole_metrics[key]),
                                   rtol=1e-5, atol=1e-5)


def test_preference_loss_jits_with_config_dict():
    cfg = cdpo.get_config().loss
    inputs = [jnp.asarray(x, jnp.float32) for x in random_pairs(seed=11)]
    valid = jnp.ones(inputs[0].shape)
    eager = losses.preference_loss(cfg, *inputs, valid)
    jitted = jax.jit(lambda *a: losses.preference_loss(cfg, *a))(*inputs, valid)
    np.testing.assert_allclose(float(jitted[0]), float(eager[0]), rtol=1e-6)
    want = np_loss("sigmoid", *random_pairs(seed=11), beta=0.1, eps=0.1).sum()
    np.testing.assert_allclose(float(eager[0]), want, rtol=1e-5)


# ---- validation ---------------------------------------------------------------------------------
def loss_config(**overrides):
    cfg = dpo.get_config().loss
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def test_shipped_configs_validate():
    for module in (dpo, ipo, cdpo):
        losses.validate_loss_config(module.get_config().loss)
    losses.validate_loss_config(loss_config(types=("simpo",)), has_reference=False)
    losses.validate_loss_config(loss_config(types=("orpo",)), has_reference=False)
    losses.validate_loss_config(loss_config(types=("exo_pair",), label_smoothing=0.001))
    losses.validate_loss_config(loss_config(types=("sigmoid", "bco_pair"), weights=(0.8, 0.2)))
    losses.validate_loss_config({"types": "sigmoid,hinge", "weights": (1.0, 1.0), "beta": 0.1})


@pytest.mark.parametrize("overrides,reference_mode,message", [
    (dict(types=("sigmod",)), "device", r"unknown loss 'sigmod'; did you mean 'sigmoid'\?"),
    (dict(types=("dpo",)), "device", r"unknown loss 'dpo'; DPO's loss is 'sigmoid'"),
    (dict(types=("sigmoid", "sft"), weights=(1.0, 1.0)), "device", r"loss.nll_coef, not a loss type"),
    (dict(types=()), "device", r"loss.types is empty"),
    (dict(types=("sigmoid", "hinge")), "device", r"loss.weights=\(1.0,\) has 1 entries but loss.types"),
    (dict(beta=0.0), "device", r"loss.beta=0.0 must be a finite number > 0"),
    (dict(beta=-0.1), "device", r"loss.beta=-0.1"),
    (dict(label_smoothing=0.6), "device", r"loss.label_smoothing=0.6 is outside \[0.0, 0.5\].*'sigmoid'"),
    (dict(types=("robust",), label_smoothing=0.5), "device", r"outside \[0.0, 0.5\).*'robust'"),
    (dict(types=("exo_pair",), label_smoothing=0.0), "device", r"outside \(0.0, 0.5\].*'exo_pair'"),
    (dict(types=("ipo",), label_smoothing=0.1), "device", r"not defined for loss 'ipo'"),
    (dict(types=("hinge",), label_smoothing=0.1), "device", r"has no effect"),
    (dict(nll_coef=-1.0), "device", r"loss.nll_coef=-1.0 must be >= 0"),
    (dict(types=("discopop",), discopop_tau=0.0), "device", r"loss.discopop_tau=0.0 must be > 0"),
    (dict(types=("sigmoid",)), "none", r"reference.mode='none' but loss.types includes sigmoid"),
    (dict(types=("simpo", "ipo"), weights=(1.0, 1.0)), "none", r"includes ipo, which need a reference"),
])
def test_validation_errors(overrides, reference_mode, message):
    with pytest.raises(ConfigError, match=message):
        losses.validate_loss_config(loss_config(**overrides), has_reference=reference_mode != "none")


def test_orpo_lambda_must_not_be_negative():
    with pytest.raises(ConfigError, match=r"^loss.lambda_=-1.0 must be >= 0 \(ORPO's odds-ratio weight; default 0.1\)$"):
        losses.validate_loss_config(loss_config(types=("orpo",), lambda_=-1.0), has_reference=False)
    losses.validate_loss_config(loss_config(types=("sigmoid",), lambda_=-1.0))  # only ORPO reads it


# ---- the registry: one LossSpec per loss ---------------------------------------------------------
def test_config_section_and_fingerprint_loss_keys_come_from_the_specs():
    from jaxdpo.checkpoint.fingerprint import RESUME_CRITICAL_KEYS, config_fingerprint, fingerprint_differences

    section = dpo.get_config().loss
    assert section.to_dict() == {  # the keys and defaults runs were written with
        "types": ("sigmoid",), "weights": (1.0,), "beta": 0.1, "label_smoothing": 0.0,
        "ipo_length_normalize": True, "gamma": 0.5, "lambda_": 0.1, "discopop_tau": 0.05, "nll_coef": 0.0,
        "desirable_weight": 1.0, "undesirable_weight": 1.0, "group": ""}
    assert {k for k in RESUME_CRITICAL_KEYS if k.startswith("loss")} == {f"loss.{k}" for k in section}
    now = config_fingerprint(dpo.get_config())
    # A checkpoint whose fingerprint holds the section as one nested dict compares key by key.
    nested = {**{k: v for k, v in now.items() if not k.startswith("loss.")}, "loss": section.to_dict()}
    assert fingerprint_differences(nested, now) == []
    changed = dpo.get_config()
    changed.loss.gamma = 1.0
    assert fingerprint_differences(nested, config_fingerprint(changed)) == ["loss.gamma: checkpoint=0.5 now=1.0"]


def test_each_formula_takes_beta_and_exactly_the_settings_its_spec_names():
    keys = set(dpo.get_config().loss)
    for spec in loss_specs.LOSS_SPECS:
        _, *options = inspect.signature(spec.formula).parameters
        assert set(options) == {"beta"} | {s.key for s in spec.settings} <= keys | {"beta"}, spec.name
    assert [spec.name for spec in loss_specs.LOSS_SPECS] == list(losses.LOSS_NAMES)


def test_a_spec_reads_label_smoothing_exactly_when_its_range_allows_some():
    with pytest.raises(ValueError, match="reads loss.label_smoothing exactly when"):
        loss_specs.LossSpec("smoothed", lambda v, *, beta: v.margin, label_smoothing=loss_specs.UP_TO_HALF)
    with pytest.raises(ValueError, match="reads loss.label_smoothing exactly when"):
        loss_specs.LossSpec("plain", lambda v, *, beta, label_smoothing: v.margin,
                            settings=(loss_specs.LABEL_SMOOTHING,))


def test_pair_losses_refuses_a_setting_no_loss_reads():
    with pytest.raises(TypeError, match=r"\['gama'\], which no loss reads"):
        losses.pair_losses("simpo", *random_pairs(), beta=0.1, gama=1.0)
