"""The split layouts (model/split.py): their parameter trees are what `Decoder(layout=...)`
declares, they alias the stacked arrays on the CPU, and prefill by blocks and decoding by
experts give the logits, tokens and cache of the stacked (scanned) layout."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import model
from model import kv_cache, multimodal, sampling, split
from model.decoder import Decoder
from model.split import split_params


@pytest.fixture(scope="module", params=["all_moe", "interleaved"])
def tiny(request):
    # Two blocks of 4 layers; "interleaved": MoE on odd layers, dense MLPs between (Maverick).
    kw = {"all_moe": dict(moe_layers=tuple(range(8))),
          "interleaved": dict(moe_layers=(1, 3, 5, 7))}[request.param]
    cfg = model.tiny(num_layers=8, nope_layers=(3, 7), **kw)
    return cfg, model.init_params(cfg, jax.random.key(1))


@pytest.mark.parametrize("layout", ["blocks", "experts"])
def test_split_tree_is_what_the_decoder_declares(tiny, layout):
    cfg, params = tiny
    declared = jax.eval_shape(lambda: nn.unbox(Decoder(cfg, layout=layout).init(
        jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]))
    laid_out = split_params(cfg, params, layout)
    shapes = lambda tree: jax.tree.map(lambda a: (a.shape, a.dtype), tree)  # noqa: E731
    assert shapes(laid_out) == shapes(declared)
    stacked = params["blocks"]["layer_1"]
    np.testing.assert_array_equal(laid_out["block_1"]["layer_1"]["attn"]["q"], stacked["attn"]["q"][1])
    experts = laid_out["block_1"]["layer_1"]["moe"]
    if layout == "experts":
        np.testing.assert_array_equal(experts["wo_3"], stacked["moe"]["wo"][1, 3])
    else:
        np.testing.assert_array_equal(experts["wo"], stacked["moe"]["wo"][1])


def test_split_arrays_alias_the_stacked_ones_on_cpu(tiny):
    cfg, params = tiny
    # Each expert's slice starts on a 64-byte boundary here, so jax takes it as it lies.
    stacked = params["blocks"]["layer_1"]["moe"]["wi_gate"]                # [nb, E, D, F]
    view = split_params(cfg, params, "experts")["block_1"]["layer_1"]["moe"]["wi_gate_2"]
    offset = (1 * stacked.shape[1] + 2) * stacked[0, 0].nbytes
    assert view.unsafe_buffer_pointer() == stacked.unsafe_buffer_pointer() + offset
    with pytest.raises(ValueError, match="unknown split layout"):
        split_params(cfg, params, "layers")


def test_forward_by_blocks_equals_stacked(tiny):
    cfg, params = tiny
    ids = np.random.default_rng(0).integers(3, cfg.text.vocab_size, (2, 19))
    stacked = Decoder(cfg).apply({"params": multimodal.decoder_params(params)}, ids)[0]
    np.testing.assert_allclose(model.forward(cfg, params, ids), stacked, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("decode_layout", ["experts", "blocks"])
def test_split_layouts_generate_as_stacked(tiny, decode_layout, monkeypatch):
    """What CPU inference runs (prefill by blocks, in two pieces; decoding by experts, or by
    blocks beyond MAX_BRANCHES) against what accelerators and meshes run (stacked): prefill
    logits, tokens, last logits, cache."""
    cfg, params = tiny
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]]   # ragged: left padding
    stop = jnp.asarray([-1], jnp.int32)
    results = {}
    for cpu in (True, False):
        if not cpu:  # what a mesh or an accelerator gets
            monkeypatch.setattr(sampling, "for_inference", lambda cfg, p, plan, layout: ("stacked", p))
        _, state = sampling.prefill(cfg, params, prompts, max_new_tokens=12, prefill_chunk=4)
        first = np.asarray(state[0])
        layout = decode_layout if cpu else "stacked"
        p = params if layout == "stacked" else split_params(cfg, params, layout)
        tokens, state = sampling.decode(cfg, p, state, stop, 0, steps=12, temperature=0.0,
                                        top_k=None, top_p=None, layout=layout)
        results[cpu] = first, tokens, state
    (first_a, tok_a, state_a), (first_b, tok_b, state_b) = results[False], results[True]
    np.testing.assert_allclose(first_a, first_b, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(tok_a, tok_b)
    np.testing.assert_allclose(state_a[0], state_b[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(kv_cache.split(state_a[2])), jax.tree.leaves(state_b[2])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_layouts_keep_to_the_compile_budgets(tiny, monkeypatch):
    cfg, params = tiny                                   # 2 blocks, up to 8 x 4 branches
    assert split.for_inference(cfg, params, None, "experts")[0] == "experts"
    monkeypatch.setattr(split, "MAX_BRANCHES", 8)
    assert split.for_inference(cfg, params, None, "experts")[0] == "blocks"
    assert split.for_inference(cfg, params, None, "blocks")[0] == "blocks"
    monkeypatch.setattr(split, "MAX_BLOCKS", 1)
    for layout in ("blocks", "experts"):
        assert split.for_inference(cfg, params, None, layout) == ("stacked", params)
