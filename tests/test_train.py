"""End-to-end behaviour of a DPO run on tiny local assets."""

import math

import jax
import numpy as np
import pytest

from jaxdpo.training.loop import train_and_evaluate
from jaxdpo.training.metrics import read_metrics
from tests.tiny_assets import tiny_run_config


def train(assets, workdir, devices=None, **overrides):
    trainer = train_and_evaluate(tiny_run_config(assets, str(workdir), **overrides), devices=devices)
    return trainer, read_metrics(str(workdir))


def series(records, key):
    return [r[key] for r in records if key in r]


def test_step0_equals_ln2_and_export_matches_transformers(assets, tmp_path):
    trainer, records = train(assets, tmp_path, **{"train.eval_every": 3})
    # The first step's loss is computed before any update, with the policy equal to the reference.
    assert series(records, "train/loss")[0] == pytest.approx(math.log(2), abs=1e-6)
    assert series(records, "train/rewards/margins")[0] == pytest.approx(0.0, abs=1e-6)
    assert series(records, "train/rewards/accuracies")[0] == 0.0
    assert series(records, "eval/loss")[0] == pytest.approx(math.log(2), abs=1e-6)
    assert series(records, "eval/rewards/accuracies")[0] == 0.0
    assert len(series(records, "eval/loss")) == 2  # step 0 and the end
    assert series(records, "train/loss")[-1] < math.log(2)  # it learns

    import torch
    from flax import nnx
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_dir = tmp_path / "hf"
    torch_model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    ids = np.asarray([tokenizer("What color is the owl? The owl is gold.")["input_ids"]], np.int32)
    with torch.no_grad():
        expected = torch_model(torch.from_numpy(ids).long()).logits.numpy()
    model = nnx.merge(trainer.policy.graphdef, trainer.state["params"], trainer.policy.frozen)
    got = np.asarray(model(ids))
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_gradient_accumulation_is_exact(assets, tmp_path):
    one = jax.devices()[:1]
    full, rec_full = train(assets, tmp_path / "1x8", devices=one)
    accum, rec_accum = train(assets, tmp_path / "4x2", devices=one, **{"train.micro_batch_size": 2})
    np.testing.assert_allclose(series(rec_accum, "train/loss"), series(rec_full, "train/loss"), atol=1e-6)
    np.testing.assert_allclose(series(rec_accum, "train/grad_norm"), series(rec_full, "train/grad_norm"), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(accum.state["params"]), jax.tree.leaves(full.state["params"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_eight_devices_match_one(assets, tmp_path):
    _, rec_one = train(assets, tmp_path / "one", devices=jax.devices()[:1])
    _, rec_eight = train(assets, tmp_path / "eight", **{"mesh.fsdp": 8})
    np.testing.assert_allclose(series(rec_eight, "train/loss"), series(rec_one, "train/loss"), atol=1e-5)
    np.testing.assert_allclose(series(rec_eight, "eval/loss"), series(rec_one, "eval/loss"), atol=1e-5)


def test_bf16_compute_over_fp32_master_weights(assets, tmp_path):
    """model.dtype is the compute dtype, model.param_dtype what params and optimizer state are kept in."""
    from flax import nnx

    one = jax.devices()[:1]
    mixed, records = train(assets, tmp_path / "mixed", devices=one,
                           **{"model.dtype": "bfloat16", "model.param_dtype": "float32", "train.export_hf": False})
    assert {x.dtype for x in jax.tree.leaves(mixed.state)} <= {np.dtype(np.float32), np.dtype(np.int32)}
    model = nnx.merge(mixed.policy.graphdef, mixed.state["params"], mixed.policy.frozen)
    ids = np.arange(1, 17, dtype=np.int32)[None]
    assert model.hidden_states(ids).dtype == jax.numpy.bfloat16
    # policy == reference before the first update, so bf16 rounding cancels in the margin
    assert series(records, "train/loss")[0] == pytest.approx(math.log(2), abs=1e-6)
    assert series(records, "train/loss")[-1] < math.log(2)

    # the same (initial) weights through both graphs: only the compute dtype differs
    full, _ = train(assets, tmp_path / "fp32", devices=one, **{"train.steps": 1, "train.export_hf": False})
    in_bf16 = nnx.merge(mixed.policy.graphdef, full.reference.params, full.policy.frozen)
    in_fp32 = nnx.merge(full.policy.graphdef, full.reference.params, full.policy.frozen)
    difference = np.max(np.abs(np.asarray(in_bf16(ids)) - np.asarray(in_fp32(ids))))
    assert 1e-4 < difference < 0.1


# ----- non-finite steps ----------------------------------------------------
@pytest.fixture
def cached_run(assets, tmp_path):
    """A finished 3-step run with a cached reference (its batches carry the reference logprobs)."""
    run, _ = train(assets, tmp_path, devices=jax.devices()[:1], **{"reference.mode": "cached",
                                                                     "train.export_hf": False})
    return run


def with_nan_reference(batch: dict) -> dict:
    nan = np.full(batch["ref_chosen"].shape, np.nan, np.float32)
    return {**batch, "ref_chosen": jax.device_put(nan, batch["ref_chosen"].sharding)}


def test_skipped_step_takes_no_place_in_the_schedule(cached_run):
    from jaxdpo.training.build import fresh_state
    from jaxdpo.training.optim import applied_updates
    from tests.helpers import train_batch

    run = cached_run
    params = jax.tree.map(lambda x: x.copy(), run.state["params"])
    state = fresh_state(run.steps.init, run.steps.state_shardings, params)  # schedule position 0
    step = lambda state, batch: run.steps.train_step(state, run.policy.frozen, run.reference.params, batch)  # noqa: E731
    state, _ = step(state, train_batch(run, 0))  # warmup: rate 0
    state, bad = step(state, with_nan_reference(train_batch(run, 1)))
    assert float(bad["finite"]) == 0.0 and int(state["step"]) == 2 and int(applied_updates(state["opt_state"], default=None)) == 1
    assert float(bad["lr"]) == pytest.approx(float(run.steps.schedule(1)))  # the peak, after one update
    state, good = step(state, train_batch(run, 2))
    assert float(good["finite"]) == 1.0 and int(applied_updates(state["opt_state"], default=None)) == 2
    assert float(good["lr"]) == float(bad["lr"])  # the rate the skipped step would have applied


def test_non_finite_optimizer_state_is_never_committed(cached_run):
    from tests.helpers import train_batch

    run, state = cached_run, cached_run.state
    before = jax.device_get(state["params"])
    # A damaged (restored) first moment: loss and gradient are finite, the update is not.
    state = {**state, "opt_state": jax.tree.map(
        lambda x: x * np.nan if jax.numpy.issubdtype(x.dtype, jax.numpy.floating) else x, state["opt_state"])}
    state, metrics = run.steps.train_step(state, run.policy.frozen, run.reference.params, train_batch(run, 0))
    assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["grad_norm"]))
    assert float(metrics["finite"]) == 0.0 and int(metrics["bad_steps"]) == 1
    for a, b in zip(jax.tree.leaves(jax.device_get(state["params"])), jax.tree.leaves(before)):
        np.testing.assert_array_equal(a, b)
