"""reference.mode = "cached": reference logprobs computed once per dataset, kept on disk, joined to batches.

The reference model's per-example completion logprob sums (rc, rr: a pair's chosen and rejected, an
unpaired row's completion and KL completion) depend only on the reference weights and the tokenized examples (and, to rounding, on the layout, logprob chunk and dtypes). They are computed in one
forward pass over every train and eval pair, stored as `[N]` float32 arrays indexed by dataset position in
`<data.cache_dir>/reference/<fingerprint>.npz`, and reused by every later run and epoch whose fingerprint
matches. Any change of an input changes the fingerprint, so a stale file is never read. Training then holds
no reference parameters: each batch carries `ref_chosen` / `ref_rejected` looked up by its `pair_ids`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from tqdm.auto import tqdm

from jaxdpo.data.batcher import PairBatcher
from jaxdpo.data.cache import default_cache_dir
from jaxdpo.data.layouts import STEP_ROW_KEYS
from jaxdpo.parallel import sharding
from jaxdpo.parallel.distributed import all_processes_agree
from jaxdpo.training.batches import batch_shardings, to_global
from jaxdpo.training.step import pair_logprobs

CACHE_VERSION = 2  # 2: weight files keyed by content
WEIGHT_FILE_SUFFIXES = (".safetensors", ".json", ".bin")


# -- fingerprints -----------------------------------------------------------------------------------
def weight_files_fingerprint(path: str) -> list:
    """(name, sha256) of the checkpoint's weight and config files: their content, however they were copied."""
    from jaxdpo.data.identity import file_digest

    if not path or not os.path.isdir(path):
        return []
    return [[name, file_digest(os.path.join(path, name))] for name in sorted(os.listdir(path))
            if name.endswith(WEIGHT_FILE_SUFFIXES)]


@jax.jit
def _leaf_statistics(leaves):
    """Per leaf: sum, sum of squares and a position-weighted sum (catches permutations), in float32."""
    def stats(x):
        x = x.astype(jnp.float32).reshape(-1)
        ramp = jnp.cos(jnp.arange(x.shape[0], dtype=jnp.float32) * 0.618)
        return jnp.stack([jnp.sum(x), jnp.sum(x * x), jnp.sum(x * ramp)])
    return [stats(x) for x in leaves]


def params_digest(params) -> str:
    """A hash of the parameter values, computed on device (no full host copy of a large model)."""
    leaves, treedef = jax.tree.flatten(params)
    stats = np.asarray(jax.device_get(jnp.stack(_leaf_statistics(leaves)))) if leaves else np.zeros(0)
    h = hashlib.sha256(str(treedef).encode())
    for leaf in leaves:
        h.update(f"{leaf.shape}{leaf.dtype}".encode())
    h.update(np.round(stats.astype(np.float64), 6).tobytes())
    return h.hexdigest()


def pairs_digest(examples) -> str:
    """A hash of every token id of every example (pair, or unpaired row with its KL completion), in order."""
    h = hashlib.sha256()
    for i in range(len(examples)):
        example = examples[i]
        h.update(np.asarray([len(ids) for ids in example], np.int64).tobytes())
        h.update(np.concatenate(example).astype(np.int32).tobytes())
    return h.hexdigest()


def fingerprint(parts: dict) -> str:
    blob = json.dumps({"version": CACHE_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:32]


# -- disk -------------------------------------------------------------------------------------------
def cache_path(cache_dir: str, key: str) -> str:
    return os.path.join(cache_dir, "reference", f"{key}.npz")


def save(path: str, chosen: np.ndarray, rejected: np.ndarray, parts: dict) -> None:
    from jaxdpo.data.cache import write_npz

    write_npz(path, {"chosen": chosen.astype(np.float32), "rejected": rejected.astype(np.float32),
                     "meta": np.array(json.dumps(parts, sort_keys=True, default=str))})


def load(path: str, num_pairs: int, *, on_damage=None) -> tuple[np.ndarray, np.ndarray] | None:
    """The cached (chosen, rejected) arrays, or None if absent, of the wrong size, or damaged (then
    `on_damage` hears one line, and the caller computes and writes the entry again)."""
    from jaxdpo.data.cache import read_npz

    arrays = read_npz(path, ("chosen", "rejected"), on_damage=on_damage)
    if arrays is None or arrays["chosen"].shape != (num_pairs,) or arrays["rejected"].shape != (num_pairs,):
        return None
    return arrays["chosen"], arrays["rejected"]


# -- computing --------------------------------------------------------------------------------------
def compute(batcher, logprob_fn, to_global, *, desc: str) -> tuple[np.ndarray, np.ndarray]:
    """One pass over `batcher.eval_batches()` (every pair once, in dataset order) -> (rc, rr) [N] float32.

    `logprob_fn(global_batch) -> (pc, pr)` of the global micro-batch; global pair j of the k-th
    micro-batch is dataset pair k * micro_batch_size + j (the batcher gives each process a contiguous
    share, so the global pair order is the dataset order)."""
    n, mbs = batcher.num_pairs, batcher.micro_batch_size
    chosen, rejected = np.zeros((n,), np.float32), np.zeros((n,), np.float32)
    batches = batcher.eval_batches()
    for k, local in enumerate(tqdm(batches, total=batcher.num_eval_batches(), desc=desc, unit="batch",
                                   disable=jax.process_index() != 0)):
        pc, pr = jax.device_get(logprob_fn(to_global(local)))
        ids = np.arange(k * mbs, min((k + 1) * mbs, n))
        chosen[ids], rejected[ids] = pc[:len(ids)], pr[:len(ids)]
    return chosen, rejected


def lookup(pair_ids: np.ndarray, chosen: np.ndarray, rejected: np.ndarray) -> dict[str, np.ndarray]:
    """{"ref_chosen", "ref_rejected"} [P] float32 for a micro-batch's pair_ids (-1 = padding -> 0)."""
    safe = np.maximum(pair_ids, 0)
    valid = pair_ids >= 0
    return {"ref_chosen": np.where(valid, chosen[safe], 0.0).astype(np.float32),
            "ref_rejected": np.where(valid, rejected[safe], 0.0).astype(np.float32)}


class ReferenceCache:
    """Per-split reference logprobs of a run, loaded from disk or computed once with the given weights."""

    def __init__(self):
        self.arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.paths: dict[str, str] = {}
        self.computed: list[str] = []  # splits computed in this run (the rest came from disk)

    def add(self, split: str, arrays: tuple[np.ndarray, np.ndarray], path: str) -> None:
        self.arrays[split], self.paths[split] = arrays, path

    def attach(self, split: str, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The batch with ref_chosen / ref_rejected [P] looked up from its pair_ids."""
        chosen, rejected = self.arrays[split]
        return {**batch, **lookup(batch["pair_ids"], chosen, rejected)}


def load_or_compute(reference_params, *, config, mesh, policy, data, weights_path: str, log=print) -> ReferenceCache:
    """(rc, rr) of every train and eval pair of `data`, from disk or computed now with `reference_params`
    (over `policy`'s graphdef and frozen weights); written to data.cache_dir for the next run."""
    cfg = config
    cache_dir = default_cache_dir(cfg.data.cache_dir)
    num_pairs = cfg.train.eval_batch_size
    shardings = batch_shardings(mesh, list(STEP_ROW_KEYS) + ["pair_valid"], stacked=False)
    common_parts = {
        "weights_files": weight_files_fingerprint(weights_path),
        "weights": params_digest(reference_params),
        "model": policy.model_config.__dict__,
        "param_dtype": cfg.model.param_dtype, "dtype": cfg.model.get("dtype", ""),
        "attention": cfg.model.get("attention", "xla"),
        "layout": cfg.data.layout, "row_length": data.row_length, "chunk": cfg.model.logprob_chunk,
    }
    if policy.lora is not None and policy.lora.base_dtype != "none":  # the frozen base the logprobs come from
        common_parts["base_dtype"] = policy.lora.base_dtype

    def logprobs(weights, batch):
        out = pair_logprobs(policy.graphdef, weights, batch, num_pairs=num_pairs, chunk_size=cfg.model.logprob_chunk)
        return out["pc"], out["pr"]

    # the weights are an argument, never closed over: a closure would embed them in the program as constants
    # (a compile that grows with the model, minutes for 135M parameters)
    weights = (reference_params, policy.frozen)
    compiled = jax.jit(sharding.traced_in(mesh, logprobs),
                       in_shardings=(jax.tree.map(lambda a: a.sharding, weights), shardings),
                       out_shardings=NamedSharding(mesh, sharding.logical_spec()))
    jitted = functools.partial(compiled, weights)
    cache = ReferenceCache()
    for split, pairs in data.splits():
        parts = {**common_parts, "pairs": pairs_digest(pairs), "num_pairs": len(pairs)}
        path = cache_path(cache_dir, fingerprint(parts))
        found = load(path, len(pairs), on_damage=lambda m: log(f"  reference  {split}: {m}"))
        if all_processes_agree(found is not None):
            log(f"  reference  {split}: {len(pairs)} pairs' logprobs from cache {path}")
            cache.add(split, found, path)
            continue
        batcher = PairBatcher(pairs, layout=cfg.data.layout, row_length=data.row_length, batch_size=num_pairs,
                              micro_batch_size=num_pairs, seed=cfg.seed, shuffle=False,
                              process_index=jax.process_index(), process_count=jax.process_count(),
                              row_multiple=data.row_multiple, pad_id=data.pad_id)
        arrays = compute(batcher, jitted, lambda local: to_global(local, shardings, pair_axis=0),
                         desc=f"reference logprobs ({split})")
        if jax.process_index() == 0:
            save(path, *arrays, parts)
        log(f"  reference  {split}: computed {len(pairs)} pairs' logprobs, cached in {path}")
        cache.add(split, arrays, path)
        cache.computed.append(split)
    return cache
