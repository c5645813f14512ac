"""Sampling with a KV cache: a jitted prefill plus decode loop in one compiled program.

`generate(graphdef, states, prompts, settings, ...)` turns token-id prompts into completions, and
`completion_logprobs` scores given completions under any params (e.g. the reference's). Texts in and out
(chat templates, stop ids and strings) are jaxdpo.sampling.text's.

Layout of one compiled call: B prompts are LEFT-padded to a bucket length P (`bucket_length`: a few sizes,
so new prompt lengths reuse a compiled program); the KV cache holds S = P + max_new_tokens slots per row, a
(k, v) pair per layer (k [B,K,H,S], v [B,K,S,H]: each contraction of ops.attention.decode_attention sums over
a non-minor axis of its cache; written in place). Row b's prompt occupies slots P-n_b .. P-1 with RoPE positions
0 .. n_b-1; decode step j writes slot P+j-1 at position n_b+j-1, so every row writes the same slot while its
positions stay its own, and a key slot s is visible to the query at slot q iff P-n_b <= s <= q (and, on
sliding-window layers, q - s < window: slots and positions differ by the same per-row offset).

Draws: the token of row r at step j is drawn with key fold_in(fold_in(key(seed), r), j), r being the
prompt's index in the caller's list, so a draw is a pure function of (seed, prompt index, step): the same
on 1 or 8 devices, in any batch composition. Settings order as transformers' warpers: temperature, top-k,
top-p; temperature 0 is greedy (argmax, first index on ties).

Stopping: a row stops after it emits any id in `eos_ids` (the EOS is kept in its ids); the loop ends when
every row stopped or after max_new_tokens. Stop strings are applied on the host after decoding
(`text.truncate_at_stop`): the text is cut before the first stop string and the ids to the shortest prefix whose
text contains it, so the device program never decodes text.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdpo.errors import ConfigError
from jaxdpo.models.decoder import (
    attention_inputs,
    attention_output_and_mlp,
    rope_inv_freq,
    rope_tables,
)
from jaxdpo.ops.attention import decode_attention, grouped_attention
from jaxdpo.ops.logprobs import token_logprobs
from jaxdpo.parallel import sequence_parallel
from jaxdpo.parallel.sharding import gather_to_host, logical_spec, sequence_axis_size

MIN_PROMPT_BUCKET = 16


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    """What to draw. `temperature` 0 = greedy; `top_k` 0 and `top_p` 1 = off."""

    max_new_tokens: int
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens = {self.max_new_tokens!r} must be a positive integer")
        if not self.temperature >= 0:
            raise ConfigError(f"temperature = {self.temperature!r} must be >= 0 (0 = greedy)")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ConfigError(f"top_k = {self.top_k!r} must be a non-negative integer (0 = off)")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p = {self.top_p!r} must be in (0, 1] (1 = off)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclasses.dataclass(frozen=True)
class _Program:
    """The compile-time switches of one sampling program (temperature, top_p and seed are traced)."""

    max_new_tokens: int
    greedy: bool
    top_k: int
    use_top_p: bool
    eos_ids: tuple[int, ...]
    pad_id: int
    # decode cuts each projection's contracted dim this many ways (decoder._contract): XLA:CPU runs a
    # matrix-vector product on one core, a batched dot of two halves on two
    decode_contraction_ways: int = 1


# ---- drawing one token ------------------------------------------------------------------------------------

def draw_key(seed, row_id, step):
    """The key of one draw: a pure function of (seed, prompt index, step)."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), row_id), step)


def candidate_logits(logits, *, temperature, top_k: int, top_p, use_top_p: bool):
    """logits [B,V] float32 -> (candidate logits [B,C], their vocabulary ids [B,C] or None = all V), with the
    temperature applied and the tokens top-k / top-p remove set to -inf."""
    scaled = logits / temperature
    if top_k == 0 and not use_top_p:
        return scaled, None
    # top_k keeps ties with the k-th value out (transformers keeps them); exact ties of real logits are rare
    values, ids = jax.lax.top_k(scaled, top_k or scaled.shape[-1])  # sorted, largest first
    if use_top_p:  # keep the smallest prefix whose probability reaches top_p (always the first token)
        probs = jax.nn.softmax(values, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        values = jnp.where(mass_before < top_p, values, -jnp.inf)
    return values, ids


def first_max_index(logits):
    """jnp.argmax over the last axis (the first index on ties, the first NaN where a row holds one) as a max
    and a min over a mask: two reductions XLA:CPU vectorizes, where its argmax is one (value, index) reduction
    it does not (5x slower over a 49k vocabulary)."""
    best = jnp.max(logits, axis=-1, keepdims=True)  # NaN where the row holds one
    ids = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    chosen = (logits == best) | jnp.isnan(logits)
    return jnp.min(jnp.where(chosen, ids, logits.shape[-1]), axis=-1)


def sample_tokens(logits, keys, *, temperature, top_p, greedy: bool, top_k: int, use_top_p: bool):
    """One token per row: logits [B,V] float32, keys [B] -> [B] int32."""
    if greedy:
        return first_max_index(logits)
    values, ids = candidate_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p, use_top_p=use_top_p)
    choice = jax.vmap(jax.random.categorical)(keys, values)
    if ids is None:
        return choice.astype(jnp.int32)
    return jnp.take_along_axis(ids, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


# ---- prompts -> one padded batch ----------------------------------------------------------------------------

def bucket_length(n: int) -> int:
    """Slots for a longest prompt of n tokens: the smallest power of two or three times a power of two
    (16, 24, 32, 48, 64, 96, ...; at least MIN_PROMPT_BUCKET) that holds n. Each bucket is one compiled
    program; with the in-between sizes at most a third of the slots are padding instead of half, which the
    prefill pays for in every row (DEVELOPING.md, Decode at batch 1 and 32)."""
    power = max(MIN_PROMPT_BUCKET, 1 << max(0, n - 1).bit_length())
    three_quarters = power // 4 * 3
    return three_quarters if power > MIN_PROMPT_BUCKET and n <= three_quarters else power


def left_pad(prompts: Sequence[Sequence[int]], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Ragged id lists -> tokens [B,length] int32 right-aligned, lengths [B] int32."""
    tokens = np.full((len(prompts), length), pad_id, np.int32)
    for row, ids in enumerate(prompts):
        if ids:
            tokens[row, length - len(ids):] = ids
    return tokens, np.asarray([len(ids) for ids in prompts], np.int32)


# ---- the compiled program ------------------------------------------------------------------------------------

def _rope(positions, config):
    """(global cos/sin, sliding-layer cos/sin or None) for positions [B,T]."""
    global_rope = rope_tables(positions, rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling))
    if config.sliding_rope_theta is None:
        return global_rope, None
    local = rope_inv_freq(config.head_dim, config.sliding_rope_theta, config.sliding_rope_scaling)
    return global_rope, rope_tables(positions, local)


def _per_layer(model) -> list[dict]:
    """The stacked [L,...] layer params as L separate trees, split once per call: a decode step that sliced
    layer l out of the stack would copy all of that layer's weights every token (XLA:CPU materialises the
    slice feeding each dot), doubling the memory traffic of a memory-bound loop."""
    stacked = model.layers.arrays()
    return [jax.tree.map(lambda a, l=l: a[l], stacked) for l in range(model.config.num_layers)]


def _layers_with_cache(model, layers, x, positions, mask, sliding_mask, cache, write_slot, ways: int = 1):
    """Run every layer (`layers`: _per_layer's trees) on one token a row, x [B,1,D] (positions [B,1]): layer l
    writes its k, v into cache[l]'s slot write_slot and attends over that whole cache with `mask` [B,1,1,S]
    (`sliding_mask` on sliding-window layers). cache: per layer (k [B,K,H,S], v [B,K,S,H]), updated in place;
    `ways`: decoder._contract's. Returns (x, cache). The layers are unrolled, so each reads its own weights in
    place."""
    c, dtype = model.config, model.dtype
    lora_scale = _lora_scale(model)
    global_rope, local_rope = _rope(positions, c)
    new_cache = []
    for params, sliding, (cache_k, cache_v) in zip(layers, c.layer_is_sliding, cache):
        cos, sin = local_rope if sliding and local_rope is not None else global_rope
        q, k, v = attention_inputs(params, x, cos=cos, sin=sin, config=c, dtype=dtype, lora_scale=lora_scale,
                                   contraction_ways=ways)
        k = jnp.einsum("btkh->bkht", k).astype(cache_k.dtype)
        v = jnp.einsum("btkh->bkth", v).astype(cache_v.dtype)
        cache_k = jax.lax.dynamic_update_slice(cache_k, k, (0, 0, 0, write_slot))
        cache_v = jax.lax.dynamic_update_slice(cache_v, v, (0, 0, write_slot, 0))
        a = decode_attention(q, cache_k, cache_v, mask=sliding_mask if sliding else mask, scale=c.attention_scale,
                             logit_softcap=c.attn_logit_softcap)
        x = attention_output_and_mlp(params, x, a, config=c, dtype=dtype, lora_scale=lora_scale,
                                     contraction_ways=ways)
        new_cache.append((cache_k, cache_v))
    return x, tuple(new_cache)


def _prefill(model, x, positions, mask, sliding_mask, num_slots: int):
    """The prompt x [B,P,D] through every layer as one `lax.scan` over the stacked weights (compiled once,
    not once per layer: the prompt is read once, so slicing each layer's weights out of the stack costs
    nothing that matters). mask/sliding_mask [B,1,P,P]. Returns (x, cache): the per-layer caches of
    `num_slots` slots, the prompt's k and v in slots 0..P-1."""
    c, dtype = model.config, model.dtype
    lora_scale = _lora_scale(model)
    global_rope, local_rope = _rope(positions, c)
    b, p = positions.shape

    def layer(x, per_layer):
        params, sliding = per_layer
        cos, sin = global_rope
        if local_rope is not None:
            cos, sin = jnp.where(sliding, local_rope[0], cos), jnp.where(sliding, local_rope[1], sin)
        q, k, v = attention_inputs(params, x, cos=cos, sin=sin, config=c, dtype=dtype, lora_scale=lora_scale)
        layer_mask = mask if sliding_mask is None else jnp.where(sliding, sliding_mask, mask)
        a = grouped_attention(q, k, v, mask=layer_mask, scale=c.attention_scale, logit_softcap=c.attn_logit_softcap)
        x = attention_output_and_mlp(params, x, a, config=c, dtype=dtype, lora_scale=lora_scale)
        return x, (jnp.einsum("btkh->bkht", k), jnp.einsum("btkh->bkth", v))

    x, (ks, vs) = jax.lax.scan(layer, x, (model.layers.arrays(), jnp.asarray(c.layer_is_sliding)))
    empty_k, empty_v = _new_cache(model, b, num_slots)[0]
    cache = tuple((jax.lax.dynamic_update_slice(empty_k, ks[l].astype(empty_k.dtype), (0, 0, 0, 0)),
                   jax.lax.dynamic_update_slice(empty_v, vs[l].astype(empty_v.dtype), (0, 0, 0, 0)))
                  for l in range(c.num_layers))
    return x, cache


def _lora_scale(model) -> float:
    return 1.0 if model.lora is None else model.lora.scale  # alpha / rank


def _visible(query_slots, lengths, prompt_slots: int, num_slots: int, window):
    """[B,1,T,S] bool: key slot s is a real token (s >= P - n_b) at or before the query's slot (and, with a
    window, less than `window` slots back)."""
    key_slots = jnp.arange(num_slots)[None, None, None, :]
    first_real = (prompt_slots - lengths)[:, None, None, None]
    q = query_slots[:, None, :, None]
    mask = (key_slots >= first_real) & (key_slots <= q)
    if window is not None:
        mask = mask & (q - key_slots < window)
    return mask


def _masks(query_slots, lengths, prompt_slots, num_slots, config):
    mask = _visible(query_slots, lengths, prompt_slots, num_slots, None)
    sliding = None
    if any(config.layer_is_sliding):
        sliding = _visible(query_slots, lengths, prompt_slots, num_slots, config.sliding_window)
    return mask, sliding


def _token_logits(model, x):
    """The last layer's output [B,1,D] -> [B,V] float32 logits."""
    return model.head_logits(model.final_normed(x))[:, 0]


def _batch_axis(batch: int):
    """"batch" where the rows split evenly over the active mesh's batch axes, else None (replicated)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None
    ways = math.prod(mesh.shape[a] for a in logical_spec("batch")[0])
    return "batch" if batch % ways == 0 else None


def _new_cache(model, batch: int, num_slots: int):
    c = model.config
    k = jnp.zeros((batch, c.num_kv_heads, c.head_dim, num_slots), model.dtype)
    v = jnp.zeros((batch, c.num_kv_heads, num_slots, c.head_dim), model.dtype)
    if not jax.sharding.get_abstract_mesh().empty:  # rows split like the batch, kv heads like their weights
        rows = _batch_axis(batch)
        k = jax.lax.with_sharding_constraint(k, logical_spec(rows, "kv_heads", "head_dim", "seq"))
        v = jax.lax.with_sharding_constraint(v, logical_spec(rows, "kv_heads", "seq", "head_dim"))
    return tuple((k, v) for _ in range(c.num_layers))


class _DecodeState(NamedTuple):
    """What one decode step reads and writes (a pytree: the while_loop's carry)."""

    step: jax.Array  # int32: the index of the token this step draws
    cache: tuple  # per layer (k [B,K,H,S], v [B,K,S,H])
    last: jax.Array  # [B] int32: the token drawn at step - 1, written to the cache this step
    done: jax.Array  # [B] bool: the row emitted an EOS id
    ids: jax.Array  # [B,N] int32: the tokens drawn so far, pad_id after a row stopped
    logprobs: jax.Array  # [B,N] float32: their logprobs under the model's own softmax, 0 after a row stopped


def _run(graphdef, states, tokens, lengths, row_ids, temperature, top_p, seed, *, program: _Program):
    """Prefill + decode loop. tokens [B,P] left-padded, lengths/row_ids [B] ->
    (ids [B,N] int32, pad_id after a row stopped; logprobs [B,N] float32 under the model's own softmax)."""
    model = nnx.merge(graphdef, *states)
    b, p = tokens.shape
    n = program.max_new_tokens
    num_slots = p + n
    offsets = p - lengths  # slot of row b's first real token
    draw = lambda logits, step: sample_tokens(
        logits, jax.vmap(lambda r: draw_key(seed, r, step))(row_ids), temperature=temperature, top_p=top_p,
        greedy=program.greedy, top_k=program.top_k, use_top_p=program.use_top_p)
    eos = jnp.asarray(program.eos_ids, jnp.int32)

    prompt_slots = jnp.broadcast_to(jnp.arange(p), (b, p))
    positions = jnp.maximum(prompt_slots - offsets[:, None], 0)
    mask, sliding = _masks(prompt_slots, lengths, p, p, model.config)
    x, cache = _prefill(model, model.embed_tokens(tokens), positions, mask, sliding, num_slots)
    layers = _per_layer(model)
    logits = _token_logits(model, x[:, -1:])
    first = draw(logits, 0)
    start = _DecodeState(step=jnp.int32(1), cache=cache, last=first, done=jnp.isin(first, eos),
                         ids=jnp.full((b, n), program.pad_id, jnp.int32).at[:, 0].set(first),
                         logprobs=jnp.zeros((b, n), jnp.float32).at[:, 0].set(_chosen_logprob(logits, first)))

    def keep_going(state: _DecodeState):
        return (state.step < n) & ~jnp.all(state.done)

    def decode(state: _DecodeState):
        slot = p + state.step - 1  # where `last` (token step-1) goes
        query_slots = jnp.full((b, 1), slot)
        mask, sliding = _masks(query_slots, lengths, p, num_slots, model.config)
        x, cache = _layers_with_cache(model, layers, model.embed_tokens(state.last[:, None]),
                                      query_slots - offsets[:, None], mask, sliding, state.cache, slot,
                                      program.decode_contraction_ways)
        logits = _token_logits(model, x)
        token = jnp.where(state.done, program.pad_id, draw(logits, state.step))
        logprob = jnp.where(state.done, 0.0, _chosen_logprob(logits, token))
        return _DecodeState(step=state.step + 1, cache=cache, last=token, done=state.done | jnp.isin(token, eos),
                            ids=jax.lax.dynamic_update_slice(state.ids, token[:, None], (0, state.step)),
                            logprobs=jax.lax.dynamic_update_slice(state.logprobs, logprob[:, None], (0, state.step)))

    end = jax.lax.while_loop(keep_going, decode, start)
    return end.ids, end.logprobs


def _chosen_logprob(logits, token):
    """log softmax(logits)[token] per row: the model's own probability (no temperature or filtering), as the
    chosen logit less the row's logsumexp, so no [B,V] log-softmax is written out."""
    return jnp.take_along_axis(logits, token[:, None], axis=-1)[:, 0] - jax.nn.logsumexp(logits, axis=-1)


_run_jitted = jax.jit(_run, static_argnames=("graphdef", "program"))


# ---- host side ------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Completion:
    ids: list[int]  # the new tokens, through the EOS if one was produced
    logprob: float  # their summed log-probability under the sampling model's own softmax
    finished: bool  # ended with an EOS id (False: max_new_tokens reached)


def _decode_contraction_ways(batch: int) -> int:
    """2 for a decode step of one row on CPU devices (those of the active mesh, else the default ones): its
    projections are matrix-vector products, which XLA:CPU runs on one core unless cut in two. From two rows
    on, XLA:CPU's matrix product uses every core by itself and the cut gains nothing (DEVELOPING.md,
    Measurements)."""
    mesh = jax.sharding.get_abstract_mesh()
    devices = jax.devices() if mesh.empty else jax.sharding.get_mesh().devices.flat
    return 2 if batch == 1 and next(iter(devices)).platform == "cpu" else 1


def _place_rows(array: np.ndarray):
    """A [B,...] host array onto the active mesh, rows split where they divide evenly."""
    if jax.sharding.get_abstract_mesh().empty:
        return jnp.asarray(array)
    spec = logical_spec(_batch_axis(array.shape[0]), *([None] * (array.ndim - 1)))
    return jax.device_put(array, jax.sharding.NamedSharding(jax.sharding.get_mesh(), spec))


def generate(graphdef, states, prompts: Sequence[Sequence[int]], settings: SamplingSettings, *,
             eos_ids: Sequence[int], pad_id: int, batch_size: int | None = None,
             row_ids: Sequence[int] | None = None, on_batch=None) -> list[Completion]:
    """Complete every prompt (a list of token ids, non-empty). `states`: the model's states as
    `nnx.merge(graphdef, *states)` takes them (params, or params and LoRA's frozen base). `row_ids` (default
    0..n-1) key each prompt's draws. Prompts run longest first in batches of `batch_size` rows (default:
    all; the last batch is padded with copies, so every batch has one compiled shape per bucket);
    `on_batch(rows, new_tokens)` is called after each. Under `jax.set_mesh(mesh)` it runs sharded there."""
    if any(len(p) == 0 for p in prompts):
        raise ConfigError(f"prompt {next(i for i, p in enumerate(prompts) if not p)} has no tokens")
    row_ids = list(range(len(prompts))) if row_ids is None else list(row_ids)
    batch_size = batch_size or len(prompts)
    program = _Program(max_new_tokens=settings.max_new_tokens, greedy=settings.greedy, top_k=settings.top_k,
                       use_top_p=settings.top_p < 1, eos_ids=tuple(sorted(set(eos_ids))), pad_id=pad_id,
                       decode_contraction_ways=_decode_contraction_ways(batch_size))
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    results: list[Completion | None] = [None] * len(prompts)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        filled = rows + [rows[0]] * (batch_size - len(rows))
        tokens, lengths = left_pad([prompts[i] for i in filled], bucket_length(len(prompts[rows[0]])), pad_id)
        ids, logprobs = _run_jitted(
            graphdef, states, _place_rows(tokens), _place_rows(lengths),
            _place_rows(np.asarray([row_ids[i] for i in filled], np.int32)),
            jnp.float32(settings.temperature or 1.0), jnp.float32(settings.top_p), jnp.uint32(settings.seed),
            program=program)
        ids, logprobs = gather_to_host(ids), gather_to_host(logprobs)  # rows may lie on other hosts
        new_tokens = 0
        for slot, row in enumerate(rows):
            results[row] = _completion(ids[slot], logprobs[slot], program.eos_ids)
            new_tokens += len(results[row].ids)
        if on_batch is not None:
            on_batch(len(rows), new_tokens)
    return results


def _completion(ids: np.ndarray, logprobs: np.ndarray, eos_ids: tuple[int, ...]) -> Completion:
    stops = np.flatnonzero(np.isin(ids, eos_ids))
    n = int(stops[0]) + 1 if len(stops) else len(ids)
    return Completion(ids=ids[:n].tolist(), logprob=float(logprobs[:n].sum()), finished=bool(len(stops)))


def completion_logprobs(graphdef, states, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
                        *, pad_id: int = 0) -> np.ndarray:
    """[n] float32: log p(completion | prompt) summed over the completion's tokens under these params (the
    training forward: rows right-padded, so every attention backend the model was set up with applies).
    When the active mesh splits rows over `sequence`, the rows go in zigzag order, as ring attention reads
    them (its causal mask comes from that layout, not from the positions)."""
    sequence = sequence_axis_size(jax.sharding.get_abstract_mesh())  # 1 without a mesh
    lengths = [len(p) + len(c) for p, c in zip(prompts, completions)]
    multiple = sequence_parallel.row_multiple(sequence)
    width = -(-bucket_length(max(lengths) + 1) // multiple) * multiple
    tokens = np.full((len(prompts), width), pad_id, np.int32)
    counted = np.zeros((len(prompts), width), bool)  # position t predicts targets[t] = tokens[t + 1]
    for row, (p, c) in enumerate(zip(prompts, completions)):
        tokens[row, :len(p) + len(c)] = list(p) + list(c)
        counted[row, len(p) - 1:len(p) + len(c) - 1] = True
    rows = dict(tokens=tokens, targets=np.roll(tokens, -1, axis=1), counted=counted,
                positions=np.broadcast_to(np.arange(width, dtype=np.int32), tokens.shape),
                segment_ids=(np.arange(width)[None, :] < np.asarray(lengths)[:, None]).astype(np.int32))
    if sequence > 1:  # a permutation of each row's slots: the sum over counted slots is unchanged
        order = sequence_parallel.zigzag_order(width, sequence)
        rows = {key: value[:, order] for key, value in rows.items()}
    return gather_to_host(_score(graphdef, states, **rows))


@functools.partial(jax.jit, static_argnums=0)
def _score(graphdef, states, tokens, targets, counted, positions, segment_ids):
    model = nnx.merge(graphdef, *states)
    hidden = model.hidden_states(tokens, positions, segment_ids=segment_ids)
    token_lp = token_logprobs(hidden, model.lm_head_weight(), targets, logit_softcap=model.config.final_logit_softcap)
    return jnp.sum(jnp.where(counted, token_lp, 0.0), axis=1)
