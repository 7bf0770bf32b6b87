"""One of the two processes of tests/test_sharding.py::test_two_processes (not a test itself).

    python tests/two_process_worker.py COORDINATOR_PORT PROCESS_ID OUT.npy

Joins a two-process JAX job on loopback (4 CPU devices each, gloo collectives), runs a sharded
forward over the 8 devices of both, and process 0 writes the gathered logits to OUT.npy.
"""
import sys

import jax
import numpy as np
from jax.experimental import multihost_utils

import model
import sharding

MESH = "data=2,expert=2,tensor=2"


def inputs():
    cfg = model.tiny(num_experts=8)
    ids = np.random.RandomState(0).randint(3, cfg.text.vocab_size, (4, 12))
    return cfg, ids


def main(port: str, process_id: str, out: str):
    sharding.initialize(f"localhost:{port}", 2, int(process_id))
    assert jax.process_count() == 2 and jax.device_count() == 8, jax.devices()
    cfg, ids = inputs()
    params = model.init_params(cfg, jax.random.key(0))  # the same on both processes
    mesh = sharding.make_mesh(MESH)
    params = sharding.shard_params(cfg, params, mesh)
    wg = params["blocks"]["layer_0"]["moe"]["wi_gate"]
    assert not wg.is_fully_addressable and len(wg.addressable_shards) == 4
    logits = model.forward(cfg, params, ids, mesh=mesh)
    full = multihost_utils.process_allgather(logits, tiled=True)
    if jax.process_index() == 0:
        np.save(out, np.asarray(full))
    jax.distributed.shutdown()


if __name__ == "__main__":
    # before anything starts JAX's backends (importing the test module must not do this)
    jax.config.update("jax_num_cpu_devices", 4)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    main(*sys.argv[1:])
