"""A reward model trained on the bundled demo pairs (TRL 1.16 RewardTrainer's loss): the demo's causal LM gets
a new score head (said in one line), the decoder and head train on -logsigmoid(r_chosen - r_rejected), and
the run exports WORKDIR/hf, a *ForSequenceClassification dir that transformers and judge.reward_model load.

    python -m jaxdpo.train --config=configs/reward_model.py --config.workdir=/tmp/rm
"""

from configs import dpo


def get_config():
    c = dpo.get_config()
    c.workdir = "runs/reward_model"
    c.objective = "reward_model"
    c.reward_model.center_rewards_coefficient = 0.0
    c.reference.mode = "none"  # a reward model compares no reference
    c.optim.lr = 1e-3
    c.train.steps = 500  # 4 epochs of the 4000 demo pairs (the choice: DEVELOPING.md, Measurements)
    c.train.eval_every = 100
    return c
