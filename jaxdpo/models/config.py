"""ModelConfig: the switches that turn one decoder into Llama, Mistral, Qwen2/3 or Gemma 1/2/3.

The translation from and to a transformers config.json lives in `jaxdpo/models/families.py`
(`config_from_hf`, `config_to_hf`), which imports this module (never the other way round).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

# The floating dtypes, by the name a config file, a checkpoint's meta or the command line gives them
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    # None, or a dict as in HF rope_parameters minus rope_theta, e.g. {"rope_type": "llama3", "factor": 8.0, ...}
    rope_scaling: dict | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position: int = 2048
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None

    # --- family switches (defaults = Llama) ---
    model_type: str = "llama"
    qkv_bias: bool = False  # Qwen2, Llama with attention_bias
    out_bias: bool = False  # Llama with attention_bias also biases o_proj
    qk_norm: bool = False  # Qwen3, Gemma 3: RMSNorm over head_dim on q and k before RoPE
    norm_unit_offset: bool = False  # Gemma: RMSNorm scales by (1 + w), w stored as on disk
    scale_embeddings: bool = False  # Gemma: embeddings multiplied by sqrt(hidden_size)
    mlp_activation: str = "silu"  # "silu" (SwiGLU) or "gelu_tanh" (GeGLU, Gemma)
    sandwich_norms: bool = False  # Gemma 2/3: norms after attention and after the MLP too
    attn_logit_softcap: float | None = None  # Gemma 2
    final_logit_softcap: float | None = None  # Gemma 2
    query_pre_attn_scalar: int | float | None = None  # Gemma 2/3: attention scale = this ** -0.5 (else head_dim)
    sliding_window: int | None = None
    # one of FULL_ATTENTION / SLIDING_ATTENTION per layer; None = every layer full attention
    layer_types: tuple[str, ...] | None = None
    # RoPE of sliding-window layers when it differs from the global one (Gemma 3 local base)
    sliding_rope_theta: float | None = None
    sliding_rope_scaling: dict | None = None

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"ModelConfig: num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
        if self.mlp_activation not in ("silu", "gelu_tanh"):
            raise ValueError(f"ModelConfig: mlp_activation must be 'silu' or 'gelu_tanh', got {self.mlp_activation!r}")
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_layers:
                raise ValueError(f"ModelConfig: layer_types has {len(self.layer_types)} entries but num_layers="
                                 f"{self.num_layers}")
            bad = sorted(set(self.layer_types) - {FULL_ATTENTION, SLIDING_ATTENTION})
            if bad:
                raise ValueError(f"ModelConfig: unknown layer_types {bad}; use {FULL_ATTENTION!r} or "
                                 f"{SLIDING_ATTENTION!r}")
            if SLIDING_ATTENTION in self.layer_types and not self.sliding_window:
                raise ValueError("ModelConfig: layer_types has sliding_attention layers but sliding_window is None")

    def __hash__(self):  # rope_scaling is a dict; NNX needs the config (a static attribute) hashable
        return hash(repr(self))

    @property
    def layer_is_sliding(self) -> tuple[bool, ...]:
        """Per layer: does it use the sliding window (and the sliding RoPE)?"""
        if self.layer_types is None:
            return (self.sliding_window is not None,) * self.num_layers
        return tuple(t == SLIDING_ATTENTION for t in self.layer_types)

    @property
    def attention_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5
