"""One Flax NNX decoder for the Llama family, switched by ModelConfig.

The layers are STACKED: every layer weight is one Param with a leading `layers` axis, and the forward
runs `jax.lax.scan` over them, so compile time does not grow with depth. The scan body is a pure function
of one layer's param dict; `layer_params_hook` is applied to that dict inside the body (the host-offloaded
reference uses it to copy one layer at a time into device memory). Per-layer differences (sliding
window, local vs global RoPE) are scanned as per-layer inputs, never as Python branches.

Dimension letters: b batch, t/s query/key time, d model, n query heads, k kv heads, h head_dim, f mlp,
v vocab, l layers.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdpo.models.config import ModelConfig
from jaxdpo.models.low_rank import lora_update
from jaxdpo.models.quantize import QuantizedBase, dequantize
from jaxdpo.ops.attention import attention, make_attention_mask, padding_lengths
from jaxdpo.ops.linear import linear
from jaxdpo.parallel.sharding import logical_to_mesh_axes

REMAT_POLICIES = ("none", "full", "dots_saveable")
# The linear projections of a layer -> how many leading dims (after `layers`) of its stacked weight are
# input dims (the rest are output dims). LoRA targets them, HF import/export transposes them, and the
# order is the order in which their LoRA dropout keys are folded from a layer's key (never reorder: a
# resumed run must draw the same masks).
PROJECTIONS = {"q_proj": 1, "k_proj": 1, "v_proj": 1, "o_proj": 2, "gate_proj": 1, "up_proj": 1, "down_proj": 1}
_NORMS = ("attn_norm", "mlp_norm", "attn_out_norm", "mlp_out_norm", "q_norm", "k_norm")


def top_param_specs(config: ModelConfig) -> dict[str, tuple[tuple[int, ...], tuple[str, ...]]]:
    """name -> (shape, logical axes) of the non-layer params."""
    d, v = config.hidden_size, config.vocab_size
    specs = {"embed": ((v, d), ("vocab", "embed")), "final_norm": ((d,), ("norm",))}
    if not config.tie_word_embeddings:
        specs["lm_head"] = ((d, v), ("embed", "vocab"))
    return specs


def layer_param_specs(config: ModelConfig) -> dict[str, tuple[tuple[int, ...], tuple[str, ...]]]:
    """name -> (shape, logical axes) of the stacked layer params (leading `layers` axis)."""
    c = config
    l, d, n, k, h, f = c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size
    specs = {
        "attn_norm": ((l, d), ("layers", "norm")),
        "q_proj": ((l, d, n, h), ("layers", "embed", "heads", "head_dim")),
        "k_proj": ((l, d, k, h), ("layers", "embed", "kv_heads", "head_dim")),
        "v_proj": ((l, d, k, h), ("layers", "embed", "kv_heads", "head_dim")),
        "o_proj": ((l, n, h, d), ("layers", "heads", "head_dim", "embed")),
        "mlp_norm": ((l, d), ("layers", "norm")),
        "gate_proj": ((l, d, f), ("layers", "embed", "mlp")),
        "up_proj": ((l, d, f), ("layers", "embed", "mlp")),
        "down_proj": ((l, f, d), ("layers", "mlp", "embed")),
    }
    if c.qkv_bias:
        specs["q_bias"] = ((l, n, h), ("layers", "heads", "head_dim"))
        specs["k_bias"] = ((l, k, h), ("layers", "kv_heads", "head_dim"))
        specs["v_bias"] = ((l, k, h), ("layers", "kv_heads", "head_dim"))
    if c.out_bias:
        specs["o_bias"] = ((l, d), ("layers", "norm"))
    if c.qk_norm:
        specs["q_norm"] = ((l, h), ("layers", "norm"))
        specs["k_norm"] = ((l, h), ("layers", "norm"))
    if c.sandwich_norms:
        specs["attn_out_norm"] = ((l, d), ("layers", "norm"))
        specs["mlp_out_norm"] = ((l, d), ("layers", "norm"))
    return specs


@dataclasses.dataclass(frozen=True)
class LoRASettings:
    """Low-rank adapters on the `targets` projections: x W + (alpha / rank) (dropout(x) A) B."""
    rank: int
    alpha: float
    targets: tuple[str, ...]
    dropout: float = 0.0  # probability of zeroing an adapter input unit while training
    base_dtype: str = "none"  # storage of the targeted frozen weights: none, int8, nf4 (jaxdpo.models.quantize)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class LoRAParam(nnx.Param):
    """An adapter matrix: the only thing that trains when LoRA is on."""


def adapter_specs(config: ModelConfig, settings: LoRASettings) -> dict[str, tuple[tuple[int, ...], tuple]]:
    """`{target}_lora_a` / `{target}_lora_b` -> (shape, logical axes); the rank axis is never sharded."""
    base = layer_param_specs(config)
    specs = {}
    for target in settings.targets:
        (layers, *dims), (layers_axis, *axes) = base[target]
        k = PROJECTIONS[target]
        specs[f"{target}_lora_a"] = ((layers, *dims[:k], settings.rank), (layers_axis, *axes[:k], None))
        specs[f"{target}_lora_b"] = ((layers, settings.rank, *dims[k:]), (layers_axis, None, *axes[k:]))
    return specs


def adapter_values(config: ModelConfig, settings: LoRASettings, *, seed: int, param_dtype) -> dict:
    """Fresh adapters, name -> array: A uniform in +-1/sqrt(fan_in) (PEFT's default) from `seed`, B zero
    (so a fresh adapter leaves the model exactly as it was)."""
    key = jax.random.key(seed)
    values = {}
    for name, (shape, _) in adapter_specs(config, settings).items():
        if name.endswith("_lora_a"):
            key, sub = jax.random.split(key)
            bound = 1.0 / math.sqrt(math.prod(shape[1:-1]))
            values[name] = jax.random.uniform(sub, shape, jnp.float32, -bound, bound).astype(param_dtype)
        else:
            values[name] = jnp.zeros(shape, param_dtype)
    return values


def _init_value(name, shape, key, config, param_dtype):
    if name.endswith("norm"):  # identity scale: 1, or 0 where the family stores (w) and applies (1 + w)
        return jnp.full(shape, 0.0 if config.norm_unit_offset else 1.0, param_dtype)
    if name.endswith("bias"):
        return jnp.zeros(shape, param_dtype)
    return (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(param_dtype)


def _make_param(name, shape, logical, key, config, param_dtype):
    # The sharding names are metadata everywhere; they place the value only when a mesh is active
    # (`with jax.set_mesh(mesh):`), so the same module also builds on a bare single device.
    mesh_active = not jax.sharding.get_abstract_mesh().empty
    return nnx.Param(_init_value(name, shape, key, config, param_dtype),
                     out_sharding=logical_to_mesh_axes(logical), eager_sharding=mesh_active)


# ---- pure math ------------------------------------------------------------------------------------------

def rms_norm(x, weight, *, eps, unit_offset, dtype):
    """Normalize in fp32 like transformers; Llama casts back before scaling, Gemma scales by (1+w) in fp32."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    if unit_offset:
        return (normed * (1.0 + weight.astype(jnp.float32))).astype(dtype)
    return weight.astype(dtype) * normed.astype(dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> np.ndarray:
    """[head_dim/2] float32 inverse frequencies, with linear or llama3 (Llama 3.1) scaling as transformers."""
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv_freq = (1.0 / (np.float32(theta) ** exponents)).astype(np.float32)
    rope_type = (scaling or {}).get("rope_type", "default")
    if rope_type == "default":
        return inv_freq
    factor = np.float32(scaling["factor"])
    if rope_type == "linear":
        return (inv_freq / factor).astype(np.float32)
    if rope_type == "llama3":
        low, high = np.float32(scaling["low_freq_factor"]), np.float32(scaling["high_freq_factor"])
        old_len = np.float32(scaling["original_max_position_embeddings"])
        low_freq_wavelen, high_freq_wavelen = old_len / low, old_len / high
        wavelen = np.float32(2 * np.pi) / inv_freq
        scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    raise ValueError(f"rope_type {rope_type!r} is not supported (default, linear, llama3)")


def rope_tables(positions, inv_freq):
    """positions [B,T] -> cos, sin [B,T,H] in fp32 (the two halves repeat, matching rotate_half)."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
    angles = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x, cos, sin):
    """x [B,T,N,H]; cos/sin [B,T,H]."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin


def _softcap(x, cap):
    return jnp.tanh(x / cap) * cap


def _layer_norm(p: dict, y, name: str, config: ModelConfig, dtype):
    return rms_norm(y, p[name], eps=config.rms_norm_eps, unit_offset=config.norm_unit_offset, dtype=dtype)


def _contract(spec: str, y, w, ways: int):
    """einsum(spec, y, w) for a spec whose contracted letter ends y's and starts w's ("btd,df->btf"). With
    ways > 1 the contracted dim is cut into `ways` equal parts on both sides (a free reshape of the stored
    weight), contracted as one batched dot over the parts, and summed: XLA:CPU runs a plain matrix-vector
    product on one core and this one on several (DEVELOPING.md, Measurements)."""
    if ways == 1 or y.shape[-1] % ways:
        return linear(spec, y, w)
    lhs, rest = spec.split(",")
    rhs, out = rest.split("->")
    parts_y = y.reshape(*y.shape[:-1], ways, y.shape[-1] // ways)
    parts_w = w.reshape(ways, w.shape[0] // ways, *w.shape[1:])
    return jnp.einsum(f"{lhs[:-1]}s{rhs[0]},s{rhs}->s{out}", parts_y, parts_w).sum(0)


def base_weight(p: dict, name: str, dtype):
    """One layer's weight of projection `name` in `dtype`: as stored, or dequantized from its codes and block
    scales when the base is quantized (jaxdpo.models.quantize; blocks along the last input dim)."""
    if f"{name}_codes" in p:
        return dequantize(p[f"{name}_codes"], p[f"{name}_scales"], PROJECTIONS[name] - 1, dtype)
    return p[name].astype(dtype)


@functools.partial(jax.checkpoint, static_argnums=(0, 4, 5, 6))
def _quantized_product(spec: str, y, codes, scales, name: str, dtype, contraction_ways: int):
    """y W with W dequantized from its codes: under jax.checkpoint, the backward pass dequantizes W again
    instead of keeping it from the forward (saved, every layer's W would be held in full precision, the
    memory the quantized base exists to save)."""
    weight = dequantize(codes, scales, PROJECTIONS[name] - 1, dtype)
    return _contract(spec, y, weight, contraction_ways)


def _project(p: dict, spec: str, y, name: str, *, dtype, lora_scale: float, lora_dropout_rate: float,
             lora_dropout_key, contraction_ways: int = 1):
    """y W for the projection `name`, plus lora_scale * (y A) B when p holds its adapter."""
    if f"{name}_codes" in p:
        out = _quantized_product(spec, y, p[f"{name}_codes"], p[f"{name}_scales"], name, dtype, contraction_ways)
    else:
        out = _contract(spec, y, base_weight(p, name, dtype), contraction_ways)
    if f"{name}_lora_a" in p:
        key = None
        if lora_dropout_key is not None:
            key = jax.random.fold_in(lora_dropout_key, list(PROJECTIONS).index(name))
        out = out + lora_scale * lora_update(y, p[f"{name}_lora_a"].astype(dtype), p[f"{name}_lora_b"].astype(dtype),
                                             spec, dropout_rate=lora_dropout_rate, dropout_key=key)
    return out


def attention_inputs(p: dict, x, *, cos, sin, config: ModelConfig, dtype, lora_scale: float = 1.0,
                     lora_dropout_rate: float = 0.0, lora_dropout_key=None, contraction_ways: int = 1):
    """The first half of a block: x [B,T,D] -> q [B,T,N,H], k and v [B,T,K,H], RoPE applied.
    A KV-cached step (jaxdpo.sampling.generate) writes k and v into its cache and attends over that; it sets
    `contraction_ways` (see _contract)."""
    c = config
    lora = dict(dtype=dtype, lora_scale=lora_scale, lora_dropout_rate=lora_dropout_rate,
                lora_dropout_key=lora_dropout_key, contraction_ways=contraction_ways)
    h = _layer_norm(p, x, "attn_norm", c, dtype)
    q = _project(p, "btd,dnh->btnh", h, "q_proj", **lora)
    k = _project(p, "btd,dkh->btkh", h, "k_proj", **lora)
    v = _project(p, "btd,dkh->btkh", h, "v_proj", **lora)
    if c.qkv_bias:
        q, k, v = q + p["q_bias"].astype(dtype), k + p["k_bias"].astype(dtype), v + p["v_bias"].astype(dtype)
    if c.qk_norm:
        q, k = _layer_norm(p, q, "q_norm", c, dtype), _layer_norm(p, k, "k_norm", c, dtype)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def attention_output_and_mlp(p: dict, x, a, *, config: ModelConfig, dtype, lora_scale: float = 1.0,
                             lora_dropout_rate: float = 0.0, lora_dropout_key=None, contraction_ways: int = 1):
    """The second half of a block: the attention output a [B,T,N,H] -> o_proj, residual, MLP, residual."""
    c = config
    lora = dict(dtype=dtype, lora_scale=lora_scale, lora_dropout_rate=lora_dropout_rate,
                lora_dropout_key=lora_dropout_key, contraction_ways=contraction_ways)
    # (n, h) merged into one contracted dim: the activation is laid out to suit the stored [N*H, D] weight,
    # never the other way round (XLA:CPU otherwise may transpose the weight, a copy per layer per call)
    b, t, n, h = a.shape
    o_params = {"o_proj": base_weight(p, "o_proj", dtype).reshape(n * h, -1)}
    if "o_proj_lora_a" in p:
        o_params["o_proj_lora_a"] = p["o_proj_lora_a"].reshape(n * h, -1)
    if "o_proj_lora_b" in p:
        o_params["o_proj_lora_b"] = p["o_proj_lora_b"]
    o = _project(o_params, "bti,id->btd", a.reshape(b, t, n * h), "o_proj", **lora)
    if c.out_bias:
        o = o + p["o_bias"].astype(dtype)
    if c.sandwich_norms:
        o = _layer_norm(p, o, "attn_out_norm", c, dtype)
    x = x + o

    h = _layer_norm(p, x, "mlp_norm", c, dtype)
    gate = _project(p, "btd,df->btf", h, "gate_proj", **lora)
    up = _project(p, "btd,df->btf", h, "up_proj", **lora)
    act = jax.nn.silu(gate) if c.mlp_activation == "silu" else jax.nn.gelu(gate, approximate=True)
    m = _project(p, "btf,fd->btd", act * up, "down_proj", **lora)
    if c.sandwich_norms:
        m = _layer_norm(p, m, "mlp_out_norm", c, dtype)
    return x + m


def decoder_layer(p: dict, x, *, cos, sin, mask, config: ModelConfig, dtype, lora_scale: float = 1.0,
                  segment_ids=None, branch_ids=None, positions=None, sliding_window=None,
                  attention_backend: str = "xla", seq_lengths=None, lora_dropout_rate: float = 0.0,
                  lora_dropout_key=None):
    """One pre-norm block. p: this layer's params (no layers axis); x [B,T,D]. A projection with a LoRA
    adapter in p (`{name}_lora_a`, `{name}_lora_b`) adds lora_scale * (x A) B to x W; given this layer's
    `lora_dropout_key`, the adapter sees dropout(x) with a mask keyed by fold_in(key, its stream index)."""
    c = config
    lora = dict(lora_scale=lora_scale, lora_dropout_rate=lora_dropout_rate, lora_dropout_key=lora_dropout_key)
    q, k, v = attention_inputs(p, x, cos=cos, sin=sin, config=c, dtype=dtype, **lora)
    a = attention(q, k, v, mask=mask, scale=c.attention_scale, logit_softcap=c.attn_logit_softcap,
                  backend=attention_backend, seq_lengths=seq_lengths, segment_ids=segment_ids,
                  branch_ids=branch_ids, positions=positions, sliding_window=sliding_window)
    return attention_output_and_mlp(p, x, a, config=c, dtype=dtype, **lora)


def layer_masks(config: ModelConfig, backend: str, segment_ids, branch_ids, positions):
    """A function of a layer's traced `sliding` flag -> (its attention mask, its sliding window).
    The masks are built once, as bool, and each layer picks its own in the scan. Ring attention
    ("sequence_parallel") gets no mask: a [T,T] mask would be whole-row, so it builds the mask block by
    block from the ids, with the window as a per-layer scalar."""
    any_sliding = bool(np.asarray(config.layer_is_sliding).any())
    if backend == "sequence_parallel":
        if not any_sliding:
            return lambda sliding: (None, None)
        no_window = jnp.iinfo(jnp.int32).max
        return lambda sliding: (None, jnp.where(sliding, config.sliding_window, no_window))
    full = make_attention_mask(segment_ids, branch_ids, positions)
    if not any_sliding:
        return lambda sliding: (full, None)
    windowed = make_attention_mask(segment_ids, branch_ids, positions, config.sliding_window)
    return lambda sliding: (jnp.where(sliding, windowed, full), None)


# ---- the module -----------------------------------------------------------------------------------------

class LayerStack(nnx.Module):
    """Holds the stacked layer Params as attributes named as in `layer_param_specs`, and with `lora` the
    adapters named as in `adapter_specs` (LoRAParam; fresh ones from `lora_seed`)."""

    def __init__(self, config: ModelConfig, *, param_dtype, lora: LoRASettings | None, lora_seed: int,
                 rngs: nnx.Rngs):
        for name, (shape, logical) in layer_param_specs(config).items():
            setattr(self, name, _make_param(name, shape, logical, rngs.params(), config, param_dtype))
        adapters = {} if lora is None else adapter_specs(config, lora)
        if adapters:
            mesh_active = not jax.sharding.get_abstract_mesh().empty
            values = adapter_values(config, lora, seed=lora_seed, param_dtype=param_dtype)
            for name, (_, logical) in adapters.items():
                setattr(self, name, LoRAParam(values[name], out_sharding=logical_to_mesh_axes(logical),
                                              eager_sharding=mesh_active))
        self.names = tuple(layer_param_specs(config)) + tuple(adapters)

    def arrays(self) -> dict:
        return {name: getattr(self, name)[...] for name in self.names}

    def hold_quantized(self, name: str, codes, scales) -> None:
        """Hold the projection `name` as its quantized codes and block scales (jaxdpo.models.quantize)
        instead of its float weight, which is dropped. They keep the weight's sharding names, which place
        them where a mesh is active and describe their sharding where they are only shapes (nnx.eval_shape)."""
        out_sharding = getattr(self, name).get_metadata()["out_sharding"]
        delattr(self, name)
        mesh_active = not jax.sharding.get_abstract_mesh().empty
        for suffix, value in (("codes", codes), ("scales", scales)):
            setattr(self, f"{name}_{suffix}", QuantizedBase(value, out_sharding=out_sharding,
                                                            eager_sharding=mesh_active))
        self.names = tuple(n for n in self.names if n != name) + (f"{name}_codes", f"{name}_scales")


class Decoder(nnx.Module):
    """The decoder. Its switches are constructor fields, static parts of the graphdef every step is traced
    with: `attention_backend` ("xla", or a kernel ops.attention.select_backend found to express this
    run's mask exactly) and `lora` (adapters on the target projections, with their scale and dropout)."""

    def __init__(self, config: ModelConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, remat: str = "none",
                 attention_backend: str = "xla", lora: LoRASettings | None = None, lora_seed: int = 0,
                 rngs: nnx.Rngs):
        if remat not in REMAT_POLICIES:
            raise ValueError(f"Decoder: remat must be one of {REMAT_POLICIES}, got {remat!r}")
        self.config = config
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.remat = remat
        self.attention_backend = attention_backend
        self.lora = lora
        for name, (shape, logical) in top_param_specs(config).items():
            setattr(self, name, _make_param(name, shape, logical, rngs.params(), config, param_dtype))
        self.layers = LayerStack(config, param_dtype=param_dtype, lora=lora, lora_seed=lora_seed, rngs=rngs)

    def lm_head_weight(self):
        """[D,V] in the compute dtype (the embedding transposed when tied)."""
        if self.config.tie_word_embeddings:
            return self.embed[...].T.astype(self.dtype)
        return self.lm_head[...].astype(self.dtype)

    def embed_tokens(self, input_ids):
        """[B,T] ids -> [B,T,D] input embeddings in the compute dtype."""
        x = jnp.take(self.embed[...], input_ids, axis=0).astype(self.dtype)
        if self.config.scale_embeddings:  # Gemma rounds sqrt(D) to the compute dtype first
            x = x * jnp.asarray(self.config.hidden_size ** 0.5, self.dtype)
        return x

    def final_normed(self, x):
        """The last layer's output [B,T,D] -> the hidden states the LM head reads."""
        c = self.config
        return rms_norm(x, self.final_norm[...], eps=c.rms_norm_eps, unit_offset=c.norm_unit_offset,
                        dtype=self.dtype)

    def head_logits(self, hidden):
        """[B,T,D] final-normed hidden -> [B,T,V] float32 logits (final softcap applied when the family has one)."""
        if self.config.tie_word_embeddings:  # contract with the [V,D] embedding as stored: no transposed copy
            logits = jnp.einsum("btd,vd->btv", hidden, self.embed[...].astype(self.dtype),
                                preferred_element_type=jnp.float32)
        else:
            logits = jnp.einsum("btd,dv->btv", hidden, self.lm_head[...].astype(self.dtype),
                                preferred_element_type=jnp.float32)
        if self.config.final_logit_softcap is not None:
            logits = _softcap(logits, self.config.final_logit_softcap)
        return logits

    def hidden_states(self, input_ids, positions=None, segment_ids=None, branch_ids=None, *,
                      layer_params_hook: Callable[[dict], dict] | None = None, lora_dropout_key=None):
        """[B,T] ids -> [B,T,D] hidden states after the final norm. `lora_dropout_key` (training forwards
        only) turns on the adapters' dropout (rate `lora.dropout`); layer l
        uses fold_in(key, l). Without a key the forward is deterministic (eval, reference, export)."""
        c, dtype = self.config, self.dtype
        b, t = input_ids.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if segment_ids is None:
            segment_ids = jnp.ones((b, t), jnp.int32)
        if branch_ids is None:
            branch_ids = jnp.zeros((b, t), jnp.int32)

        x = self.embed_tokens(input_ids)

        is_sliding = np.asarray(c.layer_is_sliding)
        backend = self.attention_backend
        layer_mask = layer_masks(c, backend, segment_ids, branch_ids, positions)
        cos_g, sin_g = rope_tables(positions, rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling))
        local_rope = c.sliding_rope_theta is not None
        if local_rope:
            cos_l, sin_l = rope_tables(
                positions, rope_inv_freq(c.head_dim, c.sliding_rope_theta, c.sliding_rope_scaling))

        hook = layer_params_hook or (lambda params: params)
        # A kernel backend takes per-row lengths (cuDNN) or the segment (and branch) ids (splash) instead
        # of the mask, which XLA then never builds.
        seq_lengths = padding_lengths(segment_ids) if backend == "cudnn" else None
        lora_scale = 1.0 if self.lora is None else self.lora.scale
        lora_dropout_rate = 0.0 if self.lora is None else self.lora.dropout
        layer_keys = None  # scanned with the layers, so a rematerialized layer redraws the same masks
        if lora_dropout_key is not None and lora_dropout_rate > 0:
            layer_keys = jax.vmap(lambda l: jax.random.fold_in(lora_dropout_key, l))(jnp.arange(c.num_layers))

        def body(x, per_layer):
            params, sliding, layer_key = per_layer
            params = hook(params)
            (mask, window), cos, sin = layer_mask(sliding), cos_g, sin_g
            if local_rope:
                cos, sin = jnp.where(sliding, cos_l, cos_g), jnp.where(sliding, sin_l, sin_g)
            return decoder_layer(params, x, cos=cos, sin=sin, mask=mask, config=c, dtype=dtype,
                                 segment_ids=segment_ids, branch_ids=branch_ids, positions=positions,
                                 sliding_window=window, lora_scale=lora_scale, attention_backend=backend,
                                 seq_lengths=seq_lengths, lora_dropout_rate=lora_dropout_rate,
                                 lora_dropout_key=layer_key), None

        if self.remat == "full":
            body = jax.checkpoint(body)
        elif self.remat == "dots_saveable":
            body = jax.checkpoint(body, policy=jax.checkpoint_policies.dots_saveable)
        x, _ = jax.lax.scan(body, x, (self.layers.arrays(), jnp.asarray(is_sliding), layer_keys))
        return self.final_normed(x)

    def __call__(self, input_ids, positions=None, segment_ids=None, branch_ids=None, *,
                 layer_params_hook: Callable[[dict], dict] | None = None, lora_dropout_key=None):
        """[B,T] ids -> [B,T,V] float32 logits (final softcap applied when the family has one)."""
        h = self.hidden_states(input_ids, positions, segment_ids, branch_ids, layer_params_hook=layer_params_hook,
                               lora_dropout_key=lora_dropout_key)
        return self.head_logits(h)
