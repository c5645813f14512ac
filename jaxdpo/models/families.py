"""Each supported family: its HF config.json <-> ModelConfig translation and its safetensors key names.

The decoder is one module with switches; a family here is only (a) which switches its config.json turns
on and (b) what its tensors are called on disk. transformers' configuration and modeling files are the
ground truth. One class per family, both directions side by side; `Family` holds what they share (the
Llama layout), and a subclass overrides only the parts its config.json says differently.
"""

from __future__ import annotations

from jaxdpo.models.config import FULL_ATTENTION, SLIDING_ATTENTION, ModelConfig

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
DEFAULT_SLIDING_ROPE_THETA = 10_000.0
# ModelConfig.mlp_activation <-> the activation names of transformers' config.json
HF_ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}
# config.json switches the decoder has no counterpart for (when true) -> the rest of the error line
UNSUPPORTED_KEYS = {"mlp_bias": "is not supported", "use_bidirectional_attention": "is not a causal LM; not supported"}


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


class Family:
    """What every family's config.json shares: the Llama layout. A subclass sets `model_type`,
    `architecture` and `switches` and overrides the `*_from_hf` / `*_to_hf` pair where its config differs."""

    model_type: str
    architecture: str  # written to config.json "architectures"
    switches: dict = {}  # ModelConfig fields this family always sets
    mlp_activation = "silu"  # when config.json names none (transformers' default for the family)
    activation_key = "hidden_act"
    tie_word_embeddings = False  # when config.json does not say
    rope_theta = 10_000.0  # when config.json does not say
    attention_bias_option = True  # config.json's attention_bias biases q, k, v AND o
    has_sliding_window = True  # transformers' model reads config.json's sliding_window
    has_layer_types = False  # transformers' model reads config.json's layer_types (which layers slide)

    def from_hf(self, hf: dict) -> ModelConfig:
        where = f"config.json ({self.model_type})"
        for key, why in UNSUPPORTED_KEYS.items():
            if hf.get(key):
                raise ValueError(f"{where}: {key}=true {why}")
        fields = {**self.switches, **self.shape_from_hf(hf), **self.rope_from_hf(hf, where),
                  **self.window_from_hf(hf), **self.activation_from_hf(hf, where), **self.attention_bias_from_hf(hf),
                  **self.extra_from_hf(hf)}
        return ModelConfig(model_type=self.model_type, **fields)

    def to_hf(self, config: ModelConfig, dtype: str) -> dict:
        """A transformers 5 config.json dict for `config`."""
        return {"architectures": [self.architecture], "model_type": self.model_type, **self.shape_to_hf(config),
                "dtype": dtype, "use_cache": True, "attention_dropout": 0.0,
                **self.activation_to_hf(config), **self.attention_bias_to_hf(config), **self.rope_to_hf(config),
                **self.window_to_hf(config), **self.extra_to_hf(config)}

    # ---- sizes and special tokens -------------------------------------------------------------------------

    def shape_from_hf(self, hf: dict) -> dict:
        num_heads = hf["num_attention_heads"]
        eos = hf.get("eos_token_id")
        return dict(
            vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"], num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", self.tie_word_embeddings)),
            max_position=hf.get("max_position_embeddings", 2048),
            bos_token_id=hf.get("bos_token_id"), eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
            pad_token_id=hf.get("pad_token_id"))

    def shape_to_hf(self, config: ModelConfig) -> dict:
        eos = config.eos_token_id
        return {
            "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
            "intermediate_size": config.intermediate_size, "num_hidden_layers": config.num_layers,
            "num_attention_heads": config.num_heads, "num_key_value_heads": config.num_kv_heads,
            "head_dim": config.head_dim, "max_position_embeddings": config.max_position,
            "rms_norm_eps": config.rms_norm_eps, "tie_word_embeddings": config.tie_word_embeddings,
            "bos_token_id": config.bos_token_id, "eos_token_id": list(eos) if isinstance(eos, tuple) else eos,
            "pad_token_id": config.pad_token_id}

    # ---- RoPE: rope_parameters (transformers 5) or rope_theta and rope_scaling (transformers 4) ---------------

    def rope_from_hf(self, hf: dict, where: str) -> dict:
        rope = hf.get("rope_parameters")
        if rope is None:
            rope = {"rope_theta": hf.get("rope_theta", self.rope_theta), **(hf.get("rope_scaling") or {})}
        theta, scaling = _split_rope(rope, self.rope_theta, where)
        return dict(rope_theta=theta, rope_scaling=scaling)

    def rope_to_hf(self, config: ModelConfig) -> dict:
        if config.sliding_rope_theta is not None or config.sliding_rope_scaling is not None:
            raise ValueError(f"config_to_hf: {self.model_type} has one RoPE for every layer; got "
                             f"sliding_rope_theta={config.sliding_rope_theta}")
        return {"rope_parameters": _join_rope(config.rope_theta, config.rope_scaling)}

    # ---- sliding-window attention ---------------------------------------------------------------------------

    def window_from_hf(self, hf: dict) -> dict:
        window = self.sliding_window_from_hf(hf)
        num_layers = hf["num_hidden_layers"]
        layer_types = hf.get("layer_types") if self.has_layer_types else None
        if layer_types is None and window:
            layer_types = self.default_layer_types(hf, num_layers)
        if layer_types is not None and SLIDING_ATTENTION not in layer_types:
            window = None  # keeps layer_is_sliding all False without losing the layer_types
        return dict(sliding_window=window, layer_types=tuple(layer_types) if layer_types is not None else None)

    def sliding_window_from_hf(self, hf: dict) -> int | None:
        return hf.get("sliding_window") if self.has_sliding_window else None

    def default_layer_types(self, hf: dict, num_layers: int) -> list[str]:
        """The layers that slide when config.json sets a window but no layer_types: here all (Mistral)."""
        return [SLIDING_ATTENTION] * num_layers

    def window_to_hf(self, config: ModelConfig) -> dict:
        if not self.has_layer_types and len(set(config.layer_is_sliding)) > 1:
            raise ValueError(f"config_to_hf: {self.model_type} cannot express a mix of sliding and full layers "
                             f"(layer_types={config.layer_types})")
        if not self.has_sliding_window:
            if config.sliding_window is not None:
                raise ValueError(f"config_to_hf: {self.model_type} has no sliding window in transformers; "
                                 f"got sliding_window={config.sliding_window}")
            return {}
        # a Mistral config.json with layer_types reads as "ministral" in transformers: only where it belongs
        layer_types = {"layer_types": list(config.layer_types)} if self.has_layer_types and config.layer_types else {}
        return {"sliding_window": config.sliding_window, **layer_types}

    # ---- the MLP and the attention biases --------------------------------------------------------------------

    def activation_from_hf(self, hf: dict, where: str) -> dict:
        name = hf.get("hidden_activation") or hf.get("hidden_act")
        if name is None:
            return {"mlp_activation": self.mlp_activation}
        if name not in HF_ACTIVATIONS:
            raise ValueError(f"{where}: activation {name!r} is not supported (use silu or gelu_pytorch_tanh)")
        return {"mlp_activation": HF_ACTIVATIONS[name]}

    def activation_to_hf(self, config: ModelConfig) -> dict:
        return {self.activation_key: "gelu_pytorch_tanh" if config.mlp_activation == "gelu_tanh" else "silu"}

    def attention_bias_from_hf(self, hf: dict) -> dict:
        if self.attention_bias_option and hf.get("attention_bias"):
            return {"qkv_bias": True, "out_bias": True}
        return {}

    def attention_bias_to_hf(self, config: ModelConfig) -> dict:
        if self.attention_bias_option:
            if config.qkv_bias != config.out_bias:
                raise ValueError(f"config_to_hf: {self.model_type} biases q, k, v and o together (attention_bias); "
                                 f"got qkv_bias={config.qkv_bias}, out_bias={config.out_bias}")
            return {"attention_bias": config.qkv_bias}
        qkv_bias = self.switches.get("qkv_bias", False)
        if config.out_bias or config.qkv_bias != qkv_bias:
            raise ValueError(f"config_to_hf: {self.model_type} has no attention_bias option (q, k, v "
                             f"{'always' if qkv_bias else 'never'} have biases, o never); "
                             f"got qkv_bias={config.qkv_bias}, out_bias={config.out_bias}")
        return {}

    # ---- keys only some families have -------------------------------------------------------------------------

    def extra_from_hf(self, hf: dict) -> dict:
        return {}

    def extra_to_hf(self, config: ModelConfig) -> dict:
        return {}


class Llama(Family):
    model_type, architecture = "llama", "LlamaForCausalLM"
    has_sliding_window = False

    def extra_to_hf(self, config: ModelConfig) -> dict:
        return {"mlp_bias": False}


class Mistral(Family):
    model_type, architecture = "mistral", "MistralForCausalLM"
    attention_bias_option = False  # no biases at all


class Qwen2(Family):
    model_type, architecture = "qwen2", "Qwen2ForCausalLM"
    switches = {"qkv_bias": True}
    attention_bias_option = False  # q, k, v always biased, o never
    has_layer_types = True

    def sliding_window_from_hf(self, hf: dict) -> int | None:
        return hf.get("sliding_window") if hf.get("use_sliding_window", False) else None

    def default_layer_types(self, hf: dict, num_layers: int) -> list[str]:
        first = hf.get("max_window_layers", num_layers)  # the layers from this one on slide
        return [SLIDING_ATTENTION if i >= first else FULL_ATTENTION for i in range(num_layers)]

    def window_to_hf(self, config: ModelConfig) -> dict:
        return {**super().window_to_hf(config), "use_sliding_window": config.sliding_window is not None,
                "max_window_layers": config.num_layers}


class Qwen3(Qwen2):
    model_type, architecture = "qwen3", "Qwen3ForCausalLM"
    switches = {"qk_norm": True}
    attention_bias_option = True


class Gemma(Family):
    model_type, architecture = "gemma", "GemmaForCausalLM"
    switches = {"norm_unit_offset": True, "scale_embeddings": True}
    mlp_activation = "gelu_tanh"
    tie_word_embeddings = True
    has_sliding_window = False


class Gemma2(Gemma):
    model_type, architecture = "gemma2", "Gemma2ForCausalLM"
    switches = {**Gemma.switches, "sandwich_norms": True}
    activation_key = "hidden_activation"
    has_sliding_window = True
    has_layer_types = True

    def default_layer_types(self, hf: dict, num_layers: int) -> list[str]:
        return self.every_nth_layer_full(num_layers, 2)

    @staticmethod
    def every_nth_layer_full(num_layers: int, n: int) -> list[str]:
        return [SLIDING_ATTENTION if (i + 1) % n else FULL_ATTENTION for i in range(num_layers)]

    def extra_from_hf(self, hf: dict) -> dict:
        return dict(attn_logit_softcap=hf.get("attn_logit_softcapping"),
                    final_logit_softcap=hf.get("final_logit_softcapping"),
                    query_pre_attn_scalar=hf.get("query_pre_attn_scalar", 256))  # an int in transformers

    def extra_to_hf(self, config: ModelConfig) -> dict:
        scalar = config.query_pre_attn_scalar
        return {"attn_logit_softcapping": config.attn_logit_softcap,
                "final_logit_softcapping": config.final_logit_softcap,
                "query_pre_attn_scalar": int(scalar) if scalar is not None and float(scalar).is_integer() else scalar}


class Gemma3(Gemma2):
    model_type, architecture = "gemma3_text", "Gemma3ForCausalLM"
    switches = {**Gemma2.switches, "qk_norm": True}
    rope_theta = 1_000_000.0

    def default_layer_types(self, hf: dict, num_layers: int) -> list[str]:
        return self.every_nth_layer_full(num_layers, hf.get("sliding_window_pattern", 6))

    def rope_from_hf(self, hf: dict, where: str) -> dict:
        """One RoPE for full-attention layers and one for sliding ones (configs written by transformers 4
        give the sliding one's theta as rope_local_base_freq)."""
        rope = hf.get("rope_parameters")
        if rope is None or not (FULL_ATTENTION in rope or SLIDING_ATTENTION in rope):
            sliding_theta = float(hf.get("rope_local_base_freq", DEFAULT_SLIDING_ROPE_THETA))
            return {**super().rope_from_hf(hf, where), "sliding_rope_theta": sliding_theta}
        theta, scaling = _split_rope(rope.get(FULL_ATTENTION), self.rope_theta, where)
        sliding_theta, sliding_scaling = _split_rope(rope.get(SLIDING_ATTENTION), DEFAULT_SLIDING_ROPE_THETA, where)
        return dict(rope_theta=theta, rope_scaling=scaling, sliding_rope_theta=sliding_theta,
                    sliding_rope_scaling=sliding_scaling)

    def rope_to_hf(self, config: ModelConfig) -> dict:
        full = _join_rope(config.rope_theta, config.rope_scaling)
        sliding = full if config.sliding_rope_theta is None else _join_rope(config.sliding_rope_theta,
                                                                             config.sliding_rope_scaling)
        return {"rope_parameters": {FULL_ATTENTION: full, SLIDING_ATTENTION: sliding}}


FAMILIES: dict[str, Family] = {cls.model_type: cls() for cls in (Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma2, Gemma3)}


def family(model_type, where: str) -> Family:
    if model_type not in FAMILIES:
        raise ValueError(f"{where}: model_type {model_type!r} is not supported; supported model types: "
                         f"{', '.join(FAMILIES)}")
    return FAMILIES[model_type]


def config_from_hf(hf: dict) -> ModelConfig:
    return family(hf.get("model_type"), "config.json").from_hf(hf)


def config_to_hf(config: ModelConfig, dtype: str = "float32") -> dict:
    return family(config.model_type, "ModelConfig").to_hf(config, dtype)


# ---- safetensors key names: the same in every family, set by the config's switches ------------------------

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
        keys.update(o_bias=p + "self_attn.o_proj.bias")
    if config.qk_norm:
        keys.update(q_norm=p + "self_attn.q_norm.weight", k_norm=p + "self_attn.k_norm.weight")
    return keys
