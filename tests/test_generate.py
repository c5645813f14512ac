"""jaxdpo.sampling.generate on tiny random models: greedy tokens equal transformers' generate for every family, ragged
prompts are exact, LoRA adapters apply, draws follow the filtered softmax and depend only on the seed."""

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from jaxdpo.models import from_pretrained
from jaxdpo.models.decoder import Decoder, LoRASettings
from jaxdpo.models.lora import merge_adapters
from jaxdpo.parallel.sharding import make_mesh
from jaxdpo.sampling import generate as gen
from jaxdpo.sampling import text
from tests.hf_models import CASES, build_hf_model

EOS = 2
PAD = 0
PROMPT_LENGTHS = (5, 11, 3)  # ragged; the longest crosses the sliding window (4) of the sliding cases
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """case -> (transformers model, our Decoder), built once per case."""
    cache = {}

    def get(case):
        if case not in cache:
            hf_model = build_hf_model(case)
            path = str(tmp_path_factory.mktemp(case))
            hf_model.save_pretrained(path)
            cache[case] = (hf_model, from_pretrained(path))
        return cache[case]

    return get


def prompts(vocab: int = 256, lengths=PROMPT_LENGTHS, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, n).tolist() for n in lengths]


def hf_greedy(hf_model, prompt: list[int], new_tokens: int) -> list[int]:
    """transformers' greedy continuation of one unpadded prompt, through its EOS."""
    ids = torch.tensor([prompt])
    out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new_tokens,
                            eos_token_id=EOS, pad_token_id=PAD)[0, len(prompt):].tolist()
    return out[:out.index(EOS) + 1] if EOS in out else out


def sample(model, prompt_ids, settings, **kwargs):
    graphdef, state = nnx.split(model)
    return gen.generate(graphdef, (state,), prompt_ids, settings, eos_ids=[EOS], pad_id=PAD, **kwargs)


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_tokens_equal_transformers(case, tiny):
    hf_model, model = tiny(case)
    batch = prompts()
    got = sample(model, batch, gen.SamplingSettings(max_new_tokens=NEW_TOKENS))
    for prompt, completion in zip(batch, got):
        assert completion.ids == hf_greedy(hf_model, prompt, NEW_TOKENS), case
        assert completion.finished == (completion.ids[-1] == EOS)


def test_logprobs_equal_the_scoring_forward_and_batching_changes_nothing(tiny):
    _, model = tiny("gemma2")  # softcaps and sliding windows in both paths
    graphdef, state = nnx.split(model)
    batch = prompts(lengths=(5, 11, 3, 17, 8))
    settings = gen.SamplingSettings(max_new_tokens=NEW_TOKENS, temperature=1.0, top_p=0.95, seed=3)
    together = sample(model, batch, settings)
    in_pairs = sample(model, batch, settings, batch_size=2)  # other batches, other prompt buckets
    assert [c.ids for c in together] == [c.ids for c in in_pairs]
    scored = gen.completion_logprobs(graphdef, (state,), batch, [c.ids for c in together], pad_id=PAD)
    np.testing.assert_allclose([c.logprob for c in together], scored, rtol=1e-5, atol=1e-4)


def test_lora_adapters_are_applied(tiny):
    _, base = tiny("qwen2")
    settings = LoRASettings(rank=4, alpha=8.0, targets=("q_proj", "v_proj", "down_proj"))
    model = Decoder(base.config, lora=settings, lora_seed=1, rngs=nnx.Rngs(0))
    nnx.update(model, nnx.state(base, nnx.Param))  # the base weights; the adapters stay
    for name in ("q_proj_lora_b", "v_proj_lora_b", "down_proj_lora_b"):  # B = 0 would make them a no-op
        var = getattr(model.layers, name)
        var[...] = 0.3 * jax.random.normal(jax.random.key(len(name)), var[...].shape)
    greedy = gen.SamplingSettings(max_new_tokens=NEW_TOKENS)
    with_adapters = [c.ids for c in sample(model, prompts(), greedy)]
    assert with_adapters == [c.ids for c in sample(merge_adapters(model, settings), prompts(), greedy)]
    assert with_adapters != [c.ids for c in sample(base, prompts(), greedy)]


def test_prompt_buckets_and_left_padding():
    assert [gen.bucket_length(n) for n in (1, 16, 17, 24, 25, 33, 48, 49, 64, 65, 97)] == \
        [16, 16, 24, 24, 32, 48, 48, 64, 64, 96, 128]
    tokens, lengths = gen.left_pad([[5, 6], [7]], 4, pad_id=0)
    np.testing.assert_array_equal(tokens, [[0, 0, 5, 6], [0, 0, 0, 7]])
    np.testing.assert_array_equal(lengths, [2, 1])


def filtered_softmax(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """transformers' warpers (temperature, top-k, top-p) -> the distribution a draw should follow."""
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    scores = torch.tensor(logits)[None]
    for warper in (TemperatureLogitsWarper(temperature), top_k and TopKLogitsWarper(top_k),
                   top_p < 1 and TopPLogitsWarper(top_p)):
        if warper:
            scores = warper(None, scores)
    return torch.softmax(scores, dim=-1)[0].double().numpy()


def chi_square_p_value(observed: np.ndarray, expected: np.ndarray) -> float:
    """Pearson's goodness-of-fit test: P(chi2 with k-1 degrees of freedom >= the statistic)."""
    statistic = float(np.sum((observed - expected) ** 2 / expected))
    return float(jax.scipy.special.gammaincc((len(observed) - 1) / 2, statistic / 2))


def test_greedy_pick_is_argmax_with_its_tie_and_nan_rules():
    logits = np.array([[1.0, 3.0, 3.0, 2.0], [np.nan, 1.0, np.nan, 5.0], [0.0, 0.0, 0.0, 0.0],
                       [-np.inf, -np.inf, -np.inf, -np.inf], [1.0, np.inf, 2.0, np.inf]], np.float32)
    picked = np.asarray(gen.first_max_index(logits))
    np.testing.assert_array_equal(picked, np.argmax(logits, axis=-1))
    np.testing.assert_array_equal(picked, [1, 0, 0, 0, 1])
    assert picked.dtype == np.int32


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8),
                                                     (0.9, 12, 0.7)])
def test_draws_follow_the_filtered_softmax(temperature, top_k, top_p):
    logits = np.random.default_rng(0).normal(0.0, 1.5, 40).astype(np.float32)
    expected = filtered_softmax(logits, temperature, top_k, top_p)
    draws = 20_000
    keys = jax.vmap(lambda i: gen.draw_key(7, i, 0))(np.arange(draws))
    tokens = gen.sample_tokens(np.broadcast_to(logits, (draws, 40)), keys, temperature=temperature, top_p=top_p,
                               greedy=False, top_k=top_k, use_top_p=top_p < 1)
    counts = np.bincount(np.asarray(tokens), minlength=40)
    kept = expected > 0
    assert counts[~kept].sum() == 0, "a filtered-out token was drawn"
    p_value = chi_square_p_value(counts[kept], expected[kept] * draws)
    print(f"T={temperature} k={top_k} p={top_p}: {kept.sum()} tokens kept, chi-square p = {p_value:.3f}")
    assert p_value > 1e-3


def test_same_seed_same_tokens_on_one_and_eight_devices(tiny):
    _, model = tiny("mistral_sliding")
    batch = prompts(lengths=(5, 11, 3, 9, 2, 7, 4, 6))
    settings = gen.SamplingSettings(max_new_tokens=NEW_TOKENS, temperature=1.0, top_k=50, top_p=0.9, seed=11)
    state = nnx.state(model)
    results = []
    for mesh in (make_mesh(devices=jax.devices()[:1]), make_mesh(data=2, fsdp=2, tensor=2)):
        with jax.set_mesh(mesh):
            placed = jax.device_put(state, nnx.get_named_sharding(state, mesh))
            graphdef, _ = nnx.split(model)
            results.append([c.ids for c in gen.generate(graphdef, (placed,), batch, settings, eos_ids=[EOS],
                                                        pad_id=PAD)])
    assert results[0] == results[1]
    other_seed = sample(model, batch, gen.SamplingSettings(max_new_tokens=NEW_TOKENS, temperature=1.0, top_k=50,
                                                            top_p=0.9, seed=12))
    assert [c.ids for c in other_seed] != results[0]


def test_scores_under_a_mesh_that_splits_rows_equal_one_device(tiny):
    """completion_logprobs with ring attention (mesh.sequence = 2), whose causal mask comes from the zigzag
    layout: the rows must reach it in that order (samples.jsonl scores completions this way in training)."""
    _, model = tiny("mistral_sliding")  # a sliding window: the mask also reads the positions
    batch = prompts(lengths=(5, 11, 3, 9))
    completions = [[7, 8, 9], [10, 11], [12] * 6, [13]]
    graphdef, state = nnx.split(model)
    expected = gen.completion_logprobs(graphdef, (state,), batch, completions, pad_id=PAD)
    mesh = make_mesh(1, 4, 1, sequence=2)
    with jax.set_mesh(mesh):
        ring = Decoder(model.config, attention_backend="sequence_parallel", rngs=nnx.Rngs(0))
        nnx.update(ring, state)
        ring_graphdef, ring_state = nnx.split(ring)
        placed = jax.device_put(ring_state, nnx.get_named_sharding(ring_state, mesh))
        scored = gen.completion_logprobs(ring_graphdef, (placed,), batch, completions, pad_id=PAD)
    np.testing.assert_allclose(scored, expected, rtol=1e-5, atol=1e-4)


def test_stop_strings_cut_text_and_ids(tmp_path):
    from tests.tiny_assets import make_tokenizer

    tokenizer = make_tokenizer(str(tmp_path), ["The owl is red. Glad to help! The cat is blue."] * 20)
    ids = tokenizer("The owl is red. Glad to help! The cat", add_special_tokens=False)["input_ids"]
    cut_text, kept, stopped = text.truncate_at_stop(tokenizer, ids, ["nothing here", " Glad"])
    assert (cut_text, stopped) == ("The owl is red.", True)
    assert " Glad" in tokenizer.decode(kept) and " Glad" not in tokenizer.decode(kept[:-1])
    assert text.truncate_at_stop(tokenizer, ids, ["zebra"]) == (tokenizer.decode(ids), ids, False)


@pytest.mark.parametrize("flags,row,message", [
    ([], '{"question": "hi"}', "prompts.jsonl line 2): no 'prompt' and no preference pair to take an implicit"),
    ([], '{"prompt": [{"role": "user"}]}', "prompts.jsonl line 2): message 0 must be an object with 'role' and"),
    ([], '{"prompt": ""}', "prompts.jsonl line 2): the prompt is empty"),
    ([], "hi", "prompts.jsonl line 2): invalid_json: Expecting value"),
    (["--temperature=-1"], '{"prompt": "hi"}', "temperature = -1.0 must be >= 0"),
    (["--top_p=0"], '{"prompt": "hi"}', "top_p = 0.0 must be in (0, 1]"),
    (["--max_new_tokens=x"], '{"prompt": "hi"}', "argument --max_new_tokens: invalid int value"),
    (["--model=/no/such/dir"], '{"prompt": "hi"}', "--model: /no/such/dir is not a directory"),
])
def test_sample_cli_bad_input_is_one_line_and_status_2(flags, row, message, tmp_path, capsys):
    from jaxdpo import sample

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "fine"}\n' + row + "\n")
    args = [f"--model={tmp_path}", f"--prompts={prompts}", "--max_new_tokens=4", f"--output={tmp_path / 'o'}"]
    with pytest.raises(SystemExit) as exit_info:
        sys_exit(sample.main(args + flags))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("jaxdpo.sample: ") and message in err, err


def sys_exit(status):
    raise SystemExit(status)
