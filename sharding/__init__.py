"""Sharding over a device mesh: meshes, logical-axis rules per strategy, expert parallelism.

    mesh = sharding.make_mesh("data=2,expert=2,tensor=2")     # sizes multiply to the device count
    params = sharding.shard_params(cfg, params, mesh)           # rules="combined" by default
    logits = model.forward(cfg, params, ids, mesh=mesh)
    out = model.generate(cfg, params, ids, max_new_tokens=32, mesh=mesh)
    cfg, params = sharding.load(path, mesh)                     # Orbax: each host reads its shards
    sharding.simulate_cpu_devices(8)    # on a CPU machine, first thing: 8 devices to try a mesh on

Mesh axes: data (replicas), fsdp (weights split, gathered at use), expert (experts split, tokens
dispatched with shard_map), tensor (heads, FFN widths and vocab split). The model only names
logical axes; `rules.py` maps them, one table per strategy (fsdp, tensor, expert, combined), and
refuses two logical axes of one array on one mesh axis. Query heads and experts must divide by
their axis; KV heads are split when they divide and replicated otherwise (rules.py says why).

Multi-host (one process per host, every process runs the same program):

    sharding.initialize()            # before anything touches a device
    mesh = sharding.make_mesh("data=2,expert=8")   # over the devices of all processes

`initialize(coordinator_address, num_processes, process_id)` takes them as arguments or from
JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID; with none of those, JAX detects
the cluster itself. A script calls it first thing (a single-process run does not call it).
- Multi-node GPU cluster (say 2 hosts x 8 H100): under SLURM, `srun --ntasks-per-node=1 python
  -m experiments.generate ...` needs no flags (JAX reads SLURM's variables and uses all 8 local
  GPUs per process). Elsewhere start one process per host with JAX_COORDINATOR_ADDRESS=host0:1234
  (a port every host can reach on host 0), JAX_NUM_PROCESSES=2 and JAX_PROCESS_ID=0 or 1. Keep
  `tensor` and `expert` within a host (NVLink) and put `data`/`fsdp` across hosts, e.g.
  "data=2,expert=2,tensor=4" on 16 GPUs: make_mesh orders axes outermost-first, data first.
- TPU pod slice (say v5p-64: 8 hosts x 4 chips = 32 devices): run the same command on every host
  (`gcloud compute tpus tpu-vm ssh NAME --worker=all --command="..."`); `initialize()` with no
  arguments finds the coordinator from the TPU metadata. Use e.g. "fsdp=4,expert=8"; the ICI
  torus links every chip, so the expert all-gather stays on-slice.
- Every process must pass the same host data to `shard_params` / `model.forward` (each keeps only
  its own slices); results are global arrays: `jax.experimental.multihost_utils.process_allgather`
  brings a whole one to every host. Load weights with `sharding.load` (Orbax: each host reads only
  the shards its devices hold).
- Tested here with two processes on one machine over loopback, CPU devices and gloo collectives
  (tests/test_sharding.py::test_two_processes).
"""
from __future__ import annotations

import model.runtime

from .mesh import AXES, ShardingError, initialize, make_mesh, parse_mesh, simulate_cpu_devices
from .rules import RULES, Plan, make_plan, param_shardings, place, rules_table, shard_params

# model.forward / model.generate(..., mesh=...) place params and build the plan through this.
model.runtime.set_placer(place)


def load(path, mesh, rules="combined", dtype=None, verify: bool = True):
    """(cfg, params) from a checkpoint (`checkpoints.load`), each leaf placed in its shards: read
    straight into them from an Orbax directory or a training run, after a whole read into host
    memory from an HF directory."""
    import checkpoints
    return checkpoints.load(path, dtype=dtype, verify=verify,
                            shardings=lambda cfg: param_shardings(cfg, mesh, rules))


__all__ = ["AXES", "Plan", "RULES", "ShardingError", "initialize", "load", "make_mesh",
           "make_plan", "param_shardings", "parse_mesh", "place", "rules_table", "shard_params",
           "simulate_cpu_devices"]
