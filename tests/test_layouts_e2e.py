"""The same tiny training gives the same losses whichever layout carries the pairs (issue 7)."""

import jax
import numpy as np
import pytest

from jaxdpo.metrics import read_metrics
from jaxdpo.trainer import Trainer
from tests.tiny_assets import make_run_assets, tiny_run_config


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_run_assets(str(tmp_path_factory.mktemp("assets")))


def run(assets, workdir, **overrides):
    cfg = tiny_run_config(assets, str(workdir), **{"train.eval_every": 3, "train.export_hf": False, **overrides})
    trainer = Trainer(cfg, devices=jax.devices()[:2])
    trainer.run()
    records = read_metrics(str(workdir))
    return trainer, {key: [r[key] for r in records if key in r]
                     for key in ("train/loss", "train/grad_norm", "train/rewards/chosen", "eval/loss",
                                 "eval/rewards/margins")}


def test_losses_agree_across_layouts(assets, tmp_path):
    results = {layout: run(assets, tmp_path / layout, **{"data.layout": layout})[1]
               for layout in ("padded", "prefix_shared", "packed")}
    base = results["padded"]
    assert len(base["train/loss"]) == 3 and len(base["eval/loss"]) == 2
    assert base["train/loss"][-1] < base["train/loss"][0]  # it trains, so the comparison means something
    for layout in ("prefix_shared", "packed"):
        for key, values in base.items():
            np.testing.assert_allclose(results[layout][key], values, atol=1e-5, rtol=1e-5,
                                       err_msg=f"{layout} vs padded: {key}")
