"""Weight and KV-cache quantization (model/quantization.py, model/kernels/quantized.py): which
leaves each recipe quantizes, its error bounds, Meta's int4 numerics, quantized forwards equal to
the forwards of their dequantized weights in every expert kernel and layout, fp8 experts against
a reference written out here, and decoding with an 8-bit cache within a stated bound."""
import ast
import inspect

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import traverse_util
from qwix import QArray

import model
from experiments.bench_quantized_accuracy import o1_params
from model import quantization as Q
from model import sampling
from model.config import ConfigError
from model.kernels import experts as X
from model.kernels import views
from model.kernels.quantized import fp8_rows


# D = 128 and F = 256: the experts' down projection has two int4 groups per output channel.
CFG = model.tiny(hidden_size=128, intermediate_size=256, intermediate_size_mlp=256,
                 head_dim=32, num_layers=4, nope_layers=(1, 3), moe_layers=(1, 3))


@pytest.fixture(scope="module")
def params():
    return o1_params(CFG)


def _quantized(tree):
    flat = traverse_util.flatten_dict(tree)
    return {"/".join(p): x for p, x in flat.items() if isinstance(x, QArray)}


def test_each_recipe_quantizes_its_leaves():
    """On Maverick's tree, abstractly: the leaves, storage types and scale shapes of each recipe."""
    cfg = model.preset("maverick")
    t = cfg.text
    nb, D, F, E, N, H = t.num_blocks, t.hidden_size, t.intermediate_size, t.num_experts, \
        t.num_heads, t.head_dim
    got = {r: _quantized(Q.quantized_shapes(cfg, r)) for r in Q.RECIPES}
    names = {r: {p.split("/", 2)[-1] for p in q} for r, q in got.items()}
    experts = {"moe/wi_gate", "moe/wi_up", "moe/wo"}
    shared = {"moe/shared/wi_gate", "moe/shared/wi_up", "moe/shared/wo"}
    assert names["fp8_mixed"] == experts
    assert names["int4_mixed"] == experts | shared
    assert names["int8"] == experts | shared | {"attn/q", "attn/k", "attn/v", "attn/o",
                                                 "mlp/wi_gate", "mlp/wi_up", "mlp/wo", "kernel"}
    assert "lm_head/kernel" in got["int8"] and not any(p.startswith("vision") for p in got["int8"])
    fp8, int4, int8 = got["fp8_mixed"], got["int4_mixed"], got["int8"]
    assert fp8["blocks/layer_1/moe/wi_gate"].qvalue.dtype == jnp.float8_e4m3fn
    assert fp8["blocks/layer_1/moe/wi_gate"].scale.shape == (nb, E, 1, F)
    assert int4["blocks/layer_1/moe/wi_gate"].scale.shape == (nb, E, D // 128, F)
    assert int4["blocks/layer_1/moe/wo"].scale.shape == (nb, E, F // 128, D)
    assert int4["blocks/layer_1/moe/wo"].qvalue.dtype == jnp.int4
    assert int8["blocks/layer_0/attn/q"].scale.shape == (nb, 1, N, H)
    assert int8["blocks/layer_0/attn/o"].scale.shape == (nb, 1, 1, D)
    assert int8["lm_head/kernel"].scale.shape == (1, t.vocab_size)
    assert all(q.scale.dtype == jnp.float32 for r in got.values() for q in r.values())


def _dequantized(q: QArray) -> np.ndarray:
    """q dequantized with numpy, the scale repeated over its groups (independent of qwix)."""
    v, s = np.asarray(q.qvalue).astype(np.float32), np.asarray(q.scale)
    for a, (n, m) in enumerate(zip(v.shape, s.shape)):
        s = np.repeat(s, n // m, axis=a)
    return v * s


@pytest.mark.parametrize("kind, group", [("int8", None), ("int4", 128), ("fp8", None)])
def test_quantize_dequantize_error_bounds(kind, group):
    r = np.random.default_rng(0)
    w = r.standard_t(3, size=(3, 256, 64)).astype(np.float32)  # heavy tails: outliers set scales
    w[1, :, 5] = 0.0                                            # an all-zero channel
    q = Q.quantize(w, Q.Scheme(kind, (-2,), group))
    deq, err = _dequantized(q), np.abs(_dequantized(q) - w)
    scale = np.repeat(np.asarray(q.scale), 256 // q.scale.shape[1], axis=1)
    assert np.isfinite(deq).all() and (deq[1, :, 5] == 0).all()
    if kind == "int8":       # rounding: half a step; the absmax itself exactly representable
        assert (err <= 0.5 * scale * (1 + 1e-6)).all()
        assert q.scale.shape == (3, 1, 64)
    elif kind == "int4":     # Meta's absmax / 8: +absmax clips to 7 steps, one step off at most
        assert q.scale.shape == (3, 2, 64)
        assert (err <= scale * (1 + 1e-6)).all()
        inside = w / scale < 7.5
        assert (err[inside] <= 0.5 * scale[inside] * (1 + 1e-6)).all()
        assert np.asarray(q.qvalue).astype(np.int8).min() >= -8
    else:                    # e4m3: 3 mantissa bits, relative error 2^-4; subnormals 2^-10 steps
        assert (err <= np.abs(w) * 2.0 ** -4 + scale * 2.0 ** -10).all()
        assert np.abs(deq).max(axis=1) == pytest.approx(np.abs(w).max(axis=1), rel=1e-6)


def _meta(name: str):
    """A function of llama-models' quantize_impls.py, taken from its source: the module imports
    fbgemm_gpu (CUDA only) when loaded."""
    import llama_models
    import torch
    path = inspect.getfile(llama_models).replace("__init__.py", "quantize_impls.py")
    tree = ast.parse(open(path).read())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    scope = {"torch": torch, "Tuple": tuple}
    exec(compile(ast.Module([fn], []), path, "exec"), scope)
    return scope[name]


def test_int4_is_meta_int4_row_quantize():
    """int4_mixed's numerics are llama-models' int4_row_quantize, value for value."""
    import torch
    w = np.random.default_rng(1).normal(size=(96, 384)).astype(np.float32)  # nn.Linear [out, in]
    values, scales = _meta("int4_row_quantize")(torch.tensor(w))           # [N, K], [K/128, N]
    q = Q.quantize(w.T, Q.Scheme("int4", (-2,), Q.GROUP))                  # ours: [in, out]
    np.testing.assert_array_equal(np.asarray(q.qvalue).astype(np.int8).T, values.numpy())
    np.testing.assert_array_equal(np.asarray(q.scale), scales.numpy())


def test_quantize_params_inverse_and_refusals(params):
    from experiments import bench_quantized_accuracy
    assert bench_quantized_accuracy.RECIPES == Q.RECIPES  # named there without importing JAX
    for recipe in Q.RECIPES:
        qp = Q.quantize_params(CFG, params, recipe)
        assert Q.recipe_of(CFG, qp) == recipe
        back = Q.dequantize_params(qp)
        assert jax.tree.structure(back) == jax.tree.structure(params)
        for p, q in _quantized(qp).items():
            np.testing.assert_array_equal(traverse_util.flatten_dict(back, sep="/")[p],
                                          _dequantized(q))
        with pytest.raises(ValueError, match="quantized already"):
            Q.quantize_params(CFG, qp, "int8")
    assert Q.recipe_of(CFG, params) is None
    with pytest.raises(ValueError, match="unknown quantization recipe 'int3'"):
        Q.quantize_params(CFG, params, "int3")
    with pytest.raises(ValueError, match="do not hold the tree"):
        Q.quantize_params(model.tiny(), params, "int8")
    with pytest.raises(ConfigError, match="kv_dtype"):
        CFG.replace(kv_dtype="int4")


RUNS = [("dense", "stacked"), ("ragged", "stacked"), ("rounds", "stacked"), ("rounds", "blocks")]


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["int8", "int4_mixed"])
def test_quantized_forward_is_the_dequantized_forward(params, recipe):
    """Every expert kernel and layout computes, on quantized weights, the forward of the
    dequantized weights (the reference MoE, stacked) to fp32 rounding; decoding by experts
    (switched over split views) too."""
    qp = Q.quantize_params(CFG, params, recipe)
    dq = Q.dequantize_params(qp)
    ids = np.random.default_rng(0).integers(3, CFG.text.vocab_size, (2, 19))
    ref = model.forward(CFG, dq, ids, experts="dense", layout="stacked")
    for experts, layout in RUNS:
        np.testing.assert_allclose(model.forward(CFG, qp, ids, experts=experts, layout=layout),
                                   ref, rtol=1e-5, atol=1e-5, err_msg=f"{experts}, {layout}")
    logits = {}
    for name, p in (("quantized", qp), ("dequantized", dq)):
        _, state = sampling.prefill(CFG, p, [[5, 6, 7, 8, 9], [10, 11]], max_new_tokens=6)
        rt = model.resolve(CFG, "decode")
        assert rt.experts == "switched"
        _, state = sampling.decode(CFG, rt, rt.view_params(p),
                                   state._replace(cache=rt.view_cache(state.cache)),
                                   jnp.asarray([-1]), 0, 6, steps=6, temperature=0.0, top_k=None,
                                   top_p=None)
        logits[name] = state.logits
    np.testing.assert_allclose(logits["quantized"], logits["dequantized"], rtol=1e-5, atol=1e-5)


def _fp8_reference(xs, ids, weights):
    """Each copy through its expert, written out in numpy: inputs to every product quantized
    per row to float8_e4m3fn (row max clipped to 1200), weights dequantized."""
    wg, wu, wo = (_dequantized(w) for w in weights)

    def fp8(a):
        m = np.clip(np.abs(a).max(-1, keepdims=True), 1e-12, 1200.0)
        v = np.clip(a * (448.0 / m), -448, 448).astype(ml_dtypes.float8_e4m3fn)
        return v.astype(np.float32) * (m / 448.0)

    out = []
    for x, e in zip(np.asarray(xs), np.asarray(ids)):
        a, b = fp8(x) @ wg[e], fp8(x) @ wu[e]
        out.append(fp8(a * 0.5 * (1 + np.tanh(a / 2)) * b) @ wo[e])   # silu(a) * b
    return np.stack(out)


@pytest.mark.parametrize("M", [40, 3])      # 3 copies for 6 experts: the gathered path on CPU
def test_fp8_experts_in_every_kernel(M):
    r = np.random.default_rng(2)
    E, D, F = 6, 32, 48
    w = lambda *s: r.normal(size=s).astype(np.float32) / np.sqrt(s[-2])  # noqa: E731
    weights = tuple(Q.quantize(a, Q.Scheme("fp8", (-2,))) for a in (w(E, D, F), w(E, D, F),
                                                                     w(E, F, D)))
    xs = jnp.asarray(r.normal(size=(M, D)) * 3, jnp.float32)
    xs = xs.at[0, 0].set(5000.0)                          # a row past the 1200 bound: clipped
    ids = jnp.asarray(r.integers(0, E, M), jnp.int32)
    ref = _fp8_reference(xs, ids, weights)
    for kernel in ("dense", "ragged", "rounds"):
        got = X.run(xs, ids, weights, model.Runtime(experts=kernel))
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5, err_msg=kernel)
    split = tuple(jax.tree.map(lambda c: views.Parts(list(c)), w) for w in weights)
    np.testing.assert_allclose(X.switched(xs, ids, split), ref, rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(fp8_rows(xs)[0, 0])) == 1200.0


def test_quantized_experts_run_one_at_a_time():
    """The grouped kernel on quantized stacks (swiglu_by_expert): each expert's rows in rounds
    (1 row a round: several rounds an expert; 8: groups in one), the local experts of an
    expert-parallel shard (`first`), and few rows (gathered), all the dense kernel's outputs on
    the same weights to fp32 rounding; compiled, its temporaries hold no stack in float."""
    r = np.random.default_rng(3)
    E, D, F, M = 16, 64, 256, 40
    w = lambda *s: r.normal(size=s).astype(np.float32) / np.sqrt(s[-2])  # noqa: E731
    weights = tuple(Q.quantize(a, Q.Scheme("int4", (-2,), 32)) for a in (w(E, D, F), w(E, D, F),
                                                                          w(E, F, D)))
    xs = jnp.asarray(r.normal(size=(M, D)), jnp.float32)
    ids = jnp.asarray(r.integers(0, E, M), jnp.int32).at[:9].set(5)   # expert 5: 9 rows at least

    @jax.jit
    def outputs(xs, ids, weights):
        order = jnp.argsort(ids)                                    # rows sorted by expert
        sizes = jnp.bincount(ids, length=E).astype(jnp.int32)
        by = {r: jnp.zeros_like(xs).at[order].set(
            X.swiglu_by_expert(xs[order], *weights, sizes, rows=r)) for r in (1, 8)}
        local = tuple(jax.tree.map(lambda c: c[2:6], a) for a in weights)  # experts 2..5 here
        few = {k: X.run(xs[:2], ids[:2], weights, model.Runtime(experts=k))
               for k in ("ragged", "rounds")}
        return (X.dense(xs, ids, *weights), by,
                X.grouped(xs, ids, *local, swiglu_kernel=X.swiglu_ragged, first=2), few)

    ref, by, local, few = outputs(xs, ids, weights)
    for got in (*by.values(), *few.values()):
        np.testing.assert_allclose(got, ref[:len(got)], rtol=1e-5, atol=1e-5)
    here = ((ids >= 2) & (ids < 6))[:, None]
    np.testing.assert_allclose(local, jnp.where(here, ref, 0), rtol=1e-5, atol=1e-5)
    # int8: XLA:CPU widens int4 stacks whole (experiments/plan.py); an int8 one it reads in place
    int8 = tuple(Q.quantize(a, Q.Scheme("int8", (-2,))) for a in (w(E, D, F), w(E, D, F),
                                                                   w(E, F, D)))
    run = jax.jit(lambda xs, ids, ws: X.run(xs, ids, ws, model.Runtime(experts="ragged")))
    temp = run.lower(xs, ids, int8).compile().memory_analysis().temp_size_in_bytes
    assert temp < E * D * F * 4 // 2      # half of one stack in float32; one expert is 1/E


@pytest.mark.slow
def test_fp8_layouts_agree(params):
    """fp8_mixed quantizes the experts' inputs too, so the reference is the dense kernel on the
    same quantized weights: every kernel and layout gives its logits to fp32 rounding."""
    qp = Q.quantize_params(CFG, params, "fp8_mixed")
    ids = np.random.default_rng(0).integers(3, CFG.text.vocab_size, (2, 19))
    ref = model.forward(CFG, qp, ids, experts="dense", layout="stacked")
    for experts, layout in RUNS[1:]:
        np.testing.assert_allclose(model.forward(CFG, qp, ids, experts=experts, layout=layout),
                                   ref, rtol=1e-5, atol=1e-5, err_msg=f"{experts}, {layout}")


# What an 8-bit cache may cost the logits of this random 4-layer model (max |difference| over
# max |logit|), about twice the largest error observed (int8 0.7%, fp8 3.2%): int8 rounds to
# 1/254 of each row's max, e4m3 to 1/16 of each value. (Trained models: the accuracy benchmark.)
KV_BOUND = {"int8": 0.015, "fp8": 0.07}


def _decode(cfg, params, prompts, steps, layout, prefill_layout=None):
    """(last prefill logits, tokens, logits after `steps` greedy steps); the prompt prefilled in
    pieces of 4 (in `prefill_layout`, by default the decode's own), so that later pieces read
    the cache. `steps` is decode's traced limit: one program of 8 steps runs them all."""
    _, state = sampling.prefill(cfg, params, prompts, max_new_tokens=8, prefill_chunk=4,
                                layout=prefill_layout or layout)
    assert isinstance(state.cache["layer_0"]["k"], QArray) == (cfg.kv_dtype is not None)
    first = np.asarray(state.logits)
    rt = model.resolve(cfg, "decode", layout=layout)
    tokens, state = sampling.decode(cfg, rt, rt.view_params(params),
                                    state._replace(cache=rt.view_cache(state.cache)),
                                    jnp.asarray([-1]), 0, steps, steps=8, temperature=0.0,
                                    top_k=None, top_p=None)
    return first, np.asarray(tokens), np.asarray(state.logits)


@pytest.mark.slow
@pytest.mark.parametrize("kv", ["int8", "fp8"])
def test_quantized_cache_decodes_within_its_bound(params, kv):
    """The prompt's last logits and one decode step with an 8-bit cache against the float cache
    (greedy tokens would part after a few steps and compare different continuations), in both
    layouts; then 8 steps of the split layouts' cache views (QArrays of Parts) as the stacked
    cache decodes them, from one prefilled cache: the layouts' weights round differently by an
    ulp, which can move a key across an 8-bit step, so separate prefills are held to the bound."""
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 17, 18], [14, 15, 16]]
    q = CFG.replace(kv_dtype=kv)
    ref = _decode(CFG, params, prompts, 1, "stacked")
    for layout in ("stacked", None):
        got = _decode(q, params, prompts, 1, layout)
        np.testing.assert_array_equal(got[1], ref[1])
        for a, b in ((got[0], ref[0]), (got[2], ref[2])):
            assert 0 < np.abs(a - b).max() / np.abs(b).max() <= KV_BOUND[kv], layout
    stacked = _decode(q, params, prompts, 8, "stacked")
    split = _decode(q, params, prompts, 8, None, prefill_layout="stacked")
    for a, b in zip(split, stacked):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_planner_takes_quantized_weights_and_cache():
    """The planner's figures for int4_mixed weights and an int8 cache: the quantized shard sizes
    stand in the compiled arguments (their sum still exact: params + cache + a few token ids),
    the cache at 1 byte a value plus a float32 scale per head (kv_cache.cache_bytes), split over
    tensor=2 with the KV heads, beside its int32 positions."""
    from experiments import plan
    cfg = model.tiny()
    q = plan.plan("tiny", "tensor=2,expert=2", "float32", 1, 64, devices=jax.devices()[:4],
                  quantize="int4_mixed", kv_dtype="int8")
    for name in ("prefill", "decode"):
        assert 0 <= q[name]["arguments"] - q["params"] - q["cache"] < 10_000
    positions = sum(4 * np.prod(s.shape) for s in jax.tree.leaves(
        model.kv_cache.init_cache(cfg, 1, 64)) if s.dtype == np.int32)
    assert q["cache"] - positions == model.kv_cache.cache_bytes(
        cfg.replace(kv_dtype="int8"), 1, 64) / 2
    assert "int4_mixed params, int8 KV cache" in plan.report(q)
