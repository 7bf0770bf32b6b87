"""Sharding over 8 simulated CPU devices: sharded == single-device, shard shapes, bad input,
Orbax restored straight into shards, and two processes on loopback."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import checkpoints
import model
import sharding
from sharding import ShardingError
from tests.hf_models import multimodal_config

MESHES = ["expert=8", "tensor=2,expert=4", "data=2,expert=2,tensor=2", "fsdp=8",
          "tensor=4,fsdp=2"]  # the last: 2 KV heads on tensor=4 are replicated
PROMPTS = [[5, 9, 33, 7, 21], [8, 3, 100, 64, 12, 90, 4, 17, 55]]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ref():
    cfg = model.tiny(num_experts=8)
    params = model.init_params(cfg, jax.random.key(0))
    ids = np.random.RandomState(0).randint(3, cfg.text.vocab_size, (8, 10))
    logits = np.asarray(model.forward(cfg, params, ids))
    tokens = model.generate(cfg, params, PROMPTS, max_new_tokens=6, stop_tokens=[])
    return cfg, params, ids, logits, tokens


@pytest.mark.slow
@pytest.mark.parametrize("spec", MESHES)
def test_sharded_equals_single_device(ref, spec):
    cfg, params, ids, logits, tokens = ref
    mesh = sharding.make_mesh(spec)
    sizes = sharding.parse_mesh(spec)
    sp = sharding.shard_params(cfg, params, mesh)
    # each device holds 1/(expert x fsdp x tensor) of every expert weight, split as the rules say
    wg = sp["blocks"]["layer_0"]["moe"]["wi_gate"]  # [blocks, E, D, F]
    nb, E, D, F = wg.shape
    want = (nb, E // sizes["expert"], D // sizes["fsdp"], F // sizes["tensor"])
    assert {s.data.shape for s in wg.addressable_shards} == {want}
    assert len(wg.addressable_shards) == 8
    kv = sp["blocks"]["layer_0"]["attn"]["k"]  # [blocks, D, K, H]: K split only if tensor divides
    K = cfg.text.num_kv_heads
    assert kv.addressable_shards[0].data.shape[2] == (K // sizes["tensor"]
                                                      if K % sizes["tensor"] == 0 else K)
    out = model.forward(cfg, sp, ids, mesh=mesh)
    np.testing.assert_allclose(np.asarray(out), logits, atol=1e-5, rtol=0)
    got = model.generate(cfg, sp, PROMPTS, max_new_tokens=6, stop_tokens=[], mesh=mesh)
    assert got.tolist() == tokens.tolist()


@pytest.mark.parametrize("rules, spec", [("fsdp", "fsdp=8"), ("tensor", "data=4,tensor=2"),
                                         ("expert", "expert=8")])
def test_each_strategy_alone(ref, rules, spec):
    cfg, params, ids, logits, _ = ref
    mesh = sharding.make_mesh(spec)
    out = model.forward(cfg, params, ids, mesh=mesh, rules=rules)  # unplaced params: placed here
    np.testing.assert_allclose(np.asarray(out), logits, atol=1e-5, rtol=0)


def test_kv_cache_is_sharded(ref):
    cfg, params, *_ = ref
    mesh = sharding.make_mesh("data=2,expert=2,tensor=2")
    _, state = model.sampling.prefill(cfg, params, PROMPTS, max_new_tokens=4, mesh=mesh)
    k = state[2]["layer_0"]["k"]  # [blocks, B, K, S, H]: batch over data, KV heads over tensor
    assert k.sharding.spec[1] == "data" and k.sharding.spec[2] == "tensor"
    assert k.addressable_shards[0].data.shape[1:3] == (1, 1)


@pytest.mark.slow
def test_image_tokens_sharded():
    cfg = multimodal_config(model.tiny(num_experts=8), num_hidden_layers=1)
    params = model.init_params(cfg, jax.random.key(0))
    ids = np.array([[9, 6] + [5] * 16 + [7, 8]] * 2)  # one tile of 16 image tokens per row
    pixels = np.random.RandomState(0).randn(2, 32, 32, 3).astype(np.float32)
    want = np.asarray(model.forward(cfg, params, ids, pixels))
    mesh = sharding.make_mesh("data=2,fsdp=2,tensor=2")
    out = model.forward(cfg, params, ids, pixels, mesh=mesh)
    np.testing.assert_allclose(np.asarray(out), want, atol=1e-5, rtol=0)


def test_planner_reports_shards():
    from experiments import plan
    r = plan.plan("tiny", "tensor=2,expert=2", "float32", 1, 64, devices=jax.devices()[:4])
    # the compiled programs take exactly the sharded params and cache (plus a few token ids)
    for name in ("prefill", "decode"):
        extra = r[name]["arguments"] - r["params"] - r["cache"]
        assert 0 <= extra < 10_000, (name, r[name], r["params"], r["cache"])
        assert r[name]["aliased"] >= r["cache"]  # the cache is donated, updated in place
    assert "tensor=2,expert=2" in plan.report(r)


def test_bad_meshes():
    n = len(jax.devices())
    with pytest.raises(ShardingError, match=f"has 4 devices but there are {n}"):
        sharding.make_mesh("data=2,tensor=2")
    with pytest.raises(ShardingError, match="unknown axis 'model'"):
        sharding.make_mesh("model=8")
    with pytest.raises(ShardingError, match="given twice"):
        sharding.make_mesh("data=2,data=4")
    with pytest.raises(ShardingError, match="not an integer"):
        sharding.make_mesh("data=two")
    with pytest.raises(ShardingError, match="not axis=size"):
        sharding.make_mesh("data")


def test_a_mesh_beyond_the_cpu_devices_says_how_to_simulate_them():
    n = len(jax.devices())  # 8 simulated here (conftest.py)
    with pytest.raises(ShardingError) as e:
        sharding.make_mesh(f"data=2,fsdp={n}")
    assert str(e.value) == (
        f"mesh data=2,fsdp={n} has {2 * n} devices but there are {n}: the axis sizes must multiply "
        f"to the device count. To try it on this CPU machine, simulate {2 * n} devices before JAX "
        f"starts: --devices {2 * n} on the command lines, or in Python "
        f"`jax.config.update(\"jax_num_cpu_devices\", {2 * n})` right after `import jax` (or "
        f"XLA_FLAGS=--xla_force_host_platform_device_count={2 * n})")
    # Once JAX has started, the devices there are what can be had
    assert sharding.simulate_cpu_devices(n // 2) == jax.devices("cpu")[:n // 2]
    with pytest.raises(ShardingError, match=f"cannot simulate {2 * n} CPU devices: JAX started "
                                            f"with {n}"):
        sharding.simulate_cpu_devices(2 * n)


def test_indivisible_heads_and_experts(ref):
    cfg, params, ids, *_ = ref
    with pytest.raises(ShardingError, match="4 attention heads are not divisible by mesh axis "
                                            "tensor of size 8"):
        sharding.shard_params(cfg, params, sharding.make_mesh("tensor=8"))
    four = model.tiny()  # 4 experts
    with pytest.raises(ShardingError, match="4 experts are not divisible by mesh axis expert of "
                                            "size 8"):
        model.forward(four, model.param_shapes(four), ids, mesh=sharding.make_mesh("expert=8"))


def test_bad_rules(ref):
    cfg, params, *_ = ref
    mesh = sharding.make_mesh("tensor=2,fsdp=4")
    with pytest.raises(ShardingError, match="'embed' and 'mlp' are both mapped onto mesh axis "
                                            "'tensor'"):
        sharding.shard_params(cfg, params, mesh, rules={"embed": "tensor", "mlp": "tensor"})
    with pytest.raises(ShardingError, match="unknown logical axis 'hidden'"):
        sharding.shard_params(cfg, params, mesh, rules={"hidden": "tensor"})
    with pytest.raises(ShardingError, match="unknown sharding strategy 'zero3'"):
        sharding.shard_params(cfg, params, mesh, rules="zero3")


def test_orbax_restores_into_shards(ref, tmp_path):
    cfg, params, ids, logits, _ = ref
    checkpoints.save(tmp_path / "ckpt", cfg, params)
    mesh = sharding.make_mesh("expert=4,tensor=2")
    cfg2, sp = sharding.load(tmp_path / "ckpt", mesh)
    want = sharding.param_shardings(cfg, mesh)
    for x, s in zip(jax.tree.leaves(sp), jax.tree.leaves(want)):
        assert x.sharding == s
    wo = sp["blocks"]["layer_0"]["moe"]["wo"]  # [blocks, E, F, D]: 2 of 8 experts, half of F
    assert {s.data.shape for s in wo.addressable_shards} == {(1, 2, 8, 32)}
    out = model.forward(cfg2, sp, ids, mesh=mesh)
    np.testing.assert_allclose(np.asarray(out), logits, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_two_processes(ref, tmp_path):
    """Two JAX processes on loopback (4 CPU devices each, gloo): a forward sharded over the 8
    devices of both equals the single-process result."""
    sys.path.insert(0, str(ROOT / "tests"))
    import two_process_worker as worker
    cfg, ids = worker.inputs()
    params = model.init_params(cfg, jax.random.key(0))
    want = np.asarray(model.forward(cfg, params, ids))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = tmp_path / "logits.npy"
    procs = [subprocess.Popen([sys.executable, str(ROOT / "tests" / "two_process_worker.py"),
                               str(port), str(i), str(out)], env=env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    try:
        logs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    np.testing.assert_allclose(np.load(out), want, atol=1e-5, rtol=0)
