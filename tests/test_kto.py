"""KTO and apo_zero_unpaired against TRL 1.16's KTOTrainer: the first step's loss and KL estimate on the same
tiny HF model, a different reference model (reference.path) and the same unpaired data, fp32, data.shuffle
= false, one process, no accumulation. Also: a paired file fed to KTO, and the loss checks of the unpaired
kind."""

from __future__ import annotations

import json
import os

import pytest

from jaxdpo.errors import ConfigError
from jaxdpo.preference import losses
from jaxdpo.training import loop
from tests.tiny_assets import make_llama, preference_rows

BATCH = 8
MAX_LENGTH = 64


@pytest.fixture(scope="module")
def kto_assets(assets, tmp_path_factory):
    """A second random Llama (the reference) and an unpaired file: 12 rows, 5 desirable, in a fixed order."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("kto")
    reference = str(root / "reference")
    make_llama(reference, AutoTokenizer.from_pretrained(assets["model"]), seed=7)
    rows = []
    for i, pair in enumerate(preference_rows(12, seed=5)):
        desirable = i % 5 in (0, 2)
        rows.append({"prompt": pair["prompt"], "completion": pair["chosen" if desirable else "rejected"],
                     "label": desirable})
    path = str(root / "unpaired.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return {"reference": reference, "unpaired": path, "rows": rows}


def jaxdpo_first_step(tiny_config, workdir, kto_assets, loss_type: str, train_files: str) -> dict:
    config = tiny_config(workdir, **{
        "data.train_files": train_files, "data.eval_files": "", "data.shuffle": False,
        "data.max_length": MAX_LENGTH, "data.max_prompt_length": 0, "train.steps": 1, "train.batch_size": BATCH,
        "train.micro_batch_size": BATCH, "reference.path": kto_assets["reference"], "loss.types": (loss_type,),
        "loss.desirable_weight": 1.0, "loss.undesirable_weight": 1.5})
    loop.train_and_evaluate(config)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return next(r for r in map(json.loads, f) if "train/loss" in r)


def trl_first_step(assets, kto_assets, loss_type: str, rows: list[dict], tmp_path) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import KTOConfig, KTOTrainer

    torch.manual_seed(0)
    args = KTOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=BATCH, max_steps=1,
                     loss_type=loss_type, beta=0.1, desirable_weight=1.0, undesirable_weight=1.5,
                     max_length=MAX_LENGTH, report_to=[], use_cpu=True, bf16=False, save_strategy="no",
                     gradient_checkpointing=False)
    model = AutoModelForCausalLM.from_pretrained(assets["model"], dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(kto_assets["reference"], dtype=torch.float32)
    trainer = KTOTrainer(model=model, ref_model=reference, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=AutoTokenizer.from_pretrained(assets["model"]))
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()  # TRL files the metrics of a training forward under "train" (dropout is disabled)
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
    metrics = {key: values[-1] for key, values in trainer._metrics["train"].items()}
    return dict(metrics, loss=float(loss))


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_first_step_loss_and_kl_equal_trl_kto_trainer(assets, tiny_config, kto_assets, tmp_path, loss_type):
    ours = jaxdpo_first_step(tiny_config, tmp_path / "run", kto_assets, loss_type, kto_assets["unpaired"])
    trl = trl_first_step(assets, kto_assets, loss_type, kto_assets["rows"], tmp_path)
    assert ours["train/loss"] == pytest.approx(trl["loss"], abs=1e-5)
    assert ours["train/kl"] == pytest.approx(trl["kl"], abs=1e-5)
    for key in ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"):
        assert ours[f"train/{key}"] == pytest.approx(trl[key], abs=1e-4), key
    assert (ours["train/count/chosen"], ours["train/count/rejected"]) == (4, 4)  # rows 0, 2, 5, 7 of the batch
    if loss_type == "kto":
        assert trl["kl"] > 0  # a different reference: the KL term is really exercised


def test_a_paired_file_feeds_kto_as_trl_unpairs_it(assets, tiny_config, kto_assets, tmp_path):
    pairs = preference_rows(4, seed=9)  # 8 rows: the 4 chosen, then the 4 rejected, in one batch
    path = str(tmp_path / "pairs.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps(p) + "\n" for p in pairs)
    ours = jaxdpo_first_step(tiny_config, tmp_path / "run", kto_assets, "kto", path)
    trl = trl_first_step(assets, kto_assets, "kto", pairs, tmp_path)
    assert ours["train/loss"] == pytest.approx(trl["loss"], abs=1e-5)
    assert ours["train/kl"] == pytest.approx(trl["kl"], abs=1e-5)


def test_unpaired_losses_do_not_mix_with_pair_losses_and_warn_on_unbalanced_weights():
    with pytest.raises(ConfigError, match=r"mixes losses of pairs and of unpaired rows"):
        losses.validate_loss_config({"types": ("kto", "sigmoid"), "weights": (1.0, 1.0)})
    with pytest.raises(ConfigError, match=r"loss.nll_coef=0.5 applies to pairs"):
        losses.validate_loss_config({"types": ("kto",), "nll_coef": 0.5})
    cfg = {"types": ("kto",), "desirable_weight": 1.0, "undesirable_weight": 1.0}
    assert losses.class_balance_warning(cfg, 10, 10) is None
    assert "desirable_weight in [3.0, 3.99]" in losses.class_balance_warning(cfg, 10, 30)
    assert losses.class_balance_warning(dict(cfg, desirable_weight=3.5), 10, 30) is None


def test_a_cached_reference_serves_the_kl_rows_too(tiny_config, kto_assets, tmp_path):
    device = jaxdpo_first_step(tiny_config, tmp_path / "device", kto_assets, "kto", kto_assets["unpaired"])
    config = tiny_config(tmp_path / "cached", **{
        "data.train_files": kto_assets["unpaired"], "data.eval_files": "", "data.shuffle": False,
        "data.max_length": MAX_LENGTH, "data.max_prompt_length": 0, "train.steps": 1, "train.batch_size": BATCH,
        "train.micro_batch_size": BATCH, "reference.path": kto_assets["reference"], "reference.mode": "cached",
        "loss.types": ("kto",), "loss.desirable_weight": 1.0, "loss.undesirable_weight": 1.5})
    loop.train_and_evaluate(config)
    with open(os.path.join(tmp_path / "cached", "metrics.jsonl")) as f:
        cached = next(r for r in map(json.loads, f) if "train/loss" in r)
    for key in ("train/loss", "train/kl", "train/rewards/chosen", "train/rewards/rejected"):
        assert cached[key] == pytest.approx(device[key], abs=1e-5), key
