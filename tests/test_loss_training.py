"""Every pair loss (PAIR_LOSS_NAMES; the unpaired ones: tests/test_kto.py) trains the tiny run for a few steps with finite values, and its step-0
loss equals the per-pair formula (LOSSES.md) averaged over the batch.

Cheap by construction: the builders make the data, model and batches once, and one compiled
train step (make_train_step) per reference mode serves every loss. The loss is picked per call by a batch
entry (`loss_index`, traced) through `jax.lax.switch` over the real `losses.preference_loss` of each
loss's config; everything else (logprobs, reference, accumulation, optimizer, non-finite guard) is the
production step. Reference losses train with reference.mode device, reference-free ones with none.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdpo.preference import losses
from jaxdpo.preference.reference import DeviceReference, NoReference, Reference
from jaxdpo.training import build
from jaxdpo.training.batches import stack_micro_batches
from jaxdpo.training.optim import make_optimizer
from jaxdpo.training.objectives import PreferenceObjective
from jaxdpo.training.step import init_state, make_train_step
from tests.tiny_assets import make_run_assets, tiny_run_config

STEPS = 3
BETA, GAMMA, LAMBDA, TAU, EXO_EPS = 0.1, 0.5, 0.1, 0.05, 1e-3
LN2 = math.log(2.0)
METRIC_KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
               "logps/chosen", "logps/rejected", "nll")

# Step 0: the policy IS the reference, so lc = lr = D = 0 and the reference losses are constants.
STEP0_WITH_REFERENCE = {
    "sigmoid": LN2, "robust": LN2, "aot": LN2, "aot_unpaired": LN2, "sigmoid_norm": LN2,
    "ipo": (1 / (2 * BETA)) ** 2,
    "hinge": 1.0,
    "exo_pair": 0.5 * (math.log(0.5) - math.log(1 - EXO_EPS)) + 0.5 * (math.log(0.5) - math.log(EXO_EPS)),
    "nca_pair": 2 * LN2, "bco_pair": 2 * LN2,
    "sppo_hard": 2 * (1 / (2 * BETA)) ** 2,
    "apo_zero": 1.0, "apo_down": 1.0,
    "discopop": 0.5 * LN2 + 0.5,
}


def log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def reference_free_step0(name, pc, pr, nc, nr):
    """simpo / orpo per-pair formulas of LOSSES.md in float64, averaged over the pairs."""
    mc, mr = pc / nc, pr / nr
    if name == "simpo":
        return float(np.mean(-log_sigmoid(BETA * (mc - mr) - GAMMA)))

    def log_odds(m):  # log(p / (1 - p)) with p = e^m (m clamped below 0 as losses.py does)
        m = np.minimum(m, -1e-6)
        return m - np.log1p(-np.exp(m))

    return float(np.mean(-mc - LAMBDA * log_sigmoid(log_odds(mc) - log_odds(mr))))


def loss_config(base, name):
    cfg = base.copy_and_resolve_references()
    cfg.types, cfg.weights = (name,), (1.0,)
    cfg.beta, cfg.gamma, cfg.lambda_, cfg.discopop_tau = BETA, GAMMA, LAMBDA, TAU
    cfg.label_smoothing = EXO_EPS if name == "exo_pair" else 0.0
    cfg.nll_coef = 0.0
    return cfg


class SwitchedLoss:
    """Stands in for `config.loss`: several loss configs, one chosen at run time by a traced index."""

    def __init__(self, names, cfgs):
        self.names, self.cfgs, self.index = names, cfgs, None


class SwitchingReference(Reference):
    """The run's reference, which also tells the switched loss config which loss the micro-batch trains
    (the step asks the reference for its logprobs just before it computes the loss)."""

    def __init__(self, inner, switched):
        super().__init__(inner.params)
        self.inner, self.switched = inner, switched

    def logprobs(self, graphdef, policy_params, frozen, params, micro, **kwargs):
        self.switched.index = micro["loss_index"]  # read by the patched preference_loss while tracing
        return self.inner.logprobs(graphdef, policy_params, frozen, params, micro, **kwargs)


def switched_preference_loss(original):
    def preference_loss(loss_cfg, pc, pr, rc, rr, nc, nr, valid):
        if not isinstance(loss_cfg, SwitchedLoss):
            return original(loss_cfg, pc, pr, rc, rr, nc, nr, valid)
        has_reference = rc is not None

        def branch(name, cfg):
            def run(operands):
                pc, pr, rc, rr, nc, nr, valid = operands
                if name in losses.REFERENCE_FREE:
                    rc = rr = None
                loss_sum, sums = original(cfg, pc, pr, rc, rr, nc, nr, valid)
                return loss_sum, {k: jnp.asarray(sums.get(k, 0.0), jnp.float32) for k in METRIC_KEYS}
            return run

        zeros = jnp.zeros_like(pc)
        operands = (pc, pr, rc if has_reference else zeros, rr if has_reference else zeros, nc, nr, valid)
        loss_sum, sums = jax.lax.switch(loss_cfg.index, [branch(n, c) for n, c in zip(loss_cfg.names, loss_cfg.cfgs)],
                                        operands)
        # Per-pair logprob sums ride along as [P] "metrics" (divided by the valid-pair count like the
        # others), for the reference-free step-0 formulas.
        sums.update({"pair/pc": pc, "pair/pr": pr, "pair/nc": nc, "pair/nr": nr})
        return loss_sum, sums
    return preference_loss


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """{loss name: (per-step metrics, final state)} for every loss, from one build."""
    assets = make_run_assets(str(tmp_path_factory.mktemp("assets")), n_train=24, n_eval=4)
    config = tiny_run_config(assets, str(tmp_path_factory.mktemp("run")),
                             **{"train.steps": STEPS, "data.eval_files": ""})
    mesh = build.make_mesh(config, jax.devices()[:1])
    data = build.build_data(config, mesh)
    policy = build.build_policy(config, mesh, resuming=False)
    batches = [jax.tree.map(jnp.asarray, stack_micro_batches(data.batcher.train_batch(step)))
               for step in range(STEPS)]
    optimizer, schedule = make_optimizer(config.optim, STEPS)
    original = losses.preference_loss
    results = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(losses, "preference_loss", switched_preference_loss(original))
        for reference_mode in ("device", "none"):
            names = [n for n in losses.PAIR_LOSS_NAMES if (n in losses.REFERENCE_FREE) == (reference_mode == "none")]
            for name in names:
                losses.validate_loss_config(loss_config(config.loss, name), has_reference=reference_mode != "none")
            switched = SwitchedLoss(names, [loss_config(config.loss, n) for n in names])
            # Not donated: policy.params stays the initial policy, the device-mode reference.
            inner = DeviceReference(policy.params) if reference_mode == "device" else NoReference()
            objective = PreferenceObjective(switched, reference=SwitchingReference(inner, switched),
                                            chunk_size=config.model.logprob_chunk)
            train_step = jax.jit(make_train_step(policy.graphdef, objective=objective, optimizer=optimizer,
                                                 schedule=schedule, num_pairs=config.train.micro_batch_size))
            reference = inner.params
            for index, name in enumerate(names):
                state = init_state(policy.params, optimizer)
                records = []
                for batch in batches:
                    batch = dict(batch, loss_index=jnp.full(batch["pair_valid"].shape[:1], index, jnp.int32))
                    state, metrics = train_step(state, policy.frozen, reference, batch)
                    records.append(jax.device_get(metrics))
                results[name] = (records, jax.device_get(state), jax.device_get(policy.params))
    return results


@pytest.mark.parametrize("name", losses.PAIR_LOSS_NAMES)
def test_each_loss_trains_with_finite_values(trained, name):
    records, state, initial = trained[name]
    for step, metrics in enumerate(records):
        assert all(np.isfinite(v).all() for v in metrics.values()), (name, step, metrics)
        assert metrics["finite"] == 1.0
    assert int(state["bad_steps"]) == 0
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state["params"]))
    moved = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(initial)))
    assert moved > 0, f"{name}: no parameter changed in {STEPS} steps"

    first = records[0]
    if name in STEP0_WITH_REFERENCE:
        expected = STEP0_WITH_REFERENCE[name]
    else:
        pairs = first["pairs"]  # per-pair entries were divided by the valid-pair count like every metric
        pc, pr, nc, nr = (np.asarray(first[f"pair/{k}"], np.float64) * pairs for k in ("pc", "pr", "nc", "nr"))
        assert (nc >= 1).all() and (pc < 0).all()
        expected = reference_free_step0(name, pc, pr, nc, nr)
    assert first["loss"] == pytest.approx(expected, rel=1e-5, abs=1e-6), name


def test_every_loss_was_trained(trained):
    assert sorted(trained) == sorted(losses.PAIR_LOSS_NAMES)
    # Different objectives move the policy differently: the step-1 losses are not all one value.
    assert len({round(float(trained[n][0][1]["loss"]), 6) for n in losses.PAIR_LOSS_NAMES}) > 8
