"""LoRA: adapters only train, the reference is the base, PEFT and merged exports match JAX;
adapter dropout as PEFT does it, only in the policy's training forward, with keys from (seed, step, micro)."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from jaxdpo.config import ConfigError
from jaxdpo.models import Decoder, ModelConfig, from_pretrained
from jaxdpo.models.lora import LoRAParam, LoRASettings, lora_settings, merge_adapters
from jaxdpo.training import build
from jaxdpo.training.loop import train_and_evaluate
from jaxdpo.training.metrics import read_metrics
from jaxdpo.training.optim import make_optimizer
from jaxdpo.training.step import init_state
from tests.helpers import LORA, TINY, lora_ids, series, train_batch
from tests.tiny_assets import tiny_run_config

IDS = lora_ids()


@pytest.fixture(scope="module")
def lora_run(assets, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("lora_run")
    trainer = train_and_evaluate(tiny_run_config(assets, str(workdir), **LORA, **{"train.eval_every": 3}),
                                 devices=jax.devices()[:1])
    return trainer, read_metrics(str(workdir)), workdir


def base_params(path):
    _, params, _ = nnx.split(from_pretrained(path), nnx.Param, ...)
    return params


def test_step0_is_ln2_and_only_adapters_train(assets, lora_run):
    trainer, records, _ = lora_run
    assert trainer.reference.mode == "lora_base"  # the default reference under LoRA
    assert trainer.reference.params is None  # no copy of anything
    assert series(records, "train/loss")[0] == pytest.approx(math.log(2), abs=1e-6)
    assert series(records, "eval/loss")[0] == pytest.approx(math.log(2), abs=1e-6)
    assert series(records, "train/loss")[-1] < math.log(2)

    # what trains (and is checkpointed, with its optimizer state) is the adapters and nothing else
    trained = nnx.to_flat_state(trainer.state["params"])
    names = {path[-1] for path, _ in trained}
    assert names == {f"{t}_lora_{ab}" for t in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                 "up_proj", "down_proj") for ab in "ab"}
    for path, var in trained:
        if path[-1].endswith("_lora_b"):  # B started at zero and moved
            assert float(jnp.abs(var[...]).max()) > 1e-5, path

    # the base weights are bit-identical to the checkpoint on disk
    base = nnx.to_flat_state(base_params(assets["model"]))
    frozen = dict(nnx.to_flat_state(trainer.policy.frozen))
    assert len(base) == 12  # embed, final_norm, lm_head + 9 stacked layer weights
    for path, var in base:
        np.testing.assert_array_equal(np.asarray(frozen[path][...]), np.asarray(var[...]), err_msg=str(path))


def test_lora_base_reference_is_the_base_model_after_training(assets, lora_run):
    trainer, _, _ = lora_run
    batch = jax.tree.map(lambda x: x[0], train_batch(trainer, 0))
    ref = trainer.reference.logprobs(trainer.policy.graphdef, trainer.state["params"], trainer.policy.frozen,
                                     None, batch, num_pairs=trainer.config.train.micro_batch_size,
                                     chunk_size=trainer.config.model.logprob_chunk)
    ref_c, ref_r = ref["rc"], ref["rr"]
    from jaxdpo.training.step import pair_logprobs
    base = from_pretrained(assets["model"])
    graphdef, state = nnx.split(base)
    expected = pair_logprobs(graphdef, (state,), batch, num_pairs=trainer.config.train.micro_batch_size,
                             chunk_size=trainer.config.model.logprob_chunk)
    np.testing.assert_allclose(np.asarray(ref_c), np.asarray(expected["pc"]), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(ref_r), np.asarray(expected["pr"]), atol=1e-5, rtol=0)
    policy = pair_logprobs(trainer.policy.graphdef, (trainer.state["params"], trainer.policy.frozen), batch,
                           num_pairs=trainer.config.train.micro_batch_size, chunk_size=trainer.config.model.logprob_chunk)
    assert float(jnp.abs(policy["pc"] - expected["pc"]).max()) > 1e-3  # the adapters do change the policy


def test_peft_and_merged_exports_match_jax(assets, lora_run):
    import json

    import torch
    from peft import PeftModel
    from safetensors.numpy import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    trainer, _, workdir = lora_run
    adapter_dir, merged_dir = workdir / "hf_adapter", workdir / "hf"
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert (config["peft_type"], config["task_type"], config["r"], config["lora_alpha"]) == ("LORA", "CAUSAL_LM", 4, 8.0)
    a = load_file(str(adapter_dir / "adapter_model.safetensors"))
    assert a["base_model.model.model.layers.1.self_attn.o_proj.lora_A.weight"].shape == (4, 32)  # [r, n*h]
    assert a["base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"].shape == (16, 4)  # [k*h, r]
    assert len(a) == 2 * 7 * 2

    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    ids = np.asarray([tokenizer("What color is the owl? The owl is gold.")["input_ids"]], np.int32)
    model = nnx.merge(trainer.policy.graphdef, trainer.state["params"], trainer.policy.frozen)
    got = np.asarray(model(ids))
    torch_ids = torch.from_numpy(ids).long()

    base = AutoModelForCausalLM.from_pretrained(assets["model"], dtype=torch.float32).eval()
    with torch.no_grad():
        base_logits = base(torch_ids).logits.numpy()
    peft_model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    with torch.no_grad():
        peft_logits = peft_model(torch_ids).logits.numpy()
    assert np.abs(got - base_logits).max() > 1e-3  # the adapter matters, so the match below means something
    np.testing.assert_allclose(got, peft_logits, atol=1e-4, rtol=0)

    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        merged_logits = merged(torch_ids).logits.numpy()
    np.testing.assert_allclose(merged_logits, got, atol=1e-4, rtol=0)
    # and our merged weights are PEFT's own merge of the exported adapter
    peft_merged = peft_model.merge_and_unload().state_dict()
    ours = merged.state_dict()
    for name in ("model.layers.0.self_attn.o_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        np.testing.assert_allclose(ours[name].numpy(), peft_merged[name].numpy(), atol=1e-6, rtol=0)


QWEN2_LIKE = dataclasses.replace(TINY, model_type="qwen2", qkv_bias=True)
GEMMA2_LIKE = dataclasses.replace(
    TINY, model_type="gemma2", norm_unit_offset=True, scale_embeddings=True, mlp_activation="gelu_tanh",
    sandwich_norms=True, attn_logit_softcap=2.0, final_logit_softcap=5.0, query_pre_attn_scalar=16,
    sliding_window=3, layer_types=("sliding_attention", "full_attention"), tie_word_embeddings=True)


@pytest.mark.parametrize("config", [TINY, QWEN2_LIKE, GEMMA2_LIKE], ids=["llama", "qwen2", "gemma2"])
def test_fresh_adapter_is_identity_and_merge_equals_adapter_applied(config):
    model = Decoder(config, rngs=nnx.Rngs(0))
    base_logits = model(IDS)
    settings = LoRASettings(rank=3, alpha=6.0, targets=("q_proj", "v_proj", "o_proj", "up_proj", "down_proj"))
    model = Decoder(config, lora=settings, lora_seed=1, rngs=nnx.Rngs(0))  # the same base weights
    np.testing.assert_array_equal(np.asarray(model(IDS)), np.asarray(base_logits))  # B = 0

    graphdef, adapters, frozen = nnx.split(model, LoRAParam, ...)
    key = iter(jax.random.split(jax.random.key(2), 100))
    adapters = jax.tree.map(lambda x: 0.2 * jax.random.normal(next(key), x.shape), adapters)
    adapted = nnx.merge(graphdef, adapters, frozen)
    got = adapted(IDS)
    assert float(jnp.abs(got - base_logits).max()) > 1e-2
    merged = merge_adapters(adapted, settings)
    assert not any(name.endswith(("_lora_a", "_lora_b")) for name in merged.layers.names)
    np.testing.assert_allclose(np.asarray(merged(IDS)), np.asarray(got), atol=2e-5, rtol=0)
    # explicit math for one projection: q = h W + (alpha / r) (h A) B
    a, b = adapted.layers.q_proj_lora_a[...][0], adapted.layers.q_proj_lora_b[...][0]
    w = adapted.layers.q_proj[...][0]
    expected = w + 2.0 * jnp.einsum("dr,rnh->dnh", a, b)
    np.testing.assert_allclose(np.asarray(merged.layers.q_proj[...][0]), np.asarray(expected), atol=1e-6)


def lora_cfg(**kw):
    c = ml_collections.ConfigDict({"rank": 8, "alpha": 16.0, "dropout": 0.0, "targets": "all-linear",
                                   "export_merged": False})
    c.update(kw)
    return c


def test_settings_and_config_errors(assets, tmp_path):
    assert lora_settings(lora_cfg(rank=0)) is None
    s = lora_settings(lora_cfg(targets="v_proj, q_proj"))
    assert s.targets == ("q_proj", "v_proj") and s.scale == 2.0
    assert len(lora_settings(lora_cfg()).targets) == 7
    assert lora_settings(lora_cfg(dropout=0.1)).dropout == 0.1 and lora_settings(lora_cfg()).dropout == 0.0
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ConfigError, match=r"lora.dropout .* must be a number in \[0, 1\)"):
            lora_settings(lora_cfg(dropout=bad))
    with pytest.raises(ConfigError, match="qkv_proj is not a projection"):
        lora_settings(lora_cfg(targets="q_proj,qkv_proj"))
    with pytest.raises(ConfigError, match="lora.rank"):
        lora_settings(lora_cfg(rank=-1))
    with pytest.raises(ConfigError, match="lora.alpha"):
        lora_settings(lora_cfg(alpha=0.0))
    config = tiny_run_config(assets, str(tmp_path), **{"reference.mode": "lora_base"})
    with pytest.raises(ConfigError, match="needs LoRA: set lora.rank"):
        build.check_config(config, build.make_mesh(config, jax.devices()[:1]))


def train_state_bytes(config: ModelConfig, settings: LoRASettings | None) -> int:
    """Bytes of what trains: params + AdamW state (shapes only, nothing allocated)."""
    def build():
        return Decoder(config, lora=settings, rngs=nnx.Rngs(0))

    model = nnx.eval_shape(build)
    _, params, _ = nnx.split(model, nnx.Param if settings is None else LoRAParam, ...)
    optim = ml_collections.ConfigDict({"lr": 1e-4, "warmup_steps": 1, "min_lr_ratio": 0.1, "b1": 0.9,
                                       "b2": 0.95, "eps": 1e-8, "weight_decay": 0.0, "grad_clip": 1.0})
    optimizer, _ = make_optimizer(optim, 10)
    state = jax.eval_shape(lambda p: init_state(p, optimizer), params)
    leaves = jax.tree.leaves(state["params"]) + jax.tree.leaves(state["opt_state"])
    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in leaves)


@pytest.mark.parametrize("config, max_ratio", [
    (TINY, 0.4),  # rank 8 is a quarter of hidden 32: little to save
    (dataclasses.replace(TINY, vocab_size=32000, hidden_size=256, intermediate_size=1024, num_layers=8,
                         num_heads=8, num_kv_heads=4, head_dim=32), 0.02)], ids=["tiny", "8x256"])
def test_memory_of_what_trains_full_vs_lora(config, max_ratio):
    settings = LoRASettings(rank=8, alpha=16.0, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                         "up_proj", "down_proj"))
    full, lora = train_state_bytes(config, None), train_state_bytes(config, settings)
    print(f"\n{config.num_layers}x{config.hidden_size}: params+optimizer state full {full / 2**20:.3f} MiB, "
          f"LoRA r=8 all-linear {lora / 2**20:.3f} MiB ({lora / full:.2%})")
    # adapters: per layer r * (in + out) per target; AdamW keeps two moments: 3 copies in all
    per_layer = sum(8 * (i + o) for i, o in [(32, 32), (32, 16), (32, 16), (32, 32), (32, 64), (32, 64), (64, 32)])
    if config is TINY:
        assert lora == 3 * 4 * config.num_layers * per_layer + 4 * 2  # + step and count scalars (int32)
    assert lora < max_ratio * full


def test_resume_from_an_adapter_checkpoint_continues_the_run(assets, lora_run, tmp_path, capsys):
    """The checkpoint (adapters + their optimizer state + step) is all a resumed LoRA run needs."""
    import shutil

    trainer, records, _ = lora_run
    config = tiny_run_config(assets, str(tmp_path), **LORA, **{"train.eval_every": 3, "train.save_every": 2})
    train_and_evaluate(config, devices=jax.devices()[:1])
    shutil.rmtree(tmp_path / "checkpoints" / "3")  # as if the run had stopped after step 2
    capsys.readouterr()
    resumed = train_and_evaluate(tiny_run_config(assets, str(tmp_path), **LORA, **{"train.eval_every": 3,
                                                                                   "train.save_every": 2}),
                                 devices=jax.devices()[:1])
    assert "resumed    from checkpoint step 2" in capsys.readouterr().out
    np.testing.assert_allclose(series(read_metrics(str(tmp_path)), "train/loss"), series(records, "train/loss"),
                               atol=1e-6)
    for a, b in zip(jax.tree.leaves(resumed.state["params"]), jax.tree.leaves(trainer.state["params"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_lora_on_eight_fsdp_devices_matches_one(assets, lora_run, tmp_path):
    _, records, _ = lora_run
    overrides = {**LORA, "train.eval_every": 3, "mesh.fsdp": 8, "lora.export_merged": False}
    trainer = train_and_evaluate(tiny_run_config(assets, str(tmp_path), **overrides))
    eight = read_metrics(str(tmp_path))
    np.testing.assert_allclose(series(eight, "train/loss"), series(records, "train/loss"), atol=1e-5)
    np.testing.assert_allclose(series(eight, "eval/loss"), series(records, "eval/loss"), atol=1e-5)
    assert (tmp_path / "hf_adapter" / "adapter_model.safetensors").exists()
    assert not (tmp_path / "hf").exists()  # the merged model only on request
