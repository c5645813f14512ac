"""The reward-model judge kind: `judge.reward_model` names a Hugging Face `*ForSequenceClassification`
checkpoint directory, scored by `jaxdpo.models.reward_model.RewardModel` (jaxdpo's decoder plus the
checkpoint's `score` head, sharded on the run's mesh like the policy)."""

from __future__ import annotations

from jaxdpo.errors import ConfigError


class RewardModelJudge:
    """Checks the reward model's keys and loads it; the judge it builds is a `RewardModel`."""

    selector = "reward_model"
    settings = {"reward_model": ("", "an HF *ForSequenceClassification checkpoint directory (or hub name)"),
                "batch_size": (8, "reward model: rows per forward"),
                "max_length": (0, "reward model: tokens read per row; 0 = its max_position_embeddings")}
    keys = tuple(settings)
    usage = "judge.reward_model (a *ForSequenceClassification checkpoint dir)"

    @classmethod
    def check_config(cls, config) -> None:
        from jaxdpo.models.hf_io import check_checkpoint_dir

        judge = config.judge
        check_checkpoint_dir(judge.reward_model, "judge.reward_model")
        if isinstance(judge.batch_size, bool) or not isinstance(judge.batch_size, int) or judge.batch_size < 1:
            raise ConfigError(f"judge.batch_size = {judge.batch_size!r} must be a positive integer (reward model "
                              f"rows per forward)")
        if isinstance(judge.max_length, bool) or not isinstance(judge.max_length, int) or judge.max_length < 0:
            raise ConfigError(f"judge.max_length = {judge.max_length!r} must be an integer >= 0 (0 = the reward "
                              f"model's max_position_embeddings)")

    @classmethod
    def from_config(cls, config, mesh):
        """The reward model on `mesh`, computing in model.dtype (the policy's)."""
        from jaxdpo.models.reward_model import RewardModel
        from jaxdpo.models.config import DTYPES

        return RewardModel(config.judge.reward_model, dtype=DTYPES[config.model.dtype], mesh=mesh,
                           batch_size=int(config.judge.batch_size), max_length=int(config.judge.max_length) or None)
