"""QLoRA: LoRA over a frozen base stored as int8 or NF4 (jaxdpo/models/quantize.py).

NF4 codes and scales equal bitsandbytes'; the NF4 table is the QLoRA paper's definition; per-device bytes of
the quantized projections on SmolLM2- and Qwen2.5-0.5B-shaped models; logits of a quantized tiny model vs fp32;
a LoRA+nf4 run killed after a save resumes bit-identically, samples, and its merged export loads in
transformers; bad input is one line."""

import os
import re
import statistics
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxdpo.config import ConfigError
from jaxdpo.models import Decoder, ModelConfig
from jaxdpo.models import quantize as q
from jaxdpo.models.lora import LoRAParam, LoRASettings, quantize_base
from jaxdpo.parallel.sharding import make_mesh
from jaxdpo.training.loop import train_and_evaluate
from tests.helpers import assert_bit_equal
from tests.processes import jax_env
from tests.tiny_assets import tiny_run_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# head_dim 64 and sizes that are multiples of the block: the smallest model NF4 blocks fit
TINY64 = ModelConfig(vocab_size=96, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=2,
                     num_kv_heads=1, head_dim=64)
SMOLLM2_135M = ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                           num_kv_heads=3, head_dim=64, tie_word_embeddings=True)
QWEN25_05B = ModelConfig(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14,
                         num_kv_heads=2, head_dim=64, qkv_bias=True, tie_word_embeddings=True)


# ----- the codec -------------------------------------------------------------------------------------------

def test_nf4_table_is_the_qlora_definition():
    """QLoRA (appendix E, bitsandbytes' create_normal_map(offset=0.9677083)): 8 positive quantiles of N(0,1)
    and 7 negative ones, plus an exact 0, normalized to [-1, 1]."""
    ppf, offset = statistics.NormalDist().inv_cdf, 0.9677083
    positive = [ppf(p) for p in np.linspace(offset, 0.5, 9)[:-1]]
    negative = [-ppf(p) for p in np.linspace(offset, 0.5, 8)[:-1]]
    values = np.sort(np.array(positive + [0.0] + negative))
    np.testing.assert_allclose(q.NF4_VALUES, values / values.max(), atol=2e-7, rtol=0)
    assert q.NF4_VALUES[7] == 0.0 and q.NF4_VALUES[0] == -1.0 and q.NF4_VALUES[15] == 1.0


def _weights(shape, seed=0):
    w = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    w[0, :q.BLOCK_SIZE] = 0.0  # an all-zero block
    w[1, 3] = 0.5 * (q.NF4_VALUES[9] + q.NF4_VALUES[10]) * np.abs(w[1, :q.BLOCK_SIZE]).max()  # near a tie
    return w


def test_nf4_codes_and_block_scales_follow_the_published_table():
    w = _weights((5, 256))
    codes, scales = q.quantize(w, q.NF4, -1)
    blocks = w.reshape(5, 4, 64)
    absmax = np.abs(blocks).max(-1)
    np.testing.assert_array_equal(np.asarray(scales), absmax)
    normed = blocks / np.where(absmax == 0, 1, absmax)[..., None]
    nearest = np.abs(normed[..., None] - q.NF4_VALUES).argmin(-1).reshape(5, 256).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(codes), (nearest[:, 0::2] << 4) | nearest[:, 1::2])
    expected = q.NF4_VALUES[nearest].reshape(5, 4, 64) * absmax[..., None]
    np.testing.assert_array_equal(np.asarray(q.dequantize(codes, scales, -1, jnp.float32)), expected.reshape(5, 256))


def test_nf4_codes_and_scales_equal_bitsandbytes():
    torch = pytest.importorskip("torch")
    functional = pytest.importorskip("bitsandbytes.functional")
    w = _weights((6, 512), seed=1)
    codes, scales = q.quantize(w, q.NF4, -1)
    packed, state = functional.quantize_4bit(torch.from_numpy(w), blocksize=q.BLOCK_SIZE, quant_type="nf4")
    np.testing.assert_array_equal(np.asarray(codes).reshape(-1), packed.numpy().reshape(-1))
    np.testing.assert_array_equal(np.asarray(scales).reshape(-1), state.absmax.numpy())
    np.testing.assert_array_equal(state.code.numpy()[:16], q.NF4_VALUES)
    np.testing.assert_array_equal(np.asarray(q.dequantize(codes, scales, -1, jnp.float32)),
                                  functional.dequantize_4bit(packed, state).numpy())


def test_int8_codes_blocks_along_the_contracted_dim():
    w = np.moveaxis(_weights((12, 256)).reshape(3, 4, 256), -1, 0)  # [in, out...]: blocks along axis 0
    codes, scales = q.quantize(w, q.INT8, 0)
    assert codes.dtype == jnp.int8 and codes.shape == w.shape and scales.shape == (4, 3, 4)
    absmax = np.abs(w.reshape(4, 64, 3, 4)).max(1)
    np.testing.assert_array_equal(np.asarray(scales), absmax)
    expected = np.round(127 * w.reshape(4, 64, 3, 4) / np.where(absmax == 0, 1, absmax)[:, None])
    np.testing.assert_array_equal(np.asarray(codes), expected.reshape(w.shape))
    error = np.abs(np.asarray(q.dequantize(codes, scales, 0, jnp.float32)) - w)
    assert (error <= np.repeat(absmax, 64, axis=0) / 254 + 1e-7).all()  # at most half a step


# ----- bytes per device ------------------------------------------------------------------------------------

def _projection_bytes(config, base_dtype, mesh):
    from tools.memory_report import base_bytes_per_device

    return base_bytes_per_device(config, mesh, base_dtypes=(base_dtype,), rank=16)[base_dtype]["projections"]


@pytest.mark.parametrize("config, mesh_shape", [(SMOLLM2_135M, (1, 1, 1)), (SMOLLM2_135M, (1, 3, 1)),
                                                (QWEN25_05B, (1, 1, 1)), (QWEN25_05B, (1, 2, 2))],
                         ids=["smollm2", "smollm2-fsdp3", "qwen2.5-0.5b", "qwen2.5-0.5b-fsdp2-tensor2"])
def test_quantized_projection_bytes_per_device(config, mesh_shape):
    data, fsdp, tensor = mesh_shape
    mesh = make_mesh(data, fsdp, tensor, jax.devices()[:data * fsdp * tensor])
    fp32 = _projection_bytes(config, "none", mesh)
    ratios = {name: _projection_bytes(config, name, mesh) / fp32 for name in ("int8", "nf4")}
    print(f"\n{config.hidden_size=} mesh {dict(mesh.shape)}: fp32 {fp32 / 2**20:.1f} MiB/device, "
          + ", ".join(f"{k} {v:.4f}x" for k, v in ratios.items()))
    assert ratios["int8"] == pytest.approx((1 + 4 / 64) / 4) and ratios["int8"] <= 0.27
    assert ratios["nf4"] == pytest.approx((0.5 + 4 / 64) / 4) and ratios["nf4"] <= 0.15


# ----- a quantized model ------------------------------------------------------------------------------------

def _adapted(config, base_dtype, mesh=None):
    """A random Decoder with nonzero adapters on every projection, its base stored as `base_dtype`."""
    settings = LoRASettings(rank=4, alpha=8.0, targets=ALL, base_dtype=base_dtype)
    model = Decoder(config, lora=settings, lora_seed=1, rngs=nnx.Rngs(0))
    for name in ALL:
        var = getattr(model.layers, f"{name}_lora_b")
        var[...] = 0.05 * jax.random.normal(jax.random.key(len(name)), var[...].shape)
    return quantize_base(model, settings, mesh)


def test_quantized_logits_against_fp32():
    ids = np.random.default_rng(0).integers(0, TINY64.vocab_size, (2, 24)).astype(np.int32)
    reference = np.asarray(_adapted(TINY64, "none")(ids), np.float64)
    p_ref = jax.nn.log_softmax(reference, -1)
    stats = {}
    for base_dtype in ("int8", "nf4"):
        model = _adapted(TINY64, base_dtype)
        assert not hasattr(model.layers, "q_proj") and model.layers.q_proj_codes[...].dtype == q.FORMATS[base_dtype].code_dtype
        logits = np.asarray(model(ids), np.float64)
        p = jax.nn.log_softmax(logits, -1)
        kl = float(np.mean(np.sum(np.exp(p_ref) * (p_ref - p), -1)))
        stats[base_dtype] = (float(np.abs(logits - reference).max()), kl)
    print("\nmax |logit diff|, mean KL vs fp32:", stats)
    # logits of this random model have std 0.23; measured: int8 0.0104 / 2.8e-6, nf4 0.119 / 6.0e-4
    assert stats["int8"][0] < 0.03 and stats["int8"][1] < 1e-5
    assert stats["nf4"][0] < 0.3 and stats["nf4"][1] < 2e-3
    assert stats["nf4"][0] > stats["int8"][0] > 0  # quantized, and 4 bits cost more than 8


def test_sharded_quantized_model_equals_one_device():
    ids = np.random.default_rng(1).integers(0, TINY64.vocab_size, (4, 16)).astype(np.int32)
    one = np.asarray(_adapted(TINY64, "nf4")(ids))
    mesh = make_mesh(1, 2, 1, jax.devices()[:2])
    with jax.set_mesh(mesh):
        model = _adapted(TINY64, "nf4", mesh)
        assert model.layers.gate_proj_codes[...].sharding.spec[1] == "fsdp"  # the weight's own rules
        assert model.layers.gate_proj_scales[...].sharding.spec[1] == "fsdp"
        sharded = np.asarray(model(ids))
    np.testing.assert_allclose(sharded, one, atol=1e-5, rtol=0)
    # what the report computes from shapes is what the device holds
    from tools.memory_report import base_bytes_per_device

    held = sum(getattr(model.layers, f"{t}_{part}")[...].addressable_shards[0].data.nbytes
               for t in ALL for part in ("codes", "scales"))
    assert held == base_bytes_per_device(TINY64, mesh, base_dtypes=("nf4",))["nf4"]["projections"]


def test_an_online_round_folds_its_adapters_into_a_quantized_base_stored_as_before():
    """The next round's base (online.policy.folded_base): the adapters folded into the dequantized base and
    quantized again, in the same codes and shapes, as close to the merged policy as the format allows."""
    from jaxdpo.models.lora import merge_adapters
    from jaxdpo.online.policy import folded_base

    ids = np.random.default_rng(2).integers(0, TINY64.vocab_size, (2, 24)).astype(np.int32)
    for base_dtype, bound in (("int8", 0.03), ("nf4", 0.3)):  # the bounds of test_quantized_logits_against_fp32
        model = _adapted(TINY64, base_dtype)
        merged = np.asarray(merge_adapters(model, LoRASettings(4, 8.0, ALL, base_dtype=base_dtype))(ids), np.float64)
        graphdef, adapters, base = nnx.split(model, LoRAParam, ...)
        folded = folded_base(base, adapters, LoRASettings(4, 8.0, ALL, base_dtype=base_dtype))
        assert jax.tree.map(lambda x: (x.shape, x.dtype), nnx.to_pure_dict(folded)) == \
            jax.tree.map(lambda x: (x.shape, x.dtype), nnx.to_pure_dict(base))
        changed = folded["layers"]["q_proj_codes"][...] != base["layers"]["q_proj_codes"][...]
        assert bool(jnp.any(changed))
        adapters_off = jax.tree.map(jnp.zeros_like, adapters)
        next_start = np.asarray(nnx.merge(graphdef, adapters_off, folded)(ids), np.float64)
        assert 0 < np.abs(next_start - merged).max() < bound


def test_merge_uses_the_dequantized_base():
    from jaxdpo.models.lora import merge_adapters

    ids = np.arange(12, dtype=np.int32)[None]
    model = _adapted(TINY64, "nf4")
    merged = merge_adapters(model, model.lora)
    np.testing.assert_allclose(np.asarray(merged(ids)), np.asarray(model(ids)), atol=2e-5, rtol=0)


# ----- bad input ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, message", [
    ({"lora.base_dtype": "nf4", "lora.rank": 4}, "quantization blocks of 64 along the contracted dim"),
    ({"lora.base_dtype": "int8", "lora.rank": 0}, "lora.base_dtype = int8 quantizes the frozen base of LoRA"),
    ({"lora.base_dtype": "fp8", "lora.rank": 4}, "lora.base_dtype"),
    ({"lora.base_dtype": "nf4", "lora.rank": 4, "reference.mode": "host"}, "reference.mode = host with lora.base_dtype"),
], ids=["blocks", "no-lora", "unknown", "host"])
def test_bad_quantization_config_is_one_line(assets, tmp_path, overrides, message):
    from jaxdpo.config import validate
    from jaxdpo.training import build

    config = tiny_run_config(assets, str(tmp_path), **overrides)  # hidden 32, head_dim 8: not blocks of 64
    with pytest.raises(ConfigError) as error:
        validate(config)
        build.check_config(config, build.make_mesh(config, jax.devices()[:1]))
    assert message in str(error.value) and "\n" not in str(error.value)


# ----- end to end: a LoRA+nf4 run killed after a save, resumed ------------------------------------------------

@pytest.fixture(scope="module")
def qlora_assets(assets, tmp_path_factory):
    """The session's data and tokenizer with a random Llama whose sizes fit NF4 blocks (head_dim 64)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("qlora_assets")
    tokenizer = AutoTokenizer.from_pretrained(assets["model"])
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(str(root / "model"), safe_serialization=True)
    tokenizer.save_pretrained(str(root / "model"))
    return {**assets, "model": str(root / "model")}


@pytest.mark.parametrize("base_dtype", ["int8", "nf4"])
def test_described_policy_is_the_loaded_one_as_shapes(qlora_assets, tmp_path, base_dtype):
    """build.describe_policy (what tools/bench.py --base-dtypes lowers the step with) has the structure,
    shapes, dtypes and shardings of the policy build_policy loads and quantizes, on fsdp 2 (its one KV head
    cannot split over tensor)."""
    from jaxdpo.training import build

    config = tiny_run_config(qlora_assets, str(tmp_path), **{**QLORA, "lora.base_dtype": base_dtype,
                                                            "mesh.fsdp": 2})
    mesh = build.make_mesh(config, jax.devices()[:2])
    loaded, described = build.build_policy(config, mesh, resuming=False), build.describe_policy(config, mesh)
    as_shape = lambda x: (x.shape, x.dtype, x.sharding.spec)  # noqa: E731
    for part in ("params", "frozen"):
        assert jax.tree.map(as_shape, nnx.to_pure_dict(getattr(described, part))) == \
            jax.tree.map(as_shape, nnx.to_pure_dict(getattr(loaded, part)))
    assert (described.num_params, described.num_trainable) == (loaded.num_params, loaded.num_trainable)


def test_cached_reference_is_the_quantized_base_under_its_own_key(qlora_assets, tmp_path):
    from jaxdpo.preference.reference import LoRABaseReference
    from jaxdpo.training.loop import train_and_evaluate
    from tests.helpers import train_batch

    def run(name, base_dtype):
        config = tiny_run_config(qlora_assets, str(tmp_path / name), **{
            **QLORA, "lora.base_dtype": base_dtype, "reference.mode": "cached", "train.steps": 1,
            "train.export_hf": False, "data.cache_dir": str(tmp_path / "cache")})
        return train_and_evaluate(config, devices=jax.devices()[:1])

    trainer = run("nf4", "nf4")
    assert trainer.reference.mode == "cached" and trainer.reference.cache.computed == ["train", "eval"]
    micro = jax.tree.map(lambda x: x[0], train_batch(trainer, 0))
    # the quantized base's logprobs: the trained policy with its adapters off
    base = LoRABaseReference().logprobs(trainer.policy.graphdef, trainer.state["params"], trainer.policy.frozen,
                                        None, micro, num_pairs=8, chunk_size=trainer.config.model.logprob_chunk)
    np.testing.assert_allclose(micro["ref_chosen"], np.asarray(base["rc"]), atol=1e-4, rtol=0)
    np.testing.assert_allclose(micro["ref_rejected"], np.asarray(base["rr"]), atol=1e-4, rtol=0)

    plain = run("none", "none")  # the same weights files and data, not quantized: another cache entry
    assert plain.reference.cache.computed == ["train", "eval"]
    assert len(os.listdir(tmp_path / "cache" / "reference")) == 4
    gap = np.abs(plain.reference.cache.arrays["train"][0] - trainer.reference.cache.arrays["train"][0]).max()
    assert 0 < gap < 1.0


QLORA = {"lora.rank": 4, "lora.alpha": 8.0, "lora.targets": "all-linear", "lora.base_dtype": "nf4",
         "lora.export_merged": True, "train.steps": 4, "train.save_every": 2, "train.keep_checkpoints": 2,
         "train.log_every": 2, "train.eval_every": 100, "train.sample_every": 0}


def _train(assets, workdir, *, kill_at=None, **extra):
    os.makedirs(workdir, exist_ok=True)
    config_file = str(workdir) + "_config.py"
    with open(config_file, "w") as f:
        f.write(textwrap.dedent(f"""
            import sys
            sys.path.insert(0, {REPO!r})
            from tests.tiny_assets import tiny_run_config

            def get_config():
                return tiny_run_config({assets!r}, {str(workdir)!r}, **{ {**QLORA, **extra}!r})
        """))
    fault = {} if kill_at is None else {"JAXDPO_FAULT": f"SIGKILL@checkpoints/{kill_at}"}
    env = dict(os.environ, **fault, **jax_env(devices=1))
    return subprocess.run([sys.executable, "-m", "jaxdpo.train", "--config=" + config_file], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=400)


def _final(workdir):
    from jaxdpo.checkpoint.manager import Checkpointer

    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=2, save_every=2)
    state, meta = ckpt.read(ckpt.latest_step())
    return jax.device_get(state["params"]), meta


def test_qlora_run_resumes_bit_identically_and_exports(qlora_assets, tmp_path):
    whole = _train(qlora_assets, tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert "nf4-dequantized base" in whole.stdout and "frozen base stored nf4" in whole.stdout
    killed = _train(qlora_assets, tmp_path / "killed", kill_at=2)
    assert killed.returncode < 0, killed.stderr[-3000:]
    resumed = _train(qlora_assets, tmp_path / "killed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    (params, meta), (resumed_params, _) = _final(tmp_path / "whole"), _final(tmp_path / "killed")
    assert_bit_equal(resumed_params, params)
    assert meta["fingerprint"]["lora.base_dtype"] == "nf4" and meta["lora"]["base_dtype"] == "nf4"
    assert {k.split("_lora_")[0] for k in params["layers"]} == set(ALL)  # adapters only, no codes
    assert all(k.endswith(("_lora_a", "_lora_b")) for k in params["layers"]) and set(params) == {"layers"}

    # a resume with another quantization is refused (a ConfigError: one line, exit 2 from the CLI)
    other = tiny_run_config(qlora_assets, str(tmp_path / "killed"),
                            **{**QLORA, "lora.base_dtype": "int8", "train.steps": 6})
    with pytest.raises(ConfigError, match=re.escape("lora.base_dtype: checkpoint='nf4' now='int8'")):
        train_and_evaluate(other, devices=jax.devices()[:1])

    _check_export_and_sampling(qlora_assets, tmp_path / "whole")


def _check_export_and_sampling(assets, workdir):
    import torch
    from transformers import AutoModelForCausalLM

    from jaxdpo.checkpoint.saved_policy import build_model, read_params
    from jaxdpo.sampling import generate as gen

    model, settings = build_model(*read_params(str(workdir / "checkpoints"), QLORA["train.steps"]))
    assert settings.base_dtype == "nf4" and model.layers.down_proj_codes[...].dtype == jnp.uint8
    ids = np.arange(3, 20, dtype=np.int32)[None]
    ours = np.asarray(model(ids))
    merged = AutoModelForCausalLM.from_pretrained(str(workdir / "hf"), dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = merged(torch.from_numpy(ids).long()).logits.numpy()
    print("\nmerged export vs the quantized policy, max |logit diff|:", float(np.abs(theirs - ours).max()))
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)

    graphdef, adapters, frozen = nnx.split(model, LoRAParam, ...)
    greedy = gen.SamplingSettings(max_new_tokens=6)
    got = gen.generate(graphdef, (adapters, frozen), [[3, 4, 5], [6, 7]], greedy, eos_ids=[-1], pad_id=0)
    assert [len(c.ids) for c in got] == [6, 6]
    for prompt, completion in zip([[3, 4, 5], [6, 7]], got):  # greedy = the argmax of the scoring forward
        tokens = list(prompt)
        for token in completion.ids:
            assert token == int(np.argmax(np.asarray(model(np.asarray([tokens], np.int32)))[0, -1]))
            tokens.append(token)


def test_config_choices_are_the_quantizer_formats():
    from jaxdpo import config as config_lib

    assert config_lib.CHOICES["lora.base_dtype"] == q.BASE_DTYPES
    assert set(q.BASE_DTYPES) == {"none", *q.FORMATS}
