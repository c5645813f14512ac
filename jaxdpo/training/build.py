"""Builders: each takes the config (and what it needs that was built before) and returns plain values.

The training loop (jaxdpo/training/loop.py) calls them in this order; tools call the same ones:

  mesh = make_mesh(config)                 the (data, fsdp, sequence, tensor) device mesh
  check_config(config, mesh)               every check that needs only configs: seconds, before tokenizing
  data = build_data(config, mesh)          tokenized pairs, batchers, row length, total steps
  policy = build_policy(config, mesh, resuming=...)     graphdef, trainable params, frozen weights
           (describe_policy(config, mesh): the same as shapes and shardings only, for lowering without weights)
  reference = build_reference(config, mesh, policy, data)   one jaxdpo.preference.reference.Reference
  steps = build_steps(config, mesh, policy, reference, data)  jitted train/eval steps and their shardings
  state = train_state(policy, steps, resuming=...)      the step-0 state, or its description to restore into

`resuming=True` (a checkpoint will be restored): the trainable params and the optimizer state are only
described (ShapeDtypeStructs with the shardings real ones would have), so they never exist twice.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
from typing import Any

import jax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxdpo.data.examples import ExampleKind, pairs_of_origin
from jaxdpo.errors import ConfigError
from jaxdpo.models import hf_io
from jaxdpo.models import lora as lora_lib
from jaxdpo.models import reward_model
from jaxdpo.models.config import DTYPES
from jaxdpo.models.decoder import Decoder, LoRAParam, layer_param_specs, top_param_specs
from jaxdpo.ops.attention import select_backend
from jaxdpo.parallel import distributed, sharding
from jaxdpo.preference import losses
from jaxdpo.preference import reference as reference_lib
from jaxdpo.preference import reference_cache
from jaxdpo.preference.reference import Reference
from jaxdpo.training import batches, objectives
from jaxdpo.training.optim import make_optimizer
from jaxdpo.training.step import (
    init_state,
    jit_eval_step,
    jit_train_step,
    make_eval_metrics,
    make_eval_step,
    make_train_step,
)


def log(msg: str) -> None:
    if distributed.is_main_process():
        print(msg, flush=True)


# ----- mesh and config-only checks -----------------------------------------------------------------

def prepare_workdir(workdir: str) -> None:
    """Create the workdir and check that files can be written in it: a path that is a file, or a directory
    that is read-only, is one ConfigError naming it before anything is built."""
    try:
        os.makedirs(workdir, exist_ok=True)
        with tempfile.TemporaryFile(dir=workdir):
            pass
    except OSError as error:
        problem = "is a file, not a directory" if os.path.isfile(workdir) else f"is not writable ({error.strerror})"
        raise ConfigError(f"workdir {os.path.abspath(workdir)} {problem}: pass --config.workdir=<a directory "
                          f"you can write to>") from None


def make_mesh(config, devices=None):
    try:
        return sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, devices,
                                  sequence=config.mesh.sequence)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def rows_per_process_multiple(config, mesh) -> int:
    """Rows (and pairs) of each process's micro-batch must split evenly over its batch shards."""
    shards = sharding.batch_axis_size(mesh)
    n_proc = jax.process_count()
    if shards % n_proc:
        raise ConfigError(f"mesh: data*fsdp = {shards} must be a multiple of the number of processes ({n_proc})")
    for key in ("micro_batch_size", "eval_batch_size"):
        pairs = config.train[key]
        if pairs % shards:
            raise ConfigError(f"train.{key} = {pairs} pairs must be a multiple of mesh data*fsdp = {shards} "
                              f"(the batch is split over those devices)")
    return shards // n_proc


def check_mesh_fits_model(config, mesh) -> None:
    """Sharded param sizes vs mesh axes, from config.json alone: a ConfigError before loading weights."""
    model_config = hf_io.load_config(config.model.path)
    specs = {**top_param_specs(model_config), **layer_param_specs(model_config)}
    settings = lora_lib.lora_settings(config.lora) if "lora" in config else None
    if settings is not None:  # a quantized base: its codes and block scales are sharded too
        specs.update({name: (shape, logical) for name, (shape, logical, _) in
                      lora_lib.quantized_specs(model_config, settings).items()})
    sharding.check_params_divisible(specs, dict(mesh.shape))


def check_config(config, mesh) -> None:
    """Every check that needs only the config, config.json and the mesh, so that a bad mesh or batch
    split fails in seconds instead of after tokenizing a large dataset."""
    rows_per_process_multiple(config, mesh)
    check_mesh_fits_model(config, mesh)
    lora_on = lora_lib.check_config(config)
    reference_lib.check_config(config, lora_on=lora_on)
    kind, _ = reference_lib.reference_kind(config, lora_on=lora_on)
    kind.check_mesh(mesh)


# ----- data ----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Data:
    tokenizer: Any
    train_pairs: Any  # jaxdpo.data.TokenizedPairs
    eval_pairs: Any  # TokenizedPairs or None
    report: dict
    row_length: int
    row_multiple: int
    pad_id: int
    batcher: Any  # jaxdpo.data.batcher.PairBatcher
    eval_batcher: Any  # PairBatcher or None
    total_steps: int

    def splits(self) -> list[tuple[str, Any]]:
        """("train", pairs) and ("eval", pairs) when there are eval pairs."""
        has_eval = self.eval_pairs is not None and len(self.eval_pairs) > 0
        return [("train", self.train_pairs)] + ([("eval", self.eval_pairs)] if has_eval else [])


def as_loss_examples(tokenized, config):
    """Tokenized data as the examples the loss takes: pairs as they are; unpaired rows with KTO's KL
    completions (chunks of train.batch_size, in data order) when a loss estimates KL."""
    from jaxdpo.data import UnpairedExamples

    if losses.example_kind(config.loss) is not ExampleKind.UNPAIRED:
        return tokenized
    kl_chunk = config.train.batch_size if losses.needs_kl_rows(config.loss) else None
    return UnpairedExamples(tokenized, max_length=int(config.data.max_length), kl_chunk=kl_chunk)


def warn_class_balance(examples, config) -> None:
    """TRL's KTO warning when the class weights do not balance the training rows (process 0 logs it)."""
    if losses.example_kind(config.loss) is not ExampleKind.UNPAIRED or not distributed.is_main_process():
        return
    desirable = int(examples.labels.sum())
    warning = losses.class_balance_warning(config.loss, desirable, len(examples) - desirable)
    if warning:
        log(f"  data       {warning}")


def build_data(config, mesh) -> Data:
    """Tokenize (every process tokenizes all data; only process 0 reports and writes) and batch."""
    from transformers import AutoTokenizer

    from jaxdpo.data import load_preference_data, require_full_batch
    from jaxdpo.data.batcher import PairBatcher
    from jaxdpo.data.layouts import pad_id_of, row_length

    cfg = config
    row_multiple = rows_per_process_multiple(cfg, mesh)  # config-only: before any tokenizing
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer or cfg.model.path)
    main = distributed.is_main_process()
    train_pairs, eval_pairs, report = load_preference_data(
        cfg.data, tokenizer, workdir=cfg.workdir if main else None, seed=cfg.seed, log=print if main else None,
        kind=losses.example_kind(cfg.loss))
    train_pairs, eval_pairs = (None if p is None else as_loss_examples(p, cfg) for p in (train_pairs, eval_pairs))
    warn_class_balance(train_pairs, cfg)
    all_pairs = [train_pairs] + ([eval_pairs] if eval_pairs is not None else [])
    length = max(row_length(p, cfg.data.layout, cfg.data, sequence=cfg.mesh.sequence) for p in all_pairs)
    pad_id = pad_id_of(tokenizer)
    common = dict(layout=cfg.data.layout, row_length=length, process_index=jax.process_index(),
                  process_count=jax.process_count(), row_multiple=row_multiple, pad_id=pad_id, seed=cfg.seed)
    batcher = PairBatcher(train_pairs, batch_size=cfg.train.batch_size, micro_batch_size=cfg.train.micro_batch_size,
                          shuffle=cfg.data.shuffle, **common)
    eval_batcher = None
    if eval_pairs is not None and len(eval_pairs) > 0:
        eval_batcher = PairBatcher(eval_pairs, batch_size=cfg.train.eval_batch_size,
                                   micro_batch_size=cfg.train.eval_batch_size, shuffle=False, **common)
    require_full_batch(batcher)  # now, before anything is compiled or evaluated
    total_steps = cfg.train.steps if cfg.train.steps > 0 else max(
        1, math.ceil(cfg.train.epochs * batcher.steps_per_epoch))
    return Data(tokenizer, train_pairs, eval_pairs, report, length, row_multiple, pad_id, batcher, eval_batcher,
                total_steps)


# ----- the policy ----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Policy:
    graphdef: Any
    params: Any  # trainable: every Param, or under LoRA the adapters; described when resuming
    frozen: Any  # LoRA's base weights (else empty)
    initial_params: Any  # the loaded initial params a resume keeps for the reference (else None)
    model_config: Any
    lora: lora_lib.LoRASettings | None
    num_params: int  # every weight the forward uses (FLOPs count them all, trained or frozen)
    num_trainable: int
    # On-policy rounds whose LoRA adapters are folded into `frozen` (0: model.path's weights alone). A
    # checkpoint's adapters only make sense on that base, which is held in memory, not saved.
    rounds_in_base: int = 0


def attention_backend(config, model_config) -> str:
    """Ring attention when rows are split over the `sequence` axis; else cuDNN's fused kernel or splash
    where it expresses this run's mask, else XLA (logged why). The policy and every reference forward run
    the policy's graphdef, so this is the one place the backend is chosen."""
    requested = config.model.get("attention", "xla")
    if config.mesh.sequence > 1:
        log(f"  attention  sequence_parallel: zigzag ring attention over mesh.sequence = {config.mesh.sequence} "
            f"(model.attention = {requested!r} applies to whole rows only)")
        return "sequence_parallel"
    backend, why = select_backend(requested, platform=jax.devices()[0].platform, layout=config.data.layout,
                                  dtype=DTYPES[config.model.dtype], head_dim=model_config.head_dim,
                                  logit_softcap=model_config.attn_logit_softcap,
                                  sliding=any(model_config.layer_is_sliding),
                                  groups=losses.example_kind(config.loss) is ExampleKind.GROUP)
    if backend != requested:
        log(f"  attention  {why}")
    return backend


def _decoder_fields(config, model_config, settings) -> dict:
    return dict(dtype=DTYPES[config.model.dtype], param_dtype=DTYPES[config.model.param_dtype],
                remat=config.model.remat, attention_backend=attention_backend(config, model_config),
                lora=settings, lora_seed=config.seed)


def load_weights(config, path: str, mesh, *, lora=None, attention="xla"):
    """A Hugging Face checkpoint as a sharded Decoder: params kept in model.param_dtype, every matmul in
    model.dtype (bf16 compute over fp32 master weights is the usual mixed precision)."""
    return hf_io.from_pretrained(path, dtype=DTYPES[config.model.dtype], param_dtype=DTYPES[config.model.param_dtype],
                                 mesh=mesh, remat=config.model.remat, attention_backend=attention, lora=lora,
                                 lora_seed=config.seed)


def load_scorer(config, mesh, settings, fields):
    """The reward-model objective's scorer (jaxdpo.models.reward_model): model.path's decoder with its score
    head, or a new head on a causal LM (said in one line)."""
    return reward_model.load_scorer(config.model.path, seed=config.seed, log=log, dtype=fields["dtype"],
                                    param_dtype=fields["param_dtype"], mesh=mesh, remat=fields["remat"],
                                    attention_backend=fields["attention_backend"], lora=settings,
                                    lora_seed=config.seed)


def described(params, mesh):
    """ShapeDtypeStructs of `params` (arrays or descriptions) with shardings on `mesh`."""
    def describe(x):
        sharding_ = x.sharding if isinstance(x, jax.Array) else NamedSharding(mesh, x.sharding.spec)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding_)
    return jax.tree.map(describe, params)


def build_policy(config, mesh, *, resuming: bool) -> Policy:
    """The policy as `graphdef`, trainable `params` and `frozen` (LoRA's base weights; else empty).

    `resuming`: `params` is only described and restore writes into that. Weights are still read from
    model.path where something needs their values: LoRA's frozen base, and the initial policy a
    reference built from weights is made of (kept as `initial_params` for build_reference)."""
    check_mesh_fits_model(config, mesh)
    settings = lora_lib.lora_settings(config.lora) if "lora" in config else None
    kind, _ = reference_lib.reference_kind(config, lora_on=settings is not None)
    keep_initial = resuming and kind.uses_weights and not config.reference.path
    model_config = hf_io.load_config(config.model.path)
    fields = _decoder_fields(config, model_config, settings)
    with jax.set_mesh(mesh):
        if objectives.objective_kind(config).trains_scorer:  # its head is new or read: always loaded
            model = load_scorer(config, mesh, settings, fields)
        elif resuming and not keep_initial and settings is None:  # nothing needs values: describe it all
            model = nnx.eval_shape(lambda: Decoder(model_config, **fields, rngs=nnx.Rngs(0)))
        else:
            model = load_weights(config, config.model.path, mesh, lora=settings, attention=fields["attention_backend"])
    num_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))  # before any quantizing
    if settings is not None:
        with jax.set_mesh(mesh):
            model = lora_lib.quantize_base(model, settings, mesh)  # the frozen targets as lora.base_dtype says
    graphdef, params, frozen = nnx.split(model, _trainable(settings), ...)
    del model
    return Policy(graphdef=graphdef, params=described(params, mesh) if resuming else params, frozen=frozen,
                  initial_params=params if keep_initial else None, model_config=model_config, lora=settings,
                  num_params=num_params, num_trainable=sum(x.size for x in jax.tree.leaves(params)))


@dataclasses.dataclass(frozen=True)
class Start:
    """What a run takes from memory instead of building it (an on-policy round): `policy` as build_policy
    returns it, its params the run's to donate; `steps`, an earlier run's, reused where `steps_for` allows."""
    policy: Policy
    steps: Steps | None = None

    def policy_for(self, config, *, resuming: bool) -> Policy:
        """The policy as build_policy(resuming=...) returns it: on a resume the params only described, and kept
        as `initial_params` where the reference is built from the initial policy's weights."""
        if not resuming:
            return self.policy
        kind, _ = reference_lib.reference_kind(config, lora_on=self.policy.lora is not None)
        keep_initial = kind.uses_weights and not config.reference.path
        return dataclasses.replace(self.policy, params=described(self.policy.params, None),
                                   initial_params=self.policy.params if keep_initial else None)


def _trainable(settings):
    """Under LoRA only the adapters train (and get optimizer state); the base weights are `frozen`."""
    return nnx.Param if settings is None else (LoRAParam, reward_model.ScoreHead)  # a scorer's head trains too


def describe_policy(config, mesh) -> Policy:
    """The policy of a fresh causal-LM run with every param and frozen weight described (shapes, dtypes,
    shardings on `mesh`), the frozen base quantized as lora.base_dtype says: what lowering the train step
    needs, with no weight read or allocated (only model.path's config.json is read)."""
    check_mesh_fits_model(config, mesh)
    settings = lora_lib.lora_settings(config.lora) if "lora" in config else None
    model_config = hf_io.load_config(config.model.path)
    fields = _decoder_fields(config, model_config, settings)
    with jax.set_mesh(mesh):
        model = nnx.eval_shape(lambda: Decoder(model_config, **fields, rngs=nnx.Rngs(0)))
        num_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))  # before any quantizing
        if settings is not None:
            model = nnx.eval_shape(lambda m: lora_lib.quantize_base(m, settings, mesh), model)
    graphdef, params, frozen = nnx.split(model, _trainable(settings), ...)
    return Policy(graphdef=graphdef, params=described(params, mesh), frozen=described(frozen, mesh),
                  initial_params=None, model_config=model_config, lora=settings, num_params=num_params,
                  num_trainable=sum(x.size for x in jax.tree.leaves(params)))


# ----- the reference -------------------------------------------------------------------------------

def build_reference(config, mesh, policy: Policy, data: Data) -> Reference:
    """The run's reference (jaxdpo.preference.reference): the factory picks the kind, built here from the weights
    it needs: reference.path's, else the initial policy (on a resume the weights build_policy loaded for
    it alone, taken over without a copy; on a fresh run a copy of the live params)."""
    kind, note = reference_lib.reference_kind(config, lora_on=policy.lora is not None)
    if note:
        log(f"  reference  {note}")
    if not kind.uses_weights:
        return kind()
    if config.reference.path:
        with jax.set_mesh(mesh):
            ref_model = load_weights(config, config.reference.path, mesh)
        _, weights, _ = nnx.split(ref_model, nnx.Param, ...)
        is_live = False
    elif policy.initial_params is not None:
        weights, is_live = policy.initial_params, False
    else:
        weights, is_live = policy.params, True  # computed before the first update: the initial policy
    weights_path = config.reference.path or config.model.path
    cache = lambda w: reference_cache.load_or_compute(w, config=config, mesh=mesh, policy=policy, data=data,  # noqa: E731
                                                      weights_path=weights_path, log=log)
    return kind.from_weights(weights, is_live_policy=is_live, cache=cache)


# ----- steps and state -----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Steps:
    train_step: Any  # jitted (state, frozen, reference_params, batches) -> (state, metrics)
    eval_step: Any  # jitted (params, frozen, reference_params, batch) -> per-pair values
    eval_metrics: Any  # [eval_step outputs of every eval batch] -> mean eval metrics
    init: Any  # params -> the step-0 state
    state_shardings: Any
    train_batch_shardings: dict
    eval_batch_shardings: dict
    optimizer: Any
    schedule: Any
    built_for: tuple  # (total steps, reference mode): what the jitted steps close over besides the config


def build_steps(config, mesh, policy: Policy, reference: Reference, data: Data) -> Steps:
    cfg = config
    replicated = NamedSharding(mesh, P())
    optimizer, schedule = make_optimizer(cfg.optim, data.total_steps)
    init = lambda p: init_state(p, optimizer)  # noqa: E731
    state_shardings = jax.tree.map(lambda _: replicated, jax.eval_shape(init, policy.params))
    state_shardings["params"] = jax.tree.map(lambda x: x.sharding, policy.params)
    state_shardings["opt_state"] = sharding.optimizer_state_shardings(optimizer, policy.params, replicated)
    shardings_of = lambda tree: jax.tree.map(lambda x: x.sharding, tree)  # noqa: E731
    unpaired = losses.example_kind(cfg.loss) is ExampleKind.UNPAIRED
    objective = objectives.objective_kind(cfg).make(cfg, reference=reference.without_weights(),
                                                    tokenizer=data.tokenizer)
    keys = batches.batch_keys(reference, objective.example_keys)
    train_batch_shardings = batches.batch_shardings(mesh, keys, stacked=True)
    eval_batch_shardings = batches.batch_shardings(mesh, keys, stacked=False)
    common = dict(frozen_shardings=shardings_of(policy.frozen), replicated=replicated,
                  reference_shardings=shardings_of(reference.params) if reference.params is not None else None)
    with_dropout = policy.lora is not None and policy.lora.dropout > 0
    train_step = make_train_step(policy.graphdef, objective=objective, optimizer=optimizer, schedule=schedule,
                                 num_pairs=cfg.train.micro_batch_size,
                                 dropout_seed=cfg.seed if with_dropout else None)  # masks: (seed, step, micro)
    eval_step = make_eval_step(policy.graphdef, objective=objective, num_pairs=cfg.train.eval_batch_size)
    return Steps(
        train_step=jit_train_step(sharding.traced_in(mesh, train_step), state_shardings=state_shardings,
                                  batch_shardings=train_batch_shardings, **common),
        eval_step=jit_eval_step(sharding.traced_in(mesh, eval_step), params_shardings=state_shardings["params"],
                                batch_shardings=eval_batch_shardings, **common),
        eval_metrics=make_eval_metrics(objective, group_size=cfg.train.batch_size,
                                       origin_pairs=pairs_of_origin(data.eval_pairs.rows) if unpaired and
                                       data.eval_pairs is not None else None),
        init=init, state_shardings=state_shardings, train_batch_shardings=train_batch_shardings,
        eval_batch_shardings=eval_batch_shardings, optimizer=optimizer, schedule=schedule,
        built_for=(data.total_steps, reference.mode))


def steps_for(config, mesh, policy: Policy, reference: Reference, data: Data, *, earlier: Steps | None) -> Steps:
    """`earlier` (a previous run's steps, on the same mesh, graphdef and config but its data) when they were built
    for this run's schedule length and reference kind: jax then finds their traces and executables in the
    jitted functions' own caches. Else new steps."""
    if earlier is not None and earlier.built_for == (data.total_steps, reference.mode):
        return earlier
    return build_steps(config, mesh, policy, reference, data)


def fresh_state(init, shardings, params):
    """The step-0 train state (params + a fresh optimizer state), built sharded; never on a resume.
    The params are donated: the state's params are the loaded buffers, not a second copy of them."""
    return jax.jit(init, out_shardings=shardings, donate_argnums=0)(params)


def train_state(policy: Policy, steps: Steps, *, resuming: bool):
    """The step-0 state, or on a resume its description (restore reads the checkpoint into it)."""
    if resuming:
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            jax.eval_shape(steps.init, policy.params), steps.state_shardings)
    return fresh_state(steps.init, steps.state_shardings, policy.params)


def export_dirs(workdir: str) -> dict[str, str]:
    return {"hf": os.path.join(workdir, "hf"), "adapter": os.path.join(workdir, "hf_adapter")}
