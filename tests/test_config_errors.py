"""Config errors are one line on stderr, exit non-zero, no traceback, before any compile."""

import os
import subprocess
import sys

import pytest

from configs import dpo
from jaxdpo import config as config_lib
from jaxdpo.config import ConfigError
from tests.tiny_assets import make_run_assets, set_overrides

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_run_assets(str(tmp_path_factory.mktemp("assets")), n_train=8, n_eval=4)


def run_train(*args, cwd=REPO):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "jaxdpo.train", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def assert_one_line_error(result, expected):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1] == expected, result.stderr


def test_typo_key_suggests_the_nearest_known_key():
    result = run_train("--config=configs/dpo.py", "--config.optim.lrr=1")
    assert_one_line_error(result, "jaxdpo: unknown config key 'optim.lrr' (did you mean 'optim.lr'?)")
    assert len(result.stderr.strip().splitlines()) == 1


def test_wrong_type_names_the_expected_type():
    result = run_train("--config=configs/dpo.py", "--config.train.steps=abc")
    assert_one_line_error(result, "jaxdpo: config key 'train.steps' expects int, got 'abc'")
    assert len(result.stderr.strip().splitlines()) == 1


def test_missing_files_and_incompatible_options(assets, tmp_path):
    base = ["--config=configs/dpo.py", f"--config.workdir={tmp_path}", f"--config.model.path={assets['model']}",
            f"--config.data.train_files={assets['train']}", f"--config.data.eval_files={assets['eval']}"]
    missing = str(tmp_path / "nothing" / "*.jsonl")
    assert_one_line_error(
        run_train(*base, f"--config.data.train_files={missing}"),
        f"jaxdpo: data.train_files: data file {missing!r} does not exist (no file or directory matches it); "
        "check data.train_files / data.eval_files")
    result = run_train(*base, "--config.reference.mode=none")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(
        "jaxdpo: reference.mode='none' but loss.types includes sigmoid, which need a reference model")
    assert not os.listdir(tmp_path)  # nothing was built


def test_config_file_that_does_not_exist():
    assert_one_line_error(
        run_train("--config=configs/nope.py"),
        "jaxdpo: config file 'configs/nope.py' does not exist (run from the repository root, or pass "
        "--config=/abs/path/to/config.py)")


def good_config(assets, tmp_path, **overrides):
    c = dpo.get_config()
    c.workdir = str(tmp_path)
    c.model.path = assets["model"]
    c.data.train_files = assets["train"]
    c.data.eval_files = assets["eval"]
    return set_overrides(c, overrides)


@pytest.mark.parametrize("overrides, message", [
    ({"data.layout": "pad"}, "data.layout = 'pad' is not one of padded, prefix_shared, grouped, packed (did you mean 'padded'?)"),
    ({"optim.b2": 1.0}, "optim.b2 = 1.0 must be in [0, 1)"),
    ({"optim.lr": 0.0}, "optim.lr = 0.0 must be positive"),
    ({"train.micro_batch_size": 3}, "train.batch_size = 32 must be a multiple of train.micro_batch_size = 3"),
    ({"data.max_prompt_length": 128}, "data.max_prompt_length = 128 leaves no room"),
    ({"data.pack_length": 512}, "data.pack_length = 512 only applies to data.layout = 'packed'"),
    ({"data.eval_fraction": 0.1}, "data.eval_files and data.eval_fraction = 0.1 are both set"),
    ({"mesh.fsdp": 0}, "mesh.fsdp = 0 must be >= 1, or -1"),
    ({"model.tokenizer": "/no/such/dir"}, "model.tokenizer = '/no/such/dir' is not a directory"),
    ({"reference.mode": "none", "reference.path": "/x"}, "reference.path = '/x' is set but reference.mode = 'none'"),
    ({"reference.mode": "lora_base"}, "reference.mode = 'lora_base' needs LoRA"),
    ({"loss.types": ("sigmod",)}, "loss.types has unknown loss 'sigmod'; did you mean 'sigmoid'?"),
    ({"judge.correct_score": float("nan")}, "judge.correct_score = nan must be a finite number, or None"),
])
def test_validate_rejects(assets, tmp_path, overrides, message):
    with pytest.raises(ConfigError) as error:
        config_lib.validate(good_config(assets, tmp_path, **overrides))
    assert str(error.value).startswith(message)


@pytest.mark.parametrize("key, value, message", [
    ("optim.lr", float("inf"), "optim.lr = inf must be positive and finite"),
    ("optim.lr", float("nan"), "optim.lr = nan must be positive and finite"),
    ("optim.weight_decay", float("inf"), "optim.weight_decay = inf must be >= 0 and finite"),
    ("optim.grad_clip", float("nan"), "optim.grad_clip = nan must be >= 0 (0 = no clipping) and finite"),
    ("optim.grad_clip", float("inf"), "optim.grad_clip = inf must be >= 0 (0 = no clipping) and finite"),
    ("optim.eps", float("inf"), "optim.eps = inf must be positive and finite"),
    ("optim.b1", float("nan"), "optim.b1 = nan must be in [0, 1) and finite"),
    ("optim.min_lr_ratio", float("nan"), "optim.min_lr_ratio = nan must be in [0, 1] and finite"),
    ("optim.warmup_steps", -1, "optim.warmup_steps = -1 must be >= 0 and finite"),
])
def test_optim_keys_must_be_finite_and_in_range(assets, tmp_path, key, value, message):
    with pytest.raises(ConfigError) as error:
        config_lib.validate(good_config(assets, tmp_path, **{key: value}))
    assert str(error.value) == message


def test_infinite_lr_on_the_command_line_is_one_line_exit_2(assets, tmp_path):
    result = run_train("--config=configs/dpo.py", f"--config.workdir={tmp_path}",
                       f"--config.model.path={assets['model']}", f"--config.data.train_files={assets['train']}",
                       f"--config.data.eval_files={assets['eval']}", "--config.optim.weight_decay=inf")
    assert result.returncode == 2
    assert_one_line_error(result, "jaxdpo: optim.weight_decay = inf must be >= 0 and finite")


def test_validate_accepts_the_tiny_config_and_reference_free_losses(assets, tmp_path):
    config_lib.validate(good_config(assets, tmp_path))
    config_lib.validate(good_config(assets, tmp_path, **{"reference.mode": "none", "loss.types": ("simpo",)}))


def test_override_checks_every_absl_form():
    c = dpo.get_config()
    assert config_lib.config_overrides(["--config.a.b=1", "--config.c", "2", "--noconfig.d", "--config.e", "--x=1"]) \
        == [("a.b", "1"), ("c", "2"), ("d", "false"), ("e", None)]
    config_lib.check_overrides(c, ["--config.optim.lr=1e-5", "--config.data.use_cache", "--noconfig.data.use_cache",
                                   "--config.train.steps", "0x10", "--config.loss.types=ipo",
                                   "--config.loss.types=('ipo','sigmoid')", "--config.loss.weights=1,0.5"])
    cases = {
        "--config.lr=1": "unknown config key 'lr' (did you mean 'optim.lr'?)",
        "--config.optim.lr=fast": "config key 'optim.lr' expects float, got 'fast'",
        "--config.data.use_cache=maybe": "config key 'data.use_cache' expects a bool (true or false), got 'maybe'",
        "--config.optim.lr": "config key 'optim.lr' needs a value: --config.optim.lr=<float>",
        "--config.optim=1": "config key 'optim' is a group; set one of its keys, e.g. --config.optim.b1=...",
        "--config.zzzz=1": "unknown config key 'zzzz' (see the config reference in README.md)",
        "--config.loss.types=sigmoid,hinge":
            "config key 'loss.types' is a tuple of strings; write --config.loss.types=\"('sigmoid', 'hinge')\"",
    }
    for arg, message in cases.items():
        with pytest.raises(ConfigError, match=None) as error:
            config_lib.check_overrides(c, [arg])
        assert str(error.value) == message


def test_attention_choices_are_the_implemented_backends():
    from jaxdpo.ops.attention import BACKENDS

    assert set(config_lib.CHOICES["model.attention"]) == set(BACKENDS)


def test_config_file_keys_are_checked_against_the_default_schema(tmp_path):
    schema = dpo.get_config()
    typo = dpo.get_config()
    typo.optim.lrr = 1e-3
    with pytest.raises(ConfigError) as error:
        config_lib.check_schema(typo, schema, source="config file 'my.py'")
    assert str(error.value) == "config file 'my.py' sets unknown config key 'optim.lrr' (did you mean 'optim.lr'?)"
    missing = dpo.get_config()
    del missing.train["export_hf"]
    with pytest.raises(ConfigError, match="config file 'my.py' has no key 'train.export_hf' \\(default True\\)"):
        config_lib.check_schema(missing, schema, source="config file 'my.py'")
    from configs import cdpo, ipo
    for module in (ipo, cdpo):
        config_lib.check_schema(module.get_config(), schema, source=module.__name__)

    path = tmp_path / "typo_config.py"
    path.write_text("from configs import dpo\n\ndef get_config():\n    c = dpo.get_config()\n"
                    "    c.train.stepz = 3\n    return c\n")
    assert_one_line_error(run_train(f"--config={path}"),
                          f"jaxdpo: config file '{path}' sets unknown config key 'train.stepz' "
                          "(did you mean 'train.steps'?)")


@pytest.mark.parametrize("overrides, message", [
    ({"mesh.data": 1, "mesh.fsdp": 2, "mesh.tensor": 3}, "heads size 4 is not divisible by mesh.tensor = 3"),
    ({"mesh.data": 3, "mesh.fsdp": 2, "mesh.tensor": 1},
     "train.micro_batch_size = 8 pairs must be a multiple of mesh data*fsdp = 6"),
])
def test_mesh_that_does_not_fit_fails_before_any_tokenizing(assets, tmp_path, monkeypatch, overrides, message):
    """Checks that need only configs (config.json, the mesh, batch sizes) run before the data is touched:
    on a large dataset a bad mesh fails in seconds, not after tokenizing everything."""
    import jax

    from jaxdpo import data
    from jaxdpo.training import build
    from jaxdpo.training.loop import train_and_evaluate
    from tests.tiny_assets import tiny_run_config

    def must_not_tokenize(*args, **kwargs):
        raise AssertionError("the data was read before the config-only checks")

    monkeypatch.setattr(build, "build_data", must_not_tokenize)
    monkeypatch.setattr(data, "load_preference_data", must_not_tokenize)
    config = tiny_run_config(assets, str(tmp_path / "run"), **overrides,
                             **{"data.train_files": str(tmp_path / "never_read.jsonl")})
    with pytest.raises(ConfigError, match=message.replace("*", r"\*")):
        train_and_evaluate(config, devices=jax.devices()[:6])
    assert not os.path.exists(tmp_path / "run" / "checkpoints")
