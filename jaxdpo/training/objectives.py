"""What a training run optimizes: the one choice `objective` in the config, behind one small interface the
train and eval steps call (jaxdpo/training/step.py), so that one loop trains every objective.

  preference    the policy's completion logprobs under the `loss` section (DPO and its family, KTO)
  reward_model  a scorer: the decoder plus a score head read at the last token of each completion,
                trained on the same pairs with TRL's RewardTrainer loss (jaxdpo/models/reward_model.py)

An objective, as the steps see it:
  make_values(graphdef, num_pairs) -> values(params, frozen, reference_params, micro, lora_dropout_key=None)
      the per-example values of a micro-batch (dict of [P] arrays)
  loss(values, valid) -> (loss sum, metric sums) over the valid examples
  example_count(arrays) -> what the loss is a mean over (valid pairs; for groups their counted pairs),
      reading pair_valid and `count_keys`
  metric_means(metric sums, count) -> the logged metrics
  batch_level: whether the loss couples the examples of a batch (the step then takes two passes)
  example_keys: the data's per-example arrays the steps read (layouts.EXAMPLE_KEYS)
  value_keys: the per-example values an eval keeps to compute its metrics over every eval example

The run-level questions (which model class trains, whether a reference model is needed, the checks) are
answered by `objective_kind(config)`: the only place objective names are compared.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxdpo.data.examples import ExampleKind
from jaxdpo.data.layouts import EXAMPLE_KEYS, KIND_KEYS
from jaxdpo.errors import ConfigError
from jaxdpo.judging import judges
from jaxdpo.models import reward_model
from jaxdpo.preference import losses
from jaxdpo.training.step import make_pair_values


class PreferenceObjective:
    """The policy's slot logprob sums (and the reference's) under `loss_cfg` (jaxdpo.preference.losses), for
    pairs, unpaired rows and groups (`losses.example_kind`)."""

    value_keys = ("pc", "pr", "nc", "nr", "rc", "rr", "logps", "lengths", "ref_logps") + EXAMPLE_KEYS

    def __init__(self, loss_cfg, *, reference, chunk_size: int):
        self.loss_cfg, self.reference, self.chunk_size = loss_cfg, reference, chunk_size
        self.batch_level = losses.is_batch_level(loss_cfg)
        self.kind = losses.example_kind(loss_cfg)
        self.count_keys = KIND_KEYS[self.kind]  # what example_count reads besides pair_valid
        self.example_keys = self.count_keys

    def make_values(self, graphdef, *, num_pairs: int) -> Callable:
        return make_pair_values(graphdef, reference=self.reference, num_pairs=num_pairs, chunk_size=self.chunk_size,
                                kind=self.kind)

    def loss(self, values: dict, valid):
        return losses.example_loss(self.loss_cfg, values, valid)

    def example_count(self, batch: dict):
        return losses.example_count(self.loss_cfg, batch)

    def metric_means(self, metric_sums: dict, count) -> dict:
        return losses.metric_means(self.loss_cfg, metric_sums, count)


class RewardObjective:
    """TRL 1.16 RewardTrainer's loss on a scorer's rewards r (one per completion, read where
    transformers' *ForSequenceClassification reads it):
        -logsigmoid(r_chosen - r_rejected - margin) + center_rewards_coefficient * (r_chosen + r_rejected)^2
    averaged over the pairs; `margin` is the batch's per-pair margin (the data's margin column; 0 without one,
and where a batch has no `margin` array). Metrics
    as TRL names them: accuracy (r_chosen > r_rejected), margin (r_chosen - r_rejected), mean_reward."""

    batch_level = False
    value_keys = ("reward_chosen", "reward_rejected", "margin")
    count_keys = ()
    example_keys = ("margin",)

    def __init__(self, *, center_rewards_coefficient: float, score_pad_id: int | None):
        self.center = float(center_rewards_coefficient)
        self.score_pad_id = score_pad_id

    def make_values(self, graphdef, *, num_pairs: int) -> Callable:
        def values(params, frozen, reference_params, micro, lora_dropout_key=None):
            del reference_params  # a reward model has no reference
            chosen, rejected = reward_model.pair_rewards(graphdef, (params, frozen), micro, num_pairs=num_pairs,
                                                         score_pad_id=self.score_pad_id,
                                                         lora_dropout_key=lora_dropout_key)
            margin = micro["margin"] if "margin" in micro else jnp.zeros_like(chosen)
            return {"reward_chosen": chosen, "reward_rejected": rejected, "margin": margin}

        return values

    def loss(self, values: dict, valid):
        valid = jnp.asarray(valid, jnp.float32)
        chosen, rejected = values["reward_chosen"], values["reward_rejected"]
        per_pair = -jax.nn.log_sigmoid(chosen - rejected - values["margin"])
        if self.center:
            per_pair = per_pair + self.center * jnp.square(chosen + rejected)
        total = lambda x: jnp.sum(jnp.where(valid > 0, x, 0.0))  # noqa: E731
        metric_sums = {"loss": total(per_pair), "accuracy": total((chosen > rejected) * 1.0),
                       "margin": total(chosen - rejected), "rewards/chosen": total(chosen),
                       "rewards/rejected": total(rejected), "mean_reward": total((chosen + rejected) / 2)}
        return metric_sums["loss"], metric_sums

    def example_count(self, batch: dict):
        return jnp.sum(jnp.asarray(batch["pair_valid"])).astype(jnp.float32)

    def metric_means(self, metric_sums: dict, count) -> dict:
        return {k: v / count for k, v in metric_sums.items()}


# ----- the run-level choice --------------------------------------------------------------------------

class PreferenceKind:
    """objective = "preference": the policy is a causal LM; the loss section decides the reference."""

    name = "preference"
    trains_scorer = False

    @staticmethod
    def describe(config) -> str:
        return f"loss       {', '.join(config.loss.types)} (beta {config.loss.beta})"

    @staticmethod
    def needs_reference(config) -> bool:
        return losses.needs_reference(config.loss)

    @staticmethod
    def check_config(config, *, has_reference: bool) -> None:
        losses.validate_loss_config(config.loss, has_reference=has_reference)

    @staticmethod
    def make(config, *, reference, tokenizer) -> PreferenceObjective:
        del tokenizer
        return PreferenceObjective(config.loss, reference=reference, chunk_size=config.model.logprob_chunk)


class RewardModelKind:
    """objective = "reward_model": a scorer (decoder + score head), no reference, no sampling."""

    name = "reward_model"
    trains_scorer = True

    @staticmethod
    def describe(config) -> str:
        return (f"objective  reward model: -logsigmoid(r_chosen - r_rejected - margin), center_rewards_coefficient "
                f"{config.reward_model.center_rewards_coefficient:g}")

    @staticmethod
    def needs_reference(config) -> bool:
        del config
        return False

    @staticmethod
    def check_config(config, *, has_reference: bool) -> None:
        del has_reference
        coefficient = config.reward_model.center_rewards_coefficient
        if isinstance(coefficient, bool) or not isinstance(coefficient, (int, float)) or coefficient < 0:
            raise ConfigError(f"reward_model.center_rewards_coefficient = {coefficient!r} must be a number >= 0 "
                              f"(0 = off; TRL suggests 0.01)")
        if config.mesh.sequence != 1:
            raise ConfigError("objective = 'reward_model' reads whole rows: set mesh.sequence = 1")
        if config.data.layout not in ("padded", "prefix_shared"):
            raise ConfigError(f"objective = 'reward_model' takes data.layout padded or prefix_shared, not "
                              f"{config.data.layout!r}")
        if config.train.sample_every or judges.is_configured(config) or config.online.rounds:
            raise ConfigError("objective = 'reward_model' trains a scorer, which does not generate: set "
                              "train.sample_every = 0, online.rounds = 0 and no judge")
        if config.lora.rank and config.lora.base_dtype != "none":
            raise ConfigError(f"objective = 'reward_model' trains LoRA over a float base: set lora.base_dtype = "
                              f"'none' (it is {config.lora.base_dtype!r})")
        if losses.example_kind(config.loss) is not ExampleKind.PAIR:
            raise ConfigError(f"objective = 'reward_model' trains on preference pairs, but loss.types = "
                              f"{tuple(config.loss.types)} reads unpaired rows: leave loss.types at its default")

    @staticmethod
    def make(config, *, reference, tokenizer) -> RewardObjective:
        del reference
        return RewardObjective(center_rewards_coefficient=config.reward_model.center_rewards_coefficient,
                               score_pad_id=reward_model.score_pad_id(tokenizer))


KINDS = {kind.name: kind for kind in (PreferenceKind, RewardModelKind)}


def objective_kind(config):
    """The run's objective kind (config.objective, checked against KINDS by config.py's CHOICES)."""
    return KINDS[config.objective]
