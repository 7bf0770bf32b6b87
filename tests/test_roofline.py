"""The roofline benchmark's counts (experiments/bench_roofline.py), checked against the parameter
tree itself and a brute-force count of the keys causal attention sees."""
import jax
import numpy as np

import model
from experiments.bench_roofline import decode_bytes, prefill_flops

EXPERTS = ("wi_gate", "wi_up", "wo")


def _leaves(cfg):
    shapes = jax.eval_shape(lambda: model.init_params(cfg, jax.random.key(0)))
    return [(jax.tree_util.keystr(p), leaf) for p, leaf in
            jax.tree_util.tree_flatten_with_path(shapes)[0]]


def _is_routed(name):
    return "['moe']" in name and "shared" not in name and any(f"['{w}']" in name for w in EXPERTS)


def test_decode_bytes_counts_what_a_step_reads():
    cfg = model.tiny(moe_layers=(1, 3))  # dense MLP layers between, as in Maverick
    t = cfg.text
    B, filled = 3, 20                    # past the chunk of 8: chunked layers read 8 slots
    leaves = _leaves(cfg)
    routed = sum(np.prod(a.shape) for n, a in leaves if _is_routed(n))
    other = sum(np.prod(a.shape) for n, a in leaves if not _is_routed(n) and "embed" not in n)
    distinct = t.num_experts * (1 - (1 - 1 / t.num_experts) ** B)
    cache = B * 2 * t.num_kv_heads * t.head_dim * (3 * 8 + filled)  # 3 chunked layers, 1 global
    want = 4 * (other + routed * distinct / t.num_experts + B * t.hidden_size + cache)
    assert np.isclose(decode_bytes(cfg, B, filled), want, rtol=1e-12)


def test_prefill_flops_counts_matmuls_and_keys_seen():
    cfg = model.tiny()
    t = cfg.text
    B, T = 2, 20
    leaves = _leaves(cfg)
    matmul = sum(np.prod(a.shape) for n, a in leaves
                 if a.ndim > 1 + ("blocks" in n) and "embed" not in n and not _is_routed(n)
                 and "router" not in n)
    routed = sum(np.prod(a.shape) for n, a in leaves if _is_routed(n)) / t.num_experts
    router = sum(np.prod(a.shape) for n, a in leaves if "router" in n)
    q, k = np.arange(T)[:, None], np.arange(T)[None]
    seen = {True: ((k <= q) & (k // 8 == q // 8)).sum(), False: (k <= q).sum()}
    keys = sum(seen[s.chunked] for s in t.layer_specs)
    want = B * (2 * T * (matmul + routed + router) + 4 * t.num_heads * t.head_dim * keys)
    assert np.isclose(prefill_flops(cfg, B, T), want, rtol=1e-12)
