"""On-policy DPO: rounds of sample -> judge -> pairs -> train, wrapped around the training loop.

`run_online(config)` runs `online.rounds` rounds. Round r (from 0), all under WORKDIR/rounds/:
  1. `r.jsonl` (the round's pairs, a data file) is the round's source of truth. When it is missing:
     `online.prompts_per_round` prompts of `online.prompts` (`round_prompt_indices`), each completed
     `online.samples_per_prompt` (k) times by the round's starting policy, judged, and made into rows as
     `online.pairs` says: best_worst pairs the best completion with the worst (`pairs.form_pairs`; ties give
     no pair and are counted), all_pairs writes every pair of different scores, group writes each prompt's
     completions as one group with their scores (for loss.group). Every completion and score goes to
     `r.samples.jsonl`, the rows to `r.jsonl`; each file is written whole, then renamed.
  2. Training: `loop.train_and_evaluate` (the same builders and loop as offline DPO) on `round_config`:
     workdir `rounds/r/`, data.train_files `rounds/r.jsonl`, train.* as configured (steps or epochs per
     round), its policy taken from memory (`build.Start`, see 3). Its checkpoints make a stopped round
     resume exactly.
  3. The round's policy stays on the mesh (jaxdpo/online/policy.py): sampling uses its params in place with
     one jitted Sampler over the training graphdef, and the next round starts from what this one ended
     with (LoRA: the adapters folded into the base in memory, fresh adapters on it; a quantized base is
     dequantized, folded and quantized again). Rounds 1 on reuse round 0's jitted train step
     (`build.steps_for`: same schedule length and reference kind), so nothing is traced or compiled again
     while shapes stay the same. online.reference = previous: each round's reference is its starting policy
     (under LoRA with reference.mode = device the folded base with the adapters off, no copy; else a copy
     the round's training makes before its first update); initial: model.path's weights, which each round's
     training reads. `rounds/r.done` marks the
     round finished; only the last round exports the policy, to `rounds/r/hf` (`final_policy`).
  4. The round's policy against the initial policy on `online.eval_prompts` (`judge.prompts` of them,
     sampled with `sampling.*`): eval/win_rate and its interval in WORKDIR/metrics.jsonl (step = rounds
     done; step 0 is the initial policy against itself), with the round's pair counts, mean score and
     where its time went (online/seconds_sample, _judge, _train, _other; jaxdpo/online/phases.py); both
     sides' completions and scores in r.eval.jsonl (initial.eval.jsonl for step 0).

Exact resume: every draw is a pure function of (seed, round, index): the round's prompts, the sampling
keys (seed derived from (seed, round), keyed by the row's index) and tie-breaking in form_pairs. A rerun
rebuilds the policy the finished rounds ended with from model.path and their final checkpoints (the same
jitted fold, in the same order, on the same shardings: `policy.rebuild`), reads an existing r.jsonl instead
of sampling again, and resumes the round's training from its checkpoint, so a run killed anywhere ends
bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import os

import numpy as np

from jaxdpo.checkpoint.fingerprint import fingerprint_differences, jsonable
from jaxdpo.data.identity import files_identity
from jaxdpo.data.loading import is_hub_name, parse_sources, resolve_paths
from jaxdpo.errors import ConfigError
from jaxdpo.judging import failures, greedy, judges
from jaxdpo.judging.pairs import form_pairs, pair_rows
from jaxdpo.judging.win_rate import win_rate
from jaxdpo.online import policy as held_policy
from jaxdpo.online.phases import PhaseClock, phases_text
from jaxdpo.parallel import distributed
from jaxdpo.parallel.distributed import (
    write_jsonl,  # process 0 writes, every host reads
)
from jaxdpo.sampling import prompts as prompts_lib
from jaxdpo.sampling import samples
from jaxdpo.training import build, faults, trackers
from jaxdpo.training.loop import train_and_evaluate
from jaxdpo.training.metrics import MetricsLogger

REFERENCES = ("previous", "initial")
# What a round trains on: its prompts' best against worst completion, every pair of different scores, or
# each prompt's judged completions as one group with their scores (a group loss, loss.group).
PAIRINGS = ("best_worst", "all_pairs", "group")
# What shapes the rounds already written: a rerun with any of these changed would mix two runs' rounds.
ROUND_KEYS = ("seed", "model.path", "online.prompts", "online.prompts_per_round", "online.samples_per_prompt",
              "online.max_new_tokens", "online.temperature", "online.top_k", "online.top_p", "online.reference",
              "online.pairs",
              *judges.SELECTOR_KEYS, "lora", "loss", "optim", "train.batch_size", "train.steps", "train.epochs")


def check_config(config, *, lora_on: bool) -> None:
    """The `online` section: ConfigError in one line."""
    o = config.online
    if not isinstance(o.rounds, int) or o.rounds < 0:
        raise ConfigError(f"online.rounds = {o.rounds!r} must be an integer >= 0 (0 = offline DPO)")
    if not o.rounds:
        return
    if not judges.is_configured(config):
        raise ConfigError(f"online.rounds > 0 needs a judge to rank the samples: set {judges.usage()}")
    if not o.prompts:
        raise ConfigError("online.rounds > 0 needs online.prompts: files of prompts, as data.train_files")
    if not isinstance(o.samples_per_prompt, int) or o.samples_per_prompt < 2:
        raise ConfigError(f"online.samples_per_prompt = {o.samples_per_prompt!r} must be >= 2 (a pair is the best "
                          f"and the worst of them)")
    if not isinstance(o.prompts_per_round, int) or o.prompts_per_round < 1:
        raise ConfigError(f"online.prompts_per_round = {o.prompts_per_round!r} must be positive")
    if o.pairs not in PAIRINGS:
        raise ConfigError(f"online.pairs = {o.pairs!r} is not one of {', '.join(PAIRINGS)}")
    if o.pairs == "group" and not config.loss.group:
        raise ConfigError("online.pairs = group writes each round's rows as groups with scores, which a group loss "
                          "trains on: set loss.group = all_pairs or plackett_luce")
    if o.reference not in REFERENCES:
        raise ConfigError(f"online.reference = {o.reference!r} is not one of {', '.join(REFERENCES)}")
    if o.reference == "initial" and lora_on:
        raise ConfigError("online.reference = 'initial' with LoRA: each round trains fresh adapters on the previous "
                          "round's merged policy, so its reference is that policy; use online.reference = "
                          "'previous', or lora.rank = 0")
    if config.reference.path:
        raise ConfigError(f"reference.path = {config.reference.path!r} is set in an online run; its reference is "
                          f"online.reference (previous or initial): clear reference.path")
    samples.sampling_settings(o, seed=0)  # the generation settings' ranges


def round_prompt_indices(num_prompts: int, per_round: int, *, seed: int, round_index: int) -> np.ndarray:
    """Which prompts round r completes: positions [r*n, (r+1)*n) of the prompts visited epoch by epoch, each
    epoch in its own seeded order; a pure function of (seed, round)."""
    start, stop = round_index * per_round, (round_index + 1) * per_round
    epochs = range(start // num_prompts, (stop - 1) // num_prompts + 1)
    order = np.concatenate([np.random.default_rng([seed, 0x0A11, e]).permutation(num_prompts) for e in epochs])
    offset = epochs[0] * num_prompts
    return order[start - offset:stop - offset]


def round_seed(seed: int, round_index: int) -> int:
    """The sampling seed of round r (draws are further keyed by the row's index and token step)."""
    return int(np.random.SeedSequence([seed, 0x50, round_index]).generate_state(1)[0])


def rounds_dir(config) -> str:
    return os.path.join(config.workdir, "rounds")


def round_config(config, round_index: int):
    """The config of round r's training run: the run's own, on the round's pairs. Its policy comes from
    memory (online.policy.HeldPolicy.start); model.path still names the architecture and tokenizer."""
    c = copy.deepcopy(config)
    c.workdir = os.path.join(rounds_dir(config), str(round_index))
    c.data.train_files = os.path.join(rounds_dir(config), f"{round_index}.jsonl")
    c.data.eval_files, c.data.eval_fraction = "", 0.0
    c.train.export_hf = False  # the rounds export the final policy once, at the end
    c.train.sample_every = 0  # the rounds' files show every sample; the win rate is measured per round
    judges.clear_judge(c)  # the rounds do the judging; a round's training computes no win rate
    c.online.rounds = 0
    if config.online.reference == "initial":
        c.reference.path = config.model.path
    return c


# ----- files ---------------------------------------------------------------------------------------------

def everywhere(path: str) -> bool:
    """Whether every process sees `path`: a decision that starts collective work must be the same on all."""
    return distributed.all_processes_agree(os.path.exists(path))


def read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def rounds_fingerprint(config, num_prompts: int) -> dict:
    fingerprint = {}
    for key in ROUND_KEYS:
        section, _, name = key.partition(".")
        fingerprint[key] = jsonable(config[section][name] if name else config[section])
    fingerprint["model.path"] = os.path.abspath(config.model.path)
    fingerprint["prompts"] = {"count": num_prompts, "files": [
        f["sha256"] for s in parse_sources(config.online.prompts, config_key="online.prompts")
        if not is_hub_name(s.spec) for f in files_identity(resolve_paths(s.spec))]}
    return fingerprint


def check_rounds_fingerprint(config, num_prompts: int) -> None:
    """WORKDIR/rounds/online.json records what shaped the rounds; a rerun must match it (online.rounds,
    cadences and the eval settings may change)."""
    path = os.path.join(rounds_dir(config), "online.json")
    now = rounds_fingerprint(config, num_prompts)
    if everywhere(path):
        with open(path) as f:
            saved = json.load(f)
        differences = fingerprint_differences(saved, now)
        if differences:
            raise ConfigError(f"{path} was written by a run with other settings ({'; '.join(differences)}); use "
                              f"a new workdir or the same settings")
    else:
        os.makedirs(rounds_dir(config), exist_ok=True)
        write_jsonl(path, [now])


# ----- one round -----------------------------------------------------------------------------------------

def nonblank(text: str) -> bool:
    return bool(text.strip())


def every_pair_rows(prompts: list, completions: list[list[str]], scores: np.ndarray) -> list[dict]:
    """Every pair (i, k) of a prompt's non-blank, scored completions with score i > score k, as pair rows."""
    rows = []
    for p, (texts, row) in enumerate(zip(completions, scores)):
        usable = [i for i, text in enumerate(texts) if nonblank(text) and not np.isnan(row[i])]
        rows += [{"prompt": prompts[p], "chosen": texts[i], "rejected": texts[k], "chosen_score": float(row[i]),
                  "rejected_score": float(row[k]), "prompt_index": p}
                 for i in usable for k in usable if row[i] > row[k]]
    return rows


def group_rows(prompts: list, completions: list[list[str]], scores: np.ndarray) -> list[dict]:
    """Each prompt's non-blank, scored completions as one group row with their scores; prompts left with
    fewer than two, or with one score for all, give none (they carry no preference)."""
    rows = []
    for p, (texts, row) in enumerate(zip(completions, scores)):
        usable = [i for i, text in enumerate(texts) if nonblank(text) and not np.isnan(row[i])]
        if len(usable) >= 2 and len({float(row[i]) for i in usable}) > 1:
            rows.append({"prompt": prompts[p], "completions": [texts[i] for i in usable],
                         "scores": [float(row[i]) for i in usable], "prompt_index": p})
    return rows


def round_rows(config, round_index: int, prompts: list, completions: list[list[str]], scores: np.ndarray):
    """The round's training rows as online.pairs says (best_worst: a pair with a blank completion is left out,
    as the data loader refuses it)."""
    pairing = config.online.pairs
    if pairing == "all_pairs":
        return every_pair_rows(prompts, completions, scores)
    if pairing == "group":
        return group_rows(prompts, completions, scores)
    pairs = form_pairs(scores, seed=config.seed, round_index=round_index)
    return [row for row in pair_rows(prompts, completions, scores, pairs)
            if nonblank(row["chosen"]) and nonblank(row["rejected"])]


def sample_round(config, round_index: int, prompts: list, judge, sampler, states, clock: PhaseClock) -> None:
    """Round r's completions, scores and training rows -> rounds/r.samples.jsonl (every completion) and
    rounds/r.jsonl (the rows of online.pairs: pairs, or groups with scores)."""
    o, k = config.online, config.online.samples_per_prompt
    indices = round_prompt_indices(len(prompts), o.prompts_per_round, seed=config.seed, round_index=round_index)
    chosen = [prompts[i] for i in indices]
    expanded = [p for p in chosen for _ in range(k)]
    with clock.phase("sample"):
        rows = sampler.complete(states, expanded, samples.sampling_settings(o, seed=round_seed(config.seed, round_index)))
    texts = [r["completion"] for r in rows]
    with clock.phase("judge"):
        scores = judge.score(expanded, texts).reshape(len(chosen), k)  # NaN: a sample the judge failed on
    failures.require_scored(scores.ravel(), judge.name, f"round {round_index}")
    completions = [texts[i * k:(i + 1) * k] for i in range(len(chosen))]
    kept = round_rows(config, round_index, chosen, completions, scores)
    for row in kept:
        row["prompt_index"] = int(indices[row["prompt_index"]])  # the prompt's row in online.prompts
    audit = [{"prompt_index": int(i), "prompt": p, "completions": c,
              "scores": [None if np.isnan(x) else float(x) for x in s],
              "finished": [r["finished"] for r in rows[j * k:(j + 1) * k]]}
             for j, (i, p, c, s) in enumerate(zip(indices, chosen, completions, scores))]
    os.makedirs(rounds_dir(config), exist_ok=True)
    write_jsonl(os.path.join(rounds_dir(config), f"{round_index}.samples.jsonl"), audit)
    pairs_path = os.path.join(rounds_dir(config), f"{round_index}.jsonl")
    faults.reached(pairs_path)
    write_jsonl(pairs_path, kept)


def round_summary(config, round_index: int) -> dict[str, float]:
    """Counts of a round from its files: training rows (pairs, or groups), ties (best == worst), prompts left
    out for blank completions, samples the judge failed on (null scores) and the prompts they left with fewer than two
    scored completions, and the mean judge score of the scored samples."""
    audit = read_jsonl(os.path.join(rounds_dir(config), f"{round_index}.samples.jsonl"))
    rows = read_jsonl(os.path.join(rounds_dir(config), f"{round_index}.jsonl"))
    trained = len({row["prompt_index"] for row in rows})  # prompts with rows (all_pairs writes several each)
    scores = np.asarray([[np.nan if x is None else x for x in row["scores"]] for row in audit], np.float64)
    scored = ~np.isnan(scores)
    unscored = int(np.sum(scored.sum(axis=1) < 2))
    best, worst = np.where(scored, scores, -np.inf).max(axis=1), np.where(scored, scores, np.inf).min(axis=1)
    ties = int(np.sum((scored.sum(axis=1) >= 2) & (best == worst)))
    return {"online/pairs": len(rows), "online/ties": ties, "online/blank": len(audit) - ties - unscored - trained,
            "online/judge_failed": int(np.sum(~scored)), "online/unscored_prompts": unscored,
            "online/score_mean": float(scores[scored].mean())}


def done_path(config, round_index: int) -> str:
    return os.path.join(rounds_dir(config), f"{round_index}.done")


def finished_rounds(config) -> list[dict]:
    """The done markers of rounds 0, 1, ... up to the first unfinished one (as every process sees them)."""
    return done_markers(rounds_dir(config), exists=everywhere)


def done_markers(rounds: str, *, exists=os.path.exists) -> list[dict]:
    done = []
    while exists(os.path.join(rounds, f"{len(done)}.done")):
        with open(os.path.join(rounds, f"{len(done)}.done")) as f:
            done.append(json.load(f))
    return done


def export_dir(rounds: str, round_index: int) -> str:
    """Where the policy a run ended with is exported: under the round that ended it."""
    return os.path.join(rounds, str(round_index), "hf")


def final_policy(workdir: str) -> str | None:
    """The policy an on-policy run in `workdir` ended with (the export of its newest finished round that
    wrote one: the last round of a run), or None when `workdir` holds none."""
    rounds = os.path.join(workdir, "rounds")
    exported = [export_dir(rounds, r) for r in range(len(done_markers(rounds)))]
    return next((path for path in reversed(exported) if os.path.isdir(path)), None)


# ----- win rate against the initial policy ---------------------------------------------------------------

def win_rate_against_initial(config, sampler, judge, eval_prompts: list, policy_states, *, initial_states,
                             name: str, clock: PhaseClock) -> dict[str, float]:
    """eval/* win rate of the policy in `policy_states` against model.path's on the held-out prompts (sampling.*
    settings; the initial policy's completions drawn once, from the states `initial_states()` gives, and stored
    in rounds/eval_reference.jsonl). Both sides' completions and scores go to rounds/<name>.eval.jsonl."""
    if not eval_prompts:
        return {}
    settings = samples.sampling_settings(config.sampling, seed=samples.side_seed(config.sampling.seed, "reference"))
    key = {"prompts": eval_prompts, "settings": dataclasses.asdict(settings), "reference": config.model.path}
    path = os.path.join(rounds_dir(config), "eval_reference.jsonl")
    reference = samples.read_reference_rows(path, key)
    if reference is None:
        states = initial_states()
        with clock.phase("sample"):
            reference = sampler.complete(states, eval_prompts, settings)
        samples.write_reference_rows(path, key, reference)
    policy_settings = samples.sampling_settings(config.sampling, seed=samples.side_seed(config.sampling.seed, "policy"))
    with clock.phase("sample"):
        policy = sampler.complete(policy_states, eval_prompts, policy_settings)
    with clock.phase("judge"):
        policy_scores = judge.score(eval_prompts, [r["completion"] for r in policy])
        reference_scores = judge.score(eval_prompts, [r["completion"] for r in reference])
    write_jsonl(os.path.join(rounds_dir(config), f"{name}.eval.jsonl"), [
        {"prompt": p, "policy": a["completion"], "policy_score": float(x), "reference": b["completion"],
         "reference_score": float(y)} for p, a, b, x, y in zip(eval_prompts, policy, reference, policy_scores,
                                                                reference_scores)])
    return win_rate(policy_scores, reference_scores).metrics(prefix="eval/")


def held_out_record(config, sampler, judge, eval_prompts: list, policy_states, *, initial_states, name: str,
                    clock: PhaseClock) -> dict[str, float]:
    """The win rate against the initial policy and, with judge.correct_score set, eval/greedy_correct (the
    greedy answers in rounds/<name>.greedy.jsonl)."""
    record = win_rate_against_initial(config, sampler, judge, eval_prompts, policy_states,
                                      initial_states=initial_states, name=name, clock=clock)
    if eval_prompts and greedy.is_measured(config):
        record |= greedy.greedy_correct(config, judge, eval_prompts, sampler, policy_states, clock,
                                        os.path.join(rounds_dir(config), f"{name}.greedy.jsonl"))
    return record


# ----- the rounds ----------------------------------------------------------------------------------------

def run_online(config):
    """online.rounds rounds (see the module docstring); returns the last round's loop.Run (None when every
    round was already finished or none trained). Stops after a round's training was preempted."""
    from transformers import AutoTokenizer

    mesh = build.make_mesh(config)
    tokenizer = AutoTokenizer.from_pretrained(config.model.tokenizer or config.model.path)
    prompts, eval_prompts = round_prompts(config)
    check_rounds_fingerprint(config, len(prompts))
    judge = judges.make_judge(config, mesh)
    # the rounds' records (and their samples, as tables) go to W&B / MLflow too; each round's training logs
    # to runs of its own, under rounds/N
    logger = MetricsLogger(config.workdir, trackers=functools.partial(trackers.from_config, config))
    done = finished_rounds(config)
    build.log(f"on-policy DPO: {config.online.rounds} rounds of {config.online.prompts_per_round} prompts x "
              f"{config.online.samples_per_prompt} samples (of {len(prompts)} prompts), judge {judge.name}, "
              f"{len(eval_prompts)} held-out prompts; {len(done)} round(s) already done")
    logger.truncate_after(len(done) if done else -1)  # a rerun rewrites what came after its last round
    if len(done) >= config.online.rounds:
        logger.close()
        return None
    held = held_policy.rebuild(config, mesh, rounds_dir(config), done)
    sampler = policy_sampler(config, held.policy, tokenizer, mesh)
    evaluate = functools.partial(held_out_record, config, sampler, judge, eval_prompts)
    if not done and eval_prompts:
        logger.write(0, evaluate(held.states(), initial_states=held.states, name="initial", clock=PhaseClock()))
    # the initial policy again only where its held-out completions must be drawn anew (changed sampling.*)
    initial_states = lambda: held_policy.initial(config, mesh).states()  # noqa: E731
    steps, last_run = None, None
    for r in range(len(done), config.online.rounds):
        clock = PhaseClock()
        if not everywhere(os.path.join(rounds_dir(config), f"{r}.jsonl")):
            sample_round(config, r, prompts, judge, sampler, held.states(), clock)
        summary = round_summary(config, r)
        trained = summary["online/pairs"] >= config.train.batch_size
        if trained:
            with clock.phase("train"):
                last_run = train_and_evaluate(round_config(config, r), start=held.start(steps))
            if last_run.preempted:
                break
            held, steps = held_policy.after_round(held, last_run.state["params"]), last_run.steps
        else:
            build.log(f"round {r}: {summary['online/pairs']} pairs < train.batch_size = "
                      f"{config.train.batch_size}: the policy is kept as it was")
        done.append({"trained": trained, **summary})
        record = summary | evaluate(held.states(), initial_states=initial_states, name=str(r), clock=clock)
        if r == config.online.rounds - 1 and any(marker["trained"] for marker in done):
            held_policy.export(held, export_dir(rounds_dir(config), r), tokenizer)
            distributed.barrier("export")  # every process may read it once the run returns
        finish_round(config, logger, r, record | clock.record(), done[-1])
    logger.close()
    return last_run


def round_prompts(config) -> tuple[list, list]:
    """online.prompts, and the first judge.prompts distinct online.eval_prompts (none when unset)."""
    prompts = prompts_lib.read_prompts(config.online.prompts, config.data, config_key="online.prompts")
    if not config.online.eval_prompts:
        return prompts, []
    return prompts, prompts_lib.read_prompts(config.online.eval_prompts, config.data, config_key="online.eval_prompts",
                                             distinct=True)[:config.judge.prompts]


def policy_sampler(config, policy: build.Policy, tokenizer, mesh) -> samples.Sampler:
    """The rounds' one Sampler: the training graphdef, so every round's params sample through one jit."""
    return samples.Sampler.for_model(policy.graphdef, policy.model_config, tokenizer=tokenizer, mesh=mesh,
                                     model_dir=config.model.path, data_cfg=config.data,
                                     batch_size=int(config.sampling.batch_size))


def finish_round(config, logger, round_index: int, record: dict, marker: dict) -> None:
    """Round r's record and samples to the metrics, its done marker, its line."""
    logger.write(round_index + 1, record)
    logger.write_table(round_index + 1, "rounds/samples", round_table(config, round_index))
    write_jsonl(done_path(config, round_index), [marker])  # one JSON line, read back by finished_rounds
    build.log(f"{round_line(round_index, record)} ({phases_text(record)})")


def round_table(config, round_index: int) -> list[dict]:
    """Round r's judged samples, one row per completion, for the trackers' tables."""
    audit = read_jsonl(os.path.join(rounds_dir(config), f"{round_index}.samples.jsonl"))
    return [{"round": round_index, "prompt_index": row["prompt_index"], "prompt": json.dumps(row["prompt"]),
             "completion": completion, "score": score}
            for row in audit for completion, score in zip(row["completions"], row["scores"])]


def round_line(round_index: int, record: dict) -> str:
    line = (f"round {round_index}: {record['online/pairs']} pairs, {record['online/ties']} ties, mean judge score "
            f"{record['online/score_mean']:.3f}")
    if record.get("online/judge_failed"):
        line += (f", {record['online/judge_failed']} samples skipped (the judge failed on them; "
                 f"{record['online/unscored_prompts']} prompts left without a pair)")
    if "eval/win_rate" in record:
        line += (f"; win rate vs initial {record['eval/win_rate']:.3f} [{record['eval/win_rate_low']:.3f}, "
                 f"{record['eval/win_rate_high']:.3f}]")
    return line
