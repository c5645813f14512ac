"""Reference-free losses build and run no reference, and batch-level losses
(aot, aot_unpaired) give the same loss, metrics and gradients however the global batch is split.

One device, the session's tiny assets (64 train, 16 eval pairs, a 2-layer Llama); every step is built by
the production builders or make_train_step.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxdpo.data.batcher import PairBatcher
from jaxdpo.preference.reference import CachedReference, DeviceReference, NoReference
from jaxdpo.training import batches, build, loop
from jaxdpo.training.objectives import PreferenceObjective
from jaxdpo.training.step import init_state, make_train_step, pair_logprobs

BATCH = 8


def build_run(tiny_config, workdir, **overrides):
    config = tiny_config(workdir, **{"train.batch_size": BATCH, "train.micro_batch_size": BATCH, **overrides})
    mesh = build.make_mesh(config, jax.devices()[:1])
    data = build.build_data(config, mesh)
    policy = build.build_policy(config, mesh, resuming=False)
    return config, mesh, data, policy


class TableReference(CachedReference):
    """Cached reference logprobs joined to each batch by pair id, as reference_cache joins them, from a
    fixed random table. The tiny model is random, so any copy of it ranks the pairs' pc - pr by length
    alone, as the policy does; then aot's sort pairs every pair with itself and no split could change it.
    Logprobs in an unrelated order make the sort pair them differently."""

    def __init__(self, size: int = 64, seed: int = 0):
        super().__init__(cache=None)
        rng = np.random.default_rng(seed)
        self.chosen, self.rejected = (-60.0 + 40.0 * rng.random(size) for _ in range(2))

    def attach(self, split, batch):
        ids, valid = batch["pair_ids"], batch["pair_ids"] >= 0
        lookup = lambda table: np.where(valid, table[np.maximum(ids, 0)], 0.0).astype(np.float32)  # noqa: E731
        return dict(batch, ref_chosen=lookup(self.chosen), ref_rejected=lookup(self.rejected))


def layer_scans(closed_jaxpr, num_layers: int) -> int:
    """Scans over the decoder layers anywhere in a jaxpr: each forward (or its backward) has one."""
    def walk(jaxpr):
        count = 0
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "scan" and eqn.params["length"] == num_layers:
                count += 1
            for value in eqn.params.values():
                for sub in value if isinstance(value, (tuple, list)) else (value,):
                    if isinstance(sub, jax.extend.core.ClosedJaxpr):
                        count += walk(sub.jaxpr)
                    elif isinstance(sub, jax.extend.core.Jaxpr):
                        count += walk(sub)
        return count
    return walk(closed_jaxpr.jaxpr)


# ----- item 10: reference-free losses -------------------------------------------------------------

def test_reference_free_loss_builds_no_reference_and_reports_mean_logprob_rewards(tiny_config, tmp_path):
    config, mesh, data, policy = build_run(tiny_config, tmp_path / "simpo", **{"loss.types": ("simpo",)})
    assert config.reference.mode == "device"  # the default, not changed by the user
    reference = build.build_reference(config, mesh, policy, data)
    assert isinstance(reference, NoReference) and reference.params is None  # no copy held
    steps = build.build_steps(config, mesh, policy, reference, data)
    state = steps.init(policy.params)  # not donated: policy.params stays usable
    batch = batches.train_batch(data.batcher, reference, 0, steps.train_batch_shardings)
    num_layers = policy.model_config.num_layers
    simpo_scans = layer_scans(jax.make_jaxpr(steps.train_step)(state, policy.frozen, reference.params, batch),
                              num_layers)

    # The same step with a loss that needs the reference has one more forward: the reference's.
    dpo_config = tiny_config(tmp_path / "dpo", **{"train.batch_size": BATCH, "train.micro_batch_size": BATCH})
    dpo_reference = build.build_reference(dpo_config, mesh, policy, data)
    assert isinstance(dpo_reference, DeviceReference)
    dpo_steps = build.build_steps(dpo_config, mesh, policy, dpo_reference, data)
    dpo_scans = layer_scans(jax.make_jaxpr(dpo_steps.train_step)(state, policy.frozen, dpo_reference.params, batch),
                            num_layers)
    assert simpo_scans < dpo_scans, (simpo_scans, dpo_scans)

    # Rewards: beta * mean logprob of each completion (TRL's CPO trainer), not log-ratios.
    micro = jax.tree.map(lambda x: x[0], batch)
    values = jax.device_get(pair_logprobs(policy.graphdef, (state["params"], policy.frozen), micro,
                                          num_pairs=BATCH, chunk_size=config.model.logprob_chunk))
    beta = config.loss.beta
    _, metrics = steps.train_step(state, policy.frozen, reference.params, batch)
    metrics = jax.device_get(metrics)
    assert float(metrics["rewards/chosen"]) == pytest.approx(beta * np.mean(values["pc"] / values["nc"]), rel=1e-5)
    assert float(metrics["rewards/rejected"]) == pytest.approx(beta * np.mean(values["pr"] / values["nr"]), rel=1e-5)
    assert float(metrics["rewards/chosen"]) != 0.0


# ----- item 11: batch-level losses are exact under any split --------------------------------------

def split_batch(data, reference, micro_batch_size: int):
    """Step 0's global batch cut into micro-batches of `micro_batch_size` pairs, stacked."""
    batcher = data.batcher
    split = PairBatcher(data.train_pairs, batch_size=BATCH, micro_batch_size=micro_batch_size, shuffle=True,
                        layout=batcher.layout, row_length=data.row_length, process_index=0, process_count=1,
                        row_multiple=data.row_multiple, pad_id=data.pad_id, seed=batcher.seed)
    micro_batches = [reference.attach("train", micro) for micro in split.train_batch(0)]
    return jax.tree.map(jnp.asarray, batches.stack_micro_batches(micro_batches))


@pytest.mark.parametrize("name, splits", [("aot", (BATCH, BATCH // 2, BATCH // 4)),
                                          ("aot_unpaired", (BATCH, BATCH // 4))])
def test_batch_level_loss_is_exact_under_any_micro_batch_split(tiny_config, tmp_path, name, splits):
    config, _, data, policy = build_run(tiny_config, tmp_path, **{"loss.types": (name,)})
    reference = TableReference()
    # SGD with rate 1: the update is minus the gradient, so the gradient can be read back exactly.
    sgd = optax.sgd(1.0)
    results = {}
    for micro in splits:
        batch = split_batch(data, reference, micro)
        assert batch["pair_valid"].shape == (BATCH // micro, micro)
        objective = PreferenceObjective(config.loss, reference=reference, chunk_size=config.model.logprob_chunk)
        step = jax.jit(make_train_step(policy.graphdef, objective=objective, optimizer=sgd,
                                       schedule=optax.constant_schedule(1.0), num_pairs=micro))
        new_state, metrics = step(init_state(policy.params, sgd), policy.frozen, reference.params, batch)
        grads = jax.tree.map(lambda old, new: old - new, policy.params, new_state["params"])
        results[micro] = jax.device_get((metrics, grads))
    whole_metrics, whole_grads = results[BATCH]
    assert abs(float(whole_metrics["loss"]) - np.log(2)) > 1e-3  # the sort matters for this reference
    for micro in splits[1:]:
        metrics, grads = results[micro]
        for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                    "logps/chosen", "logps/rejected", "grad_norm"):
            assert float(metrics[key]) == pytest.approx(float(whole_metrics[key]), rel=1e-6, abs=1e-6), (micro, key)
        for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(whole_grads)):
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_eval_of_a_batch_level_loss_does_not_depend_on_eval_batch_size(tiny_config, tmp_path):
    metrics = {}
    for eval_batch_size in (4, 16):
        config, mesh, data, policy = build_run(tiny_config, tmp_path / str(eval_batch_size),
                                               **{"loss.types": ("aot",), "train.eval_batch_size": eval_batch_size})
        assert data.eval_batcher.num_pairs == 16
        reference = TableReference()
        steps = build.build_steps(config, mesh, policy, reference, data)
        state = {"params": policy.params}
        metrics[eval_batch_size] = loop.evaluate(steps, state, policy, reference, data)
    assert abs(metrics[16]["loss"] - np.log(2)) > 1e-3
    assert metrics[4].keys() == metrics[16].keys()
    for key in metrics[16]:
        assert metrics[4][key] == pytest.approx(metrics[16][key], rel=1e-6, abs=1e-6), key


def test_only_batch_level_losses_take_the_two_pass_step():
    from jaxdpo.training.step import make_gradients

    def gradients(types):
        objective = PreferenceObjective({"types": types}, reference=NoReference(), chunk_size=8)
        return make_gradients(None, objective=objective, num_pairs=2, dropout_seed=None)

    assert "batch_level" in gradients(("sigmoid", "aot")).__qualname__
    for types in (("sigmoid",), ("simpo",), ("ipo", "hinge")):
        assert "accumulated" in gradients(types).__qualname__
