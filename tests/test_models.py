"""Parity of jaxdpo's decoder with transformers' PyTorch models, and HF checkpoint import/export.

Each case builds a tiny random model with transformers (fp32, CPU), with weights and norm scales
perturbed so that every term matters, saves it, and checks our logits and transformers' agree.
"""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from jaxdpo.models import (
    Decoder,
    ModelConfig,
    families,
    from_pretrained,
    load_config,
    save_pretrained,
)
from jaxdpo.models.hf_io import INDEX_FILE, ModelFileError, _SafetensorsReader
from jaxdpo.ops.attention import make_attention_mask
from jaxdpo.parallel.sharding import make_mesh
from tests.hf_models import CASES, LENGTHS, build_hf_model


@pytest.fixture(scope="module")
def hf_checkpoints(tmp_path_factory):
    """case -> (torch model, dir it was saved to), built once per case."""
    cache = {}

    def get(case):
        if case not in cache:
            model = build_hf_model(case)
            path = str(tmp_path_factory.mktemp(case))
            model.save_pretrained(path)
            cache[case] = (model, path)
        return cache[case]

    return get


def padded_batch(vocab: int, seed: int = 1):
    rng = np.random.default_rng(seed)
    t = max(LENGTHS)
    ids = rng.integers(0, vocab, (len(LENGTHS), t)).astype(np.int32)
    mask = (np.arange(t)[None, :] < np.asarray(LENGTHS)[:, None]).astype(np.int32)
    return ids * mask, mask


def torch_logits(model, ids, mask) -> np.ndarray:
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask))
    return out.logits.float().numpy()


def jax_logits(model: Decoder, ids, mask) -> np.ndarray:
    return np.asarray(model(jnp.asarray(ids), segment_ids=jnp.asarray(mask)))


def max_diff_on_tokens(a, b, mask) -> float:
    return float(np.abs(a - b)[mask.astype(bool)].max())


@pytest.mark.parametrize("case", list(CASES))
def test_import_matches_transformers(case, hf_checkpoints):
    hf_model, path = hf_checkpoints(case)
    model = from_pretrained(path)
    ids, mask = padded_batch(model.config.vocab_size)
    expected, got = torch_logits(hf_model, ids, mask), jax_logits(model, ids, mask)
    assert np.abs(expected).max() > 1.0  # the comparison is not between near-zero logits
    diff = max_diff_on_tokens(expected, got, mask)
    print(f"{case}: max |logit diff| on real tokens = {diff:.2e}")
    assert diff < 1e-4


@pytest.mark.parametrize("case", list(CASES))
def test_export_reloads_in_transformers_bit_for_bit(case, hf_checkpoints, tmp_path):
    hf_model, path = hf_checkpoints(case)
    model = from_pretrained(path)
    save_pretrained(model, str(tmp_path))
    config = json.load(open(tmp_path / "config.json"))
    assert "rope_parameters" in config and config["dtype"] == "float32"
    assert os.path.exists(tmp_path / "generation_config.json")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    assert type(reloaded) is type(hf_model)
    original, ours = hf_model.state_dict(), reloaded.state_dict()
    assert original.keys() == ours.keys()
    for name in original:
        assert torch.equal(original[name], ours[name]), name
    ids, mask = padded_batch(model.config.vocab_size)
    assert max_diff_on_tokens(torch_logits(hf_model, ids, mask), torch_logits(reloaded, ids, mask), mask) == 0.0


def test_sharded_export_and_sharded_import_on_mesh(hf_checkpoints, tmp_path):
    hf_model, path = hf_checkpoints("llama")
    model = from_pretrained(path)
    save_pretrained(model, str(tmp_path), max_shard_bytes=40_000)
    index = json.load(open(tmp_path / INDEX_FILE))
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert not os.path.exists(tmp_path / "model.safetensors")

    mesh = make_mesh(data=1, fsdp=4, tensor=2)
    sharded = from_pretrained(str(tmp_path), mesh=mesh)
    q_proj = sharded.layers.q_proj[...]
    assert q_proj.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    assert sharded.embed[...].sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    specs = nnx.get_named_sharding(nnx.state(sharded), mesh)
    assert specs["layers"]["gate_proj"].spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    ids, mask = padded_batch(model.config.vocab_size)
    with jax.set_mesh(mesh):
        got = np.asarray(jax.jit(lambda m, i, s: m(i, segment_ids=s))(sharded, ids, mask))
    assert max_diff_on_tokens(torch_logits(hf_model, ids, mask), got, mask) < 1e-4
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    for name, value in hf_model.state_dict().items():
        assert torch.equal(value, reloaded.state_dict()[name]), name
    # export straight from the sharded params gives the same bytes
    save_pretrained(sharded, str(tmp_path / "from_mesh"))
    assert _same_tensors(path, str(tmp_path / "from_mesh"))


def _same_tensors(dir_a: str, dir_b: str) -> bool:
    a, b = _SafetensorsReader(dir_a), _SafetensorsReader(dir_b)
    assert a.entries.keys() == b.entries.keys()
    for name, (_, info, _) in a.entries.items():
        np.testing.assert_array_equal(a.get(name, info["shape"]), b.get(name, info["shape"]), err_msg=name)
    return True


def test_bf16_on_disk_is_cast_on_load(tmp_path):
    hf_model = build_hf_model("llama").to(torch.bfloat16)
    hf_model.save_pretrained(str(tmp_path))
    model = from_pretrained(str(tmp_path), dtype=jnp.float32)
    assert model.layers.q_proj[...].dtype == jnp.float32
    expected = hf_model.model.layers[1].self_attn.q_proj.weight.detach().float().numpy()  # [N*H, D]
    np.testing.assert_array_equal(np.asarray(model.layers.q_proj[1]).reshape(32, 32).T, expected)
    bf16 = from_pretrained(str(tmp_path), dtype=jnp.bfloat16)
    save_pretrained(bf16, str(tmp_path / "out"))
    assert json.load(open(tmp_path / "out" / "config.json"))["dtype"] == "bfloat16"
    reader = _SafetensorsReader(str(tmp_path / "out"))
    on_disk = reader.get("model.layers.1.self_attn.q_proj.weight", (32, 32))
    assert on_disk.dtype.name == "bfloat16"
    np.testing.assert_array_equal(np.asarray(on_disk, np.float32), expected)


def test_prefix_shared_row_equals_separate_rows():
    """prompt[:-1] | prompt[-1]+chosen | prompt[-1]+rejected in one row gives the separate rows' logits."""
    config = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=8)
    model = Decoder(config, rngs=nnx.Rngs(3))
    prompt, chosen, rejected = [5, 9, 2, 7], [11, 3, 8], [4, 6]
    t = 12
    shared = prompt[:-1] + [prompt[-1]] + chosen + [prompt[-1]] + rejected
    n_pre, n_ch = len(prompt) - 1, 1 + len(chosen)
    branch = [0] * n_pre + [1] * n_ch + [2] * (1 + len(rejected))
    start = len(prompt) - 1
    positions = list(range(n_pre)) + list(range(start, start + n_ch)) + list(range(start, start + 1 + len(rejected)))
    pad = t - len(shared)
    row = lambda xs: jnp.asarray([xs + [0] * pad], jnp.int32)
    shared_logits = model(row(shared), positions=row(positions), segment_ids=row([1] * len(shared)),
                          branch_ids=row(branch))[0]

    def separate(completion):
        seq = prompt + completion
        return model(jnp.asarray([seq], jnp.int32))[0]

    chosen_logits, rejected_logits = separate(chosen), separate(rejected)
    # the logits that predict each completion token (and the one after the last)
    np.testing.assert_allclose(shared_logits[n_pre:n_pre + n_ch], chosen_logits[start:], atol=1e-5)
    np.testing.assert_allclose(shared_logits[n_pre + n_ch:len(shared)], rejected_logits[start:], atol=1e-5)
    # and the shared prompt part matches the prompt positions of either row
    np.testing.assert_allclose(shared_logits[:n_pre], chosen_logits[:n_pre], atol=1e-5)


def test_attention_mask_rule():
    seg = jnp.asarray([[1, 1, 1, 1, 2, 2, 0]])
    br = jnp.asarray([[0, 1, 2, 2, 0, 0, 0]])
    pos = jnp.asarray([[0, 1, 1, 2, 0, 1, 0]])
    mask = np.asarray(make_attention_mask(seg, br, pos))[0, 0].astype(int)
    expected = np.array([
        [1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [1, 0, 1, 0, 0, 0, 0],  # rejected does not see chosen
        [1, 0, 1, 1, 0, 0, 0],
        [0, 0, 0, 0, 1, 0, 0],  # a new segment sees only itself
        [0, 0, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 0, 0],  # padding sees nothing
    ])
    np.testing.assert_array_equal(mask, expected)
    windowed = np.asarray(make_attention_mask(seg, br, pos, sliding_window=2))[0, 0].astype(int)
    assert windowed[3, 0] == 0 and windowed[3, 2] == 1  # position distance 2 is outside a window of 2


def test_config_round_trip_and_errors(hf_checkpoints, tmp_path):
    _, path = hf_checkpoints("llama3_rope")
    config = load_config(path)
    assert config.rope_scaling["rope_type"] == "llama3" and config.rope_theta == 10000.0
    assert families.config_from_hf(families.config_to_hf(config)) == config
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported.*llama"):
        families.config_from_hf({"model_type": "gpt2"})


BARE = {"vocab_size": 8, "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 2, "num_attention_heads": 1}


def test_families_read_only_what_their_transformers_model_reads():
    llama = families.config_from_hf({"model_type": "llama", **BARE, "sliding_window": 4})
    assert llama.sliding_window is None  # LlamaAttention has no window
    mistral = families.config_from_hf({"model_type": "mistral", **BARE, "sliding_window": 4,
                                       "layer_types": ["full_attention", "full_attention"]})
    assert mistral.layer_is_sliding == (True, True)  # MistralModel slides every layer, whatever layer_types say
    assert families.config_from_hf({"model_type": "gemma", **BARE}).mlp_activation == "gelu_tanh"
    assert families.config_from_hf({"model_type": "qwen2", **BARE, "sliding_window": 4}).sliding_window is None
    gemma3 = families.config_from_hf({"model_type": "gemma3_text", **BARE, "rope_local_base_freq": 50.0})
    assert (gemma3.rope_theta, gemma3.sliding_rope_theta) == (1_000_000.0, 50.0)


def test_config_to_hf_refuses_what_the_family_cannot_say():
    qwen2 = families.config_from_hf({"model_type": "qwen2", **BARE})
    llama = families.config_from_hf({"model_type": "llama", **BARE})
    with pytest.raises(ValueError, match="qwen2 has no attention_bias option"):
        families.config_to_hf(dataclasses.replace(qwen2, qkv_bias=False))
    with pytest.raises(ValueError, match="llama has no sliding window"):
        families.config_to_hf(dataclasses.replace(llama, sliding_window=4))
    with pytest.raises(ValueError, match="llama has one RoPE for every layer"):
        families.config_to_hf(dataclasses.replace(llama, sliding_rope_theta=50.0))
    with pytest.raises(ValueError, match="^ModelConfig: model_type 'gpt2' is not supported; .*gemma3_text$"):
        families.config_to_hf(dataclasses.replace(llama, model_type="gpt2"))


def test_dtype_names_come_from_one_table():
    from jaxdpo import config as config_lib
    from jaxdpo import sample
    from jaxdpo.models.config import DTYPES

    assert set(config_lib.CHOICES["model.dtype"]) == set(config_lib.CHOICES["model.param_dtype"]) == set(DTYPES)
    assert set(sample.DTYPE_CHOICES) <= set(DTYPES)


def test_checkpoint_errors_name_the_tensor(hf_checkpoints, tmp_path):
    from safetensors.torch import load_file, save_file

    _, path = hf_checkpoints("llama")
    tensors = load_file(os.path.join(path, "model.safetensors"))
    for f in ("config.json",):
        (tmp_path / f).write_text(open(os.path.join(path, f)).read())

    missing = dict(tensors)
    del missing["model.layers.1.mlp.up_proj.weight"]
    save_file(missing, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelFileError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*model\.safetensors"):
        from_pretrained(str(tmp_path))

    wrong = dict(tensors)
    wrong["model.norm.weight"] = torch.ones(31)
    save_file(wrong, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor 'model\.norm\.weight' has shape \(31,\)"):
        from_pretrained(str(tmp_path))

    extra = dict(tensors)
    extra["model.layers.0.mlp.extra.weight"] = torch.ones(3)
    save_file(extra, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.extra\.weight"):
        from_pretrained(str(tmp_path))

    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(ModelFileError, match="no model.safetensors"):
        from_pretrained(str(tmp_path))


@pytest.mark.parametrize("case", ["llama", "qwen2", "gemma2", "gemma3_text"])
def test_sequence_logprobs_match_transformers(case, hf_checkpoints):
    """Chunked logprobs from hidden_states + lm_head_weight (the training path) sum like transformers'."""
    from jaxdpo.ops.logprobs import token_logprobs

    hf_model, path = hf_checkpoints(case)
    model = from_pretrained(path)
    ids, mask = padded_batch(model.config.vocab_size, seed=7)
    targets = np.concatenate([ids[:, 1:], np.zeros_like(ids[:, :1])], axis=1)
    # completion = tokens after a 3-token prompt, up to each row's length
    counted = (np.arange(ids.shape[1])[None, :] >= 2) & (np.roll(mask, -1, axis=1) == 1)
    counted[:, -1] = False
    hidden = model.hidden_states(jnp.asarray(ids), segment_ids=jnp.asarray(mask))
    ours = token_logprobs(hidden, model.lm_head_weight(), jnp.asarray(targets), chunk_size=5,
                          logit_softcap=model.config.final_logit_softcap)
    ours = (np.asarray(ours) * counted).sum(axis=1)
    hf_logprobs = torch.log_softmax(torch.tensor(torch_logits(hf_model, ids, mask)), dim=-1).numpy()
    theirs = (np.take_along_axis(hf_logprobs, targets[..., None], axis=-1)[..., 0] * counted).sum(axis=1)
    print(f"{case}: sequence logprobs ours={ours} transformers={theirs}")
    np.testing.assert_allclose(ours, theirs, atol=1e-4)


@pytest.mark.parametrize("case", list(CASES))
def test_config_round_trips_through_transformers(case, hf_checkpoints):
    _, path = hf_checkpoints(case)
    config = load_config(path)
    assert families.config_from_hf(families.config_to_hf(config)) == config
    # transformers parses our config.json into the same architecture numbers
    hf_config = transformers.AutoConfig.for_model(**families.config_to_hf(config))
    assert families.config_from_hf(hf_config.to_dict()) == config


def test_import_inside_set_mesh_and_export_with_tokenizer_in_bf16(hf_checkpoints, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    hf_model, path = hf_checkpoints("qwen2")
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    with jax.set_mesh(mesh):  # the active mesh is picked up without passing it
        model = from_pretrained(path)
    assert model.layers.k_proj[...].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    bpe.train_from_iterator(["a tiny corpus for a tiny tokenizer"] * 4,
                            trainers.BpeTrainer(vocab_size=60, special_tokens=["<unk>", "<eos>"]))
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>", unk_token="<unk>")
    save_pretrained(model, str(tmp_path), tokenizer=tokenizer, dtype=jnp.bfloat16)
    assert json.load(open(tmp_path / "config.json"))["dtype"] == "bfloat16"
    reloaded_tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert reloaded_tokenizer("a tiny corpus").input_ids == tokenizer("a tiny corpus").input_ids
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.bfloat16)
    original = hf_model.state_dict()
    for name, value in reloaded.state_dict().items():
        assert value.dtype == torch.bfloat16
        assert torch.equal(value, original[name].to(torch.bfloat16)), name


# ---- damaged model files and interrupted exports ---------------------------------------

def test_config_json_missing_a_key_names_the_file_and_key(hf_checkpoints, tmp_path):
    from jaxdpo.config import ConfigError

    _, path = hf_checkpoints("llama")
    config = json.load(open(os.path.join(path, "config.json")))
    del config["num_attention_heads"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"config\.json.*'num_attention_heads'") as info:
        load_config(str(tmp_path))
    assert "\n" not in str(info.value) and str(tmp_path) in str(info.value)
    (tmp_path / "config.json").write_text('{"model_type": "llama", ')
    with pytest.raises(ConfigError, match=r"config\.json"):
        load_config(str(tmp_path))


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_damaged_safetensors_names_the_file(hf_checkpoints, tmp_path, damage):
    from jaxdpo.config import ConfigError

    _, path = hf_checkpoints("llama")
    (tmp_path / "config.json").write_text(open(os.path.join(path, "config.json")).read())
    data = open(os.path.join(path, "model.safetensors"), "rb").read()
    data = {"garbage": np.random.default_rng(0).bytes(4096), "truncated": data[:len(data) // 2],
            "empty": b""}[damage]
    (tmp_path / "model.safetensors").write_bytes(data)
    with pytest.raises(ConfigError, match=r"model\.safetensors") as info:
        from_pretrained(str(tmp_path))
    assert "\n" not in str(info.value)


def test_a_failed_export_leaves_the_previous_one_whole(hf_checkpoints, tmp_path, monkeypatch):
    from jaxdpo.models import hf_io

    _, path = hf_checkpoints("llama")
    model = from_pretrained(path)
    out = tmp_path / "hf"
    save_pretrained(model, str(out))
    before = (out / "model.safetensors").read_bytes()
    calls = []

    def failing(name, ours):  # the disk fills up half way through the weights
        calls.append(name)
        if len(calls) > 3:
            raise OSError(28, "No space left on device")
        return original(name, ours)

    original = hf_io._to_hf
    monkeypatch.setattr(hf_io, "_to_hf", failing)
    with pytest.raises(OSError):
        save_pretrained(model, str(out))
    assert (out / "model.safetensors").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["hf"]  # no partial directory left behind
    monkeypatch.setattr(hf_io, "_to_hf", original)
    save_pretrained(model, str(out))  # and exporting again over it works
    assert load_config(str(out)) == model.config


def test_a_failed_adapter_export_leaves_no_partial_file(tmp_path, monkeypatch):
    from jaxdpo.models import lora

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(lora, "peft_tensors", lambda model, settings: {"x": np.ones(3, np.float32)})
    monkeypatch.setattr(lora.json, "dump", fail)  # the config write fails after the weights were written
    settings = lora.LoRASettings(rank=2, alpha=4.0, dropout=0.0, targets=("q_proj",))
    with pytest.raises(OSError):
        lora.save_adapter(None, settings, str(tmp_path / "adapter"), base_model="base")
    assert os.listdir(tmp_path) == []
