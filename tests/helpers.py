"""Assertions and file surgery several test files share (a helper module, not a test file)."""

import math
import os
import statistics
import zipfile

import jax
import numpy as np
import pytest


def assert_bit_equal(a_tree, b_tree):
    """Same tree structure, and every leaf has the same dtype, shape and bytes."""
    a_leaves, a_def = jax.tree.flatten(a_tree)
    b_leaves, b_def = jax.tree.flatten(b_tree)
    assert a_def == b_def
    for a, b in zip(a_leaves, b_leaves):
        a, b = np.asarray(a), np.asarray(b)
        assert a.dtype == b.dtype and a.shape == b.shape
        assert a.tobytes() == b.tobytes()


def truncate_files(step_dir, subdir="state"):
    """Cut every data file of one checkpoint item in half, as a disk-full or interrupted copy would."""
    count = 0
    for root, _, files in os.walk(os.path.join(step_dir, subdir)):
        for name in files:
            path = os.path.join(root, name)
            if os.sep + "d" in root and os.path.getsize(path) > 0:
                with open(path, "r+b") as f:
                    f.truncate(os.path.getsize(path) // 2)
                count += 1
    assert count > 0


def train_batch(run, step: int) -> dict:
    """The global train batch of `step` of a finished run (jaxdpo.training.loop.Run), as its train step takes it."""
    from jaxdpo.training import batches

    return batches.train_batch(run.data.batcher, run.reference, step, run.steps.train_batch_shardings)


def series(records, key):
    """The values of one metric over a run's records (metrics.jsonl), in step order."""
    return [r[key] for r in records if key in r]


# The LoRA tests' settings, tiny decoder and token ids.
LORA = {"lora.rank": 4, "lora.alpha": 8.0, "lora.targets": "all-linear", "lora.export_merged": True}


def _tiny_model_config():
    from jaxdpo.models import ModelConfig

    return ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                       num_kv_heads=2, head_dim=8)


TINY = _tiny_model_config()


def gemma2_like(config, sliding_window: int):
    """`config` with every Gemma 2 feature the mask and norm rules have: softcaps, sandwich norms, and a
    sliding-window layer before a global one."""
    import dataclasses

    return dataclasses.replace(
        config, model_type="gemma2", norm_unit_offset=True, scale_embeddings=True, mlp_activation="gelu_tanh",
        sandwich_norms=True, attn_logit_softcap=2.0, final_logit_softcap=5.0, query_pre_attn_scalar=16,
        sliding_window=sliding_window, layer_types=("sliding_attention", "full_attention"), tie_word_embeddings=True)


def lora_ids():
    import jax.numpy as jnp

    return jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 10)), jnp.int32)


def damage(path: str, how: str) -> None:
    data = open(path, "rb").read()
    if how == "empty":
        data = b""
    elif how == "truncated":
        data = data[:len(data) // 2]
    else:  # bad CRC: bytes inside a member's data flipped, the zip structure intact
        with zipfile.ZipFile(path) as z:
            info = z.infolist()[0]
        at = info.header_offset + 30 + len(info.filename) + len(info.extra) + info.file_size // 2 + 4
        data = data[:at] + bytes(b ^ 0xFF for b in data[at:at + 8]) + data[at + 8:]
    with open(path, "wb") as f:
        f.write(data)


def memoized_trainings(assets: dict, tmp_path_factory):
    """`train(key, overrides, devices=None) -> (run, metric records)`: `train_and_evaluate` on the tiny
    assets with `overrides`, once per key, so the tests of a module share their trainings."""
    done = {}

    def train(key, overrides: dict, devices=None):
        if key not in done:
            from jaxdpo.training.loop import train_and_evaluate
            from jaxdpo.training.metrics import read_metrics
            from tests.tiny_assets import tiny_run_config

            workdir = str(tmp_path_factory.mktemp("run"))
            done[key] = (train_and_evaluate(tiny_run_config(assets, workdir, **overrides), devices=devices),
                         read_metrics(workdir))
        return done[key]

    return train


def assert_win_rate_metrics(record: dict, policy_scores, reference_scores):
    """record's eval/win_rate, eval/win_rate_low and eval/win_rate_high are the policy's win rate over these
    judge scores (a win 1, a tie 1/2, a loss 0, per prompt) and its 95% Wilson score interval, and
    eval/judge_score_policy and eval/judge_score_reference each side's mean score, to 1e-9."""
    assert len(policy_scores) == len(reference_scores) > 0
    n = len(policy_scores)
    outcomes = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(policy_scores, reference_scores)]
    p, z = sum(outcomes) / n, statistics.NormalDist().inv_cdf(0.975)
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    got = [record[f"eval/{key}"] for key in ("win_rate", "win_rate_low", "win_rate_high", "judge_score_policy",
                                             "judge_score_reference")]
    want = [p, max(0.0, center - half), min(1.0, center + half), sum(policy_scores) / n, sum(reference_scores) / n]
    assert got == pytest.approx(want, rel=0, abs=1e-9)


def train_here(config, capfd, devices: int = 1) -> tuple[str, list[str]]:
    """`config` trained in this process on its first `devices` devices, as `python -m jaxdpo.train` would on
    that many: (its stdout, its `jaxdpo:` notices, i.e. the damaged files it set aside). What a resume does
    needs no process of its own; signals and exit statuses do."""
    import warnings

    import jax

    from jaxdpo.errors import DamagedFileWarning
    from jaxdpo.training.loop import train_and_evaluate

    capfd.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DamagedFileWarning)
        train_and_evaluate(config, devices=jax.devices()[:devices])
    notices = [" ".join(str(w.message).split()) for w in caught if issubclass(w.category, DamagedFileWarning)]
    return capfd.readouterr().out, notices
