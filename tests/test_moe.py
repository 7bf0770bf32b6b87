"""The expert kernels (model/kernels/experts.py) against the dense reference, on the same weights,
and the router score on the expert's input."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import model
from model.kernels import experts as X
from model.kernels import views
from model.layers import MLP
from model.moe import MoE


def _weights(E=6, D=16, F=24, seed=0):
    r = np.random.default_rng(seed)
    w = lambda *s: jnp.asarray(r.normal(size=s) / np.sqrt(s[-2]), jnp.float32)  # noqa: E731
    return w(E, D, F), w(E, D, F), w(E, F, D)


def _gathered(xs, wg, wu, wo, gs):
    expert = jnp.repeat(jnp.arange(gs.shape[0]), gs, total_repeat_length=xs.shape[0])
    return X.swiglu_gathered(xs, wg, wu, wo, expert)


def _copies(M, E, D=16, seed=1):
    r = np.random.default_rng(seed)
    return (jnp.asarray(r.normal(size=(M, D)), jnp.float32),
            jnp.asarray(r.integers(0, E, M), jnp.int32))


@pytest.mark.parametrize("M, kernel", [(50, X.swiglu_rounds), (50, X.swiglu_ragged),
                                       (50, _gathered),
                                       (3, X.swiglu_rounds)])  # M <= E: the gather on CPU
def test_grouped_equals_dense(M, kernel):
    wg, wu, wo = _weights(E=6)
    xs, ids = _copies(M, E=6)
    grouped = functools.partial(X.grouped, swiglu_kernel=kernel)
    np.testing.assert_allclose(grouped(xs, ids, wg, wu, wo), X.dense(xs, ids, wg, wu, wo),
                               rtol=1e-5, atol=1e-5)
    # Gradients agree too (training runs the grouped path).
    loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(a[0], ids, *a[1:])))  # noqa: E731
    g_dense = jax.grad(loss(X.dense), argnums=(0, 1, 2, 3))(xs, wg, wu, wo)
    g_grouped = jax.grad(loss(grouped), argnums=(0, 1, 2, 3))(xs, wg, wu, wo)
    for a, b in zip(g_grouped, g_dense):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_grouped_runs_only_the_experts_held_here():
    """Expert parallelism's body: a device holding experts 2..3 of 6 returns their copies' outputs
    and zeros for the rest."""
    wg, wu, wo = _weights(E=6)
    xs, ids = _copies(40, E=6)
    part = X.grouped(xs, ids, wg[2:4], wu[2:4], wo[2:4], swiglu_kernel=X.swiglu_rounds, first=2)
    whole = X.dense(xs, ids, wg, wu, wo)
    here = np.isin(np.asarray(ids), [2, 3])
    np.testing.assert_allclose(part[here], whole[here], rtol=1e-5, atol=1e-5)
    assert not np.any(np.asarray(part)[~here])


def test_switched_experts_equal_dense():
    """The "experts" layout's kernel: each copy through its own expert's separate weights."""
    wg, wu, wo = _weights(E=6)
    xs, ids = _copies(5, E=6, seed=3)
    split = tuple(views.Parts([w[e] for e in range(6)]) for w in (wg, wu, wo))
    np.testing.assert_allclose(X.switched(xs, ids, split), X.dense(xs, ids, wg, wu, wo),
                               rtol=1e-5, atol=1e-5)


def test_cpu_kernels_handle_empty_and_overfull_experts():
    E, D, M = 5, 8, 37
    wg, wu, wo = _weights(E, D, 12)
    xs = jnp.asarray(np.random.default_rng(2).normal(size=(M, D)), jnp.float32)
    for sizes in ([0, 37, 0, 0, 0], [1, 0, 0, 0, 36], [7, 8, 9, 6, 7]):
        gs = jnp.asarray(sizes, jnp.int32)
        # rows=4: several rounds, the skewed groups needing up to ten of them
        for kernel in (lambda *a: X.swiglu_rounds(*a, rows=4), X.swiglu_rounds, _gathered):
            np.testing.assert_allclose(kernel(xs, wg, wu, wo, gs),
                                       X.swiglu_ragged(xs, wg, wu, wo, gs), rtol=1e-5, atol=1e-5)
        # The hand-written gradient of the rounds, over several rounds and skewed groups.
        grad = lambda f: jax.grad(lambda *w: jnp.sum(jnp.sin(f(*w, gs))), argnums=(0, 1, 2, 3))  # noqa: E731
        for a, b in zip(grad(lambda *a: X.swiglu_rounds(*a, rows=4))(xs, wg, wu, wo),
                        grad(X.swiglu_ragged)(xs, wg, wu, wo)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("k", [1, 2])
def test_every_kernel_gives_the_moe_layer_of_the_reference(k):
    """The MoE layer under each runtime's expert kernel, top-1 and top-2: the same outputs."""
    cfg = model.tiny(experts_per_token=k)
    p = model.init_params(cfg, jax.random.key(0))["blocks"]["layer_0"]["moe"]
    p = jax.tree.map(lambda a: a[0] * 20, p)  # one layer, weights large enough to matter
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 9, 32)), jnp.float32)
    out = lambda rt, p=p: MoE(cfg, rt).apply({"params": p}, x)  # noqa: E731
    ref = out(model.Runtime(experts="dense"))
    for kernel in ("ragged", "rounds"):
        np.testing.assert_allclose(out(model.Runtime(experts=kernel)), ref, rtol=1e-5, atol=1e-5)
    split = dict(p, **{n: views.Parts(list(p[n])) for n in X.EXPERT_WEIGHTS})
    np.testing.assert_allclose(out(model.Runtime(layout="experts", experts="switched"), split),
                               ref, rtol=1e-5, atol=1e-5)


def test_score_scales_the_expert_input_not_its_output():
    # One expert, one token: SwiGLU is not homogeneous, so E(s x) != s E(x) tells them apart.
    cfg = model.tiny(num_experts=1, vocab_size=8, hidden_size=4, intermediate_size=4)
    p = jax.tree.map(lambda a: a[0] * 30, model.init_params(cfg, jax.random.key(2))
                     ["blocks"]["layer_0"]["moe"])
    x = jnp.ones((1, 1, 4))
    s = jax.nn.sigmoid(x[0] @ p["router"])                      # the score of expert 0, [1, 1]
    shared = MLP(cfg, cfg.text.intermediate_size).apply({"params": p["shared"]}, x)
    routed = MoE(cfg).apply({"params": p}, x) - shared
    expected = X.swiglu_ragged(s * x[0], p["wi_gate"], p["wi_up"], p["wo"], jnp.array([1]))
    np.testing.assert_allclose(routed[0], expected, rtol=1e-5, atol=1e-6)
    wrong = s * X.swiglu_ragged(x[0], p["wi_gate"], p["wi_up"], p["wo"], jnp.array([1]))
    assert not np.allclose(routed[0], wrong, rtol=1e-3)
