"""Conservative DPO: sigmoid DPO with label smoothing (preferences assumed flipped with prob. eps)."""

from configs import dpo


def get_config():
    c = dpo.get_config()
    c.loss.label_smoothing = 0.1
    return c
