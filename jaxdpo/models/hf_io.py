"""Hugging Face checkpoints in and out: safetensors (single or sharded with an index), config.json in the
transformers 5 format, generation config and tokenizer files. Never pickle.

Import streams: params are created abstractly (shapes only), then each weight is read from disk on the
host (memory-mapped), converted to our layout, cast, and placed straight into its sharded place
(`jax.make_array_from_callback`, which also works across hosts). Export plans every tensor's shard file
and byte offsets from shapes alone, then gathers one stacked weight at a time and streams it to disk;
only process 0 writes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import struct

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from jaxdpo.errors import ConfigError
from jaxdpo.models import families
from jaxdpo.models.config import ModelConfig
from jaxdpo.models.decoder import (
    PROJECTIONS,
    Decoder,
    LoRASettings,
    adapter_specs,
    adapter_values,
    layer_param_specs,
    top_param_specs,
)
from jaxdpo.parallel.sharding import gather_to_host, logical_spec

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_ST_DTYPES = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16), "BF16": np.dtype(ml_dtypes.bfloat16),
              "F64": np.dtype(np.float64)}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
# our param name -> where its [in..., out...] dims split, for weights stored by torch as Linear [out, in]
_LINEAR_SPLIT = {**PROJECTIONS, "lm_head": 1}
# tensors some checkpoints carry that hold no parameters
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class ModelFileError(ConfigError, ValueError):
    """A model file that cannot be used (absent, unreadable, damaged, or not matching config.json): one line
    naming the file, exit status 2 from the CLI."""


# ---- safetensors, read and written with numpy (bf16 via ml_dtypes) ----------------------------------------

def _read_header(path: str) -> tuple[dict, int]:
    """The tensor table of a safetensors file, checked against the file's size (a truncated or garbage file
    is a ModelFileError naming it, not an OverflowError or a memmap failure later)."""
    size = os.path.getsize(path)
    damaged = f"{path}: not a safetensors file, or damaged (truncated?)"
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8 or struct.unpack("<Q", prefix)[0] > size - 8:
            raise ModelFileError(f"{damaged}: its header length does not fit in its {size} bytes")
        (length,) = struct.unpack("<Q", prefix)
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ModelFileError(f"{damaged}: its header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise ModelFileError(f"{damaged}: its header is not a table of tensors")
    header.pop("__metadata__", None)
    for tensor, info in header.items():
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and 0 <= offsets[0] <= offsets[1] <= size - 8 - length):
            raise ModelFileError(f"{damaged}: tensor {tensor!r} lies outside the file's {size} bytes")
    return header, 8 + length


class _SafetensorsReader:
    """name -> memory-mapped numpy array, over one file or a sharded set listed in an index."""

    def __init__(self, path: str):
        if os.path.exists(os.path.join(path, INDEX_FILE)):
            with open(os.path.join(path, INDEX_FILE)) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        elif os.path.exists(os.path.join(path, SINGLE_FILE)):
            files = [SINGLE_FILE]
        else:
            pickled = [n for n in ("pytorch_model.bin", "model.pt") if os.path.exists(os.path.join(path, n))]
            hint = (f" Found {pickled[0]}: jaxdpo never loads pickle; re-save it with "
                    f"model.save_pretrained(dir, safe_serialization=True).") if pickled else ""
            raise ModelFileError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE}.{hint}")
        self.entries: dict[str, tuple[str, dict, int]] = {}
        for name in files:
            file = os.path.join(path, name)
            if not os.path.exists(file):
                raise ModelFileError(f"{path}: {INDEX_FILE} lists {name}, which is missing")
            header, data_start = _read_header(file)
            for tensor, info in header.items():
                self.entries[tensor] = (file, info, data_start)

    def get(self, tensor: str, expected_shape: tuple[int, ...]) -> np.ndarray:
        if tensor not in self.entries:
            files = sorted({os.path.basename(f) for f, _, _ in self.entries.values()})
            raise ModelFileError(f"checkpoint is missing tensor {tensor!r} (looked in {', '.join(files)})")
        file, info, data_start = self.entries[tensor]
        if info["dtype"] not in _ST_DTYPES:
            raise ModelFileError(f"{file}: tensor {tensor!r} has dtype {info['dtype']}; expected one of "
                             f"{', '.join(_ST_DTYPES)}")
        shape = tuple(info["shape"])
        if shape != tuple(expected_shape):
            raise ModelFileError(f"{file}: tensor {tensor!r} has shape {shape} but config.json implies "
                             f"{tuple(expected_shape)}")
        begin, end = info["data_offsets"]
        dtype = _ST_DTYPES[info["dtype"]]
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise ModelFileError(f"{file}: tensor {tensor!r} byte range does not match its shape and dtype")
        if begin == end:
            return np.zeros(shape, dtype)
        return np.memmap(file, dtype=dtype, mode="r", offset=data_start + begin, shape=shape)


# ---- layout: HF torch tensors <-> our params ---------------------------------------------------------------

def _hf_shape(name: str, our_shape: tuple[int, ...]) -> tuple[int, ...]:
    if name in _LINEAR_SPLIT:
        split = _LINEAR_SPLIT[name]
        return (math.prod(our_shape[split:]), math.prod(our_shape[:split]))
    if name in ("q_bias", "k_bias", "v_bias"):
        return (math.prod(our_shape),)
    return tuple(our_shape)


def _to_ours(name: str, hf: np.ndarray, our_shape: tuple[int, ...]) -> np.ndarray:
    if name in _LINEAR_SPLIT:  # torch Linear is [out, in]; ours is [in..., out...]
        return np.asarray(hf).T.reshape(our_shape)
    return np.asarray(hf).reshape(our_shape)


def _to_hf(name: str, ours: np.ndarray) -> np.ndarray:
    if name in _LINEAR_SPLIT:
        split = _LINEAR_SPLIT[name]
        return np.ascontiguousarray(ours.reshape(math.prod(ours.shape[:split]), -1).T)
    return np.ascontiguousarray(ours.reshape(_hf_shape(name, ours.shape)))


# ---- import -----------------------------------------------------------------------------------------------

def check_checkpoint_dir(path: str, key: str) -> None:
    """ConfigError unless `path` (the value of config key `key`) is a Hugging Face checkpoint directory."""
    if not os.path.isdir(path):
        raise ConfigError(f"{key} = {path!r} is not a directory (a Hugging Face checkpoint directory with "
                          f"config.json and *.safetensors, or a hub name org/name[@revision])")
    if not os.path.exists(os.path.join(path, "config.json")):
        raise ConfigError(f"{key} = {path!r} has no config.json (is it a Hugging Face checkpoint directory?)")


def check_model_config(model_cfg) -> None:
    """The `model` section: its checkpoint and tokenizer directories exist."""
    check_checkpoint_dir(model_cfg.path, "model.path")
    if model_cfg.tokenizer and not os.path.isdir(model_cfg.tokenizer):
        raise ConfigError(f"model.tokenizer = {model_cfg.tokenizer!r} is not a directory or a hub name "
                          f"org/name[@revision] (leave it empty to use model.path's tokenizer)")


def load_config(path: str) -> ModelConfig:
    """ModelConfig from `path/config.json`."""
    file = os.path.join(path, "config.json")
    if not os.path.exists(file):
        raise ModelFileError(f"{path}: no config.json; point the model path at a Hugging Face checkpoint dir")
    try:
        with open(file, "rb") as f:
            hf = json.loads(f.read().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFileError(f"{file}: not a readable JSON file ({e})") from None
    if not isinstance(hf, dict):
        raise ModelFileError(f"{file}: must hold a JSON object, found {type(hf).__name__}")
    try:
        return families.config_from_hf(hf)
    except KeyError as e:
        raise ModelFileError(f"{file}: missing key {e.args[0]!r}, which a {hf.get('model_type')!r} model needs; "
                             "is this a complete transformers config.json?") from None
    except (ValueError, TypeError) as e:
        raise ModelFileError(f"{file}: {' '.join(str(e).split())}") from None


def _active_mesh():
    if jax.sharding.get_abstract_mesh().empty:
        return None
    return jax.sharding.get_mesh()


def place_on_mesh(value: np.ndarray, logical: tuple[str, ...], mesh):
    if mesh is None:
        return jnp.asarray(value)
    sharding = NamedSharding(mesh, logical_spec(*logical))
    # each device (of each host) copies only its own slice out of the host array
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def _place_array(value: jax.Array, logical: tuple, mesh):
    return value if mesh is None else jax.device_put(value, NamedSharding(mesh, logical_spec(*logical)))


SCORE_HEAD = "score.weight"


def _decoder_values(reader: _SafetensorsReader, config: ModelConfig, mesh, cast) -> tuple[dict, set[str]]:
    """Every decoder param of `config`, read from `reader`, converted, cast and placed; and the tensor
    names used (causal LMs and sequence classifiers share this loop)."""
    values: dict = {"layers": {}}
    used = set()
    for name, hf_name in families.top_key_map(config).items():
        shape, logical = top_param_specs(config)[name]
        values[name] = place_on_mesh(_to_ours(name, reader.get(hf_name, _hf_shape(name, shape)), shape).astype(cast),
                              logical, mesh)
        used.add(hf_name)
    specs = layer_param_specs(config)
    for name, template in families.layer_key_map(config).items():
        shape, logical = specs[name]
        per_layer = []
        for i in range(config.num_layers):
            hf_name = template.format(i=i)
            per_layer.append(_to_ours(name, reader.get(hf_name, _hf_shape(name, shape[1:])), shape[1:]).astype(cast))
            used.add(hf_name)
        values["layers"][name] = place_on_mesh(np.stack(per_layer), logical, mesh)
        del per_layer
    return values, used


def from_pretrained(path: str, dtype=jnp.float32, *, param_dtype=None, mesh=None, remat: str = "none",
                    attention_backend: str = "xla", lora: LoRASettings | None = None, lora_seed: int = 0) -> Decoder:
    """Load a HF safetensors checkpoint dir into a Decoder; params in `param_dtype` (default `dtype`),
    compute in `dtype`. With `mesh` (or inside `with jax.set_mesh(mesh):`) each weight lands sharded.
    `attention_backend`, `lora` and `lora_seed` are the Decoder's own fields (LoRA: fresh adapters)."""
    config = load_config(path)
    param_dtype = dtype if param_dtype is None else param_dtype
    mesh = mesh if mesh is not None else _active_mesh()
    reader = _SafetensorsReader(path)
    cast = np.dtype(param_dtype)

    def build():
        return Decoder(config, dtype=dtype, param_dtype=param_dtype, remat=remat, attention_backend=attention_backend,
                       lora=lora, lora_seed=lora_seed, rngs=nnx.Rngs(0))

    abstract = nnx.eval_shape(build)
    graphdef, state = nnx.split(abstract)
    values, used = _decoder_values(reader, config, mesh, cast)
    _add_adapters(values, config, lora, lora_seed=lora_seed, param_dtype=param_dtype, mesh=mesh)
    extra = [n for n in reader.entries if n not in used and not n.endswith(_IGNORED_SUFFIXES)
             and not (config.tie_word_embeddings and n == "lm_head.weight")]  # tied copies some exporters keep
    if extra:
        file = os.path.basename(reader.entries[extra[0]][0])
        raise ModelFileError(f"{path}: checkpoint has tensors a {config.model_type} model does not use, e.g. "
                         f"{extra[0]!r} in {file} ({len(extra)} in all): is config.json for this checkpoint?")
    nnx.replace_by_pure_dict(state, values)
    return nnx.merge(graphdef, state)


def _add_adapters(values: dict, config: ModelConfig, lora: LoRASettings | None, *, lora_seed: int, param_dtype,
                  mesh) -> None:
    """Fresh LoRA adapters (B = 0) into a decoder's `values`, placed on `mesh`."""
    if lora is None:
        return
    adapters = adapter_specs(config, lora)
    for name, value in adapter_values(config, lora, seed=lora_seed, param_dtype=param_dtype).items():
        values["layers"][name] = _place_array(value, adapters[name][1], mesh)


# ---- export -----------------------------------------------------------------------------------------------

def _write_safetensors(file: str, tensors: list[tuple[str, tuple, np.dtype]], produce) -> None:
    """Write a safetensors file whose header is known from shapes; `produce(name)` yields each tensor."""
    header, offset = {}, 0
    for name, shape, dtype in tensors:
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape, dtype in tensors:
            array = produce(name)
            assert array.shape == tuple(shape) and array.dtype == dtype, (name, array.shape, array.dtype)
            f.write(array.tobytes())


def save_pretrained(model: Decoder, out_dir: str, tokenizer=None, max_shard_bytes: int = 5 * 2**30,
                    dtype=None, *, extra_tensors: dict | None = None, config_updates: dict | None = None) -> None:
    """Write `model` as a transformers checkpoint dir. `dtype` (default: the params' dtype) is the dtype on
    disk. `extra_tensors` (HF name -> array in HF layout: a classifier's score head) are written after the
    decoder's, and `config_updates` over config.json's keys (a classifier's architecture and labels). Every
    process must call this (sharded params are gathered); only process 0 writes."""
    config = model.config
    params = {name: getattr(model, name) for name in top_param_specs(config)}
    layer_params = {name: getattr(model.layers, name) for name in layer_param_specs(config)}
    disk_dtype = np.dtype(dtype if dtype is not None else model.param_dtype)
    if disk_dtype not in _ST_NAMES:
        raise ValueError(f"save_pretrained: dtype {disk_dtype} is not one of float32, bfloat16, float16")

    # plan: (hf name, our name, layer or None, hf shape), assigned to shards by size
    plan = [(hf, name, None, _hf_shape(name, params[name].shape)) for name, hf in families.top_key_map(config).items()]
    for name, template in families.layer_key_map(config).items():
        shape = layer_param_specs(config)[name][0][1:]
        plan += [(template.format(i=i), name, i, _hf_shape(name, shape)) for i in range(config.num_layers)]
    extra_tensors = dict(extra_tensors or {})
    plan += [(hf, hf, None, tuple(value.shape)) for hf, value in extra_tensors.items()]
    shards: list[list] = [[]]
    size = 0
    for entry in plan:
        nbytes = math.prod(entry[3]) * disk_dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    names = ([SINGLE_FILE] if len(shards) == 1 else
             [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))])

    cached: dict = {}  # one gathered stacked weight at a time

    def host_value(name: str, layer: int | None) -> np.ndarray:
        if name in extra_tensors:
            return np.asarray(gather_to_host(extra_tensors[name])).astype(disk_dtype)
        if name not in cached:
            cached.clear()
            var = params[name] if layer is None else layer_params[name]
            cached[name] = gather_to_host(var[...])
        value = cached[name] if layer is None else cached[name][layer]
        return _to_hf(name, value.astype(disk_dtype))

    if jax.process_index() != 0:  # still join every gather, in the same order as process 0
        for _, name, layer, _ in plan:
            host_value(name, layer)
        return
    with staged_dir(out_dir) as staging:
        for file_name, shard in zip(names, shards):
            by_name = {hf: (name, layer) for hf, name, layer, _ in shard}
            _write_safetensors(os.path.join(staging, file_name), [(hf, shape, disk_dtype) for hf, _, _, shape in shard],
                               lambda hf: host_value(*by_name[hf]))
        if len(shards) > 1:
            total = sum(math.prod(shape) * disk_dtype.itemsize for _, _, _, shape in plan)
            weight_map = {hf: file_name for file_name, shard in zip(names, shards) for hf, _, _, _ in shard}
            with open(os.path.join(staging, INDEX_FILE), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        _write_configs(config, disk_dtype, staging, config_updates or {})
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)


def _write_configs(config: ModelConfig, disk_dtype: np.dtype, out_dir: str, config_updates: dict) -> None:
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(families.config_to_hf(config, disk_dtype.name) | config_updates, f, indent=2)
    generation = {"bos_token_id": config.bos_token_id, "pad_token_id": config.pad_token_id,
                  "eos_token_id": list(config.eos_token_id) if isinstance(config.eos_token_id, tuple)
                  else config.eos_token_id}
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump({k: v for k, v in generation.items() if v is not None}, f, indent=2)


@contextlib.contextmanager
def staged_dir(out_dir: str):
    """Write an export into a sibling `<out_dir>.partial-<pid>`, then swap it in whole: a failure (disk
    full, a kill) leaves the previous export, never a truncated model.safetensors under `out_dir`."""
    staging = f"{os.path.abspath(out_dir).rstrip(os.sep)}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    previous = f"{staging}.previous"
    if os.path.exists(out_dir):
        os.replace(out_dir, previous)
    os.replace(staging, out_dir)
    shutil.rmtree(previous, ignore_errors=True)


# ---- sequence classifiers (reward models) -----------------------------------------------------------------
# `*ForSequenceClassification` checkpoints hold the decoder under the same `model.` prefix as a causal LM,
# no `lm_head`, and a `score` Linear [num_labels, D] (no bias) applied to the final-normed hidden states.

def from_pretrained_classifier(path: str, dtype=jnp.float32, *, param_dtype=None,
                               mesh=None) -> tuple[Decoder, jax.Array]:
    """Load a `*ForSequenceClassification` safetensors checkpoint dir: (the decoder, the score head
    [D, num_labels] with logical axes ("embed", None)); see `from_pretrained_scorer`."""
    decoder, score = from_pretrained_scorer(path, dtype, param_dtype=param_dtype, mesh=mesh)
    if score is None:
        raise ModelFileError(f"{path}: no {SCORE_HEAD!r} tensor: not a *ForSequenceClassification checkpoint "
                             f"(a reward model has a `score` head on its decoder)")
    return decoder, score


def from_pretrained_scorer(path: str, dtype=jnp.float32, *, param_dtype=None, mesh=None, remat: str = "none",
                           attention_backend: str = "xla", lora: LoRASettings | None = None,
                           lora_seed: int = 0) -> tuple[Decoder, jax.Array | None]:
    """A decoder to score with, from a `*ForSequenceClassification` checkpoint or a causal LM: (the decoder,
    the checkpoint's score head [D, num_labels] with logical axes ("embed", None), or None when it has
    none). The decoder is built with tied embeddings, which is how a Decoder holds no LM head (a classifier
    has none; a causal LM's `lm_head` is not read). Params in `param_dtype` (default `dtype`), sharded on
    `mesh` (or the mesh of an enclosing `jax.set_mesh`); the other arguments are the Decoder's fields."""
    config = dataclasses.replace(load_config(path), tie_word_embeddings=True)
    param_dtype = dtype if param_dtype is None else param_dtype
    mesh = mesh if mesh is not None else _active_mesh()
    reader = _SafetensorsReader(path)
    cast = np.dtype(param_dtype)
    score = None
    if SCORE_HEAD in reader.entries:
        num_labels = reader.entries[SCORE_HEAD][1]["shape"][0]
        score_hf = reader.get(SCORE_HEAD, (num_labels, config.hidden_size))
        score = place_on_mesh(np.asarray(score_hf).T.astype(cast), ("embed", None), mesh)

    abstract = nnx.eval_shape(
        lambda: Decoder(config, dtype=dtype, param_dtype=param_dtype, remat=remat, attention_backend=attention_backend,
                        lora=lora, lora_seed=lora_seed, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    values, used = _decoder_values(reader, config, mesh, cast)
    _add_adapters(values, config, lora, lora_seed=lora_seed, param_dtype=param_dtype, mesh=mesh)
    unread = {SCORE_HEAD, "lm_head.weight"}
    extra = [n for n in reader.entries if n not in used | unread and not n.endswith(_IGNORED_SUFFIXES)]
    if extra:
        file = os.path.basename(reader.entries[extra[0]][0])
        raise ModelFileError(f"{path}: checkpoint has tensors a {config.model_type} decoder plus score "
                             f"head does not use, e.g. {extra[0]!r} in {file} ({len(extra)} in all)")
    nnx.replace_by_pure_dict(state, values)
    return nnx.merge(graphdef, state), score
