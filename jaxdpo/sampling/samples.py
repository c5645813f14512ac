"""What the policy writes during training, next to the reference, and how a judge ranks the two.

Two things the training loop asks of a `Watch` (jaxdpo/training/loop.py calls it at two points):
- `write_samples(step, params, logger)`: at every `train.sample_every`-th step (0 = off, and then nothing
  is built, loaded or compiled), completions of the first `train.sample_prompts` distinct held-out eval
  prompts by the policy and by the reference, side by side, to WORKDIR/samples.jsonl and tensorboard
  text. Each completion carries its summed logprob under both models and its implicit DPO reward
  beta * (logp_policy - logp_reference).
- `win_rate(params)`: when a judge is configured (jaxdpo.judging.judges picks it from the `judge` section),
  at every eval, the first `judge.prompts` distinct held-out prompts are completed by the policy and judged
  against the reference's completions: `win_rate` (ties count a half), its 95% Wilson interval and each
  side's mean judge score (the loop logs them as eval/...).

The reference's completions are drawn once, stored in WORKDIR/samples_reference.jsonl (with the prompts
and settings they were drawn for, so a resume reads them back and a changed config redraws them). The
two sides draw with different seeds derived from `sampling.seed` (`side_seed`), so the win rate of the
initial policy against itself is an honest ~0.5 rather than an exact tie of identical texts; every draw
is a pure function of (seed, side, prompt index, token step), the same after a resume.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from jaxdpo.data.layouts import pad_id_of
from jaxdpo.errors import ConfigError
from jaxdpo.judging import judges
from jaxdpo.judging.win_rate import win_rate
from jaxdpo.parallel import distributed
from jaxdpo.sampling import generate, text
from jaxdpo.sampling import prompts as prompts_lib

SAMPLES_FILE = "samples.jsonl"
REFERENCE_FILE = "samples_reference.jsonl"
SIDES = {"policy": 0x5011C7, "reference": 0x12EF}


def side_seed(seed: int, side: str) -> int:
    """The sampling seed of one side ("policy" / "reference"), a pure function of (seed, side)."""
    return int(np.random.SeedSequence([seed, SIDES[side]]).generate_state(1)[0])


def sampling_settings(section, *, seed: int) -> generate.SamplingSettings:
    """SamplingSettings from a config section holding max_new_tokens, temperature, top_k, top_p."""
    return generate.SamplingSettings(max_new_tokens=int(section.max_new_tokens), temperature=float(section.temperature),
                                     top_k=int(section.top_k), top_p=float(section.top_p), seed=seed)


def check_config(config) -> None:
    """The `sampling` section and train.sample_*: ConfigError in one line (the `judge` section is
    jaxdpo.judging.judges.check_config's)."""
    sampling_settings(config.sampling, seed=int(config.sampling.seed))  # ranges of every setting
    for key in ("train.sample_every", "train.sample_prompts", "sampling.batch_size"):
        section, name = key.split(".")
        value = config[section][name]
        if not isinstance(value, int) or value < (0 if key == "train.sample_every" else 1):
            raise ConfigError(f"{key} = {value!r} must be {'>= 0' if key == 'train.sample_every' else 'positive'}")


@dataclasses.dataclass(frozen=True)
class Sampler:
    """Draws and scores completions with one graphdef under any params, on the run's mesh. Prompts too long
    for the model's positions are cut as data.truncation says, in one line saying how many."""

    graphdef: object
    tokenizer: object
    mesh: object
    eos_ids: tuple[int, ...]
    batch_size: int
    room: prompts_lib.PromptRoom
    _told: set = dataclasses.field(default_factory=set, compare=False, repr=False)  # cut counts reported

    @classmethod
    def for_model(cls, graphdef, model_config, *, tokenizer, mesh, model_dir: str, data_cfg, batch_size: int):
        """The sampler of one model: its EOS ids (model_dir's configs and the tokenizer's), its positions."""
        return cls(graphdef, tokenizer, mesh, tuple(text.stop_ids(tokenizer, model_config, model_dir)),
                   batch_size, prompts_lib.PromptRoom(model_config.max_position, data_cfg.truncation))

    @property
    def pad_id(self) -> int:
        return pad_id_of(self.tokenizer)

    def complete(self, states, prompts, settings) -> list[dict]:
        """One completion per prompt: dicts with prompt_ids, completion, completion_ids, finished."""
        encoded = text.encode_prompts(self.tokenizer, prompts, self.room, settings.max_new_tokens)
        self._tell_cut(encoded.cut, len(prompts), settings.max_new_tokens)
        with jax.set_mesh(self.mesh):  # fewer prompts than a batch: one batch of them, not padded to batch_size
            rows = text.completions_with_logprobs(self.graphdef, states, self.tokenizer, encoded.ids, settings,
                                                      eos_ids=self.eos_ids,
                                                      batch_size=min(self.batch_size, len(prompts)))
        return [{k: row[k] for k in ("prompt_ids", "completion", "completion_ids", "finished")} for row in rows]

    def _tell_cut(self, cut: int, total: int, max_new_tokens: int) -> None:
        """One line when prompts were cut (once per count: held-out prompts are sampled at every eval)."""
        if cut and (cut, total) not in self._told:
            self._told.add((cut, total))
            if jax.process_index() == 0:
                tqdm.write(f"  {cut} of {total} prompts cut ({self.room.truncation}) to leave max_new_tokens = "
                           f"{max_new_tokens} of the model's {self.room.positions} positions")

    def logprobs(self, states, rows) -> np.ndarray:
        """[n] summed logprob of each row's completion_ids after its prompt_ids, under `states` (the
        training forward, so both models score every completion the same way)."""
        with jax.set_mesh(self.mesh):
            return np.asarray(generate.completion_logprobs(
                self.graphdef, states, [r["prompt_ids"] for r in rows], [r["completion_ids"] for r in rows],
                pad_id=self.pad_id), np.float64)


def reference_states(config, mesh, policy, reference, params):
    """The reference as states for `nnx.merge(policy.graphdef, *states)`: under LoRA the adapters off (every
    LoRA reference is the base model), else the reference's own device copy when it keeps one, else its
    weights loaded once more (reference.path, or model.path: the initial policy)."""
    if policy.lora is not None:
        return (jax.tree.map(jnp.zeros_like, params), policy.frozen)
    if reference.runs_forward and not reference.streams_layers and reference.params is not None:
        return (reference.params, policy.frozen)
    from jaxdpo.training.build import load_weights

    with jax.set_mesh(mesh):
        model = load_weights(config, config.reference.path or config.model.path, mesh)
    _, weights, rest = nnx.split(model, nnx.Param, ...)
    return (weights, rest)


class Watch:
    """Samples and win rate of one run; see the module docstring. Built with nothing to do when
    train.sample_every = 0 and no judge is set (its methods then return at once)."""

    def __init__(self, *, config, mesh, policy, reference, tokenizer, heldout, judge):
        self.config, self.mesh, self.policy, self.reference = config, mesh, policy, reference
        self.every = int(config.train.sample_every)
        self.judge = judge
        self.heldout = heldout  # the held-out prompts, as the data holds them
        self.sampler = None if not heldout else Sampler.for_model(
            policy.graphdef, policy.model_config, tokenizer=tokenizer, mesh=mesh, model_dir=config.model.path,
            data_cfg=config.data, batch_size=int(config.sampling.batch_size))
        self._reference_states = None
        self._reference_rows = None

    @classmethod
    def build(cls, config, mesh, data, policy, reference, *, start_step: int) -> "Watch":
        """The run's watch; reads the held-out prompts only when sampling or a judge is on. A resumed run
        drops the samples.jsonl records written after its checkpoint."""
        judge = judges.make_judge(config, mesh)
        counts = ([config.train.sample_prompts] if config.train.sample_every else []) + (
            [config.judge.prompts] if judge is not None else [])
        if not counts:
            return cls(config=config, mesh=mesh, policy=policy, reference=reference, tokenizer=data.tokenizer,
                       heldout=[], judge=None)
        if data.eval_pairs is None or not len(data.eval_pairs):
            raise ConfigError("train.sample_every and the judge's win rate complete held-out eval prompts; set "
                              "data.eval_files or data.eval_fraction")
        heldout = prompts_lib.heldout_prompts(config, list(data.eval_pairs.source), max(counts))
        truncate_samples(config.workdir, start_step)
        return cls(config=config, mesh=mesh, policy=policy, reference=reference, tokenizer=data.tokenizer,
                   heldout=heldout, judge=judge)

    def _states(self, params):
        return (params, self.policy.frozen)

    def _reference(self, params):
        if self._reference_states is None:
            self._reference_states = reference_states(self.config, self.mesh, self.policy, self.reference, params)
        return self._reference_states

    def reference_rows(self, params) -> list[dict]:
        """The reference's completions of every held-out prompt: read back, or drawn once and stored."""
        if self._reference_rows is None:
            settings = sampling_settings(self.config.sampling, seed=side_seed(self.config.sampling.seed, "reference"))
            key = {"prompts": self.heldout, "settings": dataclasses.asdict(settings),
                   "reference": self.config.reference.path or self.config.model.path}
            path = os.path.join(self.config.workdir, REFERENCE_FILE)
            rows = read_reference_rows(path, key)
            if rows is None:
                rows = self.sampler.complete(self._reference(params), self.heldout, settings)
                write_reference_rows(path, key, rows)
            self._reference_rows = rows
        return self._reference_rows

    def policy_rows(self, params, n: int) -> list[dict]:
        settings = sampling_settings(self.config.sampling, seed=side_seed(self.config.sampling.seed, "policy"))
        return self.sampler.complete(self._states(params), self.heldout[:n], settings)

    def win_rate(self, params) -> dict[str, float]:
        """{win_rate, win_rate_low, win_rate_high, judge_score_policy, judge_score_reference} of the policy
        against the reference on judge.prompts held-out prompts; {} without a judge."""
        if self.judge is None:
            return {}
        n = min(self.config.judge.prompts, len(self.heldout))
        policy = [r["completion"] for r in self.policy_rows(params, n)]
        reference = [r["completion"] for r in self.reference_rows(params)[:n]]
        prompts = self.heldout[:n]
        result = win_rate(self.judge.score(prompts, policy), self.judge.score(prompts, reference))
        if jax.process_index() == 0:
            tqdm.write(f"  win rate {result.win_rate:.3f} [{result.low:.3f}, {result.high:.3f}] over {n} held-out "
                       f"prompts (judge score: policy {result.policy_score:.3f}, reference {result.reference_score:.3f})")
        return result.metrics(prefix="")

    def write_samples(self, step: int, params, logger) -> None:
        """At every train.sample_every-th step: policy and reference completions side by side."""
        if not self.every or step % self.every:
            return
        n = min(self.config.train.sample_prompts, len(self.heldout))
        sides = {"policy": self.policy_rows(params, n),
                 "reference": [dict(r) for r in self.reference_rows(params)[:n]]}
        for rows in sides.values():  # both models score both sides with the same (training) forward
            lp_policy = self.sampler.logprobs(self._states(params), rows)
            lp_reference = self.sampler.logprobs(self._reference(params), rows)
            for row, a, b in zip(rows, lp_policy, lp_reference):
                row.update(logp_policy=float(a), logp_reference=float(b),
                           reward=float(self.config.loss.beta * (a - b)))
        records = [sample_record(step, i, self.heldout[i], sides["policy"][i], sides["reference"][i])
                   for i in range(n)]
        if logger.enabled:
            with open(os.path.join(self.config.workdir, SAMPLES_FILE), "a", encoding="utf-8") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
            logger.write_text(step, "samples", samples_markdown(records))
            logger.write_table(step, "samples", records)


def sample_record(step: int, index: int, prompt, policy: dict, reference: dict) -> dict:
    side = lambda row: {k: row[k] for k in ("completion", "logp_policy", "logp_reference", "reward", "finished")}  # noqa: E731
    return {"step": int(step), "prompt_index": index, "prompt": prompt, "policy": side(policy),
            "reference": side(reference)}


def samples_markdown(records: list[dict]) -> str:
    """One markdown table per step for tensorboard's text tab."""
    lines = ["| prompt | policy | reference |", "|---|---|---|"]
    cell = lambda value: str(value).replace("|", "\\|").replace("\n", "<br>")  # noqa: E731
    for r in records:
        prompt = r["prompt"] if isinstance(r["prompt"], str) else r["prompt"][-1]["content"]
        described = [f"{cell(r[s]['completion'])}<br>*logp policy {r[s]['logp_policy']:.2f}, reference "
                     f"{r[s]['logp_reference']:.2f}, reward {r[s]['reward']:+.3f}*" for s in ("policy", "reference")]
        lines.append(f"| {cell(prompt)} | {described[0]} | {described[1]} |")
    return "\n".join(lines)


def read_reference_rows(path: str, key: dict) -> list[dict] | None:
    """The stored reference completions, or None when absent, unreadable or drawn for another key on any
    process (every process calls it; on None all of them draw the completions again, together)."""
    rows = _stored_rows(path, key)
    return rows if distributed.all_processes_agree(rows is not None) else None


def _stored_rows(path: str, key: dict) -> list[dict] | None:
    """What this process reads from `path`, or None."""
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            header, *rows = [json.loads(line) for line in f if line.strip()]
    except (ValueError, OSError):
        return None
    return rows if header == json.loads(json.dumps(key)) and len(rows) == len(key["prompts"]) else None


def write_reference_rows(path: str, key: dict, rows: list[dict]) -> None:
    """Header line (the key) then one row per prompt (every process calls it: distributed.write_jsonl)."""
    distributed.write_jsonl(path, [key] + rows)


def truncate_samples(workdir: str, step: int) -> None:
    """Keep samples.jsonl records with step <= `step` (a resumed run rewrites what came after)."""
    path = os.path.join(workdir, SAMPLES_FILE)
    if jax.process_index() != 0 or not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        kept = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(kept)
