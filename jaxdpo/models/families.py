"""Each supported family: its HF config.json <-> ModelConfig translation and its safetensors key names.

The decoder is one module with switches; a family here is only (a) which switches its config.json turns
on and (b) what its tensors are called on disk. transformers' modeling files are the ground truth.
"""

from __future__ import annotations

from jaxdpo.models.config import FULL_ATTENTION, SLIDING_ATTENTION, ModelConfig

# model_type -> (architecture class name written to config.json, family defaults)
FAMILIES: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaForCausalLM", {}),
    "mistral": ("MistralForCausalLM", {}),
    "qwen2": ("Qwen2ForCausalLM", {"qkv_bias": True}),
    "qwen3": ("Qwen3ForCausalLM", {"qk_norm": True}),
    "gemma": ("GemmaForCausalLM", {"norm_unit_offset": True, "scale_embeddings": True,
                                   "mlp_activation": "gelu_tanh"}),
    "gemma2": ("Gemma2ForCausalLM", {"norm_unit_offset": True, "scale_embeddings": True,
                                     "mlp_activation": "gelu_tanh", "sandwich_norms": True}),
    "gemma3_text": ("Gemma3ForCausalLM", {"norm_unit_offset": True, "scale_embeddings": True,
                                          "mlp_activation": "gelu_tanh", "sandwich_norms": True, "qk_norm": True}),
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
_GEMMA = ("gemma", "gemma2", "gemma3_text")
_ATTENTION_BIAS_FAMILIES = ("llama", "qwen3", *_GEMMA)
# HF defaults that differ between families (used when config.json omits the key)
_DEFAULT_THETA = {"gemma3_text": 1_000_000.0}
_DEFAULT_SLIDING_THETA = 10_000.0


def _split_rope(params: dict | None, default_theta: float, where: str) -> tuple[float, dict | None]:
    """HF rope dict {"rope_type", "rope_theta", ...} -> (theta, scaling or None for plain RoPE)."""
    params = dict(params or {})
    theta = float(params.pop("rope_theta", default_theta))
    rope_type = params.get("rope_type", params.pop("type", "default"))
    params["rope_type"] = rope_type
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"{where}: rope_type {rope_type!r} is not supported; jaxdpo supports "
                         f"{', '.join(SUPPORTED_ROPE_TYPES)}")
    return theta, (None if rope_type == "default" else params)


def _join_rope(theta: float, scaling: dict | None) -> dict:
    return {"rope_theta": theta, **(scaling or {"rope_type": "default"})}


def config_from_hf(hf: dict) -> ModelConfig:
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(f"config.json: model_type {model_type!r} is not supported; supported model types: "
                         f"{', '.join(FAMILIES)}")
    where = f"config.json ({model_type})"
    if hf.get("mlp_bias"):
        raise ValueError(f"{where}: mlp_bias=true is not supported")
    switches = dict(FAMILIES[model_type][1])
    num_heads = hf["num_attention_heads"]
    num_layers = hf["num_hidden_layers"]
    default_theta = _DEFAULT_THETA.get(model_type, 10000.0)

    rope = hf.get("rope_parameters")
    sliding_theta, sliding_scaling = None, None
    if rope is not None and (FULL_ATTENTION in rope or SLIDING_ATTENTION in rope):  # per-layer-type (Gemma 3)
        theta, scaling = _split_rope(rope.get(FULL_ATTENTION), default_theta, where)
        sliding_theta, sliding_scaling = _split_rope(rope.get(SLIDING_ATTENTION), _DEFAULT_SLIDING_THETA, where)
    elif rope is not None:
        theta, scaling = _split_rope(rope, default_theta, where)
    else:  # transformers 4 format
        theta, scaling = _split_rope({"rope_theta": hf.get("rope_theta", default_theta),
                                      **(hf.get("rope_scaling") or {})}, default_theta, where)
    if model_type == "gemma3_text" and sliding_theta is None:
        sliding_theta = float(hf.get("rope_local_base_freq", _DEFAULT_SLIDING_THETA))

    sliding_window = hf.get("sliding_window")
    if model_type in ("qwen2", "qwen3") and not hf.get("use_sliding_window", False):
        sliding_window = None
    layer_types = hf.get("layer_types")
    if layer_types is None and sliding_window:
        if model_type == "gemma2":
            layer_types = [SLIDING_ATTENTION if (i + 1) % 2 else FULL_ATTENTION for i in range(num_layers)]
        elif model_type == "gemma3_text":
            pattern = hf.get("sliding_window_pattern", 6)
            layer_types = [SLIDING_ATTENTION if (i + 1) % pattern else FULL_ATTENTION for i in range(num_layers)]
        elif model_type in ("qwen2", "qwen3"):
            first = hf.get("max_window_layers", num_layers)
            layer_types = [SLIDING_ATTENTION if i >= first else FULL_ATTENTION for i in range(num_layers)]
        else:  # Mistral: every layer slides
            layer_types = [SLIDING_ATTENTION] * num_layers
    if layer_types is not None and SLIDING_ATTENTION not in layer_types:
        sliding_window = None  # keeps layer_is_sliding all False without losing the layer_types
    if hf.get("use_bidirectional_attention"):
        raise ValueError(f"{where}: use_bidirectional_attention=true is not a causal LM; not supported")

    activation = hf.get("hidden_activation") or hf.get("hidden_act") or "silu"
    if activation in ("gelu_pytorch_tanh", "gelu_tanh"):
        activation = "gelu_tanh"
    elif activation != "silu":
        raise ValueError(f"{where}: activation {activation!r} is not supported (use silu or gelu_pytorch_tanh)")
    switches["mlp_activation"] = activation
    # attention_bias biases q, k, v AND o (Mistral has no biases; Qwen2 always biases q, k, v only)
    if model_type in _ATTENTION_BIAS_FAMILIES and hf.get("attention_bias"):
        switches["qkv_bias"] = switches["out_bias"] = True
    if model_type in ("gemma2", "gemma3_text"):
        switches["attn_logit_softcap"] = hf.get("attn_logit_softcapping")
        switches["final_logit_softcap"] = hf.get("final_logit_softcapping")
        switches["query_pre_attn_scalar"] = hf.get("query_pre_attn_scalar", 256)  # an int in transformers
    eos = hf.get("eos_token_id")
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
        rope_theta=theta,
        rope_scaling=scaling,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", model_type in _GEMMA)),
        max_position=hf.get("max_position_embeddings", 2048),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
        pad_token_id=hf.get("pad_token_id"),
        model_type=model_type,
        sliding_window=sliding_window,
        layer_types=tuple(layer_types) if layer_types is not None else None,
        sliding_rope_theta=sliding_theta,
        sliding_rope_scaling=sliding_scaling,
        **switches,
    )


def config_to_hf(config: ModelConfig, dtype: str = "float32") -> dict:
    """A transformers 5 config.json dict for `config`."""
    model_type = config.model_type
    if model_type not in FAMILIES:
        raise ValueError(f"ModelConfig.model_type {model_type!r} is not supported; supported: {', '.join(FAMILIES)}")
    eos = config.eos_token_id
    hf = {
        "architectures": [FAMILIES[model_type][0]],
        "model_type": model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "max_position_embeddings": config.max_position,
        "rms_norm_eps": config.rms_norm_eps,
        "tie_word_embeddings": config.tie_word_embeddings,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": list(eos) if isinstance(eos, tuple) else eos,
        "pad_token_id": config.pad_token_id,
        "dtype": dtype,
        "use_cache": True,
        "attention_dropout": 0.0,
    }
    activation = "gelu_pytorch_tanh" if config.mlp_activation == "gelu_tanh" else "silu"
    if model_type in ("gemma2", "gemma3_text"):
        hf["hidden_activation"] = activation
    else:
        hf["hidden_act"] = activation
    if model_type in _ATTENTION_BIAS_FAMILIES:
        if config.qkv_bias != config.out_bias:
            raise ValueError(f"config_to_hf: {model_type} biases q, k, v and o together (attention_bias); "
                             f"got qkv_bias={config.qkv_bias}, out_bias={config.out_bias}")
        hf["attention_bias"] = config.qkv_bias
    elif config.out_bias or (config.qkv_bias and model_type != "qwen2"):
        raise ValueError(f"config_to_hf: {model_type} has no attention_bias option; "
                         f"got qkv_bias={config.qkv_bias}, out_bias={config.out_bias}")
    if model_type == "llama":
        hf["mlp_bias"] = False
    if config.sliding_rope_theta is not None:
        hf["rope_parameters"] = {
            FULL_ATTENTION: _join_rope(config.rope_theta, config.rope_scaling),
            SLIDING_ATTENTION: _join_rope(config.sliding_rope_theta, config.sliding_rope_scaling),
        }
    else:
        hf["rope_parameters"] = _join_rope(config.rope_theta, config.rope_scaling)
    if model_type in ("qwen2", "qwen3"):
        hf["use_sliding_window"] = config.sliding_window is not None
        hf["max_window_layers"] = config.num_layers
    if model_type != "gemma":
        hf["sliding_window"] = config.sliding_window
    # only families whose HF config has layer_types (transformers reads a mistral config with layer_types
    # as "ministral"); Mistral slides every layer whenever sliding_window is set
    if config.layer_types is not None and model_type in ("qwen2", "qwen3", "gemma2", "gemma3_text"):
        hf["layer_types"] = list(config.layer_types)
    if model_type not in ("qwen2", "qwen3", "gemma2", "gemma3_text") and len(set(config.layer_is_sliding)) > 1:
        raise ValueError(f"config_to_hf: {model_type} cannot express a mix of sliding and full layers "
                         f"(layer_types={config.layer_types})")
    if model_type in ("gemma2", "gemma3_text"):
        hf["attn_logit_softcapping"] = config.attn_logit_softcap
        hf["final_logit_softcapping"] = config.final_logit_softcap
        scalar = config.query_pre_attn_scalar
        hf["query_pre_attn_scalar"] = int(scalar) if scalar is not None and float(scalar).is_integer() else scalar
    return hf


# ---- safetensors key names ----------------------------------------------------------------------------

def top_key_map(config: ModelConfig) -> dict[str, str]:
    """Our top-level param name -> HF tensor name."""
    keys = {"embed": "model.embed_tokens.weight", "final_norm": "model.norm.weight"}
    if not config.tie_word_embeddings:
        keys["lm_head"] = "lm_head.weight"
    return keys


def layer_key_map(config: ModelConfig) -> dict[str, str]:
    """Our stacked layer param name -> HF tensor name with `{i}` for the layer index."""
    p = "model.layers.{i}."
    keys = {
        "attn_norm": p + "input_layernorm.weight",
        "q_proj": p + "self_attn.q_proj.weight",
        "k_proj": p + "self_attn.k_proj.weight",
        "v_proj": p + "self_attn.v_proj.weight",
        "o_proj": p + "self_attn.o_proj.weight",
        "gate_proj": p + "mlp.gate_proj.weight",
        "up_proj": p + "mlp.up_proj.weight",
        "down_proj": p + "mlp.down_proj.weight",
    }
    if config.sandwich_norms:  # Gemma 2/3: post_attention_layernorm normalizes the attention OUTPUT
        keys["attn_out_norm"] = p + "post_attention_layernorm.weight"
        keys["mlp_norm"] = p + "pre_feedforward_layernorm.weight"
        keys["mlp_out_norm"] = p + "post_feedforward_layernorm.weight"
    else:  # Llama: post_attention_layernorm is the norm before the MLP
        keys["mlp_norm"] = p + "post_attention_layernorm.weight"
    if config.qkv_bias:
        keys.update(q_bias=p + "self_attn.q_proj.bias", k_bias=p + "self_attn.k_proj.bias",
                    v_bias=p + "self_attn.v_proj.bias")
    if config.out_bias:
        keys["o_bias"] = p + "self_attn.o_proj.bias"
    if config.qk_norm:
        keys.update(q_norm=p + "self_attn.q_norm.weight", k_norm=p + "self_attn.k_norm.weight")
    return keys
