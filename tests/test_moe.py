"""The grouped (dropless) MoE paths against the dense reference, on the same parameters."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import moe


def _weights(E=6, D=16, F=24, seed=0):
    r = np.random.default_rng(seed)
    w = lambda *s: jnp.asarray(r.normal(size=s) / np.sqrt(s[-2]), jnp.float32)
    return w(E, D, F), w(E, D, F), w(E, F, D)


def _gathered(xs, wg, wu, wo, gs):
    expert = jnp.repeat(jnp.arange(gs.shape[0]), gs, total_repeat_length=xs.shape[0])
    return moe.swiglu_gathered(xs, wg, wu, wo, expert)


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("T, grouped", [(50, moe.swiglu_rounds), (50, moe.swiglu_ragged),
                                        (50, _gathered),
                                        (3, None)])  # T * k <= E: the gather on CPU
def test_grouped_equals_dense(k, T, grouped, monkeypatch):
    if grouped is not None:
        monkeypatch.setattr(moe, "swiglu_grouped", grouped)
    E = 6
    wg, wu, wo = _weights(E)
    r = np.random.default_rng(1)
    x = jnp.asarray(r.normal(size=(T, 16)), jnp.float32)
    logits = jnp.asarray(r.normal(size=(T, E)), jnp.float32)
    top_logits, top_ids = jax.lax.top_k(logits, k)
    scores = jax.nn.sigmoid(top_logits)
    dense = moe.experts_dense(x, top_ids, scores, wg, wu, wo)
    out = moe.experts_grouped(x, top_ids, scores, wg, wu, wo)
    np.testing.assert_allclose(out, dense, rtol=1e-5, atol=1e-5)
    # Gradients agree too (training runs the grouped path).
    loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(a[0], top_ids, scores, *a[1:])))
    g_dense = jax.grad(loss(moe.experts_dense), argnums=(0, 1, 2, 3))(x, wg, wu, wo)
    g_out = jax.grad(loss(moe.experts_grouped), argnums=(0, 1, 2, 3))(x, wg, wu, wo)
    for a, b in zip(g_out, g_dense):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("k", [1, 2])
def test_switched_experts_equal_dense(k):
    """The split layout's path: each token copy through its own expert's separate weights."""
    E, T = 6, 5
    wg, wu, wo = _weights(E)
    r = np.random.default_rng(3)
    x = jnp.asarray(r.normal(size=(T, 16)), jnp.float32)
    top_logits, top_ids = jax.lax.top_k(jnp.asarray(r.normal(size=(T, E)), jnp.float32), k)
    scores = jax.nn.sigmoid(top_logits)
    experts = [(wg[e], wu[e], wo[e]) for e in range(E)]
    np.testing.assert_allclose(moe.experts_switched(x, top_ids, scores, experts),
                               moe.experts_dense(x, top_ids, scores, wg, wu, wo),
                               rtol=1e-5, atol=1e-5)


def test_cpu_kernels_handle_empty_and_overfull_experts():
    E, D, M = 5, 8, 37
    wg, wu, wo = _weights(E, D, 12)
    xs = jnp.asarray(np.random.default_rng(2).normal(size=(M, D)), jnp.float32)
    for sizes in ([0, 37, 0, 0, 0], [1, 0, 0, 0, 36], [7, 8, 9, 6, 7]):
        gs = jnp.asarray(sizes, jnp.int32)
        # rows=4: several rounds, the skewed groups needing up to ten of them
        for kernel in (lambda *a: moe.swiglu_rounds(*a, rows=4), moe.swiglu_rounds, _gathered):
            np.testing.assert_allclose(kernel(xs, wg, wu, wo, gs),
                                       moe.swiglu_ragged(xs, wg, wu, wo, gs), rtol=1e-5, atol=1e-5)
        # The hand-written gradient of the rounds, over several rounds and skewed groups.
        grad = lambda f: jax.grad(lambda *w: jnp.sum(jnp.sin(f(*w, gs))), argnums=(0, 1, 2, 3))
        for a, b in zip(grad(lambda *a: moe.swiglu_rounds(*a, rows=4))(xs, wg, wu, wo),
                        grad(moe.swiglu_ragged)(xs, wg, wu, wo)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_score_scales_the_expert_input_not_its_output():
    # One expert, one token: SwiGLU is not homogeneous, so E(s x) != s E(x) tells them apart.
    wg, wu, wo = _weights(E=1, D=4, F=4)
    x = jnp.ones((1, 4))
    ids, s = jnp.zeros((1, 1), jnp.int32), jnp.full((1, 1), 0.3)
    out = moe.experts_grouped(x, ids, s, wg, wu, wo)
    expected = moe.swiglu_ragged(0.3 * x, wg, wu, wo, jnp.array([1], jnp.int32))
    np.testing.assert_allclose(out, expected, rtol=1e-5)
    assert not np.allclose(out, 0.3 * moe.swiglu_ragged(x, wg, wu, wo, jnp.array([1], jnp.int32)))
