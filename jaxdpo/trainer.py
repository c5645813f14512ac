"""The training loop: build everything from a config, train, evaluate, checkpoint, export.

`Trainer(config).run()` is the whole program behind `python -m jaxdpo.train`. Building is split into
small methods in the order a run needs them; the loop itself is `run()`.

Order of a run: checks that need only configs (seconds, before tokenizing anything), data, then the
checkpoint directory is looked at, so that a run that will resume never builds the trainable state it is
about to restore (the params and optimizer state are only described, and restore writes into that).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging as absl_logging
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from jaxdpo import sharding
from jaxdpo.config import ConfigError
from jaxdpo.metrics import WINDOW_META_KEY, MetricsLogger, MetricsWindow
from jaxdpo.optim import make_optimizer
from jaxdpo.step import init_state

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
PAIR_KEYS = ("pair_valid", "ref_chosen", "ref_rejected", "pair_ids")  # [P] arrays (not rows)


def _log(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, flush=True)


class Trainer:
    def __init__(self, config, *, devices=None):
        # orbax logs every save step at INFO through absl; the console belongs to the progress bar.
        absl_logging.set_verbosity(absl_logging.WARNING)
        self.config = config
        self.workdir = config.workdir
        os.makedirs(self.workdir, exist_ok=True)
        try:
            self.mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, devices)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.replicated = NamedSharding(self.mesh, P())

    # -- building ---------------------------------------------------------------------------------
    def check_config(self):
        """Every check that needs only the config, config.json and the mesh, so that a bad mesh or batch
        split fails in seconds instead of after tokenizing a large dataset. (The build steps repeat the
        ones they rely on, for callers that build piece by piece.)"""
        self._rows_per_process_multiple()
        self._check_mesh_fits_model()
        self._lora_settings()
        if self.config.reference.mode == "host":
            from jaxdpo import reference as reference_lib
            reference_lib.check_host_memory_supported(self.mesh)

    def build_data(self):
        from transformers import AutoTokenizer

        from jaxdpo.data import load_preference_data, require_full_batch
        from jaxdpo.data.batcher import PairBatcher
        from jaxdpo.data.layouts import row_length

        cfg = self.config
        self.row_multiple = self._rows_per_process_multiple()  # config-only: before any tokenizing
        tokenizer_path = cfg.model.tokenizer or cfg.model.path
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        main = jax.process_index() == 0  # every process tokenizes; only process 0 reports and writes
        self.train_pairs, self.eval_pairs, self.data_report = load_preference_data(
            cfg.data, self.tokenizer, workdir=self.workdir if main else None, seed=cfg.seed,
            log=print if main else None)
        all_pairs = [self.train_pairs] + ([self.eval_pairs] if self.eval_pairs is not None else [])
        self.row_length = max(row_length(p, cfg.data.layout, cfg.data) for p in all_pairs)

        n_proc, proc = jax.process_count(), jax.process_index()
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        common = dict(layout=cfg.data.layout, row_length=self.row_length, process_index=proc,
                      process_count=n_proc, row_multiple=self.row_multiple, pad_id=pad_id)
        self.batcher = PairBatcher(self.train_pairs, batch_size=cfg.train.batch_size,
                                   micro_batch_size=cfg.train.micro_batch_size, seed=cfg.seed,
                                   shuffle=True, **common)
        self.eval_batcher = None
        if self.eval_pairs is not None and len(self.eval_pairs) > 0:
            self.eval_batcher = PairBatcher(self.eval_pairs, batch_size=cfg.train.eval_batch_size,
                                            micro_batch_size=cfg.train.eval_batch_size, seed=cfg.seed,
                                            shuffle=False, **common)
        require_full_batch(self.batcher)  # now, before anything is compiled or evaluated
        if cfg.train.steps > 0:
            self.total_steps = cfg.train.steps
        else:
            self.total_steps = max(1, math.ceil(cfg.train.epochs * self.batcher.steps_per_epoch))

    def _rows_per_process_multiple(self) -> int:
        """Rows (and pairs) of each process's micro-batch must split evenly over its batch shards."""
        cfg = self.config
        shards = sharding.batch_axis_size(self.mesh)
        n_proc = jax.process_count()
        if shards % n_proc:
            raise ConfigError(f"mesh: data*fsdp = {shards} must be a multiple of the number of processes ({n_proc})")
        per_process = shards // n_proc
        for key in ("micro_batch_size", "eval_batch_size"):
            pairs = getattr(cfg.train, key)
            if pairs % shards:
                raise ConfigError(
                    f"train.{key} = {pairs} pairs must be a multiple of mesh data*fsdp = {shards} "
                    f"(the batch is split over those devices)")
        if cfg.train.batch_size % cfg.train.micro_batch_size:
            raise ConfigError(
                f"train.batch_size = {cfg.train.batch_size} must be a multiple of train.micro_batch_size "
                f"= {cfg.train.micro_batch_size} (their ratio is the gradient-accumulation count)")
        return per_process

    def build_model(self, *, resuming: bool = False):
        """The policy as `graphdef`, trainable `params` and `frozen` (LoRA's base weights; else empty).

        `resuming=True` (a checkpoint will be restored into the trainable state): `params` is only
        described, as ShapeDtypeStructs carrying the shardings real params would have, and restore writes
        straight into that, so the trainable weights never exist twice. Weights are still read from
        model.path where something needs their values: LoRA's frozen base, and the initial policy a
        device/host/cached reference is made of (then kept as `initial_params` for build_reference).
        """

        cfg = self.config
        self._check_mesh_fits_model()
        self.resuming = resuming
        if self._lora_settings() is not None and cfg.reference.mode == "device":
            # Same reference (the initial policy = the base, B = 0) without copying anything.
            cfg.reference.mode = "lora_base"
        keep_initial = resuming and self._reference_needs_initial_params()
        frozen_weights = None
        with jax.set_mesh(self.mesh):
            if resuming and not keep_initial:
                model, frozen_weights = self._described_policy()
            else:
                model = self._load_weights(cfg.model.path)
                self.lora = self._add_lora(model)
        self.model_config = model.config
        self._select_attention(model)
        # Under LoRA only the adapters train (and get optimizer state); the base weights are `frozen`.
        trained = nnx.Param if self.lora is None else self.lora_param_type
        self.graphdef, params, self.frozen = nnx.split(model, trained, ...)
        if frozen_weights is not None:  # the loaded base weights in place of their description
            if jax.tree.structure(frozen_weights) != jax.tree.structure(self.frozen):
                raise AssertionError("LoRA base weights do not have the structure of the described policy's")
            self.frozen = frozen_weights
        self.initial_params = params if keep_initial else None
        self.params = self._described(params) if resuming else params
        self.num_trainable = sum(x.size for x in jax.tree.leaves(self.params))
        # every weight the forward uses (FLOPs count them all, trained or frozen)
        self.num_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))

    def _load_weights(self, path: str):
        """A Hugging Face checkpoint as a sharded Decoder: params (and so optimizer state) kept in
        model.param_dtype, every matmul computed in model.dtype (bf16 compute over fp32 master weights is
        the usual mixed precision)."""
        from jaxdpo.models import from_pretrained
        cfg = self.config
        return from_pretrained(path, dtype=DTYPES[cfg.model.dtype], param_dtype=DTYPES[cfg.model.param_dtype],
                               mesh=self.mesh, remat=cfg.model.remat)

    def _reference_needs_initial_params(self) -> bool:
        """Whether the reference is made from the initial trainable params (the weights at model.path, or
        LoRA's fresh adapters): a device/host copy of them, or the cached logprobs they give."""
        cfg = self.config
        return cfg.reference.mode in ("device", "host", "cached") and not cfg.reference.path

    def _described_policy(self):
        """(model, frozen weights): the policy with every array a ShapeDtypeStruct (nothing allocated),
        and under LoRA the base weights loaded from model.path (they stay frozen, so the checkpoint does
        not hold them); None without LoRA. Call under `jax.set_mesh`."""
        from jaxdpo.models import load_config
        from jaxdpo.models.decoder import Decoder

        cfg = self.config
        if self._lora_settings() is not None:
            base = self._load_weights(cfg.model.path)
        else:  # the module from_pretrained builds, described instead of loaded
            model_config = load_config(cfg.model.path)
            base = nnx.eval_shape(lambda: Decoder(model_config, dtype=DTYPES[cfg.model.dtype],
                                                  param_dtype=DTYPES[cfg.model.param_dtype],
                                                  remat=cfg.model.remat, rngs=nnx.Rngs(0)))
        graphdef, weights = nnx.split(base)

        def with_adapters(weights):
            model = nnx.merge(graphdef, weights)
            self.lora = self._add_lora(model)
            return model

        model = nnx.eval_shape(with_adapters, weights)  # adapters described too, weights left as they are
        return model, (weights if self.lora is not None else None)

    def _described(self, params):
        """ShapeDtypeStructs of `params` (arrays or descriptions) with shardings on this run's mesh."""
        def describe(x):
            sharding_ = x.sharding if isinstance(x, jax.Array) else NamedSharding(self.mesh, x.sharding.spec)
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding_)
        return jax.tree.map(describe, params)

    def _lora_settings(self):
        """LoRA settings when lora.rank > 0 (None otherwise), checked against the reference mode."""
        from jaxdpo.models import lora

        cfg = self.config
        settings = lora.lora_settings(cfg.lora) if "lora" in cfg else None
        if settings is None:
            if cfg.reference.mode == "lora_base":
                raise ConfigError("reference.mode = 'lora_base' needs LoRA: set lora.rank > 0 (e.g. 16), "
                                  "or choose reference.mode device | host | cached")
            return None
        if cfg.reference.path and cfg.reference.mode in ("device", "host"):
            raise ConfigError(f"reference.path = {cfg.reference.path!r} with LoRA is not supported: the LoRA "
                              f"reference is the base model (reference.mode lora_base); clear reference.path")
        return settings

    def _add_lora(self, model):
        """Fresh LoRA adapters on `model` when lora.rank > 0; returns the settings (None: LoRA off)."""
        from jaxdpo.models import lora

        settings = self._lora_settings()
        if settings is None:
            return None
        lora.add_adapters(model, settings, seed=self.config.seed)
        self.lora_param_type = lora.LoRAParam
        return settings

    def _check_mesh_fits_model(self):
        """Sharded param sizes vs mesh axes, from config.json alone: a ConfigError before loading weights."""
        from jaxdpo.models import load_config
        from jaxdpo.models.decoder import layer_param_specs, top_param_specs

        model_config = load_config(self.config.model.path)
        specs = {**top_param_specs(model_config), **layer_param_specs(model_config)}
        sharding.check_params_divisible(specs, dict(self.mesh.shape))

    def _select_attention(self, model) -> None:
        """model.attention: cuDNN's fused kernel where it expresses this run's mask, else XLA (said why)."""
        from jaxdpo.ops.attention import select_backend
        requested = self.config.model.get("attention", "xla")
        backend, why = select_backend(requested, platform=jax.devices()[0].platform, layout=self.config.data.layout,
                                      dtype=model.dtype, head_dim=model.config.head_dim,
                                      logit_softcap=model.config.attn_logit_softcap,
                                      sliding=any(model.config.layer_is_sliding))
        model.attention_backend = backend  # static: part of the graphdef every step is traced with
        if backend != requested:
            _log(f"  attention  {why}")

    def build_reference(self):
        mode = self.config.reference.mode
        # The initial policy: on a fresh run its live params; on a resume the weights build_model loaded
        # for this alone, which nothing else holds, so the reference takes them over without a copy.
        initial = getattr(self, "initial_params", None)
        self.initial_params = None
        if mode in ("device", "host"):
            # device: a frozen copy sharded like the policy; host: the same shards in pinned host
            # memory, streamed to the device one layer at a time (jaxdpo/reference.py).
            from jaxdpo import reference as reference_lib
            if mode == "host":
                reference_lib.check_host_memory_supported(self.mesh)
            if self.config.reference.path:
                with jax.set_mesh(self.mesh):
                    ref_model = self._load_weights(self.config.reference.path)
                _, ref_params, _ = nnx.split(ref_model, nnx.Param, ...)
                self.reference = ref_params if mode == "device" else reference_lib.place_reference(ref_params, mode)
            elif initial is not None:
                self.reference = initial if mode == "device" else reference_lib.place_reference(initial, mode)
            else:
                # A real copy: the policy's buffers are donated to the step and change every update.
                self.reference = reference_lib.place_reference(self.params, mode)
        elif mode == "cached":
            # Reference logprobs of every train/eval pair, loaded from disk or computed now; training
            # then holds no reference weights (batches carry ref_chosen / ref_rejected).
            from jaxdpo.reference_cache import ReferenceCache
            ref_path = self.config.reference.path or self.config.model.path
            if self.config.reference.path:
                with jax.set_mesh(self.mesh):
                    ref_model = self._load_weights(ref_path)
                _, ref_params, _ = nnx.split(ref_model, nnx.Param, ...)
            else:  # computed before the first update, so the initial policy
                ref_params = initial if initial is not None else self.params
            self.reference_cache = ReferenceCache.for_trainer(self, ref_params, weights_path=ref_path, log=_log)
            self.reference = None
        elif mode == "none":
            self.reference = None
        elif mode == "lora_base":
            self.reference = None  # the step zeroes the adapters over the shared frozen base weights
        else:
            raise ConfigError(f"reference.mode = {mode!r} is not available yet (device | host | cached | none)")

    def build_steps(self):
        cfg = self.config
        optimizer, self.schedule = make_optimizer(cfg.optim, self.total_steps)
        init = lambda p: init_state(p, optimizer)
        init_shardings = jax.tree.map(lambda _: self.replicated, jax.eval_shape(init, self.params))
        init_shardings["params"] = jax.tree.map(lambda x: x.sharding, self.params)
        init_shardings["opt_state"] = sharding.optimizer_state_shardings(optimizer, self.params, self.replicated)
        if getattr(self, "resuming", False):
            # Described only: restore_or_start reads the checkpoint into it (no fresh optimizer state).
            self.state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                      jax.eval_shape(init, self.params), init_shardings)
        else:
            self.state = self._fresh_state(init, init_shardings)
        del self.params  # now owned by self.state (donated at every step)
        shardings_of = lambda tree: jax.tree.map(lambda x: x.sharding, tree)
        self.state_shardings = shardings_of(self.state)
        self.frozen_shardings = shardings_of(self.frozen)
        self.reference_shardings = shardings_of(self.reference) if self.reference is not None else None
        rows = NamedSharding(self.mesh, sharding.logical_spec(None, "batch", None))
        pairs = NamedSharding(self.mesh, sharding.logical_spec(None, "batch"))
        self.train_batch_shardings = {k: (pairs if k in PAIR_KEYS else rows) for k in self._batch_keys()}
        eval_rows = NamedSharding(self.mesh, sharding.logical_spec("batch", None))
        eval_pairs = NamedSharding(self.mesh, sharding.logical_spec("batch"))
        self.eval_batch_shardings = {k: (eval_pairs if k in PAIR_KEYS else eval_rows) for k in self._batch_keys()}

        from jaxdpo.reference import make_step_functions  # host mode streams the reference per layer
        self.steps = make_step_functions(cfg.reference.mode, graphdef=self.graphdef, loss_cfg=cfg.loss,
                                         optimizer=optimizer, schedule=self.schedule,
                                         num_pairs=cfg.train.micro_batch_size, chunk_size=cfg.model.logprob_chunk,
                                         dropout_seed=cfg.seed)  # LoRA dropout masks: (seed, step, micro-batch)
        self.train_step = self.steps.jit_train_step(
            state_shardings=self.state_shardings, frozen_shardings=self.frozen_shardings,
            reference_shardings=self.reference_shardings, batch_shardings=self.train_batch_shardings,
            replicated=self.replicated)
        eval_steps = make_step_functions(cfg.reference.mode, graphdef=self.graphdef, loss_cfg=cfg.loss,
                                         optimizer=optimizer, schedule=self.schedule,
                                         num_pairs=cfg.train.eval_batch_size, chunk_size=cfg.model.logprob_chunk)
        self.eval_step = eval_steps.jit_eval_step(
            params_shardings=self.state_shardings["params"], frozen_shardings=self.frozen_shardings,
            reference_shardings=self.reference_shardings, batch_shardings=self.eval_batch_shardings,
            replicated=self.replicated)

    def _fresh_state(self, init, shardings):
        """The step-0 train state (params + a fresh optimizer state), built sharded; never on a resume.
        The params are donated: the state's params are the loaded buffers, not a second copy of them."""
        return jax.jit(init, out_shardings=shardings, donate_argnums=0)(self.params)

    def _batch_keys(self):
        from jaxdpo.step import ROW_KEYS
        keys = list(ROW_KEYS) + ["pair_valid"]
        if self.config.reference.mode == "cached":
            keys += ["ref_chosen", "ref_rejected"]
        return keys

    # -- batches ----------------------------------------------------------------------------------
    def _to_global(self, local: dict[str, np.ndarray], shardings: dict, pair_axis: int) -> dict:
        """Process-local numpy -> global jax arrays. Pair indices become global: this process's pairs
        sit after those of the processes before it."""
        local = dict(local)
        n_pairs_local = local["pair_valid"].shape[pair_axis]
        offset = jax.process_index() * n_pairs_local
        if offset:
            local["pair_index"] = np.where(local["pair_index"] >= 0, local["pair_index"] + offset, -1)
        out = {}
        for key, sharding_ in shardings.items():
            value = local[key]
            if jax.process_count() == 1:
                out[key] = jax.device_put(value, sharding_)
            else:
                out[key] = jax.make_array_from_process_local_data(sharding_, value)
        return out

    def train_batch(self, step: int) -> dict:
        micro = self.batcher.train_batch(step)
        if self.config.reference.mode == "cached":
            micro = [self.reference_cache.attach("train", m) for m in micro]
        stacked = _stack_micro_batches(micro)
        return self._to_global(stacked, self.train_batch_shardings, pair_axis=1)

    # -- evaluation -------------------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        if self.eval_batcher is None:
            return {}
        sums: dict[str, float] = {}
        batches = list(self.eval_batcher.eval_batches())
        for local in tqdm(batches, desc="eval", leave=False, disable=jax.process_index() != 0):
            if self.config.reference.mode == "cached":
                local = self.reference_cache.attach("eval", local)
            batch = self._to_global(local, self.eval_batch_shardings, pair_axis=0)
            out = self.eval_step(self.state["params"], self.frozen, self.reference, batch)
            for k, v in jax.device_get(out).items():
                sums[k] = sums.get(k, 0.0) + float(v)
        pairs = max(sums.pop("pairs"), 1.0)
        sums.pop("tokens", None)
        return {k: v / pairs for k, v in sums.items()}

    # -- the loop ---------------------------------------------------------------------------------
    def fingerprint(self) -> dict[str, Any]:
        """What must match for a checkpoint to be resumed by this run (mesh, steps and intervals may change)."""
        from jaxdpo.checkpoint import config_fingerprint
        from jaxdpo.data import identity
        fingerprint = config_fingerprint(self.config, model_config=self.model_config,
                                         vocab_size=self.model_config.vocab_size)
        fingerprint["train_pairs"] = len(self.train_pairs)
        fingerprint[identity.FINGERPRINT_KEY] = identity.data_identity(self.data_report)  # by content, not path
        return fingerprint

    def open_checkpoints(self) -> int | None:
        """Open WORKDIR/checkpoints; the newest committed step, or None when there is nothing to resume.
        Lists the directory only (no array is read), so the build can know whether it resumes."""
        from jaxdpo import checkpoint

        cfg = self.config
        self.checkpointer = checkpoint.Checkpointer(
            os.path.join(self.workdir, "checkpoints"), keep=cfg.train.keep_checkpoints,
            save_every=cfg.train.save_every)
        return self.checkpointer.resumable_step()

    def restore_or_start(self) -> int:
        """Resume from the newest good checkpoint in WORKDIR/checkpoints, if any; returns the start step.

        Restores into `self.state` as it is: described (build_model(resuming=True)) or built."""
        from jaxdpo import checkpoint

        if getattr(self, "checkpointer", None) is None:
            self.open_checkpoints()
        restored = self.checkpointer.restore_latest(checkpoint.abstract_like(self.state),
                                                    expected_meta_fingerprint=self.fingerprint())
        if restored is None:
            if getattr(self, "resuming", False):
                # A step was listed but none is left to restore (removed meanwhile): build what a
                # fresh run builds, after letting go of what was built for the resume.
                _log("  no checkpoint left to resume from: starting from model.path")
                self.state = self.frozen = self.reference = None
                self.build_model()
                self.build_reference()
                self.build_steps()
            self.window = MetricsWindow()
            return 0
        step, self.state, meta = restored
        self.resuming = False  # the state is real from here on
        # The logging window the checkpoint was saved in (steps since the last train record).
        self.window = MetricsWindow.from_state(meta.get(WINDOW_META_KEY))
        _log(f"  resumed    from checkpoint step {step} (data position {meta.get('data_position', step)})")
        return step

    def save(self, step: int, *, force: bool = False) -> None:
        from jaxdpo.checkpoint import FINGERPRINT_KEY
        if not force and not self.checkpointer.should_save(step):
            return  # decided before the meta: the window's state fetches its metrics from the device
        meta = {"data_position": step, FINGERPRINT_KEY: self.fingerprint(),
                # The logging window so far, so a resume logs what an uninterrupted run logs.
                WINDOW_META_KEY: self.window.state(),
                # Where tools/convert_to_hf.py finds the tokenizer (and a LoRA run's base weights).
                "model_path": os.path.abspath(self.config.model.path),
                "tokenizer_path": os.path.abspath(self.config.model.tokenizer or self.config.model.path),
                "lora": dataclasses.asdict(self.lora) if getattr(self, "lora", None) is not None else None}
        self.checkpointer.save(step, self.state, meta, force=force)

    def run(self) -> dict[str, float]:
        from jaxdpo.checkpoint import install_preemption_handler, resume_message

        cfg = self.config
        self.check_config()
        self.build_data()
        resumable = self.open_checkpoints()
        self.build_model(resuming=resumable is not None)
        self.build_reference()
        self.build_steps()
        self._banner()
        start_step = self.restore_or_start()
        self.logger = MetricsLogger(self.workdir)
        self.logger.truncate_after(start_step)  # a resumed run rewrites what came after its checkpoint
        preempted = install_preemption_handler()

        eval_metrics = {}
        if start_step == 0 and self.eval_batcher is not None:
            eval_metrics = self.evaluate()
            self.logger.write(0, {f"eval/{k}": v for k, v in eval_metrics.items()})

        t_window = time.perf_counter()
        bar = tqdm(total=self.total_steps, initial=start_step, desc="train", dynamic_ncols=True,
                   disable=jax.process_index() != 0)
        self.preempted = False
        for step in range(start_step, self.total_steps):
            batch = self.train_batch(step)
            self.state, metrics = self.train_step(self.state, self.frozen, self.reference, batch)
            self.window.add(metrics)
            done = step + 1
            if done % cfg.train.log_every == 0 or done == self.total_steps:
                record = self.window.mean()
                record.update(self.window.rates(time.perf_counter() - t_window))
                record.pop("pairs"), record.pop("tokens")
                bad = int(jax.device_get(self.state["bad_steps"]))
                if bad >= cfg.train.max_bad_steps:
                    self.checkpointer.close()
                    raise RuntimeError(
                        f"{bad} consecutive steps had a non-finite loss or gradient (last at step {done}); "
                        f"none of them was applied and the last good checkpoint is intact in "
                        f"{self.checkpointer.directory}. Lower optim.lr or check the data.")
                self.logger.write(done, {f"train/{k}": v for k, v in record.items()})
                bar.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record['rewards/accuracies']:.2f}",
                                pairs_s=f"{record['pairs_per_s']:.1f}")
                self.window, t_window = MetricsWindow(), time.perf_counter()
            bar.update(1)
            if self.eval_batcher is not None and (done % cfg.train.eval_every == 0 or done == self.total_steps):
                eval_metrics = self.evaluate()
                self.logger.write(done, {f"eval/{k}": v for k, v in eval_metrics.items()})
                bar.write(f"step {done}: eval loss {eval_metrics['loss']:.4f} "
                          f"accuracy {eval_metrics['rewards/accuracies']:.3f} "
                          f"margin {eval_metrics['rewards/margins']:.3f}")
            self.save(done, force=done == self.total_steps)
            if done < self.total_steps and preempted(done):
                self.save(done, force=True)
                self.checkpointer.close()
                bar.close()
                _log(resume_message(self.workdir))
                preempted.restore_signal_handlers()
                self.preempted = True
                return eval_metrics
        bar.close()
        self.checkpointer.close()
        preempted.restore_signal_handlers()
        self.export()
        self.logger.close()
        self._summary(eval_metrics)
        return eval_metrics

    def export(self):
        if not self.config.train.export_hf:
            return
        from jaxdpo.models import save_pretrained
        model = nnx.merge(self.graphdef, self.state["params"], self.frozen)
        if getattr(self, "lora", None) is not None:
            # The adapter in PEFT format always; the merged model (W + scale A B) only on request.
            from jaxdpo.models import lora
            self.adapter_dir = os.path.join(self.workdir, "hf_adapter")
            lora.save_adapter(model, self.lora, self.adapter_dir, base_model=os.path.abspath(self.config.model.path),
                              tokenizer=self.tokenizer)
            if not self.config.lora.export_merged:
                return
            model = lora.merge_adapters(model, self.lora)
        self.hf_dir = os.path.join(self.workdir, "hf")
        save_pretrained(model, self.hf_dir, tokenizer=self.tokenizer)

    def _banner(self):
        cfg = self.config
        accumulation = cfg.train.batch_size // cfg.train.micro_batch_size
        _log("\n".join([
            "jaxdpo",
            f"  model      {cfg.model.path}  ({self.num_params / 1e6:.2f}M params, {cfg.model.param_dtype})"
            + (f", LoRA r={self.lora.rank} alpha={self.lora.alpha:g} on {','.join(self.lora.targets)}: "
               f"{self.num_trainable / 1e6:.3f}M trained" if self.lora is not None else ""),
            f"  devices    {jax.device_count()} x {jax.devices()[0].platform}, {jax.process_count()} process(es), "
            f"mesh {dict(self.mesh.shape)}",
            f"  data       {len(self.train_pairs)} train pairs, "
            f"{len(self.eval_pairs) if self.eval_pairs is not None else 0} eval pairs, layout {cfg.data.layout}, "
            f"rows of {self.row_length} tokens",
            f"  batch      {cfg.train.batch_size} pairs/step = {accumulation} x {cfg.train.micro_batch_size}, "
            f"{self.total_steps} steps",
            f"  loss       {', '.join(cfg.loss.types)} (beta {cfg.loss.beta}), reference {cfg.reference.mode}",
            f"  outputs    {os.path.abspath(self.workdir)}",
        ]))

    def _summary(self, eval_metrics):
        lines = ["done."]
        if eval_metrics:
            lines.append("  final eval: " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(eval_metrics.items())))
        lines.append(f"  metrics    {os.path.abspath(self.logger.path)}")
        lines.append(f"  checkpoint {self.checkpointer.directory} (rerun the same command to resume or extend)")
        if getattr(self, "hf_dir", None):
            lines.append(f"  HF export  {os.path.abspath(self.hf_dir)}")
        _log("\n".join(lines))


def _stack_micro_batches(micro_batches: list[dict]) -> dict[str, np.ndarray]:
    """[A] dicts -> one dict of [A, ...] arrays; rows are padded to the longest micro-batch (packed
    layouts may need different row counts) with rows that count for no pair."""
    max_rows = max(m["input_ids"].shape[0] for m in micro_batches)
    out = {}
    for key in micro_batches[0]:
        parts = []
        for m in micro_batches:
            value = m[key]
            if key not in PAIR_KEYS and value.shape[0] < max_rows:
                fill = -1 if key == "pair_index" else 0
                pad = np.full((max_rows - value.shape[0],) + value.shape[1:], fill, value.dtype)
                value = np.concatenate([value, pad])
            parts.append(value)
        out[key] = np.stack(parts)
    return out
