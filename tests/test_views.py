"""The split layouts of CPU inference (model/kernels/views.py): their views keep the stored tree's
names and shapes, alias its arrays on the CPU, and prefill by blocks and decoding by experts give
the logits, tokens and cache of the stacked (scanned) layout."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import model
from model import kv_cache, runtime, sampling
from model.kernels import views


@pytest.fixture(scope="module", params=["all_moe", "interleaved"])
def tiny(request):
    # Two blocks of 4 layers; "interleaved": MoE on odd layers, dense MLPs between (Maverick).
    kw = {"all_moe": dict(moe_layers=tuple(range(8))),
          "interleaved": dict(moe_layers=(1, 3, 5, 7))}[request.param]
    cfg = model.tiny(num_layers=8, nope_layers=(3, 7), **kw)
    return cfg, model.init_params(cfg, jax.random.key(1))


@pytest.mark.parametrize("layout", ["blocks", "experts"])
def test_views_keep_the_stored_tree(tiny, layout):
    cfg, params = tiny
    viewed = views.split_params(params, layout)
    shapes = lambda tree: jax.tree.map(  # noqa: E731
        lambda a: (tuple(a.shape), a.dtype), tree, is_leaf=views.is_parts)
    assert shapes(viewed) == shapes(params)
    stacked = params["blocks"]["layer_1"]
    q = viewed["blocks"]["layer_1"]["attn"]["q"]
    assert isinstance(q, views.Parts) and len(q) == cfg.text.num_blocks
    np.testing.assert_array_equal(q[1], stacked["attn"]["q"][1])
    wo = viewed["blocks"]["layer_1"]["moe"]["wo"]
    shared = viewed["blocks"]["layer_1"]["moe"]["shared"]["wo"]
    assert not views.is_parts(shared[1])  # the shared expert is one weight, not one per expert
    if layout == "experts":
        np.testing.assert_array_equal(wo[1][3], stacked["moe"]["wo"][1, 3])
    else:
        np.testing.assert_array_equal(wo[1], stacked["moe"]["wo"][1])
    np.testing.assert_array_equal(views.stack(viewed)["blocks"]["layer_1"]["moe"]["wo"],
                                  stacked["moe"]["wo"])
    with pytest.raises(ValueError, match="unknown split layout"):
        views.split_params(params, "layers")


def test_views_alias_the_stored_arrays_on_cpu(tiny):
    cfg, params = tiny
    # Each expert's slice starts on a 64-byte boundary here, so jax takes it as it lies.
    stacked = params["blocks"]["layer_1"]["moe"]["wi_gate"]                # [nb, E, D, F]
    view = views.split_params(params, "experts")["blocks"]["layer_1"]["moe"]["wi_gate"][1][2]
    offset = (1 * stacked.shape[1] + 2) * stacked[0, 0].nbytes
    assert view.unsafe_buffer_pointer() == stacked.unsafe_buffer_pointer() + offset


def test_forward_by_blocks_equals_stacked(tiny):
    cfg, params = tiny
    ids = np.random.default_rng(0).integers(3, cfg.text.vocab_size, (2, 19))
    assert model.resolve(cfg, "prefill", backend="cpu").layout == "blocks"
    np.testing.assert_allclose(model.forward(cfg, params, ids),
                               model.forward(cfg, params, ids, layout="stacked"),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("decode_layout", ["experts", "blocks"])
def test_split_layouts_generate_as_stacked(tiny, decode_layout):
    """What CPU inference runs (prefill by blocks, in two pieces; decoding by experts, or by
    blocks beyond MAX_BRANCHES) against what accelerators and meshes run (stacked): prefill
    logits, tokens, last logits, cache."""
    cfg, params = tiny
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]]   # ragged: left padding
    results = {}
    for prefill_layout, layout in (("blocks", decode_layout), ("stacked", "stacked")):
        _, state = sampling.prefill(cfg, params, prompts, max_new_tokens=12, prefill_chunk=4,
                                    layout=prefill_layout)
        first = np.asarray(state.logits)
        rt = model.resolve(cfg, "decode", layout=layout)
        tokens, state = sampling.decode(
            cfg, rt, rt.view_params(params), state._replace(cache=rt.view_cache(state.cache)),
            jnp.asarray([-1]), 0, 12, steps=12, temperature=0.0, top_k=None, top_p=None)
        results[layout] = first, tokens, state
    (first_a, tok_a, state_a), (first_b, tok_b, state_b) = results["stacked"], results[decode_layout]
    np.testing.assert_allclose(first_a, first_b, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(tok_a, tok_b)
    np.testing.assert_allclose(state_a.logits, state_b.logits, rtol=1e-5, atol=1e-5)
    assert all(views.is_parts(a) for a in jax.tree.leaves(state_b.cache, is_leaf=views.is_parts))
    for a, b in zip(jax.tree.leaves(state_a.cache), jax.tree.leaves(views.stack(state_b.cache))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_layouts_keep_to_the_compile_budgets(tiny, monkeypatch):
    cfg, _ = tiny                                        # 2 blocks, up to 8 x 4 branches
    layout = lambda phase: runtime.resolve(cfg, phase, backend="cpu").layout  # noqa: E731
    assert (layout("prefill"), layout("decode"), layout("train")) == ("blocks", "experts", "stacked")
    monkeypatch.setattr(runtime, "MAX_BRANCHES", 8)
    assert layout("decode") == "blocks"
    monkeypatch.setattr(runtime, "MAX_BLOCKS", 1)
    assert layout("prefill") == layout("decode") == "stacked"
    assert runtime.resolve(cfg, "decode", backend="gpu").layout == "stacked"


def test_runtime_choices_are_consistent(tiny):
    cfg, _ = tiny
    rt = runtime.resolve(cfg, "decode", backend="cpu", experts="dense")
    assert (rt.layout, rt.experts) == ("blocks", "dense")       # dense reads [E, ...] weights
    assert runtime.resolve(cfg, "train", backend="gpu").experts == "ragged"
    assert runtime.resolve(cfg.replace(dtype="bfloat16"), "train", backend="gpu").attention == "cudnn"
    with pytest.raises(ValueError, match="switched"):
        runtime.Runtime(layout="experts", experts="rounds")
    with pytest.raises(ValueError, match="layout"):
        runtime.Runtime(layout="rows")
    cache = kv_cache.init_cache(cfg, 1, 8)
    split = runtime.resolve(cfg, "decode", backend="cpu").view_cache(cache)
    assert views.is_parts(split["layer_0"]["k"]) and not views.is_parts(
        runtime.Runtime().view_cache(split)["layer_0"]["k"])
