"""Scale-out: meshes, host-memory reference, divisibility errors, two processes.

Every training here is 3 steps (2 for the two-process run) of the tiny Llama with no eval set and no
export, so each test is one or two compiles. The two-process tests share one pair of processes, each
running this file as a script (`python tests/test_scale.py two_processes JOB`), one process per simulated
host with 2 CPU devices each.
"""

import json
import math
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.helpers import memoized_trainings
from tests.processes import child_env, free_port

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LEAN = {"data.eval_files": "", "train.export_hf": False}
STEP_KEYS = ("train/loss", "train/grad_norm", "train/rewards/margins")
EVAL_KEYS = ("eval/loss", "eval/rewards/accuracies", "eval/rewards/margins")


def _series(records, key):
    return [r[key] for r in records if key in r]


# ---------------------------------------------------------------------------------------------
# in-process runs on the 8 simulated devices of conftest.py

@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from tests.tiny_assets import make_run_assets
    return make_run_assets(str(tmp_path_factory.mktemp("scale_assets")), n_train=32, n_eval=8)


@pytest.fixture(scope="module")
def runs(assets, tmp_path_factory):
    """run(mesh, mode) -> (run, metrics records), memoized so tests share trainings."""
    import jax

    train = memoized_trainings(assets, tmp_path_factory)

    def run(mesh=None, mode="device"):
        data, fsdp, tensor = mesh or (1, 1, 1)
        overrides = dict(LEAN, **{"reference.mode": mode, "mesh.data": data, "mesh.fsdp": fsdp, "mesh.tensor": tensor})
        return train((mesh, mode), overrides, devices=None if mesh else jax.devices()[:1])

    return run


@pytest.mark.parametrize("mesh", [(8, 1, 1), (2, 4, 1), (1, 4, 2), (1, 8, 1)])
def test_meshes_match_one_device(runs, mesh):
    trainer, records = runs(mesh)
    assert dict(trainer.mesh.shape) == dict(zip(("data", "fsdp", "tensor"), mesh), sequence=1)
    _, one = runs(None)
    assert len(_series(records, "train/loss")) == 3
    for key in STEP_KEYS:
        np.testing.assert_allclose(_series(records, key), _series(one, key), rtol=1e-5, atol=1e-5, err_msg=key)
    # the first step is taken with policy == reference; the third (after a real update) has learned
    assert _series(records, "train/loss")[0] == pytest.approx(math.log(2), abs=1e-6)
    assert _series(records, "train/loss")[-1] < math.log(2) - 1e-3


def test_params_and_optimizer_state_are_sharded_over_fsdp_and_tensor(runs):
    import jax

    trainer, _ = runs((1, 4, 2))
    state = trainer.state
    q_proj = state["params"]["layers"]["q_proj"]  # [layers, embed, heads, head_dim]
    assert q_proj.sharding.spec[:3] == (None, "fsdp", "tensor")
    assert q_proj.addressable_shards[0].data.shape == (2, 32 // 4, 4 // 2, 8)
    moments = [x for x in jax.tree.leaves(state["opt_state"]) if x.shape == q_proj.shape]
    assert len(moments) == 2  # adam mu and nu, each sharded like the param (ZeRO-3), not replicated
    assert all(m.sharding.spec == q_proj.sharding.spec for m in moments)


def test_host_reference_gives_the_same_losses_as_device(runs):
    import jax

    host, host_records = runs((2, 4, 1), "host")
    _, device_records = runs((2, 4, 1), "device")
    leaves = jax.tree.leaves(host.reference.params)
    assert {x.sharding.memory_kind for x in leaves} == {"pinned_host"}
    for key in STEP_KEYS:
        np.testing.assert_allclose(_series(host_records, key), _series(device_records, key), rtol=1e-6,
                                   atol=1e-7, err_msg=key)


def test_host_reference_leaves_the_device_and_streams_one_layer(runs):
    import jax

    from tests.helpers import train_batch
    from tools.memory_report import reference_memory_report

    host, _ = runs((2, 4, 1), "host")
    device, _ = runs((2, 4, 1), "device")
    report = lambda run, mode: reference_memory_report(  # noqa: E731
        run.steps.train_step, run.state, run.policy.frozen, run.reference.params, train_batch(run, 0), mode=mode,
        streams_layers=run.reference.streams_layers)
    host_report, device_report = report(host, "host"), report(device, "device")
    # 2-layer tiny Llama: embed [V,32] and lm_head [32,V] (tensor x fsdp = 4 ways), 2 norms, 2 layers.
    ref = device.reference.params
    total = sum(x.size * 4 for x in jax.tree.leaves(ref))
    replicated = sum(x.size * 4 for x in jax.tree.leaves(ref) if all(a is None for a in x.sharding.spec))
    per_device = (total - replicated) // 4 + replicated
    assert device_report["reference_device_bytes"] == per_device
    assert device_report["reference_host_bytes"] == 0
    assert host_report["reference_device_bytes"] == 0
    assert host_report["reference_host_bytes"] == per_device
    # what host mode brings in at once: the non-layer params and one of the 2 layers
    layers = jax.tree.leaves(ref["layers"])
    one_layer = sum(x.size * 4 // x.shape[0] // (1 if all(a is None for a in x.sharding.spec) else 4) for x in layers)
    non_layer = per_device - sum(x.size * 4 // (1 if all(a is None for a in x.sharding.spec) else 4) for x in layers)
    assert host_report["reference_streamed_bytes"] == one_layer + non_layer
    # XLA compiled the reference arguments into host memory (12 leaves) in host mode only
    assert host_report["hlo_host_params"] == len(jax.tree.leaves(ref)) == 12
    assert host_report["hlo_host_param_bytes"] == per_device
    assert device_report["hlo_host_params"] == device_report["hlo_host_param_bytes"] == 0


def _device_placements_by_function(mlir_text: str) -> dict[str, int]:
    """annotate_device_placement(... "device") custom calls per function of a StableHLO module."""
    counts, function = {}, None
    for line in mlir_text.splitlines():
        if "func.func" in line:
            function = line.split("@", 1)[1].split("(", 1)[0]
        elif "annotate_device_placement" in line and '_xla_buffer_placement = "device"' in line:
            counts[function] = counts.get(function, 0) + 1
    return counts


def test_host_reference_on_gpu_copies_each_layer_inside_the_scan(runs):
    """XLA:CPU drops in-program memory moves (one memory), so look at the program JAX builds for CUDA:
    the reference forward copies the 3 non-layer params once and the 9 layer params inside the scan."""
    import jax

    from tests.helpers import train_batch

    placements = {}
    for mode in ("host", "device"):
        trainer, _ = runs((2, 4, 1), mode)
        exported = jax.export.export(trainer.steps.train_step, platforms=["cuda"])(
            trainer.state, trainer.policy.frozen, trainer.reference.params, train_batch(trainer, 0))
        text = exported.mlir_module()
        placements[mode] = {f: n for f, n in _device_placements_by_function(text).items() if f != "main"}
        assert text.count('mhlo.memory_kind = "pinned_host"') == (12 if mode == "host" else 0)
    assert sorted(placements["host"].values()) == [3, 9]  # embed/final_norm/lm_head; one layer's 9 params
    assert placements["device"] == {}


def test_mesh_that_does_not_divide_the_model_is_a_config_error_before_loading(assets, tmp_path):
    import jax

    from jaxdpo.config import ConfigError
    from jaxdpo.training import build
    from tests.tiny_assets import tiny_run_config

    # tiny Llama: hidden 32, 4 heads, 2 kv heads, intermediate 64, vocab 300
    config = tiny_run_config(assets, str(tmp_path), **LEAN, **{"mesh.data": 1, "mesh.fsdp": 2, "mesh.tensor": 3})
    mesh = build.make_mesh(config, jax.devices()[:6])
    loaded = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(build, "load_weights", lambda *args, **kwargs: loaded.append(args))
        with pytest.raises(ConfigError) as err:
            build.build_policy(config, mesh, resuming=False)
    message = str(err.value)
    assert "heads size 4 is not divisible by mesh.tensor = 3 (params: q_proj, o_proj)" in message
    assert "kv_heads size 2 is not divisible by mesh.tensor = 3 (params: k_proj, v_proj)" in message
    assert "mlp size 64 is not divisible by mesh.tensor = 3 (params: gate_proj, up_proj, down_proj)" in message
    assert "vocab" not in message.split("choose")[0]  # 300 = 3 * 100 divides
    assert "choose mesh.tensor to divide heads" in message
    assert loaded == []  # failed before loading any weights

    config = tiny_run_config(assets, str(tmp_path), **LEAN, **{"mesh.data": 1, "mesh.fsdp": 6, "mesh.tensor": 1})
    with pytest.raises(ConfigError, match=r"embed size 32 is not divisible by mesh.fsdp = 6 \(params: embed, "):
        build.build_policy(config, build.make_mesh(config, jax.devices()[:6]), resuming=False)


def test_mesh_from_config_fills_the_minus_one_axis_and_rejects_a_bad_split(assets, tmp_path):
    from jaxdpo.config import ConfigError
    from jaxdpo.training import build
    from tests.tiny_assets import tiny_run_config

    mesh = lambda data, fsdp, tensor: tiny_run_config(
        assets, str(tmp_path), **LEAN, **{"mesh.data": data, "mesh.fsdp": fsdp, "mesh.tensor": tensor})
    assert dict(build.make_mesh(mesh(2, -1, 1)).shape) == {"data": 2, "fsdp": 4, "sequence": 1, "tensor": 1}
    assert dict(build.make_mesh(mesh(1, 2, -1)).shape) == {"data": 1, "fsdp": 2, "sequence": 1, "tensor": 4}
    with pytest.raises(ConfigError, match="8 devices cannot be split with fixed axes of product 3"):
        build.make_mesh(mesh(3, -1, 1))
    with pytest.raises(ConfigError, match="data\\*fsdp\\*tensor = 4 but 8 devices are available"):
        build.make_mesh(mesh(2, 2, 1))


# ---------------------------------------------------------------------------------------------
# two processes x 2 devices == one process: one pair of processes (this file run as a script) trains,
# samples with `jaxdpo.sample` from the run's checkpoint, and runs two on-policy rounds, while this process
# does the same alone; the tests below compare what each wrote.

TWO_PROCESS_TRAINING = dict(LEAN, **{"train.steps": 2, "train.eval_every": 100, "train.sample_every": 2,
                                     "train.sample_prompts": 4, "sampling.max_new_tokens": 4})
ONLINE_ROUNDS = {"train.steps": 2, "train.save_every": 1, "data.eval_files": "", "sampling.max_new_tokens": 8,
                 "judge.function": "tests.judge_functions:shorter", "judge.prompts": 4, "online.rounds": 2,
                 "online.prompts_per_round": 16, "online.samples_per_prompt": 2, "online.max_new_tokens": 8}
SAMPLE_FLAGS = ["--max_new_tokens=6", "--temperature=1", "--seed=3", "--batch_size=4"]


@pytest.fixture(scope="module")
def two_processes(assets, tmp_path_factory):
    """The two processes' outputs and this process's own, in one directory: two/ (training), two.jsonl
    (sampled from two/), online_two/ (two rounds); one/ (training), one.jsonl (sampled from two/ by this
    process), online_one/ (one round)."""
    import jax

    from jaxdpo import sample
    from jaxdpo.online.rounds import run_online
    from jaxdpo.training.loop import train_and_evaluate
    from tests.tiny_assets import tiny_run_config

    root = tmp_path_factory.mktemp("two_processes")
    # samples at steps 0 and 2: 4 prompts split over both processes' devices, gathered on every host
    training = dict(TWO_PROCESS_TRAINING, **{"data.eval_files": assets["eval"]})
    online = dict(ONLINE_ROUNDS, **{"online.prompts": assets["train"], "online.eval_prompts": assets["eval"]})
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": f"What color is the {a}?"}]}) + "\n"
                               for a in ("cat", "dog", "owl", "fox", "bee")))
    (root / "job.json").write_text(json.dumps({"assets": assets, "root": str(root), "training": training,
                                               "online": online, "prompts": str(prompts)}))
    port = free_port()
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "two_processes", str(root / "job.json")],
                              env=child_env(port, pid), cwd=REPO_ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
             for pid in range(2)]

    # the one-process runs go while the two processes run theirs
    train_and_evaluate(tiny_run_config(assets, str(root / "one"), **training), devices=jax.devices()[:4])
    run_online(tiny_run_config(assets, str(root / "online_one"), **{**online, "online.rounds": 1}))

    deadline = time.monotonic() + 420
    outputs = []
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail(f"two processes still running after 420 s; output:\n{proc.communicate()[0][-3000:]}")
        assert proc.returncode == 0, out[-3000:]
        outputs.append(out)
    # one process sampling from the two processes' checkpoint, once they are done with it
    assert sample.main([f"--model={root / 'two'}", f"--prompts={prompts}", *SAMPLE_FLAGS,
                        f"--output={root / 'one.jsonl'}"]) == 0
    return root, outputs


def test_two_processes_of_two_devices_train_as_one_process_of_four(two_processes):
    from jaxdpo.training.metrics import read_metrics

    root, outputs = two_processes
    assert "mesh {'data': 1, 'fsdp': 4, 'sequence': 1, 'tensor': 1}" in outputs[0] and "2 process(es)" in outputs[0]
    assert "2 process(es)" not in outputs[1]  # only process 0 prints the banner
    for out in outputs:  # each process loaded only its half of the 8 pairs (one padded row per side)
        assert "LOCAL pairs=4 rows=8" in out, out[-2000:]

    one, two = read_metrics(str(root / "one")), read_metrics(str(root / "two"))
    assert [sorted(r) for r in two] == [sorted(r) for r in one]  # process 1 wrote no extra records
    for key in STEP_KEYS + EVAL_KEYS:  # eval at steps 0 and 2
        got, want = _series(two, key), _series(one, key)
        assert len(got) == len(want) == 2
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=key)
    assert _series(one, "train/loss")[0] == pytest.approx(math.log(2), abs=1e-6)
    samples_one, samples_two = (_jsonl(root / run / "samples.jsonl") for run in ("one", "two"))
    assert len(samples_two) == len(samples_one) == 8  # steps 0 and 2, 4 prompts each, written by process 0 only
    for got, want in zip(samples_two, samples_one):
        for side in ("policy", "reference"):
            assert got[side]["completion"] == want[side]["completion"]
            np.testing.assert_allclose(got[side]["logp_policy"], want[side]["logp_policy"], rtol=1e-5)


def test_sample_cli_on_two_processes_writes_what_one_process_writes(two_processes):
    """`jaxdpo.sample` on every host (2 processes x 2 devices, from the two-process run's checkpoint: its
    arrays are restored onto one local device) samples as one program; process 0 alone writes the file, the
    same as one process's sampling from that checkpoint."""
    root, outputs = two_processes
    assert "wrote 5 completions" in outputs[0] and "wrote 5 completions" not in outputs[1]
    assert (root / "two.jsonl").read_text() == (root / "one.jsonl").read_text()


def test_two_processes_run_online_rounds_as_one(two_processes):
    """Two on-policy rounds on 2 processes x 2 devices: process 0 writes each round's files and export and
    every process reads them back (a barrier after each write), so round 0's pairs equal one process's."""
    root, _ = two_processes
    two, one = root / "online_two" / "rounds", root / "online_one" / "rounds"
    assert (two / "0.jsonl").read_text() == (one / "0.jsonl").read_text()
    assert (two / "1.done").exists() and (two / "1" / "hf" / "config.json").exists()
    assert [r["step"] for r in _jsonl(root / "online_two" / "metrics.jsonl")] == [0, 1, 2]


def _jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _two_processes_job(job_json: str) -> None:
    """One of the two processes: train, sample from the run's checkpoint, then two on-policy rounds."""
    sys.path.insert(0, REPO_ROOT)  # for configs/ and tests.tiny_assets
    from jaxdpo.parallel import distributed

    distributed.initialize({"heartbeat_timeout": 30, "shutdown_timeout": 60})
    from jaxdpo import sample
    from jaxdpo.online.rounds import run_online
    from jaxdpo.training.loop import train_and_evaluate
    from tests.tiny_assets import tiny_run_config

    with open(job_json) as f:
        job = json.load(f)
    root = job["root"]
    trainer = train_and_evaluate(tiny_run_config(job["assets"], os.path.join(root, "two"), **job["training"]))
    local = trainer.data.batcher.train_batch(0)  # this process's micro-batches of step 0
    print(f"LOCAL pairs={sum(m['pair_valid'].shape[0] for m in local)} rows={sum(m['input_ids'].shape[0] for m in local)}",
          flush=True)
    status = sample.main([f"--model={os.path.join(root, 'two')}", f"--prompts={job['prompts']}", *SAMPLE_FLAGS,
                          f"--output={os.path.join(root, 'two.jsonl')}"])
    assert status == 0
    run_online(tiny_run_config(job["assets"], os.path.join(root, "online_two"), **job["online"]))


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "two_processes":
    _two_processes_job(sys.argv[2])
