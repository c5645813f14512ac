"""The training loop, as one function: `train_and_evaluate(config)` is the program behind
`python -m jaxdpo.train`.

`start_run` builds everything once into a `RunContext` (jaxdpo/training/build.py holds the builders) and
restores or starts the state; then per step: batch -> train step -> log -> eval -> samples -> save ->
preemption check; then export. The checkpoint directory is looked at before the policy is built, so that a
run that will resume never builds the trainable state it is about to restore.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any

import jax
from absl import logging as absl_logging
from flax import nnx
from tqdm.auto import tqdm

from jaxdpo.checkpoint import manager as checkpoint
from jaxdpo.checkpoint.fingerprint import (
    FINGERPRINT_KEY,
    SETTINGS_KEY,
    adjustable_settings,
    config_fingerprint,
    setting_changes,
)
from jaxdpo.data import identity
from jaxdpo.errors import ConfigError
from jaxdpo.models import hub
from jaxdpo.models import lora as lora_lib
from jaxdpo.models import save_pretrained
from jaxdpo.models.reward_model import save_scorer
from jaxdpo.parallel.distributed import barrier
from jaxdpo.sampling import samples
from jaxdpo.training import batches, build, faults, objectives, trackers
from jaxdpo.training.divergence import BadStepWatch
from jaxdpo.training.metrics import WINDOW_META_KEY, MetricsLogger, MetricsWindow
from jaxdpo.training.preemption import PreemptionFlag, install_preemption_handler, resume_message


@dataclasses.dataclass(frozen=True)
class RunContext:
    """What a run builds once and every step reads; the loop passes it to its helpers."""
    config: Any
    mesh: Any
    data: build.Data
    policy: build.Policy
    reference: Any  # jaxdpo.preference.reference.Reference
    steps: build.Steps
    checkpoints: checkpoint.Checkpointer
    logger: MetricsLogger
    fingerprint: dict[str, Any]
    sample_watch: samples.Watch
    bad_steps: BadStepWatch
    preempted: PreemptionFlag


@dataclasses.dataclass(frozen=True)
class Run:
    """What a finished (or preempted) run built and ended with."""
    config: Any
    mesh: Any
    data: build.Data
    policy: build.Policy
    reference: Any
    steps: build.Steps
    state: dict
    eval_metrics: dict
    preempted: bool


def train_and_evaluate(config, *, devices=None, start: build.Start | None = None) -> Run:
    """`start`: the policy (and steps to reuse) from memory instead of model.path's weights."""
    ctx, state, start_step, window = start_run(config, devices, start=start)
    eval_metrics = evaluate_and_sample(ctx, state, 0) if start_step == 0 else {}
    total = ctx.data.total_steps
    bar = tqdm(total=total, initial=start_step, desc="train", dynamic_ncols=True,
               disable=jax.process_index() != 0)
    t_window = time.perf_counter()
    for step in range(start_step, total):
        batch = batches.train_batch(ctx.data.batcher, ctx.reference, step, ctx.steps.train_batch_shardings)
        state, metrics = ctx.steps.train_step(state, ctx.policy.frozen, ctx.reference.params, batch)
        done = step + 1
        if ctx.bad_steps.limit_reached(done, metrics.pop("bad_steps"), last=done == total):
            bar.close()
            stop_diverged(ctx, done, state, window)
        window.add(metrics)
        if done % config.train.log_every == 0 or done == total:
            log_train_window(ctx, bar, window, done, t_window)
            window, t_window = MetricsWindow(), time.perf_counter()
        bar.update(1)
        if ctx.data.eval_batcher is not None and (done % config.train.eval_every == 0 or done == total):
            eval_metrics = evaluate_with_win_rate(ctx, state)
            log_eval(ctx, bar, done, eval_metrics)
        ctx.sample_watch.write_samples(done, state["params"], ctx.logger)
        save(ctx, done, state, window, force=done == total)
        if done < total and ctx.preempted(done):
            bar.close()
            stop_preempted(ctx, done, state, window)
            return ended(ctx, state, eval_metrics, preempted=True)
    bar.close()
    ctx.checkpoints.close()
    ctx.preempted.restore_signal_handlers()
    exported = export(config, ctx.policy, state, ctx.data.tokenizer)
    for name, path in exported.items():
        ctx.logger.write_output(name, path)
    _summary(ctx, eval_metrics, exported)
    ctx.logger.close()
    return ended(ctx, state, eval_metrics, preempted=False)


def start_run(config, devices=None, *, start: build.Start | None = None):
    """(context, state, start step, logging window): everything built once, the state restored or fresh.
    `start`: the policy and steps held in memory (build.Start), used instead of building them."""
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every save; the console is the bar's
    build.prepare_workdir(config.workdir)  # a file or a read-only path: one line before anything is built
    mesh = build.make_mesh(config, devices)
    build.check_config(config, mesh)  # seconds, before any tokenizing
    data = build.build_data(config, mesh)
    checkpoints = checkpoint.Checkpointer(os.path.join(config.workdir, "checkpoints"),
                                          keep=config.train.keep_checkpoints, save_every=config.train.save_every)
    resuming = checkpoints.resumable_step() is not None  # a directory listing: no array is read
    policy, reference, steps, state = build_pieces(config, mesh, data, resuming=resuming, start=start)
    _banner(config, mesh, data, policy, reference)
    policy, reference, steps, state, start_step, window = restore_or_start(
        config, mesh, data, checkpoints, (policy, reference, steps, state), resuming=resuming, start=start)
    logger = MetricsLogger(config.workdir, trackers=functools.partial(trackers.from_config, config))
    logger.truncate_after(start_step)  # a resumed run rewrites what came after its checkpoint
    if start_step:
        log_setting_changes(config, logger, start_step, checkpoints.read_meta(start_step))
    ctx = RunContext(
        config=config, mesh=mesh, data=data, policy=policy, reference=reference, steps=steps,
        checkpoints=checkpoints, logger=logger, fingerprint=run_fingerprint(config, policy, reference, data),
        sample_watch=samples.Watch.build(config, mesh, data, policy, reference, start_step=start_step),
        bad_steps=BadStepWatch(config.train.max_bad_steps), preempted=install_preemption_handler())
    return ctx, state, start_step, window


def ended(ctx: RunContext, state, eval_metrics: dict, *, preempted: bool) -> Run:
    return Run(ctx.config, ctx.mesh, ctx.data, ctx.policy, ctx.reference, ctx.steps, state, eval_metrics,
               preempted=preempted)


def evaluate_with_win_rate(ctx: RunContext, state) -> dict[str, float]:
    """The eval metrics, plus the judged win rate when a judge is configured."""
    return evaluate(ctx.steps, state, ctx.policy, ctx.reference, ctx.data) | ctx.sample_watch.win_rate(state["params"])


def evaluate_and_sample(ctx: RunContext, state, step: int) -> dict:
    """The step-0 eval (with the judged win rate) and samples, logged."""
    eval_metrics = {}
    if ctx.data.eval_batcher is not None:
        eval_metrics = evaluate_with_win_rate(ctx, state)
        ctx.logger.write(step, {f"eval/{k}": v for k, v in eval_metrics.items()})
    ctx.sample_watch.write_samples(step, state["params"], ctx.logger)
    return eval_metrics


def stop_preempted(ctx: RunContext, done: int, state, window) -> None:
    """Save the state at `done` (off schedule), wait for it to commit, and say how to resume."""
    save(ctx, done, state, window, force=True)
    ctx.checkpoints.close()
    build.log(resume_message(ctx.config.workdir))
    ctx.preempted.restore_signal_handlers()


def stop_diverged(ctx: RunContext, done: int, state, window) -> None:
    """Save the newest state (bad steps were never applied to it, so it is the newest good one) unless that
    step is on disk already, then stop the run with the watch's one-line message."""
    ctx.preempted.restore_signal_handlers()
    save(ctx, done, state, window, force=True)
    ctx.checkpoints.close()
    raise ctx.bad_steps.stop(ctx.checkpoints.latest_step(), ctx.checkpoints.directory)


def build_pieces(config, mesh, data, *, resuming: bool, start: build.Start | None = None):
    """(policy, reference, steps, state): the trainable state only described when `resuming`; the policy and
    steps taken from `start` when given."""
    if start is None:
        policy = build.build_policy(config, mesh, resuming=resuming)
    else:
        policy = start.policy_for(config, resuming=resuming)
    reference = build.build_reference(config, mesh, policy, data)
    steps = build.steps_for(config, mesh, policy, reference, data, earlier=start.steps if start else None)
    state = build.train_state(policy, steps, resuming=resuming)
    return policy, reference, steps, state


def restore_or_start(config, mesh, data, checkpoints, pieces, *, resuming: bool, start: build.Start | None = None):
    """Resume from the newest good checkpoint, if any, into the state as it is (described or built):
    (policy, reference, steps, state, start step, logging window)."""
    policy, reference, steps, state = pieces
    restored = checkpoints.restore_latest(checkpoint.abstract_like(state),
                                          expected_meta_fingerprint=run_fingerprint(config, policy, reference, data))
    if restored is None:
        if resuming:
            # A step was listed but none is left to restore (removed meanwhile): build what a fresh run
            # builds, after letting go of what was built for the resume.
            build.log("  no checkpoint left to resume from: starting from model.path")
            del pieces, policy, reference, steps, state
            policy, reference, steps, state = build_pieces(config, mesh, data, resuming=False, start=start)
        return policy, reference, steps, state, 0, MetricsWindow()
    step, state, meta = restored
    build.log(f"  resumed    from checkpoint step {step} (data position {meta.get('data_position', step)})")
    # The logging window the checkpoint was saved in (steps since the last train record).
    return policy, reference, steps, state, step, MetricsWindow.from_state(meta.get(WINDOW_META_KEY))


def run_fingerprint(config, policy, reference, data) -> dict[str, Any]:
    """What must match for a checkpoint to be resumed by this run (mesh, steps and intervals may change).
    The reference is the kind the run built (LoRA with reference.mode device builds lora_base)."""
    fingerprint = config_fingerprint(config, model_config=policy.model_config,
                                     vocab_size=policy.model_config.vocab_size,
                                     overrides={"reference.mode": reference.mode})
    fingerprint["train_pairs"] = len(data.train_pairs)
    fingerprint[identity.FINGERPRINT_KEY] = identity.data_identity(data.report)  # by content, not path
    return fingerprint


def evaluate(steps, state, policy, reference, data) -> dict[str, float]:
    """Mean of every eval metric over the eval pairs (steps.eval_metrics, from every pair's logprobs)."""
    outputs = []
    eval_batches = batches.eval_batches(data.eval_batcher, reference, steps.eval_batch_shardings)
    for batch in tqdm(eval_batches, total=data.eval_batcher.num_eval_batches(), desc="eval", leave=False,
                      disable=jax.process_index() != 0):
        outputs.append(jax.device_get(steps.eval_step(state["params"], policy.frozen, reference.params, batch)))
    return steps.eval_metrics(outputs)


def log_train_window(ctx: RunContext, bar, window, done: int, started: float) -> None:
    """The train record of the logging window that began at perf_counter() `started` and ends at `done`.
    The rates' clock stops after the window's values are fetched, i.e. after its steps really ran
    (dispatch is asynchronous: stopping it earlier would count only the time to enqueue them)."""
    record = window.mean()
    record.update(window.rates(time.perf_counter() - started))
    record.pop("pairs"), record.pop("tokens")
    ctx.logger.write(done, {f"train/{k}": v for k, v in record.items()})
    # accuracy for pairs (a reward model's as TRL names it), KTO's KL for unpaired rows
    shown = (("acc", "rewards/accuracies"), ("acc", "accuracy"), ("kl", "kl"))
    bar.set_postfix(loss=f"{record['loss']:.4f}", **{k: f"{record[m]:.2f}" for k, m in shown if m in record},
                    pairs_s=f"{record['pairs_per_s']:.1f}")


def log_eval(ctx: RunContext, bar, done: int, eval_metrics: dict) -> None:
    ctx.logger.write(done, {f"eval/{k}": v for k, v in eval_metrics.items()})
    # unpaired eval rows have an accuracy only where they came from pairs
    shown = (("accuracy", "rewards/accuracies"), ("accuracy", "accuracy"), ("margin", "rewards/margins"),
             ("margin", "margin"), ("kl", "kl"))
    bar.write(f"step {done}: eval loss {eval_metrics['loss']:.4f} "
              + " ".join(f"{name} {eval_metrics[key]:.3f}" for name, key in shown if key in eval_metrics))


def log_setting_changes(config, logger, step: int, meta: dict) -> None:
    """Keys that change only the future (fingerprint.RESUME_ADJUSTABLE_KEYS) may change on resume: one line
    each, and a record of the new values in metrics.jsonl at the step the run resumes from."""
    changes = setting_changes(meta.get(SETTINGS_KEY), adjustable_settings(config))
    for key, (before, now) in changes.items():
        build.log(f"  changed    {key}: {before} -> {now} (from step {step} on)")
    if changes:
        logger.write(step, {f"resume/{key}": now for key, (_, now) in changes.items()})


def save(ctx: RunContext, step: int, state, window, *, force: bool = False) -> None:
    """Checkpoint `step` when it is on the save schedule or `force`d (decided before the meta is built: the
    window's state fetches its metrics from the device)."""
    if force or ctx.checkpoints.should_save(step):
        ctx.checkpoints.save(step, state, checkpoint_meta(ctx, step, window), force=force)
    faults.reached(os.path.join(ctx.checkpoints.directory, str(step)), before_kill=ctx.checkpoints.wait)


def checkpoint_meta(ctx: RunContext, step: int, window) -> dict[str, Any]:
    config = ctx.config
    return {"data_position": step, FINGERPRINT_KEY: ctx.fingerprint, SETTINGS_KEY: adjustable_settings(config),
            # The logging window so far, so a resume logs what an uninterrupted run logs.
            WINDOW_META_KEY: window.state(),
            # Where tools/convert_to_hf.py finds the tokenizer (and a LoRA run's base weights).
            "model_path": os.path.abspath(config.model.path),
            "tokenizer_path": os.path.abspath(config.model.tokenizer or config.model.path),
            "lora": dataclasses.asdict(ctx.policy.lora) if ctx.policy.lora is not None else None,
            "lora_rounds_in_base": ctx.policy.rounds_in_base,
            # The hub repos and commits the paths came from, with their files: a resume trains from them.
            hub.META_KEY: hub.sources(config)}


def export(config, policy, state, tokenizer) -> dict[str, str]:
    """The trained policy as a HF directory; under LoRA the PEFT adapter always, the merged model (W + scale
    A B) only on request. Returns {"hf": dir, "adapter": dir} for what was written, once every process may
    read it (process 0 writes; an on-policy round loads it next on every host)."""
    if not config.train.export_hf:
        return {}
    try:
        written = _write_exports(config, policy, state, tokenizer)
    except OSError as error:  # a full disk or quota: the checkpoints are committed by now, say so in one line
        raise ConfigError(f"could not write the export in {os.path.abspath(config.workdir)} "
                          f"({error.strerror or error}); the run's checkpoints are complete. Free space there, "
                          f"then export the newest with `python tools/convert_to_hf.py "
                          f"{os.path.join(config.workdir, 'checkpoints')} OUT_DIR`") from None
    barrier("export")
    return written


def _write_exports(config, policy, state, tokenizer) -> dict[str, str]:
    dirs, written = build.export_dirs(config.workdir), {}
    model = nnx.merge(policy.graphdef, state["params"], policy.frozen)
    if objectives.objective_kind(config).trains_scorer:  # one *ForSequenceClassification dir, adapters merged
        save_scorer(model, dirs["hf"], tokenizer, lora=policy.lora)
        return {"hf": dirs["hf"]}
    if policy.lora is not None:
        lora_lib.save_adapter(model, policy.lora, dirs["adapter"], base_model=os.path.abspath(config.model.path),
                              tokenizer=tokenizer)
        written["adapter"] = dirs["adapter"]
        if not config.lora.export_merged:
            return written
        model = lora_lib.merge_adapters(model, policy.lora)
        if policy.lora.base_dtype != "none":
            build.log(f"  export     the merged model is W + scale A B over the {policy.lora.base_dtype}-dequantized base "
                      f"W (what training saw), not over the original {config.model.param_dtype} weights")
    save_pretrained(model, dirs["hf"], tokenizer=tokenizer)
    written["hf"] = dirs["hf"]
    return written


def _banner(config, mesh, data, policy, reference) -> None:
    cfg, settings = config, policy.lora
    accumulation = cfg.train.batch_size // cfg.train.micro_batch_size
    build.log("\n".join([
        "jaxdpo",
        f"  model      {hub.describe(cfg.model.path)}  ({policy.num_params / 1e6:.2f}M params, {cfg.model.param_dtype})"
        + (f", LoRA r={settings.rank} alpha={settings.alpha:g} on {','.join(settings.targets)}: "
           f"{policy.num_trainable / 1e6:.3f}M trained" if settings is not None else "")
        + (f", frozen base stored {settings.base_dtype}" if settings is not None and settings.base_dtype != "none"
           else ""),
        f"  devices    {jax.device_count()} x {jax.devices()[0].platform}, {jax.process_count()} process(es), "
        f"mesh {dict(mesh.shape)}",
        f"  data       {len(data.train_pairs)} train pairs, "
        f"{len(data.eval_pairs) if data.eval_pairs is not None else 0} eval pairs, layout {cfg.data.layout}, "
        f"rows of {data.row_length} tokens",
        f"  batch      {cfg.train.batch_size} pairs/step = {accumulation} x {cfg.train.micro_batch_size}, "
        f"{data.total_steps} steps",
        f"  {objectives.objective_kind(cfg).describe(cfg)}, reference {reference.mode}",
        f"  outputs    {os.path.abspath(cfg.workdir)}",
    ]))


def _summary(ctx: RunContext, eval_metrics, exported) -> None:
    logger, checkpoints = ctx.logger, ctx.checkpoints
    lines = ["done."]
    if eval_metrics:
        lines.append("  final eval: " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(eval_metrics.items())))
    lines.append(f"  metrics    {os.path.abspath(logger.path)}")
    lines.append(f"  tensorboard {os.path.join(os.path.dirname(os.path.abspath(logger.path)), 'tensorboard')}")
    lines.append(f"  checkpoint {checkpoints.directory} (rerun the same command to resume or extend)")
    samples_file = os.path.join(ctx.config.workdir, samples.SAMPLES_FILE)
    if os.path.exists(samples_file):
        lines.append(f"  samples    {os.path.abspath(samples_file)}")
    if "adapter" in exported:
        lines.append(f"  adapter    {os.path.abspath(exported['adapter'])} (PEFT LoRA adapter)")
    if "hf" in exported:
        lines.append(f"  HF export  {os.path.abspath(exported['hf'])}")
    lines.extend(f"  {where}" for where in logger.tracker_runs())
    build.log("\n".join(lines))
