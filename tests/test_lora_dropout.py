"""LoRA adapter dropout (lora.dropout): PEFT's adapter-input dropout, keyed by (seed, step, micro-batch)."""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxdpo.models import Decoder
from jaxdpo.models.lora import LoRAParam, LoRASettings
from jaxdpo.training.loop import train_and_evaluate
from jaxdpo.training.metrics import read_metrics
from tests.helpers import LORA, TINY, lora_ids, series, train_batch
from tests.tiny_assets import tiny_run_config

IDS = lora_ids()


# ---- adapter dropout ------------------------------------------------------------------------------------

DROPOUT_STREAMS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def adapter_grads(model, ids, weights, key):
    """d sum(weights * logits) / d adapters, with LoRA dropout keyed by `key` (None = no dropout)."""
    graphdef, adapters, frozen = nnx.split(model, LoRAParam, ...)
    return dict(nnx.to_flat_state(_adapter_grads(graphdef, adapters, frozen, ids, weights, key)))


@functools.partial(jax.jit, static_argnums=0)  # weights and keys as arguments: one compile per model shape
def _adapter_grads(graphdef, adapters, frozen, ids, weights, key):
    def loss(adapters):
        return jnp.sum(weights * nnx.merge(graphdef, adapters, frozen)(ids, lora_dropout_key=key))

    return jax.grad(loss)(adapters)


@functools.partial(jax.jit, static_argnums=0)
def _logits(graphdef, state, key):
    return nnx.merge(graphdef, state)(IDS, lora_dropout_key=key)


def test_dropout_drops_each_adapters_input_with_its_own_mask():
    """With B = 0 and A = [I 0], one token: dL/dB of an adapter is outer(dropout(x), g) for its input x and
    output cotangent g, i.e. row i of the no-dropout gradient times mask_i / (1 - p), where the mask is the
    one drawn from fold_in(fold_in(key, layer), target stream). Attention over one token gives q and k no
    gradient, so the check covers the other five targets."""
    rate, rank = 0.5, 64
    targets = ("v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    in_dims = {"v_proj": (32,), "o_proj": (4, 8), "gate_proj": (32,), "up_proj": (32,), "down_proj": (64,)}
    model = Decoder(TINY, lora=LoRASettings(rank=rank, alpha=float(rank), targets=targets, dropout=rate),
                    rngs=nnx.Rngs(0))
    for t in targets:  # A = [I 0]: the adapter's down projection is its input itself (padded to the rank)
        var = getattr(model.layers, f"{t}_lora_a")
        n_in = math.prod(in_dims[t])
        var[...] = jnp.broadcast_to(jnp.eye(n_in, rank).reshape(*in_dims[t], rank), var[...].shape)
    ids = jnp.asarray([[5]], jnp.int32)
    weights = jax.random.normal(jax.random.key(1), (1, 1, TINY.vocab_size))
    key = jax.random.key(7)
    dropped, plain = adapter_grads(model, ids, weights, key), adapter_grads(model, ids, weights, None)

    masks = {}
    for layer in range(TINY.num_layers):
        layer_key = jax.random.fold_in(key, layer)
        for t in targets:
            stream = jax.random.fold_in(layer_key, DROPOUT_STREAMS.index(t))
            mask = np.asarray(jax.random.bernoulli(stream, 1 - rate, (1, 1, *in_dims[t]))).reshape(-1)
            assert 0 < mask.sum() < mask.size
            masks[layer, t] = mask
            name = ("layers", f"{t}_lora_b")
            got = np.asarray(dropped[name][...][layer]).reshape(rank, -1)
            no_dropout = np.asarray(plain[name][...][layer]).reshape(rank, -1)
            assert np.abs(no_dropout).max() > 1e-4, (layer, t)  # a real gradient to compare against
            expected = np.zeros_like(no_dropout)
            expected[:mask.size] = (mask / (1 - rate))[:, None] * no_dropout[:mask.size]
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-9, err_msg=f"layer {layer} {t}")
            # with B = 0 nothing reaches A, dropout or not
            assert not np.asarray(dropped[("layers", f"{t}_lora_a")][...]).any()
    assert not np.array_equal(masks[0, "gate_proj"], masks[0, "up_proj"])  # same input, independent masks
    assert not np.array_equal(masks[0, "gate_proj"], masks[1, "gate_proj"])  # and per layer


def adapted_tiny(rate: float, remat: str = "none"):
    """TINY with all-linear adapters whose B is non-zero (so they change the logits)."""
    model = Decoder(TINY, remat=remat, lora=LoRASettings(rank=4, alpha=8.0, targets=DROPOUT_STREAMS, dropout=rate),
                    lora_seed=1, rngs=nnx.Rngs(0))
    for t in DROPOUT_STREAMS:
        var = getattr(model.layers, f"{t}_lora_b")
        var[...] = 0.3 * jax.random.normal(jax.random.key(DROPOUT_STREAMS.index(t)), var[...].shape)
    return model


def test_dropout_needs_a_key_and_a_rate_and_remat_redraws_the_same_masks():
    key = jax.random.key(3)
    forward = lambda model, key: np.asarray(_logits(*nnx.split(model), key))
    off, on = adapted_tiny(0.0), adapted_tiny(0.3)
    no_dropout = forward(off, None)
    np.testing.assert_array_equal(forward(off, key), no_dropout)  # rate 0: the key changes nothing
    np.testing.assert_array_equal(forward(on, None), no_dropout)  # no key (eval, export): no dropout
    with_key = forward(on, key)
    assert np.abs(with_key - no_dropout).max() > 1e-3
    np.testing.assert_array_equal(forward(on, key), with_key)  # a pure function of the key
    assert np.abs(forward(on, jax.random.key(4)) - with_key).max() > 1e-3

    weights = jax.random.normal(jax.random.key(1), (*IDS.shape, TINY.vocab_size))
    reference = adapter_grads(on, IDS, weights, key)
    other_masks = adapter_grads(on, IDS, weights, jax.random.key(4))
    size = max(float(jnp.abs(g[...]).max()) for g in reference.values())
    gap = lambda grads: max(float(jnp.abs(grads[n][...] - g[...]).max()) for n, g in reference.items()) / size
    assert gap(other_masks) > 1e-2  # other masks move the gradients visibly
    for remat in ("full", "dots_saveable"):  # the rematerialized forward must drop the same units
        assert gap(adapter_grads(adapted_tiny(0.3, remat), IDS, weights, key)) < 1e-5, remat  # fp32 rounding


DROPOUT_RUN = {**LORA, "lora.dropout": 0.1, "lora.export_merged": False, "train.batch_size": 16,
               "train.steps": 4, "train.eval_every": 4, "train.save_every": 2}  # 2 micro-batches per step


@pytest.fixture(scope="module")
def dropout_run(assets, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("dropout_run")
    trainer = train_and_evaluate(tiny_run_config(assets, str(workdir), **DROPOUT_RUN), devices=jax.devices()[:1])
    return trainer, read_metrics(str(workdir)), workdir


def test_dropout_run_learns_and_exports_a_peft_adapter_with_its_dropout(assets, dropout_run):
    import json

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    trainer, records, workdir = dropout_run
    assert trainer.policy.lora.dropout == 0.1
    assert series(records, "train/loss")[0] == pytest.approx(math.log(2), abs=1e-6)  # B = 0: dropout is moot
    accuracy = series(records, "eval/rewards/accuracies")
    assert accuracy[0] == 0.0 and accuracy[-1] >= 0.9
    assert series(records, "eval/loss")[-1] < math.log(2) - 1e-3

    adapter_dir = workdir / "hf_adapter"
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["lora_dropout"] == 0.1
    base = AutoModelForCausalLM.from_pretrained(assets["model"], dtype=torch.float32).eval()
    peft_model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    assert peft_model.peft_config["default"].lora_dropout == 0.1
    ids = np.array(train_batch(trainer, 0)["input_ids"][0, :2], np.int32)
    with torch.no_grad():
        peft_logits = peft_model(torch.from_numpy(ids).long()).logits.numpy()
    ours = nnx.merge(trainer.policy.graphdef, trainer.state["params"], trainer.policy.frozen)(ids)  # no key: no dropout
    np.testing.assert_allclose(np.asarray(ours), peft_logits, atol=1e-4, rtol=0)  # PEFT in eval mode too


def micro_loss_of(run):
    """The run's micro-batch loss (its train step scans it over the micro-batches)."""
    from jaxdpo.training.objectives import PreferenceObjective
    from jaxdpo.training.step import make_micro_loss

    cfg = run.config
    objective = PreferenceObjective(cfg.loss, reference=run.reference, chunk_size=cfg.model.logprob_chunk)
    return make_micro_loss(run.policy.graphdef, objective=objective, num_pairs=cfg.train.micro_batch_size)


def with_b_zeroed(params):
    return jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.zeros_like(x) if "_lora_b" in jax.tree_util.keystr(path) else x, params)


def test_dropout_only_in_the_policys_training_forward(dropout_run):
    from jaxdpo.training import batches
    from jaxdpo.training.objectives import PreferenceObjective
    from jaxdpo.training.step import dropout_key, make_eval_step

    trainer, _, _ = dropout_run
    frozen = trainer.policy.frozen
    micro_loss = micro_loss_of(trainer)
    batch = train_batch(trainer, 0)
    micro = jax.tree.map(lambda x: x[0], batch)
    grad_fn = jax.jit(jax.value_and_grad(micro_loss, has_aux=True))
    key = dropout_key(trainer.config.seed, 0, 0)

    # Step 0 (B = 0): the loss is the no-dropout loss; A gets no gradient; B's gradient changes.
    initial = with_b_zeroed(trainer.state["params"])
    (loss_d, metrics_d), grads_d = grad_fn(initial, frozen, None, micro, 8.0, key)
    (loss_0, metrics_0), grads_0 = grad_fn(initial, frozen, None, micro, 8.0, None)
    assert float(loss_d) == float(loss_0) == pytest.approx(math.log(2), abs=1e-6)
    for k in metrics_0:
        assert float(metrics_d[k]) == float(metrics_0[k]), k
    b_diff = 0.0
    for (path, g_d), (_, g_0) in zip(nnx.to_flat_state(grads_d), nnx.to_flat_state(grads_0)):
        if path[-1].endswith("_lora_a"):
            assert not np.asarray(g_d[...]).any() and not np.asarray(g_0[...]).any(), path
        else:
            b_diff = max(b_diff, float(jnp.abs(g_d[...] - g_0[...]).max()))
    assert b_diff > 1e-5

    # Eval: the dropout model's eval metrics equal those of the same weights in a dropout-0 model.
    model = nnx.merge(trainer.policy.graphdef, trainer.state["params"], frozen)
    no_dropout = nnx.eval_shape(lambda: Decoder(model.config, lora=dataclasses.replace(model.lora, dropout=0.0),
                                                rngs=nnx.Rngs(0)))
    graphdef_no_dropout = nnx.split(no_dropout, LoRAParam, ...)[0]
    cfg = trainer.config
    objective = PreferenceObjective(cfg.loss, reference=trainer.reference, chunk_size=cfg.model.logprob_chunk)
    no_dropout_eval_step = make_eval_step(graphdef_no_dropout, objective=objective, num_pairs=cfg.train.eval_batch_size)
    eval_batch = next(batches.eval_batches(trainer.data.eval_batcher, trainer.reference,
                                           trainer.steps.eval_batch_shardings))
    params = trainer.state["params"]
    got = trainer.steps.eval_metrics([jax.device_get(trainer.steps.eval_step(params, frozen, None, eval_batch))])
    expected = trainer.steps.eval_metrics([jax.device_get(jax.jit(no_dropout_eval_step)(params, frozen, None,
                                                                                      eval_batch))])
    for k in expected:
        assert got[k] == expected[k], k
    # while the same batch through the training forward (with a key) does see dropout
    pairs = float(np.sum(eval_batch["pair_valid"]))
    eval_micro_loss = lambda key: micro_loss(params, frozen, None, eval_batch, pairs, key)[0]
    assert abs(float(jax.jit(eval_micro_loss)(key)) - float(expected["loss"])) > 1e-5


def test_dropout_keys_come_from_seed_step_and_micro_batch(dropout_run):
    """train_step accumulates micro-batch i of step s with dropout_key(seed, s, i): its grad_norm is the
    norm of that sum computed here; one key for both micro-batches, or another seed, gives other numbers.
    The masks are drawn for the global batch, so 8 devices splitting the rows see the same ones."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from jaxdpo.parallel.sharding import make_mesh
    from jaxdpo.training.step import dropout_key

    trainer, _, _ = dropout_run
    seed = trainer.config.seed
    micro_loss = micro_loss_of(trainer)
    params, frozen = trainer.state["params"], trainer.policy.frozen
    step = int(trainer.state["step"])
    batch = train_batch(trainer, step)
    micros = [jax.tree.map(lambda x, i=i: x[i], batch) for i in range(2)]
    total = float(jnp.sum(batch["pair_valid"]))
    grad_fn = jax.jit(jax.grad(lambda p, m, k: micro_loss(p, frozen, None, m, total, k)[0]))

    def accumulated_norm(keys):
        grads = [grad_fn(params, m, k) for m, k in zip(micros, keys)]
        return float(optax.tree.norm(jax.tree.map(jnp.add, *grads)))

    state_copy = jax.tree.map(jnp.copy, trainer.state)  # the train step donates its state
    _, metrics = trainer.steps.train_step(state_copy, frozen, None, batch)
    expected = accumulated_norm([dropout_key(seed, step, 0), dropout_key(seed, step, 1)])
    assert float(metrics["grad_norm"]) == pytest.approx(expected, rel=1e-5)
    one_key = accumulated_norm([dropout_key(seed, step, 0)] * 2)
    other_seed = accumulated_norm([dropout_key(seed + 1, step, 0), dropout_key(seed + 1, step, 1)])
    assert abs(one_key - expected) > 1e-4 * expected and abs(other_seed - expected) > 1e-4 * expected

    # the same micro-batch loss with its rows split over 8 devices
    loss_fn = lambda p, m, k: micro_loss(p, frozen, None, m, total, k)[0]
    one_device = float(jax.jit(loss_fn)(params, micros[0], dropout_key(seed, step, 0)))
    mesh = make_mesh(1, 8, 1)
    replicated, rows = NamedSharding(mesh, P()), NamedSharding(mesh, P("fsdp"))
    on_mesh = jax.tree.map(lambda x: jax.device_put(x, replicated), (params, frozen))
    micro8 = jax.tree.map(lambda x: jax.device_put(x, rows), micros[0])
    eight = jax.jit(lambda p, f, m, k: micro_loss(p, f, None, m, total, k)[0])(
        *on_mesh, micro8, jax.device_put(dropout_key(seed, step, 0), replicated))
    assert float(eight) == pytest.approx(one_device, abs=1e-6)
    assert abs(one_device - float(jax.jit(loss_fn)(params, micros[0], None))) > 1e-6  # dropout is on


def test_dropout_run_is_reproducible_and_resumes_exactly(assets, dropout_run, tmp_path, capsys):
    """Same seed, same run, bit for bit; and a run resumed at step 2 draws the masks the uninterrupted
    one drew at steps 3 and 4 (they come from the checkpointed step, not from saved RNG state)."""
    import shutil

    trainer, records, _ = dropout_run
    config = lambda: tiny_run_config(assets, str(tmp_path), **DROPOUT_RUN)
    again = train_and_evaluate(config(), devices=jax.devices()[:1])
    assert series(read_metrics(str(tmp_path)), "train/loss") == series(records, "train/loss")
    for a, b in zip(jax.tree.leaves(again.state["params"]), jax.tree.leaves(trainer.state["params"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    shutil.rmtree(tmp_path / "checkpoints" / "4")  # as if the run had stopped after step 2
    capsys.readouterr()
    resumed = train_and_evaluate(config(), devices=jax.devices()[:1])
    assert "resumed    from checkpoint step 2" in capsys.readouterr().out
    assert series(read_metrics(str(tmp_path)), "train/loss") == series(records, "train/loss")
    for a, b in zip(jax.tree.leaves(resumed.state["params"]), jax.tree.leaves(trainer.state["params"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
