"""reference.mode = "cached": same losses as the live reference, reused across runs, invalidated on change."""

import json
import os

import jax
import numpy as np

from jaxdpo.preference import reference_cache
from jaxdpo.training.loop import train_and_evaluate
from jaxdpo.training.metrics import read_metrics
from tests.tiny_assets import make_llama, tiny_run_config


def run(assets, workdir, cache_dir, **overrides):
    cfg = tiny_run_config(assets, str(workdir), **{"train.eval_every": 3, "train.export_hf": False,
                                                   "data.cache_dir": str(cache_dir), **overrides})
    trainer = train_and_evaluate(cfg, devices=jax.devices()[:2])
    records = read_metrics(str(workdir))
    return trainer, {key: [r[key] for r in records if key in r]
                     for key in ("train/loss", "train/grad_norm", "eval/loss", "eval/rewards/margins")}


def test_cached_reference_matches_live_and_is_reused(assets, tmp_path):
    cache_dir = tmp_path / "cache"
    _, live = run(assets, tmp_path / "live", cache_dir, **{"data.layout": "packed"})
    first, cached = run(assets, tmp_path / "cached", cache_dir,
                        **{"data.layout": "packed", "reference.mode": "cached"})
    for key, values in live.items():
        np.testing.assert_allclose(cached[key], values, atol=1e-5, rtol=1e-5, err_msg=key)
    assert first.reference.params is None  # training held no reference weights
    assert first.reference.cache.computed == ["train", "eval"]
    files = sorted(os.listdir(cache_dir / "reference"))
    assert len(files) == 2

    # A second run (a later run with the same inputs) reads both splits from disk, same losses.
    second, again = run(assets, tmp_path / "again", cache_dir,
                        **{"data.layout": "packed", "reference.mode": "cached"})
    assert second.reference.cache.computed == []
    assert sorted(os.listdir(cache_dir / "reference")) == files
    assert again == cached

    # Another layout is another entry (its logprobs differ by rounding only).
    third, _ = run(assets, tmp_path / "padded", cache_dir, **{"data.layout": "padded", "reference.mode": "cached"})
    assert third.reference.cache.computed == ["train", "eval"]
    np.testing.assert_allclose(third.reference.cache.arrays["train"][0], first.reference.cache.arrays["train"][0],
                               atol=1e-4)


def test_cache_invalidated_when_data_or_weights_change(assets, tmp_path):
    cache_dir = tmp_path / "cache"
    cached = {"reference.mode": "cached", "data.layout": "prefix_shared"}
    first, _ = run(assets, tmp_path / "a", cache_dir, **cached)
    assert first.reference.cache.computed == ["train", "eval"]

    # Different eval data: the eval split is recomputed, the train split is reused.
    evals = tmp_path / "eval.jsonl"
    rows = [json.loads(line) for line in open(assets["eval"])]
    rows[0]["chosen"] = "The owl is green. Glad to help you!"
    evals.write_text("".join(json.dumps(r) + "\n" for r in rows))
    second, _ = run(assets, tmp_path / "b", cache_dir, **cached, **{"data.eval_files": str(evals)})
    assert second.reference.cache.computed == ["eval"]

    # Different reference weights (same shapes, same tokenizer): everything is recomputed.
    from transformers import AutoTokenizer
    ref_dir = tmp_path / "ref"
    make_llama(str(ref_dir), AutoTokenizer.from_pretrained(assets["model"]), seed=1)
    third, _ = run(assets, tmp_path / "c", cache_dir, **cached, **{"reference.path": str(ref_dir)})
    assert third.reference.cache.computed == ["train", "eval"]
    assert not np.allclose(third.reference.cache.arrays["train"][0], first.reference.cache.arrays["train"][0])


def test_lookup_and_fingerprints():
    chosen, rejected = np.array([-1.0, -2.0, -3.0], np.float32), np.array([-4.0, -5.0, -6.0], np.float32)
    out = reference_cache.lookup(np.array([2, 0, -1], np.int32), chosen, rejected)
    np.testing.assert_array_equal(out["ref_chosen"], [-3.0, -1.0, 0.0])
    np.testing.assert_array_equal(out["ref_rejected"], [-6.0, -4.0, 0.0])

    a = {"w": jax.numpy.arange(6.0).reshape(2, 3)}
    permuted = {"w": jax.numpy.arange(6.0)[::-1].reshape(2, 3)}
    assert reference_cache.params_digest(a) == reference_cache.params_digest({"w": a["w"] + 0})
    assert reference_cache.params_digest(a) != reference_cache.params_digest(permuted)
    assert reference_cache.fingerprint({"x": 1}) != reference_cache.fingerprint({"x": 2})


def test_stale_or_truncated_file_is_ignored(tmp_path):
    path = str(tmp_path / "reference" / "k.npz")
    reference_cache.save(path, np.zeros(3), np.ones(3), {"x": 1})
    assert reference_cache.load(path, 3)[1].tolist() == [1.0, 1.0, 1.0]
    assert reference_cache.load(path, 4) is None  # wrong size
    with open(path, "wb") as f:
        f.write(b"not a zip")
    assert reference_cache.load(path, 3) is None
