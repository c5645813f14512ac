"""tools/convert_to_hf.py: a run's orbax checkpoint -> a HF directory transformers loads."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxdpo.training.loop import train_and_evaluate
from tests.tiny_assets import make_run_assets, tiny_run_config
from tools import convert_to_hf

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny 2-step run sharded over all 8 simulated devices, with its own HF export."""
    assets = make_run_assets(str(tmp_path_factory.mktemp("assets")), n_train=16)
    workdir = str(tmp_path_factory.mktemp("run"))
    config = tiny_run_config(assets, workdir, **{"train.steps": 2, "data.eval_files": "", "mesh.fsdp": -1})
    trainer = train_and_evaluate(config)
    return {"workdir": workdir, "assets": assets, "devices": trainer.mesh.size}


def logits(model_dir, text="What color is the owl? The owl is gold."):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    with torch.no_grad():
        return model(ids).logits.numpy()


def test_converted_checkpoint_loads_in_transformers_and_matches_the_runs_export(run, tmp_path):
    assert run["devices"] == 8
    out = str(tmp_path / "converted")
    step = convert_to_hf.convert(run["workdir"], out)  # a WORKDIR: newest step of WORKDIR/checkpoints
    assert step == 2
    own_export = os.path.join(run["workdir"], "hf")
    expected, got = logits(own_export), logits(out)
    assert expected.shape[-1] == 300
    np.testing.assert_array_equal(got, expected)
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["model_type"] == "llama"
    assert os.path.exists(os.path.join(out, "tokenizer.json"))


def test_command_line_on_a_step_dir_with_errors_in_one_line(run, tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    step_dir = os.path.join(run["workdir"], "checkpoints", "2")
    out = str(tmp_path / "cli")
    ok = subprocess.run([sys.executable, "tools/convert_to_hf.py", step_dir, out, "--dtype", "bfloat16"],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == f"wrote step 2 to {out}"
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["dtype"] == "bfloat16"
    bad = subprocess.run([sys.executable, "tools/convert_to_hf.py", str(tmp_path), str(tmp_path / "x")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1].startswith(f"convert_to_hf: {tmp_path} holds no committed checkpoint")


def test_locate_accepts_workdir_checkpoints_and_step(run):
    checkpoints = os.path.join(run["workdir"], "checkpoints")
    assert convert_to_hf.locate(run["workdir"]) == (checkpoints, 2, run["workdir"])
    assert convert_to_hf.locate(checkpoints) == (checkpoints, 2, run["workdir"])
    assert convert_to_hf.locate(os.path.join(checkpoints, "2")) == (checkpoints, 2, run["workdir"])
    with pytest.raises(convert_to_hf.ConfigError, match="step 7 is not in"):
        convert_to_hf.locate(checkpoints, step=7)


def test_lora_checkpoint_is_merged_into_its_base(run, tmp_path):
    """A LoRA run saves only adapters; the converter merges them into model.path as the run's merged export."""
    workdir = str(tmp_path / "lora_run")
    config = tiny_run_config(run["assets"], workdir, **{"train.steps": 2, "data.eval_files": "", "lora.rank": 4,
                                                        "lora.export_merged": True, "optim.lr": 1e-2})
    train_and_evaluate(config, devices=jax.devices()[:1])
    out = str(tmp_path / "converted")
    convert_to_hf.convert(workdir, out)
    from safetensors.numpy import load_file

    got, expected = load_file(os.path.join(out, "model.safetensors")), load_file(os.path.join(workdir, "hf", "model.safetensors"))
    base = load_file(os.path.join(run["assets"]["model"], "model.safetensors"))
    assert sorted(got) == sorted(expected)
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], rtol=0, atol=1e-6)  # W + s*A@B, same math
    changed = "model.layers.0.self_attn.q_proj.weight"
    assert np.abs(got[changed] - base[changed]).max() > 0  # the adapters moved the weights
