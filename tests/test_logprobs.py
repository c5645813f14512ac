"""Chunked token logprobs equal the naive full-logits computation, and never hold [B,T,V]."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdpo.ops.logprobs import pair_sums, token_logprobs


def naive_token_logprobs(hidden, head_weight, targets, logit_softcap=None):
    logits = jnp.einsum("btd,dv->btv", hidden, head_weight)
    if logit_softcap is not None:
        logits = logit_softcap * jnp.tanh(logits / logit_softcap)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def make_inputs(batch=2, time=13, dim=32, vocab=97, seed=0):
    rng = np.random.default_rng(seed)
    hidden = jnp.asarray(rng.normal(size=(batch, time, dim)), jnp.float32)
    head = jnp.asarray(rng.normal(size=(dim, vocab)) / np.sqrt(dim), jnp.float32)
    targets = jnp.asarray(rng.integers(0, vocab, size=(batch, time)), jnp.int32)
    return hidden, head, targets


# chunk 13 and 256 hold the whole row in one chunk: a trained head then keeps the logit gradients (three
# passes); 4 and 5 rematerialize each chunk (four).
@pytest.mark.parametrize("chunk_size,softcap", [(4, None), (5, None), (13, None), (256, None), (4, 3.0), (13, 3.0)])
def test_values_and_gradients_match_naive(chunk_size, softcap):
    hidden, head, targets = make_inputs()
    weights = jnp.asarray(np.random.default_rng(1).normal(size=targets.shape), jnp.float32)

    def chunked(h, w):
        return jnp.sum(weights * token_logprobs(h, w, targets, chunk_size=chunk_size,
                                                logit_softcap=softcap))

    def naive(h, w):
        return jnp.sum(weights * naive_token_logprobs(h, w, targets, softcap))

    got = token_logprobs(hidden, head, targets, chunk_size=chunk_size, logit_softcap=softcap)
    want = naive_token_logprobs(hidden, head, targets, softcap)
    assert got.shape == (2, 13) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)

    got_grads = jax.grad(chunked, argnums=(0, 1))(hidden, head)
    want_grads = jax.grad(naive, argnums=(0, 1))(hidden, head)
    for g, w in zip(got_grads, want_grads):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5)


def with_out_of_range_targets(targets):
    return targets.at[0, :3].set(-100).at[1, 2].set(10_000)


@pytest.mark.parametrize("chunk_size,softcap", [(4, None), (13, None), (5, 3.0)])
def test_frozen_head_gradient_matches_rematerialized_path(chunk_size, softcap):
    # The head held fixed (LoRA): d logp / d hidden formed in the forward equals the rematerialized
    # backward's (the path taken when the head is differentiated too), out-of-range targets included.
    hidden, head, targets = make_inputs()
    targets = with_out_of_range_targets(targets)
    weights = jnp.asarray(np.random.default_rng(1).normal(size=targets.shape), jnp.float32)

    def loss(h, w):
        return jnp.sum(weights * token_logprobs(h, w, targets, chunk_size=chunk_size, logit_softcap=softcap))

    value, frozen_head_grad = jax.value_and_grad(loss)(hidden, head)
    both_value, (both_hidden_grad, _) = jax.value_and_grad(loss, argnums=(0, 1))(hidden, head)
    np.testing.assert_allclose(value, both_value, rtol=1e-6)
    assert np.all(np.isfinite(frozen_head_grad))
    np.testing.assert_allclose(frozen_head_grad, both_hidden_grad, atol=1e-6, rtol=1e-5)
    in_range = (targets >= 0) & (targets < head.shape[1])

    def naive(h):
        in_range_logprobs = naive_token_logprobs(h, head, jnp.where(in_range, targets, 0), softcap)
        return jnp.sum(jnp.where(in_range, weights * in_range_logprobs, 0.0))
    naive_grad = jax.grad(naive)(hidden)
    row_in_range = np.asarray(in_range)
    np.testing.assert_allclose(np.asarray(frozen_head_grad)[row_in_range], np.asarray(naive_grad)[row_in_range],
                               atol=1e-5, rtol=1e-5)


def vocab_matmuls(jaxpr, vocab):
    """dot_generals (at any depth) with an operand or result holding a vocab-sized axis."""
    count = 0
    for eqn in jaxpr.eqns:
        shapes = [v.aval.shape for v in (*eqn.invars, *eqn.outvars) if hasattr(v.aval, "shape")]
        count += eqn.primitive.name == "dot_general" and any(vocab in shape for shape in shapes)
        for value in eqn.params.values():
            for item in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(item, "jaxpr", item)
                if hasattr(inner, "eqns"):
                    count += vocab_matmuls(inner, vocab)
    return count


def test_vocab_passes_forward_frozen_head_and_trained_head():
    hidden, head, targets = make_inputs(vocab=97)

    def loss(h, w):
        return jnp.sum(token_logprobs(h, w, targets, chunk_size=4))
    forward = jax.make_jaxpr(lambda h, w: token_logprobs(h, w, targets, chunk_size=4))(hidden, head)
    frozen_head = jax.make_jaxpr(jax.grad(loss))(hidden, head)
    trained_head = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(hidden, head)
    assert vocab_matmuls(forward.jaxpr, 97) == 1
    assert vocab_matmuls(frozen_head.jaxpr, 97) == 2
    # forward, its recomputation in the backward, and the two gradient products
    assert vocab_matmuls(trained_head.jaxpr, 97) == 4
    # the row in one chunk: the kept logit gradients stand in for the recomputation
    one_chunk = jax.make_jaxpr(jax.grad(lambda h, w: jnp.sum(token_logprobs(h, w, targets, chunk_size=13)),
                                        argnums=(0, 1)))(hidden, head)
    assert vocab_matmuls(one_chunk.jaxpr, 97) == 3


def test_frozen_head_gradient_keeps_a_bfloat16_hidden_dtype():
    hidden, head, targets = make_inputs(time=8)
    grad = jax.grad(lambda h: jnp.sum(token_logprobs(h, head, targets, chunk_size=3)))(hidden.astype(jnp.bfloat16))
    want = jax.grad(lambda h: jnp.sum(naive_token_logprobs(h, head, targets)))(hidden)
    assert grad.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(grad, np.float32), want, atol=0.05)


def test_bfloat16_hidden_returns_float32_close_to_fp32():
    hidden, head, targets = make_inputs(time=8)
    got = token_logprobs(hidden.astype(jnp.bfloat16), head, targets, chunk_size=3)
    want = naive_token_logprobs(hidden, head, targets)
    assert got.dtype == jnp.float32
    # bf16 inputs carry ~3 significant digits; the logsumexp itself runs in fp32.
    np.testing.assert_allclose(got, want, atol=0.15)


def test_out_of_range_targets_stay_finite():
    hidden, head, targets = make_inputs(time=6)
    targets = targets.at[0, :3].set(-100).at[1, 2].set(10_000)
    got = token_logprobs(hidden, head, targets, chunk_size=4)
    assert np.all(np.isfinite(got))


def test_grad_jaxpr_never_holds_full_logits():
    batch, time, dim, vocab, chunk = 2, 64, 16, 128, 8
    hidden, head, targets = make_inputs(batch, time, dim, vocab)

    def loss(h, w):
        return jnp.sum(token_logprobs(h, w, targets, chunk_size=chunk))

    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(hidden, head)

    def all_sizes(jaxpr):
        for eqn in jaxpr.eqns:
            for var in eqn.outvars:
                yield int(np.prod(var.aval.shape)) if hasattr(var.aval, "shape") else 0
            # Descend into scan / checkpoint / pjit bodies (a ClosedJaxpr or Jaxpr in the params).
            for value in eqn.params.values():
                for item in value if isinstance(value, (tuple, list)) else (value,):
                    inner = getattr(item, "jaxpr", item)
                    if hasattr(inner, "eqns"):
                        yield from all_sizes(inner)

    largest = max(all_sizes(jaxpr.jaxpr))
    # One chunk of logits is batch*chunk*vocab; full logits would be 8x that.
    assert largest == batch * chunk * vocab, largest
    assert largest < batch * time * vocab


def numpy_pair_sums(token_lp, pair_index, side, num_pairs):
    out = {k: np.zeros(num_pairs) for k in ("pc", "pr", "nc", "nr")}
    for r in range(token_lp.shape[0]):
        for t in range(token_lp.shape[1]):
            p, s = pair_index[r, t], side[r, t]
            if p < 0 or s == 0:
                continue
            lp_key, n_key = ("pc", "nc") if s == 1 else ("pr", "nr")
            out[lp_key][p] += token_lp[r, t]
            out[n_key][p] += 1
    return out


def test_pair_sums_match_loop_and_ignore_padding():
    rng = np.random.default_rng(3)
    rows, time, num_pairs = 3, 10, 4
    token_lp = -rng.uniform(0, 5, size=(rows, time)).astype(np.float32)
    pair_index = rng.integers(-1, num_pairs - 1, size=(rows, time)).astype(np.int32)  # pair 3 empty
    side = rng.integers(0, 3, size=(rows, time)).astype(np.int32)
    token_lp_with_nan = np.where(pair_index < 0, np.nan, token_lp).astype(np.float32)

    got = pair_sums(jnp.asarray(token_lp_with_nan), jnp.asarray(pair_index), jnp.asarray(side), num_pairs)
    want = numpy_pair_sums(token_lp, pair_index, side, num_pairs)
    for key in ("pc", "pr", "nc", "nr"):
        assert got[key].shape == (num_pairs,) and got[key].dtype == jnp.float32
        np.testing.assert_allclose(got[key], want[key], rtol=1e-6, atol=1e-5)
    assert float(got["nc"][3]) == 0.0 and float(got["pc"][3]) == 0.0


def test_pair_sums_gradient_flows_only_to_counted_tokens():
    token_lp = jnp.array([[-1.0, -2.0, -3.0, -4.0]])
    pair_index = jnp.array([[-1, 0, 0, 1]])
    side = jnp.array([[0, 1, 2, 1]])
    grad = jax.grad(lambda lp: jnp.sum(pair_sums(lp, pair_index, side, 2)["pc"] * jnp.array([1.0, 10.0])))(
        token_lp)
    np.testing.assert_array_equal(grad, [[0.0, 1.0, 0.0, 10.0]])


def test_compiled_backward_memory_does_not_grow_with_full_logits():
    # XLA's own buffer accounting: the temp memory of the compiled gradient grows with the chunk,
    # not with T*V (the naive version holds the whole [B,T,V] logits and its softmax).
    batch, dim, vocab, chunk = 2, 16, 2048, 32

    def temp_bytes(time):
        hidden, head, targets = make_inputs(batch, time, dim, vocab)
        grad_fn = jax.jit(jax.grad(
            lambda h, w: jnp.sum(token_logprobs(h, w, targets, chunk_size=chunk)), argnums=(0, 1)))
        return grad_fn.lower(hidden, head).compile().memory_analysis().temp_size_in_bytes

    short, long = temp_bytes(128), temp_bytes(1024)
    full_logits_growth = batch * (1024 - 128) * vocab * 4
    chunk_logits = batch * chunk * vocab * 4
    assert long - short < full_logits_growth / 8, (short, long)
    assert long < 8 * chunk_logits, (long, chunk_logits)


@pytest.mark.parametrize("chunk_size", [5, 12])
def test_sharded_batch_and_vocab_match_naive(chunk_size):
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from jaxdpo.parallel.sharding import make_mesh

    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    hidden, head, targets = make_inputs(batch=4, time=12, dim=16, vocab=64)
    batch_axes = ("data", "fsdp")
    hidden = jax.device_put(hidden, NamedSharding(mesh, P(batch_axes, None, None)))
    head = jax.device_put(head, NamedSharding(mesh, P(None, "tensor")))
    targets = jax.device_put(targets, NamedSharding(mesh, P(batch_axes, None)))

    def loss(h, w):
        return jnp.sum(token_logprobs(h, w, targets, chunk_size=chunk_size))

    with jax.set_mesh(mesh):
        value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(hidden, head)
        per_token = jax.jit(lambda h, w: token_logprobs(h, w, targets, chunk_size=chunk_size))(hidden, head)
    h_host, w_host, y_host = (np.asarray(x) for x in (hidden, head, targets))
    np.testing.assert_allclose(per_token, naive_token_logprobs(h_host, w_host, y_host), atol=1e-5)
    want_value, want_grads = jax.value_and_grad(
        lambda h, w: jnp.sum(naive_token_logprobs(h, w, y_host)), argnums=(0, 1))(h_host, w_host)
    np.testing.assert_allclose(value, want_value, rtol=1e-5)
    for got, want in zip(grads, want_grads):
        np.testing.assert_allclose(got, want, atol=1e-5)
    with jax.set_mesh(mesh):  # the head frozen: its gradient products contract the split vocab
        frozen_head_grad = jax.jit(jax.grad(loss))(hidden, head)
    np.testing.assert_allclose(frozen_head_grad, want_grads[0], atol=1e-5)


def test_zero_softcap_means_off():
    hidden, head, targets = make_inputs(time=5)
    np.testing.assert_allclose(token_logprobs(hidden, head, targets, logit_softcap=0.0),
                               token_logprobs(hidden, head, targets), atol=0)


@pytest.mark.parametrize("layout", ["padded", "prefix_shared", "packed"])
def test_contract_with_layouts_and_decoder(layout):
    # Cross-module contract (DEVELOPING.md): whatever the layout, pair_sums over the decoder's chunked
    # token logprobs equal each completion's logprob summed from full logits of prompt+completion.
    from flax import nnx

    from jaxdpo.data.layouts import make_batch
    from jaxdpo.models.config import ModelConfig
    from jaxdpo.models.decoder import Decoder

    config = ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=8)
    model = Decoder(config, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    pairs = [tuple(rng.integers(1, 97, rng.integers(low, high)) for low, high in ((2, 6), (1, 5), (1, 5)))
             for _ in range(3)]

    # Naive reference: each prompt+completion right-padded to 16 in its own row (right padding does
    # not change the causal logits before it), one forward pass for all six sequences.
    sequences = [(p, c) for p, c, _ in pairs] + [(p, r) for p, _, r in pairs]
    ids = np.zeros((len(sequences), 16), np.int32)
    for row, (prompt, completion) in enumerate(sequences):
        ids[row, :len(prompt) + len(completion)] = np.concatenate([prompt, completion])
    logp = np.asarray(jax.nn.log_softmax(model(jnp.asarray(ids)), axis=-1))
    naive = [sum(logp[row, t - 1, ids[row, t]] for t in range(len(prompt), len(prompt) + len(completion)))
             for row, (prompt, completion) in enumerate(sequences)]

    batch = make_batch(pairs, layout=layout, row_length=16, num_pairs=4)
    hidden = model.hidden_states(batch["input_ids"], batch["positions"], batch["segment_ids"], batch["branch_ids"])
    token_lp = token_logprobs(hidden, model.lm_head_weight(), jnp.asarray(batch["targets"]), chunk_size=5)
    sums = pair_sums(token_lp, jnp.asarray(batch["pair_index"]), jnp.asarray(batch["side"]), 4)
    np.testing.assert_allclose(sums["pc"][:3], naive[:3], atol=1e-4)
    np.testing.assert_allclose(sums["pr"][:3], naive[3:], atol=1e-4)
    np.testing.assert_array_equal(sums["nc"], [len(c) for _, c, _ in pairs] + [0])
    np.testing.assert_array_equal(sums["nr"], [len(r) for _, _, r in pairs] + [0])
    np.testing.assert_array_equal(batch["pair_valid"], [1, 1, 1, 0])


@pytest.mark.parametrize("layout", ["padded", "prefix_shared", "packed"])
def test_lm_head_on_scored_positions_only_gives_the_same_logprobs_and_gradients(layout):
    # The batcher's scored_index lets pair_logprobs run the LM head only where a logprob counts; the
    # per-pair sums and their gradients must not change.
    from flax import nnx

    from jaxdpo.data.batcher import PairBatcher
    from jaxdpo.data.layouts import row_length, scored_index
    from jaxdpo.models.config import ModelConfig
    from jaxdpo.models.decoder import Decoder
    from jaxdpo.training.step import pair_logprobs

    config = ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=8)
    graphdef, params = nnx.split(Decoder(config, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(1)
    pairs = [tuple(rng.integers(1, 97, rng.integers(low, high)).astype(np.int32)
                   for low, high in ((2, 12), (1, 9), (1, 9))) for _ in range(6)]

    class Cfg(dict):
        __getattr__ = dict.get
    length = row_length(pairs, layout, Cfg(max_length=24, pack_length=128))
    batcher = PairBatcher(pairs, layout=layout, row_length=length, batch_size=6, micro_batch_size=6, seed=0,
                          shuffle=False)
    batch = next(batcher.eval_batches())
    slots = batch["scored_index"].shape[1]
    assert slots < length  # fewer LM-head positions than row positions
    counted = batch["side"] > 0
    for r in range(counted.shape[0]):  # each row's scored positions, in order, then empty slots
        np.testing.assert_array_equal(batch["scored_index"][r][:counted[r].sum()], np.nonzero(counted[r])[0])
        assert (batch["scored_index"][r][counted[r].sum():] == -1).all()
    with pytest.raises(ValueError, match="scored positions"):
        scored_index(batch["side"], int(counted.sum(1).max()) - 1)

    full = {k: v for k, v in batch.items() if k != "scored_index"}

    def total(params, b):
        out = pair_logprobs(graphdef, (params,), b, num_pairs=6, chunk_size=4)
        return jnp.sum(out["pc"] * 1.5 - out["pr"]), out

    (value_s, out_s), grads_s = jax.value_and_grad(total, has_aux=True)(params, batch)
    (value_f, out_f), grads_f = jax.value_and_grad(total, has_aux=True)(params, full)
    for key in ("pc", "pr", "nc", "nr"):
        np.testing.assert_allclose(out_s[key], out_f[key], atol=1e-5, err_msg=key)
    for a, b in zip(jax.tree.leaves(grads_s), jax.tree.leaves(grads_f)):
        np.testing.assert_allclose(a, b, atol=1e-5)
