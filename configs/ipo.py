"""IPO (Azar et al.): squared loss on the length-averaged log-ratio margin, target 1/(2*beta)."""

from configs import dpo


def get_config():
    c = dpo.get_config()
    c.loss.types = ("ipo",)
    c.loss.beta = 0.1
    return c
