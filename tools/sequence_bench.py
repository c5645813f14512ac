"""Context parallelism figures, run by `tools/bench.py --sequence 1,2,4,8`.

What is measured: the policy's forward + backward as the train step runs it (per-pair logprob sums from
`jaxdpo.training.step.pair_logprobs`, gradient of sum(pc - pr) w.r.t. every param) on one row per batch shard:
mesh (data=1, fsdp=D/S, sequence=S, tensor=1) over D devices, D/S prefix_shared rows of T tokens (half
prompt, a quarter each for chosen and rejected), in zigzag order. Each device holds T/S tokens of one row.
The optimizer update and the reference forward are left out (neither depends on S per device).

  memory   compiled.memory_analysis() of that function, per device: temp (activations, scores) and
           arguments; compile only, nothing runs. "xla" is today's whole-row path (the [T,T] mask).
  time     median wall time of the compiled function at --time-length tokens (on simulated CPU devices
           all shards share the host's cores: the figure is total work, not a parallel speedup).
  longest  the longest row (a multiple of 1024) whose temp + argument bytes fit --budget-mib per device.
"""

from __future__ import annotations

import statistics
import time

REMAT = "none"
SIM_FLAG = "--xla_force_host_platform_device_count"


def simulated_devices_flags(env: dict, devices: int) -> None:
    """Ask XLA for `devices` CPU devices (before jax is imported), with the collective-safe scheduler."""
    flags = env.get("XLA_FLAGS", "")
    if SIM_FLAG not in flags:
        flags += f" {SIM_FLAG}={devices}"
    if "xla_cpu_enable_concurrency_optimized_scheduler" not in flags:
        flags += " --xla_cpu_enable_concurrency_optimized_scheduler=false"
    env["XLA_FLAGS"] = flags.strip()


def model_config(shape: dict):
    from jaxdpo.models import ModelConfig

    return ModelConfig(vocab_size=shape["vocab"], hidden_size=shape["hidden"],
                       intermediate_size=shape["intermediate"], num_layers=shape["layers"],
                       num_heads=shape["heads"], num_kv_heads=shape["kv_heads"],
                       head_dim=shape["hidden"] // shape["heads"])


def prefix_shared_rows(rows: int, length: int, vocab: int, sequence: int) -> dict:
    """One pair per row (prefix_shared layout): a prompt of half the row, then chosen and rejected of a
    quarter each (all scored), in zigzag order."""
    import numpy as np

    from jaxdpo.data.layouts import make_batch, scored_index
    from jaxdpo.parallel.sequence_parallel import to_zigzag

    rng = np.random.default_rng(0)
    quarter = length // 4
    pairs = [(rng.integers(3, vocab, 2 * quarter), rng.integers(3, vocab, quarter - 1),
              rng.integers(3, vocab, quarter - 1)) for _ in range(rows)]
    batch = make_batch(pairs, layout="prefix_shared", row_length=length, num_pairs=rows)
    batch["scored_index"] = scored_index(batch["side"], 2 * quarter)
    return to_zigzag(batch, sequence)


def compiled_step(shape: dict, *, length: int, sequence: int, backend: str, devices: int, chunk: int):
    """(compiled forward+backward, its arguments) for one setting."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxdpo.models import Decoder
    from jaxdpo.parallel.sharding import make_mesh
    from jaxdpo.training.batches import batch_shardings
    from jaxdpo.training.step import pair_logprobs

    mesh = make_mesh(1, devices // sequence, 1, sequence=sequence)
    rows = devices // sequence  # one row per batch shard
    with jax.set_mesh(mesh):
        model = Decoder(model_config(shape), remat=REMAT, attention_backend=backend, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    batch = prefix_shared_rows(rows, length, shape["vocab"], sequence)
    num_pairs = len(batch["pair_valid"])
    shardings = batch_shardings(mesh, list(batch), stacked=False)  # as the train step places them
    batch = {k: jax.device_put(v, shardings[k]) for k, v in batch.items()}

    def objective(params, batch):
        sums = pair_logprobs(graphdef, (params,), batch, num_pairs=num_pairs, chunk_size=chunk)
        return jnp.sum(sums["pc"] - sums["pr"])

    with jax.set_mesh(mesh):
        compiled = jax.jit(jax.value_and_grad(objective)).lower(params, batch).compile()
    return compiled, (params, batch), mesh


def per_device_bytes(compiled) -> dict:
    m = compiled.memory_analysis()
    return {"temp": int(m.temp_size_in_bytes), "arguments": int(m.argument_size_in_bytes),
            "outputs": int(m.output_size_in_bytes)}


def step_seconds(compiled, arguments, mesh, repeats: int) -> float:
    import jax

    with jax.set_mesh(mesh):
        jax.block_until_ready(compiled(*arguments))
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(compiled(*arguments))
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def longest_row(shape, *, sequence, backend, devices, chunk, budget_bytes, start: int = 1024) -> int:
    """Largest multiple of `start` whose compiled temp + argument bytes fit the budget (doubling, then
    bisection on multiples of `start`); 0 if even `start` does not fit."""
    def fits(length):
        compiled, _, _ = compiled_step(shape, length=length, sequence=sequence, backend=backend,
                                       devices=devices, chunk=chunk)
        used = per_device_bytes(compiled)
        return used["temp"] + used["arguments"] <= budget_bytes

    if not fits(start):
        return 0
    low, high = start, 2 * start
    while fits(high):
        low, high = high, 2 * high
    while high - low > start:
        mid = (low + high) // 2 // start * start
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low


def run(args, shape: dict) -> dict:
    import jax

    devices = jax.device_count()
    settings = [("xla", 1)] + [("sequence_parallel", int(s)) for s in args.sequence.split(",")]
    out = {"devices": devices, "max_length": args.max_length, "time_length": args.time_length,
           "budget_mib": args.budget_mib, "settings": []}
    print(f"{jax.default_backend()} x{devices}; shape {args.shape}; rows of T={args.max_length}, one row per "
          f"batch shard (data*fsdp = devices / sequence); policy forward+backward")
    print(f"{'attention':18s} {'seq':>3s} {'temp MiB':>10s} {'args MiB':>9s} {'step s @' + str(args.time_length):>12s}"
          f" {'longest T in ' + str(args.budget_mib) + ' MiB':>22s}")
    for backend, sequence in settings:
        compiled, arguments, mesh = compiled_step(shape, length=args.max_length, sequence=sequence,
                                                  backend=backend, devices=devices, chunk=args.chunk)
        row = {"attention": backend, "sequence": sequence, **per_device_bytes(compiled)}
        del compiled, arguments
        timed, arguments, mesh = compiled_step(shape, length=args.time_length, sequence=sequence,
                                               backend=backend, devices=devices, chunk=args.chunk)
        row["step_s"] = step_seconds(timed, arguments, mesh, args.steps)
        row["longest_row"] = longest_row(shape, sequence=sequence, backend=backend, devices=devices,
                                         chunk=args.chunk, budget_bytes=args.budget_mib * 2**20)
        out["settings"].append(row)
        print(f"{backend:18s} {sequence:3d} {row['temp'] / 2**20:10.1f} {row['arguments'] / 2**20:9.1f} "
              f"{row['step_s']:12.3f} {row['longest_row']:22d}", flush=True)
    base = next(r for r in out["settings"] if r["attention"] == "sequence_parallel" and r["sequence"] == 1)
    for r in out["settings"]:
        r["temp_vs_ring_seq1"] = base["temp"] / max(r["temp"], 1)
    return out
