"""Device meshes from a short spec ("data=2,expert=2,tensor=2"), and the multi-host start-up."""
from __future__ import annotations

import math
import os

import jax
from jax.sharding import AxisType, Mesh

# Every mesh has all five axes (size 1 when not named), outermost first: data-parallel replicas
# across hosts; context (positions split, keys and partial softmaxes exchanged every global
# layer) and tensor-parallel groups innermost, so that they sit on the fastest links (NVLink
# within a host, the nearest chips on a TPU slice). jax.make_mesh lays devices out that way.
AXES = ("data", "fsdp", "expert", "context", "tensor")


class ShardingError(ValueError):
    """A mesh, a rules table or a model shape that cannot be sharded as asked; says which."""


def parse_mesh(spec: str | dict[str, int]) -> dict[str, int]:
    """{"data": 2, "fsdp": 1, "expert": 2, "tensor": 2} from "data=2,expert=2,tensor=2"."""
    if isinstance(spec, dict):
        items = list(spec.items())
    else:
        items = []
        for part in filter(None, (p.strip() for p in spec.split(","))):
            name, eq, size = part.partition("=")
            if not eq:
                raise ShardingError(f"mesh spec {spec!r}: {part!r} is not axis=size "
                                    f"(axes: {', '.join(AXES)})")
            try:
                items.append((name.strip(), int(size)))
            except ValueError:
                raise ShardingError(f"mesh spec {spec!r}: size {size.strip()!r} of axis "
                                    f"{name.strip()!r} is not an integer") from None
    sizes = dict.fromkeys(AXES, 1)
    seen = set()
    for name, size in items:
        if name not in sizes:
            raise ShardingError(f"mesh spec {spec!r}: unknown axis {name!r}; the axes are "
                                f"{', '.join(AXES)}")
        if name in seen:
            raise ShardingError(f"mesh spec {spec!r}: axis {name!r} is given twice")
        if size < 1:
            raise ShardingError(f"mesh spec {spec!r}: axis {name!r} has size {size}; sizes "
                                "must be at least 1")
        seen.add(name)
        sizes[name] = size
    return sizes


def make_mesh(spec: str | dict[str, int], devices=None) -> Mesh:
    """A Mesh over all devices (of every process) with axes data, fsdp, expert, context, tensor.

    Axis types are Auto: the partitioner propagates shardings from the parameters and from the
    model's logical-axis constraints, and fills in the collectives. With Explicit axes every op
    whose output sharding is ambiguous (an einsum contracting a sharded dimension, a gather from
    the vocab-sharded embedding) would need an `out_sharding` or a reshard in the model, and the
    model names no mesh axis. Expert dispatch is spelled out with `jax.shard_map`, which works on
    Auto axes. The types are given explicitly because the default changed (to Explicit) across
    JAX versions.
    """
    sizes = parse_mesh(spec)
    devices = list(jax.devices() if devices is None else devices)
    total = math.prod(sizes.values())
    if total != len(devices):
        named = ",".join(f"{a}={n}" for a, n in sizes.items() if n > 1) or "(all axes 1)"
        hint = ""
        if all(d.platform == "cpu" for d in devices) and total > len(devices):
            hint = (f". To try it on this CPU machine, simulate {total} devices before JAX starts: "
                    f"--devices {total} on the command lines, or in Python "
                    f"`jax.config.update(\"jax_num_cpu_devices\", {total})` right after "
                    f"`import jax` (or XLA_FLAGS=--xla_force_host_platform_device_count={total})")
        raise ShardingError(f"mesh {named} has {total} devices but there are {len(devices)}: "
                            f"the axis sizes must multiply to the device count{hint}")
    return jax.make_mesh(tuple(sizes[a] for a in AXES), AXES,
                         axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def simulate_cpu_devices(n: int) -> list:
    """n CPU devices standing in for accelerators, to try a mesh on a machine without them (JAX
    then runs on the CPU). Only takes effect before anything has started JAX's backends; once
    they are up (a test process), the CPU devices there are used if there are enough."""
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:  # backends up already: the count is fixed, and so is the platform
        pass
    else:
        jax.config.update("jax_platforms", "cpu")
    cpus = jax.devices("cpu")
    if len(cpus) < n:
        raise ShardingError(f"cannot simulate {n} CPU devices: JAX started with {len(cpus)} "
                            "before they could be added (set them before any JAX computation)")
    return cpus[:n]


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids=None) -> None:
    """Join a multi-process JAX job (call once per process, before anything touches devices).

    Arguments left None come from JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID;
    when those are unset too, `jax.distributed.initialize` detects the cluster itself (SLURM,
    Open MPI, Kubernetes, a Cloud TPU pod). A single-process run does not call this at all.
    """
    env = os.environ
    coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and env.get("JAX_NUM_PROCESSES"):
        num_processes = int(env["JAX_NUM_PROCESSES"])
    if process_id is None and env.get("JAX_PROCESS_ID"):
        process_id = int(env["JAX_PROCESS_ID"])
    given = [coordinator_address, num_processes, process_id]
    if any(x is not None for x in given) and any(x is None for x in given):
        raise ShardingError("multi-host start-up needs the coordinator address, the process count "
                            "and this process's id together (flags or JAX_COORDINATOR_ADDRESS, "
                            f"JAX_NUM_PROCESSES, JAX_PROCESS_ID); got {given}")
    if num_processes is not None and not 0 <= process_id < num_processes:
        raise ShardingError(f"process id {process_id} is not in 0..{num_processes - 1}")
    jax.distributed.initialize(coordinator_address, num_processes, process_id,
                               local_device_ids=local_device_ids)
